"""Training: one linear `train_and_evaluate` in banner-commented sections (big_vision style).

Data flow of a step: uint8 batch -> normalise on device -> both stages on the batch and stage 1
on one affine-warped copy -> the weighted loss terms -> gradients of the trainable parameters
only -> clip -> per-group AdamW -> EMA. The step is a pure function under `jax.jit` with explicit
shardings; its randomness is `fold_in(seed, step)`, so any step can be replayed and a resumed
run continues exactly where the killed one stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ifam_jax import checkpoints, losses, optim, sharding
from ifam_jax import workdir as workdir_lib
from ifam_jax.workdir import absolute, is_local, replace_text
from ifam_jax import data as data_lib
from ifam_jax.evaluate import evaluate_source, make_eval_step
from ifam_jax.models import fast_attention, ifam, vit

SOURCES = {
    'folder': data_lib.ImageFolderSource,
    'tfds': data_lib.TfdsSource,
    'waterbirds': data_lib.WaterbirdsSource,
    'metashift': data_lib.MetaShiftSource,
    'in9': data_lib.ImageNet9Source,
    'cub': data_lib.CubSource,
    'synthetic': data_lib.SyntheticSpuriousSource,
}

# Sources labelled by their class folders, and the folder that holds those of a spec.
FOLDER_SOURCES = {'folder': lambda spec: spec['root'],
                  'metashift': lambda spec: os.path.join(spec['root'], spec['split'])}

# fold_in tags of the per-step key.
RNG_MODEL, RNG_AFFINE, RNG_WARPED = range(3)

# Train metrics that must be finite before a step's state is logged, evaluated or checkpointed.
FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')
# What the loop adds to a step's metrics in its train line (final.json's 'train' has none).
LOG_ONLY = ('img_per_sec', 'step_time', 'epoch')


class CheckpointSaveError(OSError):
  """A checkpoint could not be saved; the run stops rather than train on unsaved."""


# ----------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------
def make_source(spec: Mapping[str, Any],
                classes: Sequence[str] | None = None) -> data_lib.sources.Source:
  """A data source from a config entry such as dict(source='waterbirds', root=..., split=...).

  `classes` labels a folder-like source (`FOLDER_SOURCES`) by these names instead of its own
  sorted class folders; other sources take their labels from their metadata and ignore it.
  """
  spec = dict(spec)
  kind = spec.pop('source')
  if kind not in SOURCES:
    raise ValueError(f'unknown data source {kind!r}; known: {sorted(SOURCES)}')
  if classes is not None and kind in FOLDER_SOURCES:
    if spec.get('classes') is not None and list(spec['classes']) != list(classes):
      raise ValueError(f'{kind} source {spec.get("root")} sets classes {list(spec["classes"])}, '
                       f'but the training classes are {list(classes)}')
    spec['classes'] = list(classes)
  return SOURCES[kind](**spec)


def training_classes(config: ml_collections.ConfigDict) -> list[str] | None:
  """The class names that label the eval splits: data.classes, else the class folders of a
  folder-like training split (listed, not scanned); None when the training labels come from
  metadata."""
  if config.data.classes:
    return list(config.data.classes)
  spec = dict(config.data.train)
  if spec['source'] not in FOLDER_SOURCES:
    return None
  if spec.get('classes') is not None:
    return list(spec['classes'])
  try:
    return data_lib.sources.class_folders(FOLDER_SOURCES[spec['source']](spec))
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}; its class folders label the eval splits: set data.classes '
                            'to evaluate without the training data') from None


def make_eval_sources(config: ml_collections.ConfigDict) -> dict[str, data_lib.sources.Source]:
  """The sources of data.evals, labelled by the training classes (`training_classes`)."""
  classes = training_classes(config)
  return {name: make_source(spec, classes) for name, spec in config.data.evals.items()}


def make_transforms(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(train transform, eval transform) for the configured augmentation and image size."""
  size, augment = config.model.image_size, config.data.augment
  t = data_lib.transforms
  if augment == 'imagenet':
    return t.imagenet_train(size), t.imagenet_eval(size)
  if augment == 'cub_original':
    return t.cub_original_train(size), t.resize_center_crop(size)
  if augment == 'none':
    return t.resize_center_crop(size), t.resize_center_crop(size)
  raise ValueError(f"unknown augment {augment!r}; use 'imagenet', 'cub_original' or 'none'")


