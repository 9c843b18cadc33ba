"""The workdir's guards: the lock, config changes on resume, writability, batch sizes vs mesh."""

import json
import os
import socket
import subprocess
import sys
import types

import ml_collections
import pytest
from etils import epath

from ifam_jax import config_lib, sharding
from ifam_jax import workdir as workdir_lib


def dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


# ----------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------
def test_a_second_run_refuses_naming_the_holder(tmp_path):
  workdir = epath.Path(tmp_path)
  with workdir_lib.WorkdirLock(workdir):
    holder = json.loads((tmp_path / 'lock.json').read_text())
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(RuntimeError) as e:
      workdir_lib.WorkdirLock(workdir).acquire()
    for part in (str(tmp_path), f'host {socket.gethostname()}', f'pid {os.getpid()}',
                 f'since {holder["since"]}'):
      assert part in str(e.value)
  assert not (tmp_path / 'lock.json').exists()  # released on exit
  workdir_lib.WorkdirLock(workdir).acquire()  # and free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
  lock = tmp_path / 'lock.json'
  pid = dead_pid()
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': pid, 'since': 'then'}))
  with caplog.at_level('WARNING'), workdir_lib.WorkdirLock(epath.Path(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert f'pid {pid}' in caplog.text and 'no longer running' in caplog.text
  lock.write_text('{"host": "this', encoding='utf-8')  # cut short by a kill while written
  with workdir_lib.WorkdirLock(epath.Path(tmp_path)):
    assert json.loads(lock.read_text())['pid'] == os.getpid()


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(tmp_path):
  # Our own pid, but another process start time: the holder died and the pid was reused.
  (tmp_path / 'lock.json').write_text(json.dumps(
      {'host': socket.gethostname(), 'pid': os.getpid(), 'since': 'then', 'process_start': '1'}))
  with workdir_lib.WorkdirLock(epath.Path(tmp_path)) as lock:
    assert lock.held


def test_a_lock_held_on_another_host_is_never_taken(tmp_path):
  (tmp_path / 'lock.json').write_text(json.dumps(
      {'host': 'other-host', 'pid': dead_pid(), 'since': '2026-01-01T00:00:00+00:00'}))
  with pytest.raises(RuntimeError, match='host other-host.*delete'):
    workdir_lib.WorkdirLock(epath.Path(tmp_path)).acquire()


# ----------------------------------------------------------------------------
# Config changes on resume
# ----------------------------------------------------------------------------
def config(**overrides):
  c = ml_collections.ConfigDict({'seed': 0, 'total_epochs': 2, 'max_steps': 0,
                                 'model': {'num_parts': 1, 'vit_overrides': {'width': 32}},
                                 'data': {'train': {'root': '/data'}, 'num_workers': 0}})
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def trained_workdir(tmp_path, saved=('checkpoints',)):
  workdir = epath.Path(tmp_path)
  workdir_lib.record_config(workdir, config(), {})
  for name in saved:
    (workdir / name).mkdir(parents=True)
  return workdir


def test_a_change_of_shapes_or_data_is_refused_before_anything_is_written(tmp_path):
  workdir = trained_workdir(tmp_path)
  before = (tmp_path / 'config.json').read_text()
  changed = config(**{'model.vit_overrides.width': 64, 'data.train.root': '/other'})
  with pytest.raises(ValueError) as e:
    workdir_lib.check_config_change(workdir, changed)
  assert 'model.vit_overrides.width: 32 -> 64' in str(e.value)
  assert "data.train.root: '/data' -> '/other'" in str(e.value)
  assert (tmp_path / 'config.json').read_text() == before


def test_resumable_changes_are_allowed_and_recorded(tmp_path, capsys):
  workdir = trained_workdir(tmp_path)
  changed = config(total_epochs=3, max_steps=10, **{'data.num_workers': 4})
  changes = workdir_lib.check_config_change(workdir, changed)
  assert changes == {'data.num_workers': {'old': 0, 'new': 4},
                     'max_steps': {'old': 0, 'new': 10}, 'total_epochs': {'old': 2, 'new': 3}}
  workdir_lib.record_config(workdir, changed, changes)
  assert json.loads((tmp_path / 'config.json').read_text())['total_epochs'] == 3
  [record] = [json.loads(line) for line in
              (tmp_path / 'config_changes.jsonl').read_text().splitlines()]
  assert record['changed'] == changes
  assert 'total_epochs 2 -> 3' in capsys.readouterr().out
  assert workdir_lib.check_config_change(workdir, changed) == {}


def test_a_key_added_since_the_run_resumes_at_its_default_only(tmp_path):
  """A workdir trained before a setting existed resumes with it at base_config's default (the
  reference's behaviour, which the run had), and refuses any other value."""
  workdir = trained_workdir(tmp_path)
  assert config_lib.base_config().model.mask_erode == 0
  assert workdir_lib.check_config_change(workdir, config(**{'model.mask_erode': 0})) == {}
  with pytest.raises(ValueError, match='model.mask_erode: 0 -> 1'):
    workdir_lib.check_config_change(workdir, config(**{'model.mask_erode': 1}))


def test_a_workdir_without_training_state_takes_any_config(tmp_path):
  workdir = trained_workdir(tmp_path, saved=())
  assert workdir_lib.check_config_change(workdir, config(seed=1)) == {}
  # The demo keeps its runs in per-model subfolders.
  (tmp_path / 'ifam' / 'params').mkdir(parents=True)
  with pytest.raises(ValueError, match='seed: 0 -> 1'):
    workdir_lib.check_config_change(workdir, config(seed=1))


# ----------------------------------------------------------------------------
# Writability and batch sizes
# ----------------------------------------------------------------------------
def test_an_output_folder_that_takes_no_file_fails_naming_it(tmp_path):
  workdir_lib.check_writable(epath.Path(tmp_path))
  assert list(tmp_path.iterdir()) == []  # the probe leaves nothing
  (tmp_path / 'checkpoints').write_text('')  # a file where the folder should be
  with pytest.raises(PermissionError, match=f'{tmp_path / "checkpoints"} is not writable'):
    workdir_lib.check_writable(epath.Path(tmp_path))


def test_batch_sizes_that_the_mesh_cannot_split_name_the_key_and_valid_values():
  mesh = types.SimpleNamespace(size=8, shape={'data': 4, 'fsdp': 2})
  sharding.check_batch_size('global_batch_size', 16, mesh)
  with pytest.raises(ValueError) as e:
    sharding.check_batch_size('global_batch_size', 12, mesh)
  assert 'global_batch_size=12' in str(e.value) and 'nearest valid values: 8 or 16' in str(e.value)
  with pytest.raises(ValueError, match=r'data.eval_batch_size=6 .* nearest valid values: 8 \('):
    sharding.check_batch_size('data.eval_batch_size', 6, mesh)


def test_replace_text_leaves_another_writers_temporary_file_alone(tmp_path):
  """Two processes replacing one file (parallel comparison seeds write compare.json) each write
  their own temporary file."""
  target = epath.Path(tmp_path) / 'compare.json'
  other = tmp_path / 'compare.json.tmp'
  other.write_text('half written by another process')
  workdir_lib.replace_text(target, '{"seeds": [0]}')
  assert target.read_text() == '{"seeds": [0]}'
  assert other.read_text() == 'half written by another process'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['compare.json', 'compare.json.tmp']
