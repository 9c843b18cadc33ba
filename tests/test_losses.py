"""Tests of ifam_jax.losses against independent NumPy computations written out here.

The NumPy references use loops and the closed forms of the spec (section 5), not the JAX code:
e.g. the warp reference maps each output pixel straight to its source pixel with a rotation about
((W-1)/2, (H-1)/2) in float64, where losses.py follows torchvision's normalised-grid arithmetic.
Exact torchvision parity comes from tests/fixtures/affine_fixture.npz (see its script).
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifam_jax import losses

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'affine_fixture.npz'
B, H, W, K = 3, 6, 6, 2

# Jitted, so each shape compiles once: eager mode compiles every primitive apart, which is slow.
# Eager calls are still covered where a test names losses.* directly.
warp = jax.jit(losses.affine_warp, static_argnames=('method', 'fill'))
inverse_warp_maps = jax.jit(losses.inverse_warp_maps, static_argnames=('image_size',))
presence_loss = jax.jit(losses.presence_loss, static_argnames=('kind',))
enforced_presence_loss = jax.jit(losses.enforced_presence_loss, static_argnames=('kind',))
equivariance_loss = jax.jit(losses.equivariance_loss)
orthogonality_loss = jax.jit(losses.orthogonality_loss, static_argnames=('kind',))
total_variation_loss = jax.jit(losses.total_variation_loss)
pixel_entropy_loss = jax.jit(losses.pixel_entropy_loss)
concentration_loss = jax.jit(losses.concentration_loss)


def random_maps(seed: int, shape: tuple[int, ...] = (B, H, W, K + 1),
                sharpness: float = 2.0) -> np.ndarray:
  logits = sharpness * np.random.default_rng(seed).normal(size=shape)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------
def np_avg_pool3(x: np.ndarray) -> np.ndarray:
  """[B, h, w, ...] -> [B, h-2, w-2, ...], loops over windows."""
  out = np.zeros((x.shape[0], x.shape[1] - 2, x.shape[2] - 2) + x.shape[3:], np.float64)
  for i in range(out.shape[1]):
    for j in range(out.shape[2]):
      out[:, i, j] = x[:, i:i + 3, j:j + 3].mean(axis=(1, 2))
  return out


def np_bce_one(x: np.ndarray) -> float:
  return float(np.mean([-max(math.log(v), -100.0) if v > 0 else 100.0 for v in np.ravel(x)]))


def np_source(shape: tuple[int, int], angle: float, translate: tuple[float, float],
              scale: float) -> tuple[np.ndarray, np.ndarray]:
  """Source (x, y) of each output pixel: rotate by -angle about the pixel-centre centre, y down."""
  height, width = shape
  theta = math.radians(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2
  xs, ys = np.zeros(shape), np.zeros(shape)
  for i in range(height):
    for j in range(width):
      u, v = j - cx - translate[0], i - cy - translate[1]
      xs[i, j] = (math.cos(theta) * u + math.sin(theta) * v) / scale + cx
      ys[i, j] = (-math.sin(theta) * u + math.cos(theta) * v) / scale + cy
  return xs, ys


def np_affine(img: np.ndarray, angle: float, translate: tuple[float, float], scale: float,
              method: str = 'bilinear', fill: float | None = None) -> np.ndarray:
  """torchvision's affine on NHWC float64, by loops (zeros outside; optional torchvision fill)."""
  _, height, width, _ = img.shape
  xs, ys = np_source((height, width), angle, translate, scale)
  out = np.zeros(img.shape)
  mask = np.zeros((height, width))
  for i in range(height):
    for j in range(width):
      x, y = xs[i, j], ys[i, j]
      if method == 'nearest':
        taps = ((int(np.rint(y)), int(np.rint(x)), 1.0),)
      else:
        x0, y0 = math.floor(x), math.floor(y)
        taps = ((y0, x0, (x0 + 1 - x) * (y0 + 1 - y)), (y0, x0 + 1, (x - x0) * (y0 + 1 - y)),
                (y0 + 1, x0, (x0 + 1 - x) * (y - y0)), (y0 + 1, x0 + 1, (x - x0) * (y - y0)))
      for r, c, weight in taps:
        if 0 <= r < height and 0 <= c < width:
          out[:, i, j] += weight * img[:, r, c]
          mask[i, j] += weight
  if fill is not None:
    m = mask[None, :, :, None]
    out = np.where(m < 0.5, fill, out) if method == 'nearest' else out * m + (1 - m) * fill
  return out


