"""Evaluation: metrics, the one eval loop (training's evals use it too), interventions, audit.

A jitted step yields per-example outputs; they are gathered to the host in global batch order
and reduced there with numpy (reference section 7). The entry points load <workdir>/params/<which>
onto the configured mesh, write a JSON report and print a table on process 0:

  run_eval            every selected eval set: summarize_predictions' metrics for both stages;
                      IN-9 variants (ImageNet-1K models through in_to_in9.json), BG-GAP and the
                      adversarial-background challenge -> eval/<which>/eval.json
  run_calibrate       per-part thresholds from the training split, both rules
                      -> thresholds/<which>/<rule>_q<q>.json
  run_leave_one_out   one row per removed part (reference 8.1) -> eval/<which>/leave_one_out*.json
  run_audit           stage 2 re-run with every masked-out pixel replaced: its logits must not
                      change by a single bit -> eval/<which>/audit.json

`config.eval.thresholds` applies a threshold file to every evaluation of these entry points.
Evaluation is deterministic; a model with `eval_gumbel_noise` draws its noise from
fold_in(config.seed, batch index), reproducible for a fixed eval batch size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ifam_jax import data as data_lib
from ifam_jax import optim, sharding
from ifam_jax.data.sources import IN9_CLASSES
from ifam_jax.models.ifam import PART_REMOVALS, Intervention, stage2_mask_facts

THRESHOLD_RULES = ('distance', 'dot_product')
# fold_in tags of the per-batch key, besides the model's own use of it.
RNG_AUDIT_NOISE = 1 << 20


# ----------------------------------------------------------------------------
# Metrics (host numpy)
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
  the minimum over `minority_groups` only. `class_map` sends the model's classes to the eval's
  (ImageNet -> IN-9, -1 never right); top-5 and AUROC are then undefined and left out.
  """
  pred = np.argmax(logits, axis=-1)
  if class_map is not None:
    pred = class_map[pred]
  correct = pred == labels
  per_class = _accuracy_by(correct, labels, class_names)
  metrics = {'accuracy': float(correct.mean()),
             'macro_accuracy': float(np.mean(list(per_class.values()))),
             'class_accuracy': per_class}
  num_classes = logits.shape[-1]
  if class_map is None and num_classes > 5:
    top5 = np.argpartition(logits, -5, axis=-1)[:, -5:]
    metrics['top5_accuracy'] = float(np.any(top5 == labels[:, None], axis=-1).mean())
  if class_map is None and num_classes == 2 and np.unique(labels).size == 2:
    z = logits.astype(np.float64)
    metrics['auroc'] = auroc(1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1])), labels == 1)
  if len(group_names):
    per_group = _accuracy_by(correct, groups, group_names)
    metrics.update(group_accuracy=per_group,
                   mean_group_accuracy=float(np.mean(list(per_group.values()))),
                   worst_group_accuracy=min(per_group.values()))
    minority = [per_group[group_names[g]] for g in minority_groups
                if group_names[g] in per_group]
    if minority:
      metrics['worst_group_accuracy_minority'] = min(minority)
  return metrics


