"""The eval forward as a predict function: what training's evals and `--mode eval` run."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

from ifam_jax import data as data_lib
from ifam_jax.evaluators.metrics import fg_overlap
from ifam_jax.models.ifam import Intervention


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, config: ml_collections.ConfigDict,
                   intervention: Intervention | None = None) -> Callable:
  """(params, frozen, batch, rng) -> per-example outputs.

  'logits' [B, C] of stage 2 (or of the baseline ViT); for iFAM also 'logits1' (stage 1),
  'fg_fraction' and, when the batch carries a ground-truth 'fg_mask', `fg_overlap`'s counts.
  """
  baseline = config.model.kind == 'baseline'
  if baseline and intervention is not None:
    raise ValueError('interventions edit the iFAM mask; the baseline has none')

  def eval_step(params, frozen, batch, rng):
    model = nnx.merge(graphdef, params, frozen, rest)
    images = data_lib.normalize(batch['image'])
    if baseline:
      return {'logits': model(images)}
    out = model(images, train=False, rng=rng, intervention=intervention)
    result = {'logits': out.logits, 'logits1': out.stage1_logits,
              'fg_fraction': jnp.mean(out.fg_mask, axis=(1, 2))}
    if 'fg_mask' in batch:
      result.update(fg_overlap(out.fg_mask, batch['fg_mask']))
    return result

  return eval_step
