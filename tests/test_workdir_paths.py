"""gs:// workdirs: paths keep their scheme, and the workdir's files work on an object store.

The object store is an in-memory fake of gcsfs: bucket-relative names, no directories, and an
append that overwrites the object (gcsfs warns and does so). epath's fsspec backend, the one it
uses for gs:// without TensorFlow, is pointed at it, so epath's own gs:// code runs.
"""

import io
import json
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
from etils import epath
from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from ifam_jax import visualize, weights
from ifam_jax import workdir as workdir_lib
from ifam_jax.evaluators import thresholds as thresholds_lib

WORKDIR = 'gs://bucket/run'


class FakeGcs(MemoryFileSystem):
  """gcsfs's semantics that matter to a workdir, in memory."""

  protocol = ('gs', 'gcs')
  root_marker = ''
  cachable = False

  def __init__(self):
    super().__init__()
    self.store, self.pseudo_dirs = {}, ['']  # this instance's, not the class-wide ones

  @classmethod
  def _strip_protocol(cls, path):
    return str(path).removeprefix('gs://').strip('/')

  def makedirs(self, path, exist_ok=False):
    del path, exist_ok  # prefixes of objects are the only directories

  def mkdir(self, path, create_parents=True, **kwargs):
    del path, create_parents, kwargs

  def _open(self, path, mode='rb', **kwargs):
    if 'a' in mode:
      warnings.warn("Append mode 'a' is not supported in GCS. Using overwrite mode instead.")
      mode = mode.replace('a', 'w')
    return super()._open(path, mode, **kwargs)


def use_fake_gcs(setattr_fn=setattr) -> FakeGcs:
  """Routes every gs:// path of epath's fsspec backend (its backend without TF) to a fake."""
  fake = FakeGcs()
  real_fs = backend._FileSystemSpecBackend.fs
  setattr_fn(gpath, '_is_tf_installed', lambda: False)
  setattr_fn(backend._FileSystemSpecBackend, 'fs', lambda self, path: (
      fake if os.fspath(path).startswith('gs://') else real_fs(self, path)))
  return fake


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """The fake bucket behind every gs:// path; the test runs in tmp_path, where a mangled
  'gs:/...' path would land."""
  fake = use_fake_gcs(monkeypatch.setattr)
  monkeypatch.chdir(tmp_path)
  return fake


def metric_steps(gcs):
  return [(m['step'], m['split']) for m in map(
      json.loads, gcs.cat_file('bucket/run/metrics.jsonl').decode().splitlines())]


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------
def test_gs_paths_keep_their_scheme(monkeypatch, tmp_path):
  workdir = epath.Path(WORKDIR)
  assert str(workdir / 'params' / 'final') == 'gs://bucket/run/params/final'
  assert not workdir_lib.is_local(workdir) and workdir_lib.is_local(tmp_path)
  assert str(workdir_lib.absolute(workdir / 'checkpoints')) == 'gs://bucket/run/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert (workdir_lib.absolute(epath.Path('run') / 'checkpoints')
          == tmp_path / 'run' / 'checkpoints')


