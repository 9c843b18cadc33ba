"""Optimizer: parameter groups, frozen parameters, per-group AdamW, schedules, clipping,
accumulation and EMA, each against hand computations of reference section 6."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ifam_jax import optim, sharding
from ifam_jax.models import ifam, vit

EPS = 1e-8
# optax computes Adam's bias corrections in float32 (1 - b2^t with b2 rounded to float32), so
# its steps differ from exact arithmetic by ~1e-5 relative.
ADAM_RTOL = 5e-5


def tiny_vit():
  return vit.vit_config('S/14', width=16, depth=1, num_heads=2, mlp_hidden=32, image_size=28)


def tiny_ifam():
  return ifam.IFAM(num_classes=3, num_parts=2, stage1=tiny_vit(), stage2=tiny_vit(),
                   rngs=nnx.Rngs(0))


def flat(tree):
  """{'/'-joined path: leaf} of a State (Variables unwrapped) or a nested dict."""
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {sharding.path_name(path): jax.tree.leaves(leaf)[0] for path, leaf in leaves}


def adam_states(opt_state):
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]


def paper_config(**overrides):
  cfg = optim.default_config()
  cfg.lr = 1e-3
  for key, value in overrides.items():  # replaces (ConfigDict.update would merge the groups)
    cfg[key] = value
  return cfg


def toy_config(**overrides):
  """One param group, no clipping, no decay: the optimizer is plain Adam under the schedule."""
  cfg = paper_config(lr=1.0, grad_clip=0.0, weight_decay=0.0,
                     group_rules=[('.*', 'all')],
                     groups=dict(all=dict(lr_factor=1.0, weight_decay=False, frozen=False)))
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


# ----------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------
# (group, decays) per parameter, from reference table 6.2 with the paper flags.
EXPECTED_IFAM = {
    'stage1/backbone/patch_embed/kernel': ('stage1_backbone', True),
    'stage1/backbone/patch_embed/bias': ('stage1_backbone', False),
    'stage1/backbone/blocks/0/attn/qkv/kernel': ('stage1_backbone', True),
    'stage1/backbone/blocks/0/ls1/gamma': ('stage1_backbone', False),
    'stage1/backbone/norm/scale': ('stage1_backbone', False),
    'stage1/backbone/cls_token': ('stage1_tokens', False),
    'stage1/backbone/reg_token': ('stage1_tokens', False),
    'stage1/backbone/pos_embed': ('stage1_tokens', False),
    'stage1/prototypes': ('prototypes', False),
    'stage1/modulation/scale': ('modulation', False),
    'stage1/modulation/bias': ('modulation', False),
    'stage1/part_classifier/kernel': ('part_classifier', True),
    'stage2/backbone/patch_embed/kernel': ('stage2_backbone', True),
    'stage2/backbone/patch_embed/bias': ('stage2_backbone', False),
    'stage2/backbone/blocks/0/attn/qkv/kernel': ('stage2_backbone', True),
    'stage2/backbone/blocks/0/attn/qkv/bias': ('stage2_backbone', False),
    'stage2/backbone/blocks/0/mlp/fc2/kernel': ('stage2_backbone', True),
    'stage2/backbone/blocks/0/ls1/gamma': ('stage2_backbone', False),
    'stage2/backbone/blocks/0/ls2/gamma': ('stage2_backbone', False),
    'stage2/backbone/blocks/0/norm1/scale': ('stage2_backbone', False),
    'stage2/backbone/norm/bias': ('stage2_backbone', False),
    'stage2/backbone/cls_token': ('stage2_tokens', False),
    'stage2/backbone/reg_token': ('stage2_tokens', False),
    'stage2/backbone/pos_embed': ('stage2_tokens', False),
    'stage2/fc_norm/scale': ('head', False),
    'stage2/fc_norm/bias': ('head', False),
    'stage2/head/kernel': ('head', True),
}

# Absolute lr at base 1e-6 (paper App. A): tokens and ViTs 1e-6, prototypes 1e-3, rest 1e-2.
PAPER_LR = {'stage1_tokens': 1e-6, 'stage2_tokens': 1e-6, 'stage2_backbone': 1e-6,
            'prototypes': 1e-3, 'modulation': 1e-2, 'part_classifier': 1e-2, 'head': 1e-2}


def test_every_ifam_parameter_gets_its_reference_group():
  state = nnx.state(tiny_ifam())
  labels = flat(optim.label_params(state, optim.IFAM_GROUP_RULES))
  decays = flat(optim.weight_decay_mask(state, optim.IFAM_GROUP_RULES, optim.IFAM_GROUPS))
  assert labels.keys() == flat(state).keys()
  for name, (group, decay) in EXPECTED_IFAM.items():
    assert (labels[name], decays[name]) == (group, decay), name
  assert set(labels.values()) == set(optim.IFAM_GROUPS)
  for name, group in labels.items():  # the rest by prefix
    if name.startswith('stage2/backbone/blocks/'):
      assert group == 'stage2_backbone'
    if name.startswith('stage1/backbone/blocks/'):
      assert group == 'stage1_backbone'

  cfg = optim.default_config()
  cfg.lr = 1e-6
  rates = optim.group_learning_rates(cfg, 10, 90, 0)
  assert rates.keys() == PAPER_LR.keys()  # the stage-1 backbone is frozen: no lr
  for group, lr in PAPER_LR.items():
    np.testing.assert_allclose(rates[group], lr, rtol=1e-6)


def test_baseline_groups_and_plain_dict_state():
  """The baseline's ViT in iFAM's stage-2 groups, its tokens with the backbone (and decayed)."""
  model = vit.ViTClassifier(tiny_vit(), num_classes=3, rngs=nnx.Rngs(0))
  state = nnx.to_pure_dict(nnx.state(model))
  labels = flat(optim.label_params(state, optim.BASELINE_GROUP_RULES))
  decays = flat(optim.weight_decay_mask(state, optim.BASELINE_GROUP_RULES, optim.IFAM_GROUPS))
  expected = {'backbone/cls_token': ('stage2_backbone', True),  # 3-D: the baseline decays it
              'backbone/patch_embed/kernel': ('stage2_backbone', True),
              'backbone/blocks/0/attn/proj/bias': ('stage2_backbone', False),
              'head/kernel': ('head', True),
              'fc_norm/scale': ('head', False)}
  for name, (group, decay) in expected.items():
    assert (labels[name], decays[name]) == (group, decay), name
  assert set(labels.values()) == {'stage2_backbone', 'head'}
  _, trainable, frozen, _ = optim.split_frozen(model, optim.BASELINE_GROUP_RULES,
                                               optim.IFAM_GROUPS)
  assert not flat(frozen) and flat(trainable).keys() == labels.keys()


def test_unmatched_parameter_and_unknown_group_are_errors():
  state = nnx.state(tiny_ifam())
  with pytest.raises(ValueError, match='stage1/backbone/.*matches no group rule'):
    optim.label_params(state, optim.IFAM_GROUP_RULES[:-1])
  with pytest.raises(ValueError, match='not configured'):
    optim.frozen_filter(optim.IFAM_GROUP_RULES + [('x', 'nope')], optim.IFAM_GROUPS)


def frozen_names(groups):
  _, trainable, frozen, rest = optim.split_frozen(tiny_ifam(), optim.IFAM_GROUP_RULES, groups)
  assert not flat(rest)
  assert not flat(trainable).keys() & flat(frozen).keys()
  return set(flat(frozen))


def test_freeze_switches():
  names = set(flat(nnx.state(tiny_ifam())))
  stage1_tokens = {f'stage1/backbone/{t}' for t in ('cls_token', 'reg_token', 'pos_embed')}
  stage2_tokens = {f'stage2/backbone/{t}' for t in ('cls_token', 'reg_token', 'pos_embed')}
  stage1_backbone = {n for n in names if n.startswith('stage1/backbone/')} - stage1_tokens
  stage2_backbone = {n for n in names if n.startswith('stage2/backbone/')} - stage2_tokens

  assert frozen_names(optim.IFAM_GROUPS) == stage1_backbone  # --freeze_backbone
  assert frozen_names(optim.ifam_groups(freeze_params_stage_1=True)) == (
      stage1_backbone | stage1_tokens)
  assert frozen_names(optim.ifam_groups(freeze_second_stage=True)) == (
      stage1_backbone | stage2_backbone)
  assert frozen_names(optim.ifam_groups(freeze_second_stage=True, freeze_params_stage_2=True)) == (
      stage1_backbone | stage2_backbone | stage2_tokens)
  assert frozen_names(optim.ifam_groups(freeze_backbone=False)) == set()  # the demo


# ----------------------------------------------------------------------------
# One optimizer step against hand computations
# ----------------------------------------------------------------------------
STEPS, EPOCHS = 5994 // 128, 90  # CUB at global batch 128


def paper_optimizer(cfg, trainable):
  labels = optim.label_params(trainable, cfg.group_rules)
  return optim.build_optimizer(cfg, labels, STEPS, EPOCHS), flat(labels)


def test_normalised_weight_decay():
  cfg = paper_config()
  wd = optim.effective_weight_decay(cfg, STEPS, EPOCHS)
  assert STEPS * EPOCHS == 4140
  assert wd == pytest.approx(0.05 * math.sqrt(1 / 4140), rel=1e-12)
  assert wd == pytest.approx(7.77e-4, abs=1e-6)
  cfg.normalized_weight_decay = False
  assert optim.effective_weight_decay(cfg, STEPS, EPOCHS) == 0.05


def test_first_step_moves_each_group_by_its_lr_and_decay():
  """Adam's first step is lr_g * g / (|g| + eps) elementwise, plus lr_g * wd * p if it decays."""
  cfg = paper_config()
  _, trainable, _, _ = optim.split_frozen(tiny_ifam(), cfg.group_rules, cfg.groups)
  tx, labels = paper_optimizer(cfg, trainable)
  first_update = jax.jit(lambda grads: tx.update(grads, tx.init(trainable), trainable)[0])
  params = flat(trainable)
  lrs = {name: 1e-3 * cfg.groups[labels[name]].lr_factor for name in params}
  decays = flat(optim.weight_decay_mask(trainable, cfg.group_rules, cfg.groups))
  assert any(decays.values()) and not all(decays.values())
  wd = 0.05 / math.sqrt(4140)

  # A zero gradient leaves the decay alone, with the normalised value.
  updates = flat(first_update(jax.tree.map(jnp.zeros_like, trainable)))
  for name, p in params.items():
    np.testing.assert_allclose(updates[name], -lrs[name] * wd * decays[name] * np.asarray(p),
                               rtol=1e-6, err_msg=name)

  # Gradient ones, clipped to global norm 2 over all trainable parameters.
  updates = flat(first_update(jax.tree.map(jnp.ones_like, trainable)))
  clipped = 2.0 / math.sqrt(sum(p.size for p in params.values()))
  for name, p in params.items():
    expected = -lrs[name] * (clipped / (clipped + EPS) + wd * decays[name] * np.asarray(p))
    np.testing.assert_allclose(updates[name], expected, rtol=ADAM_RTOL, err_msg=name)


