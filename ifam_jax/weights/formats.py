"""State-dict files: safetensors and torch zip (`torch.save`), read and written without torch.

  read_state_dict        a flat {name: array} from .safetensors, .pth, .pt or .bin
  read_torch_checkpoint  any torch zip of tensors and plain containers (e.g. a training snapshot)
  write_state_dict       a flat {name: array} to .safetensors or a torch zip, local or gs://

So exported weights load in PyTorch, and PyTorch weights load here on machines without torch.

safetensors is written by the `safetensors` library (from the arrays' own memory since 0.8;
every dtype here, bfloat16 included) and read by our own reader, which the library cannot
replace: before 0.8 it cannot give bfloat16 to numpy, it copies every tensor where ours maps the
file (a 400 MiB file: +800 MiB and 0.2 s against +7 MiB and 2 ms), and its errors do not name
the file and lump causes together ('invalid shape, data type, or offset for tensor').

The torch zip is ours both ways: a restricted unpickler that checks every tensor against its
storage before allocating it, and a writer that produces what `torch.save` does (tests compare
it with torch's bytes), with torch installed or not.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import pathlib
import pickle
import struct
import sys
import tempfile
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath

from ifam_jax.workdir import is_local

PathLike = str | os.PathLike
StateDict = Mapping[str, np.ndarray]
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')

# safetensors' dtype names, by numpy dtype; torch's storage classes hold the same dtypes.
SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}
TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': jnp.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}
_TORCH_ALIGNMENT = 64  # torch.save aligns each record's bytes (for torch.load(mmap=True))


def _check_exists(path: PathLike) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')


def _naturals(x: Any, length: int | None = None) -> bool:
  """Whether `x` is a list of non-negative ints (of `length`, if given)."""
  return (isinstance(x, list) and length in (None, len(x))
          and all(isinstance(i, int) and i >= 0 for i in x))


def _native(dtype: np.dtype) -> np.dtype:
  return dtype.newbyteorder('=')


def _little_endian_bytes(x: np.ndarray) -> memoryview:
  x = np.ascontiguousarray(x)
  return x.astype(x.dtype.newbyteorder('<'), copy=False).reshape(-1).view(np.uint8).data


# ----------------------------------------------------------------------------
# safetensors: an 8-byte header length, a JSON header, raw little-endian data
# ----------------------------------------------------------------------------
def _safetensors_tensor(key: str, info: Any,
                        data_size: int) -> tuple[np.dtype, list[int], list[int]]:
  """(dtype, shape, data_offsets) of a header entry, once they agree and lie in the data."""
  if not (isinstance(info, dict) and isinstance(info.get('dtype'), str)
          and _naturals(info.get('shape')) and _naturals(info.get('data_offsets'), 2)):
    raise ValueError(f'tensor {key!r} needs dtype, shape (non-negative ints) and data_offsets '
                     f'(two), got {json.dumps(info)[:200]}')
  shape, offsets = info['shape'], info['data_offsets']
  if info['dtype'] not in SAFETENSORS_DTYPES:
    raise ValueError(f'tensor {key!r} has unsupported dtype {info["dtype"]}')
  dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
  start, end = offsets
  if not start <= end <= data_size:
    raise ValueError(f'tensor {key!r}: data_offsets {offsets} outside the {data_size} data bytes')
  if end - start != math.prod(shape) * dtype.itemsize:
    raise ValueError(f'tensor {key!r}: data_offsets {offsets} hold {end - start} bytes; shape '
                     f'{shape} of {info["dtype"]} needs {math.prod(shape) * dtype.itemsize}')
  return dtype, shape, offsets


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor, memory-mapped, once the header describes only bytes that the file holds."""
  _check_exists(path)
  size = path.stat().st_size
  try:
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f'{size} bytes, shorter than the 8-byte header length')
      header_len = int.from_bytes(head, 'little')
      if header_len > size - 8:
        raise ValueError(f'header length {header_len} exceeds the {size - 8} bytes after it')
      raw = f.read(header_len)
    try:
      header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError
      raise ValueError(f'header is not JSON ({e})') from None
    if not isinstance(header, dict):
      raise ValueError(f'header is not a JSON object but {type(header).__name__}')
    header.pop('__metadata__', None)
    data_size = size - 8 - header_len
    tensors = {k: _safetensors_tensor(k, v, data_size) for k, v in header.items()}
  except ValueError as e:
    raise ValueError(f'{path} is not a valid safetensors file: {e}') from None
  data = np.memmap(path, np.uint8, mode='r', offset=8 + header_len)
  return {k: data[start:end].view(dtype).reshape(shape)
          for k, (dtype, shape, (start, end)) in tensors.items()}


