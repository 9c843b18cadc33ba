"""A²'s attention maps: where a frozen ViT's CLS token looks, as a patch map and as pixels.

  cls_attention   softmax(q_CLS K^T / sqrt(d_h)) of one block, per head, over every token
  patch_map       the patch entries of it, averaged over heads, as a g x g map
  upsample        bilinear to the image size (A² §3.1)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ifam_jax.models.vit import VisionTransformer


# ----------------------------------------------------------------------------
# CLS attention
# ----------------------------------------------------------------------------
def cls_attention(vit: VisionTransformer, images: jax.Array, block: int = -1) -> jax.Array:
  """The CLS query's attention in block `block`: [B, heads, T] fp32, T = 1 + R + N.

  Runs the model's own pieces (patch embedding, prefix tokens, the blocks before `block`, that
  block's `norm1` and fused `qkv`) on [CLS, registers, patches] and takes the softmax over all T
  keys (A² §3.1, App. B: registers and CLS itself are inside it). `VisionTransformer.__call__` is
  avoided on purpose: with `attention='flash'` it pads the token axis, and padded keys must not
  enter this softmax.

  Args:
    vit: the attention model.
    images: normalised images [B, S, S, 3], S a multiple of the patch size.
    block: which block's attention; -1 (default) is the last, the layer A² uses.
  """
  depth = len(vit.blocks)
  if not -depth <= block < depth:
    raise ValueError(f'block {block} is out of range for a ViT of depth {depth}')
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be [B, S, S, 3], got shape {images.shape}')
  index = block % depth
  x = jnp.concatenate([vit.prefix_tokens(images.shape[0]), vit.embed_patches(images)], axis=1)
  for layer in vit.blocks[:index]:
    x = layer(x)
  layer = vit.blocks[index]
  b, t, d = x.shape
  heads = layer.attn.num_heads
  qkv = layer.attn.qkv(layer.norm1(x).reshape(b * t, d)).reshape(b, t, 3, heads, d // heads)
  q, k = qkv[:, 0, 0], qkv[:, :, 1]
  logits = jnp.einsum('bhd,bthd->bht', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits / math.sqrt(d // heads), axis=-1)


# ----------------------------------------------------------------------------
# Patch map and upsampling
# ----------------------------------------------------------------------------
def patch_map(probs: jax.Array, num_prefix: int, grid: int,
              renormalise: bool = False) -> jax.Array:
  """The patch part of `cls_attention` [B, heads, T], mean over heads: [B, g, g] fp32.

  The first `num_prefix` (1 + R) entries, CLS and registers, are dropped; the rest is in the
  raster order of `embed_patches` (row-major). `renormalise` (docs/peers.md; default
  False, A² App. B as written) divides each head's patch part by its sum before the mean, so
  that every head weighs the same instead of by its share of mass on patches.
  """
  if probs.ndim != 3 or probs.shape[-1] != num_prefix + grid * grid:
    raise ValueError(f'probs must be [B, heads, {num_prefix} + {grid}^2] for num_prefix='
                     f'{num_prefix}, grid={grid}; got shape {probs.shape}')
  p = probs[..., num_prefix:].astype(jnp.float32)
  if renormalise:
    p = p / p.sum(axis=-1, keepdims=True)
  return p.mean(axis=1).reshape(probs.shape[0], grid, grid)


def upsample(maps: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of [B, g, g] maps to [B, size, size] fp32 (A² §3.1).

  `jax.image.resize` samples at half-pixel centres and renormalises its weights at the border,
  which equals torch's `interpolate(bilinear, align_corners=False)` when enlarging.
  """
  if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
    raise ValueError(f'maps must be [B, g, g], got shape {maps.shape}')
  if size < 1:
    raise ValueError(f'size must be positive, got {size}')
  return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], size, size), 'bilinear')
