"""PDiscoFormer: iFAM without its second stage, the paper's "no second stage" ablation.

The IFAM model trains on every loss but the stage-2 cross-entropy, and predicts with its
stage-1 part classifier; its foreground mask is still reported.
"""

from __future__ import annotations

import jax

from ifam_jax import objective
from ifam_jax.methods.ifam import IFAMMethod
from ifam_jax.models import ifam


class PDiscoFormer(IFAMMethod):
  packs_stage2 = False  # no stage 2 to pack

  def loss_terms(self, model, images, labels, valid, rng, loss_cfg, run_stage2=True):
    del run_stage2
    terms, extras = objective.ifam_loss_terms(model, images, labels, valid, rng, loss_cfg,
                                              run_stage2=False)
    del extras['fg_mask']
    extras['accuracy'] = extras.pop('stage1_accuracy')  # stage 1 is the model's prediction
    return terms, extras

  def predict(self, model: ifam.IFAM, images: jax.Array, rng: jax.Array | None,
              intervention: ifam.Intervention | None = None) -> dict[str, jax.Array]:
    """Stage 1's logits as 'logits' (and as 'logits1', for stage-1 columns), the foreground
    mask [B, h, w] and the part maps; stage 2 does not run."""
    out = model(images, train=False, rng=rng, intervention=intervention, run_stage2=False)
    return {'logits': out.stage1_logits, 'logits1': out.stage1_logits, 'fg_mask': out.fg_mask,
            'part_maps': out.part_maps}
