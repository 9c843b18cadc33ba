"""The demo: its comparison on the tiny config (both models train, the table and picture appear),
its benchmark variants, and its one command on a folder of one's own, in either layout, through
the entry point."""

import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from etils import epath

from fixtures import tiny_config
from fixtures.tiny_config import get_config
from ifam_jax import compare, factory
from test_compare_end_to_end import write_waterbirds

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains both models
def test_both_models_train_and_the_table_reports_their_test_metrics(tmp_path, capsys):
  config = get_config('steps=2')
  config.compare.methods, config.compare.split = ('ifam', 'erm'), 'test'
  config.model.stage2_token_tiers = ()  # the plain step: one compile less
  report = compare.run_compare(config, epath.Path(tmp_path), config.compare.methods)
  out = capsys.readouterr().out
  assert list(report['methods']) == ['ifam', 'erm']
  for name, row in report['methods'].items():
    result = report['results'][name]['0']
    test = result['evals']['test']
    assert result['step'] == 2 and test['num_examples'] == 16
    [line] = [line for line in out.splitlines() if line.startswith(f'| {row["label"]} ')]
    cells = [cell.strip() for cell in line.split('|')]
    assert cells[4:6] == [f'{100 * test["accuracy"]:.1f}',
                          f'{100 * test["worst_group_accuracy"]:.1f}']
  assert (tmp_path / 'erm' / 'seed_0' / 'params' / 'final.json').exists()
  assert (tmp_path / 'ifam' / 'seed_0' / 'part_maps.png').stat().st_size > 0


# ----------------------------------------------------------------------------
# The benchmark family: configs/demo.py:variant=NAME
# ----------------------------------------------------------------------------
DEMO = tiny_config.load_demo_module()
# What each variant must mean, as predicates on its sources' settings.
MEANING = {
    'texture': lambda s: s.cue == 'texture',
    'colour': lambda s: s.cue == 'colour',
    'both': lambda s: s.cue == 'both',
    'size_position': lambda s: (s.object_size[0] < 0.18 and s.object_size[1] > 0.28
                                and s.position_jitter > 0.12),
    'correlation_80': lambda s: s.majority == 0.8,
    'correlation_99': lambda s: s.majority == 0.99,
    'no_object': lambda s: s.no_object_fraction >= 0.1,
    'tied_size': lambda s: s.size_tied_to_background,
}


def specs(config):
  return {'train': config.data.train.to_dict(),
          **{k: v.to_dict() for k, v in config.data.evals.items()}}


def test_default_variant_is_the_demo_as_it_was():
  """The demo's data before the variants (shared_palette=True is cue='texture'), in full."""
  former = dict(source='synthetic', image_size=64, seed=0, num_classes=2, majority=0.95,
                object_size=(0.18, 0.28), cue='texture')
  assert specs(DEMO.get_config('')) == {
      'train': dict(former, num_examples=4096, split='train'),
      'val': dict(former, num_examples=512, split='val'),
      'test': dict(former, num_examples=1024, split='test')}
  assert DEMO.get_config('').to_dict() == DEMO.get_config('variant=texture').to_dict()


@pytest.mark.parametrize('name', sorted(MEANING))
def test_every_variant_sets_its_sources_and_nothing_else(name):
  assert set(DEMO.VARIANTS) == set(MEANING)
  config, default = DEMO.get_config(f'variant={name}'), DEMO.get_config('')
  for split, spec in specs(config).items():
    source = factory.make_source(spec)
    assert source.split == split and MEANING[name](source)
    assert source[0]['image'].shape == (64, 64, 3)
    former = specs(default)[split]
    changed = {k for k in spec.keys() | former.keys() if spec.get(k) != former.get(k)}
    assert changed == set(DEMO.VARIANTS[name])  # the same change in every split
  rest, default_rest = config.to_dict(), default.to_dict()
  for c in (rest, default_rest):
    del c['data']['train'], c['data']['evals']
  assert rest == default_rest  # the recipe itself is untouched


def test_variant_combines_with_the_other_arguments():
  c = DEMO.get_config('variant=colour,compare,seeds=3')
  assert (c.compare.methods, c.compare.seeds) == (DEMO.COMPARE_METHODS, (0, 1, 2))
  assert {s['cue'] for s in specs(c).values()} == {'colour'}
  with pytest.raises(ValueError, match=r"unknown demo variant 'color'; known: \['texture', "
                     r"'colour', 'both', .*'tied_size'\]"):
    DEMO.get_config('variant=color,compare')
  with pytest.raises(ValueError, match='pass one of them'):
    DEMO.get_config('variant=colour,root=/tmp')


# ----------------------------------------------------------------------------
# configs/demo.py:root=<folder>
# ----------------------------------------------------------------------------
def as_image_folders(waterbirds: pathlib.Path, root: pathlib.Path) -> None:
  """A Waterbirds-layout folder rewritten as <split>/<class>/<image>, without its groups."""
  with open(waterbirds / 'metadata.csv', newline='') as f:
    for row in csv.DictReader(f):
      split = ('train', 'val', 'test')[int(row['split'])]
      image = root / split / ('landbird', 'waterbird')[int(row['y'])] / f'{row["img_id"]}.jpg'
      image.parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(waterbirds / row['img_filename'], image)


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  """Both layouts compile the same programs: the second run reads the first's from disk."""
  return tmp_path_factory.mktemp('xla_cache')


@pytest.mark.slow
@pytest.mark.parametrize('layout', ['waterbirds', 'image_folders'])
def test_one_command_trains_ifam_and_erm_on_a_folder(layout, tmp_path, xla_cache):
  """`--config configs/demo.py:root=<folder>` finds the layout, trains both models from scratch
  and writes their results and the table; only the batch is shrunk to the fixture's 40 training
  images (the recipe's is 64)."""
  data = tmp_path / 'waterbirds'
  write_waterbirds(data, np.random.default_rng(0))  # 40 train, 16 val, 16 test images
  if layout == 'image_folders':
    as_image_folders(data, tmp_path / 'folders')
    data = tmp_path / 'folders'
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'ifam_jax.main', f'--config=configs/demo.py:root={data},steps=2',
       '--config.global_batch_size=8', '--config.data.eval_batch_size=16',
       f'--workdir={workdir}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(xla_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0'))
  assert result.returncode == 0, result.stderr[-3000:]
  grouped = layout == 'waterbirds'
  for method, label in (('ifam', 'iFAM'), ('erm', 'ERM')):
    run = workdir / method / 'seed_0'
    summary = json.loads((run / 'result.json').read_text())
    assert summary['step'] == 2 and sorted(summary['evals']) == ['test', 'val']
    assert summary['evals']['test']['num_examples'] == 16
    assert ('worst_group_accuracy' in summary['evals']['test']) == grouped
    assert (run / 'params' / 'best').is_dir()  # picked on val
    config = json.loads((run / 'config.json').read_text())
    assert config['data']['train']['source'] == ('waterbirds' if grouped else 'folder')
    assert config['data']['best_metric'] == ('worst_group_accuracy' if grouped else 'accuracy')
    assert any(line.startswith(f'| {label} ') for line in result.stdout.splitlines())
  assert json.loads((workdir / 'compare.json').read_text())['split'] == 'test'
