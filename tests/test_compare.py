"""The comparison command: its checks, the order it runs methods in, and its table."""

import json

import numpy as np
import pytest
from etils import epath
from PIL import Image, ImageDraw

from ifam_jax import compare, evaluate, train
from ifam_jax.evaluators import metrics
from fixtures.tiny_config import get_config


def demo_like():
  c = get_config()
  c.data.val_split = 'val'
  return c


# ----------------------------------------------------------------------------
# Checks and order, before any work
# ----------------------------------------------------------------------------
def test_check_methods_names_the_problem():
  c = demo_like()
  with pytest.raises(ValueError, match=r"unknown \['dfrr'\]"):
    compare.check_methods(['erm', 'dfrr'], c)
  with pytest.raises(ValueError, match='twice'):
    compare.check_methods(['erm', 'erm'], c)
  with pytest.raises(ValueError, match='empty'):
    compare.check_methods([], c)
  c.peers.extractor = 'dinov2'
  with pytest.raises(ValueError, match='model.init_weights'):
    compare.check_methods(['dfr'], c)
  c.peers.extractor = 'erm'
  c.data.val_split = ''
  with pytest.raises(ValueError, match='data.val_split'):
    compare.check_methods(['dar'], c)
  c.compare.split = 'nope'
  with pytest.raises(ValueError, match="compare.split 'nope'"):
    compare.check_methods(['erm'], c)


def test_dependencies_run_first():
  c = demo_like()
  assert compare.dependencies(['ifam', 'dfr'], c) == ['erm', 'ifam', 'dfr']
  assert compare.dependencies(['dfr', 'erm'], c) == ['dfr', 'erm']  # listed: not added again
  c.peers.extractor = 'ifam'
  assert compare.dependencies(['dar', 'a2'], c) == ['ifam', 'erm', 'dar', 'a2']
  c.peers.extractor = 'dinov2'
  c.model.init_weights = 'vit.safetensors'
  c.peers.a2.attention_weights = 'small.safetensors'
  assert compare.dependencies(['dfr', 'a2'], c) == ['dfr', 'a2']  # nothing trained first


def test_table_split():
  c = demo_like()
  c.compare.split = ''
  assert compare.table_split(c) == 'test'
  del c.data.evals['test']
  assert compare.table_split(c) == 'val'  # the last eval when there is no 'test'


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------
def result(acc, groups, wall):
  return {'label': 'X', 'backbone': 'S/8 scratch @64', 'wall_time_s': wall,
          'evals': {'test': {'accuracy': acc, 'worst_group_accuracy': min(groups.values()),
                             'group_accuracy': groups}}}


def test_summarise_means_and_stds_over_seeds(tmp_path):
  results = {'a': {0: result(0.8, {'g0': 0.9, 'g1': 0.6}, 60.0),
                   1: result(0.6, {'g0': 0.7, 'g1': 0.4}, 120.0)},
             'b': {0: result(0.5, {'g0': 0.5, 'g1': 0.5}, 30.0)}}
  counts = {'g0': 90, 'g1': 10}
  rows = compare.summarise(results, 'test', counts)
  a = rows['a']
  assert a['seeds'] == [0, 1]
  assert a['mean']['accuracy'] == pytest.approx(0.7)
  assert a['std']['accuracy'] == pytest.approx(0.1)  # population std of (0.8, 0.6)
  assert a['mean']['worst_group_accuracy'] == pytest.approx(0.5)
  assert a['mean']['group:g1'] == pytest.approx(0.5)
  # Train-weighted: seed 0 0.9*0.9 + 0.1*0.6 = 0.87, seed 1 0.9*0.7 + 0.1*0.4 = 0.67.
  assert a['mean']['accuracy_train_weighted'] == pytest.approx(0.77)
  assert a['mean']['wall_time_s'] == 90.0
  text = compare.format_rows(rows)
  lines = text.splitlines()
  assert lines[0].split('|')[1].strip() == 'method'
  assert '70.0 ± 10.0' in lines[2] and '1.5 min' in lines[2]
  assert ' 50.0 |' in lines[3] and '±' not in lines[3]  # one seed: no spread
  assert 'g1' in lines[0] and 'BG-GAP' not in lines[0]  # no IN-9 eval: no BG-GAP column

  compare.bar_chart(rows, epath.Path(tmp_path) / 'c.png', 'test')
  image = np.asarray(Image.open(tmp_path / 'c.png').convert('RGB'))
  assert image.shape[1] > 100 and (image != 255).any()


