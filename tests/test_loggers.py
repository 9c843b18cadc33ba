"""Logging sinks (ifam_jax/loggers.py): TensorBoard event files and W&B offline runs, each read
back by its own reader written here; metrics.jsonl byte for byte as without them.

Event files are TFRecords (8-byte length, its masked CRC-32C, the payload, its masked CRC-32C)
of `Event` protos, read as TensorBoard reads them: a SessionLog START at step p drops the
records of steps >= p read before it. W&B's offline runs are LevelDB-style logs of `Record`
protos (7-byte file header ':W&B', 0xBEE1, version 0; 32 KiB blocks of chunks with a CRC-32 of
type and data, a 2-byte length and a type: full, first, middle, last).
"""

import io
import json
import pathlib
import struct
import sys
import types
import zlib

import numpy as np
import pytest
from PIL import Image
from tensorboardX import record_writer
from tensorboardX.proto import event_pb2

from ifam_jax import config_lib, evaluate, factory, loggers, train, visualize
from ifam_jax import workdir as workdir_lib

from fixtures.tiny_config import get_config
from test_workdir_paths import gcs  # pylint: disable=unused-import  # the fake bucket fixture


# ----------------------------------------------------------------------------
# Reading event files
# ----------------------------------------------------------------------------
def _crc32c_table():
  table = []
  for n in range(256):
    crc = n
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
  crc = 0xFFFFFFFF
  for byte in data:
    crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(data):
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(data):
  """The payloads of a TFRecord file's bytes, their CRCs checked."""
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('<Q', header)
    assert struct.unpack('<I', data[pos + 8:pos + 12])[0] == masked_crc(header)
    payload = data[pos + 12:pos + 12 + length]
    assert struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])[0] == masked_crc(payload)
    yield payload
    pos += 16 + length


def events_of(data):
  return [event_pb2.Event.FromString(payload) for payload in records(data)]


def read_events(folder):
  """The events of every file in `folder`, files in name order (TensorBoard's)."""
  paths = sorted(pathlib.Path(folder).glob('events.out.tfevents.*'))
  assert paths, f'no event files in {folder}'
  return [event for path in paths for event in events_of(path.read_bytes())]


def tensorboard_view(events):
  """({tag: [(step, value)]}, {tag: [(step, Summary.Image)]}) as TensorBoard shows them."""
  kept = []
  for event in events:
    if event.HasField('session_log') and event.session_log.status == event_pb2.SessionLog.START:
      kept = [e for e in kept if e.step < event.step]
    elif event.HasField('summary'):
      kept.append(event)
  scalars, images = {}, {}
  for event in kept:
    for value in event.summary.value:
      if value.HasField('image'):
        images.setdefault(value.tag, []).append((event.step, value.image))
      else:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars, images


def f32(value):
  """A scalar as TensorBoard stores it (float32)."""
  return float(np.float32(value))


def test_crc32c_check_value():
  assert crc32c(b'123456789') == 0xE3069283  # the CRC-32C catalogue's check value


# ----------------------------------------------------------------------------
# Reading W&B offline runs
# ----------------------------------------------------------------------------
def wandb_records(path):
  """The `Record` protos of a .wandb file."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  data = pathlib.Path(path).read_bytes()
  assert struct.unpack('<4sHB', data[:7]) == (b':W&B', 0xBEE1, 0)
  pos, chunks, block = 7, b'', 32768
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a header is padding
      pos += block - pos % block
      continue
    crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    chunk = data[pos + 7:pos + 7 + length]
    assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
    pos += 7 + length
    chunks += chunk
    if kind in (1, 4):  # full, last
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      yield record
      chunks = b''


def wandb_run(run_dir):
  """(run record, {step: {key: value}}) of an offline run's directory."""
  [path] = run_dir.glob('run-*.wandb')
  run, history = None, {}
  for record in wandb_records(path):
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run = record.run
    elif kind == 'history':
      history[record.history.step.num] = {
          item.key or '/'.join(item.nested_key): json.loads(item.value_json)
          for item in record.history.item if not (item.key or item.nested_key[0]).startswith('_')}
  return run, history


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
  """W&B offline, its files in tmp_path: no network, nothing in the home folder."""
  for name in ('WANDB_DIR', 'WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR',
               'WANDB_ARTIFACT_DIR'):
    (tmp_path / name).mkdir()
    monkeypatch.setenv(name, str(tmp_path / name))
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  return tmp_path / 'WANDB_DIR' / 'wandb'


