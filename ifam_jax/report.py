"""`--mode report`: one self-contained HTML page that reads a run, or a comparison of runs.

  python -m ifam_jax.main --mode report --workdir RUN [--which final]   -> RUN/report/index.html

It only reads what the other modes wrote, so it is instant and works mid-training: config.json,
metrics.jsonl (the curves, and the evaluations when eval.json is missing), params/<which>.json,
eval/<which>/{eval,audit,leave_one_out*}.json and pictures/<which>/ (`--mode visualize`); in
the folder of a comparison, compare.json and compare.png, then every <method>/seed_<s> in a
collapsed section of the same page. Pictures are embedded as data: URIs and charts drawn as
inline SVG (`charts.py`); the page loads nothing and runs no script, so it opens from file://
and survives being mailed. A section whose files are missing names the command that writes them.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from ifam_jax import charts, compare, losses, methods
from ifam_jax import workdir as workdir_lib
from ifam_jax.evaluators.tables import format_cell, metrics_cells

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; max-width: 1240px; margin: 0 auto;
       padding: 12px 24px 40px; }
h1 { font-size: 22px; margin-bottom: 4px; }
h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 2px; margin-top: 28px; }
h3 { font-size: 15px; margin: 18px 0 6px; } h4 { font-size: 14px; margin: 14px 0 4px; }
table { border-collapse: collapse; margin: 4px 0 12px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, .facts td { text-align: left; }
.facts th { background: #f1f4f8; font-weight: normal; text-align: left; }
thead th { background: #f1f4f8; }
td.worst { color: #b3261e; font-weight: bold; }
.scroll { overflow-x: auto; }
.missing { background: #fff8e1; border-left: 4px solid #f0b400; padding: 6px 10px; }
.pass { color: #17692b; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
.muted { color: #666; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; }
pre { background: #f6f8fa; padding: 8px; overflow: auto; max-height: 520px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px 28px; }
figure { display: inline-block; margin: 4px 16px 12px 0; vertical-align: top; }
figcaption { color: #555; font-size: 12px; }
img, svg { max-width: 100%; height: auto; }
img { image-rendering: pixelated; border: 1px solid #eee; }
nav { margin: 8px 0 4px; } nav a { margin-right: 14px; }
details > summary { cursor: pointer; }
details.run { border: 1px solid #ddd; border-radius: 4px; padding: 4px 12px; margin: 8px 0; }
details.run > summary { font-weight: bold; font-size: 15px; }
"""
# Curves drawn past this many points keep every n-th one (and the last).
MAX_POINTS = 1500
# metrics.jsonl's train keys outside the loss terms, each drawn in its own chart.
TRAIN_CHARTS = (('learning rate', ('lr',), False), ('gradient norm', ('grad_norm',), False),
                ('throughput (img/s)', ('img_per_sec',), False))


# ----------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------
def _e(text: object) -> str:
  return html.escape(str(text), quote=True)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]],
           mark_worst: bool = False) -> str:
  """An HTML table; floats as percentages (`format_cell`). `mark_worst` marks each column's
  smallest value (per-group accuracies: the worst group)."""
  worst = [min((r[i] for r in rows if isinstance(r[i], float)), default=None)
           if mark_worst else None for i in range(len(header))]
  body = ''.join('<tr>' + ''.join(
      f'<td class="worst">{_e(format_cell(v))}</td>' if v is not None and v == worst[i]
      and len(rows) > 1 else f'<td>{_e(format_cell(v))}</td>' for i, v in enumerate(row))
      + '</tr>' for row in rows)
  head = ''.join(f'<th>{_e(h)}</th>' for h in header)
  return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>' \
         '</table></div>'


def _facts(rows: Sequence[tuple[str, Any]]) -> str:
  """A two-column table of names and values, as text."""
  return '<table class="facts">' + ''.join(f'<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>'
                                           for k, v in rows) + '</table>'


def _missing(what: str, command: str) -> str:
  return f'<p class="missing">No {_e(what)} yet: <code>{_e(command)}</code> writes it.</p>'


def _note(text: str) -> str:
  return f'<p class="missing">{_e(text)}</p>'


