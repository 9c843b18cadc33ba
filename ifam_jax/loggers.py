"""Where a training run's records go: metrics.jsonl, TensorBoard and Weights & Biases.

  check_config       the `log` settings, and wandb being installed when asked for, before any work
  RunLogger          the train loop's one writer: metrics.jsonl exactly as `MetricWriter` writes
                     it (the source of truth), TensorBoard event files in <workdir>/tensorboard/
                     and a W&B run, on process 0
  PartMapPicture     the part-map picture of a few eval examples, from the parameters in memory
  TrainPictures      that picture at each evaluation of the train loop, as '<split>/part_maps'
  write_eval_report  `--mode eval`'s report into TensorBoard, under eval_<which>/

Scalars are named `<split>/<metric>`; nested metrics (per group, per class, stage 1) are joined
with '/', non-numeric values skipped, and a mapping of more than MAX_SERIES entries (ImageNet's
per-class accuracy) is left to metrics.jsonl. A run resumed from step s reads as one run: the
event file it starts holds TensorBoard's purge marker at s + 1 (tensorboardX's `purge_step`),
which drops the earlier files' records of later steps, as metrics.jsonl drops its lines.

TensorBoard and W&B never stop a run: a failing sink is reported once and switched off. Event
files are written in the caller's thread, so that an I/O error surfaces here: tensorboardX's
`SummaryWriter` writes in a thread that dies on one, and then blocks the caller once its queue
fills. gs:// workdirs: tensorboardX writes there without TensorFlow through google-cloud-storage
(a dependency of gcsfs, the `gcs` extra), rewriting the object on each flush; without it the run
warns and writes no event files.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from tensorboardX import event_file_writer, record_writer
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2, summary_pb2

from ifam_jax import methods, sharding, visualize
from ifam_jax import workdir as workdir_lib
from ifam_jax.apply import apply

MAX_SERIES = 64  # a nested mapping with more entries stays in metrics.jsonl only
PICTURE_TILE = 128  # pixels of a picture tile's longer side
WANDB_MODES = ('', 'online', 'offline', 'disabled', 'shared')
WANDB_RUN_FILE = 'wandb_run.json'  # the W&B run a resumed run continues
_INVALID_TAG = re.compile(r'[^-/\w.]')  # what TensorBoard would replace in a tag


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------
def import_wandb() -> Any:
  try:
    import wandb  # pylint: disable=import-outside-toplevel  # the optional `wandb` extra
  except ImportError:
    raise ImportError('log.wandb_project is set but wandb is not installed: '
                      'pip install -e ".[wandb]"') from None
  return wandb


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `log` settings; wandb imported when log.wandb_project asks for it."""
  log = config.log
  if not isinstance(log.part_map_images, int) or log.part_map_images < 0:
    raise ValueError(f'log.part_map_images must be a count >= 0, got {log.part_map_images!r}')
  if log.wandb_mode not in WANDB_MODES:
    raise ValueError(f'log.wandb_mode must be one of {WANDB_MODES}, got {log.wandb_mode!r}')
  if isinstance(log.wandb_tags, str) or not all(isinstance(t, str) for t in log.wandb_tags):
    raise ValueError(f'log.wandb_tags must be a sequence of strings, got {log.wandb_tags!r}')
  if log.wandb_project:
    import_wandb()


# ----------------------------------------------------------------------------
# Scalars
# ----------------------------------------------------------------------------
def flatten_scalars(prefix: str, metrics: Mapping[str, Any]) -> dict[str, float]:
  """{'<prefix>/<key>[/<nested key>...]': value} of the numeric entries of `metrics`.

  Booleans, strings and lists are skipped, as are mappings of more than MAX_SERIES entries.
  Characters TensorBoard does not keep in a tag become '_', so that both sinks name alike.
  """
  flat = {}
  for key, value in metrics.items():
    tag = f'{prefix}/{_INVALID_TAG.sub("_", str(key))}'
    if isinstance(value, Mapping):
      if len(value) <= MAX_SERIES:
        flat.update(flatten_scalars(tag, value))
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
      flat[tag] = float(value)
  return flat


# ----------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------
class TensorBoard:
  """One event file in `folder`, written synchronously.

  `purge_step`: TensorBoard forgets the records of this step and later that files read before
  this one hold. The file name ends in the time in ns, so that files started within the same
  second (which tensorboardX's names alone would not tell apart) sort in the order written.
  """

  def __init__(self, folder: str, purge_step: int | None = None, flush_seconds: float = 60):
    if workdir_lib.is_local(folder):
      os.makedirs(folder, exist_ok=True)
    self.writer = event_file_writer.EventsWriter(os.path.join(folder, 'events'),
                                                 f'.{time.time_ns()}')
    self.local = workdir_lib.is_local(folder)
    self.flush_seconds = flush_seconds
    if purge_step is not None:
      self.writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self.flushed = time.monotonic()

  def write(self, step: int, summary: Any) -> None:
    self.writer.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    # Locally a flush is cheap and TensorBoard shows the record at once; an object in a bucket
    # is rewritten whole on each flush.
    if self.local or time.monotonic() - self.flushed >= self.flush_seconds:
      self.flush()

  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if scalars:
      self.write(step, summary_pb2.Summary(value=[
          tb_summary.scalar(tag, value).value[0] for tag, value in scalars.items()]))

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    self.write(step, tb_summary.image(tag, picture, dataformats='HWC'))

  def flush(self) -> None:
    self.writer.flush()
    self.flushed = time.monotonic()

  def close(self) -> None:
    self.writer.close()


