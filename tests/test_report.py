"""The HTML report: self-contained (nothing loaded from outside), every picture decodes, the
numbers shown are those of the run's files, missing parts name their command, text is escaped;
and in a real browser, on a real tiny run, the page loads without errors."""

import base64
import html.parser
import io
import json
import pathlib
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from ifam_jax import charts, compare, config_lib, report, visualize
from ifam_jax import workdir as workdir_lib
from ifam_jax.evaluators import metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ('<b>&', 'plüs')  # a class name that HTML would take for markup; one not ASCII
GROUPS = tuple(f'{c}/{a}' for c in CLASSES for a in ('land', 'water'))


# ----------------------------------------------------------------------------
# Reading the page back
# ----------------------------------------------------------------------------
class Page(html.parser.HTMLParser):
  """Tags with their attributes, the text, the tables (rows of cell texts), the inline SVGs."""

  def __init__(self, text: str):
    super().__init__(convert_charrefs=True)
    self.tags, self.text, self.tables, self.ids = [], [], [], []
    self._cell = None
    self.feed(text)
    self.svgs = re.findall(r'<svg\b.*?</svg>', text, flags=re.S)

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    self.tags.append((tag, attrs))
    if 'id' in attrs:
      self.ids.append(attrs['id'])
    if tag == 'table':
      self.tables.append([])
    elif tag == 'tr':
      self.tables[-1].append([])
    elif tag in ('td', 'th'):
      self._cell = []

  def handle_endtag(self, tag):
    if tag in ('td', 'th') and self._cell is not None:
      self.tables[-1][-1].append(''.join(self._cell).strip())
      self._cell = None

  def handle_data(self, data):
    self.text.append(data)
    if self._cell is not None:
      self._cell.append(data)

  @property
  def all_text(self) -> str:
    return ''.join(self.text)

  def cell(self, row_name: str, column: str, first_column: str = '') -> str:
    """The cell of the first table whose header has `column` (and starts with `first_column`)
    and a row named `row_name`."""
    for table in self.tables:
      header = table[0]
      if column in header and (not first_column or header[0] == first_column):
        for row in table[1:]:
          if row[0] == row_name:
            return row[header.index(column)]
    raise KeyError((row_name, column))


def check_self_contained(page: Page) -> None:
  """No resource from outside: src only data: URIs, links only to anchors, no scripts or
  stylesheets; every picture a PNG that decodes, every SVG well-formed."""
  for tag, attrs in page.tags:
    assert tag not in ('script', 'link', 'iframe', 'object', 'embed'), tag
    if 'src' in attrs:
      assert attrs['src'].startswith('data:image/png;base64,'), attrs['src'][:80]
      image = Image.open(io.BytesIO(base64.b64decode(attrs['src'].split(',', 1)[1])))
      image.load()
      assert image.format == 'PNG' and image.size[0] > 0
    if 'href' in attrs:
      assert attrs['href'].startswith('#') and attrs['href'][1:] in page.ids, attrs['href']
  for svg in page.svgs:
    assert ET.fromstring(svg).tag == '{http://www.w3.org/2000/svg}svg'
  assert len(page.ids) == len(set(page.ids)), 'duplicate anchors'


# ----------------------------------------------------------------------------
# A hand-made run
# ----------------------------------------------------------------------------
def known_metrics():
  """Eight examples, two per group, labels 0 0 0 0 1 1 1 1; predictions wrong on one example
  of '<b>&/water' and both of 'plus/land': accuracy 5/8, group accuracies 100, 50, 0, 100."""
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
  pred = np.array([0, 0, 0, 1, 0, 0, 1, 1])
  logits = np.eye(2)[pred]
  return metrics.classification_metrics(logits, labels, groups, class_names=CLASSES,
                                        group_names=GROUPS) | {'num_examples': 8}


