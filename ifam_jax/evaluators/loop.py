"""The ordered eval loop, and the classification evaluator built on it.

A jitted predict function yields per-example outputs; they are gathered to the host in global
batch order and reduced there with numpy (reference section 7). Evaluation is deterministic; a
model with `eval_gumbel_noise` draws its noise from fold_in(config.seed, batch index),
reproducible for a fixed eval batch size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ifam_jax import data as data_lib
from ifam_jax.evaluators import metrics


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------
def gather_outputs(step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
                   num_batches: int, batch_sharding: Any, seed: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Runs `step(params, frozen, batch, rng)` on each batch; yields its outputs and the batch's
  label, group and valid flag as host arrays.

  Every batch entry becomes a global array and is gathered with the outputs, so all come back in
  the global batch order, which follows the mesh's device order and need not follow the process
  order (it does not on TPU slices). Batch i draws its randomness from fold_in(seed, i).
  """
  for i, batch in zip(range(num_batches), dataset):
    arrays = data_lib.global_batch(dict(batch), batch_sharding)
    out = dict(step(params, frozen, arrays, jax.random.fold_in(jax.random.key(seed), i)))
    out.update({k: arrays[k] for k in ('label', 'group', 'valid')})
    yield {k: np.asarray(v)
           for k, v in multihost_utils.process_allgather(out, tiled=True).items()}


def collect_outputs(step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
                    num_batches: int, batch_sharding: Any, seed: int) -> dict[str, np.ndarray]:
  """`gather_outputs` of every batch, concatenated."""
  batches = list(gather_outputs(step, params, frozen, dataset, num_batches, batch_sharding, seed))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def evaluate(eval_step: Callable, params: Any, frozen: Any, dataset: Iterable[Any],
             num_batches: int, batch_sharding: Any, group_names: Sequence[str], seed: int, *,
             class_names: Sequence[str] = (), minority_groups: Sequence[int] = (),
             class_map: np.ndarray | None = None,
             mask_labels: Sequence[int] = ()) -> dict[str, Any]:
  """One ordered, padded pass over an eval dataset; `summarize_predictions` of its outputs.

  Logits stay on every host until the pass ends (top-5 and AUROC need them): ImageNet's val
  set takes ~0.4 GB for both stages' 1000-way logits.
  """
  outputs = collect_outputs(eval_step, params, frozen, dataset, num_batches, batch_sharding, seed)
  return metrics.summarize_predictions(outputs, class_names=class_names,
                                       group_names=group_names,
                                       minority_groups=minority_groups, class_map=class_map,
                                       mask_labels=mask_labels)


def eval_dataset(source: Any, transform: Any, config: ml_collections.ConfigDict) -> tuple[Any, int]:
  """(dataset, number of batches) of one ordered, padded eval pass over `source`."""
  ds = data_lib.make_dataset(source, transform=transform,
                             global_batch_size=config.data.eval_batch_size, seed=config.seed,
                             train=False, num_workers=config.data.num_workers)
  return ds, data_lib.num_eval_batches(len(source), config.data.eval_batch_size,
                                       jax.process_count())


def collect_leading(step: Callable, params: Any, frozen: Any, source: Any, transform: Any,
                    config: ml_collections.ConfigDict, batch_sharding: Any,
                    num_images: int) -> dict[str, np.ndarray]:
  """`collect_outputs` of only the eval batches that hold the first `num_images` examples of
  `source` (padding included: filter on 'valid')."""
  ds, num_batches = eval_dataset(source, transform, config)
  num_batches = min(num_batches, math.ceil(num_images / config.data.eval_batch_size))
  return collect_outputs(step, params, frozen, ds, num_batches, batch_sharding, config.seed)


# ----------------------------------------------------------------------------
# The classification evaluator
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Classification:
  """`evaluate` over one source, named by its classes and groups, with its minority groups.

  Training logs it on every eval set and `--mode eval` reports it; `run`'s predict function
  yields `make_eval_step`'s outputs and is jitted. `class_map` sends the model's classes to the
  source's (ImageNet -> IN-9).
  """

  source: Any
  transform: Any
  config: ml_collections.ConfigDict
  batch_sharding: Any
  class_map: np.ndarray | None = None

  def run(self, predict: Callable, params: Any, frozen: Any) -> dict[str, Any]:
    ds, num_batches = eval_dataset(self.source, self.transform, self.config)
    return evaluate(predict, params, frozen, ds, num_batches, self.batch_sharding,
                    self.source.group_names, self.config.seed,
                    class_names=self.source.class_names,
                    minority_groups=metrics.minority_groups(self.source),
                    class_map=self.class_map, mask_labels=metrics.mask_labels(self.source))