def near_tie(coord: np.ndarray, tol: float = 1e-4) -> np.ndarray:
  return np.abs(coord - np.floor(coord) - 0.5) < tol


def np_inverse_warp(maps: np.ndarray, angle: float, translate: tuple[float, float], scale: float,
                    image_size: int) -> np.ndarray:
  shift = tuple(-t * maps.shape[2] / image_size for t in translate)
  back = np_affine(maps, 0.0, shift, 1.0, 'nearest')
  return np_affine(back, -angle, (0.0, 0.0), 1.0 / scale, 'nearest')


def np_cosine(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> float:
  return float(x @ y / (max(np.linalg.norm(x), eps) * max(np.linalg.norm(y), eps)))


def np_equivariance(a: np.ndarray, b: np.ndarray) -> float:
  cos = [np_cosine(a[i, ..., k].ravel().astype(np.float64), b[i, ..., k].ravel().astype(np.float64))
         for i in range(a.shape[0]) for k in range(a.shape[-1] - 1)]
  return 1.0 - float(np.mean(cos))


# ---------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------
def test_cross_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  logits = (50.0 * rng.normal(size=(4, 7))).astype(np.float32)
  labels = np.array([0, 3, 6, 2])
  expected = np.mean([np.log(np.sum(np.exp(row.astype(np.float64) - row.max()))) + row.max()
                      - row[y] for row, y in zip(logits, labels)])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)
  assert losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32
  # Weight 0 drops an example: equal to the mean over the others.
  per_example = [np.log(np.sum(np.exp(row.astype(np.float64) - row.max()))) + row.max() - row[y]
                 for row, y in zip(logits, labels)]
  weighted = losses.cross_entropy(logits, labels, np.array([1, 0, 1, 1]))
  np.testing.assert_allclose(weighted, np.mean([per_example[i] for i in (0, 2, 3)]), rtol=1e-6)
  assert losses.cross_entropy(logits, labels, np.zeros(4)) == 0.0


# ---------------------------------------------------------------------------
# Presence losses
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['original', 'soft_constraint', 'tanh', 'soft_tanh'])
def test_presence_loss_matches_numpy(kind):
  maps = random_maps(1)
  pi = np_avg_pool3(maps[..., :K]).max(axis=(1, 2))  # [B, K]
  top, total = pi.max(axis=0), np.tanh(pi.sum(axis=0))
  expected = {
      'original': 1 - top.mean(),
      'soft_constraint': np.mean((1 - top) * (0.9 * top + 0.1)),
      'tanh': np_bce_one(total),
      'soft_tanh': 1 - total.mean(),
  }[kind]
  np.testing.assert_allclose(presence_loss(maps, kind), expected, rtol=1e-6, atol=1e-7)


def test_presence_loss_zero_iff_every_part_is_full_somewhere():
  maps = np.zeros((B, H, W, K + 1), np.float32)
  maps[..., K] = 1.0
  maps[0] = 0.0
  maps[0, ..., 0] = 1.0  # part 0 everywhere in image 0
  maps[2, 1:4, 2:5] = [0.0, 1.0, 0.0]  # part 1 on one 3x3 block of image 2
  assert float(presence_loss(maps)) == 0.0
  maps[2, 1, 2] = [0.0, 0.1, 0.9]  # that block is no longer full: the loss must notice
  np.testing.assert_allclose(presence_loss(maps), (1 - 8.1 / 9) / K, rtol=1e-5)