def test_no_state_for_frozen_params_and_they_never_move():
  cfg = paper_config()
  model = tiny_ifam()
  before = flat(nnx.state(model))
  graphdef, trainable, frozen, rest = optim.split_frozen(model, cfg.group_rules, cfg.groups)
  with pytest.raises(ValueError, match='frozen'):  # labels of the whole model
    optim.build_optimizer(cfg, optim.label_params(nnx.state(model), cfg.group_rules), 10, 2)
  tx, _ = paper_optimizer(cfg, trainable)
  opt_state = tx.init(trainable)

  # Each trainable parameter has exactly one mu and one nu, frozen ones none.
  trainable_sizes = sorted(p.size for p in flat(trainable).values())
  for field in ('mu', 'nu'):
    moments = [m for s in adam_states(opt_state) for m in jax.tree.leaves(getattr(s, field))]
    assert sorted(m.size for m in moments) == trainable_sizes
  state_size = sum(x.size for x in jax.tree.leaves(opt_state))
  assert state_size - 2 * sum(trainable_sizes) < 50  # only step counters beyond the moments

  images = jax.random.normal(jax.random.key(0), (2, 28, 28, 3))

  @jax.jit
  def train_step(trainable, frozen, opt_state, rng):
    def loss_fn(t):
      out = nnx.merge(graphdef, t, frozen, rest)(images, train=True, rng=rng)
      return jnp.mean(out.logits**2) + jnp.mean(out.stage1_logits**2)

    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  for i in range(2):
    trainable, opt_state = train_step(trainable, frozen, opt_state, jax.random.key(i))
  after = flat(nnx.state(nnx.merge(graphdef, trainable, frozen, rest)))
  for name in flat(frozen):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name in ('stage1/backbone/cls_token', 'stage1/prototypes', 'stage2/head/kernel',
               'stage2/backbone/blocks/0/attn/qkv/kernel'):
    assert not np.allclose(after[name], before[name]), name


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------
def run_constant_gradient(cfg, steps_per_epoch, epochs, micro_steps):
  """Per-micro-step parameter change under gradient 1: Adam then moves by exactly lr."""
  params = {'w': jnp.zeros(())}
  tx = optim.build_optimizer(cfg, {'w': 'all'}, steps_per_epoch, epochs)
  state = tx.init(params)
  update = jax.jit(tx.update)
  deltas = []
  for _ in range(micro_steps):
    updates, state = update({'w': jnp.ones(())}, state, params)
    deltas.append(-float(updates['w']))
  return np.asarray(deltas)