# ----------------------------------------------------------------------------
# The writer
# ----------------------------------------------------------------------------
def make_config(**log):
  config = config_lib.base_config()
  config.log.update(log)
  return config


EVAL = {'num_examples': 16, 'accuracy': 0.75, 'worst_group_accuracy': 0.5,
        'group_accuracy': {'landbird/land': 1.0, 'water bird/water': 0.5},
        'stage1': {'accuracy': 0.25, 'class_accuracy': {'a': 0.125}},
        'selected': True, 'which': 'final', 'thresholds': None, 'shape': [2, 3],
        'class_accuracy': {f'class {i}': 0.5 for i in range(loggers.MAX_SERIES + 1)}}
# EVAL's TensorBoard scalars, by hand: nested names joined by '/', a space made '_'; the
# boolean, text, None, list and the mapping of too many series left out.
EVAL_SCALARS = {'num_examples': 16.0, 'accuracy': 0.75, 'worst_group_accuracy': 0.5,
                'group_accuracy/landbird/land': 1.0, 'group_accuracy/water_bird/water': 0.5,
                'stage1/accuracy': 0.25, 'stage1/class_accuracy/a': 0.125}


def test_scalars_per_split_in_tensorboard(tmp_path):
  writer = loggers.RunLogger(tmp_path, make_config(), 0)
  writer.write(1, 'train', {'loss': 0.5, 'lr': 1e-3, 'epoch': 0.5})
  writer.write(2, 'train', {'loss': 0.25, 'lr': 2e-3, 'epoch': 1.0})
  writer.write(2, 'val', EVAL)
  writer.close()
  scalars, images = tensorboard_view(read_events(tmp_path / 'tensorboard'))
  expected = {'train/loss': [(1, 0.5), (2, 0.25)], 'train/lr': [(1, f32(1e-3)), (2, f32(2e-3))],
              'train/epoch': [(1, 0.5), (2, 1.0)],
              **{f'val/{k}': [(2, v)] for k, v in EVAL_SCALARS.items()}}
  assert scalars == expected
  assert not images


def test_picture_is_a_png_image_summary(tmp_path):
  picture = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  writer = loggers.RunLogger(tmp_path, make_config(), 0)
  writer.image(4, 'val/part_maps', picture)
  writer.close()
  _, images = tensorboard_view(read_events(tmp_path / 'tensorboard'))
  [(step, image)] = images['val/part_maps']
  assert (step, image.height, image.width, image.colorspace) == (4, 37, 53, 3)
  png = Image.open(io.BytesIO(image.encoded_image_string))
  assert png.format == 'PNG'
  np.testing.assert_array_equal(np.asarray(png), picture)


def test_resume_reads_as_one_run(tmp_path):
  """A run killed after step 6 and resumed from its checkpoint at step 4 replays 5 and 6."""
  for start, steps, factor, accuracy in ((0, range(1, 7), 1.0, 0.5), (4, range(5, 9), 10.0, 0.75)):
    writer = loggers.RunLogger(tmp_path, make_config(), start)
    for step in steps:
      writer.write(step, 'train', {'loss': factor * step})
      if step % 3 == 0:
        writer.write(step, 'val', {'accuracy': accuracy * step / 6})
    writer.close()

  folder = tmp_path / 'tensorboard'
  assert len(list(folder.iterdir())) == 2  # two files, though started within one second
  events = read_events(folder)
  raw_steps = [e.step for e in events if e.HasField('summary')]
  assert raw_steps.count(5) == 2  # the replayed step is in both files ...
  scalars, _ = tensorboard_view(events)  # ... and TensorBoard shows the resumed run's
  assert scalars['train/loss'] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0),
                                   (7, 70.0), (8, 80.0)]
  assert scalars['val/accuracy'] == [(3, 0.25), (6, 0.75)]
  assert [(m['step'], m['split']) for m in workdir_lib.read_metrics(tmp_path)] == [
      (1, 'train'), (2, 'train'), (3, 'train'), (3, 'val'), (4, 'train'), (5, 'train'),
      (6, 'train'), (6, 'val'), (7, 'train'), (8, 'train')]