def make_run(workdir: pathlib.Path, *, finished: bool = True) -> None:
  config = config_lib.base_config()
  config.data.classes = CLASSES
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(workdir_lib.config_as_json(config))
  writer = workdir_lib.MetricWriter(workdir, 0)
  for step in range(1, 11):
    writer.write(step, 'train', {'loss': 3.0 / step, 'accuracy': step / 10, 'lr': 1e-3,
                                 'cls2': 1.0 / step, 'presence': 0.5, 'grad_norm': 2.0,
                                 'img_per_sec': 100.0})
    if step % 5 == 0:
      writer.write(step, 'test', {**known_metrics(), 'accuracy': 0.1 * step})
  if not finished:
    return
  (workdir / 'params').mkdir()
  (workdir / 'params' / 'final.json').write_text(json.dumps({'step': 10, 'num_classes': 2}))
  final = workdir / 'eval' / 'final'
  final.mkdir(parents=True)
  (final / 'eval.json').write_text(json.dumps(
      {'which': 'final', 'step': 10, 'thresholds': None, 'evals': {'test': known_metrics()}}))
  (final / 'audit.json').write_text(json.dumps({'which': 'final', 'step': 10, 'passed': True,
                                                'splits': {'test': {
      'num_images': 8, 'unchanged_noise': 1.0, 'unchanged_other_image': 1.0,
      'mean_kept_fraction': 0.25, 'forward_max_abs_diff': 0.0,
      'mask_geometry': {'auroc': 0.91, 'leak': True, 'empty_rate': 0.125,
                        'visible_fraction_by_group': {g: 0.5 for g in GROUPS},
                        'verdict': 'the mask leaks the background: AUROC 0.91'}}}}))
  (final / 'leave_one_out.json').write_text(json.dumps({'fixed_parts': [], 'splits': {'test': [
      {'removed_parts': [], **known_metrics()},
      {'removed_parts': [0], **known_metrics(), 'accuracy': 0.25}]}}))
  tile = np.zeros((8, 8, 3), np.uint8)
  visualize.save_grid([[tile, tile]], workdir / 'pictures' / 'final' / 'examples_test.png',
                      ['<b>&/land: stage 2 -> plus'])
  visualize.save_grid([[tile]], workdir / 'pictures' / 'final' / 'test' / 'part_0.png')


def test_report_of_a_finished_run(tmp_path):
  make_run(tmp_path)
  path = report.write_report(tmp_path)
  assert path == tmp_path / 'report' / 'index.html'
  text = path.read_text()
  page = Page(text)
  check_self_contained(page)
  # The numbers of eval.json (5/8; the per-group accuracies), not those of metrics.jsonl.
  assert page.cell('test', 'acc') == '62.5' and page.cell('test', 'worst grp') == '0.0'
  for group, accuracy in zip(GROUPS, ('100.0', '50.0', '0.0', '100.0')):
    assert page.cell(group, 'test', first_column='group') == accuracy
  assert page.cell('test', 'mask→attribute AUROC') == '0.91'
  assert 'PASSED' in page.all_text and 'the mask leaks the background' in page.all_text
  # Summary rows: the configured epochs; max_steps=0 (the length from epochs) is no fact.
  first_cells = {row[0] for table in page.tables for row in table}
  assert 'total_epochs' in first_cells and 'max_steps' not in first_cells
  # The class name is text wherever it appears: in the config, tables and captions.
  assert '<b>&' not in text and '&lt;b&gt;&amp;' in text
  assert text.isascii() and 'plüs/water' in page.all_text
  assert '"<b>&"' in page.all_text
  assert sum(tag == 'b' for tag, _ in page.tags) == text.count('<b>')
  # Pictures: the two PNGs written, the charts: 4 curves (loss, accuracy, terms, lr, grad norm,
  # throughput) and the leave-one-out bars, whose 'removed 0' accuracy bar is 25 %.
  assert sum('src' in a for _, a in page.tags) == 2
  assert len(page.svgs) == 7
  loo = next(s for s in page.svgs if 'parts removed' in s)
  widths = [float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)" height="12"',
                                         loo)]
  assert widths[2] == pytest.approx(widths[0] * 0.25 / 0.625, abs=0.1)  # none: acc, worst; ...
  # Nothing missing: no section names a command.
  assert 'python -m ifam_jax.main' not in page.all_text

  (tmp_path / 'eval' / 'final' / 'audit.json').write_text(
      json.dumps({'passed': False, 'splits': {}}))
  assert 'FAILED' in Page(report.write_report(tmp_path).read_text()).all_text

  # A model without a mask: no audit, no leave-one-out, no link to them.
  config = json.loads((tmp_path / 'config.json').read_text())
  config['model']['kind'] = 'baseline'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  page = Page(report.write_report(tmp_path).read_text())
  check_self_contained(page)
  assert 'the model has no mask' in page.all_text and 'leave-one-out' not in page.ids


