"""iFAM: part discovery, a hard foreground mask, and a classifier that sees only the mask."""

from __future__ import annotations

import jax
import ml_collections
from flax import nnx

from ifam_jax import objective
from ifam_jax.models import ifam, vit


class IFAMMethod:
  has_mask = True
  packs_stage2 = True
  batch_inputs = ()

  def build(self, model_cfg: ml_collections.ConfigDict, vit_cfg: vit.ViTConfig,
            num_classes: int, rngs: nnx.Rngs) -> ifam.IFAM:
    return ifam.IFAM(num_classes=num_classes, num_parts=model_cfg.num_parts, stage1=vit_cfg,
                     stage2=vit_cfg, gumbel_tau=model_cfg.gumbel_tau,
                     part_dropout=model_cfg.part_dropout,
                     mask_part_dropout=model_cfg.mask_part_dropout,
                     stage2_mask=model_cfg.stage2_mask,
                     eval_gumbel_noise=model_cfg.eval_gumbel_noise,
                     mask_min_fraction=model_cfg.mask_min_fraction,
                     mask_erode=model_cfg.mask_erode,
                     mask_fixed_fraction=model_cfg.mask_fixed_fraction,
                     stage2_patch_dropout=model_cfg.stage2_patch_dropout, rngs=rngs)

  def loss_terms(self, model, images, labels, valid, rng, loss_cfg, run_stage2=True):
    return objective.ifam_loss_terms(model, images, labels, valid, rng, loss_cfg,
                                     run_stage2=run_stage2)

  def predict(self, model: ifam.IFAM, images: jax.Array, rng: jax.Array | None,
              intervention: ifam.Intervention | None = None) -> dict[str, jax.Array]:
    """Both stages' logits, the foreground mask [B, h, w] stage 2 saw and the part maps."""
    out = model(images, train=False, rng=rng, intervention=intervention)
    return {'logits': out.logits, 'logits1': out.stage1_logits, 'fg_mask': out.fg_mask,
            'part_maps': out.part_maps}