def log_a_resumed_run(workdir, config):
  """Steps 1-6 with evals at 3 and 6 and a picture at 6, killed, resumed from step 4."""
  picture = np.full((8, 12, 3), 200, np.uint8)
  workdir.mkdir()
  for start, steps in ((0, range(1, 7)), (4, range(5, 9))):
    writer = (loggers.RunLogger(workdir, config, start) if config is not None
              else workdir_lib.MetricWriter(workdir, start))
    for step in steps:
      writer.write(step, 'train', {'loss': 1.0 / step, 'lr': 1e-4 * step, 'skipped_images': 0})
      if step % 3 == 0:
        writer.write(step, 'val', EVAL)
        if config is not None:
          writer.image(step, 'val/part_maps', picture)
    if config is None:
      writer.flush()
    else:
      writer.close()


def test_metrics_jsonl_is_unchanged_by_the_sinks(tmp_path, wandb_env):
  del wandb_env
  log_a_resumed_run(tmp_path / 'plain', None)
  log_a_resumed_run(tmp_path / 'sinks', make_config(wandb_project='ifam-test'))
  assert (tmp_path / 'sinks' / 'tensorboard').is_dir()
  assert (tmp_path / 'sinks' / loggers.WANDB_RUN_FILE).exists()
  plain = (tmp_path / 'plain' / 'metrics.jsonl').read_bytes()
  assert (tmp_path / 'sinks' / 'metrics.jsonl').read_bytes() == plain
  assert len(plain.splitlines()) == 8 + 2  # steps 1-8, evals at 3 and (replayed) 6


def test_tensorboard_off(tmp_path):
  writer = loggers.RunLogger(tmp_path, make_config(tensorboard=False), 0)
  writer.write(1, 'train', {'loss': 1.0})
  writer.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['metrics.jsonl']


def test_a_failing_sink_is_switched_off_not_the_run(tmp_path, monkeypatch, caplog):
  """W&B that cannot start (no login, say) and a disk that refuses the event file mid-run."""
  def refuse(*unused_args, **unused_kwargs):
    raise OSError('no space left on device')

  monkeypatch.setattr(loggers.import_wandb(), 'init', refuse)
  writer = loggers.RunLogger(tmp_path, make_config(wandb_project='p'), 0)
  writer.write(1, 'train', {'loss': 1.0})
  monkeypatch.setattr(loggers.TensorBoard, 'write', refuse)
  writer.write(2, 'train', {'loss': 0.5})
  writer.write(3, 'train', {'loss': 0.25})
  writer.image(3, 'val/part_maps', np.zeros((4, 4, 3), np.uint8))
  writer.close()
  assert caplog.text.count('logging failed') == 2  # once for W&B, once for TensorBoard
  assert [m['step'] for m in workdir_lib.read_metrics(tmp_path)] == [1, 2, 3]
  scalars, _ = tensorboard_view(read_events(tmp_path / 'tensorboard'))
  assert scalars == {'train/loss': [(1, 1.0)]}


# ----------------------------------------------------------------------------
# gs:// workdirs
# ----------------------------------------------------------------------------
def test_gs_workdir_without_google_cloud_storage_warns_and_goes_on(gcs, monkeypatch, caplog):
  monkeypatch.setattr(record_writer, 'GCS_ENABLED', False)
  writer = loggers.RunLogger('gs://bucket/run', make_config(), 0, flush_seconds=0)
  writer.write(1, 'train', {'loss': 1.0})
  writer.image(1, 'val/part_maps', np.zeros((4, 4, 3), np.uint8))
  writer.close()
  assert 'No TensorBoard event files' in caplog.text
  assert 'google-cloud-storage' in caplog.text
  assert json.loads(gcs.cat_file('bucket/run/metrics.jsonl')) == {
      'step': 1, 'split': 'train', 'loss': 1.0}
  assert not any('tensorboard' in name for name in gcs.store)


