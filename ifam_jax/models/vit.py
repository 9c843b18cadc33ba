"""DINOv2-compatible Vision Transformer in Flax NNX.

The parameter tree mirrors timm's `vit_*_patch14_reg4_dinov2` (and the plain DINOv2 models when
`num_registers=0`) so that pretrained weights import one tensor at a time:

  patch_embed (Conv, HWIO kernel)    cls_token [1, 1, D]    reg_token [1, R, D]
  pos_embed [1, N_p, D]              blocks[i].{norm1, attn.qkv, attn.proj, ls1.gamma,
  norm (final LayerNorm)                        norm2, mlp.fc1, mlp.fc2, ls2.gamma}

Position embeddings cover the patch tokens only (timm's folded `no_embed_class` layout: the
class token already carries its own position embedding). CLS and registers get none. The 'hf'
layout (`ViTConfig.pos_embed_layout`, RAD-DINO) keeps HF's [1, 1 + h0*w0, D] instead: the class
position apart, the patch grid fixed at the checkpoint's and interpolated to the input's grid in
every forward pass with PyTorch's non-antialiased bicubic (`hf_bicubic_matrix`).

Stage 2 of iFAM masks *keys only*: a patch that is not in the mask is never attended to by any
token, so the CLS output cannot depend on its pixels. Prefix tokens (CLS + registers) are always
visible, which keeps every attention row finite even when no patch is selected.

This file is the exact maths. Its speed paths (the flash layout, the token permutation, the
activation-lean GELU and LayerNorm) are in `fast_attention.py`, each tested equal to the exact
path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, get_args

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ifam_jax.models import fast_attention

LN_EPS = 1e-6
# How a patch mask reaches the classifier (`ViTClassifier.__call__`); iFAM's `stage2_mask`. The
# first three mask the attention keys (`VisionTransformer.__call__`); 'late' runs the ViT
# unmasked and masks the pooling of its patch tokens.
MaskMode = Literal['hard', 'straight_through', 'soft', 'late']
MASK_MODES: tuple[str, ...] = get_args(MaskMode)
KEY_MASK_MODES = ('hard', 'straight_through', 'soft')
AttentionKind = Literal['xla', 'flash']
PosEmbedLayout = Literal['folded', 'hf']

# (width, depth, heads, mlp hidden, mlp kind) per DINOv2 size.
_SIZES = {
    'S': (384, 12, 6, 1536, 'gelu'),
    'B': (768, 12, 12, 3072, 'gelu'),
    'L': (1024, 24, 16, 4096, 'gelu'),
    'g': (1536, 40, 24, 4096, 'swiglu'),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Static shape and numerics of one ViT. `dtype` is the compute dtype; params stay fp32.

  `attention`: 'xla' is the exact path (a dense 0/-inf key bias, XLA's kernel, bit-faithful to
  the reference). 'flash' puts the visible tokens first so that a key mask becomes a per-example
  length (`fast_attention`), which lets GPUs run cuDNN's fused kernel; the same values up to
  summation order. Soft and straight-through masks always take the exact path.

  `pos_embed_layout`: 'folded' (timm: patches only, resampled to `grid` at load) or 'hf' (HF
  transformers' Dinov2Model: CLS + patches at the grid of `pos_embed_size`, 0 = `image_size`,
  interpolated on the fly). `pixel_mean` / `pixel_std`: the input normalisation the backbone
  expects (`pixel_stats`); None is ImageNet's.
  """

  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_hidden: int = 3072
  mlp: Literal['gelu', 'swiglu'] = 'gelu'
  patch_size: int = 14
  image_size: int = 224
  num_registers: int = 4
  layerscale_init: float = 1e-5
  dtype: Any = jnp.float32
  attention: AttentionKind = 'xla'
  pos_embed_layout: PosEmbedLayout = 'folded'
  pos_embed_size: int = 0
  pixel_mean: tuple[float, ...] | None = None
  pixel_std: tuple[float, ...] | None = None

  def __post_init__(self):
    object.__setattr__(self, 'dtype', jnp.dtype(self.dtype))  # accept 'bfloat16' from configs
    if self.attention not in ('xla', 'flash'):
      raise ValueError(f"attention must be 'xla' or 'flash', got {self.attention!r}")
    if self.pos_embed_layout not in get_args(PosEmbedLayout):
      raise ValueError(f"pos_embed_layout must be 'folded' or 'hf', got {self.pos_embed_layout!r}")
    if self.pos_embed_size and (self.pos_embed_layout != 'hf'
                                or self.pos_embed_size % self.patch_size):
      raise ValueError(f'pos_embed_size {self.pos_embed_size} needs pos_embed_layout=\'hf\' and '
                       f'a multiple of patch_size {self.patch_size}')
    for name in ('pixel_mean', 'pixel_std'):
      value = getattr(self, name)
      if value is not None:
        if len(value) != 3 or (name == 'pixel_std' and min(value) <= 0):
          raise ValueError(f'{name} must be 3 numbers (std > 0), got {value!r}')
        object.__setattr__(self, name, tuple(float(v) for v in value))
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not divisible by patch_size '
                       f'{self.patch_size}')
    if self.width % self.num_heads:
      raise ValueError(f'width {self.width} is not divisible by num_heads {self.num_heads}')

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid**2

  @property
  def num_prefix(self) -> int:
    return 1 + self.num_registers

  @property
  def pos_grid(self) -> int:
    """The side of the position-embedding parameter's patch grid."""
    return (self.pos_embed_size or self.image_size) // self.patch_size


