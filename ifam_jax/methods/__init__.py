"""Methods: what the loop, the evaluators and the builders need to know of each model kind.

A method is a small object with
  has_mask      whether it decides a foreground mask (interventions, calibration, audits need one)
  packs_stage2  whether `loss_terms(run_stage2=False)` leaves its stage 2 to `packed_stage2`
  batch_inputs  the batch entries (besides image, label, valid) that it reads, passed by name as
                keyword arguments to `loss_terms` and `predict`, e.g. a ground-truth 'fg_mask'
  build         (model config, ViT config, num_classes, rngs) -> the nnx module
  loss_terms    (model, normalised images, labels, valid, rng, loss config) -> (terms, extras)
  predict       (model, normalised images, rng, intervention) -> per-example eval outputs
and is registered here under its `model.kind`. Adding a method adds a file and an entry below;
nothing else dispatches on the kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import jax
import ml_collections
from flax import nnx

from ifam_jax.methods.erm import ERM
from ifam_jax.methods.ground_truth import GroundTruthMask
from ifam_jax.methods.ifam import IFAMMethod
from ifam_jax.methods.pdiscoformer import PDiscoFormer
from ifam_jax.models.ifam import Intervention
from ifam_jax.models.vit import ViTConfig


class Method(Protocol):
  has_mask: bool
  packs_stage2: bool
  batch_inputs: tuple[str, ...]

  def build(self, model_cfg: ml_collections.ConfigDict, vit_cfg: ViTConfig, num_classes: int,
            rngs: nnx.Rngs) -> nnx.Module:
    ...

  def loss_terms(self, model: nnx.Module, images: jax.Array, labels: jax.Array,
                 valid: jax.Array, rng: jax.Array, loss_cfg: ml_collections.ConfigDict,
                 run_stage2: bool = True, **inputs: jax.Array,
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    ...

  def predict(self, model: nnx.Module, images: jax.Array, rng: jax.Array | None,
              intervention: Intervention | None = None,
              **inputs: jax.Array) -> dict[str, jax.Array]:
    ...


METHODS: dict[str, Any] = {
    'ifam': IFAMMethod(),
    'baseline': ERM(),
    'pdiscoformer': PDiscoFormer(),
    'early_mask_gt': GroundTruthMask('hard'),
    'late_mask_gt': GroundTruthMask('late'),
}

# Where the batch entries that methods read come from, for the error that names a missing one.
_INPUT_SOURCES = {'fg_mask': "ground-truth foreground masks: the 'synthetic' source, or 'cub' "
                             'with segmentation_dir'}


def get(kind: str) -> Method:
  """The method of `model.kind`."""
  if kind not in METHODS:
    raise ValueError(f'model.kind {kind!r} is not a method; known: {sorted(METHODS)}')
  return METHODS[kind]


def batch_inputs(kind: str, batch: Mapping[str, Any], where: str) -> dict[str, Any]:
  """The entries of `batch` that method `kind` reads (`batch_inputs`), or a ValueError naming
  the method, the missing entries and `where` the batch came from."""
  method = get(kind)
  missing = [k for k in method.batch_inputs if k not in batch]
  if missing:
    hints = '; '.join(f'{k!r} needs {_INPUT_SOURCES[k]}' for k in missing if k in _INPUT_SOURCES)
    raise ValueError(f'model.kind {kind!r} reads {missing} from every batch, which {where} does '
                     f'not provide' + (f' ({hints})' if hints else ''))
  return {k: batch[k] for k in method.batch_inputs}


def check_sources(kind: str, sources: Mapping[str, Any]) -> None:
  """Reads one record of each data source and raises if method `kind` cannot run on it.

  Cheap and before any compilation: a method without `batch_inputs` reads nothing.
  """
  if not get(kind).batch_inputs:
    return
  for name, source in sources.items():
    batch_inputs(kind, source[0], f'data source {name!r} ({source!r})')
