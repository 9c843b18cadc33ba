"""Late masking: the ViT runs unmasked and its final patch tokens are averaged under the mask.

The pooling against numpy, the point of the comparison (pixels outside the mask reach the late
classifier, never the early one), iFAM with stage2_mask='late', and where it must not go
(packing, token gather, the audit).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ifam_jax import config_lib
from ifam_jax.models import ifam, vit
from ifam_jax.packed_stage2 import packing_applies

IMAGE, PATCH, NUM_CLASSES = 56, 14, 5  # a 4x4 patch grid


def tiny_cfg(attention='xla', layerscale_init=1e-5):
  return vit.vit_config('S/14', width=32, depth=2, num_heads=2, mlp_hidden=64, image_size=IMAGE,
                        attention=attention, layerscale_init=layerscale_init)


def classifier(attention='xla', seed=0, layerscale_init=1e-5):
  cfg = tiny_cfg(attention, layerscale_init)
  return vit.ViTClassifier(cfg, num_classes=NUM_CLASSES, rngs=nnx.Rngs(seed))


def images(seed=1, batch=3):
  return jax.random.normal(jax.random.key(seed), (batch, IMAGE, IMAGE, 3))


def mixed_mask(batch=3, seed=0):
  """A {0, 1} patch mask [B, 16] with visible and masked patches in every row."""
  m = (np.random.default_rng(seed).random((batch, 16)) < 0.5).astype(np.float32)
  m[:, 0], m[:, 1] = 1.0, 0.0
  return m


def pixel_mask(patch_mask):
  """[B, 16] -> [B, H, W, 1]."""
  m = patch_mask.reshape(-1, 4, 4)
  return np.repeat(np.repeat(m, PATCH, axis=1), PATCH, axis=2)[..., None]


# ----------------------------------------------------------------------------
# The pooling
# ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('attention', ['xla', 'flash'])
def test_late_pooling_matches_numpy(attention):
  """logits = head(fc_norm(sum_j m_j x_j / N)), x the unmasked ViT's final-normed patches."""
  model = classifier(attention)
  x, mask = images(), mixed_mask()
  tokens = np.asarray(model.backbone(x)['patches'], np.float64)  # [B, N, D], no mask
  pooled = (tokens * mask[..., None]).sum(1) / tokens.shape[1]  # over all N, zeros included
  mean, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
  normed = ((pooled - mean) / np.sqrt(var + 1e-5) * np.asarray(model.fc_norm.scale[...])
            + np.asarray(model.fc_norm.bias[...]))
  expected = normed @ np.asarray(model.head.kernel[...], np.float64)
  got = np.asarray(model(x, jnp.asarray(mask), mask_mode='late'))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # Dividing by the mask's size instead would give other logits: the reference's pitfall (docs/peers.md).
  by_size = pooled * tokens.shape[1] / mask.sum(1, keepdims=True)
  assert not np.allclose(vit.late_pool(jnp.asarray(tokens), jnp.asarray(mask)), by_size,
                         atol=1e-3)


@pytest.mark.slow  # two models compiled
def test_pixels_outside_the_mask_reach_late_but_not_early_masking():
  # LayerScale 1 (as after training): at 1e-5 each output token is nearly its own patch's.
  model = classifier(layerscale_init=1.0)
  x, mask = images(), mixed_mask()
  noise = 100.0 * jax.random.normal(jax.random.key(99), x.shape)
  outside = jnp.where(pixel_mask(mask) > 0, x, noise)  # every masked-out pixel replaced

  def logits(pixels, mode):
    return np.asarray(model(pixels, jnp.asarray(mask), mask_mode=mode))

  np.testing.assert_array_equal(logits(outside, 'hard'), logits(x, 'hard'))
  moved = np.abs(logits(outside, 'late') - logits(x, 'late')).max(axis=1)
  assert (moved > 1e-3).all(), moved


def test_late_mask_sends_the_mask_no_gradient():
  model = classifier()
  x = images()
  grad = jax.grad(lambda m: jnp.sum(model(x, m, mask_mode='late')))(jnp.asarray(mixed_mask()))
  np.testing.assert_array_equal(grad, 0.0)


def test_late_mask_needs_a_mask_and_every_patch():
  model, x, mask = classifier(), images(), jnp.asarray(mixed_mask())
  with pytest.raises(ValueError, match="mask_mode='late'"):
    model(x, mask_mode='late')
  with pytest.raises(ValueError, match='keep_index'):
    model(x, mask, mask_mode='late', keep_index=jnp.zeros((3, 8), jnp.int32))
  with pytest.raises(ValueError, match="'late'"):  # the ViT itself masks keys only
    model.backbone(x, mask, mask_mode='late')


# ----------------------------------------------------------------------------
# iFAM with stage2_mask='late'
# ----------------------------------------------------------------------------
def tiny_ifam(stage2_mask):
  cfg = tiny_cfg()
  return ifam.IFAM(num_classes=NUM_CLASSES, num_parts=2, stage1=cfg, stage2=cfg,
                   stage2_mask=stage2_mask, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_ifam_late_is_stage1_mask_pooled_late():
  """Stage 2's logits are the classifier's late pooling under stage 1's own hard mask."""
  model = tiny_ifam('late')
  x, rng = images(), jax.random.key(7)
  for train in (False, True):
    out = model(x, train=train, rng=rng)
    mask = np.asarray(out.fg_mask).reshape(3, -1)
    assert np.isin(mask, (0.0, 1.0)).all()
    expected = model.stage2(x, jnp.asarray(mask), mask_mode='late')
    np.testing.assert_array_equal(out.logits, expected)
    assert not np.allclose(out.logits, model.stage2(x, jnp.asarray(mask), mask_mode='hard'))
  with pytest.raises(ValueError, match='keep_index'):
    model(x, train=False, keep_count=16)


def test_late_facts_and_packing():
  facts = ifam.stage2_mask_facts('late')
  assert (facts.binary, facts.trains_stage1, facts.hides_masked) == (True, False, False)
  assert [ifam.stage2_mask_facts(m).hides_masked for m in ('hard', 'straight_through', 'soft')
          ] == [True, True, False]
  model_cfg = ml_collections.ConfigDict(config_lib.base_config().model.to_dict())
  model_cfg.stage2_token_tiers = (0.25, 0.5)
  assert packing_applies(model_cfg)
  model_cfg.stage2_mask = 'late'
  assert not packing_applies(model_cfg)
