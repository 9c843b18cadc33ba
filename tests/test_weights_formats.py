"""State-dict files: the torch zip and safetensors readers (validation before allocation) and
writers (what torch.save writes; every dtype, bfloat16 included).

torch_reader_cases.pth and dtype_cases.safetensors come from tests/fixtures/make_timm_fixture.py
(torch wrote the former).
"""

import contextlib
import json
import pathlib
import pickle
import re
import struct
import tracemalloc
import zipfile
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ifam_jax import weights

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def assert_bit_exact(actual: dict, expected: dict) -> None:
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=str(key), strict=True)


# ----------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------
def test_torch_reader_dtypes_views_and_parameters():
  sd = weights.read_state_dict(FIXTURES / 'torch_reader_cases.pth')
  assert sd['bf16'].dtype == jnp.bfloat16 and sd['f16'].dtype == np.float16
  np.testing.assert_array_equal(sd['bf16'].astype(np.float32), sd['bf16_f32'])
  np.testing.assert_array_equal(sd['f16'].astype(np.float32), sd['f16_f32'])
  np.testing.assert_array_equal(sd['view'], sd['view_f32'])  # strided view of a shared storage
  np.testing.assert_array_equal(sd['param'], sd['f32'])
  np.testing.assert_array_equal(sd['int64'], np.arange(5))


def test_safetensors_reader_dtypes():
  sd = weights.read_state_dict(FIXTURES / 'dtype_cases.safetensors')
  np.testing.assert_array_equal(sd['bf16'].astype(np.float32), sd['bf16_f32'])
  np.testing.assert_array_equal(sd['f16'].astype(np.float32), sd['f16_f32'])
  np.testing.assert_array_equal(sd['int64'], np.arange(5))


def _torch_zip(path: pathlib.Path, data_pkl: bytes) -> pathlib.Path:
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', data_pkl)
    z.writestr('archive/version', '3\n')
  return path


def test_torch_reader_refuses_other_globals(tmp_path):
  marker = tmp_path / 'pwned'
  command = f'touch {marker}'.encode()
  # PROTO 2, GLOBAL os.system, BINUNICODE command, TUPLE1, REDUCE, STOP: os.system(command).
  payload = (b'\x80\x02cos\nsystem\nX' + len(command).to_bytes(4, 'little') + command
             + b'\x85R.')
  path = _torch_zip(tmp_path / 'evil.pth', payload)
  with pytest.raises(pickle.UnpicklingError, match=r'os\.system'):
    weights.read_state_dict(path)
  assert not marker.exists()


def _tensor_pickle(offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                   keys: tuple[str, ...] = ()) -> bytes:
  """data.pkl of a torch.save(tensor) written by hand: _rebuild_tensor_v2(FloatStorage '0', ...),
  nested in one dict per key ({keys[0]: {keys[1]: tensor}})."""
  def text(t):
    return pickle.BINUNICODE + len(t).to_bytes(4, 'little') + t.encode()

  def int_(x):
    return pickle.BININT + x.to_bytes(4, 'little')

  def ints(xs):
    return pickle.MARK + b''.join(map(int_, xs)) + pickle.TUPLE

  storage = (pickle.MARK + text('storage') + pickle.GLOBAL + b'torch\nFloatStorage\n' + text('0')
             + text('cpu') + int_(4) + pickle.TUPLE + pickle.BINPERSID)
  hooks = pickle.GLOBAL + b'collections\nOrderedDict\n' + pickle.EMPTY_TUPLE + pickle.REDUCE
  tensor = (pickle.GLOBAL + b'torch._utils\n_rebuild_tensor_v2\n' + pickle.MARK + storage
            + int_(offset) + ints(size) + ints(stride) + pickle.NEWFALSE + hooks + pickle.TUPLE
            + pickle.REDUCE)
  return (pickle.PROTO + b'\x02' + b''.join(pickle.EMPTY_DICT + text(k) for k in keys) + tensor
          + pickle.SETITEM * len(keys) + pickle.STOP)


def write_tensor_pth(path: pathlib.Path, offset: int, size: tuple[int, ...],
                     stride: tuple[int, ...], keys: tuple[str, ...] = (),
                     storage: bytes = np.arange(4, dtype='<f4').tobytes(),
                     compression: int = zipfile.ZIP_STORED) -> pathlib.Path:
  """A torch zip of one float32 tensor (see `_tensor_pickle`) over the storage bytes `storage`."""
  path = _torch_zip(path, _tensor_pickle(offset, size, stride, keys))
  with zipfile.ZipFile(path, 'a') as z:
    z.writestr('archive/data/0', storage, compress_type=compression)
  return path