def test_bar_chart_legend_clear_of_a_long_title(tmp_path):
  """The legend's swatches sit below the title's text rows, and the title fits the picture."""
  rows = compare.summarise({'m': {0: result(0.9, {'g0': 1.0, 'g1': 0.5}, 1.0)}}, 'test', {})
  title = 'test: average and worst-group accuracy (%), 3 seed(s)'
  compare.bar_chart(rows, epath.Path(tmp_path) / 'c.png', title)
  image = np.asarray(Image.open(tmp_path / 'c.png').convert('RGB'))
  text_rows = (image[:, :, 0] < 80) & (image[:, :, 1] < 80) & (image[:, :, 2] < 80)  # black ink
  title_bottom = np.flatnonzero(text_rows[:24].any(axis=1)).max()
  for colour in ((120, 160, 220), (30, 70, 150)):
    swatch_rows = np.flatnonzero((image == colour).all(axis=-1).any(axis=1))
    assert swatch_rows.min() > title_bottom
  width = ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), title)[2]
  assert image.shape[1] >= width + 46


def test_bg_gap_and_train_weighted_in_rows():
  r = result(0.9, {'g0': 1.0, 'g1': 0.5}, 1.0)
  r['evals'].update(mixed_same={'accuracy': 0.93}, mixed_rand={'accuracy': 0.91})
  rows = compare.summarise({'m': {0: r}}, 'test', {'g0': 1, 'g1': 3})
  assert rows['m']['mean']['bg_gap'] == pytest.approx(0.02)
  assert rows['m']['mean']['accuracy_train_weighted'] == pytest.approx(
      metrics.train_weighted_accuracy({'g0': 1.0, 'g1': 0.5}, {'g0': 1, 'g1': 3}))
  assert 'BG-GAP' in compare.format_rows(rows)


def test_finished_method_is_not_rerun(tmp_path, monkeypatch):
  c = demo_like()
  workdir = epath.Path(tmp_path)
  calls = []

  def fake_dfr(config, workdir, sub, seed):
    calls.append(seed)
    return {'label': 'DFR', 'backbone': 'b', 'evals': {}, 'report': {}}

  monkeypatch.setattr(compare, 'run_dfr', fake_dfr)
  first = compare.run_method(c, workdir, 'dfr', 3)
  assert compare.run_method(c, workdir, 'dfr', 3) == first and calls == [3]
  saved = json.loads((tmp_path / 'dfr' / 'seed_3' / 'result.json').read_text())
  assert saved['settings']['dfr']['n_retrain'] == c.peers.dfr.n_retrain
  c.peers.dfr.n_retrain = 5  # a changed setting reruns the peer
  compare.run_method(c, workdir, 'dfr', 3)
  assert calls == [3, 3]


def test_each_run_is_locked_not_the_workdir(tmp_path, monkeypatch):
  """Seeds of one comparison may run in parallel processes: a run in use by a live process is
  refused, another method or seed of the same workdir is not."""
  c = demo_like()
  workdir = epath.Path(tmp_path)
  monkeypatch.setattr(compare, 'run_dfr', lambda config, workdir, sub, seed: {
      'label': 'DFR', 'backbone': 'b', 'evals': {}, 'report': {}})
  busy = tmp_path / 'dfr' / 'seed_0'
  busy.mkdir(parents=True)
  holder = {'host': __import__('socket').gethostname(), 'pid': __import__('os').getppid(),
            'since': 'now'}
  (busy / 'lock.json').write_text(json.dumps(holder))
  (tmp_path / 'lock.json').write_text(json.dumps(holder))  # a lock on the workdir itself
  with pytest.raises(RuntimeError, match='in use by another run'):
    compare.run_method(c, workdir, 'dfr', 0)
  assert compare.run_method(c, workdir, 'dfr', 1)['label'] == 'DFR'
  assert not (tmp_path / 'dfr' / 'seed_1' / 'lock.json').exists()  # released


def test_mask_leak_columns_mean_and_std_over_seeds():
  results = {}
  for seed, (auc, empty) in enumerate(((0.9, 0.5), (0.8, 0.3))):
    r = result(0.8, {'g0': 0.9, 'g1': 0.6}, 60.0)
    r['mask_leak'] = {'split': 'test', 'auroc': auc, 'empty_rate': empty, 'leak': True}
    results[seed] = r
  other = result(0.7, {'g0': 0.7, 'g1': 0.7}, 60.0)
  other['mask_leak'] = {'split': 'val', 'auroc': 0.6, 'empty_rate': 0.1}  # another split's
  rows = compare.summarise({'ifam': results, 'erm': {0: result(0.7, {'g0': 0.7}, 1.0)},
                            'old': {0: other}}, 'test', {})
  assert rows['ifam']['mean']['mask_leak_auroc'] == pytest.approx(0.85)
  assert rows['ifam']['std']['empty_mask_rate'] == pytest.approx(0.1)
  assert 'mask_leak_auroc' not in rows['erm']['mean']
  assert 'mask_leak_auroc' not in rows['old']['mean']
  lines = compare.format_rows(rows).splitlines()
  header = [h.strip() for h in lines[0].split('|')]
  ifam = [c.strip() for c in lines[2].split('|')]
  assert ifam[header.index('mask→bg AUROC')] == '0.85 ± 0.05'  # an AUROC, not a percentage
  assert ifam[header.index('empty masks')] == '40.0 ± 10.0'
  erm = [c.strip() for c in lines[3].split('|')]
  assert erm[header.index('mask→bg AUROC')] == '-'