def vit_config(variant: str = 'B/14', **overrides: Any) -> ViTConfig:
  """ViTConfig from a DINOv2 variant name such as 'S/14', 'B/14', 'L/14', 'g/14' or 'B/16'."""
  size, _, patch = variant.partition('/')
  if size not in _SIZES or not patch.isdigit():
    raise ValueError(f'unknown ViT variant {variant!r}; expected one of '
                     f'{[s + "/14" for s in _SIZES]} (any patch size)')
  width, depth, heads, hidden, mlp = _SIZES[size]
  kw = dict(width=width, depth=depth, num_heads=heads, mlp_hidden=hidden, mlp=mlp,
            patch_size=int(patch))
  kw.update(overrides)
  return ViTConfig(**kw)


# ----------------------------------------------------------------------------
# Position embeddings
# ----------------------------------------------------------------------------
def resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int],
                       source_grid: tuple[int, int] | None = None) -> jax.Array:
  """Resamples patch position embeddings [1, h0*w0, D] to [1, h*w, D].

  Antialiased bicubic in fp32: the same kernel as torch's `interpolate(bicubic, antialias=True)`,
  which timm and HF use for the DINOv2 register models.
  """
  n, d = pos_embed.shape[-2:]
  if source_grid is None:
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f'cannot infer a square grid from {n} position embeddings')
    source_grid = (side, side)
  if tuple(source_grid) == tuple(grid):
    return pos_embed
  pe = pos_embed.reshape(source_grid[0], source_grid[1], d).astype(jnp.float32)
  pe = jax.image.resize(pe, (grid[0], grid[1], d), method='bicubic', antialias=True)
  return pe.reshape(1, grid[0] * grid[1], d).astype(pos_embed.dtype)