class FakeBlob:
  """google.cloud.storage's Blob as tensorboardX uses it: whole uploads, generation checked."""
  uploads = {}

  def __init__(self, name, bucket):
    self.key, self.generation = f'{bucket.name}/{name}', None

  def upload_from_string(self, data, if_generation_match=None):
    assert if_generation_match == self.generation
    FakeBlob.uploads[self.key] = data
    self.generation = (self.generation or 0) + 1


def test_gs_workdir_with_google_cloud_storage(gcs, monkeypatch, tmp_path):
  storage = types.SimpleNamespace(Client=lambda: None, Blob=FakeBlob,
                                  Bucket=lambda client, name: types.SimpleNamespace(name=name))
  monkeypatch.setattr(record_writer, 'storage', storage, raising=False)
  monkeypatch.setattr(record_writer, 'GCS_ENABLED', True)
  monkeypatch.setattr(FakeBlob, 'uploads', {})
  writer = loggers.RunLogger('gs://bucket/run', make_config(), 0, flush_seconds=3600)
  writer.write(1, 'train', {'loss': 0.5})
  writer.write(2, 'train', {'loss': 0.25})
  writer.close()
  [(key, data)] = FakeBlob.uploads.items()
  assert key.startswith('bucket/run/tensorboard/events.out.tfevents.')
  scalars, _ = tensorboard_view(events_of(data))
  assert scalars == {'train/loss': [(1, 0.5), (2, 0.25)]}
  assert list(tmp_path.iterdir()) == []  # nothing under a mangled local 'gs:/' path
  assert len(gcs.cat_file('bucket/run/metrics.jsonl').splitlines()) == 2


# ----------------------------------------------------------------------------
# Weights & Biases
# ----------------------------------------------------------------------------
def test_wandb_offline_run_and_its_resumption(tmp_path, wandb_env):
  config = make_config(wandb_project='ifam-test', wandb_mode='offline', wandb_tags=('tiny',))
  workdir = tmp_path / 'run'
  log_a_resumed_run(workdir, config)
  loggers.import_wandb().teardown()  # W&B's service writes on after `finish`; this waits for it

  run_id = json.loads((workdir / loggers.WANDB_RUN_FILE).read_text())['id']
  run_dirs = sorted(wandb_env.glob('offline-run-*'))
  assert [d.name.split('-')[3] for d in run_dirs] == [run_id, run_id]  # the resumed run's too
  first, history = wandb_run(run_dirs[0])
  assert (first.run_id, first.project, list(first.tags)) == (run_id, 'ifam-test', ['tiny'])
  logged = {u.key: json.loads(u.value_json) for u in first.config.update}
  assert logged['log']['wandb_project'] == 'ifam-test'
  assert logged['optim']['lr'] == config.optim.lr and logged['seed'] == config.seed
  assert sorted(history) == [1, 2, 3, 4, 5, 6]
  assert history[2] == {'train/loss': 0.5, 'train/lr': 2e-4, 'train/skipped_images': 0}
  picture = {k.removeprefix('val/part_maps/'): v for k, v in history[6].items()
             if k.startswith('val/part_maps/')}
  assert history[6] == {**{f'val/{k}': v for k, v in EVAL_SCALARS.items()},
                        'train/loss': 1 / 6, 'train/lr': 1e-4 * 6, 'train/skipped_images': 0,
                        **{f'val/part_maps/{k}': v for k, v in picture.items()}}
  assert (picture['_type'], picture['width'], picture['height']) == ('image-file', 12, 8)
  np.testing.assert_array_equal(
      np.asarray(Image.open(run_dirs[0] / 'files' / picture['path'])), np.full((8, 12, 3), 200))

  _, resumed = wandb_run(run_dirs[1])
  assert sorted(resumed) == [5, 6, 7, 8]
  assert resumed[7]['train/loss'] == 1 / 7 and resumed[6]['val/accuracy'] == 0.75