def test_presence_soft_constraint_stops_the_gradient_of_its_weight():
  # K = 1: soft = (1 - top) * c with c = 0.9 sg(top) + 0.1, so d soft = c * d original.
  maps = random_maps(2, (B, H, W, 2))
  top = np_avg_pool3(maps[..., :1]).max()
  grad_soft = jax.grad(lambda m: presence_loss(m, 'soft_constraint'))(maps)
  grad_orig = jax.grad(presence_loss)(maps)
  np.testing.assert_allclose(grad_soft, (0.9 * top + 0.1) * grad_orig, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('kind', ['enforced_presence', 'log', 'linear', 'mse'])
def test_enforced_presence_matches_numpy(kind):
  maps = random_maps(3, (B, 7, 6, K + 1))
  bg = maps[..., K].astype(np.float64)
  if kind == 'enforced_presence':
    pooled = np_avg_pool3(bg)  # [B, 5, 4]
    hp, wp = pooled.shape[1:]
    r = np.array([[((2 * i / (hp - 1) - 1) ** 2 + (2 * j / (wp - 1) - 1) ** 2) / 2
                   for j in range(wp)] for i in range(hp)])
    expected = np_bce_one((pooled * r).max(axis=(1, 2)))
  else:
    mass = bg.mean(axis=(1, 2))
    expected = {'log': np_bce_one(mass), 'linear': np.mean(1 - mass),
                'mse': np.mean((mass - 1) ** 2)}[kind]
  np.testing.assert_allclose(enforced_presence_loss(maps, kind), expected, rtol=1e-6)


def test_enforced_presence_wants_background_at_the_border():
  maps = np.zeros((2, 7, 7, K + 1), np.float32)
  maps[..., 0] = 1.0
  maps[0, :3, :3] = [0.0, 0.0, 1.0]  # background fills a corner window: beta = 1
  maps[1, 2:5, 2:5] = [0.0, 0.0, 1.0]  # background only at the centre, where R is small
  per_image = [float(enforced_presence_loss(maps[i:i + 1])) for i in range(2)]
  assert per_image[0] == pytest.approx(0.0, abs=1e-6)
  assert per_image[1] > 1.0
  no_background = np.zeros_like(maps)
  no_background[..., 0] = 1.0
  assert float(enforced_presence_loss(no_background)) == pytest.approx(100.0)  # clamp


def test_border_emphasis_values():
  r = np.asarray(losses.border_emphasis(5, 5))
  assert r[2, 2] == 0.0 and r[0, 2] == 0.5 and r[2, 4] == 0.5
  np.testing.assert_array_equal(r[[0, 0, 4, 4], [0, 4, 0, 4]], 1.0)


# ---------------------------------------------------------------------------
# Affine warp (torchvision semantics)
# ---------------------------------------------------------------------------
def test_warp_angle_90_is_a_clockwise_quarter_turn():
  img = np.random.default_rng(4).random((2, 5, 5, 3)).astype(np.float32)
  for method, atol in (('bilinear', 1e-5), ('nearest', 0.0)):
    out = np.asarray(warp(img, 90.0, (0, 0), 1.0, method))
    np.testing.assert_allclose(out, np.rot90(img, k=-1, axes=(1, 2)), atol=atol)
    back = np.asarray(warp(img, -90.0, (0, 0), 1.0, method))
    np.testing.assert_allclose(back, np.rot90(img, k=1, axes=(1, 2)), atol=atol)
  first_row = np.asarray(warp(img, 90.0, (0, 0), 1.0, 'nearest'))[:, :, -1]
  np.testing.assert_array_equal(first_row, img[:, 0])  # the top row ends up as the right column


def test_warp_integer_translation_is_a_shift():
  img = np.random.default_rng(5).random((2, 6, 7, 2)).astype(np.float32)
  expected = np.zeros_like(img)
  expected[:, 1:, :5] = img[:, :-1, 2:]  # tx = -2 (left), ty = +1 (down)
  np.testing.assert_array_equal(warp(img, 0.0, (-2, 1), 1.0, 'nearest'), expected)
  # Bilinear lands within float32 rounding of the pixel centres (1 / 3.5 is inexact), as torch.
  np.testing.assert_allclose(warp(img, 0.0, (-2, 1), 1.0), expected, atol=1e-6)


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('shape', [(9, 9), (8, 11)])
def test_warp_matches_numpy(seed, shape):
  rng = np.random.default_rng(seed)
  img = rng.random((2,) + shape + (3,)).astype(np.float32)
  angle = float(np.float32(rng.uniform(-180, 180)))
  translate = (float(rng.integers(-3, 4)), float(np.float32(rng.uniform(-2, 2))))
  scale = float(np.float32(rng.uniform(0.7, 1.5)))
  bilinear = warp(img, angle, translate, scale, 'bilinear')
  np.testing.assert_allclose(bilinear, np_affine(img, angle, translate, scale), atol=1e-5)
  nearest = np.asarray(warp(img, angle, translate, scale, 'nearest'))
  differs = np.any(nearest != np_affine(img, angle, translate, scale, 'nearest'), axis=(0, 3))
  xs, ys = np_source(shape, angle, translate, scale)
  assert not np.any(differs & ~(near_tie(xs) | near_tie(ys)))  # only float ties may round apart


def test_warp_fill_follows_torchvision():
  img = np.random.default_rng(6).random((1, 8, 8, 2)).astype(np.float32)
  args = (30.0, (1.0, -2.0), 0.9)
  for method, fill in (('bilinear', 0.0), ('bilinear', 0.5), ('nearest', 0.5)):
    np.testing.assert_allclose(warp(img, *args, method, fill),
                               np_affine(img, *args, method, fill), atol=1e-5)
  # An explicit fill of 0 is not the default: bilinear border pixels are attenuated twice.
  default = np.asarray(warp(img, *args))
  assert np.abs(default - np.asarray(warp(img, *args, fill=0.0))).max() > 1e-2


def test_warp_is_jittable_with_traced_parameters_and_keeps_dtype():
  img = jnp.asarray(np.random.default_rng(7).random((2, 9, 9, 3)), jnp.bfloat16)
  params = (jnp.float32(-41.0), (jnp.float32(2.0), jnp.float32(-1.0)), jnp.float32(1.2))
  out = warp(img, *params, method='bilinear')
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, losses.affine_warp(img, -41.0, (2.0, -1.0), 1.2))  # eager


