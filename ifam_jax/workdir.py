"""What a run keeps in its workdir, and the checks that keep a workdir whole.

  check_writable      every folder a run writes to accepts a file, tested before any work
  WorkdirLock         one training run per workdir: <workdir>/lock.json names its holder
  check_config_change a rerun's config against the one the workdir was trained with

Workdirs are `epath.Path`s, local or gs://bucket/... (multi-host Cloud TPU); pathlib would turn
gs://b/x into gs:/b/x. epath reaches gs:// through TensorFlow's gfile where TensorFlow is
installed, and otherwise through fsspec, which needs gcsfs (the `gcs` extra).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging
from etils import epath

# Folders a run writes below its workdir; each that exists is probed at start.
OUTPUT_FOLDERS = ('checkpoints', 'params', 'eval', 'thresholds', 'pictures', 'export')
# Config keys a resumed run honours: how long to train, how often to log, evaluate and save,
# what to evaluate, and how the same computation is laid out on devices. Any other change
# would alter the parameters' shapes, the data stream or what a checkpoint means.
RESUMABLE_KEYS = ('max_steps', 'total_epochs', 'log_every_steps', 'eval_every_epochs',
                  'checkpoint_every_steps', 'keep_checkpoints', 'data.num_workers',
                  'data.eval_batch_size', 'data.evals', 'eval', 'mesh', 'sharding_rules',
                  'fsdp_min_size', 'gpu_compiler_options', 'model.attention',
                  'model.stage2_token_tiers', 'model.stage2_token_groups', 'model.init_weights',
                  'demo_test_split')


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------
def is_local(path: str | os.PathLike) -> bool:
  """False for gs:// and other object stores: no appends, no atomic renames, no directories."""
  return '://' not in os.fspath(path)


def absolute(path: epath.Path) -> epath.Path:
  """`path` for Orbax, which needs absolute paths. A gs:// path is one already; its
  `.absolute()` would be '<cwd>/gs:/bucket/...'."""
  return path.absolute() if is_local(path) else path


def replace_text(path: epath.Path, text: str) -> None:
  """Writes `path` atomically, so a kill never leaves it half-written: locally through a
  temporary file; an object in a bucket appears only once completely written anyway."""
  if not is_local(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def probe_writable(folder: epath.Path) -> None:
  """Writes and removes a probe file in `folder`: permission bits say nothing for root or on
  object stores, so only a real write tells."""
  probe = folder / f'.write_probe_{os.getpid()}'
  try:
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise PermissionError(f'{folder} is not writable ({e.strerror or e}); fix it, or pass '
                          'another --workdir') from None


def check_writable(workdir: epath.Path) -> None:
  """Probes the workdir and each output folder it already has, before any work: a run that
  cannot save would otherwise train until its first checkpoint and die there."""
  probe_writable(workdir)
  for name in OUTPUT_FOLDERS:
    if (workdir / name).exists():
      probe_writable(workdir / name)


def has_training_state(workdir: epath.Path) -> bool:
  """Whether a run saved anything here (also in the demo's per-model subfolders)."""
  candidates = [workdir] + ([p for p in workdir.iterdir() if p.is_dir()]
                            if workdir.is_dir() else [])
  return any((p / 'checkpoints').exists() or (p / 'params').exists() for p in candidates)


# ----------------------------------------------------------------------------
# The workdir lock
# ----------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux), which tells a live holder from a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _is_alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return start is None or _process_start(pid) in (None, start)


class WorkdirLock:
  """<workdir>/lock.json: host, pid and start of the one run training in this workdir.

  A second run refuses to start, naming the holder. A lock whose holder died on this host (a
  kill -9, a crash) is taken over with a notice; one held on another host is not, since its
  process cannot be checked from here: the message says to delete the file if that run is
  gone. Locally the file is created atomically; on an object store two runs starting in the
  same second can both pass.
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / 'lock.json'
    self.held = False

  def acquire(self) -> None:
    record = {'host': socket.gethostname(), 'pid': os.getpid(),
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'process_start': _process_start(os.getpid()), 'command': sys.argv}
    for _ in range(2):  # the second try follows the removal of a stale lock
      if self._create(json.dumps(record, indent=2) + '\n'):
        self.held = True
        return
      holder = self._holder()
      if holder is None:
        continue
      if holder.get('pid') is None or (
          holder.get('host') == record['host']
          and not _is_alive(holder['pid'], holder.get('process_start'))):
        logging.warning('Taking over %s: its holder (host %s, pid %s, since %s) is no longer '
                        'running.', self.path, holder.get('host'), holder.get('pid'),
                        holder.get('since'))
        self.path.unlink(missing_ok=True)
        continue
      raise RuntimeError(
          f'{self.path.parent} is in use by another run: host {holder.get("host")}, pid '
          f'{holder.get("pid")}, since {holder.get("since")}. Wait for it, or delete '
          f'{self.path} if that run is gone.')
    raise RuntimeError(f'could not take the workdir lock {self.path}')

  def _create(self, text: str) -> bool:
    if not is_local(self.path):
      if self.path.exists():
        return False
      self.path.write_text(text)
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True

  def _holder(self) -> dict[str, Any] | None:
    """The holder's record; an unreadable one (a kill mid-write) counts as a dead holder."""
    try:
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:
      return {'pid': None}
    pid = holder.get('pid') if isinstance(holder, dict) else None
    return {**holder, 'pid': pid} if isinstance(pid, int) and pid > 0 else {'pid': None}

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *unused: Any) -> None:
    self.release()