def command(mode: str, run: epath.Path, which: str = 'final') -> str:
  """The shell command of `mode` on `run`."""
  extra = f' --which {shlex.quote(which)}' if which != 'final' else ''
  return f'python -m ifam_jax.main --mode {mode} --workdir {shlex.quote(str(run))}{extra}'


def png_size(data: bytes) -> tuple[int, int]:
  """(width, height) from a PNG's header; ValueError if `data` is not a PNG."""
  if data[:8] != b'\x89PNG\r\n\x1a\n' or data[12:16] != b'IHDR':
    raise ValueError('not a PNG file')
  return int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')


def _picture(path: epath.Path, caption: str) -> str:
  """A PNG as a data: URI; small ones (32-64 px runs) shown twice as large, pixel for pixel."""
  data = path.read_bytes()
  try:
    width, height = png_size(data)
  except ValueError:
    return _note(f'{path} is not a PNG file')
  scale = 2 if width < 480 else 1
  return (f'<figure><img src="data:image/png;base64,{base64.b64encode(data).decode()}" '
          f'width="{scale * width}" height="{scale * height}" alt="{_e(caption)}">'
          f'<figcaption>{_e(caption)}</figcaption></figure>')


def _section(anchor: str, title: str, body: str, level: int) -> str:
  return f'<section id="{_e(anchor)}"><h{level}>{_e(title)}</h{level}>{body}</section>'


# ----------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------
def _read_json(path: epath.Path) -> Any:
  """The JSON at `path`, None if there is none."""
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); rerun the mode that writes it') from None


def _get(tree: Any, dotted: str, default: Any = None) -> Any:
  for key in dotted.split('.'):
    if not isinstance(tree, Mapping) or key not in tree:
      return default
    tree = tree[key]
  return tree


def _has_mask(config: Mapping[str, Any] | None) -> bool | None:
  """Whether the run's model decides a mask; None when its config does not say."""
  method = methods.METHODS.get(_get(config, 'model.kind'))
  return None if method is None else method.has_mask


