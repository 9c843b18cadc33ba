"""The mask-geometry audit on constructed masks whose answer is known, against scikit-learn."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ifam_jax.data import SyntheticSpuriousSource
from ifam_jax.evaluators import leak

CLASSES = ['landbird', 'waterbird']
PLACES = ['land', 'water']
HW = 16  # a 4x4 patch grid


def either_way(auc):
  return max(auc, 1 - auc)


def assert_probe_is_sklearns(report, masks, labels, attribute):
  assert report['probe_auroc'] == pytest.approx(
      sklearn_probe_auroc(masks, labels, attribute, within_class_folds(labels, attribute)),
      abs=0.01)


def run(masks, labels, attribute, **kw):
  kw.setdefault('class_names', CLASSES)
  kw.setdefault('attribute_names', PLACES)
  kw.setdefault('noun', 'background')
  return leak.geometry_leak(masks, labels, attribute, **kw)


def balanced(n_per_group, num_classes=2, num_values=2):
  """Labels and attribute values, n_per_group of every (class, value) pair."""
  pairs = [(c, a) for c in range(num_classes) for a in range(num_values)
           for _ in range(n_per_group)]
  labels, attribute = (np.array(x) for x in zip(*pairs))
  return labels, attribute


def random_masks(rng, n, counts):
  """[n, HW] masks with counts[i] visible patches at random places."""
  masks = np.zeros((n, HW), np.float32)
  for i, k in enumerate(counts):
    masks[i, rng.permutation(HW)[:k]] = 1
  return masks


def sklearn_probe_auroc(masks, labels, attribute, folds):
  """Our probe by scikit-learn: per class, out-of-fold L2 logistic regression (C=1) on the bits
  and the visible fraction, over the given folds; AUROC (macro one-vs-rest) averaged over
  classes."""
  x = np.concatenate([masks, masks.mean(1, keepdims=True)], axis=1)
  per_class = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    y, f = attribute[idx], folds[idx]
    scores = np.zeros((idx.size, np.unique(y).size))
    for k in np.unique(f):
      clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x[idx][f != k], y[f != k])
      scores[f == k] = clf.predict_proba(x[idx][f == k])
    per_class.append(roc_auc_score(y, scores[:, 1]) if scores.shape[1] == 2 else
                     roc_auc_score(y, scores, multi_class='ovr', average='macro'))
  return float(np.mean(per_class))


def within_class_folds(labels, attribute):
  folds = np.empty(len(labels), np.int64)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    folds[idx] = leak.stratified_folds(attribute[idx], leak.PROBE_FOLDS, leak.PROBE_SEED)
  return folds


# ----------------------------------------------------------------------------
# AUROCs
# ----------------------------------------------------------------------------
def test_count_determines_the_attribute():
  rng = np.random.default_rng(0)
  labels, attribute = balanced(40)
  masks = random_masks(rng, len(labels), np.where(attribute == 1, 6, 2))
  report = run(masks, labels, attribute)
  assert report['count_auroc'] == 1.0
  assert report['per_class']['landbird'] == {'num_images': 80, 'count_auroc': 1.0,
                                             'probe_auroc': pytest.approx(1.0, abs=0.02)}
  assert report['auroc'] == 1.0 and report['auroc_from'] == 'count'  # a tie goes to the count
  assert report['leak']
  assert report['verdict'].startswith('the mask leaks the background: AUROC 1.00 from mask '
                                      'geometry alone (count)')
  # The count's AUROC does not depend on the direction: fewer patches on water leaks as well.
  flipped = run(random_masks(rng, len(labels), np.where(attribute == 1, 2, 6)), labels, attribute)
  assert flipped['count_auroc'] == 1.0


def test_masks_independent_of_the_attribute_are_no_leak():
  rng = np.random.default_rng(1)
  labels, attribute = balanced(150)
  masks = (rng.random((len(labels), HW)) < 0.4).astype(np.float32)
  report = run(masks, labels, attribute)
  count = masks.sum(1)
  want = np.mean([either_way(roc_auc_score(attribute[labels == c], count[labels == c]))
                  for c in (0, 1)])
  assert report['count_auroc'] == pytest.approx(want, abs=1e-12)
  # AUROC's standard deviation under no effect, 150 vs 150: sqrt(301 / (12 * 150^2)) = 0.033
  # per class; four of them.
  sd = np.sqrt(301 / (12 * 150**2))
  for c in CLASSES:
    assert abs(report['per_class'][c]['count_auroc'] - 0.5) < 4 * sd
    assert abs(report['per_class'][c]['probe_auroc'] - 0.5) < 4 * sd
  assert not report['leak'] and report['verdict'].startswith('no geometry leak: AUROC 0.')
  assert_probe_is_sklearns(report, masks, labels, attribute)


def test_a_position_only_leak_is_seen_by_the_probe_not_the_count():
  rng = np.random.default_rng(2)
  labels, attribute = balanced(40)
  masks = np.zeros((len(labels), HW), np.float32)
  for i, a in enumerate(attribute):  # three patches each; patch 0 is visible on water only
    masks[i, ([0] if a else []) + list(1 + rng.permutation(HW - 1)[:3 - a])] = 1
  assert np.all(masks.sum(1) == 3)
  report = run(masks, labels, attribute)
  assert report['count_auroc'] == 0.5  # every count tied
  assert report['probe_auroc'] > 0.95
  assert report['auroc_from'] == 'probe' and report['leak']
  assert_probe_is_sklearns(report, masks, labels, attribute)


def test_a_mask_that_encodes_only_the_class_is_no_leak():
  """Class 0 shows patches of the top half, class 1 of the bottom half; 90 % of class 0 sit on
  land and of class 1 on water. Pooled over classes the mask predicts the place well; within a
  class it cannot."""
  rng = np.random.default_rng(3)
  labels = np.repeat([0, 1], 200)
  attribute = np.where(rng.random(400) < 0.9, labels, 1 - labels)
  masks = np.zeros((400, HW), np.float32)
  for i, c in enumerate(labels):
    masks[i, 8 * c + rng.permutation(8)[:rng.integers(2, 7)]] = 1
  x = np.concatenate([masks, masks.mean(1, keepdims=True)], axis=1)
  pooled = np.zeros(400)
  folds = leak.stratified_folds(attribute, 5, 0)
  for k in range(5):
    clf = LogisticRegression().fit(x[folds != k], attribute[folds != k])
    pooled[folds == k] = clf.predict_proba(x[folds == k])[:, 1]
  assert roc_auc_score(attribute, pooled) > 0.85  # the class, read through the mask
  report = run(masks, labels, attribute)
  assert report['auroc'] < 0.7 and not report['leak']


def test_more_than_two_values_use_the_macro_one_vs_rest_auroc():
  rng = np.random.default_rng(4)
  values = ['land', 'water', 'desert']
  labels, attribute = balanced(20, num_values=3)
  masks = random_masks(rng, len(labels), np.array([1, 3, 5])[attribute])
  report = run(masks, labels, attribute, attribute_names=values)
  # One-vs-rest on the count: 'land' (fewest) 1, 'desert' (most) 1, 'water' (middle: below
  # half of the rest, above the other half) 0.5.
  assert report['count_auroc'] == pytest.approx((1 + 0.5 + 1) / 3)
  assert_probe_is_sklearns(report, masks, labels, attribute)


def test_classes_or_values_with_too_few_images_are_left_out():
  rng = np.random.default_rng(5)
  labels, attribute = balanced(10)
  keep = ~((labels == 1) & (attribute == 1))  # class 1 only ever on land
  keep[np.flatnonzero((labels == 0) & (attribute == 1))[4:]] = False  # 4 < 5 folds of water
  masks = random_masks(rng, len(labels), rng.integers(1, 8, len(labels)))[keep]
  report = run(masks, labels[keep], attribute[keep])
  assert report['per_class'] == {} and report['auroc'] is None and not report['leak']
  assert report['verdict'].startswith('the geometry leak cannot be measured: no class holds two '
                                      'background values with 5 images each')


# ----------------------------------------------------------------------------
# Rates, shares, verdict
# ----------------------------------------------------------------------------
def test_empty_rates_visible_fractions_and_edge_shares_by_hand():
  # Four images on a 2x2 grid: landbird/land, landbird/water, waterbird/water (two).
  masks = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
  labels = np.array([0, 0, 1, 1])
  attribute = np.array([0, 1, 1, 1])
  truth = np.array([[1.0, 0.5, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0.25, 0, 1, 0]])
  report = run(masks, labels, attribute, gt_fraction=truth)
  assert report['empty_rate'] == 0.25
  assert report['empty_rate_by_attribute'] == {'land': 0.0, 'water': pytest.approx(1 / 3)}
  assert report['empty_rate_by_group'] == {'landbird/land': 0.0, 'landbird/water': 1.0,
                                           'waterbird/water': 0.0}
  assert report['visible_fraction'] == 6 / 16
  assert report['visible_fraction_by_group'] == {'landbird/land': 0.5, 'landbird/water': 0.0,
                                                 'waterbird/water': 0.5}
  # Visible patches: fractions 1, 0.5 | - | 0 | 0.25, 0, 1 -> edges 0.5 and 0.25, background two.
  assert report['edge_share'] == 2 / 6 and report['background_share'] == 2 / 6
  assert report['edge_share_by_group'] == {'landbird/land': 0.5, 'landbird/water': None,
                                           'waterbird/water': 0.25}
  assert report['background_share_by_group']['waterbird/water'] == 0.5
  assert 'edge_share' not in run(masks, labels, attribute)  # no ground truth, no shares


def test_verdict_names_the_attribute_auroc_and_empty_rates():
  rng = np.random.default_rng(6)
  labels, attribute = balanced(100)
  empty = rng.random(len(labels)) < np.where(attribute == 1, 0.7, 0.1)
  masks = random_masks(rng, len(labels), np.where(empty, 0, 4))
  report = run(masks, labels, attribute)
  water = empty[attribute == 1].mean()
  land = empty[attribute == 0].mean()
  assert report['empty_rate_by_attribute'] == {'land': land, 'water': water}
  auc = report['auroc']
  assert report['count_auroc'] == pytest.approx(np.mean(
      [roc_auc_score(attribute[labels == c], empty[labels == c]) for c in (0, 1)]))
  assert report['verdict'] == (f'the mask leaks the background: AUROC {auc:.2f} from mask geometry '
                               f"alone ({report['auroc_from']}), empty on {100 * water:.0f}% of "
                               f"'water' vs {100 * land:.0f}% of 'land'")
  assert not run(masks, labels, attribute, threshold=0.99)['leak']


def test_stratified_folds_deal_every_value_evenly():
  y = np.array([0] * 13 + [1] * 7 + [2] * 5)
  folds = leak.stratified_folds(y, 5, 0)
  for value in range(3):
    sizes = np.bincount(folds[y == value], minlength=5)
    assert sizes.max() - sizes.min() <= 1
  assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
  np.testing.assert_array_equal(folds, leak.stratified_folds(y, 5, 0))


def test_patch_truth_is_the_foreground_fraction_of_each_patch():
  pixels = np.zeros((1, 4, 4), np.uint8)
  pixels[0, :2, :2] = 1  # patch (0, 0) full
  pixels[0, 0, 2] = 7  # one pixel of patch (0, 1)
  got = leak.patch_truth(jnp.asarray(pixels), jnp.zeros((1, 2, 2)))
  np.testing.assert_array_equal(np.asarray(got), [[1.0, 0.25, 0.0, 0.0]])


# ----------------------------------------------------------------------------
# The attribute of a group layout; the config
# ----------------------------------------------------------------------------
def test_attribute_values_of_product_group_layouts():
  waterbirds = ['landbird/land', 'landbird/water', 'waterbird/land', 'waterbird/water']
  assert leak.attribute_values(CLASSES, waterbirds) == PLACES
  synthetic = SyntheticSpuriousSource(9, num_classes=3, split='val')
  values = leak.attribute_values(synthetic.class_names, synthetic.group_names)
  assert values == ['land', 'water', 'desert']
  for i in range(9):  # group % 3 is the background the group's name says
    group = synthetic[i]['group']
    assert synthetic.group_names[group] == f'{synthetic.class_names[i % 9 // 3]}/{values[i % 3]}'
    assert values[group % 3] == synthetic.group_names[group].split('/')[1]
  assert synthetic.spurious_attribute == 'background'
  assert leak.attribute_values(['cat', 'dog'], ['cat(sofa)', 'cat(bed)', 'dog(bag)']) is None
  assert leak.attribute_values(['cat', 'dog'], ['cat/a', 'cat/b', 'dog/b', 'dog/a']) is None
  assert leak.attribute_values(['a', 'b'], []) is None


def test_config_is_checked():
  config = ml_collections.ConfigDict({'eval': {'leak_num_images': 0,
                                               'leak_auroc_threshold': 0.75}})
  with pytest.raises(ValueError, match='eval.leak_num_images'):
    leak.check_config(config)
  config.eval.leak_num_images = 10
  config.eval.leak_auroc_threshold = 0.3
  with pytest.raises(ValueError, match='eval.leak_auroc_threshold'):
    leak.check_config(config)


@pytest.mark.parametrize('tied', [True, False])
def test_a_variant_built_to_leak_is_reported_and_its_control_is_not(tied):
  """The demo's `tied_size` variant draws larger objects on one background: even a perfect
  segmentation's patch count tells the background, so the audit must call it a leak; the same
  data without the tie must not be called one."""
  source = SyntheticSpuriousSource(256, split='test', seed=3, size_tied_to_background=tied)
  records = [source[i] for i in range(len(source))]
  pixels = np.stack([r['fg_mask'] for r in records]).astype(np.float32)
  # A perfect mask: the patches the object fills at least half of (8-px patches at 64 px).
  fraction = pixels.reshape(-1, 8, 8, 8, 8).mean(axis=(2, 4)).reshape(len(records), -1)
  labels = np.array([r['label'] for r in records])
  attribute = np.array([r['group'] for r in records]) % 2
  report = leak.geometry_leak((fraction >= 0.5).astype(np.float32), labels, attribute,
                              class_names=source.class_names, attribute_names=['land', 'water'],
                              gt_fraction=fraction, noun='background')
  assert report['leak'] == tied
  if tied:
    assert report['auroc'] >= 0.85
    assert report['verdict'].startswith('the mask leaks the background')
  else:
    assert report['auroc'] < 0.7
  assert report['background_share'] == 0.0  # a perfect mask shows no background-only patch