def _write_safetensors(path: pathlib.Path, state_dict: StateDict) -> None:
  # The library (>= 0.8) writes from each array's memory, so it must be C-contiguous (strided
  # views would write the wrong bytes); ascontiguousarray would turn a scalar into shape [1].
  safetensors.numpy.save_file({k: np.asarray(v, order='C') for k, v in state_dict.items()}, path)


# ----------------------------------------------------------------------------
# Torch zip, read: a restricted unpickler
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A storage record of the zip, by name; read only for a tensor that fits it."""

  record: str
  dtype: np.dtype
  nbytes: int  # the record's size once unpacked, as the zip directory declares it


@dataclasses.dataclass(eq=False)
class _Tensor:
  """torch._utils._rebuild_tensor_v2's arguments: a (possibly strided) view of a storage.

  The unpickler builds these instead of arrays, so that each tensor is checked against its
  storage, with its key in the message, before anything of its size is allocated.
  """

  storage: Any
  offset: Any
  size: Any
  stride: Any


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *unused: Any) -> _Tensor:
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data: Any, *unused: Any) -> Any:
  return data


_TORCH_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip, allowing only tensors and plain containers.

  Any other global (which is how a pickle runs code) is refused, so this is safer than
  `torch.load` and needs no torch. `load` returns tensors as numpy arrays: each is bounds-checked
  against its storage, which is read (once) only then, so no tensor allocates more than the bytes
  the file holds.
  """

  def __init__(self, path: PathLike, archive: zipfile.ZipFile, prefix: str):
    super().__init__(archive.open(prefix + 'data.pkl'))
    self._path = path
    self._file_size = os.path.getsize(path)
    self._archive = archive
    self._prefix = prefix
    self._storages: dict[str, np.ndarray] = {}
    # (unpickled object, materialised one) by id; holding the former keeps its id unique.
    self._done: dict[int, tuple[Any, Any]] = {}
    order = 'little'  # older torch wrote no byteorder record
    if prefix + 'byteorder' in archive.namelist():
      order = archive.read(prefix + 'byteorder').decode().strip()
    self._swap = order != sys.byteorder

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch' and name in TORCH_STORAGES:
      return _StorageType(np.dtype(TORCH_STORAGES[name]))
    if (module, name) not in _TORCH_GLOBALS:
      raise pickle.UnpicklingError(
          f'refusing to unpickle global {module}.{name}: only tensors, torch storages and '
          'OrderedDict are allowed in a checkpoint')
    return _TORCH_GLOBALS[(module, name)]

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    record = f'{self._prefix}data/{pid[2]}'
    try:
      nbytes = self._archive.getinfo(record).file_size
    except KeyError:
      raise ValueError(f'{self._path}: storage record {record} is missing') from None
    return _Storage(record, pid[1].dtype, nbytes)

  def load(self) -> Any:
    return self._materialise(super().load(), ())

  def _materialise(self, obj: Any, keys: tuple[Any, ...]) -> Any:
    """`obj` with its tensors as arrays; dicts and lists in place, so shared references stay."""
    if id(obj) in self._done:
      return self._done[id(obj)][1]
    if isinstance(obj, _Tensor):
      self._done[id(obj)] = obj, self._array(obj, keys)
    elif isinstance(obj, dict):  # OrderedDict too
      self._done[id(obj)] = obj, obj
      for key, value in obj.items():
        obj[key] = self._materialise(value, keys + (key,))
    elif isinstance(obj, list):
      self._done[id(obj)] = obj, obj
      obj[:] = [self._materialise(v, keys + (i,)) for i, v in enumerate(obj)]
    elif isinstance(obj, tuple):
      self._done[id(obj)] = obj, tuple(self._materialise(v, keys + (i,))
                                       for i, v in enumerate(obj))
    else:
      return obj
    return self._done[id(obj)][1]

  def _array(self, t: _Tensor, keys: tuple[Any, ...]) -> np.ndarray:
    name = f'tensor {"/".join(map(str, keys))!r}' if keys else 'the top-level tensor'
    storage = t.storage
    if not isinstance(storage, _Storage):
      raise ValueError(f'{self._path}: {name} has no torch storage')
    if storage.nbytes > self._file_size:
      raise ValueError(f'{self._path}: {name}: its storage record {storage.record} unpacks to '
                       f'{storage.nbytes} bytes, more than the whole file ({self._file_size})')
    count = storage.nbytes // storage.dtype.itemsize
    view = (t.offset, t.size, t.stride)
    if not (isinstance(t.size, (tuple, list)) and isinstance(t.stride, (tuple, list))
            and len(t.size) == len(t.stride) and _naturals([t.offset, *t.size, *t.stride])):
      raise ValueError(f'{self._path}: {name} has an invalid (offset, size, stride) {view}')
    numel = math.prod(t.size)
    if numel > count:
      raise ValueError(f'{self._path}: {name} has {numel} elements, more than its storage holds '
                       f'({count})')
    if numel and t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) >= count:
      raise ValueError(f'{self._path}: {name} (offset, size, stride) {view} does not fit its '
                       f'storage of {count} elements')
    if storage.record not in self._storages:
      data = np.frombuffer(self._archive.read(storage.record), storage.dtype, count)
      self._storages[storage.record] = data.byteswap() if self._swap else data
    item = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        self._storages[storage.record][t.offset:], shape=tuple(t.size),
        strides=tuple(s * item for s in t.stride)).copy()