# ---------------------------------------------------------------------------
# Equivariance
# ---------------------------------------------------------------------------
def test_random_affine_params_follow_the_reference_ranges():
  draw = jax.jit(jax.vmap(lambda k: losses.random_affine_params(k, (100, 10))))
  angle, (tx, ty), scale = draw(jax.random.split(jax.random.key(0), 2000))
  assert -90 <= float(angle.min()) < -80 and 80 < float(angle.max()) <= 90
  assert 0.8 <= float(scale.min()) and float(scale.max()) <= 1.4
  np.testing.assert_array_equal(tx, np.round(tx))
  assert float(jnp.abs(tx).max()) == 11.0  # x range from H = 100 (the reference's quirk)
  assert float(jnp.abs(ty).max()) == 1.0  # y range from W = 10: round(U(-1.1, 1.1))
  one = losses.random_affine_params(jax.random.key(3), 518)
  assert jax.tree.map(float, one) == jax.tree.map(
      float, losses.random_affine_params(jax.random.key(3), 518))


@pytest.mark.parametrize('case', [
    (25.0, (3.0, -5.0), 1.2, 32),
    (-61.7, (-7.0, 2.0), 0.83, 112),
    (0.0, (2.0, 6.0), 1.0, 32),  # half-pixel shifts at map scale: exact ties
])
def test_inverse_warp_maps_matches_numpy(case):
  angle, translate, scale, image_size = case
  maps = random_maps(8, (2, 8, 8, K + 1))
  got = np.asarray(inverse_warp_maps(maps, angle, translate, scale, image_size))
  np.testing.assert_array_equal(got, np_inverse_warp(maps, *case).astype(np.float32))