@functools.lru_cache(maxsize=64)
def hf_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] fp32 matrix of torch's `interpolate(mode='bicubic', align_corners=False)`.

  torch's non-antialiased bicubic given an output size: source coordinate
  (i + 0.5) * n_in / n_out - 0.5 (no clamp), cubic convolution with a = -0.75 on the four taps
  floor(src) - 1 .. floor(src) + 2, each clamped to the edge. Separable: rows and columns each
  take one matrix; n_in == n_out gives the identity.

  The weights follow torch's fp32 arithmetic, with its cubic's multiply-adds fused (x86 builds
  contract them into FMAs): the outer taps' cubic cancels to ~1e-2 from terms of ~3, so exact
  or unfused weights differ from torch's by up to ~5e-7, and the interpolated embeddings by
  ~2e-6 where these emulated ones stay within ~5e-7 (tests/test_weights_hf_dinov2.py).
  """
  f32 = np.float32
  a = f32(-0.75)

  def fma(x, y, z):  # one rounding, as a fused multiply-add: the fp32 product is exact in fp64
    return (np.float64(x) * np.float64(y) + np.float64(z)).astype(f32)

  def near(x):  # torch's cubic_convolution1, |x| <= 1
    return fma(fma(a + f32(2), x, -(a + f32(3))) * x, x, f32(1))

  def far(x):  # torch's cubic_convolution2, 1 < |x| < 2
    return fma(fma(fma(a, x, -f32(5) * a), x, f32(8) * a), x, -f32(4) * a)

  src = (np.arange(n_out, dtype=f32) + f32(0.5)) * (f32(n_in) / f32(n_out)) - f32(0.5)
  base = np.floor(src)
  t = src - base
  rest = f32(1) - t
  weights = np.stack([far(t + f32(1)), near(t), near(rest), far(rest + f32(1))], axis=1)
  taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
  return m.astype(f32)


def hf_resample_pos_embed(pos_embed: jax.Array, grid: tuple[int, int],
                          source_grid: tuple[int, int]) -> jax.Array:
  """HF Dinov2's `interpolate_pos_encoding` on patch position embeddings [1, h0*w0, D].

  In fp32 at full matmul precision, with fixed `hf_bicubic_matrix`es (constants per shape).
  It runs in the forward pass, not once at load, because the reference (HF `Dinov2Embeddings`)
  trains `position_embeddings` at the checkpoint's grid and interpolates it in every call: the
  gradient then reaches the native parameter through the interpolation, the trained parameter
  keeps its meaning and the exported one its shape. At RAD-DINO's 518 px the grid is native and
  nothing runs; elsewhere it costs two small matmuls.
  """
  if tuple(source_grid) == tuple(grid):
    return pos_embed
  d = pos_embed.shape[-1]
  pe = pos_embed.reshape(source_grid[0], source_grid[1], d).astype(jnp.float32)
  rows = jnp.asarray(hf_bicubic_matrix(source_grid[0], grid[0]))
  cols = jnp.asarray(hf_bicubic_matrix(source_grid[1], grid[1]))
  pe = jnp.einsum('ih,jw,hwd->ijd', rows, cols, pe, precision=jax.lax.Precision.HIGHEST)
  return pe.reshape(1, grid[0] * grid[1], d).astype(pos_embed.dtype)


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------
def key_bias_from_mask(keep: jax.Array) -> jax.Array:
  """0 where a key may be attended to, -inf where it is masked: [B, S] -> [B, S] fp32."""
  return jnp.where(keep, 0.0, -jnp.inf).astype(jnp.float32)


def key_masked_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                         key_bias: jax.Array | None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) + key_bias) v per head, over [B, T, heads, head_dim].

  `key_bias` [B, T] (or None) is added to every query's logit of that key: 0 / -inf for a hard
  mask, log(m + 1e-10) for the soft one.
  """
  bias = None if key_bias is None else key_bias[:, None, None, :].astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, bias=bias)


@jax.custom_vjp
def attention_with_mask_gradient(q: jax.Array, k: jax.Array, v: jax.Array,
                                 key_weight: jax.Array) -> jax.Array:
  """Hard key-masked attention whose mask receives the gradient of its relaxation.

  Forward: exactly `key_masked_attention` with the bias 0 / -inf from `key_weight` in {0, 1}
  (bit-identical to the non-differentiable path). Backward: q, k, v get their usual gradients,
  and `key_weight` gets the derivative of the relaxed attention p_ij = m_j e_ij / sum_l m_l e_il
  with respect to m_j, evaluated at the hard mask:

      dL/dm_j = sum_{heads, i} (e_ij / Z_i) * <dL/do_i, v_j - o_i>,

  where Z_i sums e over the visible keys. It is finite at m_j = 0, so a *masked* key is told
  how the loss would change if it were let in. The weight e_ij / Z_i is capped at 1 (the most a
  visible key can receive) so a strongly attracted masked key cannot overflow the gradient.
  """
  return key_masked_attention(q, k, v, key_bias_from_mask(key_weight > 0))


def _attention_mask_fwd(q, k, v, key_weight):
  out = attention_with_mask_gradient(q, k, v, key_weight)
  return out, (q, k, v, key_weight, out)


