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
import json
import math
import os
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

from ifam_jax import factory, loggers, losses, methods, optim, sharding
from ifam_jax import data as data_lib
from ifam_jax import progress as progress_lib
from ifam_jax import workdir as workdir_lib
from ifam_jax.apply import apply
from ifam_jax.evaluators.loop import Classification
from ifam_jax.evaluators.predict import make_eval_step
from ifam_jax.packed_stage2 import (largest_divisor_at_most, packed_stage2, packing_applies,
                                    stage2_capacities)
from ifam_jax.workdir import absolute

# Train metrics that must be finite before a step's state is logged, evaluated or checkpointed.
FINITE_METRICS = ('loss', 'grad_norm', 'param_norm')
# What the loop adds to a step's metrics in its train line (final.json's 'train' has none).
LOG_ONLY = ('img_per_sec', 'step_time', 'epoch')


class CheckpointSaveError(OSError):
  """A checkpoint could not be saved; the run stops rather than train on unsaved."""


# ----------------------------------------------------------------------------
# The train step
# ----------------------------------------------------------------------------
def make_train_step(graphdef: nnx.GraphDef, rest: nnx.State, tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict,
                    schedule: Callable[[jax.Array], jax.Array], batch_shards: int = 1) -> Callable:
  """The pure train step: (state, frozen, batch) -> (state, metrics).

  The batch holds 'image', 'label', 'valid', 'first_pass' and the method's `batch_inputs`.
  The state carries everything a resumed run needs to continue exactly, down to the count of
  unreadable (skipped) training images that the logs report: each counted in its first pass
  over the data only (the batch's 'first_pass'), so once. `batch_shards`: how many devices
  the batch is split over; `packed_stage2` sorts each device's slice on its own.
  """
  method = methods.get(config.model.kind)
  weights = config.loss.weights
  accumulation = config.optim.accumulation_steps
  ema_decay = config.optim.ema_decay
  packed = packing_applies(config.model) and bool(weights.cls2)
  if packed:
    capacities = stage2_capacities(config.model.stage2_token_tiers,
                                   factory.vit_from_config(config.model).num_patches)

  def loss_fn(params, frozen, images, labels, valid, rng, inputs):
    terms, extras = apply(graphdef, rest, params, frozen, images, method.loss_terms,
                          labels=labels, valid=valid, rng=rng, loss_cfg=config.loss,
                          run_stage2=not packed, **inputs)
    total = sum(weights[k] * v for k, v in terms.items())
    return total, (terms, extras)

  def train_step(state, frozen, batch):
    step = state['step']
    rng = jax.random.fold_in(jax.random.key(config.seed), step)
    images = batch['image']
    valid = batch['valid'].astype(jnp.float32)
    inputs = methods.batch_inputs(config.model.kind, batch, 'the train batch')
    (total, (terms, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], frozen, images, batch['label'], valid, rng, inputs)
    if packed:
      def stage2_loss(params, images, patch_mask, keep_index, labels, valid, denominator):
        logits = apply(graphdef, rest, params, frozen, images,
                       lambda model, x: model.stage2(x, patch_mask, keep_index=keep_index))
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
  donates `state`; `eval_step(params, frozen, batch, rng)` is `make_eval_step`'s.
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


def jit_train_step(config: ml_collections.ConfigDict, t: Training, mesh: jax.sharding.Mesh,
                   graphdef: nnx.GraphDef) -> Callable:
  """`make_train_step` of `graphdef` jitted on `t`'s shardings, donating the state.

  `t` needs only the optimizer, schedule, rest and shardings of a `Training`; the benchmark
  passes another graphdef of the same parameter tree (a model with a forced mask).
  """
  return jax.jit(make_train_step(graphdef, t.rest, t.tx, config, t.schedule,
                                 batch_shards=mesh.size),
                 in_shardings=(t.state_sharding, t.frozen_sharding, t.batch_sharding),
                 out_shardings=(t.state_sharding, sharding.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=factory.compiler_options(config))


def build_training(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int,
                   mesh: jax.sharding.Mesh) -> Training:
  """Builds the model (DINOv2 weights if configured), optimizer, sharded state and steps."""
  batch_sharding = sharding.batch_sharding(mesh)
  model = factory.build_model(config.model, num_classes, nnx.Rngs(config.seed))
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

  eval_step = jax.jit(make_eval_step(graphdef, rest, config),
                      in_shardings=(state_sharding['params'], frozen_sharding, batch_sharding,
                                    repl), out_shardings=repl,
                      compiler_options=factory.compiler_options(config))
  t = Training(graphdef=graphdef, rest=rest, tx=tx, schedule=schedule,
               abstract_state=abstract_state, state=state, frozen=frozen,
               state_sharding=state_sharding, frozen_sharding=frozen_sharding,
               batch_sharding=batch_sharding, train_step=None, eval_step=eval_step)
  t.train_step = jit_train_step(config, t, mesh, graphdef)
  return t


# ----------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------
def announce(message: str, *args: Any) -> None:
  """Progress for people: logged, and printed on process 0 when absl INFO logs are hidden
  (`main` hides them by default; `--verbosity=0` shows every library's INFO lines)."""
  logging.info(message, *args)
  if jax.process_index() == 0 and logging.get_verbosity() < logging.INFO:
    print(message % args, flush=True)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items()}