def test_equivariance_loss_matches_numpy_with_torch_eps():
  a, b = random_maps(9), random_maps(10)
  b[1, ..., 0] = 0.0  # an empty back-warped map: cosine 0, not NaN
  np.testing.assert_allclose(equivariance_loss(a, b), np_equivariance(a, b), rtol=1e-6)
  tiny = np.full_like(a, 1e-10)  # ||x|| < 1e-8: each norm is clamped on its own
  np.testing.assert_allclose(equivariance_loss(a, tiny), np_equivariance(a, tiny),
                             rtol=1e-6)


def test_equivariance_loss_vanishes_for_exactly_invertible_warps():
  maps = np.zeros((B, 8, 8, K + 1), np.float32)
  maps[..., K] = 1.0
  maps[:, 2:6, 2:6] = random_maps(11, (B, 4, 4, K + 1))  # no part mass near the border
  for angle, translate, scale in ((0.0, (0.0, 0.0), 1.0), (0.0, (1.0, -2.0), 1.0),
                                  (90.0, (0.0, 0.0), 1.0), (-90.0, (1.0, 1.0), 1.0)):
    warped = warp(maps, angle, translate, scale, 'nearest')
    back = inverse_warp_maps(warped, angle, translate, scale, image_size=8)
    assert float(equivariance_loss(maps, back)) == pytest.approx(0.0, abs=1e-6)
  assert float(equivariance_loss(maps, warped)) > 0.05  # not warped back: clearly > 0


def test_equivariance_pipeline_jits_and_differentiates_with_traced_params():
  images = jnp.asarray(np.random.default_rng(12).random((2, 16, 16, 3)), jnp.float32)
  maps = jnp.asarray(random_maps(13, (2, 8, 8, K + 1)))

  @jax.jit
  def loss(maps_of_warped, rng):
    params = losses.random_affine_params(rng, 16)
    warped = warp(images, *params)
    back = inverse_warp_maps(maps_of_warped * jnp.mean(warped), *params, image_size=16)
    return equivariance_loss(maps, back)

  value, grad = jax.value_and_grad(loss)(maps, jax.random.key(1))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------
# Orthogonality
# ---------------------------------------------------------------------------
def np_orthogonality(features: np.ndarray, kind: str) -> float:
  """Straight from the reference: normalise over one axis, Gram over the other, mean (G - I)^2."""
  x = features.astype(np.float64)
  if kind == 'ifam':
    x = np.swapaxes(x, 1, 2)  # the D axis plays the role of the reference's "parts"
  total = []
  for sample in x:  # [rows, width]: normalise each row
    rows = sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)
    n = rows.shape[0]
    total.append([(rows[i] @ rows[j] - (i == j)) ** 2 for i in range(n) for j in range(n)])
  return float(np.mean(total))


@pytest.mark.parametrize('kind', ['ifam', 'parts'])
def test_orthogonality_matches_numpy(kind):
  features = np.random.default_rng(14).normal(size=(2, K + 1, 5)).astype(np.float32)
  features[1, :, 3] = 0.0  # a dead channel (iFAM) is normalised to 0, not NaN
  np.testing.assert_allclose(orthogonality_loss(features, kind),
                             np_orthogonality(features, kind), rtol=1e-5)