def _attention_mask_bwd(res, g):
  q, k, v, key_weight, out = res
  bias = key_bias_from_mask(key_weight > 0)
  _, vjp = jax.vjp(lambda q_, k_, v_: key_masked_attention(q_, k_, v_, bias), q, k, v)
  dq, dk, dv = vjp(g)
  f32 = jnp.float32
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum('bthd,bshd->bhts', q, k, preferred_element_type=f32) * scale
  lse = jax.nn.logsumexp(logits + bias[:, None, None, :], axis=-1, keepdims=True)
  weight = jnp.exp(jnp.minimum(logits - lse, 0.0))
  g_dot_v = jnp.einsum('bthd,bshd->bhts', g, v, preferred_element_type=f32)
  g_dot_o = jnp.einsum('bthd,bthd->bht', g.astype(f32), out.astype(f32))[..., None]
  d_weight = jnp.sum(weight * (g_dot_v - g_dot_o), axis=(1, 2))
  return dq, dk, dv, d_weight.astype(key_weight.dtype)


attention_with_mask_gradient.defvjp(_attention_mask_fwd, _attention_mask_bwd)


# ----------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------
def _linear(din: int, dout: int, cfg: ViTConfig, rngs: nnx.Rngs, use_bias: bool = True):
  return nnx.Linear(din, dout, use_bias=use_bias, dtype=cfg.dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _layer_norm(cfg: ViTConfig, rngs: nnx.Rngs, eps: float = LN_EPS):
  return nnx.LayerNorm(cfg.width, epsilon=eps, dtype=cfg.dtype, param_dtype=jnp.float32,
                       rngs=rngs)


class Attention(nnx.Module):
  """Fused-qkv multi-head self-attention with an optional per-key mask."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_heads
    self.flash = cfg.attention == 'flash'
    self.qkv = _linear(cfg.width, 3 * cfg.width, cfg, rngs)
    self.proj = _linear(cfg.width, cfg.width, cfg, rngs)

  def __call__(self, x: jax.Array, key_bias: jax.Array | None = None,
               key_weight: jax.Array | None = None,
               lengths: jax.Array | None = None) -> jax.Array:
    """At most one of `key_bias` [B, T] (0 / -inf or soft), `key_weight` [B, T] (the
    straight-through mask) and `lengths` [B] (the flash layout, `fast_attention`)."""
    b, t, d = x.shape
    qkv = self.qkv(x.reshape(b * t, d)).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if key_weight is not None:
      o = attention_with_mask_gradient(q, k, v, key_weight)
    elif self.flash and key_bias is None:
      o = fast_attention.flash_attention(q, k, v, lengths)
    else:
      o = key_masked_attention(q, k, v, key_bias)
    return self.proj(o.reshape(b * t, d)).reshape(b, t, d)


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2, or the packed SwiGLU of DINOv2 ViT-g (fc1 holds both halves).

  The GELU is `fast_attention.gelu`: x * (1 + erf(x / sqrt 2)) / 2 in fp32, with a backward that
  keeps only its input.
  """

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.kind = cfg.mlp
    packed = 2 if cfg.mlp == 'swiglu' else 1
    self.fc1 = _linear(cfg.width, packed * cfg.mlp_hidden, cfg, rngs)
    self.fc2 = _linear(cfg.mlp_hidden, cfg.width, cfg, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.fc1(x)
    if self.kind == 'swiglu':
      gate, value = jnp.split(h, 2, axis=-1)
      h = jax.nn.silu(gate) * value
    else:
      h = fast_attention.gelu(h)
    return self.fc2(h)


class LayerScale(nnx.Module):

  def __init__(self, cfg: ViTConfig):
    self.gamma = nnx.Param(jnp.full((cfg.width,), cfg.layerscale_init, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
  """Pre-norm transformer block with LayerScale on both residual branches."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(cfg, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.ls1 = LayerScale(cfg)
    self.norm2 = _layer_norm(cfg, rngs)
    self.mlp = Mlp(cfg, rngs=rngs)
    self.ls2 = LayerScale(cfg)

  def __call__(self, x, key_bias=None, key_weight=None, lengths=None):
    # The tokens as one [B*T, D] matrix outside attention, so that every parameter gradient is a
    # sum over one axis. Summed over (B, T), XLA laid a trained ViT's activations out
    # batch-minor at batch 128 and transposed them around every matmul (H100, 224 px: a ViT-B
    # forward and backward took 58.5 ms instead of 49.3).
    b, t, d = x.shape
    x = x.reshape(b * t, d)
    x = x + self.ls1(self.attn(self.norm1(x).reshape(b, t, d), key_bias, key_weight,
                               lengths).reshape(b * t, d))
    x = x + self.ls2(self.mlp(self.norm2(x)))
    return x.reshape(b, t, d)


# ----------------------------------------------------------------------------
# The ViT
# ----------------------------------------------------------------------------
class VisionTransformer(nnx.Module):
  """DINOv2 ViT: patch embed + pos embed, [CLS, registers, patches], blocks, final norm."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, p = cfg.width, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding='VALID', dtype=cfg.dtype,
                                param_dtype=jnp.float32, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, d)))
    self.reg_token = (nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, cfg.num_registers, d)))
                      if cfg.num_registers else None)
    positions = cfg.num_patches if cfg.pos_embed_layout == 'folded' else 1 + cfg.pos_grid**2
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, positions, d)))
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm = _layer_norm(cfg, rngs)

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """Normalised NHWC images -> patch tokens with position embeddings [B, h*w, D]."""
    b, hh, ww, _ = images.shape
    p = self.cfg.patch_size
    if hh % p or ww % p:
      raise ValueError(f'image size {hh}x{ww} is not divisible by the patch size {p}')
    grid = (hh // p, ww // p)
    # The stride-p convolution as one matmul over flattened (row, col, channel) patches: the same
    # sums, and much faster on GPUs than a convolution with a 14x14 stride-14 kernel.
    x = einops.rearrange(images.astype(self.cfg.dtype), 'b (h p) (w q) c -> b (h w) (p q c)',
                         p=p, q=p)
    kernel = self.patch_embed.kernel[...].reshape(p * p * 3, -1).astype(self.cfg.dtype)
    x = x @ kernel + self.patch_embed.bias[...].astype(self.cfg.dtype)
    if self.cfg.pos_embed_layout == 'hf':
      g0 = self.cfg.pos_grid
      pos = hf_resample_pos_embed(self.pos_embed[...][:, 1:], grid, (g0, g0))
    else:
      pos = resample_pos_embed(self.pos_embed[...], grid, (self.cfg.grid, self.cfg.grid))
    return x + pos.astype(x.dtype)

  def prefix_tokens(self, batch: int) -> jax.Array:
    cls = self.cls_token[...]
    if self.cfg.pos_embed_layout == 'hf':
      cls = cls + self.pos_embed[...][:, :1]
    tokens = [cls]
    if self.reg_token is not None:
      tokens.append(self.reg_token[...])
    prefix = jnp.concatenate(tokens, axis=1).astype(self.cfg.dtype)
    return jnp.broadcast_to(prefix, (batch,) + prefix.shape[1:])

  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None, *,
               mask_mode: MaskMode = 'hard',
               keep_index: jax.Array | None = None) -> dict[str, jax.Array]:
    """Runs the ViT; returns final-normed 'cls' [B, D], 'registers' [B, R, D], 'patches'.

    Args:
      images: normalised images [B, H, W, 3]; H, W multiples of the patch size. A grid other than
        the configured one resamples the position embeddings on the fly.
      patch_mask: optional [B, h*w] key mask over patches (raster order). 'hard': nonzero = visible,
        zero = masked with -inf, no gradient. 'straight_through': float {0, 1} whose gradient comes
        from `attention_with_mask_gradient`. 'soft': probabilities, bias log(m + 1e-10).
      keep_index: optional [B, M] patch indices (see `fast_attention.gather_patches`); only those
        patch tokens enter the blocks, and 'patches' holds just them.

    With `cfg.attention == 'flash'` and a hard mask (or none), the tokens take
    `fast_attention.lengths_layout`: the mask becomes a length, and 'patches' at masked
    positions is unspecified (it never reaches a visible token).
    """
    if patch_mask is not None and mask_mode not in KEY_MASK_MODES:
      raise ValueError(f'the ViT masks its attention keys with one of {KEY_MASK_MODES}, got '
                       f'mask_mode {mask_mode!r} (ViTClassifier pools under a late mask)')
    b = images.shape[0]
    patches = self.embed_patches(images)
    prefix = self.prefix_tokens(b)
    num_tokens = prefix.shape[1] + (patches.shape[1] if keep_index is None else keep_index.shape[1])
    layout = None
    if self.cfg.attention == 'flash' and (patch_mask is None or mask_mode == 'hard'):
      layout = fast_attention.lengths_layout(prefix, patches, patch_mask, keep_index)
      x, mask = layout.tokens, {'lengths': layout.lengths}
    else:
      if keep_index is not None:
        patches = jnp.take_along_axis(patches, keep_index[..., None], axis=1)
        if patch_mask is not None:
          patch_mask = jnp.take_along_axis(patch_mask, keep_index, axis=1)
      x = jnp.concatenate([prefix, patches], axis=1)
      mask = {} if patch_mask is None else self.key_mask(patch_mask, mask_mode)

    for block in self.blocks:
      x = block(x, **mask)
    x = self.norm(x[:, :num_tokens])
    r = self.cfg.num_prefix
    patches = x[:, r:]
    if layout is not None:
      patches = fast_attention.restore_order(patches, layout.order)
    return {'cls': x[:, 0], 'registers': x[:, 1:r], 'patches': patches}

  def key_mask(self, patch_mask: jax.Array, mask_mode: MaskMode) -> dict[str, jax.Array]:
    """The blocks' key mask over [prefix, patches] (prefix tokens always visible)."""
    prefix_visible = jnp.ones((patch_mask.shape[0], self.cfg.num_prefix), jnp.float32)
    if mask_mode == 'hard':
      keep = jax.lax.stop_gradient(patch_mask) > 0
      return {'key_bias': key_bias_from_mask(jnp.concatenate([prefix_visible > 0, keep], axis=1))}
    weight = jnp.concatenate([prefix_visible, patch_mask.astype(jnp.float32)], axis=1)
    if mask_mode == 'soft':
      return {'key_bias': jnp.log(weight + 1e-10)}
    return {'key_weight': weight}