def test_epoch_schedule_is_constant_within_an_epoch():
  cfg = toy_config()
  schedule = optim.lr_schedule(cfg, 3, 4)
  per_epoch = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]  # 1-based: cos(pi(e-1)/T)
  expected = np.repeat(per_epoch, 3)
  np.testing.assert_allclose([schedule(s) for s in range(12)], expected, rtol=1e-6)
  np.testing.assert_allclose(per_epoch, [1.0, 0.8535534, 0.5, 0.1464466], rtol=1e-6)
  # The optimizer applies it: one update per step.
  np.testing.assert_allclose(run_constant_gradient(cfg, 3, 4, 12), expected, rtol=ADAM_RTOL)

  cfg.min_lr = 0.1
  np.testing.assert_allclose(optim.lr_schedule(cfg, 3, 4)(6), 0.1 + 0.9 * 0.5, rtol=1e-6)


def test_step_schedule_and_warmup():
  cfg = toy_config(lr_schedule_unit='step')
  schedule = optim.lr_schedule(cfg, 4, 2)
  np.testing.assert_allclose([schedule(s) for s in range(8)],
                             [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)],
                             rtol=1e-6, atol=1e-7)

  # timm warmup: linear from warmup_lr at t = 0, then the cosine at t (not t - warmup).
  cfg = toy_config(warmup_epochs=2.0)
  schedule = optim.lr_schedule(cfg, 3, 10)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 3, 5, 6)],
                             [0.0, 0.0, 0.5, 0.5, 0.5 * (1 + math.cos(math.pi * 2 / 10))],
                             rtol=1e-6)
  cfg = toy_config(lr_schedule_unit='step', warmup_epochs=1.0, warmup_lr=0.2)
  schedule = optim.lr_schedule(cfg, 4, 2)
  np.testing.assert_allclose([schedule(s) for s in range(5)],
                             [0.2, 0.4, 0.6, 0.8, 0.5 * (1 + math.cos(math.pi * 4 / 8))],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='lr_schedule_unit'):
    optim.lr_schedule(toy_config(lr_schedule_unit='iteration'), 4, 2)