def test_orthogonality_is_zero_for_orthogonal_vectors():
  q, _ = np.linalg.qr(np.random.default_rng(15).normal(size=(6, 6)))
  parts = (q[:K + 1] * np.array([[1.0], [3.0], [0.5]])).astype(np.float32)[None]  # [1, 3, 6]
  assert float(orthogonality_loss(parts, 'parts')) == pytest.approx(0.0, abs=1e-7)
  assert float(orthogonality_loss(parts, 'ifam')) > 0.05  # 6 channels in 3 dims
  q3, _ = np.linalg.qr(np.random.default_rng(16).normal(size=(K + 1, K + 1)))
  channels = (q3 * np.array([2.0, 0.3, 1.0])).astype(np.float32)[None]  # columns orthogonal
  assert float(orthogonality_loss(channels, 'ifam')) == pytest.approx(0.0, abs=1e-6)
  assert float(orthogonality_loss(parts + 1.0, 'parts')) > 0.05


# ---------------------------------------------------------------------------
# Total variation, entropy, concentration
# ---------------------------------------------------------------------------
def test_total_variation_matches_numpy():
  maps = random_maps(16, (B, 5, 7, K + 1))
  total = 0.0
  for b in range(B):
    for k in range(K + 1):
      for i in range(5):
        for j in range(7):
          if i + 1 < 5:
            total += abs(float(maps[b, i + 1, j, k]) - float(maps[b, i, j, k]))
          if j + 1 < 7:
            total += abs(float(maps[b, i, j + 1, k]) - float(maps[b, i, j, k]))
  np.testing.assert_allclose(total_variation_loss(maps), total / (B * 5 * 7), rtol=1e-6)
  constant = np.full((B, 5, 7, K + 1), 1 / (K + 1), np.float32)
  assert float(total_variation_loss(constant)) == 0.0


def test_pixel_entropy_matches_torch_categorical():
  maps = random_maps(17) * 3.0  # unnormalised: Categorical renormalises
  maps[0, 0, 0] = [0.0, 0.0, 3.0]
  eps = float(np.finfo(np.float32).eps)
  ent = []
  for p in maps.reshape(-1, K + 1).astype(np.float64):
    p = p / p.sum()
    ent.append(-sum(v * math.log(min(max(v, eps), 1 - eps)) for v in p))
  np.testing.assert_allclose(pixel_entropy_loss(maps), np.mean(ent), rtol=1e-5)
  uniform = np.full((1, 4, 4, K + 1), 1 / (K + 1), np.float32)
  np.testing.assert_allclose(pixel_entropy_loss(uniform), math.log(K + 1), rtol=1e-6)
  one_hot = np.eye(K + 1, dtype=np.float32)[np.random.default_rng(18).integers(0, K + 1, (B, H, W))]
  assert 0.0 < float(pixel_entropy_loss(one_hot)) < 1e-6


def test_concentration_matches_numpy():
  maps = random_maps(19, (2, 5, 4, K + 1))
  terms = []
  for b in range(2):
    for k in range(K):
      a = maps[b, ..., k].astype(np.float64)
      cr = sum(a[i, j] * i for i in range(5) for j in range(4)) / a.sum()
      cc = sum(a[i, j] * j for i in range(5) for j in range(4)) / a.sum()
      terms += [a[i, j] * (((cr - i) / 4) ** 2 + ((cc - j) / 5) ** 2)
                for i in range(5) for j in range(4)]
  np.testing.assert_allclose(concentration_loss(maps), np.mean(terms), rtol=1e-5)
  point = np.zeros((1, 5, 4, K + 1), np.float32)
  point[0, 1, 2, :] = 1.0
  assert float(concentration_loss(point)) == 0.0


# ---------------------------------------------------------------------------
# Cross-cutting: dtypes, gradients, arguments
# ---------------------------------------------------------------------------
def all_shaping_losses(maps: jax.Array, features: jax.Array) -> jax.Array:
  return (presence_loss(maps) + enforced_presence_loss(maps)
          + equivariance_loss(maps, maps[:, ::-1]) + orthogonality_loss(features)
          + orthogonality_loss(features, 'parts') + total_variation_loss(maps)
          + pixel_entropy_loss(maps) + concentration_loss(maps))


