"""A²'s attention maps on tiny random and hand-built ViTs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ifam_jax.models import vit
from ifam_jax.peers import attention


# Jitted: op by op, the first call compiles every primitive and takes seconds.
cls_attention = nnx.jit(attention.cls_attention, static_argnames='block')


def with_params(cfg, make):
  """A VisionTransformer whose parameters are `make(shape)` numpy arrays (an abstract build
  skips compiling the initialisers)."""
  model = nnx.eval_shape(lambda: vit.VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p: jnp.asarray(make(p.shape), jnp.float32), params))
  return model


def tiny_vit(num_registers=4, attention_kind='xla', seed=0):
  """Width 32, 4 heads, 8x8 grid; every parameter random so no block is near the identity."""
  cfg = vit.vit_config('S/8', image_size=64, num_registers=num_registers, width=32, depth=2,
                       num_heads=4, mlp_hidden=64, attention=attention_kind)
  rng = np.random.default_rng(seed)
  return with_params(cfg, lambda shape: 0.3 * rng.normal(size=shape))


def np_layer_norm(x, scale, bias, eps=vit.LN_EPS):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu)**2).mean(-1, keepdims=True) + eps) * scale + bias


def np_cls_attention(block, x):
  """softmax(q_CLS K^T / sqrt(d_h)) per head in float64, from the block's parameters."""
  x = np.asarray(x, np.float64)
  d, heads = x.shape[-1], block.attn.num_heads
  h = np_layer_norm(x, np.asarray(block.norm1.scale[...]), np.asarray(block.norm1.bias[...]))
  qkv = h @ np.asarray(block.attn.qkv.kernel[...]) + np.asarray(block.attn.qkv.bias[...])
  q = qkv[:, 0, :d].reshape(-1, heads, d // heads)
  k = qkv[:, :, d:2 * d].reshape(x.shape[0], x.shape[1], heads, d // heads)
  logits = np.einsum('bhd,bthd->bht', q, k) / math.sqrt(d // heads)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@nnx.jit
def block_inputs(model, images):
  """The tokens entering blocks 0 and 1."""
  x0 = jnp.concatenate([model.prefix_tokens(images.shape[0]), model.embed_patches(images)], 1)
  return x0, model.blocks[0](x0)


# ----------------------------------------------------------------------------
# cls_attention on a random ViT (1.6-6)
# ----------------------------------------------------------------------------
def test_cls_attention_shape_rows_and_numpy_reference():
  model = tiny_vit()
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))
  probs = cls_attention(model, images)
  assert probs.shape == (2, 4, 69) and probs.dtype == jnp.float32  # 1 + 4 + 64 tokens
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-5)
  x0, x1 = block_inputs(model, images)
  np.testing.assert_allclose(np.asarray(cls_attention(model, images, block=0)),
                             np_cls_attention(model.blocks[0], x0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(probs), np_cls_attention(model.blocks[1], x1), atol=1e-5)
  with pytest.raises(ValueError, match='out of range'):
    attention.cls_attention(model, images, block=2)


def test_cls_attention_is_the_same_for_flash_and_xla_models():
  images = jax.random.normal(jax.random.key(3), (2, 64, 64, 3))
  xla = cls_attention(tiny_vit(attention_kind='xla'), images)
  flash = cls_attention(tiny_vit(attention_kind='flash'), images)
  assert flash.shape == (2, 4, 69)
  np.testing.assert_allclose(np.asarray(flash), np.asarray(xla), atol=1e-6)


# ----------------------------------------------------------------------------
# The hand-built oracle ViT (1.6-7)
# ----------------------------------------------------------------------------
def oracle_vit(num_registers):
  """Block 1's CLS query is 10 * LN(cls)[2] = 20 and a patch's key is LN(token)[0]: +2 for a
  red patch, -2 for a green one, 0 for CLS and registers. Block 0 is the identity."""
  cfg = vit.vit_config('S/8', image_size=64, num_registers=num_registers, width=8, depth=2,
                       num_heads=1, mlp_hidden=16)
  model = with_params(cfg, np.zeros)
  for norm in [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2)]:
    norm.scale[...] = jnp.ones(8)
  kernel = np.zeros((8, 8, 3, 8), np.float32)  # HWIO: channel 0 = mean(R - G), 1 = -mean(R - G)
  kernel[:, :, 0, 0], kernel[:, :, 1, 0] = 1 / 64, -1 / 64
  kernel[:, :, 0, 1], kernel[:, :, 1, 1] = -1 / 64, 1 / 64
  model.patch_embed.kernel[...] = jnp.asarray(kernel)
  model.cls_token[...] = jnp.asarray(np.eye(8)[2] - np.eye(8)[3], jnp.float32)[None, None]
  qkv = np.zeros((8, 24), np.float32)
  qkv[2, 0] = 10.0  # query dim 0 <- 10 LN(x)[2]
  qkv[0, 8] = 1.0  # key dim 0 <- LN(x)[0]
  model.blocks[1].attn.qkv.kernel[...] = jnp.asarray(qkv)
  return model


