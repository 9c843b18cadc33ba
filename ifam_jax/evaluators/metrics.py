"""Metrics: one function per metric, on host numpy (reference section 7).

`summarize_predictions` reduces the gathered per-example outputs of `make_eval_step`;
`fg_overlap` is counted on device, inside the predict function, so that per-pixel masks never
leave it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ifam_jax import data as data_lib


# ----------------------------------------------------------------------------
# Host metrics
# ----------------------------------------------------------------------------
def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Area under the ROC curve: the Mann-Whitney U statistic / (n_pos * n_neg).

  Tied scores count one half (average ranks), which is what the trapezoidal ROC of
  torchmetrics' BinaryAUROC computes. NaN unless both classes occur.
  """
  scores = np.asarray(scores, np.float64)
  positive = np.asarray(positive, bool)
  n_pos = int(positive.sum())
  n_neg = positive.size - n_pos
  if not n_pos or not n_neg:
    return float('nan')
  order = np.argsort(scores, kind='stable')
  ordered = scores[order]
  starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
  ends = np.r_[starts[1:], ordered.size]
  ranks = np.empty(ordered.size)
  ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)  # 1-based, ties averaged
  return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _accuracy_by(correct: np.ndarray, index: np.ndarray, names: Sequence[str]) -> dict[str, float]:
  """Accuracy per value of `index` that occurs, keyed by its name (or the value)."""
  return {(names[i] if len(names) else str(i)): float(correct[index == i].mean())
          for i in np.unique(index)}


def classification_metrics(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray, *,
                           class_names: Sequence[str] = (), group_names: Sequence[str] = (),
                           minority_groups: Sequence[int] = (),
                           class_map: np.ndarray | None = None) -> dict[str, Any]:
  """Metrics of one stage's logits [N, C] on N (valid) examples.

  Top-5 when C > 5, AUROC of softmax(logits)[:, 1] when C = 2 (reference 7.1). Group metrics
  cover the groups present; `worst_group_accuracy_minority` is the reference's Waterbirds WGA,
  the minimum over `minority_groups` only, and `minority_accuracy_pooled` (DAR's metric) the
  accuracy over all their examples, `majority_accuracy_pooled` over the others'. With C = 2,
  `worst_group_auroc` is the AUROC over the minority groups' examples when both classes occur
  there: the paper's SIIM-ACR worst-group AUC (its robust test set, reference 7.5). `class_map`
  sends the model's classes to the eval's (ImageNet -> IN-9, -1 never right); top-5 and AUROC
  are then undefined and left out.
  """
  pred = np.argmax(logits, axis=-1)
  if class_map is not None:
    pred = class_map[pred]
  correct = pred == labels
  per_class = _accuracy_by(correct, labels, class_names)
  metrics = {'accuracy': float(correct.mean()),
             'macro_accuracy': float(np.mean(list(per_class.values()))),
             'worst_class_accuracy': min(per_class.values()),
             'class_accuracy': per_class}
  num_classes = logits.shape[-1]
  if class_map is None and num_classes > 5:
    top5 = np.argpartition(logits, -5, axis=-1)[:, -5:]
    metrics['top5_accuracy'] = float(np.any(top5 == labels[:, None], axis=-1).mean())
  if class_map is None and num_classes == 2:
    z = logits.astype(np.float64)
    score = 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1]))  # softmax(logits)[:, 1]
    if np.unique(labels).size == 2:
      metrics['auroc'] = auroc(score, labels == 1)
    robust = np.isin(groups, minority_groups) if len(group_names) else np.zeros(labels.shape, bool)
    if np.unique(labels[robust]).size == 2:
      metrics['worst_group_auroc'] = auroc(score[robust], labels[robust] == 1)
  if len(group_names):
    per_group = _accuracy_by(correct, groups, group_names)
    metrics.update(group_accuracy=per_group,
                   mean_group_accuracy=float(np.mean(list(per_group.values()))),
                   worst_group_accuracy=min(per_group.values()))
    minority = [per_group[group_names[g]] for g in minority_groups
                if group_names[g] in per_group]
    if minority:
      metrics['worst_group_accuracy_minority'] = min(minority)
      in_minority = np.isin(groups, minority_groups)
      metrics['minority_accuracy_pooled'] = float(correct[in_minority].mean())
      if (~in_minority).any():
        metrics['majority_accuracy_pooled'] = float(correct[~in_minority].mean())
  return metrics


def train_weighted_accuracy(group_accuracy: Mapping[str, float],
                            train_group_counts: Mapping[str, int]) -> float:
  """Sum over groups of accuracy x the group's share of the training set: the "average accuracy"
  of Waterbirds papers after GroupDRO and JTT (the plain test mean over-weights its balanced
  minority groups). Groups absent from the eval set are left out and the shares renormalised."""
  shared = [g for g in group_accuracy if train_group_counts.get(g, 0) > 0]
  if not shared:
    return float('nan')
  total = sum(train_group_counts[g] for g in shared)
  return float(sum(group_accuracy[g] * train_group_counts[g] / total for g in shared))


