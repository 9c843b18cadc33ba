"""Checkpoints: torch-free state-dict readers and writers, and pretrained DINOv2 import.

State dicts are read from and written to safetensors and torch zip (`torch.save`) files
without torch (`read_state_dict`, `write_state_dict`), so exported weights load in PyTorch and
PyTorch weights load here on machines that have no torch.

DINOv2 import reads a local file, without torch, in any of the formats the weights ship in:

  timm             `vit_*_patch14_reg4_dinov2.lvd142m` / `vit_*_patch14_dinov2.lvd142m` safetensors
                   (the weights iFAM starts from)
  official hub     `dinov2_vit*14{_reg4,}_pretrain.pth`: a torch zip, read by a restricted unpickler
  HF transformers  `Dinov2WithRegistersModel` / `Dinov2Model` safetensors or pytorch_model.bin, with
                   transformers-4 names (as on the hub) or transformers-5 names (q_proj, ...)

and normalises it to the tree of `models.vit.VisionTransformer`, which is timm's folded layout:
`cls_token` already carries the class position embedding and `pos_embed` covers the patches only.
Sizes S, B, L and g (SwiGLU) follow the same rules. The architecture is inferred from the tensors
and must equal the module's config (the head count cannot be inferred: it is not in the weights).
Unknown, missing or wrong-shaped tensors raise a ValueError that names them, before anything is
assigned.

Position embeddings are resampled once, at load, to the configured grid with antialiased bicubic
(`models.vit.resample_pos_embed`): exactly what timm does at load time, and what the official and
HF code do at run time for the register models. For the non-register models the official code
uses non-antialiased bicubic with a +0.1 offset, and HF non-antialiased bicubic without it;
`jax.image` has neither kernel, so those features differ slightly and a warning is logged.
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
import re
import struct
import sys
import types
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from ifam_jax.models.ifam import IFAM
from ifam_jax.models.vit import ViTConfig, VisionTransformer, resample_pos_embed

PathLike = str | os.PathLike
StateDict = Mapping[str, np.ndarray]
Format = Literal['timm', 'official', 'hf']


# ----------------------------------------------------------------------------
# Reading state dicts: safetensors and torch zip, into numpy, without torch
# ----------------------------------------------------------------------------
# safetensors' own numpy loader cannot decode BF16 (numpy has no bfloat16), so the format (an
# 8-byte header length, a JSON header, raw little-endian data) is read directly.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
    'BOOL': np.bool_,
}


def _check_exists(path: PathLike) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist')


def _naturals(x: Any, length: int | None = None) -> bool:
  """Whether `x` is a list of non-negative ints (of `length`, if given)."""
  return (isinstance(x, list) and length in (None, len(x))
          and all(isinstance(i, int) and i >= 0 for i in x))


def _safetensors_tensor(key: str, info: Any,
                        data_size: int) -> tuple[np.dtype, list[int], list[int]]:
  """(dtype, shape, data_offsets) of a header entry, once they agree and lie in the data."""
  if not (isinstance(info, dict) and isinstance(info.get('dtype'), str)
          and _naturals(info.get('shape')) and _naturals(info.get('data_offsets'), 2)):
    raise ValueError(f'tensor {key!r} needs dtype, shape (non-negative ints) and data_offsets '
                     f'(two), got {json.dumps(info)[:200]}')
  shape, offsets = info['shape'], info['data_offsets']
  if info['dtype'] not in _SAFETENSORS_DTYPES:
    raise ValueError(f'tensor {key!r} has unsupported dtype {info["dtype"]}')
  dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
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


# Storage classes a torch pickle may name, by their numpy dtype.
_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': jnp.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


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
    if module == 'torch' and name in _TORCH_STORAGES:
      return _StorageType(np.dtype(_TORCH_STORAGES[name]))
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


def read_state_dict(path: PathLike) -> dict[str, np.ndarray]:
  """A flat {name: array} state dict from .safetensors, or .pth/.pt/.bin (torch zip) files."""
  path = pathlib.Path(path)
  if path.suffix == '.safetensors':
    return _read_safetensors(path)
  if path.suffix in ('.pth', '.pt', '.bin'):
    obj = read_torch_checkpoint(path)
    if not (isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values())):
      keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
      raise ValueError(f'{path} does not hold a flat state dict of tensors (top level: {keys}); '
                       'use read_torch_checkpoint and pick the state dict out')
    return dict(obj)
  raise ValueError(f'unknown checkpoint type {path.suffix!r} ({path}); expected .safetensors, '
                   '.pth, .pt or .bin')


# ----------------------------------------------------------------------------
# Writing state dicts: safetensors and torch zip, without torch
# ----------------------------------------------------------------------------
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
_TORCH_ALIGNMENT = 64  # torch.save aligns each record's bytes (for torch.load(mmap=True))


def _native(dtype: np.dtype) -> np.dtype:
  return dtype.newbyteorder('=')


def _little_endian_bytes(x: np.ndarray) -> memoryview:
  x = np.ascontiguousarray(x)
  return x.astype(x.dtype.newbyteorder('<'), copy=False).reshape(-1).view(np.uint8).data


def _write_safetensors(path: pathlib.Path, state_dict: StateDict) -> None:
  header, offset = {}, 0
  for key, value in state_dict.items():
    header[key] = {'dtype': _SAFETENSORS_NAMES[_native(value.dtype)], 'shape': list(value.shape),
                   'data_offsets': [offset, offset + value.nbytes]}
    offset += value.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # the format pads its header with spaces to align the data
  with open(path, 'wb') as f:
    f.write(len(raw).to_bytes(8, 'little') + raw)
    for value in state_dict.values():
      f.write(_little_endian_bytes(value))


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
                                            for name, dtype in _TORCH_STORAGES.items()}
    return
  torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  def rebuild(*unused: Any) -> None:
    raise NotImplementedError('a stand-in for pickling; torch.load calls the real one')

  rebuild.__module__ = utils.__name__
  rebuild.__name__ = rebuild.__qualname__ = '_rebuild_tensor_v2'
  utils._rebuild_tensor_v2 = rebuild
  torch._utils = utils
  storages = {np.dtype(dtype): type(name, (), {'__module__': 'torch'})
              for name, dtype in _TORCH_STORAGES.items()}
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


def _torch_save(path: pathlib.Path, state_dict: StateDict) -> None:
  import torch  # pylint: disable=import-outside-toplevel  (optional dependency)

  def tensor(x: np.ndarray) -> Any:
    x = np.array(x)  # a writable copy: torch.from_numpy shares memory
    if x.dtype == jnp.bfloat16:  # numpy has no bfloat16 of torch's kind
      return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)

  torch.save(collections.OrderedDict((k, tensor(v)) for k, v in state_dict.items()), path)


def write_state_dict(path: PathLike, state_dict: StateDict) -> None:
  """Writes a flat {name: array} state dict as .safetensors or a torch zip (.pth/.pt/.bin).

  The torch zip is written by `torch.save` where torch is installed and otherwise directly, in
  the same format (`_write_torch_zip`). `read_state_dict` reads either back exactly.
  """
  path = pathlib.Path(path)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()}
  supported = {np.dtype(v) for v in _TORCH_STORAGES.values()}  # == the safetensors dtypes
  unsupported = {k: str(v.dtype) for k, v in state_dict.items()
                 if _native(v.dtype) not in supported}
  if unsupported:
    raise ValueError(f'cannot write tensors of these dtypes: {unsupported}')
  if path.suffix == '.safetensors':
    _write_safetensors(path, state_dict)
  elif path.suffix in ('.pth', '.pt', '.bin'):
    if importlib.util.find_spec('torch') is not None:
      _torch_save(path, state_dict)
    else:
      _write_torch_zip(path, state_dict)
  else:
    raise ValueError(f'unknown checkpoint type {path.suffix!r} ({path}); expected .safetensors, '
                     '.pth, .pt or .bin')


# ----------------------------------------------------------------------------
# DINOv2 formats and their names
# ----------------------------------------------------------------------------
# Checkpoint names per naming. Block entries follow `block` + index + '.'; a tuple lists tensors
# stacked along torch's output axis into one of ours (HF splits qkv; transformers 5 splits the
# packed SwiGLU input projection into gate and up).
_TIMM_NAMES = {
    'block': 'blocks.', 'patch_embed': 'patch_embed.proj', 'cls_token': 'cls_token',
    'reg_token': 'reg_token', 'pos_embed': 'pos_embed', 'mask_token': None, 'norm': 'norm',
    'norm1': 'norm1', 'norm2': 'norm2', 'ls1': 'ls1.gamma', 'ls2': 'ls2.gamma',
    'qkv': ('attn.qkv',), 'proj': ('attn.proj',),
    'gelu.fc1': ('mlp.fc1',), 'gelu.fc2': ('mlp.fc2',),
    'swiglu.fc1': ('mlp.fc1',), 'swiglu.fc2': ('mlp.fc2',),
}
_HF4_NAMES = {
    **_TIMM_NAMES, 'block': 'encoder.layer.',
    'patch_embed': 'embeddings.patch_embeddings.projection', 'cls_token': 'embeddings.cls_token',
    'reg_token': 'embeddings.register_tokens', 'pos_embed': 'embeddings.position_embeddings',
    'mask_token': 'embeddings.mask_token', 'norm': 'layernorm',
    'ls1': 'layer_scale1.lambda1', 'ls2': 'layer_scale2.lambda1',
    'qkv': ('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
    'proj': ('attention.output.dense',),
    'swiglu.fc1': ('mlp.weights_in',), 'swiglu.fc2': ('mlp.weights_out',),
}
_NAMES = {
    'timm': _TIMM_NAMES,
    'official': {**_TIMM_NAMES, 'reg_token': 'register_tokens', 'mask_token': 'mask_token',
                 'swiglu.fc1': ('mlp.w12',), 'swiglu.fc2': ('mlp.w3',)},
    'hf4': _HF4_NAMES,
    'hf5': {**_HF4_NAMES, 'qkv': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
            'proj': ('attention.o_proj',), 'swiglu.fc1': ('mlp.gate_proj', 'mlp.up_proj'),
            'swiglu.fc2': ('mlp.down_proj',)},
}


def detect_format(keys: Iterable[str]) -> Format:
  """'hf' (transformers), 'official' (DINOv2 hub .pth) or 'timm', from the key names alone."""
  keys = set(keys)
  if any(k.startswith(('embeddings.', 'encoder.layer.')) for k in keys):
    return 'hf'
  if {'register_tokens', 'mask_token'} & keys or any('.mlp.w12.' in k for k in keys):
    return 'official'
  if 'cls_token' in keys or any(k.startswith('blocks.') for k in keys):
    return 'timm'
  raise ValueError(f'not a DINOv2 state dict; first keys: {sorted(keys)[:10]}')


def _naming(state_dict: StateDict) -> str:
  fmt = detect_format(state_dict)
  if fmt == 'hf':
    return 'hf5' if any('.attention.q_proj.' in k for k in state_dict) else 'hf4'
  return fmt


@dataclasses.dataclass(frozen=True)
class _Param:
  """One of our parameters: its checkpoint tensors, their torch shape, and the layout change."""

  path: tuple[str | int, ...]
  sources: tuple[str, ...]
  shape: tuple[int, ...]
  layout: Literal['copy', 'linear', 'conv', 'conv1x1'] = 'copy'


# How a torch tensor becomes ours and back, per `_Param.layout`: (torch -> ours, ours -> torch).
# Only transposes and reshapes: exact, and they trace (jax.eval_shape) as well as run on numpy.
LAYOUTS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    'copy': (lambda x: x, lambda x: x),
    'linear': (lambda x: x.T, lambda x: x.T),  # Linear (out, in) <-> (in, out); any 2-D transpose
    'conv': (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),  # OIHW, HWIO
    'conv1x1': (lambda x: x[:, :, 0, 0], lambda x: x[:, :, None, None]),  # (O, I, 1, 1), (O, I)
}


def _dense(path: tuple[str | int, ...], names: tuple[str, ...], dout: int,
           din: int) -> list[_Param]:
  rows = dout // len(names)
  return [_Param(path + ('kernel',), tuple(n + '.weight' for n in names), (rows, din), 'linear'),
          _Param(path + ('bias',), tuple(n + '.bias' for n in names), (rows,))]


def _layer_norm(path: tuple[str | int, ...], name: str, d: int) -> list[_Param]:
  return [_Param(path + ('scale',), (name + '.weight',), (d,)),
          _Param(path + ('bias',), (name + '.bias',), (d,))]


def _plan(cfg: ViTConfig, naming: str) -> list[_Param]:
  """Every parameter of `VisionTransformer(cfg)` but pos_embed, with its checkpoint source."""
  n = _NAMES[naming]
  d, p, hidden = cfg.width, cfg.patch_size, cfg.mlp_hidden
  plan = [_Param(('cls_token',), (n['cls_token'],), (1, 1, d)),
          _Param(('patch_embed', 'kernel'), (n['patch_embed'] + '.weight',), (d, 3, p, p), 'conv'),
          _Param(('patch_embed', 'bias'), (n['patch_embed'] + '.bias',), (d,)),
          *_layer_norm(('norm',), n['norm'], d)]
  if cfg.num_registers:
    plan.append(_Param(('reg_token',), (n['reg_token'],), (1, cfg.num_registers, d)))
  fc1_rows = 2 * hidden if cfg.mlp == 'swiglu' else hidden
  for i in range(cfg.depth):
    pre, blk = f'{n["block"]}{i}.', ('blocks', i)

    def names(key: str, pre=pre) -> tuple[str, ...]:
      return tuple(pre + s for s in n[key])

    plan += [*_layer_norm(blk + ('norm1',), pre + n['norm1'], d),
             *_dense(blk + ('attn', 'qkv'), names('qkv'), 3 * d, d),
             *_dense(blk + ('attn', 'proj'), names('proj'), d, d),
             _Param(blk + ('ls1', 'gamma'), (pre + n['ls1'],), (d,)),
             *_layer_norm(blk + ('norm2',), pre + n['norm2'], d),
             *_dense(blk + ('mlp', 'fc1'), names(f'{cfg.mlp}.fc1'), fc1_rows, d),
             *_dense(blk + ('mlp', 'fc2'), names(f'{cfg.mlp}.fc2'), d, hidden),
             _Param(blk + ('ls2', 'gamma'), (pre + n['ls2'],), (d,))]
  return plan


def _architecture(sd: StateDict, naming: str) -> dict[str, Any]:
  """What the tensors say about the ViT; a field is absent when its tensors are missing."""
  n = _NAMES[naming]
  arch: dict[str, Any] = {}
  block = re.compile(re.escape(n['block']) + r'(\d+)\.')
  depths = [int(m.group(1)) + 1 for k in sd if (m := block.match(k))]
  if depths:
    arch['depth'] = max(depths)
  if n['cls_token'] in sd:
    arch['width'] = sd[n['cls_token']].shape[-1]
  arch['num_registers'] = sd[n['reg_token']].shape[1] if n['reg_token'] in sd else 0
  if n['patch_embed'] + '.weight' in sd:
    arch['patch_size'] = sd[n['patch_embed'] + '.weight'].shape[-1]
  pre = f'{n["block"]}0.'
  for kind in ('gelu', 'swiglu'):  # timm names both alike; the fc1/fc2 shapes tell them apart
    fc1 = [pre + s + '.weight' for s in n[kind + '.fc1']]
    fc2 = pre + n[kind + '.fc2'][0] + '.weight'
    if all(k in sd for k in fc1 + [fc2]):
      arch['mlp_hidden'] = sd[fc2].shape[-1]
      rows = sum(sd[k].shape[0] for k in fc1)
      arch['mlp'] = 'swiglu' if rows == 2 * arch['mlp_hidden'] else 'gelu'
      break
  return arch


def _patch_pos_embed(sd: StateDict, naming: str,
                     width: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(patch position embeddings [1, h*w, D], the class position [1, 1, D] or None).

  Official and HF checkpoints include the class position; timm's include it only for the
  non-register models (`no_embed_class=False`): a square token count means patches only.
  """
  key = _NAMES[naming]['pos_embed']
  pe = np.asarray(sd[key], np.float32)
  tokens = pe.shape[1] if pe.ndim == 3 else 0
  with_cls = naming != 'timm' or math.isqrt(tokens)**2 != tokens
  side = math.isqrt(max(tokens - with_cls, 0))
  if side == 0 or pe.shape != (1, side * side + with_cls, width):
    form = '1 + h*w' if naming != 'timm' else 'h*w or 1 + h*w'
    raise ValueError(f'{key} has shape {pe.shape}; expected (1, {form}, {width}) with h == w')
  return (pe[:, 1:], pe[:, :1]) if with_cls else (pe, None)