def test_torch_reader_bounds_checks_views(tmp_path):
  def read(name, *args):
    return weights.read_torch_checkpoint(write_tensor_pth(tmp_path / name, *args))

  np.testing.assert_array_equal(read('ok.pth', 1, (3,), (1,)), [1, 2, 3])
  np.testing.assert_array_equal(read('t.pth', 0, (2, 2), (1, 2)), [[0, 2], [1, 3]])
  with pytest.raises(ValueError, match='past_end.pth: the top-level tensor .* does not fit its '
                     'storage of 4 elements'):
    read('past_end.pth', 1, (2, 2), (2, 1))


@contextlib.contextmanager
def allocates_at_most(limit: int) -> Iterator[None]:
  """Fails if the block's peak of traced allocations (numpy's included) exceeds `limit` bytes."""
  tracemalloc.start()
  try:
    yield
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak <= limit, f'allocated {peak} bytes'


def test_torch_reader_refuses_tensors_larger_than_their_storage(tmp_path):
  """Stride 0 passes a bounds check of the last element but asks for size elements (16 MiB here,
  37 GiB for (100000, 100000)); the check must name the key and come before any allocation."""
  path = write_tensor_pth(tmp_path / 'expanded.pth', 0, (2048, 2048), (0, 0), keys=('big',))
  message = (r"expanded.pth: tensor 'big' has 4194304 elements, more than its storage holds "
             r'\(4\)')
  with allocates_at_most(2**20), pytest.raises(ValueError, match=message):
    weights.read_state_dict(path)
  nested = write_tensor_pth(tmp_path / 'nested.pth', 0, (2048, 2048), (0, 0),
                            keys=('model_state', 'blocks.0.w'))
  with allocates_at_most(2**20), pytest.raises(ValueError, match="'model_state/blocks.0.w'"):
    weights.read_torch_checkpoint(nested)


def test_torch_reader_refuses_storage_records_larger_than_the_file(tmp_path):
  """A deflated record of 16 MiB of zeros takes 16 KiB; torch writes records uncompressed."""
  path = write_tensor_pth(tmp_path / 'bomb.pth', 0, (4,), (1,), keys=('w',),
                          storage=bytes(2**24), compression=zipfile.ZIP_DEFLATED)
  message = (r"bomb.pth: tensor 'w': its storage record archive/data/0 unpacks to 16777216 "
             r'bytes, more than the whole file')
  with allocates_at_most(2**20), pytest.raises(ValueError, match=message):
    weights.read_state_dict(path)


def test_missing_checkpoint_files_are_named(tmp_path):
  for name in ('absent.pth', 'absent.safetensors'):
    with pytest.raises(FileNotFoundError, match=re.escape(f'{tmp_path / name} does not exist')):
      weights.read_state_dict(tmp_path / name)
  with pytest.raises(FileNotFoundError, match='absent.pth does not exist'):
    weights.read_torch_checkpoint(tmp_path / 'absent.pth')


NOT_A_TENSOR = r"tensor 'w' needs dtype, shape \(non-negative ints\) and data_offsets \(two\)"


def _safetensors_bytes(header: object, data: bytes = b'') -> bytes:
  raw = json.dumps(header).encode()
  return len(raw).to_bytes(8, 'little') + raw + data


@pytest.mark.parametrize('content, why', [
    (np.random.default_rng(0).bytes(1000), 'header length .* exceeds the 992 bytes after it'),
    (b'\x01\x02', '2 bytes, shorter than the 8-byte header length'),
    (b'\x05' + bytes(7) + b'{"a":', 'header is not JSON'),
    (b'\x02' + bytes(7) + b'\xff\xfe', 'header is not JSON'),
    (_safetensors_bytes([1, 2]), 'header is not a JSON object'),
    (_safetensors_bytes({'w': [1]}), NOT_A_TENSOR),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [-1], 'data_offsets': [0, 4]}}, bytes(4)),
     NOT_A_TENSOR),
    (_safetensors_bytes({'w': {'dtype': 'C64', 'shape': [1], 'data_offsets': [0, 8]}}, bytes(8)),
     "tensor 'w' has unsupported dtype C64"),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}, bytes(8)),
     r"tensor 'w': data_offsets \[4, 12\] outside the 8 data bytes"),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [6, 2]}}, bytes(8)),
     r"tensor 'w': data_offsets \[6, 2\] outside the 8 data bytes"),
    (_safetensors_bytes({'w': {'dtype': 'F32', 'shape': [100000, 100000],
                               'data_offsets': [0, 8]}}, bytes(8)),
     r"tensor 'w': data_offsets \[0, 8\] hold 8 bytes; shape \[100000, 100000\] of F32 needs "
     '40000000000'),
], ids=['random', 'short', 'bad_json', 'not_utf8', 'not_object', 'not_tensor', 'negative_shape',
        'dtype', 'past_end', 'reversed', 'shape_mismatch'])