def vit_from_config(model_cfg: ml_collections.ConfigDict) -> vit.ViTConfig:
  return vit.vit_config(model_cfg.variant, image_size=model_cfg.image_size,
                        num_registers=model_cfg.num_registers, dtype=model_cfg.dtype,
                        attention=model_cfg.attention,
                        **dict(model_cfg.vit_overrides))


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The XLA options for this backend's jitted steps (`gpu_compiler_options` on GPUs)."""
  return dict(config.gpu_compiler_options) if jax.default_backend() == 'gpu' else {}


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int,
                rngs: nnx.Rngs) -> nnx.Module:
  """IFAM, or the plain ViT classifier for kind='baseline'; DINOv2 weights if configured."""
  cfg = vit_from_config(model_cfg)
  if model_cfg.kind == 'baseline':
    model = vit.ViTClassifier(cfg, num_classes=num_classes, rngs=rngs)
    backbones = [model.backbone]
  elif model_cfg.kind == 'ifam':
    model = ifam.IFAM(num_classes=num_classes, num_parts=model_cfg.num_parts, stage1=cfg,
                      stage2=cfg, gumbel_tau=model_cfg.gumbel_tau,
                      part_dropout=model_cfg.part_dropout,
                      mask_part_dropout=model_cfg.mask_part_dropout,
                      stage2_mask=model_cfg.stage2_mask,
                      eval_gumbel_noise=model_cfg.eval_gumbel_noise, rngs=rngs)
    backbones = [model.stage1.backbone, model.stage2.backbone]
  else:
    raise ValueError(f"model.kind must be 'ifam' or 'baseline', got {model_cfg.kind!r}")
  if model_cfg.init_weights:
    state_dict = checkpoints.read_state_dict(model_cfg.init_weights)
    for backbone in backbones:
      checkpoints.load_dinov2(backbone, state_dict)
  return model