def unselective_best(split: str, metric: str, values: Sequence[float]) -> str | None:
  """The warning when the validation metric had one value at every evaluation: params/best then
  holds the first evaluation's parameters, which nothing chose (e.g. a worst-group accuracy
  stuck at 0). None otherwise."""
  if len(values) < 2 or len(set(values)) > 1:
    return None
  return (f'validation {metric} was {values[0]:.4g} at every evaluation ({len(values)}): '
          "params/best is the first evaluation's, it selected nothing. Check that the model "
          f'learns on {split!r}, or pick another data.best_metric.')


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
  loggers.check_config(config)

  # --- Data and batch sizes (validated before any device work) -----------------------------
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size('global_batch_size', config.global_batch_size, mesh)
  if config.data.evals:
    sharding.check_batch_size('data.eval_batch_size', config.data.eval_batch_size, mesh)
  patch = factory.vit_from_config(config.model).patch_size
  data_lib.check_image_size(config.model.image_size, patch)
  train_source = factory.make_train_source(config)
  eval_sources = factory.make_eval_sources(config)
  if config.data.val_split and config.data.val_split not in eval_sources:
    raise ValueError(f'data.val_split {config.data.val_split!r} is not one of the evals '
                     f'{sorted(eval_sources)}')
  num_classes = train_source.num_classes
  for name, source in eval_sources.items():
    if source.num_classes != num_classes:
      raise ValueError(f'eval {name!r} has {source.num_classes} classes, train has {num_classes}')
  methods.check_sources(config.model.kind, {'data.train': train_source, **{
      f'data.evals.{name}': source for name, source in eval_sources.items()}})
  train_transform, eval_transform = factory.make_transforms(config)
  batch_size = config.global_batch_size
  steps_per_epoch = len(train_source) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'{train_source!r} has {len(train_source)} examples, fewer than one batch '
                     f'of {batch_size}')
  total_steps = steps_per_epoch * config.total_epochs
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  final = workdir_lib.read_params_info(workdir_path, 'final')
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
  train_step, eval_step, graphdef, rest = t.train_step, t.eval_step, t.graphdef, t.rest
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
  writer = loggers.RunLogger(workdir_path, config, start_step)

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

  best = workdir_lib.read_params_info(workdir_path, 'best')
  best_so_far = -math.inf if best is None else best['value']

  def maybe_save_best(step: int, results: Mapping[str, Mapping[str, float]]) -> None:
    """Keeps the parameters of the best validation score (never chosen on a test split)."""
    nonlocal best_so_far
    if not config.data.val_split:
      return
    value = results[config.data.val_split][config.data.best_metric]
    if value > best_so_far:
      best_so_far = value
      workdir_lib.save_params(workdir_path, 'best', eval_params(), frozen,
                  {'step': step, 'num_classes': num_classes, 'split': config.data.val_split,
                   'metric': config.data.best_metric, 'value': value,
                   'class_names': train_source.class_names})

  def run_evals(step: int, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    params = eval_params()
    results = {}
    for name, source in eval_sources.items():
      if names is not None and name not in names:
        continue
      results[name] = Classification(source, eval_transform, config, batch_sharding).run(
          eval_step, params, frozen)
      writer.write(step, name, results[name])
      announce('eval %s @ step %d: %s', name, step, ', '.join(
          f'{k} {v:.4g}' for k, v in results[name].items() if isinstance(v, (int, float))))
    return results

  pictures = loggers.TrainPictures(config, eval_sources, graphdef, rest, mesh)

  # --- Train loop -----------------------------------------------------------------------------
  # Metrics are fetched only on steps that log, evaluate or checkpoint (fetching every step
  # would stall the device queue); each of those first checks that the state is finite, so a
  # diverged state is never logged as good, evaluated or saved. Evals precede the checkpoint,
  # so a checkpoint at step s implies the evals of step s are in metrics.jsonl.
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
  step_inputs = ('image', 'label', 'valid', 'first_pass',
                 *methods.get(config.model.kind).batch_inputs)
  last_log_time, last_log_step = time.perf_counter(), start_step
  metrics = None
  results: dict[str, Any] = {}
  with jax.set_mesh(mesh):
    for step in range(start_step, total_steps):
      batch = next(train_iter)
      state, metrics = train_step(state, frozen, data_lib.global_batch(
          {k: batch[k] for k in step_inputs}, batch_sharding))
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
                f'lr {scalars["lr"]:.3g} | {rate:.1f} img/s | ETA {progress_lib.hms(eta)}',
                flush=True)
        last_log_time, last_log_step = now, done
      if evals:
        eval_start = time.perf_counter()
        results = run_evals(done)
        pictures.log(writer, done, eval_params(), frozen)
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
    recorded = workdir_lib.read_step_metrics(workdir_path, total_steps)
    train_scalars = {k: v for k, v in recorded.get('train', {}).items() if k not in LOG_ONLY}
    results = {name: recorded[name] for name in eval_sources if name in recorded}
    results.update(run_evals(total_steps, [n for n in eval_sources if n not in results]))
  else:
    train_scalars = _scalars(jax.device_get(metrics))
  summary = {'step': total_steps, 'evals': results, 'train': train_scalars}
  writer.close()
  workdir_lib.save_params(workdir_path, 'final', eval_params(), frozen, {
      'num_classes': num_classes, 'class_names': train_source.class_names, **summary})
  if config.data.val_split:
    values = [m[config.data.best_metric] for m in workdir_lib.read_metrics(workdir_path)
              if m['split'] == config.data.val_split and config.data.best_metric in m]
    if warning := unselective_best(config.data.val_split, config.data.best_metric, values):
      logging.warning('%s', warning)
      summary['unselective_best'] = warning
      best = workdir_lib.read_params_info(workdir_path, 'best')
      if jax.process_index() == 0 and best is not None:  # params/best.json says so too
        workdir_lib.replace_text(workdir_path / 'params' / 'best.json', json.dumps(
            {**best, 'selected_nothing': True, 'warning': warning}, indent=2) + '\n')
  return summary