def summarize_predictions(outputs: Mapping[str, np.ndarray], *, class_names: Sequence[str] = (),
                          group_names: Sequence[str] = (), minority_groups: Sequence[int] = (),
                          class_map: np.ndarray | None = None) -> dict[str, Any]:
  """The eval metrics of gathered per-example outputs (see `make_eval_step`), valid ones only.

  Stage 2 at the top level, stage 1 under 'stage1'; the mean foreground fraction; with
  ground-truth masks the dataset-level foreground IoU (sum of intersections / sum of unions, as
  the reference) and the mean of per-image IoUs (images with an empty union left out).
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
    inter = outputs['fg_intersection'][keep].astype(np.float64)
    union = outputs['fg_union'][keep].astype(np.float64)
    if union.sum():
      nonempty = union > 0
      metrics['fg_iou'] = float(inter.sum() / union.sum())
      metrics['fg_iou_image_mean'] = float(np.mean(inter[nonempty] / union[nonempty]))
  return metrics


def minority_groups(source: Any) -> tuple[int, ...]:
  """Groups whose (class, attribute) pairing is the rare one in training, per known source.

  Waterbirds: landbird/water and waterbird/land, the reference's WGA subset (7.2). Synthetic:
  a shape on another class's background. Other sources define none (MetaShift's test set holds
  one group per class, so its worst-group accuracy already is the reference's).
  """
  if isinstance(source, data_lib.WaterbirdsSource):
    return (1, 2)
  if isinstance(source, data_lib.SyntheticSpuriousSource):
    c = source.num_classes
    return tuple(g for g in range(c * c) if g // c != g % c)
  return ()


# ----------------------------------------------------------------------------
# The eval loop
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


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, config: ml_collections.ConfigDict,
                   intervention: Intervention | None = None) -> Callable:
  """(params, frozen, batch, rng) -> per-example outputs.

  'logits' [B, C] of stage 2 (or of the baseline ViT); for iFAM also 'logits1' (stage 1),
  'fg_fraction' and, when the batch carries a ground-truth 'fg_mask', `fg_overlap`'s counts.
  """
  baseline = config.model.kind == 'baseline'
  if baseline and intervention is not None:
    raise ValueError('interventions edit the iFAM mask; the baseline has none')

  def eval_step(params, frozen, batch, rng):
    model = nnx.merge(graphdef, params, frozen, rest)
    images = data_lib.normalize(batch['image'])
    if baseline:
      return {'logits': model(images)}
    out = model(images, train=False, rng=rng, intervention=intervention)
    result = {'logits': out.logits, 'logits1': out.stage1_logits,
              'fg_fraction': jnp.mean(out.fg_mask, axis=(1, 2))}
    if 'fg_mask' in batch:
      result.update(fg_overlap(out.fg_mask, batch['fg_mask']))
    return result

  return eval_step


def gather_outputs(step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
                   num_batches: int, batch_sharding: Any, seed: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Runs `step(params, frozen, batch, rng)` on each batch; yields its outputs and the batch's
  label, group and valid flag as host arrays.

  Every batch entry becomes a global array and is gathered with the outputs, so all come back in
  the global batch order, which follows the mesh's device order and need not follow the process
  order (it does not on TPU slices). Batch i draws its randomness from fold_in(seed, i).
  """
  for i, batch in zip(range(num_batches), dataset):
    arrays = data_lib.global_batch(dict(batch), batch_sharding)
    out = dict(step(params, frozen, arrays, jax.random.fold_in(jax.random.key(seed), i)))
    out.update({k: arrays[k] for k in ('label', 'group', 'valid')})
    yield {k: np.asarray(v)
           for k, v in multihost_utils.process_allgather(out, tiled=True).items()}


def collect_outputs(step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
                    num_batches: int, batch_sharding: Any, seed: int) -> dict[str, np.ndarray]:
  """`gather_outputs` of every batch, concatenated."""
  batches = list(gather_outputs(step, params, frozen, dataset, num_batches, batch_sharding, seed))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def evaluate(eval_step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
             num_batches: int, batch_sharding: Any, group_names: Sequence[str], seed: int, *,
             class_names: Sequence[str] = (), minority_groups: Sequence[int] = (),
             class_map: np.ndarray | None = None) -> dict[str, Any]:
  """One ordered, padded pass over an eval dataset; `summarize_predictions` of its outputs.

  Logits stay on every host until the pass ends (top-5 and AUROC need them): ImageNet's val
  set takes ~0.4 GB for both stages' 1000-way logits.
  """
  outputs = collect_outputs(eval_step, params, frozen, dataset, num_batches, batch_sharding, seed)
  return summarize_predictions(outputs, class_names=class_names, group_names=group_names,
                               minority_groups=minority_groups, class_map=class_map)


def eval_dataset(source: Any, transform: Any, config: ml_collections.ConfigDict) -> tuple[Any, int]:
  """(dataset, number of batches) of one ordered, padded eval pass over `source`."""
  ds = data_lib.make_dataset(source, transform=transform,
                             global_batch_size=config.data.eval_batch_size, seed=config.seed,
                             train=False, num_workers=config.data.num_workers)
  return ds, data_lib.num_eval_batches(len(source), config.data.eval_batch_size,
                                       jax.process_count())


def evaluate_source(eval_step: Callable, params: Any, frozen: Any, source: Any, transform: Any,
                    config: ml_collections.ConfigDict, batch_sharding: Any,
                    class_map: np.ndarray | None = None) -> dict[str, Any]:
  """`evaluate` over one source, named by its classes and groups, with its minority groups."""
  ds, num_batches = eval_dataset(source, transform, config)
  return evaluate(eval_step, params, frozen, ds, num_batches, batch_sharding, source.group_names,
                  config.seed, class_names=source.class_names,
                  minority_groups=minority_groups(source), class_map=class_map)


