"""Device mesh, regex parameter-sharding rules, and batch sharding.

The mesh has two axes, `data` and `fsdp`, built with Auto axis types so ordinary GSPMD code
(concatenating a replicated CLS token with batch-sharded patches, say) just works. The batch is
sharded over both axes; parameters are replicated unless a config rule says 'fsdp', which shards
a large tensor along its largest dimension divisible by the `fsdp` axis size (big_vision's rule).
The same code runs on one CPU, simulated CPU devices, GPUs and multi-host TPU slices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh from [('data', -1), ('fsdp', n)]; one axis may be -1 to take the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in axes)
  if names != MESH_AXES:
    raise ValueError(f'mesh axes must be {MESH_AXES}, got {names}')
  sizes = [size for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {axes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not divide into mesh {axes}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, '
                     f'found {len(devices)}')
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(MESH_AXES))


def check_batch_size(key: str, size: int, mesh: Mesh) -> None:
  """Fails before compilation when `batch_sharding` cannot split a batch of `size` over `mesh`.

  A multiple of the device count is also a multiple of the process count, since every process
  holds the same number of devices.
  """
  n = mesh.size
  if size > 0 and size % n == 0:
    return
  below, above = n * (size // n), n * max(1, -(-size // n))
  options = ' or '.join(str(v) for v in dict.fromkeys((below, above)) if v > 0)
  raise ValueError(f'{key}={size} does not split evenly over the {n} devices of the mesh '
                   f'{dict(mesh.shape)}; nearest valid values: {options} (--config.{key}=...)')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fsdp_spec(shape: tuple[int, ...], axis_size: int, min_size: int) -> P:
  if axis_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % axis_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def path_name(path: Sequence[Any]) -> str:
  """'/'-joined name of an nnx path (str, int) or a jax key path (DictKey, GetAttrKey, ...)."""

  def key(k):
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  return '/'.join(key(k) for k in path)


def map_named(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """fn(name, leaf) over a tree; an nnx Variable is named by its path, not its '.value'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: jax.tree.map(lambda x: fn(path_name(path), x), leaf),
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _compile_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
  for _, tactic in rules:
    if tactic not in ('replicate', 'fsdp'):
      raise ValueError(f"unknown sharding tactic {tactic!r}; use 'replicate' or 'fsdp'")
  return [(re.compile(pattern), tactic) for pattern, tactic in rules]


def _leaf_spec(name: str, shape: tuple[int, ...], rules: list[tuple[re.Pattern, str]],
               fsdp_size: int, fsdp_min_size: int) -> P:
  for pattern, tactic in rules:
    if pattern.fullmatch(name):
      return _fsdp_spec(shape, fsdp_size, fsdp_min_size) if tactic == 'fsdp' else P()
  return P()


def infer_sharding(tree: Any, rules: Sequence[tuple[str, str]], mesh: Mesh,
                   fsdp_min_size: int = 2**18) -> Any:
  """NamedSharding per leaf: the first rule whose regex matches the leaf's path decides.

  Tactics: 'replicate', or 'fsdp' (largest dimension divisible by the fsdp axis, for tensors
  of at least `fsdp_min_size` elements; smaller ones stay replicated). Leaves no rule matches
  are replicated.
  """
  compiled = _compile_rules(rules)
  fsdp_size = mesh.shape['fsdp']
  return map_named(lambda name, leaf: NamedSharding(
      mesh, _leaf_spec(name, tuple(np.shape(leaf)), compiled, fsdp_size, fsdp_min_size)), tree)


def bytes_per_device(tree: Any, rules: Sequence[tuple[str, str]], fsdp_size: int,
                     fsdp_min_size: int = 2**18) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) under the rules, for an
  `fsdp` axis of `fsdp_size` devices; needs no devices, so any mesh can be sized on a laptop."""
  compiled = _compile_rules(rules)

  def leaf_bytes(name, leaf):
    shape = tuple(np.shape(leaf))
    spec = _leaf_spec(name, shape, compiled, fsdp_size, fsdp_min_size)
    shards = fsdp_size if 'fsdp' in tuple(spec) else 1
    return math.prod(shape) * np.dtype(leaf.dtype).itemsize // shards

  return sum(jax.tree.leaves(map_named(leaf_bytes, tree)))