def test_a_run_mid_training_gets_its_curves_and_the_commands_of_what_is_missing(tmp_path):
  run = tmp_path / 'a run & more'
  make_run(run, finished=False)
  page = Page(report.write_report(run).read_text())
  check_self_contained(page)
  assert 'no params/final yet' in page.all_text and 'logged up to step 10' in page.all_text
  # The last evaluation of metrics.jsonl stands in for eval.json: step 10, accuracy 100 %.
  assert 'the evaluation of step 10' in page.all_text and page.cell('test', 'acc') == '100.0'
  quoted = "'" + str(run) + "'"
  for mode in ('eval', 'audit', 'leave_one_out', 'visualize'):
    assert f'python -m ifam_jax.main --mode {mode} --workdir {quoted}' in page.all_text, mode
  loss = next(s for s in page.svgs if 'training loss' in s)
  points = re.search(r'<polyline points="([^"]+)"', loss)[1].split()
  assert len(points) == 10
  ys = [float(p.split(',')[1]) for p in points]
  assert ys == sorted(ys)  # loss 3/step falls: the line goes down the page


def test_a_comparison_gets_its_table_and_a_section_per_run(tmp_path):
  results = {m: {0: {'label': label, 'backbone': 'ViT', 'wall_time_s': 60.0,
                     'evals': {'test': {**known_metrics(), 'accuracy': acc}}}}
             for m, label, acc in (('erm', 'ERM <plain>', 0.5), ('ifam', 'iFAM', 0.75),
                                   ('dfr', 'DFR', 0.625))}
  rows = compare.summarise(results, 'test', {})
  (tmp_path / 'compare.json').write_text(json.dumps({
      'split': 'test', 'seeds': [0], 'methods': rows,
      'results': {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in results.items()}}))
  make_run(tmp_path / 'ifam' / 'seed_0')
  make_run(tmp_path / 'erm' / 'seed_0', finished=False)
  (tmp_path / 'dfr' / 'seed_0').mkdir(parents=True)  # a post-hoc peer: its result.json only
  (tmp_path / 'dfr' / 'seed_0' / 'result.json').write_text(json.dumps(results['dfr'][0]))
  page = Page(report.write_report(tmp_path).read_text())
  check_self_contained(page)
  assert page.cell('ERM <plain>', 'avg', first_column='method') == '50.0'
  assert page.cell('iFAM', 'avg', first_column='method') == '75.0'
  assert 'ERM <plain>, seed 0: avg 50.0, worst grp 0.0' in page.all_text
  assert {'ifam-seed-0', 'erm-seed-0', 'ifam-seed-0-audit', 'erm-seed-0-audit'} <= set(page.ids)
  assert f"--mode audit --workdir {tmp_path / 'erm' / 'seed_0'}" in page.all_text
  assert 'dfr/seed_0' not in ''.join(re.findall(r'--workdir \S+', page.all_text))
  assert 'dfr-seed-0-metrics' in page.ids and 'dfr-seed-0-audit' not in page.ids


