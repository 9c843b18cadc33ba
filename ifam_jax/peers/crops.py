"""A²'s greedy crops: the square boxes of an attention map with the most mass, and their controls.

A box is an int32 row (y, x, size): its top-left pixel and its side, in pixels of the M x M
image the attention map was upsampled to. `greedy_crops` places the sizes largest first; each
box maximises the attention summed over it among all integer positions that leave it disjoint
from the boxes before it (A² App. B). `crop_resize` cuts the boxes out of the image and resizes
them for the embedding model; `center_boxes` and `random_boxes` are the centre-crop and
random-crop controls of A²'s tables, in the same layout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

TIE_BREAKS = ('first', 'centroid')
RESIZE_METHODS = ('nearest', 'bilinear', 'bicubic', 'lanczos3', 'lanczos5')


# ----------------------------------------------------------------------------
# Box sums
# ----------------------------------------------------------------------------
def box_sums(a: jax.Array, s: int) -> jax.Array:
  """Sum of `a` [B, M, M] over every s x s box: [B, M-s+1, M-s+1], [b, y, x] at top-left (y, x).

  Two fp32 sliding-window sums, along rows then columns: O(s) per box, each sum rounded
  relative to its own size, and equal inputs give bitwise-equal sums, so ties stay ties. An
  integral image costs O(1) per box, but its entries grow to the map's total mass: on 224 x 224
  maps its rounding turned a flat map's ties into a winner in the middle, and moved small crops
  in low-attention regions by pixels.
  """
  if a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f'attention must be [B, M, M], got shape {a.shape}')
  if not 1 <= s <= a.shape[1]:
    raise ValueError(f'box size s={s} must lie in [1, {a.shape[1]}]')
  rows = jax.lax.reduce_window(a.astype(jnp.float32), 0.0, jax.lax.add, (1, 1, s), (1, 1, 1),
                               'VALID')
  return jax.lax.reduce_window(rows, 0.0, jax.lax.add, (1, s, 1), (1, 1, 1), 'VALID')


# ----------------------------------------------------------------------------
# Greedy crops
# ----------------------------------------------------------------------------
def _check_sizes(sizes: Sequence[int], m: int) -> tuple[int, ...]:
  sizes = tuple(int(s) for s in sizes)
  if not sizes:
    raise ValueError('sizes must name at least one crop')
  if any(not 1 <= s <= m for s in sizes):
    raise ValueError(f'sizes {sizes} must lie in [1, {m}] for a {m}x{m} attention map')
  if any(a < b for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f'sizes {sizes} must be non-increasing (crops are placed largest first)')
  if sum(s * s for s in sizes) > m * m:
    raise ValueError(f'sizes {sizes}: the crops cannot all fit in a {m}x{m} image (their areas '
                     f'add up to {sum(s * s for s in sizes)} > {m * m})')
  return sizes


def _outside_boxes(boxes: list[jax.Array], m: int) -> jax.Array:
  """[B, M, M] True where a pixel lies in none of `boxes` (each [B, 3])."""
  r = jnp.arange(m)
  out = jnp.ones((boxes[0].shape[0], m, m), bool)
  for box in boxes:
    y, x, s = (box[:, i, None] for i in range(3))
    rows, cols = (r >= y) & (r < y + s), (r >= x) & (r < x + s)
    out &= ~(rows[:, :, None] & cols[:, None, :])
  return out


def _centroid(a: jax.Array, boxes: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Centre of mass [B], [B] of the attention outside `boxes` (pixel i covers [i, i+1)).

  The image centre where that attention has no mass.
  """
  b, m, _ = a.shape
  w = a if not boxes else jnp.where(_outside_boxes(boxes, m), a, 0.0)
  mass = w.sum(axis=(1, 2))
  c = jnp.arange(m, dtype=jnp.float32) + 0.5
  cy = jnp.einsum('byx,y->b', w, c) / jnp.where(mass > 0, mass, 1.0)
  cx = jnp.einsum('byx,x->b', w, c) / jnp.where(mass > 0, mass, 1.0)
  return jnp.where(mass > 0, cy, m / 2), jnp.where(mass > 0, cx, m / 2)