# ----------------------------------------------------------------------------
# ImageNet-9: class mapping and the adversarial-background challenge
# ----------------------------------------------------------------------------
def _read_json_object(path: str | os.PathLike, what: str, expected: str) -> dict[str, Any]:
  """A user-supplied JSON object (local or gs://); errors name the file and what was expected."""
  try:
    raw = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {what} {path}: {e}') from None
  if not isinstance(raw, dict):
    raise ValueError(f'{what} {path}: expected a JSON object {expected}')
  return raw


def load_in9_mapping(path: str | os.PathLike, num_classes: int) -> np.ndarray:
  """in_to_in9.json ({"<model class>": IN-9 class 0..8 or -1}) as an int array over all classes."""
  raw = _read_json_object(path, 'the IN-9 mapping', '{"<class>": <IN-9 class>}')
  table = np.full(num_classes, -2, np.int64)
  for key, value in raw.items():
    if not (key.isdigit() and int(key) < num_classes):
      raise ValueError(f'IN-9 mapping {path}: key {key!r} is not a class of the model '
                       f'(0..{num_classes - 1})')
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < len(IN9_CLASSES):
      raise ValueError(f'IN-9 mapping {path}: class {key} maps to {value!r}, not -1..8')
    table[int(key)] = value
  missing = np.flatnonzero(table == -2)
  if missing.size:
    raise ValueError(f'IN-9 mapping {path} lacks {missing.size} of the model\'s {num_classes} '
                     f'classes (first: {missing[:5].tolist()}); map unused classes to -1')
  return table


def bg_gap(in9_accuracy: Mapping[str, float]) -> float:
  """BG-GAP = accuracy(mixed_same) - accuracy(mixed_rand) (reference 7.7)."""
  return in9_accuracy['mixed_same'] - in9_accuracy['mixed_rand']


def _load_foreground(path: pathlib.Path) -> np.ndarray:
  """A foreground mask .npy as uint8; never unpickles, which could run code from the file."""
  try:
    return np.load(path, allow_pickle=False).astype(np.uint8)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f'foreground mask {path}: {e}; it must be a plain (non-object) '
                     'array') from None