# ----------------------------------------------------------------------------
# Clipping, accumulation
# ----------------------------------------------------------------------------
def two_group_config(**overrides):
  return paper_config(group_rules=[('a', 'fast'), ('b', 'slow')],
                      groups=dict(fast=dict(lr_factor=10.0, weight_decay=True, frozen=False),
                                  slow=dict(lr_factor=1.0, weight_decay=False, frozen=False)),
                      **overrides)


TWO_GROUPS = {'a': 'fast', 'b': 'slow'}


def clipped_gradient_norm(grads):
  """The gradient Adam saw on its first step, mu_1 / (1 - b1), across all groups."""
  params = {'a': jnp.ones((3,)), 'b': jnp.ones((2, 2))}
  tx = optim.build_optimizer(two_group_config(), TWO_GROUPS, 10, 2)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  seen = [m / 0.1 for s in adam_states(state) for m in jax.tree.leaves(s.mu)]
  return float(optax.tree.norm(seen)), seen


def test_global_norm_clipping_before_the_groups():
  big = {'a': jnp.full((3,), 3.0), 'b': jnp.full((2, 2), -4.0)}  # norm sqrt(27 + 64) > 2
  norm, seen = clipped_gradient_norm(big)
  assert norm == pytest.approx(2.0, rel=1e-6)
  scale = 2.0 / math.sqrt(91.0)  # one factor for both groups
  np.testing.assert_allclose(sorted(float(x.ravel()[0]) for x in seen),
                             [-4.0 * scale, 3.0 * scale], rtol=1e-6)
  small = {'a': jnp.full((3,), 0.3), 'b': jnp.full((2, 2), -0.4)}  # norm < 2: untouched
  assert clipped_gradient_norm(small)[0] == pytest.approx(math.sqrt(0.27 + 0.64), rel=1e-6)