def test_losses_compute_in_float32_from_bfloat16():
  maps, features = random_maps(20), np.random.default_rng(21).normal(size=(B, K + 1, 8))
  low = all_shaping_losses(jnp.asarray(maps, jnp.bfloat16), jnp.asarray(features, jnp.bfloat16))
  assert low.dtype == jnp.float32
  ref = all_shaping_losses(jnp.asarray(maps, jnp.bfloat16).astype(jnp.float32),
                           jnp.asarray(features, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(low, ref, rtol=1e-6)


def test_gradients_are_finite_for_hard_maps_and_dead_features():
  # Probabilities exactly 0 or 1, no background at all (the BCE log hits its clamp), and image 0
  # is all part 0 (part 1 has no mass there, so no centroid).
  one_hot = np.eye(K + 1, dtype=np.float32)[np.random.default_rng(22).integers(0, K, (B, H, W))]
  one_hot[0] = np.eye(K + 1, dtype=np.float32)[0]
  features = np.zeros((B, K + 1, 8), np.float32)
  grads = jax.jit(jax.grad(all_shaping_losses, argnums=(0, 1)))(one_hot, features)
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_unknown_kinds_are_rejected():
  maps = random_maps(23)
  with pytest.raises(ValueError):
    losses.presence_loss(maps, 'max')
  with pytest.raises(ValueError):
    losses.enforced_presence_loss(maps, 'area')
  with pytest.raises(ValueError):
    losses.orthogonality_loss(np.ones((1, 3, 4), np.float32), 'prototypes')
  with pytest.raises(ValueError):
    losses.affine_warp(maps, 0.0, (0, 0), 1.0, 'bicubic')


def test_default_weights_are_the_papers():
  assert dict(losses.DEFAULT_WEIGHTS) == {
      'cls2': 1.0, 'cls1': 1.0, 'presence': 1.0, 'enforced_presence': 2.0, 'equivariance': 1.0,
      'orthogonality': 1.0, 'total_variation': 1.0, 'entropy': 1.0, 'concentration': 0.0}


# ---------------------------------------------------------------------------
# Parity with torchvision (fixture made by tests/fixtures/make_affine_fixture.py)
# ---------------------------------------------------------------------------
def test_affine_matches_torchvision_fixture():
  """Bilinear to 1e-5; nearest exactly, except where a source coordinate is a float tie."""
  if not FIXTURE.exists():
    pytest.skip(f'{FIXTURE.name} not generated yet: run `python tests/fixtures/'
                'make_affine_fixture.py` where torch and torchvision are installed')
  data = np.load(FIXTURE)

  def nhwc(a):
    return np.ascontiguousarray(np.transpose(a, (0, 2, 3, 1)))

  cases = zip(data['image_case_source'], data['image_case_method'], data['image_case_params'],
              data['image_case_fill'])
  for i, (source, method, (angle, tx, ty, scale), fill) in enumerate(cases):
    img, expected = nhwc(data[str(source)]), nhwc(data[f'image_out_{i}'])
    got = np.asarray(warp(img, angle, (tx, ty), scale, str(method),
                                        None if np.isnan(fill) else float(fill)))
    if method == 'bilinear':
      np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f'image case {i}')
    else:
      xs, ys = np_source(img.shape[1:3], angle, (tx, ty), scale)
      differs = np.any(got != expected, axis=(0, 3))
      assert not np.any(differs & ~(near_tie(xs) | near_tie(ys))), f'image case {i}'

  maps = nhwc(data['maps'])
  for i, ((angle, tx, ty, scale), size) in enumerate(zip(data['map_case_params'],
                                                         data['map_case_image_size'])):
    got = inverse_warp_maps(maps, angle, (tx, ty), scale, int(size))
    np.testing.assert_array_equal(got, nhwc(data[f'map_out_{i}']), err_msg=f'map case {i}')