def challenge_foregrounds(root: str | pathlib.Path, transform: Any
                          ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """(image uint8 [S, S, 3], mask bool [S, S], IN-9 label) for each fg_mask/val/<class>/<x>.npy
  with its image original/val/<class>/<x>.JPEG, in the reference's sorted order."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(0)  # the eval transforms draw nothing
  for folder in sorted(p for p in (root / 'fg_mask' / 'val').iterdir() if p.is_dir()):
    if folder.name not in IN9_CLASSES:
      raise ValueError(f'{folder} is not an IN-9 class folder {IN9_CLASSES}')
    for mask_path in sorted(folder.glob('*.npy')):
      image_path = root / 'original' / 'val' / folder.name / (mask_path.stem + '.JPEG')
      record = {'image': image_path.read_bytes(), 'label': IN9_CLASSES.index(folder.name),
                'group': -1, 'fg_mask': _load_foreground(mask_path)}
      out = data_lib.transforms.process(record, rng, transform)
      if not out['valid']:
        raise ValueError(f'challenge foreground {image_path} is unreadable')
      yield out['image'], out['fg_mask'] > 0, int(out['label'])


def bg_challenge(eval_step: Callable, params: Any, frozen: Any,
                 foregrounds: Iterable[tuple[np.ndarray, np.ndarray, int]],
                 backgrounds: Sequence[Mapping[str, np.ndarray]], batch_sharding: Any, seed: int,
                 class_map: np.ndarray | None = None) -> dict[str, Any]:
  """The adversarial-background challenge (reference 7.7).

  Each foreground is pasted (mask * fg + (1 - mask) * bg) on every background; it is vulnerable
  if any composite is misclassified, and the search stops at the first background batch that
  fools the model, as the reference's does. Accuracy = 1 - fraction vulnerable. The cost is up
  to |foregrounds| x |backgrounds| forward passes: about 4k x 4k = 16M on the IN-9 release, a
  few GPU-hours for ViT-B (backgrounds are decoded once and kept in host memory, ~0.6 GB).

  Args:
    eval_step: as `make_eval_step` (not jitted; its 'logits' are used).
    foregrounds: (image, mask, label) as `challenge_foregrounds` yields them.
    backgrounds: per-process eval batches ('image', 'valid') of the only_bg_t images.
  """
  table = None if class_map is None else jnp.asarray(class_map)

  @jax.jit
  def misclassified(params, frozen, image, mask, label, batch, rng):
    composite = jnp.where(mask[None, :, :, None], image[None], batch['image'])
    pred = jnp.argmax(eval_step(params, frozen, {'image': composite}, rng)['logits'], axis=-1)
    if table is not None:
      pred = table[pred]
    return jnp.any((pred != label) & (batch['valid'] > 0))

  total = vulnerable = 0
  for j, (image, mask, label) in enumerate(foregrounds):
    total += 1
    for i, batch in enumerate(backgrounds):
      arrays = data_lib.global_batch({k: batch[k] for k in ('image', 'valid')}, batch_sharding)
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), j), i)
      if bool(misclassified(params, frozen, image, mask, label, arrays, rng)):
        vulnerable += 1
        break
  return {'num_foregrounds': total, 'num_vulnerable': vulnerable,
          'accuracy': 1.0 - vulnerable / total if total else float('nan')}


# ----------------------------------------------------------------------------
# Part thresholds (reference 8.2)
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
    model = nnx.merge(graphdef, params, frozen, rest)
    out = model(data_lib.normalize(batch['image']), train=False, rng=rng)
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


def load_thresholds(path: str | os.PathLike, num_parts: int,
                    rule: str = '') -> tuple[tuple[float, ...], str]:
  """(thresholds, rule) of a threshold file, checked against the model.

  Ours: {"rule": ..., "q": ..., "thresholds": [K values]}. The reference's: {"0": tau_0, ...}
  (read by key, not in file order as the reference does); it names no rule, so `rule` must
  (the reference's files are 'dot_product'). A null threshold rejects nothing.
  """
  raw = _read_json_object(path, 'part thresholds', '{"rule": ..., "thresholds": [...]}')
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


# ----------------------------------------------------------------------------
# Audit: masked-out pixels cannot reach stage 2
# ----------------------------------------------------------------------------
def make_mask_step(graphdef: nnx.GraphDef, rest: nnx.State,
                   intervention: Intervention | None) -> Callable:
  """(params, frozen, batch, rng) -> the eval forward's 'fg_mask' [B, h, w], as 'patch_mask'
  [B, h*w], its 'kept_fraction', and the forward's 'logits'."""

  def mask_step(params, frozen, batch, rng):
    model = nnx.merge(graphdef, params, frozen, rest)
    out = model(data_lib.normalize(batch['image']), train=False, rng=rng,
                intervention=intervention)
    patch_mask = out.fg_mask.reshape(out.fg_mask.shape[0], -1)
    return {'fg_mask': out.fg_mask, 'patch_mask': patch_mask,
            'kept_fraction': jnp.mean(patch_mask, axis=-1), 'logits': out.logits}

  return mask_step


def make_stage2_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """(params, frozen, images uint8, patch_mask [B, h*w]) -> stage-2 logits, hard mask."""

  def stage2(params, frozen, images, patch_mask):
    model = nnx.merge(graphdef, params, frozen, rest)
    return model.stage2(data_lib.normalize(images), patch_mask)

  return stage2


@jax.jit
def replace_masked_out(images: jax.Array, fg_mask: jax.Array,
                       rng: jax.Array) -> dict[str, jax.Array]:
  """`images` with every pixel of a masked-out patch replaced by uniform noise, or by the pixel
  of the next image in the batch."""
  keep = upsample_patches(fg_mask > 0.5, images.shape[1], images.shape[2])[..., None]
  noise = jax.random.randint(rng, images.shape, 0, 256).astype(images.dtype)
  return {'noise': jnp.where(keep, images, noise),
          'other_image': jnp.where(keep, images, jnp.roll(images, 1, axis=0))}


@jax.jit
def bitwise_equal(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per row: are all float32 entries identical bit for bit (NaNs and signed zeros included)."""
  bits_a, bits_b = (jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
                    for x in (a, b))
  return jnp.all(bits_a == bits_b, axis=-1)


@jax.jit
def max_abs_diff(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(a - b), axis=-1)


def make_audit_step(forward: Callable, stage2: Callable) -> Callable:
  """An eval-loop step auditing stage 2 on one batch.

  `forward(params, frozen, batch, rng)` gives the eval mask as `make_mask_step` does;
  `stage2(params, frozen, images, patch_mask)` must run one jitted function on inputs of fixed
  shardings, so that its calls on the original and on the replaced images run one executable
  and their bits are comparable. Per example: 'unchanged_<replacement>', 'kept_fraction' and
  'forward_abs_diff' (stage 2 here against the forward's logits: that the audited function is
  the model's classifier).
  """

  def audit_step(params, frozen, batch, rng):
    out = forward(params, frozen, batch, rng)
    reference = stage2(params, frozen, batch['image'], out['patch_mask'])
    result = {'kept_fraction': out['kept_fraction'],
              'forward_abs_diff': max_abs_diff(reference, out['logits'])}
    replaced = replace_masked_out(batch['image'], out['fg_mask'],
                                  jax.random.fold_in(rng, RNG_AUDIT_NOISE))
    for kind, images in replaced.items():
      result[f'unchanged_{kind}'] = bitwise_equal(
          stage2(params, frozen, images, out['patch_mask']), reference)
    return result

  return audit_step


def summarize_audit(outputs: Mapping[str, np.ndarray], num_images: int) -> dict[str, Any]:
  """Fractions over the first `num_images` valid examples of gathered `make_audit_step` outputs."""
  keep = np.flatnonzero(outputs['valid'] > 0)[:num_images]
  summary: dict[str, Any] = {'num_images': int(keep.size)}
  for key in sorted(outputs):
    if key.startswith('unchanged_'):
      summary[key] = float(outputs[key][keep].mean())
  summary['mean_kept_fraction'] = float(outputs['kept_fraction'][keep].mean())
  summary['forward_max_abs_diff'] = float(outputs['forward_abs_diff'][keep].max())
  return summary


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------
_COLUMNS = (('acc', ('accuracy',)), ('top-5', ('top5_accuracy',)),
            ('macro', ('macro_accuracy',)), ('mean grp', ('mean_group_accuracy',)),
            ('worst grp', ('worst_group_accuracy',)),
            ('worst minority', ('worst_group_accuracy_minority',)), ('AUROC', ('auroc',)),
            ('stage 1', ('stage1', 'accuracy')), ('fg', ('fg_fraction',)),
            ('fg IoU', ('fg_iou',)), ('fg IoU/img', ('fg_iou_image_mean',)))


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table; floats as percentages with one decimal."""
  cells = [[f'{100 * v:.1f}' if isinstance(v, float) else str(v) for v in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

  def line(values):  # the row name left-aligned, numbers right-aligned
    return '| ' + ' | '.join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                             for i, (v, w) in enumerate(zip(values, widths))) + ' |'

  return '\n'.join([line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, cells)])


def metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """`format_table` of metrics dicts by row name, with the columns that any row has."""

  def get(metrics, path):
    for key in path:
      metrics = metrics.get(key, {}) if isinstance(metrics, Mapping) else {}
    return metrics if isinstance(metrics, float) else '-'

  columns = [(h, p) for h, p in _COLUMNS if any(get(m, p) != '-' for m in rows.values())]
  return format_table(['', 'n'] + [h for h, _ in columns],
                      [[name, m['num_examples']] + [get(m, p) for _, p in columns]
                       for name, m in rows.items()])


def _print(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Split:
  source: Any
  transform: Any
  class_map: np.ndarray | None = None
  in9_variant: str = ''  # the IN-9 variant ('mixed_same', ...) for BG-GAP; '' otherwise


class _Session:
  """The saved parameters of one workdir on the configured mesh, and the evals of its config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str):
    from ifam_jax import train  # pylint: disable=import-outside-toplevel  # train imports us

    self.config, self.which = config, which
    self.workdir = epath.Path(workdir)
    self.make_source, self.training_classes = train.make_source, train.training_classes
    model = train.load_model(config, self.workdir, which)
    self.info = train.read_params_info(self.workdir, which)
    self.num_classes = self.info['num_classes']
    self.eval_transform = train.make_transforms(config)[1]
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.graphdef, params, frozen, self.rest = optim.split_frozen(
        model, config.optim.group_rules, config.optim.groups)
    self.params, self.frozen = (self._place(tree) for tree in (params, frozen))
    self.intervention, self.thresholds = None, None
    if config.eval.thresholds:
      self.require_ifam('part thresholds')
      values, rule = load_thresholds(config.eval.thresholds, config.model.num_parts,
                                     config.eval.threshold_rule)
      self.intervention = Intervention(thresholds=values, threshold_rule=rule)
      self.thresholds = {'path': str(config.eval.thresholds), 'rule': rule}
    self._steps: dict[Intervention | None, Callable] = {}

  def _place(self, tree: Any) -> Any:
    """Host-loaded parameters -> global arrays sharded by the config's rules (any process count)."""
    shardings = sharding.infer_sharding(tree, self.config.sharding_rules, self.mesh,
                                        self.config.fsdp_min_size)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                        jax.device_get(tree), shardings)

  def require_ifam(self, what: str) -> None:
    if self.config.model.kind != 'ifam':
      raise ValueError(f'{what} needs an iFAM model; model.kind is {self.config.model.kind!r}')

  def header(self) -> dict[str, Any]:
    return {'which': self.which, 'step': self.info.get('step'), 'thresholds': self.thresholds}

  def jit(self, fn: Callable) -> Callable:
    return jax.jit(fn, out_shardings=self.replicated)

  def eval_step(self, intervention: Intervention | None) -> Callable:
    if intervention not in self._steps:
      self._steps[intervention] = self.jit(make_eval_step(self.graphdef, self.rest, self.config,
                                                          intervention))
    return self._steps[intervention]

  def with_removed(self, parts: tuple[int, ...]) -> Intervention | None:
    """The configured intervention (thresholds or none), also removing `parts`."""
    if not parts:
      return self.intervention
    return dataclasses.replace(self.intervention or Intervention(), remove_parts=parts,
                               part_removal=self.config.eval.part_removal)

  def challenge_root(self) -> pathlib.Path | None:
    """The IN-9 root, if it holds the challenge's fg_mask/val and only_bg_t/val folders."""
    roots = [self.config.eval.in9_root] + [spec.root for spec in self.config.data.evals.values()
                                           if spec.source == 'in9']
    root = pathlib.Path(next((r for r in roots if r), '.'))
    needed = (root / 'fg_mask' / 'val', root / 'only_bg_t' / 'val')
    return root if any(roots) and all(p.is_dir() for p in needed) else None

  def in9_map(self) -> np.ndarray:
    if not self.config.eval.in9_mapping:
      raise ValueError(f'the model has {self.num_classes} classes: evaluating it on IN-9 needs '
                       'eval.in9_mapping=<in_to_in9.json>')
    return load_in9_mapping(self.config.eval.in9_mapping, self.num_classes)

  def splits(self) -> dict[str, _Split]:
    """The selected eval sets: data.evals, plus eval.in9_root's variants as 'in9_<variant>'."""
    cfg = self.config
    specs = {name: (spec, self.eval_transform) for name, spec in cfg.data.evals.items()}
    if cfg.eval.in9_root:
      uncropped = data_lib.transforms.resize_center_crop(cfg.model.image_size)
      for variant in cfg.eval.in9_variants:
        specs[f'in9_{variant}'] = (dict(source='in9', root=cfg.eval.in9_root, variant=variant,
                                        split='val'), uncropped)
    known = list(specs) + (['bg_challenge'] if self.challenge_root() else [])
    if unknown := sorted(set(cfg.eval.splits) - set(known)):
      raise ValueError(f'eval.splits {unknown} are not evals of this config; known: {known} '
                       "('bg_challenge' needs <IN-9 root>/fg_mask/val and only_bg_t/val)")
    splits = {}
    classes = self.training_classes(cfg)
    for name, (spec, transform) in specs.items():
      if cfg.eval.splits and name not in cfg.eval.splits:
        continue
      source = self.make_source(spec, classes)
      if spec['source'] == 'in9':
        class_map = None if source.num_classes == self.num_classes else self.in9_map()
        splits[name] = _Split(source, transform, class_map, spec.get('variant', 'original'))
      elif source.num_classes != self.num_classes:
        raise ValueError(f'eval {name!r} has {source.num_classes} classes, the model '
                         f'{self.num_classes}')
      else:
        splits[name] = _Split(source, transform)
    return splits

  def evaluate(self, split: _Split, intervention: Intervention | None) -> dict[str, Any]:
    return evaluate_source(self.eval_step(intervention), self.params, self.frozen, split.source,
                           split.transform, self.config, self.batch_sharding, split.class_map)

  def bg_challenge(self, root: pathlib.Path) -> dict[str, Any]:
    transform = data_lib.transforms.resize_center_crop(self.config.model.image_size)
    source = data_lib.ImageNet9Source(root, 'only_bg_t', 'val')
    ds, num_batches = eval_dataset(source, transform, self.config)
    backgrounds = [dict(batch) for _, batch in zip(range(num_batches), ds)]
    class_map = None if self.num_classes == len(IN9_CLASSES) else self.in9_map()
    step = make_eval_step(self.graphdef, self.rest, self.config, self.intervention)
    return bg_challenge(step, self.params, self.frozen, challenge_foregrounds(root, transform),
                        backgrounds, self.batch_sharding, self.config.seed, class_map)

  def write(self, relative: str, report: Mapping[str, Any]) -> epath.Path:
    path = self.workdir / relative
    if jax.process_index() == 0:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(report, indent=2) + '\n')
    return path


def run_eval(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
             which: str = 'final') -> dict[str, Any]:
  """Evaluates <workdir>/params/<which> on every selected eval set.

  Report (<workdir>/eval/<which>/eval.json): 'evals' {split: metrics} under the configured
  thresholds (if any; then also 'evals_without_thresholds'), 'in9_accuracy' {variant: accuracy}
  and 'bg_gap' when IN-9 variants are evaluated, 'bg_challenge' (under the thresholds too) when
  its folders exist and eval.splits is empty or names it: it costs hours on the IN-9 release.
  """
  s = _Session(config, workdir, which)
  report = s.header()
  with jax.set_mesh(s.mesh):
    splits = s.splits()
    report['evals'] = {name: s.evaluate(split, s.intervention) for name, split in splits.items()}
    if s.intervention is not None:
      report['evals_without_thresholds'] = {name: s.evaluate(split, None)
                                            for name, split in splits.items()}
    in9 = {split.in9_variant: report['evals'][name]['accuracy']
           for name, split in splits.items() if split.in9_variant}
    if in9:
      report['in9_accuracy'] = in9
    if {'mixed_same', 'mixed_rand'} <= in9.keys():
      report['bg_gap'] = bg_gap(in9)
    root = s.challenge_root()
    if root is not None and (not config.eval.splits or 'bg_challenge' in config.eval.splits):
      report['bg_challenge'] = s.bg_challenge(root)
  path = s.write(f'eval/{which}/eval.json', report)

  rows = dict(report['evals'])
  rows.update({f'{name} (no thresholds)': m
               for name, m in report.get('evals_without_thresholds', {}).items()})
  lines = [f'\nEvaluation of params/{which} (step {report["step"]})'
           + (f' with {s.thresholds["rule"]} thresholds {s.thresholds["path"]}'
              if s.thresholds else '') + ':', metrics_table(rows)]
  if 'bg_gap' in report:
    lines.append(f'BG-GAP (mixed_same - mixed_rand): {100 * report["bg_gap"]:.1f} points')
  if 'bg_challenge' in report:
    c = report['bg_challenge']
    lines.append(f'Background challenge: {100 * c["accuracy"]:.1f}% '
                 f'({c["num_vulnerable"]}/{c["num_foregrounds"]} foregrounds vulnerable)')
  _print('\n'.join(lines + [f'Report: {path}']))
  return report


def run_calibrate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  which: str = 'final',
                  percentiles: Sequence[float] = (97, 99)) -> list[epath.Path]:
  """Part thresholds of <workdir>/params/<which> from the training split (eval transform).

  Writes <workdir>/thresholds/<which>/<rule>_q<q>.json for both rules and every percentile q:
  {"rule", "q", "thresholds": [K], "tokens_per_part", "sampled"}; `sampled` says a part had more
  tokens than eval.calibration_sample, whose uniform sample then gave its percentiles.
  """
  s = _Session(config, workdir, which)
  s.require_ifam('calibration')
  source = s.make_source(config.data.train, config.data.classes or None)
  ds, num_batches = eval_dataset(source, s.eval_transform, config)
  step = s.jit(make_calibration_step(s.graphdef, s.rest))
  capacity = config.eval.calibration_sample
  with jax.set_mesh(s.mesh):
    batches = gather_outputs(step, s.params, s.frozen, ds, num_batches, s.batch_sharding,
                             config.seed)
    thresholds, counts = calibrate(batches, config.model.num_parts, percentiles, capacity,
                                   config.seed)
  paths = []
  for rule, by_q in thresholds.items():
    for q, values in by_q.items():
      paths.append(s.write(f'thresholds/{which}/{rule}_q{q:g}.json', {
          **s.header(), 'rule': rule, 'q': q, 'thresholds': values, 'split': repr(source),
          'tokens_per_part': counts, 'sampled': any(n > capacity for n in counts)}))
  header = ['part', 'tokens'] + [f'{r} q{q:g}' for r, by_q in thresholds.items() for q in by_q]
  rows = [[k, counts[k]] + [f'{by_q[q][k]:.5g}' if by_q[q][k] is not None else '-'
                            for by_q in thresholds.values() for q in by_q]
          for k in range(config.model.num_parts)]
  _print(f'\nPart thresholds of params/{which} from {source!r}:\n{format_table(header, rows)}\n'
         f'Written to {paths[0].parent}')
  return paths


def leave_one_out_sets(num_parts: int, fixed: tuple[int, ...]) -> list[tuple[int, ...]]:
  """Removal sets: none, the fixed set (if any), then the fixed set plus each other part."""
  return [(), *([fixed] if fixed else []),
          *(tuple(sorted(fixed + (i,))) for i in range(num_parts) if i not in fixed)]


def run_leave_one_out(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      which: str = 'final', fixed_parts: Sequence[int] = ()) -> dict[str, Any]:
  """Evaluates with each part removed (its tokens go to background), after `fixed_parts`.

  Report (<workdir>/eval/<which>/leave_one_out[_fixed_<parts>].json): per split, one row per
  `leave_one_out_sets` entry, {'removed_parts': [...], **metrics}; configured thresholds apply
  to every row. eval.part_removal 'reference' (the default) keeps stage 1's logits as before
  the removal, as the reference's tables do.
  """
  if config.eval.part_removal not in PART_REMOVALS:
    raise ValueError(f'eval.part_removal is {config.eval.part_removal!r}; set one of '
                     f'{PART_REMOVALS}')
  s = _Session(config, workdir, which)
  s.require_ifam('leave-one-out')
  k = config.model.num_parts
  fixed = tuple(sorted(set(fixed_parts)))
  if any(not 0 <= p < k for p in fixed):
    raise ValueError(f'fixed_parts {list(fixed_parts)} outside the parts 0..{k - 1}')
  report = {**s.header(), 'fixed_parts': list(fixed),
            'part_removal': config.eval.part_removal, 'splits': {}}
  with jax.set_mesh(s.mesh):
    for name, split in s.splits().items():
      report['splits'][name] = [{'removed_parts': list(removed),
                                 **s.evaluate(split, s.with_removed(removed))}
                                for removed in leave_one_out_sets(k, fixed)]
  suffix = '_fixed_' + '_'.join(map(str, fixed)) if fixed else ''
  path = s.write(f'eval/{which}/leave_one_out{suffix}.json', report)
  for name, rows in report['splits'].items():
    table = metrics_table({('removed ' + ','.join(map(str, r['removed_parts']))
                            if r['removed_parts'] else 'none'): r for r in rows})
    _print(f'\nLeave-one-out on {name!r}, params/{which}:\n{table}')
  _print(f'Report: {path}')
  return report


def run_audit(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              which: str = 'final', num_images: int = 64) -> dict[str, Any]:
  """Checks on `num_images` images per eval set that masked-out pixels cannot reach stage 2.

  Stage 2 runs again, with the eval forward's mask, on images whose masked-out patches hold
  noise or another image's pixels; its logits must be bitwise unchanged. Report
  (<workdir>/eval/<which>/audit.json): per split the fraction unchanged per replacement (must
  be 1.0), the mean fraction of patches kept, and 'passed'.
  """
  s = _Session(config, workdir, which)
  s.require_ifam('the audit')
  if not stage2_mask_facts(config.model.stage2_mask).binary:
    raise ValueError("the audit checks hard masks; model.stage2_mask='soft' lets every pixel "
                     'into stage 2')
  stage2_jit = s.jit(make_stage2_fn(s.graphdef, s.rest))

  def stage2(params, frozen, images, patch_mask):  # every call: one input sharding, one program
    return stage2_jit(params, frozen, *jax.device_put((images, patch_mask), s.batch_sharding))

  step = make_audit_step(s.jit(make_mask_step(s.graphdef, s.rest, s.intervention)), stage2)
  report = {**s.header(), 'splits': {}}
  with jax.set_mesh(s.mesh):
    for name, split in s.splits().items():
      ds, num_batches = eval_dataset(split.source, split.transform, config)
      num_batches = min(num_batches, math.ceil(num_images / config.data.eval_batch_size))
      outputs = collect_outputs(step, s.params, s.frozen, ds, num_batches, s.batch_sharding,
                                config.seed)
      report['splits'][name] = summarize_audit(outputs, num_images)
  report['passed'] = all(v == 1.0 for m in report['splits'].values()
                         for key, v in m.items() if key.startswith('unchanged_'))
  path = s.write(f'eval/{which}/audit.json', report)
  rows = [[name, m['num_images'], m['mean_kept_fraction'], m['unchanged_noise'],
           m['unchanged_other_image']] for name, m in report['splits'].items()]
  _print(f'\nAudit of params/{which}: stage-2 logits bitwise unchanged when masked-out pixels are '
         f'replaced\n' + format_table(['', 'images', 'patches kept', 'unchanged (noise)',
                                       'unchanged (other image)'], rows)
         + f'\n{"PASSED" if report["passed"] else "FAILED"}; report: {path}')
  return report
