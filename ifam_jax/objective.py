"""Each method's weighted training objective, from the pure terms of `losses.py`.

iFAM: the stage-2 and stage-1 cross-entropies and PDiscoFormer's shaping losses, weighted by
`config.loss.weights` (reference section 5); the equivariance term runs stage 1 again on one
affine-warped copy of the batch. ERM: the classifier's cross-entropy (under a fixed mask for the
ground-truth-mask methods).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ifam_jax import losses
from ifam_jax.models import ifam, vit

# fold_in tags of the per-step key.
RNG_MODEL, RNG_AFFINE, RNG_WARPED = range(3)


def grouped_presence_loss(maps: jax.Array, kind: str, group_size: int) -> jax.Array:
  """The presence loss averaged over groups of `group_size` images (0: one group).

  The reference takes its max over each GPU's local batch and averages gradients over GPUs;
  grouping reproduces that on any mesh, independent of how the batch is sharded here.
  """
  b = maps.shape[0]
  if not group_size or group_size >= b:
    return losses.presence_loss(maps, kind)
  if b % group_size:
    raise ValueError(f'batch {b} is not a multiple of loss.presence_group_size {group_size}')
  grouped = maps.reshape((b // group_size, group_size) + maps.shape[1:])
  return jnp.mean(jax.vmap(lambda m: losses.presence_loss(m, kind))(grouped))


def ifam_loss_terms(model: ifam.IFAM, images: jax.Array, labels: jax.Array, valid: jax.Array,
                    rng: jax.Array, loss_cfg: ml_collections.ConfigDict, run_stage2: bool = True,
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Every weighted loss term of one iFAM step, and accuracy-style extras.

  With `run_stage2=False` the stage-2 term 'cls2' and its 'accuracy' are left out and the
  extras carry the hard 'fg_mask' [B, h*w] instead, for `packed_stage2`.
  """
  weights = loss_cfg.weights
  out = model(images, train=True, rng=jax.random.fold_in(rng, RNG_MODEL), run_stage2=run_stage2)
  maps = out.part_maps
  terms = {
      'cls2': (lambda: losses.cross_entropy(out.logits, labels, valid)) if run_stage2 else None,
      'cls1': losses.cross_entropy(out.stage1_logits, labels, valid),
      'presence': lambda: grouped_presence_loss(maps, loss_cfg.presence,
                                                loss_cfg.presence_group_size),
      'enforced_presence': lambda: losses.enforced_presence_loss(maps,
                                                                 loss_cfg.enforced_presence),
      'orthogonality': lambda: losses.orthogonality_loss(out.part_features,
                                                         loss_cfg.orthogonality),
      'total_variation': lambda: losses.total_variation_loss(maps),
      'entropy': lambda: losses.pixel_entropy_loss(maps),
      'concentration': lambda: losses.concentration_loss(maps),
  }
  if weights.equivariance:
    affine = losses.random_affine_params(jax.random.fold_in(rng, RNG_AFFINE), images.shape[1],
                                         loss_cfg.degrees, loss_cfg.translate,
                                         tuple(loss_cfg.scale))
    warped = losses.affine_warp(images, *affine)
    warped_maps = model.stage1_maps(warped, train=True, rng=jax.random.fold_in(rng, RNG_WARPED))
    back = losses.inverse_warp_maps(warped_maps, *affine, images.shape[1])
    terms['equivariance'] = losses.equivariance_loss(maps, back)
  terms = {k: (v() if callable(v) else v) for k, v in terms.items()
           if weights[k] and v is not None}
  extras = {'stage1_accuracy': accuracy(out.stage1_logits, labels, valid),
            'fg_fraction': jnp.mean(out.fg_mask)}
  if run_stage2:
    extras['accuracy'] = accuracy(out.logits, labels, valid)
  else:
    extras['fg_mask'] = out.fg_mask.reshape(images.shape[0], -1)
  return terms, extras


def erm_loss_terms(model: vit.ViTClassifier, images: jax.Array, labels: jax.Array,
                   valid: jax.Array, patch_mask: jax.Array | None = None,
                   mask_mode: vit.MaskMode = 'hard',
                   ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The classifier's cross-entropy, under a fixed patch mask [B, h*w] if one is given."""
  logits = model(images, patch_mask, mask_mode=mask_mode)
  extras = {'accuracy': accuracy(logits, labels, valid)}
  if patch_mask is not None:
    extras['fg_fraction'] = jnp.mean(patch_mask)
  return {'cls2': losses.cross_entropy(logits, labels, valid)}, extras


def accuracy(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  correct = (jnp.argmax(logits, axis=-1) == labels) * valid
  return jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)
