"""The named variants of a recipe: each changes exactly what it names, and composes with the
recipe it is given."""

import jax
import numpy as np
import pytest

from ifam_jax import bench, config_lib, factory, optim, presets, sharding, train
from ifam_jax.packed_stage2 import packing_applies

from fixtures.tiny_config import get_config

REMOVED = object()

# The shaping losses, each with a nonzero weight in `recipe()`.
SHAPING = ('presence', 'enforced_presence', 'equivariance', 'orthogonality', 'total_variation',
           'entropy', 'concentration')


def recipe():
  """A K=4 recipe whose every setting a preset touches differs from what the preset sets, with
  its own stage-2 learning-rate factors (which the one-ViT rows must keep)."""
  c = config_lib.base_config()
  c.model.num_parts = 4
  c.loss.weights.concentration = 0.5
  c.optim.groups.stage2_backbone.lr_factor = 0.5
  c.optim.groups.head.lr_factor = 100.0
  return c


def flatten(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def changes(before, after):
  """{key: new value or REMOVED} of every flattened key whose value changed."""
  b, a = flatten(before.to_dict()), flatten(after.to_dict())
  return {k: a.get(k, REMOVED) for k in b.keys() | a.keys() if b.get(k, REMOVED) != a.get(k)}


def one_vit(kind):
  """The ERM-style rows: one ViT whose rules put it in iFAM's stage-2 groups, which keep the
  recipe's factors (the backbone lr x0.5, the head x100) with every other group."""
  return {'model.kind': kind,
          'optim.group_rules': [(r'(head|fc_norm)/.*', 'head'),
                                (r'backbone/.*', 'stage2_backbone')]}


EXPECTED = {
    'erm': one_vit('baseline'),
    'ifam': {},
    'late_mask': {'model.stage2_mask': 'late'},
    'early_mask_gt': one_vit('early_mask_gt'),
    'late_mask_gt': one_vit('late_mask_gt'),
    'ifam_no_stage2': {'model.kind': 'pdiscoformer'},
    'ifam_soft_mask': {'model.stage2_mask': 'soft'},
    'ifam_k1_no_shaping': {'model.num_parts': 1,
                           **{f'loss.weights.{name}': 0.0 for name in SHAPING}},
    'ifam_no_stage1_classifier': {'loss.weights.cls1': 0.0},
    'ifam_frozen_stage2': {'optim.groups.stage2_backbone.frozen': True},
    'ifam_part_dropout_0': {'model.mask_part_dropout': 0.0},
    'ifam_part_dropout_0.1': {'model.mask_part_dropout': 0.1},
    'ifam_part_dropout_0.5': {'model.mask_part_dropout': 0.5},
    'ifam_straight_through': {'model.stage2_mask': 'straight_through'},
    'ifam_mask_floor': {'model.mask_min_fraction': 0.05},
    'ifam_mask_erode': {'model.mask_erode': 1, 'model.mask_min_fraction': 0.05},
    'ifam_fixed_count': {'model.mask_fixed_fraction': 0.1},
    'ifam_stage2_patch_dropout': {'model.stage2_patch_dropout': 0.2},
    'ifam_remedies': {'model.mask_erode': 1, 'model.mask_min_fraction': 0.05,
                      'model.stage2_patch_dropout': 0.2},
}


def test_the_named_presets_exist():
  assert set(presets.PRESETS) == set(EXPECTED)
  for preset in presets.PRESETS.values():
    assert preset.label and preset.description and '\n' not in preset.description


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_preset_changes_exactly_what_it_names(name):
  before = recipe()
  assert all(before.loss.weights[k] for k in SHAPING)
  after = presets.apply_preset(recipe(), name)
  got = changes(before, after)
  assert got.keys() == EXPECTED[name].keys()
  for key, value in EXPECTED[name].items():
    if value is REMOVED:
      assert got[key] is REMOVED, key
    else:
      assert got[key] == value and type(got[key]) is type(value), key


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_each_preset_builds_its_model(name):
  """The preset's config builds a model whose parameters its group rules all cover."""
  config = presets.apply_preset(get_config(), name)
  model = factory.abstract_model(config.model, 2)
  _, params, frozen, _ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  assert jax.tree.leaves(params)
  if name == 'ifam_frozen_stage2':
    assert jax.tree.leaves(frozen)


def test_unknown_preset_and_non_ifam_recipe():
  with pytest.raises(ValueError, match=r"unknown preset 'ifam_k2'; known: \[.*'late_mask'"):
    presets.apply_preset(recipe(), 'ifam_k2')
  baseline = recipe()
  config_lib.use_baseline(baseline)
  with pytest.raises(ValueError, match="model.kind 'baseline'"):
    presets.apply_preset(baseline, 'late_mask')


def names(tree):
  return {sharding.path_name(path).removesuffix('/value')
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def frozen_stage2_training():
  config = presets.apply_preset(get_config(), 'ifam_frozen_stage2')
  mesh = sharding.make_mesh(config.mesh)
  return config, mesh, train.build_training(config, 2, steps_per_epoch=8, mesh=mesh)


def test_frozen_stage2_keeps_no_optimizer_state_for_its_backbone():
  """Built as train.py builds it: only stage 2's head, fc_norm and tokens train (the reference's
  --freeze_second_stage); its blocks, patch embedding and final norm have neither gradients nor
  Adam moments."""
  _, _, t = frozen_stage2_training()
  trainable = names(t.state['params'])
  assert {n for n in trainable if n.startswith('stage2/')} == {
      'stage2/head/kernel', 'stage2/fc_norm/scale', 'stage2/fc_norm/bias',
      'stage2/backbone/cls_token', 'stage2/backbone/reg_token', 'stage2/backbone/pos_embed'}
  assert 'stage2/backbone/blocks/0/attn/qkv/kernel' in names(t.frozen)
  assert any(n.startswith('stage1/') for n in trainable)
  state = names(t.state['opt_state'])
  assert any(n.endswith('stage2/head/kernel') for n in state)
  assert not any('stage2/backbone/blocks' in n or 'stage2/backbone/patch_embed' in n
                 or 'stage2/backbone/norm' in n for n in state)


@pytest.mark.slow
def test_frozen_stage2_trains_packed_with_its_backbone_fixed():
  """One jitted step (flash attention, packed stage 2): the head moves, the blocks cannot."""
  config, mesh, t = frozen_stage2_training()
  assert config.model.attention == 'flash' and packing_applies(config.model)
  batch = bench.random_train_batch(0, config.global_batch_size, config.model.image_size, 2)
  before = jax.device_get(t.state['params'])
  with jax.set_mesh(mesh):
    state, metrics = t.train_step(t.state, t.frozen, batch)
    state, metrics = t.train_step(state, t.frozen, batch)  # the first update is warmup's zero
  assert 'stage2_tokens' in metrics and np.isfinite(float(metrics['loss']))
  after = jax.device_get(state['params'])
  assert not np.array_equal(after['stage2']['head']['kernel'][...],
                            before['stage2']['head']['kernel'][...])
