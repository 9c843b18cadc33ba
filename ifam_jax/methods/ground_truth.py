"""A ViT classifier masked by the dataset's ground-truth foreground: the paper's oracle rows.

"Early mask_gt" hides the background from the attention keys, as iFAM's stage 2 does with its
own mask; "Late mask_gt" lets the ViT see the whole image and averages its final patch tokens
under the mask (`vit.late_pool`). The batch's pixel mask becomes a patch mask here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ifam_jax import objective
from ifam_jax.models import vit


def patch_pixel_counts(pixels: jax.Array, patch_size: int) -> jax.Array:
  """A pixel mask [B, S, S] (nonzero = foreground) -> its foreground pixels per patch [B, h*w],
  int32."""
  b, height, width = pixels.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f'pixel mask {height}x{width} does not tile into {patch_size}-pixel patches')
  grid = (pixels > 0).reshape(b, height // patch_size, patch_size, width // patch_size,
                              patch_size)
  return jnp.sum(grid, axis=(2, 4), dtype=jnp.int32).reshape(b, -1)


def patch_mask_from_pixels(pixels: jax.Array, patch_size: int) -> jax.Array:
  """A pixel mask [B, S, S] (nonzero = foreground) -> patch mask [B, h*w] in {0, 1}, float32.

  A patch is foreground when at least half of its pixels are (counted exactly, in integers).
  """
  count = patch_pixel_counts(pixels, patch_size)
  return (2 * count >= patch_size**2).astype(jnp.float32)


class GroundTruthMask:
  """One `ViTClassifier` whose patch mask is the batch's 'fg_mask', applied as `mask_mode`."""

  has_mask = False  # the mask is given, not decided: no parts to intervene on
  packs_stage2 = False
  batch_inputs = ('fg_mask',)

  def __init__(self, mask_mode: vit.MaskMode):
    self.mask_mode = mask_mode

  def build(self, model_cfg: ml_collections.ConfigDict, vit_cfg: vit.ViTConfig,
            num_classes: int, rngs: nnx.Rngs) -> vit.ViTClassifier:
    del model_cfg
    return vit.ViTClassifier(vit_cfg, num_classes=num_classes, rngs=rngs)

  def loss_terms(self, model, images, labels, valid, rng, loss_cfg, run_stage2=True, *,
                 fg_mask):
    del rng, loss_cfg, run_stage2
    patch_mask = patch_mask_from_pixels(fg_mask, model.backbone.cfg.patch_size)
    return objective.erm_loss_terms(model, images, labels, valid, patch_mask, self.mask_mode)

  def predict(self, model: vit.ViTClassifier, images: jax.Array, rng: jax.Array | None,
              intervention=None, *, fg_mask: jax.Array) -> dict[str, jax.Array]:
    """The logits and the patch mask [B, h, w] the classifier read."""
    del rng, intervention
    p = model.backbone.cfg.patch_size
    patch_mask = patch_mask_from_pixels(fg_mask, p)
    grid = (images.shape[0], images.shape[1] // p, images.shape[2] // p)
    return {'logits': model(images, patch_mask, mask_mode=self.mask_mode),
            'fg_mask': patch_mask.reshape(grid)}