# ----------------------------------------------------------------------------
# Losses and steps
# ----------------------------------------------------------------------------
def grouped_presence_loss(maps: jax.Array, kind: str, group_size: int) -> jax.Array:
  """The presence loss averaged over groups of `group_size` images (0: one group).

  The reference takes its max over each GPU's local batch and averages gradients over GPUs;
  grouping reproduces that on any mesh, independent of how the batch is sharded here.
  """
  b = maps.shape[0]
  if not group_size or group_size >= b:
    return losses.presence_loss(maps, kind)
  if b % group_size:
    raise ValueError(f'batch {b} is not a multiple of loss.presence_group_size {group_size}')
  grouped = maps.reshape((b // group_size, group_size) + maps.shape[1:])
  return jnp.mean(jax.vmap(lambda m: losses.presence_loss(m, kind))(grouped))


def ifam_loss_terms(model: ifam.IFAM, images: jax.Array, labels: jax.Array, valid: jax.Array,
                    rng: jax.Array, loss_cfg: ml_collections.ConfigDict, run_stage2: bool = True,
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Every weighted loss term of one iFAM step, and accuracy-style extras.

  With `run_stage2=False` the stage-2 term 'cls2' and its 'accuracy' are left out and the
  extras carry the hard 'fg_mask' [B, h*w] instead, for `packed_stage2`.
  """
  weights = loss_cfg.weights
  out = model(images, train=True, rng=jax.random.fold_in(rng, RNG_MODEL), run_stage2=run_stage2)
  maps = out.part_maps
  terms = {
      'cls2': (lambda: losses.cross_entropy(out.logits, labels, valid)) if run_stage2 else None,
      'cls1': losses.cross_entropy(out.stage1_logits, labels, valid),
      'presence': lambda: grouped_presence_loss(maps, loss_cfg.presence,
                                                loss_cfg.presence_group_size),
      'enforced_presence': lambda: losses.enforced_presence_loss(maps,
                                                                 loss_cfg.enforced_presence),
      'orthogonality': lambda: losses.orthogonality_loss(out.part_features,
                                                         loss_cfg.orthogonality),
      'total_variation': lambda: losses.total_variation_loss(maps),
      'entropy': lambda: losses.pixel_entropy_loss(maps),
      'concentration': lambda: losses.concentration_loss(maps),
  }
  if weights.equivariance:
    affine = losses.random_affine_params(jax.random.fold_in(rng, RNG_AFFINE), images.shape[1],
                                         loss_cfg.degrees, loss_cfg.translate,
                                         tuple(loss_cfg.scale))
    warped = losses.affine_warp(images, *affine)
    warped_maps = model.stage1_maps(warped, train=True, rng=jax.random.fold_in(rng, RNG_WARPED))
    back = losses.inverse_warp_maps(warped_maps, *affine, images.shape[1])
    terms['equivariance'] = losses.equivariance_loss(maps, back)
  terms = {k: (v() if callable(v) else v) for k, v in terms.items()
           if weights[k] and v is not None}
  extras = {'stage1_accuracy': _accuracy(out.stage1_logits, labels, valid),
            'fg_fraction': jnp.mean(out.fg_mask)}
  if run_stage2:
    extras['accuracy'] = _accuracy(out.logits, labels, valid)
  else:
    extras['fg_mask'] = out.fg_mask.reshape(images.shape[0], -1)
  return terms, extras


def stage2_capacities(fractions: Sequence[float], num_patches: int) -> tuple[int, ...]:
  """The patch capacities of `model.stage2_token_tiers`, ascending, always ending with all."""
  if any(not 0.0 <= f <= 1.0 for f in fractions):
    raise ValueError(f'model.stage2_token_tiers must be fractions in [0, 1], got {fractions}')
  return tuple(sorted({math.ceil(f * num_patches) for f in fractions} | {num_patches}))


def packing_applies(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether stage 2 trains on its visible tokens only (`packed_stage2`): the tiers are set,
  and the stage-2 loss reaches stage 1 through nothing (hard mask, no surrogate gradient)."""
  facts = ifam.stage2_mask_facts(model_cfg.stage2_mask)
  return (model_cfg.kind == 'ifam' and bool(model_cfg.stage2_token_tiers)
          and facts.binary and not facts.trains_stage1)


def largest_divisor_at_most(n: int, limit: int) -> int:
  """The group count `packed_stage2` uses: groups must split each device's batch evenly."""
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def packed_stage2(stage2_loss: Callable, params: Any, images: jax.Array, patch_mask: jax.Array,
                  labels: jax.Array, valid: jax.Array, *, capacities: Sequence[int],
                  groups: int, shards: int) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """Stage 2's cross-entropy and its gradient, computed on the visible tokens only.

  Stage 2 never attends to a masked patch, so its output is the same when it runs on the
  visible patches gathered first (`gather_patches`) at any capacity that holds them all.
  Each of the `shards` equal slices of the batch (one per device) is sorted by visible-patch
  count and cut into `groups` groups, so group capacities only grow. The trailing groups that
  need every patch run as one batch (a `lax.switch` over their number: fewer, larger kernels);
  a `lax.scan` runs each other group through a `lax.switch` over statically shaped branches,
  one per capacity, at the smallest that fits it. Each branch differentiates its own loss and
  adds to the accumulated gradient, so its activations never leave it. The values are the
  dense step's up to summation order.

  Args:
    stage2_loss: (params, images, patch_mask, keep_index, labels, valid, denominator) ->
      (summed weighted loss / denominator, logits).
    params: what to differentiate.
    patch_mask: [B, N_p] hard mask, > 0 = visible; carries no gradient.
    capacities: ascending patch capacities; the last is N_p.
    groups: groups per slice; must divide B / shards.
    shards: slices of the batch sorted independently, so that no image changes device.

  Returns:
    The loss, its gradient w.r.t. `params`, and metrics: 'accuracy' and 'stage2_tokens', the
    fraction of patch tokens the capacities computed.
  """
  b, n_p = patch_mask.shape
  per_shard = b // shards
  group_size = per_shard // groups
  counts = jnp.sum(patch_mask > 0, axis=1)
  order = jnp.argsort(counts.reshape(shards, per_shard), axis=1)

  def grouped(x):  # [B, ...] -> [groups, shards * group_size, ...], sorted within each shard
    x = x.reshape((shards, per_shard) + x.shape[1:])
    x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    x = jnp.swapaxes(x.reshape((shards, groups, group_size) + x.shape[2:]), 0, 1)
    return x.reshape((groups, shards * group_size) + x.shape[3:])

  inputs = {'images': images, 'mask': patch_mask, 'labels': labels, 'valid': valid}
  inputs = {k: grouped(v) for k, v in inputs.items()}
  tier = jnp.searchsorted(jnp.asarray(capacities), jnp.max(grouped(counts), axis=1))
  full = len(capacities) - 1
  num_full = jnp.sum(tier == full)  # the trailing groups, since capacities only grow
  denominator = jnp.maximum(jnp.sum(valid), 1.0)

  def differentiate(batch, capacity):
    keep_index = fast_attention.gather_patches(batch['mask'], capacity)
    (loss, logits), grads = jax.value_and_grad(stage2_loss, has_aux=True)(
        params, batch['images'], batch['mask'], keep_index, batch['labels'], batch['valid'],
        denominator)
    return grads, loss, logits

  group_logits = jax.eval_shape(
      lambda: differentiate(jax.tree.map(lambda x: x[0], inputs), capacities[0])[2])
  no_logits = jnp.zeros((groups,) + group_logits.shape, group_logits.dtype)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def trailing(k):  # the last k groups as one batch, each device's rows kept on it
    def run():
      if k == 0:
        return zeros, jnp.zeros((), jnp.float32), no_logits
      merge = lambda x: jnp.swapaxes(x[groups - k:], 0, 1).reshape((-1,) + x.shape[2:])
      grads, loss, logits = differentiate(jax.tree.map(merge, inputs), n_p)
      logits = jnp.swapaxes(logits.reshape((shards * group_size, k, -1)), 0, 1)
      return grads, loss, no_logits.at[groups - k:].set(logits)
    return run

  grads, loss, merged_logits = jax.lax.switch(num_full, [trailing(k) for k in range(groups + 1)])

  def branch(capacity):
    def run(grads, group):
      group_grads, loss, logits = differentiate(group, capacity)
      return jax.tree.map(jnp.add, grads, group_grads), loss, logits
    return run

  def skip(grads, group):
    del group
    return grads, jnp.zeros((), jnp.float32), no_logits[0]

  def body(carry, xs):
    grads, loss = carry
    group_tier, group = xs
    grads, group_loss, logits = jax.lax.switch(group_tier, branches, grads, group)
    return (grads, loss + group_loss), logits

  branches = [branch(c) for c in capacities[:-1]] + [skip]  # full groups ran merged
  (grads, loss), logits = jax.lax.scan(body, (grads, loss), (tier, inputs))
  logits = logits + merged_logits
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  computed = jnp.sum(jnp.asarray(capacities)[tier]) * shards * group_size
  metrics = {'accuracy': _accuracy(flat(logits), flat(inputs['labels']), flat(inputs['valid'])),
             'stage2_tokens': computed / (b * n_p)}
  return loss, grads, metrics


def baseline_loss_terms(model: vit.ViTClassifier, images: jax.Array, labels: jax.Array,
                        valid: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  logits = model(images)
  return ({'cls2': losses.cross_entropy(logits, labels, valid)},
          {'accuracy': _accuracy(logits, labels, valid)})


def _accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  correct = (jnp.argmax(logits, axis=-1) == labels) * valid
  return jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)


def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    schedule: Callable[[jax.Array], jax.Array], batch_shards: int = 1) -> Callable:
  """The pure train step: (state, frozen, batch) -> (state, metrics).

  The state carries everything a resumed run needs to continue exactly, down to the count of
  unreadable (skipped) training images that the logs report: each counted in its first pass
  over the data only (the batch's 'first_pass'), so once. `batch_shards`: how many devices
  the batch is split over; `packed_stage2` sorts each device's slice on its own.
  """
  baseline = config.model.kind == 'baseline'
  weights = config.loss.weights
  accumulation = config.optim.accumulation_steps
  ema_decay = config.optim.ema_decay
  packed = packing_applies(config.model) and bool(weights.cls2)
  if packed:
    capacities = stage2_capacities(config.model.stage2_token_tiers,
                                   vit_from_config(config.model).num_patches)

  def loss_fn(params, frozen, images, labels, valid, rng):
    model = nnx.merge(graphdef, params, frozen, rest)
    if baseline:
      terms, extras = baseline_loss_terms(model, images, labels, valid)
    else:
      terms, extras = ifam_loss_terms(model, images, labels, valid, rng, config.loss,
                                      run_stage2=not packed)
    total = sum(weights[k] * v for k, v in terms.items())
    return total, (terms, extras)

  def train_step(state, frozen, batch):
    step = state['step']
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    images = data_lib.normalize(batch['image'])
    valid = batch['valid'].astype(jnp.float32)
    (total, (terms, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], frozen, images, batch['label'], valid, rng)
    if packed:
      def stage2_loss(params, images, patch_mask, keep_index, labels, valid, denominator):
        model = nnx.merge(graphdef, params, frozen, rest)
        logits = model.stage2(images, patch_mask, keep_index=keep_index)
        nll = losses.negative_log_likelihood(logits, labels)
        return jnp.sum(nll * valid) / denominator, logits

      per_shard = images.shape[0] // batch_shards
      cls2, cls2_grads, cls2_metrics = packed_stage2(
          stage2_loss, state['params'], images,
          extras.pop('fg_mask'), batch['label'], valid, capacities=capacities,
          groups=largest_divisor_at_most(per_shard, config.model.stage2_token_groups),
          shards=batch_shards)
      grads = jax.tree.map(lambda g, g2: g + weights.cls2 * g2, grads, cls2_grads)
      total = total + weights.cls2 * cls2
      terms['cls2'] = cls2
      extras.update(cls2_metrics)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state,
                 'skipped_images': state['skipped_images'] + jnp.sum(
                     (batch['valid'] == 0) & (batch['first_pass'] > 0))}
    if ema_decay:
      count = (step + 1) // accumulation
      update = lambda: optim.ema_update(state['ema'], params, count, ema_decay)
      if accumulation == 1:  # every step updates: no conditional in the step
        new_state['ema'] = update()
      else:
        new_state['ema'] = jax.lax.cond((step + 1) % accumulation == 0, update,
                                        lambda: state['ema'])
    metrics = {'loss': total, **terms, **extras, 'grad_norm': optax.tree.norm(grads),
               'param_norm': optax.tree.norm(params), 'lr': schedule(step),
               'skipped_images': new_state['skipped_images']}
    return new_state, metrics

  return train_step


def freeze_garbage_collector() -> None:
  """Collects garbage once, then exempts every object alive now from later collections.

  After compilation millions of long-lived objects (jaxprs, lowered modules, the model) are
  tracked, and each full collection walks them all: at 518 px one such pause took 0.2 s, in
  which the host enqueued nothing and the device ran dry. Objects made later are still
  collected as usual.
  """
  gc.collect()
  gc.freeze()


# ----------------------------------------------------------------------------
# Model, optimizer and jitted steps (shared by the train loop and ifam_jax.bench)
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Training:
  """Everything the train loop needs before its first step, laid out on the mesh.

  `state` is {'step', 'params', 'opt_state', 'skipped_images'[, 'ema']}; `abstract_state` is its
  shape tree (for restoring checkpoints). `train_step(state, frozen, batch) -> (state, metrics)`
  donates `state`; `eval_step(params, frozen, batch, rng)` is `evaluate.make_eval_step`'s.
  """

  graphdef: nnx.GraphDef
  rest: nnx.State
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  abstract_state: Any
  state: Any
  frozen: Any
  state_sharding: Any
  frozen_sharding: Any
  batch_sharding: jax.sharding.Sharding
  train_step: Callable
  eval_step: Callable


def build_training(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                   mesh: jax.sharding.Mesh) -> Training:
  """Builds the model (DINOv2 weights if configured), optimizer, sharded state and steps."""
  batch_sharding = sharding.batch_sharding(mesh)
  model = build_model(config.model, num_classes, nnx.Rngs(config.seed))
  graphdef, params, frozen, rest = optim.split_frozen(model, config.optim.group_rules,
                                                      config.optim.groups)
  del model
  labels = optim.label_params(params, config.optim.group_rules)
  tx = optim.build_optimizer(config.optim, labels, steps_per_epoch, config.total_epochs)
  schedule = optim.lr_schedule(config.optim, steps_per_epoch, config.total_epochs)

  def init_state(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'skipped_images': jnp.zeros((), jnp.int32)}
    if config.optim.ema_decay:
      state['ema'] = params
    return state

  abstract_state = jax.eval_shape(init_state, params)
  state_sharding = sharding.infer_sharding(abstract_state, config.sharding_rules, mesh,
                                           config.fsdp_min_size)
  frozen_sharding = sharding.infer_sharding(frozen, config.sharding_rules, mesh,
                                            config.fsdp_min_size)
  repl = sharding.replicated(mesh)
  # Through host memory: every process built the same values, and placing host arrays is what
  # jax defines for a sharding that spans other processes' devices.
  params = jax.device_put(jax.device_get(params), state_sharding['params'])
  frozen = jax.device_put(jax.device_get(frozen), frozen_sharding)
  state = jax.jit(init_state, out_shardings=state_sharding)(params)
  del params

  train_step = jax.jit(make_train_step(graphdef, rest, tx, config, schedule,
                                       batch_shards=mesh.size),
                       in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                       out_shardings=(state_sharding, repl), donate_argnums=(0,),
                       compiler_options=compiler_options(config))
  eval_step = jax.jit(make_eval_step(graphdef, rest, config),
                      in_shardings=(state_sharding['params'], frozen_sharding, batch_sharding,
                                    repl), out_shardings=repl,
                      compiler_options=compiler_options(config))
  return Training(graphdef=graphdef, rest=rest, tx=tx, schedule=schedule,
                  abstract_state=abstract_state, state=state, frozen=frozen,
                  state_sharding=state_sharding, frozen_sharding=frozen_sharding,
                  batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step)


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------
class MetricWriter:
  """JSON lines in <workdir>/metrics.jsonl (process 0 only).

  A run resumed from step `start_step` first drops the lines of later steps (and a line cut short
  by the kill): it replays those steps exactly and logs them again, so the file reads as one
  uninterrupted run.

  A local file is appended to line by line. An object in a bucket cannot be appended to (gcsfs
  silently overwrites it instead), so there the lines are kept and the whole object is rewritten
  at most every `flush_seconds` and on `flush()`. The loop flushes before each checkpoint, so
  every line a resume keeps is saved before the checkpoint it resumes from.
  """

  def __init__(self, workdir: str | os.PathLike, start_step: int, flush_seconds: float = 60):
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.active = jax.process_index() == 0
    self.append = is_local(self.path)
    self.flush_seconds = flush_seconds
    self.lines: list[str] = []
    if self.active and self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line)['step'] <= start_step:
            self.lines.append(line + '\n')
        except json.JSONDecodeError:
          pass
      replace_text(self.path, ''.join(self.lines))
    self.flushed, self.pending = time.monotonic(), False

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    line = json.dumps({'step': step, 'split': split, **metrics}) + '\n'
    if self.append:
      with self.path.open('a') as f:
        f.write(line)
      return
    self.lines.append(line)
    self.pending = True
    if time.monotonic() - self.flushed >= self.flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Rewrites a bucket's metrics.jsonl if lines were written since; local files are current."""
    if self.pending:
      replace_text(self.path, ''.join(self.lines))
      self.flushed, self.pending = time.monotonic(), False