def pixel_stats(model: nnx.Module) -> dict[str, tuple[float, ...]]:
  """`pixel_mean` / `pixel_std` of the first backbone in `model` as `normalize` keywords; {}
  (ImageNet's) where unset or where `model` holds no VisionTransformer."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, VisionTransformer):
      cfg = node.cfg
      stats = {'mean': cfg.pixel_mean, 'std': cfg.pixel_std}
      return {k: v for k, v in stats.items() if v is not None}
  return {}


def late_pool(patches: jax.Array, patch_mask: jax.Array) -> jax.Array:
  """sum_j m_j x_j / N over the final-normed patch tokens [B, N, D] and a mask [B, N], in fp32.

  The reference's late masking (`models/late_mask_vit.py`) averages the masked tokens over all
  N patches, the zeroed ones included, not over the mask's size. The mask gets no gradient.
  """
  mask = jax.lax.stop_gradient(patch_mask).astype(jnp.float32)
  return jnp.einsum('bnd,bn->bd', patches.astype(jnp.float32), mask) / patches.shape[1]


class ViTClassifier(nnx.Module):
  """ViT -> CLS (final norm) -> fresh LayerNorm (eps 1e-5) -> linear head without bias.

  Stage 2 of iFAM, and the plain fine-tuned ViT baseline when called without a mask. With
  `mask_mode='late'` the ViT runs unmasked and `late_pool` of its patch tokens replaces the CLS.
  """

  def __init__(self, cfg: ViTConfig, *, num_classes: int, rngs: nnx.Rngs):
    self.backbone = VisionTransformer(cfg, rngs=rngs)
    self.fc_norm = fast_attention.LeanLayerNorm(cfg.width, epsilon=1e-5, param_dtype=jnp.float32,
                                                rngs=rngs)
    self.head = nnx.Linear(cfg.width, num_classes, use_bias=False, param_dtype=jnp.float32,
                           kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)

  def __call__(self, images: jax.Array, patch_mask: jax.Array | None = None, *,
               mask_mode: MaskMode = 'hard', keep_index: jax.Array | None = None) -> jax.Array:
    """Class logits [B, C] in fp32; arguments as `VisionTransformer.__call__`, plus 'late'."""
    if mask_mode == 'late':
      if patch_mask is None or keep_index is not None:
        raise ValueError("mask_mode='late' pools the patch tokens under a patch_mask, which it "
                         'needs; the ViT sees every patch, so no keep_index can leave one out')
      pooled = late_pool(self.backbone(images)['patches'], patch_mask)
    else:
      pooled = self.backbone(images, patch_mask, mask_mode=mask_mode,
                             keep_index=keep_index)['cls'].astype(jnp.float32)
    return self.head(self.fc_norm(pooled))
