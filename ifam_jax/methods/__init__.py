"""Methods: what the loop, the evaluators and the builders need to know of each model kind.

A method is a small object with
  has_mask     whether it decides a foreground mask (interventions, calibration, audits need one)
  build        (model config, ViT config, num_classes, rngs) -> the nnx module
  loss_terms   (model, normalised images, labels, valid, rng, loss config) -> (terms, extras)
  predict      (model, normalised images, rng, intervention) -> per-example eval outputs
and is registered here under its `model.kind`. Adding a method adds a file and an entry below;
nothing else dispatches on the kind.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import ml_collections
from flax import nnx

from ifam_jax.methods.erm import ERM
from ifam_jax.methods.ifam import IFAMMethod
from ifam_jax.models.ifam import Intervention
from ifam_jax.models.vit import ViTConfig


class Method(Protocol):
  has_mask: bool

  def build(self, model_cfg: ml_collections.ConfigDict, vit_cfg: ViTConfig, num_classes: int,
            rngs: nnx.Rngs) -> nnx.Module:
    ...

  def loss_terms(self, model: nnx.Module, images: jax.Array, labels: jax.Array,
                 valid: jax.Array, rng: jax.Array, loss_cfg: ml_collections.ConfigDict,
                 run_stage2: bool = True) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    ...

  def predict(self, model: nnx.Module, images: jax.Array, rng: jax.Array | None,
              intervention: Intervention | None = None) -> dict[str, jax.Array]:
    ...


METHODS: dict[str, Any] = {'ifam': IFAMMethod(), 'baseline': ERM()}


def get(kind: str) -> Method:
  """The method of `model.kind`."""
  if kind not in METHODS:
    raise ValueError(f'model.kind {kind!r} is not a method; known: {sorted(METHODS)}')
  return METHODS[kind]