def read_step_metrics(workdir: str | os.PathLike, step: int) -> dict[str, dict[str, Any]]:
  """{split: metrics} of the lines metrics.jsonl holds for `step` (the last line of each split)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  recorded = {}
  for line in path.read_text().splitlines() if path.exists() else ():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
      continue
    if record.get('step') == step:
      recorded[record['split']] = {k: v for k, v in record.items() if k not in ('step', 'split')}
  return recorded


def announce(message: str, *args: Any) -> None:
  """Progress for people: logged, and printed on process 0 when absl INFO logs are hidden
  (`main` hides them by default; `--verbosity=0` shows every library's INFO lines)."""
  logging.info(message, *args)
  if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
    print(message % args, flush=True)


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()}


# ----------------------------------------------------------------------------
# Parameters for evaluation: <workdir>/params/{final,best}, or a train checkpoint (step_<N>)
# ----------------------------------------------------------------------------
def train_checkpoint(workdir: str | os.PathLike, which: str) -> epath.Path | None:
  """<workdir>/checkpoints/<N>/state for which='step_<N>' (raises if no such step), else None."""
  match = re.fullmatch(r'step_(\d+)', which)
  if match is None:
    return None
  root = epath.Path(workdir) / 'checkpoints'
  path = absolute(root / str(int(match[1])) / 'state')
  if not path.is_dir():
    steps = sorted(int(p.name) for p in root.glob('*') if p.name.isdigit())
    raise FileNotFoundError(f'no train checkpoint of step {int(match[1])} in {root}; '
                            f'available steps: {steps}')
  return path