def read_torch_checkpoint(path: PathLike) -> Any:
  """Loads a `torch.save` file (zip format, torch >= 1.6) with tensors as numpy arrays."""
  _check_exists(path)
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a torch zip checkpoint (the legacy pre-1.6 torch.save '
                     'format is not supported; re-save it with a recent torch)')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path}: expected one <archive>/data.pkl, found {pickles}')
    return _TorchUnpickler(path, archive, pickles[0][:-len('data.pkl')]).load()


# ----------------------------------------------------------------------------
# Torch zip, written: what torch.save writes, without torch
# ----------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_pickle_names() -> Iterator[tuple[Callable[..., Any], dict[np.dtype, type]]]:
  """(`torch._utils._rebuild_tensor_v2`, {dtype: `torch.<Name>Storage`}) for pickling tensors.

  torch's own where torch is installed. Otherwise stand-ins, in modules that sit in `sys.modules`
  as 'torch' and 'torch._utils' only while the pickle is written: pickle writes a global as
  (module, name) after checking that importing the module yields the very same object.
  """
  if importlib.util.find_spec('torch') is not None:
    import torch  # pylint: disable=import-outside-toplevel  (optional dependency)
    yield torch._utils._rebuild_tensor_v2, {np.dtype(dtype): getattr(torch, name)
                                            for name, dtype in TORCH_STORAGES.items()}
    return
  torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  def rebuild(*unused: Any) -> None:
    raise NotImplementedError('a stand-in for pickling; torch.load calls the real one')

  rebuild.__module__ = utils.__name__
  rebuild.__name__ = rebuild.__qualname__ = '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = rebuild
  torch._utils = utils
  storages = {np.dtype(dtype): type(name, (), {'__module__': 'torch'})
              for name, dtype in TORCH_STORAGES.items()}
  for storage in storages.values():
    setattr(torch, storage.__name__, storage)
  sys.modules.update({'torch': torch, 'torch._utils': utils})
  try:
    yield rebuild, storages
  finally:
    del sys.modules['torch'], sys.modules['torch._utils']


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  index: int


