"""Stage 1 of iFAM: PDiscoFormer-style part discovery on a DINOv2 backbone.

Each patch feature F(u) is compared with K+1 prototypes W_k (the last one is background):
the part logits are the negative squared distances -||F(u) - W_k||^2, computed in fp32 because
||F||^2 is large and the expansion ||F||^2 - 2<F, W_k> + ||W_k||^2 cancels. Softmaxed (with
Gumbel noise while training) they give the part maps A that every shaping loss reads; the maps
pool the features per part, a LayerNorm over [K+1, D] modulates them, and a shared classifier
scores each foreground part. Layouts are channels-last: maps [B, h, w, K+1], features [B, K+1, D].
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from ifam_jax.models.vit import ViTConfig, VisionTransformer

HIGHEST = jax.lax.Precision.HIGHEST
MODULATION_EPS = 1e-5


class PartModulation(nnx.Module):
  """LayerNorm over the two trailing dims [K+1, D] jointly, with an elementwise affine."""

  def __init__(self, num_channels: int, width: int):
    self.scale = nnx.Param(jnp.ones((num_channels, width), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_channels, width), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    mean = jnp.mean(x, axis=(-2, -1), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(-2, -1), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + MODULATION_EPS) * self.scale[...] + self.bias[...]


def gumbel_softmax(logits: jax.Array, tau: float, rng: jax.Array | None) -> jax.Array:
  """softmax((logits + g) / tau) over the last axis, g ~ Gumbel(0, 1); no noise if rng is None."""
  if rng is not None:
    logits = logits + jax.random.gumbel(rng, logits.shape, jnp.float32)
  return jax.nn.softmax(logits / tau, axis=-1)


class PartDiscovery(nnx.Module):
  """Backbone + prototypes + modulation + shared part classifier (stage 1)."""

  def __init__(self, vit: ViTConfig, *, num_parts: int, num_classes: int, rngs: nnx.Rngs):
    if num_parts < 1:
      raise ValueError(f'num_parts must be >= 1, got {num_parts}')
    self.num_parts = num_parts
    d = vit.width
    self.backbone = VisionTransformer(vit, rngs=rngs)
    bound = 1.0 / math.sqrt(d)  # torch's default 1x1-conv init
    self.prototypes = nnx.Param(
        jax.random.uniform(rngs.params(), (num_parts + 1, d), jnp.float32, -bound, bound))
    self.modulation = PartModulation(num_parts + 1, d)
    self.part_classifier = nnx.Linear(d, num_classes, use_bias=False, param_dtype=jnp.float32,
                                      kernel_init=nnx.initializers.truncated_normal(0.02),
                                      rngs=rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """Final-normed patch features on the grid, [B, h, w, D] in fp32."""
    patches = self.backbone(images)['patches']
    h = images.shape[1] // self.backbone.cfg.patch_size
    return einops.rearrange(patches, 'b (h w) d -> b h w d', h=h).astype(jnp.float32)

  def part_logits(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-||F - W_k||^2, <F, W_k>), each [B, h, w, K+1] in fp32."""
    w = self.prototypes[...]
    dot = jnp.einsum('bhwd,kd->bhwk', features, w, precision=HIGHEST)
    sq_f = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
    sq_w = jnp.sum(jnp.square(w), axis=-1)
    return -(sq_f - 2.0 * dot + sq_w), dot

  def classify(self, maps: jax.Array, features: jax.Array, *, part_dropout: float,
               rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Pools features by the maps and scores the foreground parts.

    Returns the modulated part features [B, K+1, D] and the per-part class scores [B, K, C].
    Pooling is a plain mean over all h*w positions (not normalised by the map mass), as the
    reference does. `rng` given and `part_dropout` > 0 zero whole foreground parts (Dropout1d).
    """
    hw = maps.shape[1] * maps.shape[2]
    pooled = jnp.einsum('bhwk,bhwd->bkd', maps, features, precision=HIGHEST) / hw
    modulated = self.modulation(pooled)
    fg = modulated[:, :self.num_parts]
    if rng is not None and part_dropout > 0:
      keep = jax.random.bernoulli(rng, 1.0 - part_dropout, fg.shape[:2] + (1,))
      fg = jnp.where(keep, fg / (1.0 - part_dropout), 0.0)
    return modulated, self.part_classifier(fg)
