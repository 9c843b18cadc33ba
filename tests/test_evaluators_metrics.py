"""Metrics against hand counts and pairwise AUROC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifam_jax import data as data_lib
from ifam_jax.evaluators import metrics
from test_data import make_waterbirds


def pairwise_auroc(scores, positive):
  pos, neg = scores[positive][:, None], scores[~positive][None]
  return (np.sum(pos > neg) + 0.5 * np.sum(pos == neg)) / (pos.size * neg.size)


@pytest.mark.parametrize('seed', range(4))
def test_auroc_is_the_pairwise_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, 60).astype(np.float32)  # many ties
  positive = rng.random(60) < 0.3
  assert metrics.auroc(scores, positive) == pytest.approx(pairwise_auroc(scores, positive),
                                                         abs=1e-12)
  assert metrics.auroc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
  assert metrics.auroc([0.5, 0.5], [False, True]) == 0.5
  assert np.isnan(metrics.auroc([0.1, 0.2], [True, True]))


def ranked_logits(pred, label, label_rank, num_classes=7):
  """Logits whose top-1 is `pred` and whose label sits at `label_rank` (0 = top)."""
  order = [pred] + [c for c in range(num_classes) if c not in (pred, label)]
  if label != pred:
    order.insert(label_rank, label)
  logits = np.zeros(num_classes, np.float32)
  logits[order] = np.arange(num_classes, 0, -1)
  return logits


def test_metrics_by_hand():
  # 8 valid examples (right: 0, 2, 3, 4, 6), 2 padding rows that are wrong.
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
  groups = np.array([0, 1, 0, 1, 2, 3, 2, 3, 3, 3])
  valid = np.array([1] * 8 + [0, 0])
  cases = [(0, 0), (4, 3), (1, 0), (1, 0), (2, 0), (5, 6), (3, 0), (0, 1), (6, 1), (6, 1)]
  logits = np.stack([ranked_logits(p, y, r) for (p, r), y in zip(cases, labels)])
  inter = np.array([2, 0, 3, 0, 0, 0, 0, 0, 9, 9])
  union = np.array([4, 0, 3, 1, 0, 0, 0, 0, 9, 9])
  outputs = {'logits': logits, 'logits1': np.eye(7, dtype=np.float32)[labels], 'label': labels,
             'group': groups, 'valid': valid, 'fg_fraction': np.arange(10) / 10,
             'fg_intersection': inter, 'fg_union': union}
  m = metrics.summarize_predictions(outputs, class_names=[f'c{i}' for i in range(7)],
                                    group_names=['g0', 'g1', 'g2', 'g3'], minority_groups=(1, 2))
  assert m['num_examples'] == 8
  assert m['accuracy'] == 5 / 8
  assert m['top5_accuracy'] == 7 / 8  # example 5's label is ranked 7th
  assert m['class_accuracy'] == {'c0': 0.5, 'c1': 1.0, 'c2': 0.5, 'c3': 0.5}
  assert m['macro_accuracy'] == 0.625
  assert m['group_accuracy'] == {'g0': 1.0, 'g1': 0.5, 'g2': 1.0, 'g3': 0.0}
  assert (m['mean_group_accuracy'], m['worst_group_accuracy']) == (0.625, 0.0)
  assert m['worst_group_accuracy_minority'] == 0.5  # min over g1, g2 only
  assert m['minority_accuracy_pooled'] == 3 / 4  # examples 1, 3 (g1) and 4, 6 (g2)
  assert m['majority_accuracy_pooled'] == 2 / 4  # examples 0, 2 (g0) and 5, 7 (g3)
  assert m['worst_class_accuracy'] == 0.5
  assert 'auroc' not in m  # 7 classes
  assert m['stage1']['accuracy'] == 1.0 and m['stage1']['worst_group_accuracy'] == 1.0
  assert m['fg_fraction'] == pytest.approx(np.arange(8).mean() / 10)
  assert m['fg_iou'] == 5 / 8  # (2 + 3) / (4 + 3 + 1), padding left out
  assert m['fg_iou_image_mean'] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # empty unions skipped

  train_counts = {'g0': 60, 'g1': 10, 'g2': 10, 'g3': 20}  # g3's share 0.2, g1's 0.1
  assert metrics.train_weighted_accuracy(m['group_accuracy'], train_counts) == pytest.approx(
      0.6 * 1.0 + 0.1 * 0.5 + 0.1 * 1.0 + 0.2 * 0.0)
  assert metrics.train_weighted_accuracy({'g0': 1.0, 'g3': 0.0}, train_counts) == pytest.approx(
      60 / 80)  # shares renormalised over the groups evaluated

  no_groups = metrics.summarize_predictions({k: outputs[k] for k in ('logits', 'label', 'group',
                                                                     'valid')})
  assert set(no_groups) == {'num_examples', 'accuracy', 'top5_accuracy', 'macro_accuracy',
                            'worst_class_accuracy', 'class_accuracy'}
  assert set(no_groups['class_accuracy']) == {'0', '1', '2', '3'}
  empty = metrics.summarize_predictions({**outputs, 'valid': np.zeros(10)})
  assert empty['num_examples'] == 0 and np.isnan(empty['accuracy'])


def test_binary_auroc_uses_the_class_1_probability():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 2)).astype(np.float32)
  logits[:10] = logits[10:20]  # tied scores
  labels = rng.integers(0, 2, 40)
  m = metrics.summarize_predictions({'logits': logits, 'label': labels,
                                     'group': -np.ones(40, int), 'valid': np.ones(40)})
  z = np.exp(logits.astype(np.float64))
  prob = z[:, 1] / z.sum(-1)
  assert m['auroc'] == pytest.approx(pairwise_auroc(prob, labels == 1), abs=1e-12)
  assert 'top5_accuracy' not in m


def test_minority_groups(tmp_path):
  make_waterbirds(tmp_path)
  waterbirds = data_lib.WaterbirdsSource(tmp_path, 'test')
  assert [waterbirds.group_names[g] for g in metrics.minority_groups(waterbirds)] == \
      ['landbird/water', 'waterbird/land']
  synthetic = data_lib.SyntheticSpuriousSource(4, 16, num_classes=3)
  assert metrics.minority_groups(synthetic) == (1, 2, 3, 5, 6, 7)  # background != shape
  assert metrics.minority_groups(data_lib.SyntheticSpuriousSource(4, 16)) == (1, 2)


def test_fg_overlap_by_hand():
  mask = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]], np.float32)
  truth = np.zeros((3, 4, 4), np.uint8)
  truth[0, :2] = 1  # top half
  truth[2] = 1
  counts = jax.device_get(metrics.fg_overlap(jnp.asarray(mask), jnp.asarray(truth)))
  # Image 0: 2x2-pixel patches top-left and bottom-right vs the top 8 pixels.
  np.testing.assert_array_equal(counts['fg_intersection'], [4, 0, 16])
  np.testing.assert_array_equal(counts['fg_union'], [12, 0, 16])


@pytest.mark.parametrize('seed', range(3))
def test_siim_auroc_and_worst_group_auroc_match_scikit_learn(seed):
  """Groups 2 * label + tube; the robust subset (groups 1, 2) scores the worst-group AUROC."""
  roc_auc_score = pytest.importorskip('sklearn.metrics').roc_auc_score
  rng = np.random.default_rng(seed)
  n = 80
  labels, tubes = rng.integers(0, 2, n), rng.integers(0, 2, n)
  logits = rng.normal(size=(n, 2)).astype(np.float32)
  logits[:, 1] += 1.5 * tubes  # the shortcut: a tube looks positive
  logits[:8] = logits[8:16]  # ties
  valid = np.r_[np.ones(n - 4), np.zeros(4)].astype(int)
  outputs = {'logits': logits, 'logits1': logits[:, ::-1].copy(), 'label': labels,
             'group': 2 * labels + tubes, 'valid': valid}
  names = ['neg/no', 'neg/tube', 'pos/no', 'pos/tube']
  m = metrics.summarize_predictions(outputs, group_names=names, minority_groups=(1, 2))
  keep = valid > 0
  robust = keep & (((labels == 0) & (tubes == 1)) | ((labels == 1) & (tubes == 0)))
  for stage, z in ((m, logits), (m['stage1'], logits[:, ::-1])):
    prob = np.exp(z[:, 1]) / np.exp(z).sum(-1)
    assert stage['auroc'] == pytest.approx(roc_auc_score(labels[keep], prob[keep]), abs=1e-9)
    assert stage['worst_group_auroc'] == pytest.approx(
        roc_auc_score(labels[robust], prob[robust]), abs=1e-9)
  assert m['worst_group_auroc'] < m['auroc']  # the tube shortcut fails on the robust subset
  only_one_class = {**outputs, 'group': np.where(labels == 1, 2, 0)}  # robust subset: positives
  assert 'worst_group_auroc' not in metrics.summarize_predictions(
      only_one_class, group_names=names, minority_groups=(1, 2))
  assert 'worst_group_auroc' not in metrics.summarize_predictions(outputs)  # no groups


def test_fg_iou_over_the_labels_the_masks_outline():
  """SIIM-ACR: the dataset-level IoU over positives; a negative's empty mask is left out."""
  inter = np.array([3, 0, 5, 0, 7])
  union = np.array([6, 9, 10, 4, 7])
  labels = np.array([1, 0, 1, 0, 1])
  outputs = {'logits': np.zeros((5, 2), np.float32), 'label': labels, 'group': -np.ones(5, int),
             'valid': np.array([1, 1, 1, 1, 0]), 'fg_intersection': inter, 'fg_union': union}
  everything = metrics.summarize_predictions(outputs)
  assert everything['fg_iou'] == (3 + 5) / (6 + 9 + 10 + 4)
  positives = metrics.summarize_predictions(outputs, mask_labels=(1,))
  assert positives['fg_iou'] == (3 + 5) / (6 + 10)  # example 4 is padding
  assert positives['fg_iou_image_mean'] == pytest.approx((3 / 6 + 5 / 10) / 2)
