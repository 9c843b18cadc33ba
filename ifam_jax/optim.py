"""Parameter groups, frozen parameters, AdamW, the LR schedule and EMA (reference section 6).

Parameters are assigned to groups by `(regex, group)` rules over their '/'-joined path, e.g.
'stage2/backbone/blocks/0/attn/qkv/kernel'. The first rule whose regex matches the whole path
wins; a parameter that no rule matches is an error, so a new layer cannot silently train with the
wrong learning rate. Each group is `dict(lr_factor=float, weight_decay=bool, frozen=bool)`:

  lr_factor     multiplies the base lr (the reference's `--*_lr_factor` flags).
  weight_decay  decays the group's tensors with ndim >= 2; vectors (biases, norm scales, LayerScale
                gammas) never decay. This per-leaf rule reproduces every `*_wd` / `*_no_wd` pair of
                the reference's table 6.2, which splits on `p.ndim == 1`.
  frozen        no gradient, no optimizer state, no EMA: `split_frozen` keeps these parameters out
                of the state the train step differentiates and the optimizer sees.

The optimizer is torch's AdamW per trainable group (`optax.partition`) behind one global-norm
clip of all trainable gradients, stepped every `accumulation_steps` micro-batches on the mean
gradient (`optax.MultiSteps`). Schedules are functions of the train-loop iteration (micro-batch
index), the unit the reference counts epochs and weight-decay normalisation in.

Wiring (see `split_frozen` and `build_optimizer`):

  graphdef, trainable, frozen, rest = split_frozen(model, config.group_rules, config.groups)
  tx = build_optimizer(config, label_params(trainable, config.group_rules), steps, epochs)
  opt_state = tx.init(trainable)
  # in the jitted step:
  grads = jax.grad(lambda t: loss(nnx.merge(graphdef, t, frozen, rest), batch))(trainable)
  updates, opt_state = tx.update(grads, opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ifam_jax.sharding import map_named, path_name

Rule = tuple[str, str]
Groups = Mapping[str, Mapping[str, Any]]

_TOKENS = '(cls_token|reg_token|pos_embed)'

# The reference's `layer_group_matcher_pdisco_2_stage`, in its priority order. The regexes are
# disjoint, so the order only documents the reference.
IFAM_GROUP_RULES: list[Rule] = [
    (r'stage1/part_classifier/.*', 'part_classifier'),  # fc_class_landmarks
    (r'stage2/(head|fc_norm)/.*', 'head'),
    (r'stage1/modulation/.*', 'modulation'),
    (r'stage1/prototypes', 'prototypes'),  # fc_landmarks
    (rf'stage1/backbone/{_TOKENS}', 'stage1_tokens'),
    (rf'stage2/backbone/{_TOKENS}', 'stage2_tokens'),
    (r'stage2/backbone/.*', 'stage2_backbone'),
    (r'stage1/backbone/.*', 'stage1_backbone'),
]

# `layer_group_matcher_baseline`, onto iFAM's stage-2 groups: the ERM ViT trains as iFAM's
# stage 2 does, so one set of groups (and one list of command-line overrides) serves both
# models. Only head and fc_norm are "scratch" there; the tokens are ordinary backbone parameters
# and, being 3-D, they decay (iFAM's stage-2 tokens, in 'stage2_tokens', do not).
BASELINE_GROUP_RULES: list[Rule] = [
    (r'(head|fc_norm)/.*', 'head'),
    (r'backbone/.*', 'stage2_backbone'),
]


def _group(lr_factor: float, weight_decay: bool, frozen: bool = False) -> dict[str, Any]:
  return dict(lr_factor=float(lr_factor), weight_decay=weight_decay, frozen=frozen)


def ifam_groups(*, freeze_backbone: bool = True, freeze_params_stage_1: bool = False,
                freeze_second_stage: bool = False, freeze_params_stage_2: bool = False,
                stage_two_lr_factor: float = 1.0, finer_lr_factor: float = 1e3,
                modulation_lr_factor: float = 1e4,
                scratch_lr_factor: float = 1e4) -> dict[str, dict[str, Any]]:
  """Groups for `IFAM_GROUP_RULES` (and `BASELINE_GROUP_RULES`); arguments are the reference's
  flags, defaults the paper's.

  `freeze_backbone=False` trains the stage-1 backbone (e.g. from scratch in the demo), with the
  reference's lr x1 and decay on its matrices.
  """
  return {
      'part_classifier': _group(scratch_lr_factor, True),
      'head': _group(scratch_lr_factor, True),  # head kernel decays, fc_norm vectors do not
      'modulation': _group(modulation_lr_factor, False),
      'prototypes': _group(finer_lr_factor, False),
      'stage1_tokens': _group(1.0, False, freeze_params_stage_1),
      'stage2_tokens': _group(stage_two_lr_factor, False, freeze_params_stage_2),
      'stage2_backbone': _group(stage_two_lr_factor, True, freeze_second_stage),
      'stage1_backbone': _group(1.0, True, freeze_backbone),
  }


IFAM_GROUPS = ifam_groups()


def default_config() -> ml_collections.ConfigDict:
  """The optimisation settings with the paper's values (CUB recipe, global batch 128).

  Everything here is read by this module except `ema_decay`, which the train loop passes to
  `ema_update`.
  """
  return ml_collections.ConfigDict(dict(
      lr=1e-6 * math.sqrt(128 / 16),  # base lr; groups scale it by lr_factor
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.05,
      normalized_weight_decay=True,  # False: use weight_decay as is
      grad_clip=2.0,  # global L2 norm over all trainable gradients; 0 disables
      accumulation_steps=1,
      lr_schedule_unit='epoch',  # 'epoch' (the reference) or 'step'
      warmup_epochs=0.0,
      warmup_lr=0.0,  # timm's warmup_lr_init
      min_lr=0.0,
      ema_decay=0.0,  # 0 = no EMA; the ImageNet recipe uses 0.9999
      group_rules=list(IFAM_GROUP_RULES),
      groups=ifam_groups(),
  ))


# ----------------------------------------------------------------------------
# Parameter groups and frozen parameters
# ----------------------------------------------------------------------------
def _matcher(rules: Sequence[Rule], groups: Groups | None = None) -> Callable[[str], str]:
  if groups is not None:
    unknown = sorted({g for _, g in rules} - set(groups))
    if unknown:
      raise ValueError(f'group rules name groups {unknown} that are not configured')
  compiled = [(re.compile(pattern), group) for pattern, group in rules]

  def group_of(name: str) -> str:
    for pattern, group in compiled:
      if pattern.fullmatch(name):
        return group
    raise ValueError(f'parameter {name!r} matches no group rule {[p for p, _ in rules]}')

  return group_of


def label_params(state: Any, rules: Sequence[Rule]) -> Any:
  """The group name of every parameter, in a tree of the same structure as `state`.

  `state` is an `nnx.State` (its Variables then hold the names) or a nested dict of arrays.
  """
  group_of = _matcher(rules)
  return map_named(lambda name, _: group_of(name), state)


def _decays(x: Any) -> bool:
  return len(x.shape) >= 2


def weight_decay_mask(state: Any, rules: Sequence[Rule], groups: Groups) -> Any:
  """True where AdamW decays the parameter: its group has weight_decay and its ndim >= 2."""
  labels = label_params(state, rules)
  return jax.tree.map(lambda label, x: bool(groups[label]['weight_decay']) and _decays(x),
                      labels, state)


def _param_filter(rules: Sequence[Rule], groups: Groups, frozen: bool):
  group_of = _matcher(rules, groups)

  def matches(path: tuple[Any, ...], value: Any) -> bool:
    return (isinstance(value, nnx.Param)
            and bool(groups[group_of(path_name(path))]['frozen']) == frozen)

  return matches


def trainable_filter(rules: Sequence[Rule],
                     groups: Groups) -> Callable[[tuple[Any, ...], Any], bool]:
  """NNX filter: parameters of groups that train."""
  return _param_filter(rules, groups, frozen=False)


def frozen_filter(rules: Sequence[Rule], groups: Groups) -> Callable[[tuple[Any, ...], Any], bool]:
  """NNX filter: parameters of frozen groups."""
  return _param_filter(rules, groups, frozen=True)


def split_frozen(model: nnx.Module, rules: Sequence[Rule],
                 groups: Groups) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
  """(graphdef, trainable, frozen, rest): differentiate and optimise `trainable` only.

  Frozen parameters then cost neither gradient computation nor Adam moments; `rest` holds any
  non-parameter variables. `nnx.merge(graphdef, trainable, frozen, rest)` rebuilds the model.
  """
  return nnx.split(model, trainable_filter(rules, groups), frozen_filter(rules, groups), ...)


# ----------------------------------------------------------------------------
# Weight decay and learning-rate schedule
# ----------------------------------------------------------------------------
def effective_weight_decay(config: Mapping[str, Any], steps_per_epoch: int,
                           total_epochs: int) -> float:
  """wd * sqrt(1 / (steps_per_epoch * epochs)) (reference 6.3), or wd if not normalised.

  `steps_per_epoch` counts train-loop iterations (micro-batches), as the reference counts
  iterations, so gradient accumulation does not change the decay.
  """
  wd = float(config['weight_decay'])
  if config['normalized_weight_decay']:
    wd *= math.sqrt(1.0 / (steps_per_epoch * total_epochs))
  return wd


def lr_schedule(config: Mapping[str, Any], steps_per_epoch: int, total_epochs: int,
                peak_lr: float | None = None) -> Callable[[jax.Array | int], jax.Array]:
  """Learning rate at a train-loop iteration (0-based), as timm's CosineLRScheduler.

  Unit 'epoch' (the reference, `t_in_epochs=True`): t = step // steps_per_epoch over T =
  total_epochs, so the rate is constant within an epoch and 0-based epoch e gets
  min_lr + (peak - min_lr) * (1 + cos(pi e / T)) / 2, the reference's 1-based cos(pi (e-1) / T).
  Unit 'step': t = step over T = steps_per_epoch * total_epochs.
  Warmup (warmup_epochs, in steps for unit 'step'): for t < W the rate is warmup_lr + (peak -
  warmup_lr) * t / W; after it the cosine resumes at t, not t - W (timm's warmup_prefix=False).
  `peak_lr` defaults to the base lr; a group's peak is base lr * lr_factor.
  """
  peak = float(config['lr'] if peak_lr is None else peak_lr)
  min_lr, warmup_lr = float(config['min_lr']), float(config['warmup_lr'])
  unit = config['lr_schedule_unit']
  if unit == 'epoch':
    per_t, horizon, warmup = steps_per_epoch, total_epochs, float(config['warmup_epochs'])
  elif unit == 'step':
    per_t, horizon = 1, steps_per_epoch * total_epochs
    warmup = float(config['warmup_epochs']) * steps_per_epoch
  else:
    raise ValueError(f"lr_schedule_unit must be 'epoch' or 'step', got {unit!r}")

  def schedule(step: jax.Array | int) -> jax.Array:
    t = (jnp.asarray(step) // per_t).astype(jnp.float32)
    cosine = min_lr + 0.5 * (peak - min_lr) * (1 + jnp.cos(jnp.pi * jnp.minimum(t, horizon)
                                                           / horizon))
    if warmup > 0:
      return jnp.where(t < warmup, warmup_lr + (peak - warmup_lr) * t / warmup, cosine)
    return cosine

  return schedule


def group_learning_rates(config: Mapping[str, Any], steps_per_epoch: int, total_epochs: int,
                         step: jax.Array | int) -> dict[str, jax.Array]:
  """Learning rate of every trainable group at a train-loop iteration (for logs and tests)."""
  return {name: lr_schedule(config, steps_per_epoch, total_epochs,
                            config['lr'] * group['lr_factor'])(step)
          for name, group in config['groups'].items() if not group['frozen']}


# ----------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------
def _matrices(params: Any) -> Any:
  return jax.tree.map(_decays, params)


def build_optimizer(config: Mapping[str, Any], trainable_labels: Any, steps_per_epoch: int,
                    total_epochs: int) -> optax.GradientTransformation:
  """clip_by_global_norm -> per-group AdamW, wrapped in MultiSteps when accumulating.

  Args:
    config: see `default_config`; reads lr, b1, b2, eps, weight_decay, normalized_weight_decay,
      grad_clip, accumulation_steps, lr_schedule_unit, warmup_epochs, warmup_lr, min_lr, groups.
    trainable_labels: `label_params` of the trainable state only; a frozen group here is an
      error, because it would allocate Adam moments for parameters that never move.
    steps_per_epoch: train-loop iterations (micro-batches) per epoch.
    total_epochs: the schedule's horizon.

  Per group: torch AdamW, p <- p - lr_g (m_hat / (sqrt(v_hat) + eps) + wd p), with wd only on
  the decaying leaves of `weight_decay` groups and lr_g = schedule * lr_factor. With
  accumulation k the returned updates are zero for k - 1 micro-steps, then the step on the mean
  gradient; its rate is the schedule at its last micro-batch, iteration (n + 1) k - 1 for update
  n. An epoch whose length is not a multiple of k carries the partial mean into the next epoch
  (the reference instead steps on the partial sum at the epoch's last batch). `update` needs
  the params (for weight decay): `tx.update(grads, opt_state, trainable)`.
  """
  groups = config['groups']
  used = set(jax.tree.leaves(trainable_labels))
  unknown = sorted(used - set(groups))
  if unknown:
    raise ValueError(f'parameters are labelled with unconfigured groups {unknown}')
  frozen = sorted(name for name in used if groups[name]['frozen'])
  if frozen:
    raise ValueError(f'groups {frozen} are frozen; build the optimizer over the trainable '
                     'state only (see split_frozen)')
  k = int(config['accumulation_steps'])
  if k < 1:
    raise ValueError(f'accumulation_steps must be >= 1, got {k}')
  wd = effective_weight_decay(config, steps_per_epoch, total_epochs)

  def group_tx(name: str) -> optax.GradientTransformation:
    group = groups[name]
    schedule = lr_schedule(config, steps_per_epoch, total_epochs,
                           config['lr'] * group['lr_factor'])
    parts = [optax.scale_by_adam(b1=config['b1'], b2=config['b2'], eps=config['eps'])]
    if group['weight_decay'] and wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=_matrices))
    parts.append(optax.scale_by_learning_rate(lambda n: schedule((n + 1) * k - 1)))
    return optax.chain(*parts)

  tx = optax.partition({name: group_tx(name) for name in sorted(used)}, trainable_labels)
  if config['grad_clip']:
    tx = optax.chain(optax.clip_by_global_norm(config['grad_clip']), tx)
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
  return tx


# ----------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------
def ema_decay(count: jax.Array | int, decay: float) -> jax.Array:
  """timm ModelEmaV3 with warmup: 0 at update 1, then min(decay, 1 - n^(-2/3))."""
  n = jnp.asarray(count, jnp.float32)
  return jnp.where(n <= 1, 0.0, jnp.minimum(decay, 1.0 - n**(-2.0 / 3.0)))


def ema_update(ema: Any, params: Any, count: jax.Array | int, decay: float) -> Any:
  """ema <- lerp(ema, params, 1 - ema_decay(count)), after optimizer update `count` (from 1).

  Covers the trainable state only: frozen parameters never change, so their average is
  themselves. The first update copies the params exactly (torch's lerp at weight 1). With
  accumulation k, call it only on micro-steps where (step + 1) % k == 0, with count =
  (step + 1) // k.
  """
  w = 1.0 - ema_decay(count, decay)

  def lerp(e, p):
    weight = w.astype(e.dtype)
    return jnp.where(weight < 0.5, e + weight * (p - e), p - (p - e) * (1 - weight))

  return jax.tree.map(lerp, ema, params)
