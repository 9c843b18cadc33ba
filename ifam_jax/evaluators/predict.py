"""The eval forward as a predict function: what training's evals and `--mode eval` run."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import ml_collections
from flax import nnx

from ifam_jax import methods
from ifam_jax.apply import apply
from ifam_jax.evaluators.metrics import fg_overlap
from ifam_jax.models.ifam import Intervention


def make_eval_step(graphdef: nnx.GraphDef, rest: nnx.State, config: ml_collections.ConfigDict,
                   intervention: Intervention | None = None) -> Callable:
  """(params, frozen, batch, rng) -> per-example outputs: the method's `predict`.

  'logits' [B, C] of the classifier; for a method with a mask also 'logits1' (stage 1); for
  one whose predict returns its patch mask 'fg_fraction' and, when the batch carries a
  ground-truth 'fg_mask', `fg_overlap`'s counts. The batch also feeds the method's
  `batch_inputs`.
  """
  method = methods.get(config.model.kind)
  if intervention is not None and not method.has_mask:
    raise ValueError(f'interventions edit the foreground mask; model.kind '
                     f'{config.model.kind!r} has none')

  def eval_step(params, frozen, batch, rng):
    inputs = methods.batch_inputs(config.model.kind, batch, 'the eval batch')
    out = apply(graphdef, rest, params, frozen, batch['image'], method.predict, rng=rng,
                intervention=intervention, **inputs)
    out.pop('part_maps', None)  # pictures only
    if 'fg_mask' in out:
      fg_mask = out.pop('fg_mask')
      out['fg_fraction'] = jnp.mean(fg_mask, axis=(1, 2))
      if 'fg_mask' in batch:
        out.update(fg_overlap(fg_mask, batch['fg_mask']))
    return out

  return eval_step