def main_on_fake_bucket() -> None:
  """`ifam_jax.main` with --workdir on the fake bucket (run in its own process: main's flags
  would clash with ifam_jax.bench's in the test process)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ifam_jax import main  # pylint: disable=g-import-not-at-top
  fake = use_fake_gcs()
  flags.FLAGS(['main', '--config=configs/demo.py', f'--workdir={WORKDIR}', '--mode=eval'])
  try:
    main.main(['main'])
  except FileNotFoundError as e:
    assert 'no saved parameters at gs://bucket/run/params/final' in str(e), e
  else:
    raise AssertionError('evaluating an empty workdir must fail')
  assert not fake.find('bucket'), 'a failed check must write nothing'
  # With the parameters' record in place the mode writes its config, then reads the params.
  fake.pipe_file('bucket/run/params/final.json', json.dumps({'step': 1, 'num_classes': 2}).encode())
  try:
    main.main(['main'])
  except FileNotFoundError:
    pass
  else:
    raise AssertionError('params/final.json without its parameters must fail')
  assert json.loads(fake.cat_file('bucket/run/config_eval.json'))['seed'] == 0
  assert not os.path.exists('gs:')


@pytest.mark.slow
def test_main_writes_to_a_gs_workdir(tmp_path):
  repo = pathlib.Path(__file__).resolve().parents[1]
  (tmp_path / 'configs').symlink_to(repo / 'configs')
  subprocess.run([sys.executable, '-c', 'import test_workdir_paths as t; t.main_on_fake_bucket()'],
                 cwd=tmp_path, check=True, timeout=300,
                 env=dict(os.environ, JAX_PLATFORMS='cpu',
                          PYTHONPATH=os.pathsep.join([str(repo / 'tests'), str(repo)])))
  assert not (tmp_path / 'gs:').exists()


# ----------------------------------------------------------------------------
# Files of a workdir in a bucket
# ----------------------------------------------------------------------------
def test_metric_writer_rewrites_the_object(gcs):
  writer = workdir_lib.MetricWriter(WORKDIR, 0, flush_seconds=0)
  for step in (1, 2, 3):
    writer.write(step, 'train', {'loss': 1 / step})
  assert metric_steps(gcs) == [(1, 'train'), (2, 'train'), (3, 'train')]

  # Resumed from step 2: step 3 is dropped; new lines wait for flush() (or flush_seconds).
  writer = workdir_lib.MetricWriter(WORKDIR, 2, flush_seconds=3600)
  assert metric_steps(gcs) == [(1, 'train'), (2, 'train')]
  writer.write(3, 'train', {'loss': 0.3})
  writer.write(3, 'val', {'accuracy': 0.5})
  assert metric_steps(gcs) == [(1, 'train'), (2, 'train')]
  writer.flush()
  assert metric_steps(gcs) == [(1, 'train'), (2, 'train'), (3, 'train'), (3, 'val')]

  # A line cut short is tolerated on resume, as in a local file.
  logged = gcs.cat_file('bucket/run/metrics.jsonl')
  gcs.pipe_file('bucket/run/metrics.jsonl', logged + b'{"step": 4, "split": "tr')
  workdir_lib.MetricWriter(WORKDIR, 3)
  assert gcs.cat_file('bucket/run/metrics.jsonl') == logged
  assert gcs.find('bucket') == ['bucket/run/metrics.jsonl']  # no temporary objects


def test_params_info_and_train_checkpoints(gcs):
  info = {'step': 7, 'num_classes': 2}
  workdir_lib.replace_text(epath.Path(WORKDIR) / 'params' / 'final.json', json.dumps(info))
  assert workdir_lib.read_params_info(WORKDIR, 'final') == info
  assert workdir_lib.read_params_info(WORKDIR, 'best') is None
  assert gcs.find('bucket') == ['bucket/run/params/final.json']

  for step in (4, 8):
    gcs.pipe_file(f'bucket/run/checkpoints/{step}/state/_METADATA', b'{}')
  assert (str(workdir_lib.train_checkpoint(WORKDIR, 'step_8'))
          == 'gs://bucket/run/checkpoints/8/state')
  with pytest.raises(FileNotFoundError, match=r'step 5 in gs://bucket/run/checkpoints; '
                     r'available steps: \[4, 8\]'):
    workdir_lib.train_checkpoint(WORKDIR, 'step_5')


def test_thresholds_pictures_and_exports(gcs, tmp_path):
  gcs.pipe_file('bucket/run/q99.json', json.dumps({'rule': 'distance',
                                                   'thresholds': [0.5, 2]}).encode())
  assert thresholds_lib.load_thresholds(f'{WORKDIR}/q99.json', 2) == ((0.5, 2.0), 'distance')

  tile = np.zeros((8, 8, 3), np.uint8)
  path = visualize.save_grid([[tile, tile]], f'{WORKDIR}/pictures/g.png')
  assert str(path) == 'gs://bucket/run/pictures/g.png'
  picture = Image.open(io.BytesIO(gcs.cat_file('bucket/run/pictures/g.png')))
  assert picture.format == 'PNG' and picture.size == (2 * (16 + 4) + 4, 16 + 4 + 4)

  state_dict = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.ones(3, np.int64)}
  for name in ('model.safetensors', 'reference_state_dict.pth'):
    weights.write_state_dict(epath.Path(WORKDIR) / 'export' / name, state_dict)
    (tmp_path / name).write_bytes(gcs.cat_file(f'bucket/run/export/{name}'))
    read = weights.read_state_dict(tmp_path / name)
    assert read.keys() == state_dict.keys()
    for key, value in state_dict.items():
      np.testing.assert_array_equal(read[key], value)