@functools.partial(jax.jit, static_argnames=('sizes', 'tie_break'))
def _greedy(attention: jax.Array, sizes: tuple[int, ...],
            tie_break: str) -> tuple[jax.Array, jax.Array]:
  """Boxes int32 [B, n, 3] and whether each crop found a free position, bool [B, n]."""
  a = attention.astype(jnp.float32)
  b, m, _ = a.shape
  boxes, found = [], []
  for s in sizes:
    p = m - s + 1
    y, x = jnp.arange(p)[None, :, None], jnp.arange(p)[None, None, :]
    free = jnp.ones((b, p, p), bool)
    for box in boxes:
      yj, xj, sj = (box[:, i, None, None] for i in range(3))
      free &= ~((y < yj + sj) & (yj < y + s) & (x < xj + sj) & (xj < x + s))
    sums = jnp.where(free, box_sums(a, s), -jnp.inf)
    best = sums.max(axis=(1, 2), keepdims=True)
    if tie_break == 'first':
      index = jnp.argmax(sums.reshape(b, -1), axis=1)
    else:
      cy, cx = _centroid(a, boxes)
      dist = (y + s / 2 - cy[:, None, None])**2 + (x + s / 2 - cx[:, None, None])**2
      index = jnp.argmin(jnp.where(free & (sums == best), dist, jnp.inf).reshape(b, -1), axis=1)
    boxes.append(jnp.stack([index // p, index % p, jnp.full_like(index, s)], -1).astype(jnp.int32))
    found.append(free.any(axis=(1, 2)))
  return jnp.stack(boxes, axis=1), jnp.stack(found, axis=1)


def _raise_if_no_room(sizes: tuple[int, ...], found: np.ndarray) -> None:
  if not np.all(found):
    image, crop = np.argwhere(~np.asarray(found))[0]
    raise ValueError(f'sizes {sizes}: no room left for crop {crop} (size {sizes[crop]}) of image '
                     f'{image} once the larger crops were placed; use fewer or smaller crops')


def greedy_crops(attention: jax.Array, sizes: Sequence[int],
                 tie_break: str = 'first') -> jax.Array:
  """Greedy non-overlapping crops of an attention map [B, M, M] -> int32 [B, n, 3] (y, x, size).

  Crop k maximises the attention summed over its box among all integer positions whose box is
  disjoint from crops 1..k-1 (A² App. B), so the first k boxes of a size list are the k-crop
  answer. Ties are box sums exactly equal in fp32 (`box_sums` keeps equal sums equal).

  Args:
    attention: [B, M, M] attention of an M x M image (pixel i covers [i, i+1)).
    sizes: crop sides in pixels, non-increasing; they are placed in this order.
    tie_break: 'first' (default; docs/peers.md) takes the first tied box in raster order,
      which puts a point peak at the bottom-right corner of its box. 'centroid' takes the tied
      box whose centre is closest to the centre of mass of the attention outside the earlier
      crops (the image centre if none is left).

  Raises:
    ValueError: on bad sizes, or when the crops cannot all fit. Sizes whose areas exceed the
      image are refused before any work. Whether the others fit depends on where the earlier
      crops landed, so every result is checked: on the host when called eagerly, and through a
      host callback under `jit`, where the same ValueError surfaces as a runtime error when the
      computation runs.
  """
  if attention.ndim != 3 or attention.shape[1] != attention.shape[2]:
    raise ValueError(f'attention must be [B, M, M], got shape {attention.shape}')
  if tie_break not in TIE_BREAKS:
    raise ValueError(f'tie_break must be one of {TIE_BREAKS}, got {tie_break!r}')
  sizes = _check_sizes(sizes, attention.shape[1])
  boxes, found = _greedy(attention, sizes=sizes, tie_break=tie_break)
  if isinstance(found, jax.core.Tracer):
    jax.debug.callback(functools.partial(_raise_if_no_room, sizes), found)
  else:
    _raise_if_no_room(sizes, np.asarray(found))
  return boxes


# ----------------------------------------------------------------------------
# Cutting crops out, and the control boxes
# ----------------------------------------------------------------------------
def crop_resize(images: jax.Array, boxes: jax.Array, sizes: Sequence[int], out: int,
                method: str = 'bilinear') -> jax.Array:
  """Cuts each box out of `images` [B, S, S, C] and resizes it: [B, n, out, out, C].

  Args:
    images: the images the boxes index (docs/peers.md: the M x M input image, not the original).
      Integer images are resized in fp32; floating ones keep their dtype.
    boxes: int32 [B, n, 3] (y, x, size) as from `greedy_crops`.
    sizes: the n crop sides, static (a box's own size column must equal them; checked when the
      boxes are concrete).
    out: output side.
    method: `jax.image.resize` method; 'bilinear' (default; docs/peers.md) samples at
      half-pixel centres, as torch's `align_corners=False`. Shrinking is antialiased
      (`jax.image.resize`'s default); A² only enlarges.
  """
  sizes = tuple(int(s) for s in sizes)
  if images.ndim != 4 or images.shape[1] != images.shape[2]:
    raise ValueError(f'images must be [B, S, S, C], got shape {images.shape}')
  b, side, _, c = images.shape
  if boxes.shape != (b, len(sizes), 3):
    raise ValueError(f'boxes must be [{b}, {len(sizes)}, 3] for {len(sizes)} sizes, got shape '
                     f'{boxes.shape}')
  if any(not 1 <= s <= side for s in sizes):
    raise ValueError(f'sizes {sizes} must lie in [1, {side}] for {side}x{side} images')
  if out < 1:
    raise ValueError(f'out must be positive, got {out}')
  if method not in RESIZE_METHODS:
    raise ValueError(f'method must be one of {RESIZE_METHODS}, got {method!r}')
  if not isinstance(boxes, jax.core.Tracer):
    host = np.asarray(boxes)
    if np.any(host[..., 2] != np.asarray(sizes)):
      raise ValueError(f'boxes: the size column {np.unique(host[..., 2]).tolist()} does not '
                       f'match sizes {sizes}')
    if np.any(host[..., :2] < 0) or np.any(host[..., :2] + host[..., 2:] > side):
      raise ValueError(f'boxes: some box reaches outside the {side}x{side} images')
  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32

  def cut(image, y0, x0, s):
    return jax.lax.dynamic_slice(image, (y0, x0, 0), (s, s, c))

  crops = []
  for k, s in enumerate(sizes):
    patch = jax.vmap(functools.partial(cut, s=s))(images, boxes[:, k, 0], boxes[:, k, 1])
    crops.append(jax.image.resize(patch.astype(dtype), (b, out, out, c), method=method))
  return jnp.stack(crops, axis=1)


def _check_box(image_size: int, size: int) -> None:
  if not 1 <= size <= image_size:
    raise ValueError(f'size {size} must lie in [1, image_size={image_size}]')


def center_boxes(batch: int, image_size: int, size: int) -> jax.Array:
  """The centre-crop control: one size x size box in the middle of every image, [B, 1, 3].

  An odd margin leaves the extra pixel below and to the right.
  """
  _check_box(image_size, size)
  start = (image_size - size) // 2
  return jnp.broadcast_to(jnp.asarray([start, start, size], jnp.int32), (batch, 1, 3))


def random_boxes(rng: jax.Array, batch: int, image_size: int, size: int) -> jax.Array:
  """The random-crop control: a size x size box at a uniform position per image, [B, 1, 3]."""
  _check_box(image_size, size)
  corner = jax.random.randint(rng, (batch, 1, 2), 0, image_size - size + 1, dtype=jnp.int32)
  return jnp.concatenate([corner, jnp.full((batch, 1, 1), size, jnp.int32)], axis=-1)
