"""The faithfulness audit: masked-out pixels cannot reach stage 2.

Stage 2 runs again, with the eval forward's mask, on images whose masked-out patches hold noise
or another image's pixels; its logits must be bitwise unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ifam_jax.apply import apply
from ifam_jax.evaluators import loop
from ifam_jax.evaluators.metrics import upsample_patches
from ifam_jax.models.ifam import Intervention

# fold_in tag of the per-batch key, besides the model's own use of it.
RNG_AUDIT_NOISE = 1 << 20


def make_mask_step(graphdef: nnx.GraphDef, rest: nnx.State,
                   intervention: Intervention | None) -> Callable:
  """(params, frozen, batch, rng) -> the eval forward's 'fg_mask' [B, h, w], as 'patch_mask'
  [B, h*w], its 'kept_fraction', and the forward's 'logits'."""

  def mask_step(params, frozen, batch, rng):
    out = apply(graphdef, rest, params, frozen, batch['image'], train=False, rng=rng,
                intervention=intervention)
    patch_mask = out.fg_mask.reshape(out.fg_mask.shape[0], -1)
    return {'fg_mask': out.fg_mask, 'patch_mask': patch_mask,
            'kept_fraction': jnp.mean(patch_mask, axis=-1), 'logits': out.logits}

  return mask_step


def make_stage2_fn(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """(params, frozen, images uint8, patch_mask [B, h*w]) -> stage-2 logits, hard mask."""

  def stage2(params, frozen, images, patch_mask):
    return apply(graphdef, rest, params, frozen, images,
                 lambda model, x: model.stage2(x, patch_mask))

  return stage2


@jax.jit
def replace_masked_out(images: jax.Array, fg_mask: jax.Array,
                       rng: jax.Array) -> dict[str, jax.Array]:
  """`images` with every pixel of a masked-out patch replaced by uniform noise, or by the pixel
  of the next image in the batch."""
  keep = upsample_patches(fg_mask > 0.5, images.shape[1], images.shape[2])[..., None]
  noise = jax.random.randint(rng, images.shape, 0, 256).astype(images.dtype)
  return {'noise': jnp.where(keep, images, noise),
          'other_image': jnp.where(keep, images, jnp.roll(images, 1, axis=0))}


@jax.jit
def bitwise_equal(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per row: are all float32 entries identical bit for bit (NaNs and signed zeros included)."""
  bits_a, bits_b = (jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
                    for x in (a, b))
  return jnp.all(bits_a == bits_b, axis=-1)


@jax.jit
def max_abs_diff(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(a - b), axis=-1)


def make_audit_step(forward: Callable, stage2: Callable) -> Callable:
  """An eval-loop step auditing stage 2 on one batch.

  `forward(params, frozen, batch, rng)` gives the eval mask as `make_mask_step` does;
  `stage2(params, frozen, images, patch_mask)` must run one jitted function on inputs of fixed
  shardings, so that its calls on the original and on the replaced images run one executable
  and their bits are comparable. Per example: 'unchanged_<replacement>', 'kept_fraction' and
  'forward_abs_diff' (stage 2 here against the forward's logits: that the audited function is
  the model's classifier).
  """

  def audit_step(params, frozen, batch, rng):
    out = forward(params, frozen, batch, rng)
    reference = stage2(params, frozen, batch['image'], out['patch_mask'])
    result = {'kept_fraction': out['kept_fraction'],
              'forward_abs_diff': max_abs_diff(reference, out['logits'])}
    replaced = replace_masked_out(batch['image'], out['fg_mask'],
                                  jax.random.fold_in(rng, RNG_AUDIT_NOISE))
    for kind, images in replaced.items():
      result[f'unchanged_{kind}'] = bitwise_equal(
          stage2(params, frozen, images, out['patch_mask']), reference)
    return result

  return audit_step


def summarize_audit(outputs: Mapping[str, np.ndarray], num_images: int) -> dict[str, Any]:
  """Fractions over the first `num_images` valid examples of gathered `make_audit_step` outputs."""
  keep = np.flatnonzero(outputs['valid'] > 0)[:num_images]
  summary: dict[str, Any] = {'num_images': int(keep.size)}
  for key in sorted(outputs):
    if key.startswith('unchanged_'):
      summary[key] = float(outputs[key][keep].mean())
  summary['mean_kept_fraction'] = float(outputs['kept_fraction'][keep].mean())
  summary['forward_max_abs_diff'] = float(outputs['forward_abs_diff'][keep].max())
  return summary


@dataclasses.dataclass
class Audit:
  """`summarize_audit` of the first `num_images` valid examples of one source.

  `run`'s predict function is `make_audit_step`'s; only the batches that hold those examples
  are read.
  """

  source: Any
  transform: Any
  config: ml_collections.ConfigDict
  batch_sharding: Any
  num_images: int = 64

  def run(self, predict: Callable, params: Any, frozen: Any) -> dict[str, Any]:
    outputs = loop.collect_leading(predict, params, frozen, self.source, self.transform,
                                   self.config, self.batch_sharding, self.num_images)
    return summarize_audit(outputs, self.num_images)
