"""Calibration against numpy, the bounded uniform sample, threshold files."""

import json

import numpy as np
import pytest

from ifam_jax.evaluators import thresholds as thresholds_lib


def test_calibration_percentiles_match_numpy():
  rng = np.random.default_rng(0)
  batches = [{'assigned': rng.choice([0, 1, 3], size=(5, 4, 4)),  # part 2 never; 3 = background
              'distance': rng.gamma(2.0, size=(5, 4, 4)).astype(np.float32),
              'dot': rng.normal(size=(5, 4, 4)).astype(np.float32),
              'valid': np.array([1, 1, 1, 0, 1])} for _ in range(3)]
  thresholds, counts = thresholds_lib.calibrate(iter(batches), 3, (97, 99), capacity=10_000)
  keep = [b['valid'] > 0 for b in batches]
  for k in range(2):
    distances = np.concatenate([b['distance'][v][b['assigned'][v] == k]
                                for b, v in zip(batches, keep)])
    dots = np.concatenate([b['dot'][v][b['assigned'][v] == k] for b, v in zip(batches, keep)])
    assert counts[k] == distances.size
    for q in (97, 99):
      assert thresholds['distance'][q][k] == np.percentile(distances, q)
      assert thresholds['dot_product'][q][k] == np.quantile(dots, 1 - q / 100)
  assert counts[2] == 0 and thresholds['distance'][99][2] is None
  assert thresholds['dot_product'][97][2] is None


def test_part_sample_is_bounded_and_uniform():
  rng = np.random.default_rng(0)
  sample = thresholds_lib.PartSample(1000, rng)
  for start in range(0, 20_000, 700):
    values = np.arange(start, min(start + 700, 20_000), dtype=np.float32)
    sample.add(np.stack([values, -values], axis=-1))
  rows = sample.rows()
  assert sample.seen == 20_000 and rows.shape == (1000, 2)
  assert np.unique(rows[:, 0]).size == 1000 and np.array_equal(rows[:, 1], -rows[:, 0])
  assert abs(np.median(rows[:, 0]) - 10_000) < 1000  # an unbiased sample of 0..19999


def test_load_thresholds(tmp_path):
  path = tmp_path / 't.json'
  path.write_text(json.dumps({'rule': 'distance', 'q': 99, 'thresholds': [1.5, None, 3]}))
  assert thresholds_lib.load_thresholds(path, 3) == ((1.5, np.inf, 3.0), 'distance')
  with pytest.raises(ValueError, match='hold 3 values; the model has 2 parts'):
    thresholds_lib.load_thresholds(path, 2)
  with pytest.raises(ValueError, match="for rule 'distance', not 'dot_product'"):
    thresholds_lib.load_thresholds(path, 3, 'dot_product')
  path.write_text(json.dumps({'1': 0.25, '0': 0.5}))  # the reference's format, keys by part
  assert thresholds_lib.load_thresholds(path, 2, 'dot_product') == ((0.5, 0.25), 'dot_product')
  with pytest.raises(ValueError, match='set eval.threshold_rule'):
    thresholds_lib.load_thresholds(path, 2)
  for content, error in (({'rule': 'cosine', 'thresholds': [1]}, "rule 'cosine'"),
                         ({'a': 1}, 'expected'), ({'rule': 'distance', 'thresholds': ['x']},
                                                  'numbers or null')):
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
      thresholds_lib.load_thresholds(path, 1)
  with pytest.raises(ValueError, match='cannot read'):
    thresholds_lib.load_thresholds(tmp_path / 'missing.json', 1)