def _params_step(run: epath.Path, which: str) -> int | None:
  """The step of params/<which> (or of 'step_<N>'); None before they exist."""
  if match := re.fullmatch(r'step_(\d+)', which):
    return int(match[1])
  info = _read_json(run / 'params' / f'{which}.json')
  return None if info is None else info.get('step')


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  stride = -(-len(points) // MAX_POINTS)
  return points if stride == 1 else points[::stride] + [points[-1]]


# ----------------------------------------------------------------------------
# Sections of one run
# ----------------------------------------------------------------------------
def summary_section(run: epath.Path, which: str, config: Any, records: list, anchor: str,
                    level: int) -> str:
  step = _params_step(run, which)
  latest = max((r['step'] for r in records if r.get('split') == 'train'), default=None)
  if step is not None:
    status = f'parameters params/{which} of step {step}'
  elif (run / 'result.json').exists():
    status = 'finished: result.json of the comparison'
  else:
    status = (f'no params/{which} yet (training running or stopped)'
              + (f'; logged up to step {latest}' if latest is not None else ''))
  rows = [('workdir', str(run)), ('status', status)]
  for key in ('model.kind', 'model.num_parts', 'model.image_size', 'data.train.source',
              'data.train.root', 'global_batch_size', 'total_epochs', 'max_steps', 'optim.lr',
              'seed'):
    if (value := _get(config, key)) not in (None, '') and (key, value) != ('max_steps', 0):
      rows.append((key, json.dumps(value) if not isinstance(value, str) else value))
  best = _read_json(run / 'params' / 'best.json') or {}
  if 'step' in best:
    rows.append(('params/best', f'step {best["step"]}: {best.get("split")} '
                                f'{best.get("metric")} {format_cell(best.get("value"))}'))
  body = _facts(rows)
  if best.get('selected_nothing'):
    body += _note(f'params/best: {best.get("warning", "it selected nothing")}')
  return _section(anchor, 'Summary', body, level)


def config_section(run: epath.Path, config: Any, anchor: str, level: int) -> str:
  if config is None:
    body = _note(f'no config.json in {run}: `python -m ifam_jax.main --config <recipe> '
                 f'--workdir {run}` writes it (a post-hoc peer of a comparison has none)')
    return _section(anchor, 'Config', body, level)
  text = json.dumps(config, indent=2, ensure_ascii=False)
  body = (f'<details><summary>config.json, the resolved config ({text.count(chr(10)) + 1} lines)'
          f'</summary><pre>{_e(text)}</pre></details>')
  changes = run / 'config_changes.jsonl'
  if changes.exists():
    body += (f'<details><summary>settings changed on resume (config_changes.jsonl)</summary>'
             f'<pre>{_e(changes.read_text())}</pre></details>')
  return _section(anchor, 'Config', body, level)


def _breakdown(evals: Mapping[str, Mapping[str, Any]], key: str) -> str:
  """Per-group (or per-class) accuracies: a row per name, a column per split and stage."""
  columns = [(split, (), split) for split in evals]
  columns += [(split, ('stage1',), f'{split} stage 1') for split in evals
              if key in evals[split].get('stage1', {})]
  names = list(dict.fromkeys(n for m in evals.values() for n in m.get(key, {})))
  if not names:
    return ''
  rows = [[name] + [_get(evals[split], '.'.join(path + (key,)), {}).get(name, '-')
                    for split, path, _ in columns] for name in names]
  return _table([key.split('_')[0]] + [title for _, _, title in columns], rows,
                mark_worst=key == 'group_accuracy')


def metrics_section(run: epath.Path, which: str, records: list, anchor: str, level: int) -> str:
  report = _read_json(run / 'eval' / which / 'eval.json')
  result = _read_json(run / 'result.json')
  body = ''
  if report is not None:
    evals = dict(report['evals'])
    evals.update({f'{name} (no thresholds)': m
                  for name, m in report.get('evals_without_thresholds', {}).items()})
    thresholds = report.get('thresholds')
    origin = (f'eval/{which}/eval.json: params/{which}, step {report.get("step")}'
              + (f', {thresholds["rule"]} thresholds {thresholds["path"]}' if thresholds else ''))
  else:
    step = _params_step(run, which)
    steps = [r['step'] for r in records if r.get('split') != 'train']
    step = step if step in steps else (max(steps) if steps and which == 'final' else None)
    evals = {r['split']: r for r in records if r.get('step') == step and r['split'] != 'train'}
    origin = f'metrics.jsonl: the evaluation of step {step} during training'
    if not evals and result is not None:  # a post-hoc peer of a comparison: no parameters
      evals, origin = result.get('evals', {}), 'result.json of the comparison'
    else:
      body += _missing(f'eval/{which}/eval.json', command('eval', run, which))
  if not evals:
    return _section(anchor, 'Final metrics', body, level)
  body = f'<p class="muted">From {_e(origin)}; accuracies in %.</p>' + body
  body += _table(*metrics_cells({name: {'num_examples': '-', **m}
                                 for name, m in evals.items()}))
  for key, title in (('group_accuracy', 'Per group (worst in red)'),
                     ('class_accuracy', 'Per class')):
    if table := _breakdown(evals, key):
      body += f'<h{level + 1}>{title}</h{level + 1}>{table}'
  extras = [['BG-GAP (mixed_same - mixed_rand)', report['bg_gap']]] if report and \
      'bg_gap' in report else []
  extras += [[f'IN-9 {variant}', acc] for variant, acc in
             (report or {}).get('in9_accuracy', {}).items()]
  if challenge := (report or {}).get('bg_challenge'):
    extras.append(['background challenge', challenge['accuracy']])
  if extras:
    body += _table(['', '%'], extras)
  return _section(anchor, 'Final metrics', body, level)


def audit_section(run: epath.Path, which: str, has_mask: bool | None, anchor: str,
                  level: int) -> str:
  if has_mask is False:
    return _section(anchor, 'Audit', '<p class="muted">Not applicable: the model has no mask.'
                    '</p>', level)
  report = _read_json(run / 'eval' / which / 'audit.json')
  if report is None:
    return _section(anchor, 'Audit', _missing('audit', command('audit', run, which)), level)
  verdict = ('<span class="pass">PASSED</span>' if report.get('passed') else
             '<span class="fail">FAILED: stage 2 depends on masked-out pixels</span>')
  body = (f'<p>Pixel audit: {verdict}. Stage 2 re-run with every masked-out pixel replaced '
          '(by noise, by another image) must give bitwise the same logits.</p>')
  rows, verdicts, details = [], [], ''
  for name, m in report['splits'].items():
    geometry = m.get('mask_geometry', {})
    auc = geometry.get('auroc')
    rows.append([name, m['num_images'], m['mean_kept_fraction'], m['unchanged_noise'],
                 m['unchanged_other_image'], f'{m.get("forward_max_abs_diff", 0):.3g}',
                 '-' if auc is None else f'{auc:.2f}', geometry.get('empty_rate', '-')])
    text = geometry.get('verdict') or f'skipped: {geometry.get("skipped", "not measured")}'
    css = 'fail' if geometry.get('leak') else ''
    verdicts.append(f'<li><b>{_e(name)}</b>: <span class="{css}">{_e(text)}</span></li>')
    per_group = {key: geometry.get(f'{key}_by_group', {}) for key in (
        'visible_fraction', 'empty_rate', 'edge_share', 'background_share')}
    groups = list(dict.fromkeys(g for values in per_group.values() for g in values))
    if groups:
      keys = [k for k, values in per_group.items() if values]
      details += f'<h{level + 2}>{_e(name)}</h{level + 2}>' + _table(
          ['group'] + [k.replace('_', ' ') for k in keys],
          [[g] + [per_group[k].get(g, '-') if per_group[k].get(g) is not None else '-'
                  for k in keys] for g in groups])
  body += _table(['', 'images', 'patches kept', 'unchanged (noise)', 'unchanged (other image)',
                  'max |Δ| vs forward', 'mask→attribute AUROC', 'empty masks'], rows)
  body += (f'<h{level + 1}>Mask-geometry audit</h{level + 1}><p class="muted">How well the '
           'binary mask alone predicts the spurious attribute (AUROC within class, 0.5 = not at '
           f'all)</p><ul>{"".join(verdicts)}</ul>')
  if details:
    body += f'<details><summary>per group, in %</summary>{details}</details>'
  return _section(anchor, 'Audit', body, level)


def leave_one_out_section(run: epath.Path, which: str, has_mask: bool | None, anchor: str,
                          level: int) -> str:
  if has_mask is False:
    return ''
  paths = sorted((run / 'eval' / which).glob('leave_one_out*.json'))
  if not paths:
    return _section(anchor, 'Leave one part out',
                    _missing('leave-one-out report', command('leave_one_out', run, which)),
                    level)
  drawn, tables = [], []
  for path in paths:
    report = _read_json(path)
    fixed = report.get('fixed_parts') or []
    for split, rows in report['splits'].items():
      named = {('removed ' + ','.join(map(str, r['removed_parts'])) if r['removed_parts']
                else 'none'): r for r in rows}
      bars = {label: {'accuracy': r.get('accuracy'), 'worst group': r.get(
          'worst_group_accuracy')} for label, r in named.items()}
      bars = {label: {k: v for k, v in b.items() if v is not None} for label, b in bars.items()}
      title = (f'{split}: accuracy with parts removed' + (f' (always removed: {fixed})' if fixed
                                                           else ''))
      drawn.append(charts.bar_chart(bars, title=title))
      tables.append(f'<details><summary>{_e(path.name)}, {_e(split)}: every metric</summary>'
                    f'{_table(*metrics_cells(named))}</details>')
  body = f'<div class="charts">{"".join(drawn)}</div>' + ''.join(tables)
  return _section(anchor, 'Leave one part out', body, level)


def curves_section(run: epath.Path, records: list, config: Any, anchor: str, level: int) -> str:
  if not records:
    return _section(anchor, 'Training curves', _missing(
        'metrics.jsonl', f'python -m ifam_jax.main --config <recipe> --workdir '
        f'{shlex.quote(str(run))}'), level)
  train = [r for r in records if r.get('split') == 'train']
  evals = [r for r in records if r.get('split') != 'train']
  splits = list(dict.fromkeys(r['split'] for r in evals))

  def points(rows, key):
    return _thin([(r['step'], r[key]) for r in rows if isinstance(r.get(key), (int, float))])

  terms = [k for k in {**losses.DEFAULT_WEIGHTS, **(_get(config, 'loss.weights') or {})}
           if any(k in r for r in train)]
  accuracy = {'train': points(train, 'accuracy')}
  for split in splits:
    rows = [r for r in evals if r['split'] == split]
    accuracy[f'{split}'] = points(rows, 'accuracy')
    accuracy[f'{split} worst group'] = points(rows, 'worst_group_accuracy')
  drawn = [charts.line_chart({'loss': points(train, 'loss')}, title='training loss'),
           charts.line_chart(accuracy, title='accuracy (%): train batches and evaluations',
                             percent=True)]
  if terms:
    drawn.append(charts.line_chart({k: points(train, k) for k in terms},
                                   title='loss terms (unweighted)'))
  for title, keys, percent in TRAIN_CHARTS:
    if any(points(train, k) for k in keys):
      drawn.append(charts.line_chart({k: points(train, k) for k in keys}, title=title,
                                     percent=percent))
  last = max(r['step'] for r in records)
  body = (f'<p class="muted">metrics.jsonl: {len(train)} training and {len(evals)} evaluation '
          f'lines, up to step {last}.</p><div class="charts">{"".join(drawn)}</div>')
  return _section(anchor, 'Training curves', body, level)


def pictures_section(run: epath.Path, which: str, has_mask: bool | None, anchor: str,
                     level: int) -> str:
  folder = run / 'pictures' / which
  body = ''
  if (run / 'part_maps.png').exists():  # the comparison's picture of its iFAM run
    body += _picture(run / 'part_maps.png', 'part maps: image | parts | what stage 2 sees')
  if not folder.is_dir():
    return _section(anchor, 'Pictures', body + _missing(
        f'pictures/{which}', command('visualize', run, which)), level)
  examples = [_picture(p, f'{p.stem[9:]}: image | parts | what stage 2 sees; truth: predictions')
              for p in sorted(folder.glob('examples_*.png'))]
  examples += [_picture(p, f'{p.stem[11:]}: images by visible-patch fraction per group')
               for p in sorted(folder.glob('mask_sizes_*.png'))]
  if examples:
    body += f'<h{level + 1}>Examples and mask sizes</h{level + 1}>' + ''.join(examples)
  for split in sorted(p for p in folder.iterdir() if p.is_dir()):
    parts = sorted(split.glob('part_*.png'), key=lambda p: int(p.stem[5:]) if p.stem[5:].isdigit()
                   else -1)
    if parts:
      body += (f'<h{level + 1}>Part galleries, {_e(split.name)}</h{level + 1}>' + ''.join(
          _picture(p, f'{p.stem.replace("_", " ")}: the images where it covers the most patches')
          for p in parts))
  if has_mask and not any(p.is_dir() for p in folder.iterdir()):
    body += _note(f'no part galleries: {command("visualize", run, which)} draws them')
  return _section(anchor, 'Pictures', body, level)


def run_sections(run: epath.Path, which: str, level: int = 2, prefix: str = '') -> list[str]:
  """The sections of one run's report, headed at `level`, anchors prefixed by `prefix`."""
  config = _read_json(run / 'config.json')
  records = workdir_lib.read_metrics(run)
  has_mask = _has_mask(config)
  if config is None and (run / 'result.json').exists():  # a post-hoc peer: its result only
    return [summary_section(run, which, config, records, f'{prefix}summary', level),
            metrics_section(run, which, records, f'{prefix}metrics', level)]
  return [summary_section(run, which, config, records, f'{prefix}summary', level),
          config_section(run, config, f'{prefix}config', level),
          metrics_section(run, which, records, f'{prefix}metrics', level),
          audit_section(run, which, has_mask, f'{prefix}audit', level),
          curves_section(run, records, config, f'{prefix}curves', level),
          leave_one_out_section(run, which, has_mask, f'{prefix}leave-one-out', level),
          pictures_section(run, which, has_mask, f'{prefix}pictures', level)]


# ----------------------------------------------------------------------------
# A comparison: its table, then every method and seed
# ----------------------------------------------------------------------------
def _compare_runs(workdir: epath.Path, report: Any) -> list[tuple[str, str, epath.Path]]:
  """(method, seed, folder) of the comparison's runs: compare.json's, else the folders found."""
  if report is not None:
    return [(m, s, workdir / m / f'seed_{s}') for m, by_seed in report['results'].items()
            for s in by_seed]
  return [(p.parent.name, p.name[5:], p) for p in sorted(workdir.glob('*/seed_*'))
          if p.is_dir()]


def compare_sections(workdir: epath.Path, which: str) -> tuple[list[str], list[str]]:
  """(sections, navigation links) of a comparison's page."""
  report = _read_json(workdir / 'compare.json')
  if report is None:
    body = _missing('compare.json (the comparison has not finished)',
                    f'python -m ifam_jax.main --config <recipe> --workdir '
                    f'{shlex.quote(str(workdir))} --mode compare')
  else:
    seeds = ', '.join(map(str, report['seeds']))
    body = (f'<p class="muted">{_e(report["split"])} split, seeds {_e(seeds)}; mean ± '
            'std over seeds, accuracies in %.</p>' + _table(*compare.table_cells(
                report['methods'])))
    leaks = [f'{report["methods"][m]["label"]}, seed {s}: {r["mask_leak"]["verdict"]}'
             for m, by_seed in report['results'].items() for s, r in by_seed.items()
             if r.get('mask_leak', {}).get('leak')]
    body += ''.join(f'<p class="fail">{_e(line)}</p>' for line in leaks)
    if (workdir / 'compare.png').exists():
      body += _picture(workdir / 'compare.png', 'average and worst-group accuracy per method')
  config = _read_json(workdir / 'config_compare.json')
  if config is not None:
    body += (f'<details><summary>config_compare.json, the comparison\'s config</summary>'
             f'<pre>{_e(json.dumps(config, indent=2, ensure_ascii=False))}</pre></details>')
  sections, links = [_section('comparison', 'Comparison', body, 2)], [('comparison', 'table')]
  for method, seed, run in _compare_runs(workdir, report):
    anchor = f'{method}-seed-{seed}'
    label = _get(report, f'methods.{method}.label', method)
    result = _get(report, f'results.{method}.{seed}.evals.{report["split"]}', {}) if report \
        else {}
    scores = ', '.join(f'{name} {format_cell(result[key])}' for name, key in (
        ('avg', 'accuracy'), ('worst grp', 'worst_group_accuracy')) if key in result)
    sections.append(f'<details class="run" id="{_e(anchor)}"><summary>{_e(label)}, seed '
                    f'{_e(seed)}{": " if scores else ""}{_e(scores)} <span class="muted">'
                    f'({_e(run)})</span></summary>'
                    + ''.join(run_sections(run, which, 3, f'{anchor}-')) + '</details>')
    links.append((anchor, f'{method} {seed}'))
  return sections, [f'<a href="#{_e(a)}">{_e(text)}</a>' for a, text in links]


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def write_report(workdir: str | epath.PathLike, which: str = 'final') -> epath.Path:
  """Writes <workdir>/report/index.html, of a run or of a comparison's folder; returns it."""
  workdir = epath.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f'--workdir {workdir} does not exist; pass the workdir of a run')
  if (workdir / 'compare.json').exists() or (workdir / 'config_compare.json').exists():
    title = f'Comparison: {workdir.name}'
    sections, links = compare_sections(workdir, which)
  else:
    title = f'Run: {workdir.name}'
    sections = run_sections(workdir, which)
    links = [f'<a href="#{anchor}">{name}</a>' for anchor, name in re.findall(
        r'<section id="([^"]+)"><h2>([^<]+)</h2>', ''.join(sections))]
  page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}'
          f'</title><meta name="viewport" content="width=device-width, initial-scale=1">'
          f'<style>{CSS}</style></head><body><h1>{_e(title)}</h1><p class="muted">'
          f'{_e(workdir)}, params/{_e(which)}</p><nav>{"".join(links)}</nav>'
          + ''.join(sections) + '</body></html>\n')
  path = workdir / 'report' / 'index.html'
  path.parent.mkdir(parents=True, exist_ok=True)
  # Non-ASCII text as character references: the same page whatever the writer's locale.
  workdir_lib.replace_text(path, page.encode('ascii', 'xmlcharrefreplace').decode())
  return path
