"""The entry point checks its flags and the workdir of the evaluation modes before any work."""

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'ifam_jax.main', *args], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                        text=True, timeout=120)


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
