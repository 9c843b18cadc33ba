"""Speed paths of the ViT's maths (`vit.py`), each tested equal to the exact path.

- The flash layout: stage 2's hard key mask hides the masked patches from every token, so moving
  the visible patches first turns the mask into a per-example length, which cuDNN's fused
  attention kernel takes on GPUs (`lengths_layout`, `flash_attention`). The values are the
  exact path's up to summation order.
- The token order and gather: `gather_patches` (visible patches first), `permute_tokens` (a
  permutation whose gradient is a gather too).
- An activation-lean exact GELU (`gelu`): its backward keeps only its input; and the same for
  LayerNorm (`LeanLayerNorm`), used by the classifier's final norm, whose hand-written backward
  the trained numbers (the demo's table among them) were measured with: autodiff's differs from
  it at rounding level, which over a run moves the results as another CPU would.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


# ----------------------------------------------------------------------------
# Flash attention with lengths
# ----------------------------------------------------------------------------
def flash_kernel(dtype: Any) -> Literal['cudnn', 'xla']:
  """cuDNN's fused flash attention on GPUs for bf16/fp16, XLA's kernel otherwise."""
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'


def _kernel_multiple(kernel: str) -> int:
  return 2 if kernel == 'cudnn' else 1


def sequence_multiple(dtype: Any) -> int:
  """What the flash kernel needs the token count divisible by: cuDNN's backward fails on odd
  lengths (261 = 1 + 4 + 16^2 at 224 px), XLA takes any."""
  return _kernel_multiple(flash_kernel(dtype))


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array | None = None,
                    *, kernel: Literal['cudnn', 'xla'] | None = None,
                    pad_multiple: int | None = None) -> jax.Array:
  """Attention among the first `lengths[b]` tokens of each example ([B, T, heads, head_dim]).

  Keys at or beyond the length are invisible to every query; query rows beyond it are left
  unspecified (nothing that reads only visible tokens depends on them). `kernel` defaults to
  `flash_kernel(q.dtype)`. Inputs are zero-padded to a multiple of `pad_multiple` (default
  `sequence_multiple`), the padding masked by the lengths; `lengths_layout` already hands over
  a sequence of that multiple, so that copy happens only for direct callers.
  """
  kernel = kernel or flash_kernel(q.dtype)
  pad_multiple = pad_multiple or _kernel_multiple(kernel)
  b, t = q.shape[:2]
  padded = -(-t // pad_multiple) * pad_multiple
  if lengths is None and padded != t:
    lengths = jnp.full((b,), t, jnp.int32)
  if padded != t:
    q, k, v = (jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))) for x in (q, k, v))
  if lengths is not None:
    lengths = lengths.astype(jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=kernel)
  return out[:, :t]


# ----------------------------------------------------------------------------
# Token order
# ----------------------------------------------------------------------------
def gather_patches(patch_mask: jax.Array, num_keep: int) -> jax.Array:
  """Indices [B, num_keep] of the selected patches first, in raster order, then unselected ones.

  Gathering these tokens and masking the unselected ones among them is exact as long as
  `num_keep` >= the largest number of selected patches in the batch.
  """
  n = patch_mask.shape[-1]
  # Stable sort on (not selected, position): selected patches first, each group in raster order.
  order_key = jnp.where(patch_mask > 0, 0, n) + jnp.arange(n)
  return jnp.argsort(order_key, axis=-1)[:, :num_keep]


@jax.custom_vjp
def permute_tokens(x: jax.Array, order: jax.Array) -> jax.Array:
  """x[b, order[b, i]] for a permutation `order` [B, N] of x's tokens [B, N, D].

  Its gradient is the inverse permutation, a gather too, where autodiff of a gather would
  scatter-add (slower on GPUs, and exact here only because no index repeats)."""
  return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_tokens_fwd(x, order):
  return permute_tokens(x, order), order


def _permute_tokens_bwd(order, g):
  return permute_tokens(g, jnp.argsort(order, axis=-1)), None


permute_tokens.defvjp(_permute_tokens_fwd, _permute_tokens_bwd)


class LengthsLayout(NamedTuple):
  """The token sequence of the flash path and how to read it back."""

  tokens: jax.Array  # [B, T', D]: prefix, visible patches first, trailing zero tokens
  lengths: jax.Array | None  # [B] visible tokens per example; None: all T' are
  order: jax.Array | None  # [B, N] the permutation applied to the patches, if any


def lengths_layout(prefix: jax.Array, patches: jax.Array, patch_mask: jax.Array | None,
                   keep_index: jax.Array | None) -> LengthsLayout:
  """The exact path's [prefix, patches] sequence with a hard key mask as a length.

  A mask without `keep_index` permutes the patches, visible first (undo it with
  `restore_order`); `keep_index` ([B, M], see `gather_patches`) gathers those patches instead.
  Trailing zero tokens up to `sequence_multiple` are hidden by the lengths: cheaper than padding
  q, k and v inside every attention call.
  """
  order = None
  if patch_mask is not None and keep_index is None:
    keep_index = order = gather_patches(jax.lax.stop_gradient(patch_mask), patches.shape[1])
  if order is not None:
    patches = permute_tokens(patches, order)
  elif keep_index is not None:
    patches = jnp.take_along_axis(patches, keep_index[..., None], axis=1)
  if keep_index is not None and patch_mask is not None:
    patch_mask = jnp.take_along_axis(patch_mask, keep_index, axis=1)
  x = jnp.concatenate([prefix, patches], axis=1)
  b, num_tokens = x.shape[:2]
  lengths = None
  if patch_mask is not None:
    visible = jnp.sum(jax.lax.stop_gradient(patch_mask) > 0, axis=1)
    lengths = prefix.shape[1] + visible.astype(jnp.int32)
  extra = -num_tokens % sequence_multiple(x.dtype)
  if extra:
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    if lengths is None:
      lengths = jnp.full((b,), num_tokens, jnp.int32)
  return LengthsLayout(x, lengths, order)


def restore_order(patches: jax.Array, order: jax.Array | None) -> jax.Array:
  """Patch outputs [B, N, D] back in raster order after `lengths_layout`'s permutation."""
  return patches if order is None else permute_tokens(patches, jnp.argsort(order, axis=-1))


