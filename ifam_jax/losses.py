"""iFAM's training losses as pure JAX functions: both classifiers and the stage-1 shaping losses.

Layouts differ from the PyTorch reference: part maps A are channels-last [B, h, w, K+1] with the
background channel last, modulated part features are [B, K+1, D] and images are NHWC. Every map
loss takes the full K+1 channels and picks the foreground / background channels itself.

The shaping losses compute in float32 whatever the input dtype: they pool, normalise and take logs
of probabilities, where bf16 would lose the signal. Defaults and quirks follow the reference
trainer (spec sections 5 and 14): the presence loss maxes over the batch it is given (per device in
the reference), the total-variation normaliser is B*h*w of the call, and the iFAM orthogonality
loss works on the D x D channel Gram matrix.
"""

from __future__ import annotations

import types
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
BCE_LOG_FLOOR = -100.0  # torch's binary_cross_entropy clamps log(x) at -100
COSINE_EPS = 1e-8  # F.cosine_similarity default
NORMALIZE_EPS = 1e-12  # F.normalize default

PresenceKind = Literal['original', 'soft_constraint', 'tanh', 'soft_tanh']
EnforcedPresenceKind = Literal['enforced_presence', 'log', 'linear', 'mse']
OrthogonalityKind = Literal['ifam', 'parts']
WarpMethod = Literal['bilinear', 'nearest']

# Loss weights of the paper's runs (`engine/distributed_trainer_two_stage.py`); SIIM-ACR sets
# enforced_presence to 0. Read-only so that no caller edits the defaults for everyone.
DEFAULT_WEIGHTS = types.MappingProxyType({
    'cls2': 1.0,
    'cls1': 1.0,
    'presence': 1.0,
    'enforced_presence': 2.0,
    'equivariance': 1.0,
    'orthogonality': 1.0,
    'total_variation': 1.0,
    'entropy': 1.0,
    'concentration': 0.0,
})


def _f32(x: jax.typing.ArrayLike) -> jax.Array:
  return jnp.asarray(x).astype(jnp.float32)


def _pair(x: float | tuple[float, float]) -> tuple[float, float]:
  return (x[0], x[1]) if isinstance(x, (tuple, list)) else (x, x)


def _neg_log_clamped(x: jax.Array) -> jax.Array:
  """-max(log x, -100): torch's BCE against target 1, with a finite gradient at x = 0."""
  positive = x > 0
  log_x = jnp.log(jnp.where(positive, x, 1.0))
  return -jnp.where(positive, jnp.maximum(log_x, BCE_LOG_FLOOR), BCE_LOG_FLOOR)