# ----------------------------------------------------------------------------
# DINOv2 -> VisionTransformer
# ----------------------------------------------------------------------------
def dinov2_to_vit_params(state_dict: StateDict, cfg: ViTConfig) -> dict[str, Any]:
  """Converts a DINOv2 state dict of any supported format to `VisionTransformer(cfg)` params.

  Returns a nested dict of float32 numpy arrays shaped like `nnx.state(vit, nnx.Param)`, with
  integer block indices (so `nnx.replace_by_pure_dict` accepts it). Position embeddings are
  resampled to `cfg.grid` (see the module docstring).
  """
  naming = _naming(state_dict)
  arch = _architecture(state_dict, naming)
  config = {'width': cfg.width, 'depth': cfg.depth, 'num_registers': cfg.num_registers,
            'patch_size': cfg.patch_size, 'mlp': cfg.mlp, 'mlp_hidden': cfg.mlp_hidden}
  disagree = [f'{k}: checkpoint {v!r}, config {config[k]!r}' for k, v in arch.items()
              if v != config[k]]
  if disagree:
    raise ValueError(f'{naming} checkpoint does not match the ViT config: {"; ".join(disagree)}')

  n = _NAMES[naming]
  plan = _plan(cfg, naming)
  expected = {k for prm in plan for k in prm.sources} | {n['pos_embed']}
  unexpected = sorted(set(state_dict) - expected - {n['mask_token']})
  missing = sorted(expected - set(state_dict))
  if unexpected or missing:
    raise ValueError(f'unexpected keys in {naming} checkpoint: {unexpected}; missing: {missing}')
  wrong = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, expected {prm.shape}'
           for prm in plan for k in prm.sources if tuple(state_dict[k].shape) != prm.shape]
  if wrong:
    raise ValueError(f'wrong shapes in {naming} checkpoint: {"; ".join(wrong)}')
  pos_embed, cls_pos = _patch_pos_embed(state_dict, naming, cfg.width)

  flat = {}
  for prm in plan:
    parts = [np.asarray(state_dict[k], np.float32) for k in prm.sources]
    x = parts[0] if len(parts) == 1 else np.concatenate(parts)
    flat[prm.path] = LAYOUTS[prm.layout][0](x)
  if cls_pos is not None:
    flat[('cls_token',)] = flat[('cls_token',)] + cls_pos
  source = math.isqrt(pos_embed.shape[1])
  if source != cfg.grid:
    if not cfg.num_registers:
      logging.warning(
          'Resampling the position embeddings of a non-register DINOv2 checkpoint from %dx%d '
          'to %dx%d with antialiased bicubic (timm). The official and HF code resample these '
          'models with non-antialiased bicubic, which jax.image cannot reproduce, so features '
          'will differ slightly from theirs.', source, source, cfg.grid, cfg.grid)
    pos_embed = np.asarray(resample_pos_embed(jnp.asarray(pos_embed), (cfg.grid, cfg.grid)))
  flat[('pos_embed',)] = pos_embed
  return traverse_util.unflatten_dict(flat)


