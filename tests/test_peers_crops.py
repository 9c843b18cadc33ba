"""A²'s greedy crops against brute force and independently computed boxes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifam_jax.peers import attention, crops

M = 224


def np_box_sums(a: np.ndarray, s: int) -> np.ndarray:
  """Explicit double sum in float64."""
  p = a.shape[0] - s + 1
  return np.array([[a[y:y + s, x:x + s].sum() for x in range(p)] for y in range(p)])


def np_free(boxes, p: int, s: int) -> np.ndarray:
  y, x = np.arange(p)[:, None], np.arange(p)[None]
  free = np.ones((p, p), bool)
  for yj, xj, sj in boxes:
    free &= ~((y < yj + sj) & (yj < y + s) & (x < xj + sj) & (xj < x + s))
  return free


def np_free_sums(a: np.ndarray, boxes, s: int) -> np.ndarray:
  """float64 box sums of the positions disjoint from `boxes`, -inf elsewhere."""
  a = np.asarray(a, np.float64)
  c = np.pad(a, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
  sums = c[s:, s:] - c[:-s, s:] - c[s:, :-s] + c[:-s, :-s]
  return np.where(np_free(boxes, sums.shape[0], s), sums, -np.inf)


def np_greedy(a: np.ndarray, sizes) -> list[tuple[int, int, int]]:
  """The definition of A² App. B in float64: first maximum in raster order."""
  boxes = []
  for s in sizes:
    p = a.shape[0] - s + 1
    i = int(np.argmax(np_free_sums(a, boxes, s)))
    boxes.append((i // p, i % p, s))
  return boxes


def bump(cy, cx, sigma, height=1.0):
  """Gaussian bump on pixel centres i + 0.5."""
  c = np.arange(M) + 0.5
  return height * np.exp(-((c[:, None] - cy)**2 + (c[None] - cx)**2) / (2 * sigma**2))


def greedy(a, sizes, tie_break='first'):
  a = jnp.asarray(np.asarray(a)[None], jnp.float32)
  return [tuple(map(int, r)) for r in np.asarray(crops.greedy_crops(a, sizes, tie_break))[0]]


def smooth_maps(n, seed):
  rng = np.random.default_rng(seed)
  return attention.upsample(jnp.asarray(rng.random((n, 16, 16)), jnp.float32), M)


# ----------------------------------------------------------------------------
# Box sums (1.6-1)
# ----------------------------------------------------------------------------
def test_box_sums_match_the_explicit_double_sum():
  a = np.random.default_rng(0).random((2, 20, 20))
  for s in (1, 5, 20):
    got = np.asarray(crops.box_sums(jnp.asarray(a, jnp.float32), s))
    assert got.shape == (2, 21 - s, 21 - s) and got.dtype == np.float32
    for b in range(2):
      np.testing.assert_allclose(got[b], np_box_sums(a[b], s), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match='box size'):
    crops.box_sums(jnp.zeros((1, 20, 20)), 21)
  with pytest.raises(ValueError, match=r'\[B, M, M\]'):
    crops.box_sums(jnp.zeros((20, 20)), 5)


# ----------------------------------------------------------------------------
# Greedy crops (1.6-2, 1.6-3)
# ----------------------------------------------------------------------------
def test_two_gaussian_bumps_give_the_computed_boxes():
  # A bump centred on the pixel edge c gets the box starting at c - s/2 (computed independently).
  a = bump(121, 61, 10) + bump(40, 180, 6, 0.5)
  assert greedy(a, [64, 32]) == [(89, 29, 64), (24, 164, 32)]
  # Prefix consistency: the first box alone is the one-crop answer.
  assert greedy(a, [64]) == [(89, 29, 64)]


def test_adjacent_bumps_push_the_second_crop_against_the_first():
  # The published adjacent-bumps map is not given, so its boxes ((68, 88, 64), (84, 56, 32))
  # cannot be reproduced. Here a small second bump sits at (121, 104): too light to pull the
  # first crop off (89, 29), and its own best box (105, 88) would overlap that crop, so the
  # second crop is pushed right to the first free column, 29 + 64 = 93, still centred in y.
  a = bump(121, 61, 10) + bump(121, 104, 3, 0.2)
  assert np_greedy(a, [64, 32]) == [(89, 29, 64), (105, 93, 32)]
  assert greedy(a, [64, 32]) == [(89, 29, 64), (105, 93, 32)]


def test_random_smooth_maps_give_disjoint_in_image_boxes_that_are_greedy_optimal():
  maps = smooth_maps(100, seed=0)
  sizes = [64, 32, 32]
  boxes = np.asarray(crops.greedy_crops(maps, sizes))
  assert boxes.shape == (100, 3, 3) and boxes.dtype == np.int32
  np.testing.assert_array_equal(boxes[..., 2], np.broadcast_to(sizes, (100, 3)))
  assert np.all(boxes[..., :2] >= 0) and np.all(boxes[..., :2] + boxes[..., 2:] <= M)
  for i, j in [(0, 1), (0, 2), (1, 2)]:
    (yi, xi, si), (yj, xj, sj) = boxes[:, i].T, boxes[:, j].T
    overlap_y = (yi < yj + sj) & (yj < yi + si)
    overlap_x = (xi < xj + sj) & (xj < xi + si)
    assert not np.any(overlap_y & overlap_x)
  # And every box is the float64 greedy answer.
  for a, rows in zip(np.asarray(maps), boxes):
    assert [tuple(r) for r in rows.tolist()] == np_greedy(a, sizes)


def test_greedy_crops_under_jit_match_the_eager_result():
  maps = smooth_maps(4, seed=1)
  eager = crops.greedy_crops(maps, [64, 32], 'centroid')
  jitted = jax.jit(lambda a: crops.greedy_crops(a, [64, 32], 'centroid'))(maps)
  np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


# ----------------------------------------------------------------------------
# Ties (1.6-4)
# ----------------------------------------------------------------------------
def test_tie_rule_first():
  assert greedy(np.ones((M, M)), [64, 32]) == [(0, 0, 64), (0, 64, 32)]
  # A flat map whose value fp32 cannot hold exactly: rounding must not pick the box.
  assert greedy(np.full((M, M), 1 / M**2), [64, 32]) == [(0, 0, 64), (0, 64, 32)]
  peak = np.zeros((M, M))
  peak[150, 90] = 1
  assert greedy(peak, [64]) == [(87, 27, 64)]  # the peak in the box's bottom-right corner
  plateau = np.zeros((M, M))
  plateau[150:152, 90:92] = 1
  assert greedy(plateau, [64]) == [(88, 28, 64)]


def test_tie_rule_centroid():
  plateau = np.zeros((M, M))
  plateau[150:152, 90:92] = 1
  # Centroid (151, 91) with pixel i covering [i, i+1): box centre y + 32 = 151, x + 32 = 91.
  assert greedy(plateau, [64], 'centroid') == [(119, 59, 64)]
  # Uniform map: the first box centred on (112, 112); the attention left outside it is still
  # centred there, and the closest free 32-box centres lie 48 px away on four sides, of which
  # the one above comes first in raster order.
  assert greedy(np.ones((M, M)), [64, 32], 'centroid') == [(80, 80, 64), (48, 96, 32)]


# ----------------------------------------------------------------------------
# Bad input and no room (1.6-5)
# ----------------------------------------------------------------------------
def test_crops_that_cannot_fit_raise_before_any_work():
  a = jnp.ones((1, M, M))
  with pytest.raises(ValueError, match='cannot all fit'):
    crops.greedy_crops(a, [224, 32])
  with pytest.raises(ValueError, match='non-increasing'):
    crops.greedy_crops(a, [32, 64])
  with pytest.raises(ValueError, match='must lie in'):
    crops.greedy_crops(a, [256])
  with pytest.raises(ValueError, match='tie_break'):
    crops.greedy_crops(a, [64], 'middle')
  with pytest.raises(ValueError, match=r'\[B, M, M\]'):
    crops.greedy_crops(jnp.ones((1, M, M - 1)), [64])


def test_crops_that_fit_by_area_but_not_after_greedy_placement_raise():
  # Four 112-boxes tile the image, so a uniform map fits them all ...
  assert greedy(np.ones((M, M)), [112] * 4) == [(0, 0, 112), (0, 112, 112), (112, 0, 112),
                                                (112, 112, 112)]
  # ... but a central blob puts the first one in the middle, leaving no room for the second.
  blob = np.zeros((M, M))
  blob[100:124, 100:124] = 1
  with pytest.raises(ValueError, match='no room left for crop 1'):
    greedy(blob, [112] * 4)
  with pytest.raises(Exception, match='no room left for crop 1'):
    jax.jit(lambda a: crops.greedy_crops(a, [112] * 4))(jnp.asarray(blob[None])).block_until_ready()


# ----------------------------------------------------------------------------
# Cutting crops (1.6-9) and the control boxes
# ----------------------------------------------------------------------------
def coordinate_image(batch, side):
  """Channel 0 holds the row, channel 1 the column, channel 2 the image index."""
  y, x = np.meshgrid(np.arange(side), np.arange(side), indexing='ij')
  img = np.stack([np.broadcast_to(y, (batch, side, side)), np.broadcast_to(x, (batch, side, side)),
                  np.broadcast_to(np.arange(batch)[:, None, None], (batch, side, side))], -1)
  return jnp.asarray(img, jnp.float32)


def test_crop_resize_geometry_on_a_coordinate_image():
  out, sizes = 224, [64, 32]
  boxes = np.array([[[10, 100, 64], [150, 20, 32]], [[0, 0, 64], [192, 192, 32]]], np.int32)
  got = np.asarray(crops.crop_resize(coordinate_image(2, M), jnp.asarray(boxes), sizes, out))
  assert got.shape == (2, 2, out, out, 3) and got.dtype == np.float32
  i = np.arange(out)
  for b in range(2):
    for k, s in enumerate(sizes):
      y0, x0, _ = boxes[b, k]
      # Half-pixel centres: output pixel i samples source (i + 0.5) s / out - 0.5, clamped.
      u = np.clip((i + 0.5) * s / out - 0.5, 0, s - 1)
      np.testing.assert_allclose(got[b, k, :, :, 0], np.broadcast_to((y0 + u)[:, None], (out, out)),
                                 atol=1e-3)
      np.testing.assert_allclose(got[b, k, :, :, 1], np.broadcast_to((x0 + u)[None], (out, out)),
                                 atol=1e-3)
      np.testing.assert_allclose(got[b, k, :, :, 2], b, atol=1e-5)
      assert np.allclose(got[b, k, 0, 0, :2], [y0, x0], atol=1e-3)
      assert np.allclose(got[b, k, -1, -1, :2], [y0 + s - 1, x0 + s - 1], atol=1e-3)
      centre = got[b, k, out // 2 - 1:out // 2 + 1, out // 2 - 1:out // 2 + 1, :2].mean((0, 1))
      assert np.allclose(centre, [y0 + (s - 1) / 2, x0 + (s - 1) / 2], atol=1e-3)


def test_crop_resize_checks_its_boxes():
  images = jnp.zeros((2, M, M, 3), jnp.uint8)
  boxes = jnp.asarray([[[0, 0, 64]], [[5, 5, 64]]], jnp.int32)
  assert crops.crop_resize(images, boxes, [64], 32).dtype == jnp.float32
  with pytest.raises(ValueError, match='does not match sizes'):
    crops.crop_resize(images, boxes, [32], 32)
  with pytest.raises(ValueError, match=r'boxes must be \[2, 2, 3\]'):
    crops.crop_resize(images, boxes, [64, 32], 32)
  with pytest.raises(ValueError, match='outside'):
    crops.crop_resize(images, jnp.asarray([[[0, 170, 64]], [[0, 0, 64]]]), [64], 32)
  with pytest.raises(ValueError, match='method'):
    crops.crop_resize(images, boxes, [64], 32, method='area')


def test_center_and_random_boxes():
  np.testing.assert_array_equal(np.asarray(crops.center_boxes(3, 112, 24)),
                                np.tile([[[44, 44, 24]]], (3, 1, 1)))
  assert crops.center_boxes(1, 224, 128).dtype == jnp.int32
  rnd = np.asarray(crops.random_boxes(jax.random.key(0), 500, 112, 24))
  assert rnd.shape == (500, 1, 3) and rnd.dtype == np.int32
  assert np.all(rnd[..., 2] == 24)
  assert rnd[..., :2].min() == 0 and rnd[..., :2].max() == 112 - 24
  assert len(np.unique(rnd[:, 0, 0])) > 50
  again = crops.random_boxes(jax.random.key(0), 500, 112, 24)
  np.testing.assert_array_equal(rnd, np.asarray(again))
  with pytest.raises(ValueError, match='size'):
    crops.center_boxes(1, 112, 128)
