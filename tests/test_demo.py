"""The demo's comparison on the tiny config: both models train, the table and picture appear;
and the demo's one command on a folder of one's own, in either layout, through the entry point."""

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

from fixtures.tiny_config import get_config
from ifam_jax import compare
from test_compare_end_to_end import write_waterbirds

REPO = pathlib.Path(__file__).resolve().parents[1]


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