@pytest.mark.parametrize('num_registers', [0, 4])
def test_oracle_vit_attends_to_the_red_patch(num_registers):
  image = np.zeros((1, 64, 64, 3), np.float32)
  image[..., 1] = 1.0
  image[:, 24:32, 40:48] = (1.0, 0.0, 0.0)  # grid row 3, column 5
  model = oracle_vit(num_registers)
  probs = cls_attention(model, jnp.asarray(image))
  assert probs.shape == (1, 1, 1 + num_registers + 64)
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, atol=1e-6)
  grid = attention.patch_map(probs, model.cfg.num_prefix, model.cfg.grid)
  assert np.unravel_index(int(np.argmax(grid[0])), (8, 8)) == (3, 5)
  # Logits: red patch 20 * 2 / sqrt(8), green -20 * 2 / sqrt(8), CLS and registers 0.
  z = 40 / math.sqrt(8)
  mass = math.exp(z) / (math.exp(z) + 1 + num_registers + 63 * math.exp(-z))
  assert abs(float(grid[0, 3, 5]) - mass) < 1e-6 and mass > 0.99999


# ----------------------------------------------------------------------------
# patch_map and upsample (1.6-8)
# ----------------------------------------------------------------------------
def test_patch_map_drops_the_prefix_and_means_heads():
  probs = jnp.asarray([[[0.5, 0.1, 0.4, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.25, 0.25, 0.5]]])  # prefix 2, grid 2
  np.testing.assert_allclose(np.asarray(attention.patch_map(probs, 2, 2)),
                             [[[0.2, 0.125], [0.125, 0.25]]], atol=1e-7)
  # Per head first: head 0's patch part is [1, 0, 0, 0] after renormalising.
  np.testing.assert_allclose(np.asarray(attention.patch_map(probs, 2, 2, renormalise=True)),
                             [[[0.5, 0.125], [0.125, 0.25]]], atol=1e-7)
  with pytest.raises(ValueError, match='num_prefix'):
    attention.patch_map(probs, 1, 2)


def np_upsample(a, size):
  """Half-pixel-centre bilinear, source coordinates clamped to the edge (torch
  align_corners=False), one axis at a time."""
  g = a.shape[-1]
  u = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
  i0 = np.floor(u).astype(int)
  i1 = np.minimum(i0 + 1, g - 1)
  w = u - i0
  rows = a[..., i0, :] * (1 - w)[:, None] + a[..., i1, :] * w[:, None]
  return rows[..., i0] * (1 - w) + rows[..., i1] * w


def test_upsample_is_half_pixel_bilinear():
  one_hot = np.zeros((1, 16, 16), np.float32)
  one_hot[0, 3, 5] = 1.0
  up = np.asarray(attention.upsample(jnp.asarray(one_hot), 224))
  assert up.shape == (1, 224, 224) and up.dtype == np.float32
  y, x = np.unravel_index(np.argmax(up[0]), (224, 224))
  assert 42 <= y <= 55 and 70 <= x <= 83
  np.testing.assert_allclose(up, np_upsample(one_hot, 224), atol=1e-6)
  maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(attention.upsample(jnp.asarray(maps), 224)),
                             np_upsample(maps, 224), atol=5e-6)
