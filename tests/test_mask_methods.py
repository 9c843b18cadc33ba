"""The methods with a given mask or without stage 2: ground-truth early / late masking and
PDiscoFormer (iFAM without its second stage), through the real train and eval steps."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ifam_jax import methods, presets, sharding, train
from ifam_jax.apply import apply
from ifam_jax.data.pipeline import normalize
from ifam_jax.evaluators.predict import make_eval_step
from ifam_jax.methods.ground_truth import patch_mask_from_pixels
from ifam_jax.packed_stage2 import packing_applies

from fixtures.tiny_config import get_config

BATCH, SIZE, PATCH, NUM_CLASSES = 8, 32, 8, 2  # tiny_config: 32 px, 8 px patches, 2 classes


# ----------------------------------------------------------------------------
# Pixel mask -> patch mask
# ----------------------------------------------------------------------------
def numpy_patch_mask(pixels, p):
  b, s, _ = pixels.shape
  out = np.zeros((b, s // p, s // p), np.float32)
  for n in range(b):
    for i in range(s // p):
      for j in range(s // p):
        out[n, i, j] = np.mean(pixels[n, i * p:(i + 1) * p, j * p:(j + 1) * p] > 0) >= 0.5
  return out.reshape(b, -1)


def test_patch_mask_from_pixels_matches_numpy():
  rng = np.random.default_rng(0)
  pixels = (rng.random((3, 12, 12)) < rng.random((3, 1, 1))).astype(np.uint8) * 255
  pixels[0, :4, :4] = 0
  pixels[0, :2, :4] = 1  # exactly half of the first patch: foreground
  pixels[0, :4, 4:8] = 0
  pixels[0, 0, 4:8], pixels[0, 1, 4:7] = 1, 1  # 7 of 16: background
  got = np.asarray(patch_mask_from_pixels(jnp.asarray(pixels), 4))
  expected = numpy_patch_mask(pixels, 4)
  np.testing.assert_array_equal(got, expected)
  assert got[0, 0] == 1.0 and got[0, 1] == 0.0
  assert 0 < expected.mean() < 1
  with pytest.raises(ValueError, match='5-pixel patches'):
    patch_mask_from_pixels(jnp.asarray(pixels), 5)


# ----------------------------------------------------------------------------
# Train and eval steps
# ----------------------------------------------------------------------------
def synthetic_batch(seed=0):
  """Random images and labels; the mask: a random rectangle per image, so that patches on its
  edges are partly foreground."""
  rng = np.random.default_rng(seed)
  fg = np.zeros((BATCH, SIZE, SIZE), np.uint8)
  for n in range(BATCH):
    top, left = rng.integers(0, 12, size=2)
    height, width = rng.integers(6, 20, size=2)
    fg[n, top:top + height, left:left + width] = 1
  return {'image': rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
          'label': rng.integers(0, NUM_CLASSES, BATCH).astype(np.int32),
          'valid': np.ones(BATCH, np.int32), 'first_pass': np.ones(BATCH, np.int32),
          'fg_mask': fg}


def build(preset):
  config = presets.apply_preset(get_config(), preset)
  mesh = sharding.make_mesh(config.mesh)
  return config, mesh, train.build_training(config, NUM_CLASSES, steps_per_epoch=8, mesh=mesh)


def model_of(t, params):
  return nnx.merge(t.graphdef, params, t.frozen, t.rest)


def cross_entropy(logits, labels):
  logits = np.asarray(logits, np.float64)
  z = logits - logits.max(1, keepdims=True)
  return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels]))


@pytest.mark.parametrize('preset,mask_mode', [('early_mask_gt', 'hard'),
                                              ('late_mask_gt', 'late')])
@pytest.mark.slow
def test_ground_truth_mask_methods_train_and_evaluate(preset, mask_mode):
  config, mesh, t = build(preset)
  batch = synthetic_batch()
  patch_mask = numpy_patch_mask(batch['fg_mask'], PATCH)
  assert 0 < patch_mask.mean() < 1
  params = jax.device_get(t.state['params'])
  model = model_of(t, params)
  x = normalize(batch['image'])
  logits = np.asarray(model(x, jnp.asarray(patch_mask), mask_mode=mask_mode))
  assert not np.allclose(logits, model(x), atol=1e-4)  # the mask matters
  with jax.set_mesh(mesh):
    _, metrics = t.train_step(t.state, t.frozen, batch)
    out = jax.device_get(t.eval_step(params, t.frozen, batch, jax.random.key(0)))
  np.testing.assert_allclose(float(metrics['cls2']), cross_entropy(logits, batch['label']),
                             rtol=1e-5)
  np.testing.assert_allclose(float(metrics['fg_fraction']), patch_mask.mean(), rtol=1e-6)
  np.testing.assert_allclose(out['logits'], logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['fg_fraction'], patch_mask.mean(1), rtol=1e-6)
  pixels = np.repeat(np.repeat(patch_mask.reshape(BATCH, 4, 4), PATCH, 1), PATCH, 2) > 0
  truth = batch['fg_mask'] > 0
  np.testing.assert_array_equal(out['fg_intersection'], (pixels & truth).sum((1, 2)))
  np.testing.assert_array_equal(out['fg_union'], (pixels | truth).sum((1, 2)))
  assert not packing_applies(config.model)


def write_folder(root, count=4):
  for label in ('a', 'b'):
    os.makedirs(root / label)
    for i in range(count):
      Image.new('RGB', (SIZE, SIZE), (40 * i, 0, 0)).save(root / label / f'{i}.png')


@pytest.mark.parametrize('where', ['data.train', 'data.evals.plain'])
def test_ground_truth_masks_are_required_before_compiling(where, tmp_path, monkeypatch):
  config = presets.apply_preset(get_config(), 'late_mask_gt')
  write_folder(tmp_path / 'images')
  folder = dict(source='folder', root=str(tmp_path / 'images'))
  if where == 'data.train':
    config.data.train = folder
    config.data.evals = {}
    config.data.val_split = ''
  else:
    config.data.evals.plain = folder
  monkeypatch.setattr(train, 'build_training', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(ValueError, match=rf"'late_mask_gt' reads \['fg_mask'\].*'{where}' "
                                       r'\(ImageFolderSource.*segmentation_dir'):
    train.train_and_evaluate(config, tmp_path / 'workdir')


def test_eval_step_without_the_mask_names_the_method():
  config, _, t = build('early_mask_gt')
  batch = {k: v for k, v in synthetic_batch().items() if k != 'fg_mask'}
  step = make_eval_step(t.graphdef, t.rest, config)
  with pytest.raises(ValueError, match="'early_mask_gt' reads \\['fg_mask'\\].*eval batch"):
    step(t.state['params'], t.frozen, batch, jax.random.key(0))


# ----------------------------------------------------------------------------
# No second stage
# ----------------------------------------------------------------------------
def test_pdiscoformer_predicts_with_stage1_and_has_no_stage2_loss():
  config, mesh, t = build('ifam_no_stage2')
  assert config.model.stage2_token_tiers and not packing_applies(config.model)
  batch = synthetic_batch()
  params = jax.device_get(t.state['params'])
  rng = jax.random.key(3)
  with jax.set_mesh(mesh):
    out = jax.device_get(t.eval_step(params, t.frozen, batch, rng))
  ifam_out = jax.jit(lambda p, x: model_of(t, p)(normalize(x), train=False, rng=rng))(
      params, batch['image'])
  np.testing.assert_allclose(out['logits'], ifam_out.stage1_logits, rtol=1e-5, atol=1e-6)
  assert not np.allclose(out['logits'], ifam_out.logits, atol=1e-4)  # not stage 2's
  np.testing.assert_allclose(out['fg_fraction'], np.mean(ifam_out.fg_mask, axis=(1, 2)))

  terms, extras = jax.eval_shape(lambda p: apply(
      t.graphdef, t.rest, p, t.frozen, batch['image'], methods.get('pdiscoformer').loss_terms,
      labels=batch['label'], valid=jnp.ones(BATCH), rng=jax.random.key(0),
      loss_cfg=config.loss), params)
  assert 'cls2' not in terms and {'cls1', 'presence'} <= set(terms)
  assert 'fg_mask' not in extras and 'accuracy' in extras