# ----------------------------------------------------------------------------
# Config changes on resume
# ----------------------------------------------------------------------------
def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _resumable(key: str) -> bool:
  return any(key == k or key.startswith(k + '.') for k in RESUMABLE_KEYS)


def config_as_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2) + '\n'


def check_config_change(workdir: epath.Path, config: ml_collections.ConfigDict,
                        ) -> dict[str, dict[str, Any]]:
  """The keys whose values differ from <workdir>/config.json, once the workdir holds a run.

  Raises naming the keys if a change would alter the parameters' shapes, the data stream or
  what a checkpoint means; returns the resumable changes (see RESUMABLE_KEYS), {} when none.
  Nothing is written: the caller records the accepted changes.
  """
  path = workdir / 'config.json'
  if not (path.exists() and has_training_state(workdir)):
    return {}
  try:
    old = _flatten(json.loads(path.read_text()))
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore it, or pass another '
                     '--workdir') from None
  new = _flatten(json.loads(config_as_json(config)))
  changed = {k: {'old': old.get(k), 'new': new.get(k)} for k in sorted(old.keys() | new.keys())
             if old.get(k) != new.get(k)}
  refused = [k for k in changed if not _resumable(k)]
  if refused:
    details = '; '.join(f'{k}: {changed[k]["old"]!r} -> {changed[k]["new"]!r}'
                        for k in refused[:8])
    more = f' (and {len(refused) - 8} more)' if len(refused) > 8 else ''
    raise ValueError(f'{workdir} was trained with another config; these keys cannot change on '
                     f'resume: {details}{more}. Use a new --workdir, or set them back '
                     f'(see {path}).')
  return changed


def record_config(workdir: epath.Path, config: ml_collections.ConfigDict,
                  changed: Mapping[str, Any]) -> None:
  """Writes config.json, and appends the accepted changes to config_changes.jsonl."""
  if changed:
    line = json.dumps({'time': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
                       'changed': dict(changed)}) + '\n'
    log = workdir / 'config_changes.jsonl'
    replace_text(log, (log.read_text() if log.exists() else '') + line)
    print(f'Resuming with changed settings (recorded in {log}): ' + ', '.join(
        f'{k} {v["old"]!r} -> {v["new"]!r}' for k, v in changed.items()), flush=True)
  replace_text(workdir / 'config.json', config_as_json(config))
