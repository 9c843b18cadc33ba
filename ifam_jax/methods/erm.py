"""ERM: the plain fine-tuned ViT classifier (no stage 1, no mask), the paper's baseline row."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ifam_jax import objective
from ifam_jax.models import vit


class ERM:
  has_mask = False
  packs_stage2 = False
  batch_inputs = ()

  def build(self, model_cfg: ml_collections.ConfigDict, vit_cfg: vit.ViTConfig,
            num_classes: int, rngs: nnx.Rngs) -> vit.ViTClassifier:
    del model_cfg
    return vit.ViTClassifier(vit_cfg, num_classes=num_classes, rngs=rngs)

  def loss_terms(self, model, images, labels, valid, rng, loss_cfg, run_stage2=True):
    del rng, loss_cfg, run_stage2
    return objective.erm_loss_terms(model, images, labels, valid)

  def predict(self, model: vit.ViTClassifier, images: jax.Array, rng: jax.Array | None,
              intervention=None) -> dict[str, jax.Array]:
    del rng, intervention  # no noise, no mask to edit
    return {'logits': model(images)}
