"""The CLI evaluation modes, on top of `ifam_jax.evaluators`.

Each loads <workdir>/params/<which> onto the configured mesh, runs the evaluators its config
selects, writes a JSON report and prints a table on process 0:

  run_eval            every selected eval set: summarize_predictions' metrics for both stages;
                      IN-9 variants (ImageNet-1K models through in_to_in9.json), BG-GAP and the
                      adversarial-background challenge; with eval.part_metrics, Kp, NMI and ARI
                      on CUB's part annotations -> eval/<which>/eval.json
  run_calibrate       per-part thresholds from the training split, both rules
                      -> thresholds/<which>/<rule>_q<q>.json
  run_leave_one_out   one row per removed part (reference 8.1) -> eval/<which>/leave_one_out*.json
  run_audit           stage 2 re-run with every masked-out pixel replaced: its logits must not
                      change by a single bit; and what the mask's geometry alone tells of the
                      spurious attribute (evaluators/leak.py) -> eval/<which>/audit.json
  measure_mask_leak   that geometry audit alone, per eval set (the comparison's column)

`config.eval.thresholds` applies a threshold file to every evaluation of these modes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from ifam_jax import data as data_lib
from ifam_jax import factory, loggers, methods, optim, sharding
from ifam_jax import workdir as workdir_lib
from ifam_jax.data.sources import IN9_CLASSES
from ifam_jax.evaluators import audit, in9, leak, loop, metrics, parts, thresholds
from ifam_jax.evaluators.predict import make_eval_step
from ifam_jax.evaluators.tables import format_table, metrics_table
from ifam_jax.models.ifam import PART_REMOVALS, Intervention, stage2_mask_facts


def _print(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class _Split(loop.Classification):
  in9_variant: str = ''  # the IN-9 variant ('mixed_same', ...) for BG-GAP; '' otherwise


class Session:
  """The saved parameters of one workdir on the configured mesh, and the evals of its config."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str):
    self.config, self.which = config, which
    self.workdir = epath.Path(workdir)
    model = factory.load_model(config, self.workdir, which)
    self.info = workdir_lib.read_params_info(self.workdir, which)
    self.num_classes = self.info['num_classes']
    self.eval_transform = factory.make_transforms(config)[1]
    self.mesh = sharding.make_mesh(config.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = sharding.replicated(self.mesh)
    self.graphdef, params, frozen, self.rest = optim.split_frozen(
        model, config.optim.group_rules, config.optim.groups)
    self.params, self.frozen = (self._place(tree) for tree in (params, frozen))
    self.intervention, self.thresholds = None, None
    if config.eval.thresholds:
      self.require_ifam('part thresholds')
      values, rule = thresholds.load_thresholds(config.eval.thresholds, config.model.num_parts,
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
    if not methods.get(self.config.model.kind).has_mask:
      raise ValueError(f'{what} needs a model with a foreground mask; model.kind is '
                       f'{self.config.model.kind!r}')

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
    return in9.load_in9_mapping(self.config.eval.in9_mapping, self.num_classes)

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
    for name, (spec, transform) in specs.items():
      if cfg.eval.splits and name not in cfg.eval.splits:
        continue
      source = factory.make_eval_source(cfg, spec)
      methods.check_sources(cfg.model.kind, {name: source})
      if spec['source'] == 'in9':
        class_map = None if source.num_classes == self.num_classes else self.in9_map()
        splits[name] = _Split(source, transform, cfg, self.batch_sharding, class_map,
                              spec.get('variant', 'original'))
      elif source.num_classes != self.num_classes:
        raise ValueError(f'eval {name!r} has {source.num_classes} classes, the model '
                         f'{self.num_classes}')
      else:
        splits[name] = _Split(source, transform, cfg, self.batch_sharding)
    return splits

  def evaluate(self, split: _Split, intervention: Intervention | None) -> dict[str, Any]:
    return split.run(self.eval_step(intervention), self.params, self.frozen)

  def add_part_metrics(self, report: dict[str, Any], fit_source: Any,
                       splits: Mapping[str, _Split]) -> None:
    """`parts.PartMetrics` of the annotated splits into report['evals'] (under the thresholds)
    and, when present, report['evals_without_thresholds']."""
    sources = {name: splits[name].source for name in parts.annotated_evals(self.config)}
    evaluator = parts.PartMetrics(fit_source, sources, self.config, self.batch_sharding)
    for key, intervention in (('evals', self.intervention), ('evals_without_thresholds', None)):
      if key in report:
        step = self.jit(parts.make_parts_step(self.graphdef, self.rest, self.config,
                                              intervention))
        for name, scores in evaluator.run(step, self.params, self.frozen).items():
          report[key][name].update(scores)

  def mask_leaks(self, splits: Mapping[str, _Split]) -> dict[str, dict[str, Any]]:
    """`leak.MaskLeak` of each split, on the eval forward's mask (under the thresholds)."""
    step = leak.make_leak_step(self.jit(audit.make_mask_step(self.graphdef, self.rest,
                                                             self.intervention)))
    return {name: leak.MaskLeak(split.source, split.transform, self.config,
                                self.batch_sharding).run(step, self.params, self.frozen)
            for name, split in splits.items()}

  def bg_challenge(self, root: pathlib.Path) -> dict[str, Any]:
    class_map = None if self.num_classes == len(IN9_CLASSES) else self.in9_map()
    challenge = in9.BackgroundChallenge(root, self.config, self.batch_sharding, class_map)
    step = make_eval_step(self.graphdef, self.rest, self.config, self.intervention)
    return challenge.run(step, self.params, self.frozen)

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
  With eval.part_metrics, the eval sets with CUB part annotations also carry `parts.part_metrics`
  ('kp', 'nmi', 'ari', ...), under the thresholds and without, as the other metrics. Its scalars
  also go to TensorBoard (`loggers.write_eval_report`).
  """
  fit_source = parts.check_config(config)
  s = Session(config, workdir, which)
  report = s.header()
  with jax.set_mesh(s.mesh):
    splits = s.splits()
    report['evals'] = {name: s.evaluate(split, s.intervention) for name, split in splits.items()}
    if s.intervention is not None:
      report['evals_without_thresholds'] = {name: s.evaluate(split, None)
                                            for name, split in splits.items()}
    if fit_source is not None:
      s.add_part_metrics(report, fit_source, splits)
    in9_accuracy = {split.in9_variant: report['evals'][name]['accuracy']
                    for name, split in splits.items() if split.in9_variant}
    if in9_accuracy:
      report['in9_accuracy'] = in9_accuracy
    if {'mixed_same', 'mixed_rand'} <= in9_accuracy.keys():
      report['bg_gap'] = metrics.bg_gap(in9_accuracy)
    root = s.challenge_root()
    if root is not None and (not config.eval.splits or 'bg_challenge' in config.eval.splits):
      report['bg_challenge'] = s.bg_challenge(root)
  path = s.write(f'eval/{which}/eval.json', report)
  loggers.write_eval_report(config, workdir, which, report)

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
  s = Session(config, workdir, which)
  s.require_ifam('calibration')
  source = factory.make_train_source(config)
  calibration = thresholds.Calibration(source, s.eval_transform, config, s.batch_sharding,
                                       percentiles)
  step = s.jit(thresholds.make_calibration_step(s.graphdef, s.rest))
  capacity = config.eval.calibration_sample
  with jax.set_mesh(s.mesh):
    by_rule, counts = calibration.run(step, s.params, s.frozen)
  paths = []
  for rule, by_q in by_rule.items():
    for q, values in by_q.items():
      paths.append(s.write(f'thresholds/{which}/{rule}_q{q:g}.json', {
          **s.header(), 'rule': rule, 'q': q, 'thresholds': values, 'split': repr(source),
          'tokens_per_part': counts, 'sampled': any(n > capacity for n in counts)}))
  header = ['part', 'tokens'] + [f'{r} q{q:g}' for r, by_q in by_rule.items() for q in by_q]
  rows = [[k, counts[k]] + [f'{by_q[q][k]:.5g}' if by_q[q][k] is not None else '-'
                            for by_q in by_rule.values() for q in by_q]
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
  s = Session(config, workdir, which)
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


def measure_mask_leak(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      which: str = 'final') -> dict[str, dict[str, Any]]:
  """`leak.geometry_leak` of <workdir>/params/<which> on every selected eval set: how well the
  eval forward's binary mask alone predicts the spurious attribute (see evaluators/leak.py)."""
  leak.check_config(config)
  s = Session(config, workdir, which)
  s.require_ifam('the mask-geometry audit')
  with jax.set_mesh(s.mesh):
    return s.mask_leaks(s.splits())


def run_audit(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
              which: str = 'final', num_images: int = 64) -> dict[str, Any]:
  """Checks on `num_images` images per eval set that masked-out pixels cannot reach stage 2,
  and measures what the mask's geometry alone tells of the spurious attribute.

  Stage 2 runs again, with the eval forward's mask, on images whose masked-out patches hold
  noise or another image's pixels; its logits must be bitwise unchanged. Report
  (<workdir>/eval/<which>/audit.json): per split the fraction unchanged per replacement (must
  be 1.0), the mean fraction of patches kept, and 'passed' (these only); per split also
  'mask_geometry', `leak.geometry_leak` on its first eval.leak_num_images images (or why it
  was skipped: groups that are not (class, attribute) pairs).
  """
  leak.check_config(config)
  s = Session(config, workdir, which)
  s.require_ifam('the audit')
  if not stage2_mask_facts(config.model.stage2_mask).hides_masked:
    raise ValueError(f'the audit checks masks that hide pixels from stage 2; model.stage2_mask='
                     f'{config.model.stage2_mask!r} lets every pixel into stage 2')
  stage2_jit = s.jit(audit.make_stage2_fn(s.graphdef, s.rest))

  def stage2(params, frozen, images, patch_mask):  # every call: one input sharding, one program
    return stage2_jit(params, frozen, *jax.device_put((images, patch_mask), s.batch_sharding))

  step = audit.make_audit_step(s.jit(audit.make_mask_step(s.graphdef, s.rest, s.intervention)),
                               stage2)
  report = {**s.header(), 'splits': {}}
  with jax.set_mesh(s.mesh):
    splits = s.splits()
    for name, split in splits.items():
      audit_split = audit.Audit(split.source, split.transform, config, s.batch_sharding,
                                num_images)
      report['splits'][name] = audit_split.run(step, s.params, s.frozen)
    for name, geometry in s.mask_leaks(splits).items():
      report['splits'][name]['mask_geometry'] = geometry
  report['passed'] = all(v == 1.0 for m in report['splits'].values()
                         for key, v in m.items() if key.startswith('unchanged_'))
  path = s.write(f'eval/{which}/audit.json', report)
  rows, verdicts = [], []
  for name, m in report['splits'].items():
    geometry = m['mask_geometry']
    auc = geometry.get('auroc')
    rows.append([name, m['num_images'], m['mean_kept_fraction'], m['unchanged_noise'],
                 m['unchanged_other_image'], '-' if auc is None else f'{auc:.2f}',
                 geometry.get('empty_rate', '-')])
    verdicts.append(f'{name}: ' + (geometry['verdict'] if 'verdict' in geometry
                                   else f'mask-geometry audit skipped: {geometry["skipped"]}'))
  _print(f'\nAudit of params/{which}: stage-2 logits bitwise unchanged when masked-out pixels are '
         f'replaced; what the mask alone tells of the spurious attribute (AUROC within class, '
         f'the count\'s as max(auc, 1 - auc))\n'
         + format_table(['', 'images', 'patches kept', 'unchanged (noise)',
                         'unchanged (other image)', 'mask→attribute AUROC', 'empty masks'], rows)
         + '\n' + '\n'.join(verdicts)
         + f'\n{"PASSED" if report["passed"] else "FAILED"}; report: {path}')
  return report
