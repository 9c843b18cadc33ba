"""The entry point: flags and the workdir of the evaluation modes are checked before any work;
those modes read the run's config from its workdir; what training and pictures leave there."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')
  return subprocess.run([sys.executable, '-m', 'ifam_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('flag, message', [
    ('--percentiles=150', "--percentiles: '150' is not a percentile in [0, 100]"),
    ('--percentiles=97,abc', "--percentiles: 'abc' is not a percentile in [0, 100]"),
])
def test_bad_percentiles_fail_before_any_work(tmp_path, flag, message):
  result = run_main('--config=configs/demo.py', f'--workdir={tmp_path / "w"}', '--mode=calibrate',
                    flag)
  assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_audit_of_no_images_and_unknown_fixed_parts_are_usage_errors(tmp_path):
  result = run_main('--config=configs/demo.py', f'--workdir={tmp_path}', '--mode=audit',
                    '--num_images=0')
  assert '--num_images must be at least 1, got 0' in result.stderr, result.stderr[-2000:]
  result = run_main('--config=configs/demo.py', f'--workdir={tmp_path}',
                    '--mode=leave_one_out', '--fixed_parts=1')
  assert "--fixed_parts: '1' is not a part of the model (0..0)" in result.stderr
  assert 'Traceback' not in result.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['eval', 'visualize'])
def test_a_mistyped_workdir_creates_nothing(tmp_path, mode):
  workdir = tmp_path / 'typo'
  result = run_main('--config=configs/demo.py', f'--workdir={workdir}', f'--mode={mode}')
  assert result.returncode != 0
  assert f'--workdir {workdir} does not exist' in result.stderr, result.stderr[-2000:]
  assert not workdir.exists()
  workdir.mkdir()
  result = run_main('--config=configs/demo.py', f'--workdir={workdir}', f'--mode={mode}',
                    '--which=best')
  assert f'no saved parameters at {workdir / "params" / "best"}' in result.stderr
  assert list(workdir.iterdir()) == []


# ----------------------------------------------------------------------------
# The modes that read a trained run take its config from <workdir>/config.json
# ----------------------------------------------------------------------------
TINY = REPO / 'tests' / 'fixtures' / 'tiny_config.py'


@pytest.mark.slow
def test_without_config_the_modes_that_need_one_fail_clearly(tmp_path):
  for mode in ('train', 'compare', 'import'):
    result = run_main(f'--workdir={tmp_path / "w"}', f'--mode={mode}')
    assert result.returncode != 0 and f'--mode {mode} needs --config' in result.stderr, \
        result.stderr[-2000:]
  result = run_main(f'--workdir={tmp_path / "typo"}', '--mode=eval')
  assert f'--workdir {tmp_path / "typo"} does not exist' in result.stderr, result.stderr[-2000:]
  result = run_main(f'--workdir={tmp_path}', '--mode=visualize')
  assert f'{tmp_path / "config.json"} does not exist' in result.stderr, result.stderr[-2000:]
  assert 'pass --config' in result.stderr and 'Traceback' not in result.stderr
  assert list(tmp_path.iterdir()) == []
  result = run_main(f'--workdir={tmp_path}', '--mode=eval', '--config.eval.splits=test')
  assert ('--config.eval.splits=test needs a --config to override; for the config of a trained '
          'run pass --config=configs/from_workdir.py:<workdir>') in result.stderr
  (tmp_path / 'config_compare.json').write_text('{}')  # the folder of a comparison
  result = run_main(f'--workdir={tmp_path}', '--mode=eval')
  assert f'pass the --workdir of one run, {tmp_path}/<method>/seed_<s>' in result.stderr, \
      result.stderr[-2000:]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny iFAM run by the entry point for 3 steps at learning rate 0, evaluated after each:
  (workdir, result). Its parameters never change, so neither does its validation metric."""
  workdir = tmp_path_factory.mktemp('trained')
  result = run_main(f'--config={TINY}:steps=3', f'--workdir={workdir}',
                    '--config.eval_every_epochs=0.125', '--config.optim.lr=0')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_eval_without_config_reproduces_the_training_evals(trained):
  workdir, _ = trained
  result = run_main(f'--workdir={workdir}', '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / 'config_eval.json').read_text() == (workdir / 'config.json').read_text()
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  final = {m['split']: m for m in logged if m['step'] == 3 and m['split'] != 'train'}
  evals = json.loads((workdir / 'eval' / 'final' / 'eval.json').read_text())['evals']
  assert sorted(evals) == sorted(final) == ['test', 'val']
  for split, metrics in evals.items():  # the same parameters on the same data
    for key in ('accuracy', 'worst_group_accuracy'):
      assert metrics[key] == pytest.approx(final[split][key], abs=1e-6), (split, key)

  # Overrides through the recipe that reads the workdir's config.
  result = run_main(f'--config=configs/from_workdir.py:{workdir}', f'--workdir={workdir}',
                    '--mode=eval', "--config.eval.splits=('test',)", '--which=best')
  assert result.returncode == 0, result.stderr[-3000:]
  assert list(json.loads((workdir / 'eval' / 'best' / 'eval.json').read_text())['evals']) == \
      ['test']


@pytest.mark.slow
def test_visualize_keeps_the_galleries_of_each_split(trained):
  workdir, _ = trained
  result = run_main(f'--workdir={workdir}', '--mode=visualize')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "split 'val'" in result.stdout, result.stdout
  val_gallery = workdir / 'pictures' / 'final' / 'val' / 'part_0.png'
  before = val_gallery.read_bytes()
  result = run_main(f'--workdir={workdir}', '--mode=visualize', '--split=test')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / 'pictures' / 'final' / 'test' / 'part_0.png').exists()
  assert val_gallery.read_bytes() == before


@pytest.mark.slow
def test_training_warns_when_the_validation_metric_never_changed(trained):
  workdir, result = trained
  metric = json.loads((workdir / 'config.json').read_text())['data']['best_metric']
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  values = [m[metric] for m in logged if m['split'] == 'val']
  assert len(values) == 3 and len(set(values)) == 1
  assert (f'validation {metric} was {values[0]:.4g} at every evaluation (3): params/best is the '
          "first evaluation's, it selected nothing") in result.stderr, result.stderr[-2000:]
  best = json.loads((workdir / 'params' / 'best.json').read_text())
  assert best['step'] == 1 and best['selected_nothing'] is True
  final = json.loads((workdir / 'params' / 'final.json').read_text())
  assert final['class_names'] == best['class_names'] == ['disc', 'plus']
