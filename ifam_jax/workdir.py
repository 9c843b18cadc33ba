"""What a run writes into its workdir and reads back, and the checks that keep a workdir whole.

  check_writable      every folder a run writes to accepts a file, tested before any work
  WorkdirLock         one training run per workdir: <workdir>/lock.json names its holder
  check_config_change a rerun's config against the one the workdir was trained with
  read_config         that config as the ConfigDict it was (the evaluation modes' default)
  MetricWriter        metrics.jsonl, rewritten past the checkpoint a resumed run starts from
  save_params / read_params_info
                      params/{final,best,imported}, or train checkpoint N as 'step_<N>'

Workdirs are `epath.Path`s, local or gs://bucket/... (multi-host Cloud TPU); pathlib would turn
gs://b/x into gs:/b/x. epath reaches gs:// through TensorFlow's gfile where TensorFlow is
installed, and otherwise through fsspec, which needs gcsfs (the `gcs` extra).
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ifam_jax import config_lib


# Folders a run writes below its workdir; each that exists is probed at start.
OUTPUT_FOLDERS = ('checkpoints', 'params', 'eval', 'thresholds', 'pictures', 'export')
# Config keys a resumed run honours: how long to train, how often to log, evaluate and save,
# what to evaluate, where to log, and how the same computation is laid out on devices. Any
# other change would alter the parameters' shapes, the data stream or what a checkpoint means.
RESUMABLE_KEYS = ('max_steps', 'total_epochs', 'log_every_steps', 'eval_every_epochs',
                  'checkpoint_every_steps', 'keep_checkpoints', 'data.num_workers',
                  'data.eval_batch_size', 'data.evals', 'eval', 'mesh', 'sharding_rules',
                  'fsdp_min_size', 'gpu_compiler_options', 'model.attention',
                  'model.stage2_token_tiers', 'model.stage2_token_groups', 'model.init_weights',
                  'compare', 'peers', 'log', 'compilation_cache_dir')


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
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')  # writers in other processes too
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
  A key that the workdir's config lacks (added to `base_config` since the run) at its default
  is no change: the default keeps the behaviour the run had. Nothing is written: the caller
  records the accepted changes.
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
  # A key the old config lacks was added to base_config since: the run had its default.
  defaults = _flatten(json.loads(config_as_json(config_lib.base_config())))
  old = {**{k: defaults[k] for k in new.keys() & defaults.keys()}, **old}
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


def read_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """<workdir>/config.json, written when the run trained, as the ConfigDict it was written from
  (`config_lib.restore_config`)."""
  path = workdir / 'config.json'
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: {workdir} holds no trained run')
  try:
    tree = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); restore it, or pass --config') from None
  return config_lib.restore_config(tree)


# ----------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------
class MetricWriter:
  """JSON lines in <workdir>/metrics.jsonl (process 0 only).

  A run resumed from step `start_step` first drops the lines of later steps (and a line cut short
  by the kill): it replays those steps exactly and logs them again, so the file reads as one
  uninterrupted run.

  A local file is appended to line by line. An object in a bucket cannot be appended to (gcsfs
  silently overwrites it instead), so there the lines are kept and the whole object is rewritten
  at most every `flush_seconds` and on `flush()`. The loop flushes before each checkpoint, so
  every line a resume keeps is saved before the checkpoint it resumes from.
  """

  def __init__(self, workdir: str | os.PathLike, start_step: int, flush_seconds: float = 60):
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self.active = jax.process_index() == 0
    self.append = is_local(self.path)
    self.flush_seconds = flush_seconds
    self.lines: list[str] = []
    if self.active and self.path.exists():
      for line in self.path.read_text().splitlines():
        try:
          if json.loads(line)['step'] <= start_step:
            self.lines.append(line + '\n')
        except json.JSONDecodeError:
          pass
      replace_text(self.path, ''.join(self.lines))
    self.flushed, self.pending = time.monotonic(), False

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    line = json.dumps({'step': step, 'split': split, **metrics}) + '\n'
    if self.append:
      with self.path.open('a') as f:
        f.write(line)
      return
    self.lines.append(line)
    self.pending = True
    if time.monotonic() - self.flushed >= self.flush_seconds:
      self.flush()

  def flush(self) -> None:
    """Rewrites a bucket's metrics.jsonl if lines were written since; local files are current."""
    if self.pending:
      replace_text(self.path, ''.join(self.lines))
      self.flushed, self.pending = time.monotonic(), False


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of metrics.jsonl, in order ([] before the first)."""
  path = epath.Path(workdir) / 'metrics.jsonl'
  records = []
  for line in path.read_text().splitlines() if path.exists() else ():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:  # a line cut short by a kill
      continue
  return records


def read_step_metrics(workdir: str | os.PathLike, step: int) -> dict[str, dict[str, Any]]:
  """{split: metrics} of the lines metrics.jsonl holds for `step` (the last line of each split)."""
  return {record['split']: {k: v for k, v in record.items() if k not in ('step', 'split')}
          for record in read_metrics(workdir) if record.get('step') == step}


# ----------------------------------------------------------------------------
# Parameters for evaluation: <workdir>/params/{final,best}, or a train checkpoint (step_<N>)
# ----------------------------------------------------------------------------
def train_checkpoint(workdir: str | os.PathLike, which: str) -> epath.Path | None:
  """<workdir>/checkpoints/<N>/state for which='step_<N>' (raises if no such step), else None."""
  match = re.fullmatch(r'step_(\d+)', which)
  if match is None:
    return None
  root = epath.Path(workdir) / 'checkpoints'
  path = absolute(root / str(int(match[1])) / 'state')
  if not path.is_dir():
    steps = sorted(int(p.name) for p in root.glob('*') if p.name.isdigit())
    raise FileNotFoundError(f'no train checkpoint of step {int(match[1])} in {root}; '
                            f'available steps: {steps}')
  return path


def read_params_info(workdir: str | os.PathLike, which: str) -> dict[str, Any] | None:
  """The JSON of <workdir>/params/<which>, or None: it exists only once the parameters do.

  For which='step_<N>': {'step', 'num_classes', 'ema'} of train checkpoint N, from its metadata.
  num_classes is the width of the saved classifier `head` (the ViT's, iFAM's stage 2), which
  describes exactly that checkpoint, also of a run that is still going or was killed.
  """
  if (state := train_checkpoint(workdir, which)) is not None:
    tree = ocp.PyTreeCheckpointHandler().metadata(state).tree
    saved = {'params': tree['train']['params'], 'frozen': tree['frozen']}
    widths = [leaf.shape[-1] for path, leaf in jax.tree_util.tree_leaves_with_path(saved)
              if ('head', 'kernel') in itertools.pairwise(getattr(k, 'key', None) for k in path)]
    if not widths:
      raise ValueError(f'{state} has no classifier head/kernel')
    return {'step': int(state.parent.name), 'num_classes': widths[0],
            'ema': 'ema' in tree['train']}
  path = epath.Path(workdir) / 'params' / f'{which}.json'
  return json.loads(path.read_text()) if path.exists() else None


def save_params(workdir: str | os.PathLike, which: str, params: Any, frozen: Any,
                info: Mapping[str, Any]) -> None:
  """Writes trainable + frozen parameters (EMA where enabled) and a JSON of what they are.

  Collective: every process calls it. The JSON is removed first and written last, so it marks
  complete parameters even if a kill interrupts the save.
  """
  workdir = epath.Path(workdir)
  info_path = workdir / 'params' / f'{which}.json'
  if jax.process_index() == 0:
    info_path.unlink(missing_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(absolute(workdir / 'params' / which),
                      {'params': params, 'frozen': frozen}, force=True)
  if jax.process_index() == 0:
    replace_text(info_path, json.dumps(dict(info), indent=2) + '\n')
  multihost_utils.sync_global_devices(f'save_params {which}')