# ----------------------------------------------------------------------------
# Activation-lean GELU
# ----------------------------------------------------------------------------
# Autodiff of the erf GELU keeps several activation-sized intermediates for the backward pass;
# writing and re-reading them was the largest elementwise cost of a training step. This keeps
# only its input and recomputes the rest.
@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU computed in fp32 and rounded to x's dtype, as torch does for bf16.

  (`jax.nn.gelu(approximate=False)` evaluates erfc in the input dtype, which XLA splits into
  two activation-sized passes.)
  """
  x32 = x.astype(jnp.float32)
  return (x32 * 0.5 * _one_plus_erf(x32)).astype(x.dtype)


def _one_plus_erf(x32):
  return 1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0)))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * _one_plus_erf(x32)
  pdf = jnp.exp(-0.5 * jnp.square(x32)) * (1.0 / math.sqrt(2.0 * math.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ----------------------------------------------------------------------------
# Activation-lean LayerNorm
# ----------------------------------------------------------------------------
def _layer_norm_stats(x, eps):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean))
  return x32, mean, jax.lax.rsqrt(var + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
               dtype: Any) -> jax.Array:
  """LayerNorm over the last axis, statistics in fp32, output in `dtype` (flax's arithmetic)."""
  x, scale, bias = x.astype(dtype), scale.astype(dtype), bias.astype(dtype)
  x32, mean, rstd = _layer_norm_stats(x, eps)
  return ((x32 - mean) * (rstd * scale) + bias).astype(dtype)


def _layer_norm_fwd(x, scale, bias, eps, dtype):
  _, mean, rstd = _layer_norm_stats(x.astype(dtype), eps)
  return layer_norm(x, scale, bias, eps, dtype), (x, mean, rstd, scale, bias)


def _layer_norm_bwd(eps, dtype, res, g):
  del eps
  x, mean, rstd, scale, bias = res
  xhat = (x.astype(dtype).astype(jnp.float32) - mean) * rstd
  g32 = g.astype(jnp.float32)
  gs = g32 * scale.astype(dtype).astype(jnp.float32)
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  batch_axes = tuple(range(g.ndim - 1))
  dscale = jnp.sum(g32 * xhat, axis=batch_axes).astype(scale.dtype)
  dbias = jnp.sum(g32, axis=batch_axes).astype(bias.dtype)
  return dx.astype(x.dtype), dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LeanLayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same parameters and values) with the lean `layer_norm` backward."""

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.scale[...], self.bias[...])
    return layer_norm(x, self.scale[...], self.bias[...], self.epsilon, dtype)
