"""The paper's part metrics on CUB's keypoints: keypoint regression (Kp) and NMI / ARI.

Reference sections 7.9 and 7.10 (`evaluate_parts.py`, `eval_interpretability_nmi_ari_keypoint.py`
of the iFAM and PDiscoFormer repositories), with their quirks:
  - images go through resize-shorter-side + centre crop (`transforms.resize_center_crop`), the
    keypoints and boxes with them (`_ResizeCenterCrop.points`: those leaving the crop become
    invisible), and reach the model as [0, 1] pixels without the ImageNet mean and std
    (reference quirk 11; eval.part_metrics_normalise feeds normalised pixels instead);
  - Kp: each foreground part's centroid on the map grid, scaled to pixels by image size / grid
    size (no half-cell offset), is active where its map exceeds 0.5 somewhere; centroids and
    landmarks are normalised by the box; per landmark, on the images where it is visible, a
    StandardScaler of the fit split's centroids (2K) and of the landmark (2), the inactive parts'
    standardised coordinates zeroed, LinearRegression(fit_intercept=False), the eval split's mean
    L2 error; Kp = sum_l error_l n_l / sum_l n_l, in box units (the paper's % is 100 Kp);
  - NMI / ARI: the maps [K+1] upsampled bilinearly (align_corners=False) to the image, read at
    each visible keypoint's nearest pixel (grid_sample 'nearest'), argmax over all K+1 channels
    (background included) against the keypoint id, over the whole eval split.
Evaluation here is deterministic unless model.eval_gumbel_noise (the reference samples maps).

  PartMetrics             the evaluator: the fit split and every annotated eval set
  make_parts_step         the predict function it runs: part maps and the moved annotations
  part_centroids, keypoint_regression, keypoint_parts, nmi, ari
                          pure numpy functions of the maps and annotations
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ifam_jax import data as data_lib
from ifam_jax import factory, methods
from ifam_jax.apply import apply
from ifam_jax.evaluators import loop
from ifam_jax.models.ifam import Intervention


# ----------------------------------------------------------------------------
# Centroids, activity and the keypoint regression (reference 7.9)
# ----------------------------------------------------------------------------
def part_centroids(maps: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Part maps [N, h, w, K+1] (background last) -> (centroids [N, K, 2] as (x, y) pixels of the
  image, active [N, K]: the part's map exceeds 0.5 somewhere).

  Grid cell (i, j) sits at pixel (j W / w, i H / h), as the reference scales its centroids; a
  part whose map is zero everywhere has a NaN centroid (it is never active).
  """
  fg = np.asarray(maps, np.float64)[..., :-1]
  h, w = fg.shape[1:3]
  with np.errstate(invalid='ignore', divide='ignore'):
    mass = fg.sum(axis=(1, 2))
    x = np.einsum('nhwk,w->nk', fg, np.arange(w)) / mass * (image_size / w)
    y = np.einsum('nhwk,h->nk', fg, np.arange(h)) / mass * (image_size / h)
  return np.stack([x, y], axis=-1), fg.max(axis=(1, 2)) > 0.5


