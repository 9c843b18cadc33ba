"""Input pipelines: grain datasets of fixed-shape per-process batches, and their global arrays.

Each process reads its own shard (`source[process_index::process_count]`) and yields dicts of
numpy arrays with a static per-process batch b = global_batch_size / process_count:

  image  uint8 [b, S, S, 3]   label int32 [b]   group int32 [b]   valid int32 [b]
  fg_mask uint8 [b, S, S]     (only when the source provides it)
  first_pass int32 [b]        (training only) 1 in the process's first pass over its shard

Training shuffles (reshuffled every epoch), repeats and drops the last partial batch; its
unreadable records (valid=0) with first_pass=1 count each unreadable file once, however many
epochs run. Evaluation reads in order and pads every process to the same number of batches
with `valid=0` records, so shapes stay static, multi-host steps stay in lockstep, and each
example counts exactly once when metrics are weighted by `valid`. The per-record augmentation
generator comes from grain's `random_map`, keyed by (seed, process, position in the repeated
stream), so an image is augmented differently in every epoch yet reproducibly. Batches are
formed before the worker split, so the stream does not depend on `num_workers`. Iterators
support grain checkpointing (`get_state` / `set_state`, or `grain.checkpoint.CheckpointSave`
with Orbax).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from ifam_jax.data import transforms as transforms_lib
from ifam_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


# ----------------------------------------------------------------------------
# Checks and sizes
# ----------------------------------------------------------------------------
def check_image_size(image_size: int, patch_size: int) -> None:
  """Fails fast, before any data is read, when patches would not tile the image."""
  if image_size <= 0 or patch_size <= 0 or image_size % patch_size:
    raise ValueError(f'image size {image_size} is not a positive multiple of the patch size '
                     f'{patch_size}; pick e.g. {max(1, image_size // patch_size) * patch_size}')


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} does not divide evenly over '
                     f'{process_count} processes')
  return global_batch_size // process_count


def num_eval_batches(num_examples: int, global_batch_size: int, process_count: int) -> int:
  """Batches every process yields in eval mode: enough for the largest shard."""
  b = per_process_batch_size(global_batch_size, process_count)
  return math.ceil(math.ceil(num_examples / process_count) / b)


# ----------------------------------------------------------------------------
# Worker-side pieces (module level, so they pickle into grain workers)
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Process:
  transform: transforms_lib.Transform

  def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return transforms_lib.process(record, rng, self.transform)


@dataclasses.dataclass(frozen=True)
class _MarkFirstPass:
  """Sets 'first_pass' from the position in the repeated stream: its epoch is index // length."""
  length: int

  def __call__(self, index: int, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**record, 'first_pass': np.int32(index < self.length)}


class _PaddedShard:
  """One process's eval shard, padded to `length` with copies of record 0 marked valid=0."""

  def __init__(self, source: Sequence[dict[str, Any]], process_index: int, process_count: int,
               length: int):
    self._source = source
    self._index, self._count, self._length = process_index, process_count, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int) -> dict[str, Any]:
    j = self._index + i * self._count
    if j < len(self._source):
      return self._source[j]
    return {**self._source[0], 'valid': 0}

  def __repr__(self) -> str:
    return (f'PaddedShard({self._source!r}, process_index={self._index}, '
            f'process_count={self._count}, length={self._length})')


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------
def make_dataset(source: Sequence[dict[str, Any]], *, transform: transforms_lib.Transform,
                 global_batch_size: int, seed: int, train: bool,
                 num_epochs: int | None = None, num_workers: int = 0,
                 worker_buffer_size: int = 2, num_threads: int = 4,
                 read_buffer_size: int = 4, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """A grain IterDataset of per-process batches (see the module docstring for the format).

  Args:
    source: a random-access source (`ifam_jax.data.sources`).
    transform: worker-side transform from `ifam_jax.data.transforms`; fixes the image size.
    global_batch_size: batch over all processes; must divide by the process count.
    seed: seeds the shuffle and the augmentations (decorrelated per process).
    train: shuffle + repeat + drop remainder; otherwise one ordered, padded pass.
    num_epochs: train only; None repeats forever.
    num_workers: grain worker processes (0: threads in this process). Needs parsed absl flags.
    worker_buffer_size: batches each worker keeps ready.
    num_threads, read_buffer_size: threads that build batches (per worker) and the number of
      batches they keep ready.
    process_index, process_count: default to jax's; settable to test sharding on one host.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  b = per_process_batch_size(global_batch_size, pc)
  n = len(source)
  if n == 0:
    raise ValueError(f'{source!r} is empty')
  if num_workers > 0 and not flags.FLAGS.is_parsed():
    raise RuntimeError('grain workers read absl flags: run under absl.app.run, or call '
                       'absl.flags.FLAGS.mark_as_parsed() first (e.g. in tests)')
  shuffle_seed, augment_seed = (int(s) for s in
                                np.random.SeedSequence([seed, pi]).generate_state(2))
  if train:
    if n < pc:
      raise ValueError(f'{source!r} has {n} examples, fewer than the {pc} processes')
    shard = grain.MapDataset.source(source)[pi::pc]
    ds = shard.shuffle(seed=shuffle_seed).repeat(num_epochs)
  else:
    length = num_eval_batches(n, global_batch_size, pc) * b
    ds = grain.MapDataset.source(_PaddedShard(source, pi, pc, length))
  ds = ds.random_map(_Process(transform), seed=augment_seed)
  if train:  # after random_map, which keeps its per-index seeds: the same augmentations
    ds = ds.map_with_index(_MarkFirstPass(len(shard)))
  # Batch before `to_iter_dataset`: workers then slice whole batches, so every batch keeps b
  # records and the stream is the same for any number of workers (batching after it would give
  # each worker its own ragged remainder).
  ds = ds.batch(b, drop_remainder=train)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=read_buffer_size))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=worker_buffer_size))
  return it


# ----------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------
def global_batch(batch: dict[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Per-process numpy batches -> global jax.Arrays sharded on their leading (batch) axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 [..., 3] images -> (x / 255 - mean) / std, computed in float32, cast to `dtype`."""
  x = images.astype(jnp.float32) / 255.0
  x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)