def test_wandb_settings_fail_before_any_work(monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # not installed
  with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
    loggers.check_config(make_config(wandb_project='p'))
  loggers.check_config(make_config())  # W&B not asked for: no import
  for key, value in (('wandb_mode', 'onlin'), ('part_map_images', -1), ('wandb_tags', ('a', 1))):
    with pytest.raises(ValueError, match=f'log.{key}'):
      loggers.check_config(make_config(**{key: value}))


# ----------------------------------------------------------------------------
# --mode eval
# ----------------------------------------------------------------------------
def test_eval_report_goes_to_tensorboard_at_its_step(tmp_path):
  report = {'which': 'step_8', 'step': 8, 'thresholds': {'path': 'x.json', 'rule': 'r'},
            'evals': {'val': EVAL, 'test': {'accuracy': 0.5}},
            'evals_without_thresholds': {'val': {'accuracy': 0.25}},
            'in9_accuracy': {'mixed_same': 0.75, 'mixed_rand': 0.5}, 'bg_gap': 0.25}
  loggers.write_eval_report(make_config(), tmp_path, 'step_8', report)
  scalars, _ = tensorboard_view(read_events(tmp_path / 'tensorboard'))
  assert scalars == {
      **{f'eval_step_8/val/{k}': [(8, v)] for k, v in EVAL_SCALARS.items()},
      'eval_step_8/test/accuracy': [(8, 0.5)],
      'eval_step_8/evals_without_thresholds/val/accuracy': [(8, 0.25)],
      'eval_step_8/in9_accuracy/mixed_same': [(8, 0.75)],
      'eval_step_8/in9_accuracy/mixed_rand': [(8, 0.5)], 'eval_step_8/bg_gap': [(8, 0.25)]}

  loggers.write_eval_report(make_config(tensorboard=False), tmp_path / 'off', 'final', report)
  assert not (tmp_path / 'off').exists()


# ----------------------------------------------------------------------------
# A training run
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_training_writes_tensorboard(tmp_path):
  """The tiny config for one epoch: every metrics.jsonl number in TensorBoard at its step, the
  part-map picture of the evaluated parameters (saved as params/final) at the eval, and then
  --mode eval's report at the parameters' step."""
  config = get_config('steps=8')
  train.train_and_evaluate(config, tmp_path)
  report = evaluate.run_eval(config, tmp_path, 'final')
  scalars, images = tensorboard_view(read_events(tmp_path / 'tensorboard'))
  assert report['step'] == 8
  for split in ('val', 'test'):
    assert scalars[f'eval_final/{split}/accuracy'] == [(8, f32(report['evals'][split]['accuracy']))]
  expected = {}
  for record in workdir_lib.read_metrics(tmp_path):
    for key, value in record.items():
      if key not in ('step', 'split') and isinstance(value, (int, float)):
        expected.setdefault(f'{record["split"]}/{key}', []).append((record['step'], f32(value)))
      if key == 'group_accuracy':
        for group, accuracy in value.items():
          expected.setdefault(f'{record["split"]}/{key}/{group}', []).append(
              (record['step'], f32(accuracy)))
  assert {'train/loss', 'val/accuracy', 'test/accuracy'} <= expected.keys()
  np.testing.assert_equal({k: v for k, v in scalars.items() if k in expected}, expected)

  [(step, image)] = images['val/part_maps']
  count = config.log.part_map_images
  # 8 rows (image | part assignment | stage-2 view) of 128 px tiles, each under a 14 px
  # caption, with 4 px gaps.
  assert (step, image.width, image.height) == (8, 4 + 3 * 132, 4 + count * (14 + 128 + 4))
  source = factory.make_eval_sources(config)['val']
  indices = visualize.examples_per_group(source, count)
  model = factory.load_model(config, tmp_path, 'final')
  reloaded = visualize.example_picture(source, indices, *visualize._predict(
      model, config, source, indices), scale=128 / config.model.image_size)
  np.testing.assert_array_equal(
      np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), np.asarray(reloaded))