def test_auroc_columns_for_binary_tasks():
  """SIIM-ACR's table (paper Tab. 2b): AUROC and worst-group AUROC, as percentages."""
  runs = {}
  for seed, (auc, wg_auc) in enumerate(((0.92, 0.60), (0.90, 0.70))):
    runs[seed] = result(0.8, {'g0': 0.9}, 60.0)
    runs[seed]['evals']['test'].update(auroc=auc, worst_group_auroc=wg_auc)
  rows = compare.summarise({'ifam': runs, 'erm': {0: result(0.7, {'g0': 0.7}, 1.0)}}, 'test', {})
  lines = compare.format_rows(rows).splitlines()
  header = [h.strip() for h in lines[0].split('|')]
  ifam, erm = ([c.strip() for c in line.split('|')] for line in lines[2:4])
  assert ifam[header.index('AUROC')] == '91.0 ± 1.0'
  assert ifam[header.index('WG AUROC')] == '65.0 ± 5.0'
  assert erm[header.index('WG AUROC')] == '-'


def test_mask_leak_is_measured_once_without_retraining(tmp_path, monkeypatch):
  """A finished run of a method with a mask, written without a leak entry, gets one; a method
  without a mask does not; a later run reads it back."""
  c = demo_like()
  workdir = epath.Path(tmp_path)
  calls = []

  def fake_measure(config, sub, which):
    calls.append((tuple(config.eval.splits), config.eval.thresholds, config.model.kind,
                  str(sub), which))
    return {config.eval.splits[0]: {'auroc': 0.8, 'empty_rate': 0.25, 'leak': True,
                                    'verdict': 'v'}}

  def no_training(*args):
    raise AssertionError('a finished run trained again')

  monkeypatch.setattr(evaluate, 'measure_mask_leak', fake_measure)
  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  c.eval.thresholds = 'q99.json'  # the table's evals run without thresholds; so does the leak
  old = result(0.8, {'g0': 0.8}, 1.0)  # written before the leak audit existed
  for name in ('ifam', 'erm'):
    (tmp_path / name / 'seed_0').mkdir(parents=True)
    (tmp_path / name / 'seed_0' / 'result.json').write_text(json.dumps(old))
  got = compare.run_method(c, workdir, 'ifam', 0)
  assert calls == [(('test',), '', 'ifam', str(tmp_path / 'ifam' / 'seed_0'), 'final')]
  assert got['mask_leak'] == {'split': 'test', 'auroc': 0.8, 'empty_rate': 0.25, 'leak': True,
                              'verdict': 'v'}
  saved = json.loads((tmp_path / 'ifam' / 'seed_0' / 'result.json').read_text())
  assert saved == got and saved['evals'] == old['evals']
  assert compare.run_method(c, workdir, 'ifam', 0) == got and len(calls) == 1
  assert 'mask_leak' not in compare.run_method(c, workdir, 'erm', 0) and len(calls) == 1
  c.compare.split = 'val'  # another table split: measured there
  compare.run_method(c, workdir, 'ifam', 0)
  assert len(calls) == 2 and calls[1][0] == ('val',)


def test_results_copied_without_parameters_still_table(tmp_path, monkeypatch, capsys):
  """Finished runs whose folders kept result.json only (parameters left on another machine):
  the table is written; the part-map picture, which needs the iFAM run's parameters, is not."""
  c = demo_like()
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: pytest.fail('trained again'))
  for name, acc in (('ifam', 0.9), ('erm', 0.7)):
    r = dict(result(acc, {'g0': acc}, 1.0), mask_leak={'split': 'test', 'auroc': 0.5,
                                                       'empty_rate': 0.0, 'leak': False})
    (tmp_path / name / 'seed_0').mkdir(parents=True)
    (tmp_path / name / 'seed_0' / 'result.json').write_text(json.dumps(r))
  report = compare.run_compare(c, epath.Path(tmp_path), ['ifam', 'erm'])
  assert report['methods']['ifam']['mean']['accuracy'] == pytest.approx(0.9)
  assert json.loads((tmp_path / 'compare.json').read_text())['split'] == 'test'
  assert 'No iFAM part-map picture' in capsys.readouterr().out
  assert not (tmp_path / 'ifam' / 'seed_0' / 'part_maps.png').exists()