def open_tensorboard(workdir: epath.Path, purge_step: int | None) -> TensorBoard | None:
  """<workdir>/tensorboard/'s new event file, or None with a warning if it cannot be made."""
  folder = os.fspath(workdir / 'tensorboard')
  try:
    if folder.startswith('gs://') and not record_writer.GCS_ENABLED:
      raise ImportError('tensorboardX reaches gs:// through google-cloud-storage, which is not '
                        'installed (pip install -e ".[gcs]" brings it)')
    return TensorBoard(folder, purge_step)
  except Exception as e:  # pylint: disable=broad-except  # logging never stops a run
    logging.warning('No TensorBoard event files: cannot write to %s (%s: %s). metrics.jsonl '
                    'has every record.', folder, type(e).__name__, e)
    return None


def write_eval_report(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      which: str, report: Mapping[str, Any]) -> None:
  """`--mode eval`'s report as TensorBoard scalars at its parameters' step (0 if they have
  none, e.g. imported ones): 'eval_<which>/<split>/<metric>' for each split of report['evals'],
  'eval_<which>/<key>/...' for the rest (evals_without_thresholds, in9_accuracy, bg_gap, ...)."""
  if not config.log.tensorboard or jax.process_index() != 0:
    return
  board = open_tensorboard(epath.Path(workdir), None)
  if board is None:
    return
  prefix = f'eval_{_INVALID_TAG.sub("_", which)}'
  rest = {k: v for k, v in report.items() if k not in ('which', 'step', 'thresholds', 'evals')}
  scalars = {**flatten_scalars(prefix, report.get('evals', {})), **flatten_scalars(prefix, rest)}
  try:
    board.scalars(report.get('step') or 0, scalars)
    board.close()
  except Exception as e:  # pylint: disable=broad-except  # logging never stops a run
    logging.warning('Writing the eval report to TensorBoard failed (%s: %s)', type(e).__name__, e)


# ----------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------
class WandbRun:
  """The W&B run of a workdir; its id is kept in <workdir>/wandb_run.json, so that a resumed
  run continues it.

  W&B keeps a run's steps increasing: the steps a resumed run replays (those logged after its
  checkpoint, before the kill) were already logged, with the same values but timings, and
  are skipped here. W&B's files go to $WANDB_DIR if set, else into a local workdir.
  """

  def __init__(self, workdir: epath.Path, config: ml_collections.ConfigDict):
    self.wandb = import_wandb()
    log = config.log
    id_path = workdir / WANDB_RUN_FILE
    run_id = json.loads(id_path.read_text())['id'] if id_path.exists() else None
    # Named at each run: W&B reads $WANDB_DIR once per process.
    files = os.environ.get('WANDB_DIR') or (os.fspath(workdir) if workdir_lib.is_local(workdir)
                                            else None)
    self.run = self.wandb.init(
        project=log.wandb_project, entity=log.wandb_entity or None, mode=log.wandb_mode or None,
        tags=list(log.wandb_tags) or None, id=run_id, resume='allow' if run_id else None,
        name='/'.join(workdir.parts[-2:]), dir=files,
        config=json.loads(workdir_lib.config_as_json(config)))
    if run_id is None and not self.run.disabled:
      workdir_lib.replace_text(id_path, json.dumps(
          {'id': self.run.id, 'project': log.wandb_project, 'entity': log.wandb_entity}) + '\n')
    self.first_step = self.run.starting_step

  def log(self, step: int, values: Mapping[str, Any]) -> None:
    if values and step >= self.first_step:
      self.run.log(dict(values), step=step)

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    self.log(step, {tag: self.wandb.Image(picture)})

  def close(self) -> None:
    self.run.finish()