def read_params_info(workdir: str | os.PathLike, which: str) -> dict[str, Any] | None:
  """The JSON of <workdir>/params/<which>, or None: it exists only once the parameters do.

  For which='step_<N>': {'step', 'num_classes', 'ema'} of train checkpoint N, from its metadata.
  num_classes is the width of the saved classifier `head` (the ViT's, iFAM's stage 2), which
  describes exactly that checkpoint, also of a run that is still going or was killed.
  """
  if (state := train_checkpoint(workdir, which)) is not None:
    tree = ocp.PyTreeCheckpointHandler().metadata(state).tree
    saved = {'params': tree['train']['params'], 'frozen': tree['frozen']}
    widths = [leaf.shape[-1] for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
              if ('head', 'kernel') in itertools.pairwise(getattr(k, 'key', None) for k in path)]
    if not widths:
      raise ValueError(f'{state} has no classifier head/kernel')
    return {'step': int(state.parent.name), 'num_classes': widths[0],
            'ema': 'ema' in tree['train']}
  path = epath.Path(workdir) / 'params' / f'{which}.json'
  return json.loads(path.read_text()) if path.exists() else None


def save_params(workdir: str | os.PathLike, which: str, params: Any, frozen: Any,
                info: Mapping[str, Any]) -> None:
  """Writes trainable + frozen parameters (EMA where enabled) and a JSON of what they are.

  Collective: every process calls it. The JSON is removed first and written last, so it marks
  complete parameters even if a kill interrupts the save.
  """
  workdir = epath.Path(workdir)
  info_path = workdir / 'params' / f'{which}.json'
  if jax.process_index() == 0:
    info_path.unlink(missing_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(absolute(workdir / 'params' / which),
                      {'params': params, 'frozen': frozen}, force=True)
  if jax.process_index() == 0:
    replace_text(info_path, json.dumps(dict(info), indent=2) + '\n')
  multihost_utils.sync_global_devices(f'save_params {which}')


def abstract_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """The model of `model_cfg` without materialised weights, for restoring saved ones into."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.init_weights = ''
  return nnx.eval_shape(lambda: build_model(model_cfg, num_classes, nnx.Rngs(0)))


def load_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               which: str = 'final') -> nnx.Module:
  """The model of `config` with the parameters saved under <workdir>/params/<which>.

  which='step_<N>' reads train checkpoint N instead: its EMA where the run had one, else its
  params, plus frozen; a partial restore that reads no optimizer state.
  """
  workdir = epath.Path(workdir)
  info = read_params_info(workdir, which)
  if info is None:
    raise FileNotFoundError(f'no saved parameters at {workdir / "params" / which}; train first')
  abstract = abstract_model(config.model, info['num_classes'])
  graphdef, params, frozen, rest = optim.split_frozen(abstract, config.optim.group_rules,
                                                      config.optim.groups)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {'params': params, 'frozen': frozen})
  if (state := train_checkpoint(workdir, which)) is None:
    restored = ocp.StandardCheckpointer().restore(absolute(workdir / 'params' / which), target)
  else:
    key = 'ema' if info['ema'] else 'params'
    item = {'train': {key: target['params']}, 'frozen': target['frozen']}
    restored = ocp.PyTreeCheckpointHandler().restore(state, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    restored = {'params': restored['train'][key], 'frozen': restored['frozen']}
  return nnx.merge(graphdef, restored['params'], restored['frozen'], rest)


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint.

  Returns {'step', 'evals', 'train'}: the last step, its eval metrics per split and its train
  metrics. A workdir that already holds the final parameters returns what it recorded then.
  """
  workdir_path = epath.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  workdir_lib.check_writable(workdir_path)

  # --- Data and batch sizes (validated before any device work) -----------------------------
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size('global_batch_size', config.global_batch_size, mesh)
  if config.data.evals:
    sharding.check_batch_size('data.eval_batch_size', config.data.eval_batch_size, mesh)
  patch = vit_from_config(config.model).patch_size
  data_lib.check_image_size(config.model.image_size, patch)
  train_source = make_source(config.data.train, config.data.classes or None)
  eval_sources = make_eval_sources(config)
  if config.data.val_split and config.data.val_split not in eval_sources:
    raise ValueError(f'data.val_split {config.data.val_split!r} is not one of the evals '
                     f'{sorted(eval_sources)}')
  num_classes = train_source.num_classes
  for name, source in eval_sources.items():
    if source.num_classes != num_classes:
      raise ValueError(f'eval {name!r} has {source.num_classes} classes, train has {num_classes}')
  train_transform, eval_transform = make_transforms(config)
  batch_size = config.global_batch_size
  steps_per_epoch = len(train_source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'{train_source!r} has {len(train_source)} examples, fewer than one batch '
                     f'of {batch_size}')
  total_steps = steps_per_epoch * config.total_epochs
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  final = read_params_info(workdir_path, 'final')
  if final is not None and final['step'] == total_steps:
    announce('%s is done (params/final.json is step %d); not training again', workdir_path,
             total_steps)
    return {k: final[k] for k in ('step', 'evals', 'train')}
  train_ds = data_lib.make_dataset(train_source, transform=train_transform,
                                   global_batch_size=batch_size, seed=config.seed, train=True,
                                   num_workers=config.data.num_workers)
  announce('train: %r, %d steps/epoch, %d steps', train_source, steps_per_epoch, total_steps)

  # --- Model, optimizer ----------------------------------------------------------------------
  t = build_training(config, num_classes, steps_per_epoch, mesh)
  batch_sharding, state, frozen = t.batch_sharding, t.state, t.frozen
  abstract_state, state_sharding, frozen_sharding = (t.abstract_state, t.state_sharding,
                                                     t.frozen_sharding)
  train_step, eval_step = t.train_step, t.eval_step
  del t

  # --- Checkpoints: resume if the workdir has one --------------------------------------------
  # A save interrupted by a kill stays in a '<step>.orbax-checkpoint-tmp' directory, which
  # latest_step() ignores and the manager deletes; a step directory exists only once complete.
  # Directories are made synchronously, so that a folder that refuses them fails the save call
  # itself rather than a background thread that the next save waits on for minutes.
  manager = ocp.CheckpointManager(
      absolute(workdir_path / 'checkpoints'), item_names=('state', 'data'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True, cleanup_tmp_directories=True,
          enable_async_checkpointing=True,
          async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
  train_iter = iter(train_ds)
  start_step = manager.latest_step() or 0
  if start_step:
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {'train': abstract_state, 'frozen': frozen},
        {'train': state_sharding, 'frozen': frozen_sharding})
    restored = manager.restore(start_step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    state, frozen = restored['state']['train'], restored['state']['frozen']
    announce('resumed from step %d', start_step)
  writer = MetricWriter(workdir_path, start_step)

  def save_failed(step: int, error: Exception) -> CheckpointSaveError:
    return CheckpointSaveError(
        f'saving a checkpoint in {manager.directory} failed (seen at step {step}): '
        f'{str(error).splitlines()[0][:300]}. Fix the folder and rerun to resume; the last '
        f'saved checkpoint is step {manager.latest_step()}.')

  def check_saved(step: int) -> None:
    """Raises if an asynchronous save has failed, within a log step of the failure."""
    try:
      manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
      raise save_failed(step, e) from None

  def save(step: int) -> None:
    """Starts the asynchronous save of `step` once the folder takes a file and the previous
    save has committed; a failure stops the run at once, with one message."""
    writer.flush()  # the metrics up to `step` are saved before its checkpoint
    try:
      workdir_lib.probe_writable(workdir_path / 'checkpoints')
      manager.check_for_errors()
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({'train': state, 'frozen': frozen}),
          data=grain.checkpoint.CheckpointSave(train_iter)))
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
      raise save_failed(step, e) from None

  # --- Evaluators -----------------------------------------------------------------------------
  def eval_params():
    return state['ema'] if config.optim.ema_decay else state['params']

  best = read_params_info(workdir_path, 'best')
  best_so_far = -math.inf if best is None else best['value']

  def maybe_save_best(step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    """Keeps the parameters of the best validation score (never chosen on a test split)."""
    nonlocal best_so_far
    if not config.data.val_split:
      return
    value = results[config.data.val_split][config.data.best_metric]
    if value > best_so_far:
      best_so_far = value
      save_params(workdir_path, 'best', eval_params(), frozen,
                  {'step': step, 'num_classes': num_classes, 'split': config.data.val_split,
                   'metric': config.data.best_metric, 'value': value})

  def run_evals(step: int, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    params = eval_params()
    results = {}
    for name, source in eval_sources.items():
      if names is not None and name not in names:
        continue
      results[name] = evaluate_source(eval_step, params, frozen, source, eval_transform, config,
                                      batch_sharding)
      writer.write(step, name, results[name])
      announce('eval %s @ step %d: %s', name, step, ', '.join(
          f'{k} {v:.4g}' for k, v in results[name].items() if isinstance(v, (int, float))))
    return results

  # --- Train loop -----------------------------------------------------------------------------
  # Metrics are fetched only on steps that log, evaluate or checkpoint (fetching every step
  # would stall the device queue); each of those first checks that the state is finite, so a
  # diverged state is never logged as good, evaluated or saved. Evals precede the checkpoint,
  # so a checkpoint at step s implies the evals of step s are in metrics.jsonl.
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
  last_log_time, last_log_step = time.perf_counter(), start_step
  metrics = None
  results: dict[str, Any] = {}
  with jax.set_mesh(mesh):
    for step in range(start_step, total_steps):
      batch = next(train_iter)
      state, metrics = train_step(state, frozen, data_lib.global_batch(
          {k: batch[k] for k in ('image', 'label', 'valid', 'first_pass')}, batch_sharding))
      if step == start_step:
        freeze_garbage_collector()  # after the step's compilation
      done = step + 1
      is_last = done == total_steps
      log = done % config.log_every_steps == 0 or is_last
      checkpoint = done % config.checkpoint_every_steps == 0 or is_last
      evals = bool(eval_sources) and (done % eval_every == 0 or is_last)
      if not (log or checkpoint or evals):
        continue
      scalars = _scalars(jax.device_get(metrics))
      diverged = {k: scalars[k] for k in FINITE_METRICS if not math.isfinite(scalars[k])}
      if diverged:
        writer.flush()
        manager.wait_until_finished()
        last_good = manager.latest_step()
        raise FloatingPointError(
            f'non-finite {diverged} at step {done} (checked on every log, eval and checkpoint '
            'step); this state is not saved. ' + (
                'No checkpoint was saved before it.' if last_good is None else
                f'The last good checkpoint is step {last_good} in {manager.directory}.'))
      check_saved(done)
      if log:
        now = time.perf_counter()
        rate = (done - last_log_step) * batch_size / max(now - last_log_time, 1e-9)
        eta = (total_steps - done) * batch_size / max(rate, 1e-9)
        scalars.update(img_per_sec=rate, step_time=batch_size / max(rate, 1e-9),
                       epoch=done / steps_per_epoch)
        writer.write(done, 'train', scalars)
        if jax.process_index() == 0:
          print(f'step {done}/{total_steps} ({100 * done / total_steps:.1f}%) | '
                f'loss {scalars["loss"]:.4f} | acc {scalars["accuracy"]:.3f} | '
                f'lr {scalars["lr"]:.3g} | {rate:.1f} img/s | ETA {_format_duration(eta)}',
                flush=True)
        last_log_time, last_log_step = now, done
      if evals:
        eval_start = time.perf_counter()
        results = run_evals(done)
        maybe_save_best(done, results)
        freeze_garbage_collector()  # after the eval step's compilation
        last_log_time += time.perf_counter() - eval_start  # img/s and ETA are of training
      if checkpoint:
        save(done)
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
    raise save_failed(total_steps, e) from None
  manager.close()
  if skipped := int(jax.device_get(state['skipped_images'])):
    logging.warning('%d unreadable training images were skipped (named in the warnings above)',
                    skipped)
  if metrics is None:  # resumed from the last checkpoint: its step's records stand as written
    recorded = read_step_metrics(workdir_path, total_steps)
    train_scalars = {k: v for k, v in recorded.get('train', {}).items() if k not in LOG_ONLY}
    results = {name: recorded[name] for name in eval_sources if name in recorded}
    results.update(run_evals(total_steps, [n for n in eval_sources if n not in results]))
  else:
    train_scalars = _scalars(jax.device_get(metrics))
  summary = {'step': total_steps, 'evals': results, 'train': train_scalars}
  writer.flush()
  save_params(workdir_path, 'final', eval_params(), frozen, {'num_classes': num_classes,
                                                             **summary})
  return summary
