"""The mask-geometry audit: what the binary mask itself tells stage 2 about the background.

The pixel audit (audit.py) proves that masked-out pixel content cannot reach stage 2. The mask
can: stage 1 decides it from the whole image, so which patches are visible, how many, and
whether any are, may encode the spurious attribute (the background) that the mask was meant to
hide. `geometry_leak` measures that channel on host numpy, from the masks alone:

  - the AUROC of predicting the attribute from the visible-patch count, and from a linear probe
    on the mask's bits (plus the count), out of fold; both within each class, then averaged over
    the classes, so that a mask that encodes the object's class (its shape) is no leak where
    class and attribute are correlated;
  - empty-mask rates per group and per attribute value, the mean visible fraction per group;
  - with ground-truth masks, the share of visible patches on the object's edge and on pure
    background (their pixels reach stage 2 too);
  - a verdict against `eval.leak_auroc_threshold`.

The attribute comes from the group layout: groups that are (class, value) pairs
(`attribute_values`). `MaskLeak` runs the audit's eval forward over a split and reports.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from ifam_jax.evaluators import loop
from ifam_jax.evaluators.metrics import auroc
from ifam_jax.methods.ground_truth import patch_pixel_counts
from ifam_jax.peers import linear

# The probe: stratified folds (out-of-fold scores), its L2 logistic regression's C, its seed.
PROBE_FOLDS = 5
PROBE_C = 1.0
PROBE_SEED = 0


# ----------------------------------------------------------------------------
# The spurious attribute of a group layout
# ----------------------------------------------------------------------------
def attribute_values(class_names: Sequence[str], group_names: Sequence[str]) -> list[str] | None:
  """The spurious attribute's values when the groups are (class, value) pairs, else None.

  Product layouts number group = class * A + value and name it '<class>/<value>' (Waterbirds:
  2 y + place, 'landbird/water'; synthetic: label * C + background, 'disc/land'), so a group's
  value is group % A. Other layouts (MetaShift's contexts, no groups) have no such attribute.
  """
  num_classes, num_groups = len(class_names), len(group_names)
  if not num_classes or not num_groups or num_groups % num_classes:
    return None
  prefix = f'{class_names[0]}/'
  values = [name[len(prefix):] for name in group_names[:num_groups // num_classes]
            if name.startswith(prefix)]
  expected = [f'{c}/{v}' for c in class_names for v in values]
  if len(set(values)) != num_groups // num_classes or not all(values):
    return None
  return values if list(group_names) == expected else None


# ----------------------------------------------------------------------------
# Predicting the attribute from the mask
# ----------------------------------------------------------------------------
def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
  """Each example's fold in [0, folds): every value of `y` is dealt round-robin in a random
  order, continuing where the previous value stopped, so folds differ in size by at most one."""
  rng = np.random.default_rng(seed)
  fold = np.empty(len(y), np.int64)
  start = 0
  for value in np.unique(y):
    members = rng.permutation(np.flatnonzero(y == value))
    fold[members] = (start + np.arange(members.size)) % folds
    start += members.size
  return fold


def _probe_scores(x: np.ndarray, y: np.ndarray, num_values: int, folds: int,
                  seed: int) -> np.ndarray:
  """Out-of-fold scores of an L2 logistic regression of y on x: the decision function [N] for
  two values, the softmax probabilities [N, num_values] for more."""
  fold = stratified_folds(y, folds, seed)
  scores = np.zeros((len(y),) if num_values == 2 else (len(y), num_values))
  for f in range(folds):
    held = fold == f
    model, _ = linear.fit_logistic(x[~held], y[~held], num_classes=num_values, penalty='l2',
                                   C=PROBE_C, seed=seed)
    z = linear.logits(model, x[held])
    if num_values == 2:
      scores[held] = z[:, 1] - z[:, 0]
    else:
      e = np.exp(z - z.max(axis=1, keepdims=True))
      scores[held] = e / e.sum(axis=1, keepdims=True)
  return scores


def _ovr_auroc(scores: np.ndarray, y: np.ndarray, num_values: int, either_way: bool) -> float:
  """AUROC of value 1 (two values) or the macro one-vs-rest AUROC (more), of 1-D scores (one
  score for every value) or [N, num_values]; `either_way` takes max(auc, 1 - auc) of each."""
  aucs = []
  for k in ([1] if num_values == 2 else range(num_values)):
    auc = auroc(scores if scores.ndim == 1 else scores[:, k], y == k)
    aucs.append(max(auc, 1 - auc) if either_way else auc)
  return float(np.mean(aucs))


def _mean(values: Sequence[float | None]) -> float | None:
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None


def _share(part: np.ndarray, whole: np.ndarray) -> float | None:
  return float(part.sum() / whole.sum()) if whole.sum() else None


# ----------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------
def geometry_leak(patch_mask: np.ndarray, labels: np.ndarray, attribute: np.ndarray, *,
                  class_names: Sequence[str], attribute_names: Sequence[str],
                  gt_fraction: np.ndarray | None = None, threshold: float = 0.75,
                  noun: str = 'attribute', folds: int = PROBE_FOLDS,
                  seed: int = PROBE_SEED) -> dict[str, Any]:
  """How much binary patch masks [N, h*w] (> 0.5 = visible) tell about `attribute` [N].

  Within each class, the values of the attribute with at least `folds` images each (two or
  more of them, else the class is left out) are predicted from
    'count_auroc'  the visible-patch count; its direction does not matter, so the AUROC is
                   max(auc, 1 - auc) (per value, one-vs-rest, for more than two values);
    'probe_auroc'  an L2 logistic regression on the h*w bits and the visible fraction, scored
                   out of fold over `folds` stratified folds (fixed `seed`); as it is, since
                   the probe learns the direction (chance is 0.5, noise on either side);
  more than two values give the macro one-vs-rest AUROC (the probe's of its softmax). Both are
  averaged over the classes ('per_class' holds each); 'auroc' is the larger, None when no class
  qualifies. `leak` when auroc >= threshold. Groups are '<class>/<value>' pairs: empty-mask rate
  and mean visible fraction per group, empty rate per value. `gt_fraction` [N, h*w], each
  patch's ground-truth foreground fraction, adds the shares of visible patches on the object's
  edge (0 < fraction < 1) and on pure background (0), overall and per group.
  """
  visible = np.asarray(patch_mask) > 0.5
  labels, attribute = np.asarray(labels), np.asarray(attribute)
  n, num_patches = visible.shape
  count = visible.sum(axis=1)
  empty = count == 0
  features = np.concatenate([visible, count[:, None] / num_patches], axis=1).astype(np.float64)
  report: dict[str, Any] = {'num_images': int(n), 'attribute': noun, 'threshold': threshold,
                            'per_class': {}}
  for c in np.unique(labels):
    in_class = np.flatnonzero(labels == c)
    values, sizes = np.unique(attribute[in_class], return_counts=True)
    values = values[sizes >= folds]
    if values.size < 2:
      continue
    members = in_class[np.isin(attribute[in_class], values)]
    y = np.searchsorted(values, attribute[members])
    report['per_class'][class_names[c]] = {
        'num_images': int(members.size),
        'count_auroc': _ovr_auroc(count[members], y, values.size, either_way=True),
        'probe_auroc': _ovr_auroc(_probe_scores(features[members], y, values.size, folds, seed),
                                  y, values.size, either_way=False)}
  for key in ('count_auroc', 'probe_auroc'):
    report[key] = _mean([r[key] for r in report['per_class'].values()])
  count_auc, probe_auc = report['count_auroc'], report['probe_auroc']
  if probe_auc is not None and (count_auc is None or probe_auc > count_auc):
    report['auroc'], report['auroc_from'] = probe_auc, 'probe'
  else:  # the count on a tie: the simpler explanation
    report['auroc'], report['auroc_from'] = count_auc, 'count' if count_auc is not None else None
  report['leak'] = report['auroc'] is not None and report['auroc'] >= threshold

  groups = {f'{class_names[c]}/{attribute_names[a]}': (labels == c) & (attribute == a)
            for c in range(len(class_names)) for a in range(len(attribute_names))}
  groups = {name: members for name, members in groups.items() if members.any()}
  report['empty_rate'] = float(empty.mean())
  report['empty_rate_by_attribute'] = {attribute_names[a]: float(empty[attribute == a].mean())
                                       for a in np.unique(attribute)}
  report['empty_rate_by_group'] = {g: float(empty[m].mean()) for g, m in groups.items()}
  report['visible_fraction'] = float(visible.mean())
  report['visible_fraction_by_group'] = {g: float(visible[m].mean()) for g, m in groups.items()}
  if gt_fraction is not None:
    truth = np.asarray(gt_fraction)
    edge, background = visible & (truth > 0) & (truth < 1), visible & (truth == 0)
    report['edge_share'] = _share(edge, visible)
    report['background_share'] = _share(background, visible)
    report['edge_share_by_group'] = {g: _share(edge[m], visible[m]) for g, m in groups.items()}
    report['background_share_by_group'] = {g: _share(background[m], visible[m])
                                            for g, m in groups.items()}
  report['verdict'] = verdict(report, folds)
  return report


def verdict(report: dict[str, Any], folds: int = PROBE_FOLDS) -> str:
  """One line: leak or not, the AUROC and what gave it, and the empty rates' extremes."""
  noun = report['attribute']
  rates = report['empty_rate_by_attribute']
  most, least = max(rates, key=rates.get), min(rates, key=rates.get)
  empty = (f"empty on {100 * rates[most]:.0f}% of '{most}' vs {100 * rates[least]:.0f}% of "
           f"'{least}'" if rates[most] > rates[least] else
           f'empty on {100 * rates[most]:.0f}% of the images of every {noun} value')
  if report['auroc'] is None:
    return (f'the geometry leak cannot be measured: no class holds two {noun} values with '
            f'{folds} images each; {empty}')
  auc = f"AUROC {report['auroc']:.2f} from mask geometry alone ({report['auroc_from']})"
  if report['leak']:
    return f'the mask leaks the {noun}: {auc}, {empty}'
  return f"no geometry leak: {auc} < {report['threshold']:.2f}, {empty}"


# ----------------------------------------------------------------------------
# The evaluator
# ----------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
  if config.eval.leak_num_images < 1:
    raise ValueError(f'eval.leak_num_images must be at least 1, got {config.eval.leak_num_images}')
  if not 0.5 <= config.eval.leak_auroc_threshold <= 1.0:
    raise ValueError(f'eval.leak_auroc_threshold is an AUROC in [0.5, 1], got '
                     f'{config.eval.leak_auroc_threshold}')


@jax.jit
def patch_truth(pixels: jax.Array, fg_mask: jax.Array) -> jax.Array:
  """Each patch's ground-truth foreground fraction [B, h*w], from the pixel mask [B, S, S] and
  the patch grid of `fg_mask` [B, h, w]."""
  size = pixels.shape[1] // fg_mask.shape[1]
  return patch_pixel_counts(pixels, size) / size**2


def make_leak_step(mask_step: Callable) -> Callable:
  """An eval-loop step: the 'patch_mask' [B, h*w] of `mask_step` (`audit.make_mask_step`'s
  outputs) and, when the batch has a pixel 'fg_mask', 'gt_fraction' [B, h*w]."""

  def leak_step(params, frozen, batch, rng):
    out = mask_step(params, frozen, batch, rng)
    result = {'patch_mask': out['patch_mask']}
    if 'fg_mask' in batch:
      result['gt_fraction'] = patch_truth(batch['fg_mask'], out['fg_mask'])
    return result

  return leak_step


def collect_masks(predict: Callable, params: Any, frozen: Any, source: Any, transform: Any,
                  config: ml_collections.ConfigDict, batch_sharding: Any) -> dict[str, np.ndarray]:
  """`make_leak_step`'s outputs with each example's label and group, host arrays of the first
  `eval.leak_num_images` valid examples of `source`; only the batches holding them are read."""
  num_images = config.eval.leak_num_images
  outputs = loop.collect_leading(predict, params, frozen, source, transform, config,
                                 batch_sharding, num_images)
  keep = np.flatnonzero(outputs['valid'] > 0)[:num_images]
  return {k: v[keep] for k, v in outputs.items() if k != 'valid'}


@dataclasses.dataclass
class MaskLeak:
  """`geometry_leak` of the first `eval.leak_num_images` valid examples of one source.

  `run`'s predict function is `make_leak_step`'s (`collect_masks`). A source whose groups are
  not (class, attribute) pairs is skipped: the report says why.
  """

  source: Any
  transform: Any
  config: ml_collections.ConfigDict
  batch_sharding: Any

  def run(self, predict: Callable, params: Any, frozen: Any) -> dict[str, Any]:
    values = attribute_values(self.source.class_names, self.source.group_names)
    if values is None:
      return {'skipped': f'{self.source!r} has no groups that pair a class with an attribute '
                         "value ('<class>/<value>')"}
    out = collect_masks(predict, params, frozen, self.source, self.transform, self.config,
                        self.batch_sharding)
    if not len(out['label']):
      return {'skipped': f'{self.source!r} has no readable image'}
    return geometry_leak(out['patch_mask'], out['label'], out['group'] % len(values),
                         class_names=self.source.class_names, attribute_names=values,
                         gt_fraction=out.get('gt_fraction'),
                         threshold=self.config.eval.leak_auroc_threshold,
                         noun=getattr(self.source, 'spurious_attribute', 'attribute'))