class _TorchPickler(pickle.Pickler):
  """Pickles numpy arrays as `torch.save` pickles tensors.

  A tensor is `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`; its
  storage is the persistent id ('storage', <dtype>Storage, key, 'cpu', numel), whose bytes go to
  the record data/<key>. Protocol 2, as torch writes.
  """

  def __init__(self, file: io.BytesIO, rebuild: Callable[..., Any],
               storage_types: dict[np.dtype, type]):
    super().__init__(file, protocol=2)
    self._rebuild = rebuild
    self._storage_types = storage_types
    self.storages: list[np.ndarray] = []

  def reducer_override(self, obj: Any) -> Any:
    if not isinstance(obj, np.ndarray):
      return NotImplemented
    self.storages.append(obj)
    shape = obj.shape
    stride = tuple(math.prod(max(n, 1) for n in shape[i + 1:]) for i in range(len(shape)))
    return self._rebuild, (_StorageRef(len(self.storages) - 1), 0, shape, stride, False,
                           collections.OrderedDict())

  def persistent_id(self, obj: Any) -> Any:
    if not isinstance(obj, _StorageRef):
      return None
    x = self.storages[obj.index]
    return ('storage', self._storage_types[_native(x.dtype)], str(obj.index), 'cpu', x.size)


def _write_torch_zip(path: pathlib.Path, state_dict: StateDict) -> None:
  """The zip `torch.save` writes: archive/{data.pkl, byteorder, data/<key>..., version}.

  Records are stored uncompressed with each one's bytes aligned to 64 like torch's own writer
  (padding in an 'FB' extra field), for records under 2 GiB (zipfile adds a zip64 field to
  larger ones).
  """
  buffer = io.BytesIO()
  with _torch_pickle_names() as (rebuild, storage_types):
    pickler = _TorchPickler(buffer, rebuild, storage_types)
    pickler.dump(collections.OrderedDict(state_dict))
  records = [('data.pkl', buffer.getvalue()), ('byteorder', b'little'),
             *((f'data/{i}', _little_endian_bytes(x)) for i, x in enumerate(pickler.storages)),
             ('version', b'3\n')]
  with open(path, 'wb') as f, zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as archive:
    for name, data in records:
      info = zipfile.ZipInfo('archive/' + name)
      start = f.tell() + 30 + len(info.filename.encode()) + 4  # local header, name, extra header
      pad = -start % _TORCH_ALIGNMENT
      info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
      archive.writestr(info, data)


# ----------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------
def _unknown_suffix(path: PathLike) -> ValueError:
  return ValueError(f'unknown checkpoint type {epath.Path(path).suffix!r} ({path}); expected '
                    '.safetensors, .pth, .pt or .bin')


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """A flat {name: array} state dict from .safetensors, or .pth/.pt/.bin (torch zip) files."""
  path = pathlib.Path(path)
  if path.suffix == '.safetensors':
    return _read_safetensors(path)
  if path.suffix in TORCH_SUFFIXES:
    obj = read_torch_checkpoint(path)
    if not (isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values())):
      keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
      raise ValueError(f'{path} does not hold a flat state dict of tensors (top level: {keys}); '
                       'use read_torch_checkpoint and pick the state dict out')
    return dict(obj)
  raise _unknown_suffix(path)


def write_state_dict(path: PathLike, state_dict: StateDict) -> None:
  """Writes a flat {name: array} state dict as .safetensors or a torch zip (.pth/.pt/.bin).

  A gs:// path is written locally, then copied: both writers need a local file. The torch zip
  is the same with torch installed or not. `read_state_dict` reads either back exactly.
  """
  path = epath.Path(path)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  supported = {np.dtype(v) for v in TORCH_STORAGES.values()}  # == the safetensors dtypes
  unsupported = {k: str(v.dtype) for k, v in state_dict.items()
                 if _native(v.dtype) not in supported}
  if unsupported:
    raise ValueError(f'cannot write tensors of these dtypes: {unsupported}')
  if path.suffix not in ('.safetensors', *TORCH_SUFFIXES):
    raise _unknown_suffix(path)
  if not is_local(path):
    with tempfile.TemporaryDirectory() as tmp:
      local = epath.Path(tmp) / path.name
      write_state_dict(local, state_dict)
      local.copy(path, overwrite=True)
    return
  if path.suffix == '.safetensors':
    _write_safetensors(pathlib.Path(path), state_dict)
  else:
    _write_torch_zip(pathlib.Path(path), state_dict)