def _clamped_norm(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """max(||x||_2, eps) along `axis` (kept), with a zero rather than NaN gradient at x = 0."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  nonzero = sq > 0
  norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)
  return jnp.maximum(norm, eps)


def _avg_pool3(x: jax.Array) -> jax.Array:
  """3x3 mean over axes 1, 2 with stride 1 and no padding (torch's AvgPool2d(3, stride=1))."""
  h, w = x.shape[1] - 2, x.shape[2] - 2
  if h < 1 or w < 1:
    raise ValueError(f'maps must be at least 3x3 for the 3x3 pooling, got {x.shape[1:3]}')
  return sum(x[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------
def negative_log_likelihood(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] per example [B], in fp32."""
  log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  weights: jax.Array | None = None) -> jax.Array:
  """Mean softmax cross-entropy with integer labels: both stages' L_cls (no label smoothing).

  `weights` [B] turn it into a weighted mean, so a skipped (corrupt or padding) example with
  weight 0 contributes nothing.
  """
  nll = negative_log_likelihood(logits, labels)
  if weights is None:
    return jnp.mean(nll)
  weights = _f32(weights)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ---------------------------------------------------------------------------
# Presence of the foreground parts (L_p1) and of the background at the border (L_p0)
# ---------------------------------------------------------------------------
def presence_loss(maps: jax.Array, kind: PresenceKind = 'original',
                  beta: float = 0.1) -> jax.Array:
  """L_p1: every foreground part should appear strongly somewhere in the batch.

  pi[b, k] is the peak of the 3x3-smoothed map of part k in image b (the smoothing rewards a
  blob over a single patch). 'original' (the paper): 1 - mean_k max_b pi. 'soft_constraint':
  mean_k (1 - pi_k) ((1 - beta) sg(pi_k) + beta) with pi_k = max_b pi. 'tanh' (PIP-Net):
  BCE(tanh(sum_b pi), 1) averaged over k. 'soft_tanh': 1 - mean_k tanh(sum_b pi). The batch
  reduction sees only this call's batch: the reference's max runs over each GPU's local batch.

  Args:
    maps: [B, h, w, K+1] part maps; the background channel (last) is ignored.
  """
  if kind not in ('original', 'soft_constraint', 'tanh', 'soft_tanh'):
    raise ValueError(f'unknown presence loss kind {kind!r}')
  pi = jnp.max(_avg_pool3(_f32(maps[..., :-1])), axis=(1, 2))  # [B, K]
  if kind == 'original':
    return 1.0 - jnp.mean(jnp.max(pi, axis=0))
  if kind == 'soft_constraint':
    top = jnp.max(pi, axis=0)
    return jnp.mean((1.0 - top) * ((1.0 - beta) * jax.lax.stop_gradient(top) + beta))
  presence = jnp.tanh(jnp.sum(pi, axis=0))
  if kind == 'tanh':
    return jnp.mean(_neg_log_clamped(presence))
  return 1.0 - jnp.mean(presence)


def border_emphasis(height: int, width: int) -> jax.Array:
  """R [height, width] = (r_i^2 + c_j^2) / max(r^2 + c^2), r and c spanning [-1, 1].

  0 at the centre, 1 at the corners: L_p0 looks for background near the border.
  """
  if height < 2 or width < 2:
    raise ValueError(f'the border map needs at least 2x2 positions, got {height}x{width}')
  rows = jnp.arange(height, dtype=jnp.float32) / (height - 1) * 2 - 1
  cols = jnp.arange(width, dtype=jnp.float32) / (width - 1) * 2 - 1
  grid = jnp.square(rows)[:, None] + jnp.square(cols)[None, :]
  return grid / jnp.max(grid)


def enforced_presence_loss(maps: jax.Array,
                           kind: EnforcedPresenceKind = 'enforced_presence') -> jax.Array:
  """L_p0: the background must be present, and for 'enforced_presence' near the image border.

  'enforced_presence' (the paper): beta_b = max over the 3x3-smoothed grid of Q_bg * R, with R
  from `border_emphasis`; the loss is BCE(beta, 1) = -mean_b max(log beta_b, -100), torch's clamp.
  The others act on the mean background mass m_b: 'log' BCE(m, 1), 'linear' mean(1 - m),
  'mse' mean((m - 1)^2).

  Args:
    maps: [B, h, w, K+1] part maps; only the background channel (last) is read.
  """
  if kind not in ('enforced_presence', 'log', 'linear', 'mse'):
    raise ValueError(f'unknown enforced presence loss kind {kind!r}')
  background = _f32(maps[..., -1])  # [B, h, w]
  if kind == 'enforced_presence':
    pooled = _avg_pool3(background)
    peak = jnp.max(pooled * border_emphasis(*pooled.shape[1:]), axis=(1, 2))
    return jnp.mean(_neg_log_clamped(peak))
  mass = jnp.mean(background, axis=(1, 2))
  if kind == 'log':
    return jnp.mean(_neg_log_clamped(mass))
  if kind == 'linear':
    return jnp.mean(1.0 - mass)
  return jnp.mean(jnp.square(mass - 1.0))


# ---------------------------------------------------------------------------
# Equivariance (L_eq): torchvision's affine, re-implemented
# ---------------------------------------------------------------------------
class AffineParams(NamedTuple):
  """One affine transform for a whole batch, in torchvision.transforms.functional.affine terms.

  angle: degrees; positive turns the content clockwise on screen (rows run down).
  translate: (tx, ty) in pixels, applied after the rotation; +tx moves content right, +ty down.
  scale: zoom about the image centre.
  """

  angle: jax.Array
  translate: tuple[jax.Array, jax.Array]
  scale: jax.Array


def random_affine_params(rng: jax.Array, image_size: int | tuple[int, int],
                         degrees: float = 90.0,
                         translate: float | tuple[float, float] = 0.11,
                         scale: tuple[float, float] = (0.8, 1.4)) -> AffineParams:
  """Draws the reference's one-per-batch affine (`generate_affine_trans_params`).

  angle ~ U(-degrees, degrees); tx = round(U(-t_x H, t_x H)) and ty = round(U(-t_y W, t_y W))
  whole pixels (the reference takes the x range from H and the y range from W; the same for
  square images); scale ~ U(scale). Rounding is half-to-even, as Python's round. Values are
  float32 scalars, traceable under jit.
  """
  height, width = _pair(image_size)
  frac_x, frac_y = _pair(translate)
  k_angle, k_tx, k_ty, k_scale = jax.random.split(rng, 4)
  max_dx, max_dy = frac_x * height, frac_y * width
  angle = jax.random.uniform(k_angle, (), jnp.float32, -degrees, degrees)
  tx = jnp.round(jax.random.uniform(k_tx, (), jnp.float32, -max_dx, max_dx))
  ty = jnp.round(jax.random.uniform(k_ty, (), jnp.float32, -max_dy, max_dy))
  zoom = jax.random.uniform(k_scale, (), jnp.float32, scale[0], scale[1])
  return AffineParams(angle, (tx, ty), zoom)


def _source_coordinates(height: int, width: int, angle: jax.Array,
                        translate: tuple[jax.Array, jax.Array] | jax.Array,
                        scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fractional source pixel (x, y), each [height, width], that every output pixel samples.

  torchvision's tensor path: the inverse affine matrix about the centre (shear 0), applied to
  pixel centres in centred coordinates, normalised by (W/2, H/2), then un-normalised by
  grid_sample(align_corners=False) as ((g + 1) W - 1) / 2. The float32 operations follow
  torchvision's order so that nearest-neighbour rounding agrees with it at ties.
  """
  rot = jnp.deg2rad(_f32(angle))
  cos, sin = jnp.cos(rot), jnp.sin(rot)
  s = _f32(scale)
  tx, ty = _f32(translate[0]), _f32(translate[1])
  m00, m01, m10, m11 = cos / s, sin / s, -sin / s, cos / s
  m02 = -m00 * tx - m01 * ty
  m12 = -m10 * tx - m11 * ty
  half_w, half_h = width * 0.5, height * 0.5
  x = (jnp.arange(width, dtype=jnp.float32) + (0.5 - half_w))[None, :]
  y = (jnp.arange(height, dtype=jnp.float32) + (0.5 - half_h))[:, None]
  gx = x * (m00 / half_w) + y * (m01 / half_w) + m02 / half_w
  gy = x * (m10 / half_h) + y * (m11 / half_h) + m12 / half_h
  return ((gx + 1) * width - 1) / 2, ((gy + 1) * height - 1) / 2


def _gather(images: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images[:, row, col] for integer [H, W] indices, and whether each index lies inside."""
  height, width = images.shape[1:3]
  inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
  values = images[:, jnp.clip(row, 0, height - 1), jnp.clip(col, 0, width - 1)]
  return values, inside


def affine_warp(images: jax.Array, angle: jax.Array | float,
                translate: tuple[jax.Array | float, jax.Array | float] | jax.Array,
                scale: jax.Array | float, method: WarpMethod = 'bilinear',
                fill: float | None = None) -> jax.Array:
  """torchvision.transforms.functional.affine(images, angle, translate, scale, shear=0) on NHWC.

  Rotation and scaling are about the image centre; positive `angle` turns the content clockwise
  on screen (torchvision's affine convention; its `rotate` is the opposite), so on a square image
  angle=90 equals np.rot90(images, k=-1, axes=(1, 2)). One transform for the whole batch; every
  parameter may be a traced scalar. `method` is grid_sample's mode ('nearest' rounds half to even).

  fill: None, torchvision's default and what the reference passes, samples outside pixels as
    zeros. A number reproduces torchvision's explicit fill: it resamples a ones-mask alongside;
    bilinear then blends out * mask + (1 - mask) * fill (so fill=0. also darkens border pixels
    that None leaves alone), nearest uses fill where the mask is < 0.5.

  Returns the warped images in the input dtype (computed in float32).
  """
  if method not in ('bilinear', 'nearest'):
    raise ValueError(f"method must be 'bilinear' or 'nearest', got {method!r}")
  height, width = images.shape[1:3]
  x, y = _source_coordinates(height, width, angle, translate, scale)
  source = _f32(images)
  if method == 'nearest':
    values, inside = _gather(source, jnp.round(y).astype(jnp.int32),
                             jnp.round(x).astype(jnp.int32))
    out = jnp.where(inside[None, :, :, None], values, 0.0)
    mask = inside.astype(jnp.float32)
  else:
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1, y0 + 1
    corners = ((y0, x0, (x1 - x) * (y1 - y)), (y0, x1, (x - x0) * (y1 - y)),
               (y1, x0, (x1 - x) * (y - y0)), (y1, x1, (x - x0) * (y - y0)))
    out = jnp.zeros(source.shape[:1] + (height, width) + source.shape[3:], jnp.float32)
    mask = jnp.zeros((height, width), jnp.float32)
    for row, col, weight in corners:
      values, inside = _gather(source, row.astype(jnp.int32), col.astype(jnp.int32))
      weight = jnp.where(inside, weight, 0.0)
      out = out + values * weight[None, :, :, None]
      mask = mask + weight
  if fill is not None:
    mask = mask[None, :, :, None]
    if method == 'nearest':
      out = jnp.where(mask < 0.5, jnp.float32(fill), out)
    else:
      out = out * mask + (1.0 - mask) * fill
  return out.astype(images.dtype)


def inverse_warp_maps(maps: jax.Array, angle: jax.Array | float,
                      translate: tuple[jax.Array | float, jax.Array | float] | jax.Array,
                      scale: jax.Array | float,
                      image_size: int | tuple[int, int]) -> jax.Array:
  """Undoes an image-level affine on part maps [B, h, w, K+1], as the reference does.

  The pixel translation is rescaled to the map grid by w / W (the reference uses the last axis
  for both tx and ty). Then two NEAREST warps with zero outside: translate by -t * w / W (angle 0,
  scale 1), then angle -angle and scale 1 / scale. The composition is not the exact inverse
  (two roundings, and content warped out of frame is lost), which the loss inherits.

  Args:
    image_size: size of the images the affine was applied to, int or (H, W).
  """
  _, image_width = _pair(image_size)
  map_width = maps.shape[2]
  shift = tuple(-(_f32(t) * map_width) / image_width for t in (translate[0], translate[1]))
  maps = affine_warp(maps, 0.0, shift, 1.0, method='nearest')
  return affine_warp(maps, -_f32(angle), (0.0, 0.0), 1.0 / _f32(scale), method='nearest')


def equivariance_loss(maps: jax.Array, maps_warped_back: jax.Array) -> jax.Array:
  """L_eq = 1 - mean over (b, k < K) of cos(vec A_bk, vec A'_bk), foreground parts only.

  `maps_warped_back` are the maps of the warped images after `inverse_warp_maps`. Cosine as torch's
  F.cosine_similarity (eps 1e-8): x/max(||x||, eps) . y/max(||y||, eps), each norm clamped apart.
  """
  batch, num_fg = maps.shape[0], maps.shape[-1] - 1
  a = _f32(maps[..., :num_fg]).reshape(batch, -1, num_fg)
  b = _f32(maps_warped_back[..., :num_fg]).reshape(batch, -1, num_fg)
  a = a / _clamped_norm(a, 1, COSINE_EPS)
  b = b / _clamped_norm(b, 1, COSINE_EPS)
  return 1.0 - jnp.mean(jnp.sum(a * b, axis=1))


# ---------------------------------------------------------------------------
# Orthogonality of the modulated part features (L_orth)
# ---------------------------------------------------------------------------
def orthogonality_loss(features: jax.Array, kind: OrthogonalityKind = 'ifam') -> jax.Array:
  """L_orth on modulated part features [B, K+1, D].

  'ifam' (the iFAM trainer's quirk, reference 14.2): each feature channel d is L2-normalised over
  the K+1 parts (eps 1e-12), giving g_d, and the loss is mean over (b, d, d') of
  (<g_d, g_d'> - delta_dd')^2 on the D x D Gram matrix. It is computed without forming that
  matrix: ||G - I||^2 = ||X X^T||^2 - 2 tr(G) + D, X the [K+1, D] normalised features.
  'parts' (PDiscoFormer): each part's D-vector is normalised and the (K+1) x (K+1) cosine
  matrix is pushed to the identity, mean((G - I)^2).
  """
  if kind not in ('ifam', 'parts'):
    raise ValueError(f"orthogonality kind must be 'ifam' or 'parts', got {kind!r}")
  x = _f32(features)
  if kind == 'parts':
    x = x / _clamped_norm(x, -1, NORMALIZE_EPS)
    gram = jnp.einsum('bkd,bld->bkl', x, x, precision=HIGHEST)
    return jnp.mean(jnp.square(gram - jnp.eye(x.shape[1], dtype=jnp.float32)))
  width = x.shape[-1]
  x = x / _clamped_norm(x, 1, NORMALIZE_EPS)
  small = jnp.einsum('bkd,bld->bkl', x, x, precision=HIGHEST)
  trace = jnp.sum(jnp.square(x), axis=(1, 2))
  per_image = jnp.sum(jnp.square(small), axis=(1, 2)) - 2.0 * trace + width
  return jnp.mean(per_image) / (width * width)


# ---------------------------------------------------------------------------
# Smoothness and sharpness of the maps (L_tv, L_ent, L_conc)
# ---------------------------------------------------------------------------
def total_variation_loss(maps: jax.Array) -> jax.Array:
  """L_tv: summed |vertical| + |horizontal| neighbour differences of all K+1 maps / (B h w).

  Not divided by K+1, as the reference. B is this call's batch (the reference caches the first
  batch's B h w, the same thing with drop_last).
  """
  a = _f32(maps)
  batch, height, width = a.shape[:3]
  vertical = jnp.sum(jnp.abs(a[:, 1:] - a[:, :-1]))
  horizontal = jnp.sum(jnp.abs(a[:, :, 1:] - a[:, :, :-1]))
  return (vertical + horizontal) / (batch * height * width)


def pixel_entropy_loss(maps: jax.Array) -> jax.Array:
  """L_ent: mean over pixels of the entropy of the part distribution, pushing hard assignments.

  As torch's Categorical(probs).entropy(): probs renormalised over K+1, and -sum p log p with
  log taken of p clamped to [eps, 1 - eps], eps = float32 machine epsilon (so a one-hot pixel
  gives ~1.2e-7, not 0, and p = 0 contributes nothing).
  """
  p = _f32(maps)
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  eps = jnp.finfo(jnp.float32).eps
  log_p = jnp.log(jnp.clip(p, eps, 1.0 - eps))
  return jnp.mean(-jnp.sum(p * log_p, axis=-1))


def concentration_loss(maps: jax.Array) -> jax.Array:
  """L_conc (weight 0 in the paper): map-weighted squared distance of each part to its centroid.

  Centroid (c_r, c_c) = sum_u A(u) (i, j) / sg(sum_u A(u)); the loss is the mean over
  (b, k < K, i, j) of A(i, j) [((c_r - i) / w)^2 + ((c_c - j) / h)^2] (row offsets over the
  width and column offsets over the height, as the reference). A part with no mass at all in an
  image contributes 0 (the reference would give NaN).
  """
  a = _f32(maps[..., :-1])
  _, height, width, _ = a.shape
  rows = jnp.arange(height, dtype=jnp.float32)[:, None, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, :, None]
  mass = jax.lax.stop_gradient(jnp.sum(a, axis=(1, 2)))  # [B, K]
  mass = jnp.maximum(mass, jnp.finfo(jnp.float32).tiny)
  centre_r = jnp.sum(a * rows, axis=(1, 2)) / mass
  centre_c = jnp.sum(a * cols, axis=(1, 2)) / mass
  spread = (jnp.square((centre_r[:, None, None] - rows) / width)
            + jnp.square((centre_c[:, None, None] - cols) / height))
  return jnp.mean(spread * a)
