"""Part thresholds (reference 8.2): calibrated on a split, read back for interventions.

A token whose distance to its part exceeds the part's threshold (rule 'distance', the paper's)
or whose dot product falls below it ('dot_product', the reference code's) becomes background.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ifam_jax.apply import apply
from ifam_jax.evaluators import loop
from ifam_jax.evaluators.common import read_json_object

THRESHOLD_RULES = ('distance', 'dot_product')


# ----------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------
class PartSample:
  """A uniform sample without replacement of at most `capacity` rows: those of the smallest
  random keys. All rows (so exact percentiles) until more arrive; memory stays O(capacity) on
  any split, which matters on ImageNet (~330M tokens per pass at 224 px)."""

  def __init__(self, capacity: int, rng: np.random.Generator):
    self.capacity, self.rng = capacity, rng
    self.seen = 0
    self._rows: list[np.ndarray] = []
    self._keys: list[np.ndarray] = []
    self._size = 0

  def add(self, rows: np.ndarray) -> None:
    self.seen += len(rows)
    self._rows.append(rows)
    self._keys.append(self.rng.random(len(rows)))
    self._size += len(rows)
    if self._size > 2 * self.capacity:
      self._compact()

  def _compact(self) -> None:
    rows, keys = np.concatenate(self._rows), np.concatenate(self._keys)
    if len(keys) > self.capacity:
      keep = np.argpartition(keys, self.capacity - 1)[:self.capacity]
      rows, keys = rows[keep], keys[keep]
    self._rows, self._keys, self._size = [rows], [keys], len(keys)

  def rows(self) -> np.ndarray:
    if self._rows:
      self._compact()
    return self._rows[0] if self._rows else np.zeros((0, 2), np.float32)


def make_calibration_step(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """(params, frozen, batch, rng) -> per token: the 'assigned' part (argmax of the part maps,
  noisy if the model's eval noise is on, as the reference's), its squared 'distance' and 'dot'."""

  def calibration_step(params, frozen, batch, rng):
    out = apply(graphdef, rest, params, frozen, batch['image'], train=False, rng=rng)
    assigned = jnp.argmax(out.part_maps, axis=-1)

    def pick(x):
      return jnp.take_along_axis(x, assigned[..., None], axis=-1)[..., 0]

    return {'assigned': assigned, 'distance': -pick(out.part_logits),
            'dot': pick(out.part_similarity)}

  return calibration_step


def calibrate(batches: Iterable[Mapping[str, np.ndarray]], num_parts: int,
              percentiles: Sequence[float], capacity: int, seed: int = 0
              ) -> tuple[dict[str, dict[float, list[float | None]]], list[int]]:
  """Per-part thresholds at each percentile q, for both rules, and the tokens seen per part.

  'distance': the q-th percentile of the squared distances of the tokens assigned to part k (a
  token farther than it becomes background). 'dot_product': the reference's low quantile
  1 - q/100 of their dot products. numpy's linear interpolation; None for a part no token was
  assigned to.

  Args:
    batches: per-token 'assigned', 'distance', 'dot' [B, ...] and per-example 'valid' [B].
  """
  rng = np.random.default_rng(seed)
  samples = [PartSample(capacity, rng) for _ in range(num_parts)]
  for batch in batches:
    assigned = batch['assigned']
    valid = (batch['valid'] > 0).reshape((-1,) + (1,) * (assigned.ndim - 1))
    valid = np.broadcast_to(valid, assigned.shape)
    parts = assigned[valid]
    rows = np.stack([batch['distance'][valid], batch['dot'][valid]], axis=-1)
    for k, sample in enumerate(samples):
      sample.add(rows[parts == k])
  values = [s.rows() for s in samples]
  thresholds: dict[str, dict[float, list[float | None]]] = {r: {} for r in THRESHOLD_RULES}
  for q in percentiles:
    thresholds['distance'][q] = [float(np.percentile(v[:, 0], q)) if len(v) else None
                                 for v in values]
    thresholds['dot_product'][q] = [float(np.quantile(v[:, 1], (100 - q) / 100)) if len(v)
                                    else None for v in values]
  return thresholds, [s.seen for s in samples]


@dataclasses.dataclass
class Calibration:
  """`calibrate` over one source: the thresholds at each of `percentiles`, the tokens per part.

  `run`'s predict function yields `make_calibration_step`'s outputs and is jitted. A part with
  more tokens than config.eval.calibration_sample gets the percentiles of a uniform sample.
  """

  source: Any
  transform: Any
  config: ml_collections.ConfigDict
  batch_sharding: Any
  percentiles: Sequence[float] = (97, 99)

  def run(self, predict: Callable, params: Any, frozen: Any
          ) -> tuple[dict[str, dict[float, list[float | None]]], list[int]]:
    ds, num_batches = loop.eval_dataset(self.source, self.transform, self.config)
    batches = loop.gather_outputs(predict, params, frozen, ds, num_batches, self.batch_sharding,
                                  self.config.seed)
    return calibrate(batches, self.config.model.num_parts, self.percentiles,
                     self.config.eval.calibration_sample, self.config.seed)


# ----------------------------------------------------------------------------
# Threshold files
# ----------------------------------------------------------------------------
def load_thresholds(path: str | os.PathLike, num_parts: int,
                    rule: str = '') -> tuple[tuple[float, ...], str]:
  """(thresholds, rule) of a threshold file, checked against the model.

  Ours: {"rule": ..., "q": ..., "thresholds": [K values]}. The reference's: {"0": tau_0, ...}
  (read by key, not in file order as the reference does); it names no rule, so `rule` must
  (the reference's files are 'dot_product'). A null threshold rejects nothing.
  """
  raw = read_json_object(path, 'part thresholds', '{"rule": ..., "thresholds": [...]}')
  if 'thresholds' in raw:
    values, file_rule = raw['thresholds'], raw.get('rule', '')
  elif set(raw) == {str(k) for k in range(len(raw))}:
    values, file_rule = [raw[str(k)] for k in range(len(raw))], ''
  else:
    raise ValueError(f'part thresholds {path}: expected {{"rule", "thresholds": [...]}} or the '
                     f'reference\'s {{"0": ..., "K-1": ...}}, got keys {sorted(raw)[:5]}')
  if rule and file_rule and rule != file_rule:
    raise ValueError(f'part thresholds {path} are for rule {file_rule!r}, not {rule!r}')
  rule = rule or file_rule
  if rule not in THRESHOLD_RULES:
    raise ValueError(f'part thresholds {path}: rule {rule!r} is not one of {THRESHOLD_RULES} '
                     '(set eval.threshold_rule for the reference\'s files: dot_product)')
  if not isinstance(values, list) or len(values) != num_parts:
    count = len(values) if isinstance(values, list) else type(values).__name__
    raise ValueError(f'part thresholds {path} hold {count} values; the model has '
                     f'{num_parts} parts')
  if any(isinstance(v, bool) or not isinstance(v, (int, float, type(None))) for v in values):
    raise ValueError(f'part thresholds {path}: values must be numbers or null, got {values}')
  off = math.inf if rule == 'distance' else -math.inf
  return tuple(off if v is None else float(v) for v in values), rule