def test_safetensors_reader_refuses_invalid_files(tmp_path, content, why):
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f'{re.escape(str(path))} is not a valid safetensors file: '
                     f'{why}'):
    weights.read_state_dict(path)


def test_safetensors_reader_refuses_truncated_files(tmp_path):
  path = tmp_path / 'cut.safetensors'
  weights.write_state_dict(path, {'a': np.zeros(4, np.float32), 'b': np.ones(4, np.float32)})
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match=r"cut.safetensors is not a valid safetensors file: tensor "
                     r"'b': data_offsets \[16, 32\] outside the 22 data bytes"):
    weights.read_state_dict(path)


def test_torch_reader_rejects_nested_checkpoints(tmp_path):
  path = _torch_zip(tmp_path / 'train.pth', pickle.dumps({'model': {}, 'epoch': 3}, protocol=2))
  assert weights.read_torch_checkpoint(path) == {'model': {}, 'epoch': 3}
  with pytest.raises(ValueError, match='flat state dict'):
    weights.read_state_dict(path)
  with pytest.raises(ValueError, match='unknown checkpoint type'):
    weights.read_state_dict(tmp_path / 'weights.npz')


# ----------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------
def _records(path: pathlib.Path) -> dict[str, int]:
  """{record name: offset of its bytes in the file}."""
  raw = path.read_bytes()
  offsets = {}
  with zipfile.ZipFile(path) as archive:
    for info in archive.infolist():
      start = info.header_offset
      name_len, extra_len = struct.unpack('<HH', raw[start + 26:start + 30])
      offsets[info.filename] = start + 30 + name_len + extra_len
  return offsets


def _torch_cases() -> dict[str, np.ndarray]:
  """The first four tensors of torch_reader_cases.pth: each owns a contiguous storage."""
  cases = weights.read_torch_checkpoint(FIXTURES / 'torch_reader_cases.pth')
  return {k: cases[k] for k in ('bf16', 'bf16_f32', 'f16', 'f16_f32')}


def test_torch_zip_is_what_torch_save_writes(tmp_path):
  """Our data.pkl is byte for byte torch's (torch 2.x wrote the fixture), storages included."""
  path = tmp_path / 'ours.pth'
  weights.write_state_dict(path, _torch_cases())
  with zipfile.ZipFile(FIXTURES / 'torch_reader_cases.pth') as theirs, \
       zipfile.ZipFile(path) as ours:
    torch_pkl = theirs.read('torch_reader_cases/data.pkl')
    fifth = torch_pkl.index(b'X\x05\x00\x00\x00param')  # BINUNICODE 'param': the 5th key
    assert ours.read('archive/data.pkl') == torch_pkl[:fifth] + b'u.'  # SETITEMS, STOP
    for i in range(4):
      assert ours.read(f'archive/data/{i}') == theirs.read(f'torch_reader_cases/data/{i}')
    assert ours.namelist() == ['archive/data.pkl', 'archive/byteorder',
                               *(f'archive/data/{i}' for i in range(4)), 'archive/version']
    assert ours.read('archive/version') == b'3\n'
    assert ours.read('archive/byteorder') == b'little'
  assert all(offset % 64 == 0 for offset in _records(path).values())


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
  cases = weights.read_state_dict(FIXTURES / 'dtype_cases.safetensors')  # bf16 included
  cases['bool'] = np.array([True, False])
  cases['scalar'] = np.array(2.5)
  path = tmp_path / 'cases.safetensors'
  weights.write_state_dict(path, cases)
  assert_bit_exact(weights.read_state_dict(path), cases)
  numpy_cases = {k: v for k, v in cases.items() if k != 'bf16'}
  weights.write_state_dict(path, numpy_cases)  # the safetensors library reads it too
  assert_bit_exact(safetensors.numpy.load_file(path), numpy_cases)
  with pytest.raises(ValueError, match='complex64'):
    weights.write_state_dict(path, {'c': np.zeros(2, np.complex64)})


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_writers_take_views_and_big_endian_arrays(tmp_path, suffix):
  """Transposed, strided and big-endian arrays are written as their values, not their buffers."""
  base = np.arange(12, dtype=np.float32).reshape(3, 4)
  cases = {'transposed': base.T, 'strided': base[:, ::2], 'big_endian': base.astype('>f4'),
           'scalar': np.array(2.5)}
  path = tmp_path / f'views{suffix}'
  weights.write_state_dict(path, cases)
  read = weights.read_state_dict(path)
  assert read.keys() == cases.keys()
  for key, value in cases.items():
    np.testing.assert_array_equal(read[key], value, err_msg=key, strict=False)
    assert read[key].shape == value.shape, key