def summarize_predictions(outputs: Mapping[str, np.ndarray], *, class_names: Sequence[str] = (),
                          group_names: Sequence[str] = (), minority_groups: Sequence[int] = (),
                          class_map: np.ndarray | None = None,
                          mask_labels: Sequence[int] = ()) -> dict[str, Any]:
  """The eval metrics of gathered per-example outputs (see `make_eval_step`), valid ones only.

  Stage 2 at the top level, stage 1 under 'stage1'; the mean foreground fraction; with
  ground-truth masks the dataset-level foreground IoU (sum of intersections / sum of unions, as
  the reference) and the mean of per-image IoUs (images with an empty union left out), over the
  images whose label is in `mask_labels` (`mask_labels(source)`; () = all images).
  """
  keep = outputs['valid'] > 0
  metrics: dict[str, Any] = {'num_examples': int(keep.sum())}
  if not keep.any():
    return {**metrics, 'accuracy': float('nan')}
  labels, groups = outputs['label'][keep], outputs['group'][keep]
  names = dict(class_names=class_names, group_names=group_names,
               minority_groups=minority_groups, class_map=class_map)
  metrics.update(classification_metrics(outputs['logits'][keep], labels, groups, **names))
  if 'logits1' in outputs:
    metrics['stage1'] = classification_metrics(outputs['logits1'][keep], labels, groups, **names)
  if 'fg_fraction' in outputs:
    metrics['fg_fraction'] = float(outputs['fg_fraction'][keep].mean())
  if 'fg_union' in outputs:
    scored = np.isin(labels, mask_labels) if len(mask_labels) else np.ones(labels.shape, bool)
    inter = outputs['fg_intersection'][keep][scored].astype(np.float64)
    union = outputs['fg_union'][keep][scored].astype(np.float64)
    if union.sum():
      nonempty = union > 0
      metrics['fg_iou'] = float(inter.sum() / union.sum())
      metrics['fg_iou_image_mean'] = float(np.mean(inter[nonempty] / union[nonempty]))
  return metrics


def minority_groups(source: Any) -> tuple[int, ...]:
  """Groups whose (class, attribute) pairing is the rare one in training, per known source.

  Waterbirds: landbird/water and waterbird/land, the reference's WGA subset (7.2). Synthetic:
  a shape on another class's background. SIIM-ACR: negatives with a chest tube and positives
  without, its robust test set (reference 7.5). Other sources define none (MetaShift's test set
  holds one group per class, so its worst-group accuracy already is the reference's).
  """
  if isinstance(source, (data_lib.WaterbirdsSource, data_lib.SiimAcrSource)):
    return (1, 2)
  if isinstance(source, data_lib.SyntheticSpuriousSource):
    c = source.num_classes
    return tuple(g for g in range(c * c) if g // c != g % c)
  return ()


def mask_labels(source: Any) -> tuple[int, ...]:
  """The labels whose images the source's ground-truth masks outline, where not all do.

  SIIM-ACR: pneumothorax (1); a negative's mask is empty, so its IoU would only count the
  pixels the model keeps, and the dataset-level IoU is taken over the positives.
  """
  if isinstance(source, data_lib.SiimAcrSource):
    return (1,)
  return ()


def bg_gap(in9_accuracy: Mapping[str, float]) -> float:
  """BG-GAP = accuracy(mixed_same) - accuracy(mixed_rand) (reference 7.7)."""
  return in9_accuracy['mixed_same'] - in9_accuracy['mixed_rand']


# ----------------------------------------------------------------------------
# Per-image foreground counts (on device)
# ----------------------------------------------------------------------------
def upsample_patches(grid: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest upsampling of per-patch values [B, h, w] to pixels [B, height, width]."""
  return jnp.repeat(jnp.repeat(grid, height // grid.shape[1], axis=1), width // grid.shape[2],
                    axis=2)


def fg_overlap(fg_mask: jax.Array, truth: jax.Array) -> dict[str, jax.Array]:
  """Per-image pixel counts of (patch mask AND truth) and (patch mask OR truth).

  The patch mask is nearest-upsampled, so IoU scores exactly the patches stage 2 sees; the
  reference upsamples the soft maps bilinearly and then takes the argmax.
  """
  pred = upsample_patches(fg_mask > 0.5, truth.shape[1], truth.shape[2])
  truth = truth > 0
  return {'fg_intersection': jnp.sum(pred & truth, axis=(1, 2)),
          'fg_union': jnp.sum(pred | truth, axis=(1, 2))}