def test_charts_by_hand():
  assert charts.nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
  # A constant widens to [1.5, 4.5]; of the steps 0.1, 0.2, 0.5, 1, the first >= 3 / 5 is 1.
  assert charts.nice_ticks(3, 3) == [1, 2, 3, 4, 5]
  svg = charts.line_chart({'a': [(0, 0.0), (5, float('nan')), (10, 1.0)]}, title='<t>',
                          percent=True)
  root = ET.fromstring(svg)  # well-formed, the title escaped
  assert root.find('{http://www.w3.org/2000/svg}text').text == '<t>'
  (x0, y0), (x1, y1) = (map(float, p.split(',')) for p in
                        re.search(r'points="([^"]+)"', svg)[1].split())
  assert x1 > x0 and y1 < y0  # the NaN left out; (10, 1) right of and above (0, 0)
  bars = charts.bar_chart({'a': {'acc': 1.0}, 'b': {'acc': 0.5}}, title='t')
  w1, w2 = (float(w) for w in re.findall(r'<rect x="\d+" y="\d+" width="([\d.]+)" height="12"',
                                         bars))
  assert w2 == pytest.approx(w1 / 2, abs=0.1)


# ----------------------------------------------------------------------------
# A real tiny run, in a real browser
# ----------------------------------------------------------------------------
CHECKER = """<script>
window.__errors = [];
window.addEventListener(
    'error', e => window.__errors.push(String(e.message || e.target.src).slice(0, 120)), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const bad = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  const out = document.createElement('pre');
  out.id = 'checked';
  out.textContent = JSON.stringify({images: images.length, bad: bad, errors: window.__errors,
                                    svgs: document.querySelectorAll('svg').length});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which('chromium') is None,
                    reason='no chromium on PATH to render the report (apt install chromium)')
def test_the_report_of_a_real_tiny_run_renders_in_chromium(tmp_path):
  sys.path.insert(0, str(REPO / 'tests' / 'fixtures'))
  import tiny_config  # pylint: disable=import-outside-toplevel
  from ifam_jax import evaluate, train  # pylint: disable=import-outside-toplevel
  run = tmp_path / 'run'
  config = tiny_config.get_config('steps=8')
  config.eval_every_epochs = 0.25
  run.mkdir()
  workdir_lib.record_config(run, config, {})
  train.train_and_evaluate(config, run)
  evaluate.run_audit(config, run, num_images=8)
  evaluate.run_leave_one_out(config, run)
  visualize.run_visualize(config, run, gallery_pool=8, gallery_size=3)
  result = subprocess.run([sys.executable, '-m', 'ifam_jax.main', '--mode=report',
                           f'--workdir={run}'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  page_path = run / 'report' / 'index.html'
  text = page_path.read_text()
  check_self_contained(Page(text))
  assert 'python -m ifam_jax.main --mode eval' in text  # the one mode not run

  checked = tmp_path / 'checked.html'
  checked.write_text(text.replace('<head>', '<head>' + CHECKER, 1))
  browser = ['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
             '--enable-logging=stderr', '--v=0']
  dom = subprocess.run(browser + ['--virtual-time-budget=5000', '--dump-dom',
                                  checked.as_uri()], capture_output=True, text=True, timeout=120)
  state = json.loads(html.unescape(re.search(r'<pre id="checked">(.*?)</pre>', dom.stdout)[1]))
  assert state['errors'] == [] and state['bad'] == 0, state
  assert state['images'] >= 3 and state['svgs'] >= 6, state
  assert 'CONSOLE' not in dom.stderr and 'Uncaught' not in dom.stderr, dom.stderr[-2000:]

  shot = tmp_path / 'report.png'
  subprocess.run(browser + [f'--screenshot={shot}', '--window-size=1280,4000',
                            page_path.as_uri()], capture_output=True, timeout=120, check=True)
  pixels = np.asarray(Image.open(shot).convert('RGB'))
  assert pixels.shape == (4000, 1280, 3)
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, charts and pictures drawn
  assert (pixels < 128).mean() > 0.01  # not a blank page