def _assignments(module: nnx.Module,
                 params: Mapping[str, Any]) -> list[tuple[nnx.Variable, Any]]:
  """Pairs each model parameter with its new value after checking that names and shapes agree."""
  variables = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
  values = traverse_util.flatten_dict(params)
  unexpected = sorted('.'.join(map(str, p)) for p in set(values) - set(variables))
  missing = sorted('.'.join(map(str, p)) for p in set(variables) - set(values))
  if unexpected or missing:
    raise ValueError(f'converted params do not match the model: unexpected {unexpected}; '
                     f'missing {missing}')
  wrong = [f'{".".join(map(str, p))}: converted {values[p].shape}, model {v.shape}'
           for p, v in variables.items() if values[p].shape != v.shape]
  if wrong:
    raise ValueError(f'converted params do not match the model: {"; ".join(wrong)}')
  return [(v, values[p]) for p, v in variables.items()]


def _assign(assignments: list[tuple[nnx.Variable, Any]]) -> None:
  """Replaces each value by the new one, in the old dtype and on the old sharding.

  A module from `nnx.eval_shape` (ShapeDtypeStruct values) works too, which saves randomly
  initialising a large backbone only to overwrite it.
  """
  for variable, value in assignments:
    old = variable.get_value()
    variable.set_value(jax.device_put(np.asarray(value, old.dtype), old.sharding))


def load_params(module: nnx.Module, params: Mapping[str, Any]) -> None:
  """Assigns a nested dict of arrays to the module's parameters, after checking every name and
  shape (a module from `nnx.eval_shape` becomes a real one)."""
  _assign(_assignments(module, params))


def _as_state_dict(source: PathLike | StateDict) -> StateDict:
  return source if isinstance(source, Mapping) else read_state_dict(source)


def load_dinov2(vit: VisionTransformer, source: PathLike | StateDict) -> None:
  """Assigns DINOv2 weights (a file or a state dict) to `vit` in place; checks come first."""
  load_params(vit, dinov2_to_vit_params(_as_state_dict(source), vit.cfg))


def load_dinov2_into_ifam(model: IFAM, source: PathLike | StateDict) -> None:
  """Loads the same DINOv2 weights into both backbones of an `IFAM` model, as the reference does.

  The file is read once; each stage gets its own copy, resampled to its own grid.
  """
  state_dict = _as_state_dict(source)
  backbones = (model.stage1.backbone, model.stage2.backbone)
  pending = [_assignments(b, dinov2_to_vit_params(state_dict, b.cfg)) for b in backbones]
  for assignments in pending:
    _assign(assignments)