# ----------------------------------------------------------------------------
# The train loop's writer
# ----------------------------------------------------------------------------
class RunLogger:
  """metrics.jsonl, TensorBoard and W&B at once, for the train loop (process 0 writes).

  metrics.jsonl is `workdir.MetricWriter`'s, unchanged. `start_step`: the step the run resumes
  from, past which every sink drops what an earlier run logged.
  """

  def __init__(self, workdir: str | os.PathLike, config: ml_collections.ConfigDict,
               start_step: int, flush_seconds: float = 60):
    workdir = epath.Path(workdir)
    self.metrics = workdir_lib.MetricWriter(workdir, start_step, flush_seconds)
    self.sinks: dict[str, Any] = {}
    if not self.metrics.active:
      return
    if config.log.tensorboard and (board := open_tensorboard(workdir, start_step + 1)):
      self.sinks['TensorBoard'] = board
    if config.log.wandb_project and (run := self._guard('W&B', WandbRun, workdir, config)):
      self.sinks['W&B'] = run

  def _guard(self, name: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)`; on an error, None: the error is reported and sink `name` switched off."""
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except  # logging never stops a run
      logging.warning('%s logging failed (%s: %s) and is off for the rest of the run; '
                      'metrics.jsonl has every record.', name, type(e).__name__, e)
      self.sinks.pop(name, None)
      return None

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    self.metrics.write(step, split, metrics)
    if not self.sinks:
      return
    scalars = flatten_scalars(_INVALID_TAG.sub('_', split), metrics)
    if board := self.sinks.get('TensorBoard'):
      self._guard('TensorBoard', board.scalars, step, scalars)
    if run := self.sinks.get('W&B'):
      self._guard('W&B', run.log, step, scalars)

  def image(self, step: int, tag: str, picture: np.ndarray) -> None:
    """A uint8 [H, W, 3] picture under `tag` in TensorBoard and W&B (not in metrics.jsonl)."""
    for name, sink in list(self.sinks.items()):
      self._guard(name, sink.image, step, tag, picture)

  def flush(self) -> None:
    self.metrics.flush()
    if board := self.sinks.get('TensorBoard'):
      self._guard('TensorBoard', board.flush)

  def close(self) -> None:
    self.flush()
    for name, sink in list(self.sinks.items()):
      self._guard(name, sink.close)
    self.sinks.clear()


# ----------------------------------------------------------------------------
# The part-map picture during training
# ----------------------------------------------------------------------------
class PartMapPicture:
  """`visualize.example_picture` of `count` examples of `source` (`examples_per_group`), for
  parameters in memory. The examples are read and placed once, the forward compiled once.
  `has_parts` is False for models without part maps.
  """

  def __init__(self, config: ml_collections.ConfigDict, source: Any, count: int, graphdef: Any,
               rest: Any, mesh: jax.sharding.Mesh, params: Any, frozen: Any):
    self.source = source
    self.indices = visualize.examples_per_group(source, count)
    self.images, inputs = visualize.eval_batch(config, source, self.indices)
    replicated = sharding.replicated(mesh)
    self.args = jax.device_put((self.images, inputs, jax.random.key(config.seed)), replicated)
    predict = methods.get(config.model.kind).predict
    self.forward = jax.jit(
        lambda params, frozen, images, inputs, rng: apply(graphdef, rest, params, frozen, images,
                                                          predict, rng=rng, **inputs),
        out_shardings=replicated)
    self.has_parts = 'part_maps' in jax.eval_shape(self.forward, params, frozen, *self.args)
    self.scale = PICTURE_TILE / max(self.images.shape[1:3])

  def __call__(self, params: Any, frozen: Any) -> np.ndarray:
    out = jax.device_get(self.forward(params, frozen, *self.args))
    return np.asarray(visualize.example_picture(self.source, self.indices, self.images, out,
                                                self.scale))


class TrainPictures:
  """The part-map picture at each evaluation of the train loop, as '<split>/part_maps'.

  Drawn from data.val_split (else the first eval) when log.part_map_images > 0 and a sink
  takes pictures. Every process computes it, since the parameters may span them; built at the
  first evaluation, inside the loop's mesh. A model without part maps, or an error, ends it.
  """

  def __init__(self, config: ml_collections.ConfigDict, eval_sources: Mapping[str, Any],
               graphdef: Any, rest: Any, mesh: jax.sharding.Mesh):
    self.config, self.graphdef, self.rest, self.mesh = config, graphdef, rest, mesh
    self.split = config.data.val_split or next(iter(eval_sources), '')
    self.source = eval_sources.get(self.split)
    self.on = bool(config.log.part_map_images and self.source is not None
                   and (config.log.tensorboard or config.log.wandb_project))
    self.picture: PartMapPicture | None = None

  def log(self, writer: RunLogger, step: int, params: Any, frozen: Any) -> None:
    if not self.on:
      return
    try:
      if self.picture is None:
        self.picture = PartMapPicture(self.config, self.source, self.config.log.part_map_images,
                                      self.graphdef, self.rest, self.mesh, params, frozen)
      self.on = self.picture.has_parts
      if self.on:
        writer.image(step, f'{_INVALID_TAG.sub("_", self.split)}/part_maps',
                     self.picture(params, frozen))
    except Exception as e:  # pylint: disable=broad-except  # logging never stops a run
      logging.warning('The part-map picture failed (%s: %s) and is off for the rest of the '
                      'run.', type(e).__name__, e)
      self.on = False