def test_accumulation_equals_one_step_on_the_mean_gradient():
  """k=2 with clipping and decay: zero updates, then the k=1 step on the mean of the two."""
  cfg = two_group_config(normalized_weight_decay=False)  # the same decay for both
  single = optim.build_optimizer(cfg, TWO_GROUPS, 10, 2)
  cfg.accumulation_steps = 2
  accum = optim.build_optimizer(cfg, TWO_GROUPS, 20, 2)  # the same schedule in updates

  def stepper(tx):
    @jax.jit
    def step(grads, state, params):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, updates
    return step

  step_single, step_accum = stepper(single), stepper(accum)
  params = {'a': jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), 'b': jnp.linspace(0.5, 1.0, 5)}
  p_single, s_single = params, single.init(params)
  p_accum, s_accum = params, accum.init(params)
  keys = jax.random.split(jax.random.key(0), 6)
  for i in range(3):  # the second and third updates check that Adam's moments carried over
    a, b = ({name: jax.random.normal(jax.random.fold_in(keys[2 * i + j], n), x.shape)
             for n, (name, x) in enumerate(params.items())} for j in range(2))
    p_accum, s_accum, updates = step_accum(a, s_accum, p_accum)
    assert all(not np.any(u) for u in jax.tree.leaves(updates))
    p_accum, s_accum, _ = step_accum(b, s_accum, p_accum)
    mean = jax.tree.map(lambda x, y: (x + y) / 2, a, b)
    p_single, s_single, _ = step_single(mean, s_single, p_single)
    for name in params:
      np.testing.assert_allclose(p_accum[name], p_single[name], rtol=1e-5, atol=1e-6)


def test_accumulation_follows_the_schedule_per_update():
  """k=2, 4 micro-batches per epoch: updates 0-1 in epoch 0, 2-3 in epoch 1, 4-5 in epoch 2."""
  cfg = toy_config(accumulation_steps=2)
  deltas = run_constant_gradient(cfg, 4, 3, 12)
  per_epoch = [0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
  np.testing.assert_allclose(deltas[0::2], 0.0)
  np.testing.assert_allclose(deltas[1::2], np.repeat(per_epoch, 2), rtol=ADAM_RTOL)


# ----------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------
def test_ema_warmup_first_three_updates():
  decay = 0.9999
  params = [1.0, 2.0, 4.0]
  ema = jnp.asarray(0.0)
  values = []
  update = jax.jit(optim.ema_update, static_argnums=3)
  for n, p in enumerate(params, start=1):
    ema = update(ema, jnp.asarray(p), n, decay)
    values.append(float(ema))
  e1 = 1.0  # decay 0: a copy
  e2 = e1 + 2**(-2 / 3) * (2.0 - e1)  # decay 1 - 2^(-2/3) = 0.370
  e3 = e2 + 3**(-2 / 3) * (4.0 - e2)  # decay 1 - 3^(-2/3) = 0.519
  np.testing.assert_allclose(values, [e1, e2, e3], rtol=1e-6)
  np.testing.assert_allclose(values, [1.0, 1.6299605, 2.7693567], rtol=1e-6)
  assert float(optim.ema_decay(2, decay)) == pytest.approx(0.3700395, rel=1e-6)
  assert float(optim.ema_decay(10**8, decay)) == pytest.approx(decay, rel=1e-7)

  tree = {'w': jax.random.normal(jax.random.key(0), (5, 3))}
  copied = optim.ema_update({'w': jnp.zeros((5, 3))}, tree, 1, decay)
  np.testing.assert_array_equal(copied['w'], tree['w'])  # exact, as torch's lerp at weight 1