def box_normalise(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Points [N, P, 2] (x, y) -> (point - box corner) / box size, boxes [N, 4] (x, y, w, h)."""
  boxes = np.asarray(boxes, np.float64)[:, None]
  return (np.asarray(points, np.float64) - boxes[..., :2]) / boxes[..., 2:]


def _standard_scaler(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) of sklearn's StandardScaler fit: NaNs ignored, population variance, scale 1
  for a feature that sklearn deems constant."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN columns: never-active parts
    mean, var = np.nanmean(x, axis=0), np.nanvar(x, axis=0)
  n = np.sum(~np.isnan(x), axis=0)
  eps = np.finfo(np.float64).eps
  constant = var <= n * eps * var + (n * mean * eps)**2
  return mean, np.where(constant, 1.0, np.sqrt(var))


def keypoint_regression(fit: Mapping[str, np.ndarray],
                        evaluated: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Kp of `evaluated` with per-landmark regressions fit on `fit` (reference 7.9).

  Each of `fit`, `evaluated` holds 'centroids' [N, K, 2] and 'keypoints' [N, L, 2], both
  box-normalised, 'active' [N, K] and 'visible' [N, L]. Returns {'kp': sum_l error_l n_l /
  sum_l n_l (box units), 'landmark_errors' [L] (None where never visible in `evaluated`),
  'landmark_counts' [L]}. A landmark visible in `evaluated` but never in `fit` cannot be
  regressed: ValueError.
  """
  num_landmarks = fit['keypoints'].shape[1]
  errors, counts = [], []
  for l in range(num_landmarks):
    f, e = fit['visible'][:, l], evaluated['visible'][:, l]
    counts.append(int(e.sum()))
    if not e.any():
      errors.append(None)
      continue
    if not f.any():
      raise ValueError(f'landmark {l + 1} is visible in {int(e.sum())} eval images but in no '
                       'image of the fit split: the keypoint regression has nothing to fit')
    x_fit = fit['centroids'][f].reshape(int(f.sum()), -1)
    active_fit = np.repeat(fit['active'][f], 2, axis=1)
    x_mean, x_scale = _standard_scaler(x_fit)
    y_fit = fit['keypoints'][f, l]
    y_mean, y_scale = _standard_scaler(y_fit)
    x_std = np.where(active_fit, (x_fit - x_mean) / x_scale, 0.0)
    coef = np.linalg.lstsq(x_std, (y_fit - y_mean) / y_scale, rcond=None)[0]
    x_eval = evaluated['centroids'][e].reshape(int(e.sum()), -1)
    active_eval = np.repeat(evaluated['active'][e], 2, axis=1)
    x_eval = np.where(active_eval, (x_eval - x_mean) / x_scale, 0.0)
    predicted = x_eval @ coef * y_scale + y_mean
    errors.append(float(np.mean(np.linalg.norm(predicted - evaluated['keypoints'][e, l],
                                               axis=-1))))
  total = sum(err * n for err, n in zip(errors, counts) if err is not None)
  return {'kp': total / sum(counts) if sum(counts) else math.nan,
          'landmark_errors': errors, 'landmark_counts': counts}


# ----------------------------------------------------------------------------
# Part assignments at the keypoints, NMI and ARI (reference 7.10)
# ----------------------------------------------------------------------------
def _bilinear_source(dst: np.ndarray, in_size: int, out_size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch's bilinear (align_corners=False) source of output pixels `dst`: (lower index,
  upper index, weight of the upper)."""
  src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  return lo, np.minimum(lo + 1, in_size - 1), src - lo


def keypoint_parts(maps: np.ndarray, keypoints: np.ndarray, image_size: int) -> np.ndarray:
  """The predicted part (0..K, K = background) at each keypoint [N, L] (visible or not).

  The maps [N, h, w, K+1] upsampled bilinearly to image_size^2 (PyTorch, align_corners=False),
  read at the keypoint's nearest pixel as grid_sample(mode='nearest', align_corners=False) finds
  it (round half to even of x - 1/2, in float32); a point on the far edge falls outside, where
  grid_sample reads zeros and the argmax is channel 0.
  """
  maps = np.asarray(maps, np.float64)
  n, h, w, _ = maps.shape
  size = np.float32(image_size)
  grid = np.asarray(keypoints, np.float32)[..., :2] / size * np.float32(2) - np.float32(1)
  pixel = np.rint(((grid + np.float32(1)) * size - np.float32(1)) / np.float32(2))
  inside = ((pixel >= 0) & (pixel < image_size)).all(-1)
  px, py = (np.clip(pixel[..., i], 0, image_size - 1) for i in (0, 1))
  x0, x1, wx = _bilinear_source(px, w, image_size)
  y0, y1, wy = _bilinear_source(py, h, image_size)
  rows = np.arange(n)[:, None]
  wx, wy = wx[..., None], wy[..., None]
  values = ((1 - wy) * ((1 - wx) * maps[rows, y0, x0] + wx * maps[rows, y0, x1])
            + wy * ((1 - wx) * maps[rows, y1, x0] + wx * maps[rows, y1, x1]))
  return np.where(inside, np.argmax(values, axis=-1), 0)


def _contingency(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
  _, t = np.unique(true, return_inverse=True)
  _, p = np.unique(pred, return_inverse=True)
  table = np.zeros((t.max(initial=-1) + 1, p.max(initial=-1) + 1), np.int64)
  np.add.at(table, (t, p), 1)
  return table


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-np.sum(p * np.log(p)))


def nmi_numpy(true: np.ndarray, pred: np.ndarray) -> float:
  """sklearn's normalized_mutual_info_score (arithmetic mean of the entropies)."""
  table = _contingency(true, pred)
  if table.shape[0] == table.shape[1] <= 1:
    return 1.0
  n = table.sum()
  nz = table > 0
  outer = np.outer(table.sum(1), table.sum(0))
  mi = float(np.sum(table[nz] / n * (np.log(table[nz] * n) - np.log(outer[nz]))))
  if mi <= 0:
    return 0.0
  return mi / ((_entropy(table.sum(1)) + _entropy(table.sum(0))) / 2)


def ari_numpy(true: np.ndarray, pred: np.ndarray) -> float:
  """sklearn's adjusted_rand_score, from the pair confusion matrix in exact integers."""
  table = _contingency(true, pred)
  n = int(table.sum())
  squares = int(np.sum(table.astype(object)**2))
  rows, cols = (table.sum(axis).astype(object) for axis in (1, 0))
  tp = squares - n
  fp = int(np.sum(table.astype(object) @ cols)) - squares
  fn = int(np.sum(table.T.astype(object) @ rows)) - squares
  tn = n * n - fp - fn - squares
  if fn == fp == 0:
    return 1.0
  return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def nmi(true: np.ndarray, pred: np.ndarray) -> float:
  """NMI of two labellings: scikit-learn's where installed (the reference's), else numpy's."""
  try:
    from sklearn.metrics import normalized_mutual_info_score  # pylint: disable=g-import-not-at-top
  except ImportError:
    return nmi_numpy(true, pred)
  return float(normalized_mutual_info_score(true, pred))


def ari(true: np.ndarray, pred: np.ndarray) -> float:
  """ARI of two labellings: scikit-learn's where installed (the reference's), else numpy's."""
  try:
    from sklearn.metrics import adjusted_rand_score  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ari_numpy(true, pred)
  return float(adjusted_rand_score(true, pred))


# ----------------------------------------------------------------------------
# Over a source: the predict function, the collection, the metrics
# ----------------------------------------------------------------------------
def make_parts_step(graphdef: nnx.GraphDef, rest: nnx.State, config: ml_collections.ConfigDict,
                    intervention: Intervention | None = None) -> Callable:
  """(params, frozen, batch, rng) -> {'part_maps' [B, h, w, K+1] float32, 'keypoints', 'box'}:
  the method's predict on [0, 1] pixels (reference quirk 11), or on ImageNet-normalised ones
  with eval.part_metrics_normalise."""
  method = methods.get(config.model.kind)

  def step(params, frozen, batch, rng):
    if config.eval.part_metrics_normalise:
      out = apply(graphdef, rest, params, frozen, batch['image'], method.predict, rng=rng,
                  intervention=intervention)
    else:
      model = nnx.merge(graphdef, params, frozen, rest)
      pixels = data_lib.normalize(batch['image'], mean=(0.0,) * 3, std=(1.0,) * 3)
      out = method.predict(model, pixels, rng=rng, intervention=intervention)
    if 'part_maps' not in out:
      raise ValueError(f'model.kind {config.model.kind!r} returns no part maps')
    return {'part_maps': out['part_maps'].astype(jnp.float32), 'keypoints': batch['keypoints'],
            'box': batch['box']}

  return step


def collect(predict: Callable, params: Any, frozen: Any, source: Any,
            config: ml_collections.ConfigDict, batch_sharding: Any) -> dict[str, np.ndarray]:
  """One ordered pass of `make_parts_step` over `source` (transform `part_transform`), reduced
  batch by batch to what the metrics read, valid examples only: 'centroids' [N, K, 2] and
  'keypoints' [N, L, 2] (box-normalised), 'active' [N, K], 'visible' [N, L], 'parts' [N, L]
  (`keypoint_parts`)."""
  size = config.model.image_size
  ds, num_batches = loop.eval_dataset(source, part_transform(config), config)
  reduced = []
  for out in loop.gather_outputs(predict, params, frozen, ds, num_batches, batch_sharding,
                                 config.seed):
    keep = out['valid'] > 0
    maps, keypoints, boxes = out['part_maps'][keep], out['keypoints'][keep], out['box'][keep]
    centroids, active = part_centroids(maps, size)
    reduced.append({'centroids': box_normalise(centroids, boxes), 'active': active,
                    'keypoints': box_normalise(keypoints[..., :2], boxes),
                    'visible': keypoints[..., 2] > 0.5,
                    'parts': keypoint_parts(maps, keypoints, size)})
  return {k: np.concatenate([r[k] for r in reduced]) for k in reduced[0]}


def part_metrics(fit: Mapping[str, np.ndarray],
                 evaluated: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{'kp', 'nmi', 'ari', 'num_keypoints', 'kp_landmark_errors'} of `collect`ed arrays: Kp fit
  on `fit`; NMI and ARI over the visible keypoints of `evaluated`, as fractions (the paper
  reports 100x)."""
  visible = evaluated['visible']
  truth = np.broadcast_to(np.arange(visible.shape[1]), visible.shape)[visible]
  predicted = evaluated['parts'][visible]
  regression = keypoint_regression(fit, evaluated)
  return {'kp': regression['kp'], 'nmi': nmi(truth, predicted), 'ari': ari(truth, predicted),
          'num_keypoints': int(visible.sum()),
          'kp_landmark_errors': regression['landmark_errors']}


def part_transform(config: ml_collections.ConfigDict) -> Any:
  """The reference's part-eval transform: shorter side to the image size, centre crop."""
  return data_lib.transforms.resize_center_crop(config.model.image_size)


@dataclasses.dataclass
class PartMetrics:
  """`part_metrics` of each source of `sources`, the keypoint regression fit on `fit_source`;
  `run`'s predict function is a jitted `make_parts_step`."""

  fit_source: Any
  sources: Mapping[str, Any]
  config: ml_collections.ConfigDict
  batch_sharding: Any

  def run(self, predict: Callable, params: Any, frozen: Any) -> dict[str, dict[str, Any]]:
    args = (self.config, self.batch_sharding)
    fit = collect(predict, params, frozen, self.fit_source, *args)
    return {name: part_metrics(fit, collect(predict, params, frozen, source, *args))
            for name, source in self.sources.items()}


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------
def annotated_evals(config: ml_collections.ConfigDict) -> list[str]:
  """The selected eval sets whose spec asks for part annotations."""
  return [name for name, spec in config.data.evals.items()
          if spec.get('part_annotations') and (not config.eval.splits
                                               or name in config.eval.splits)]


def check_config(config: ml_collections.ConfigDict) -> Any:
  """With eval.part_metrics: the fit split's source (data.train read with its part
  annotations), after checking what the metrics need, reading annotations but no model; else
  None. Errors name the flag or the file.

  A model without part maps (the ERM and ground-truth-mask rows of a recipe that turns the
  metrics on) skips them, with a warning.
  """
  if not config.eval.part_metrics:
    return None
  if not methods.get(config.model.kind).has_mask:
    logging.warning('eval.part_metrics skipped: model.kind %r has no part maps',
                    config.model.kind)
    return None
  if config.data.train.get('source') != 'cub':
    raise ValueError("eval.part_metrics fits its keypoint regression on data.train, which must "
                     f"be a 'cub' source (CUB's part annotations); it is "
                     f"{config.data.train.get('source')!r}")
  names = annotated_evals(config)
  if not names:
    raise ValueError("eval.part_metrics: no selected eval set carries part annotations; set "
                     "part_annotations=True on a 'cub' entry of data.evals (configs/cub.py does "
                     'where <root>/parts/part_locs.txt and bounding_boxes.txt exist)')
  for name in names:  # their part files fail here, before any model is loaded
    factory.make_eval_source(config, config.data.evals[name], f'data.evals.{name}')
  return factory.make_source(dict(config.data.train, part_annotations=True), name='data.train')
