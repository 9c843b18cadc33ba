"""The train step's visible-tokens path: stage 2 computed on the patches it can see, exactly.

Stage 2 never attends to a masked patch, so it can run on the visible patches gathered first
(`fast_attention.gather_patches`) at any capacity that holds them all; `packed_stage2` does so
in groups of similar visible-patch counts, at a few static capacities (docs/performance.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import einops
import jax
import jax.numpy as jnp
import ml_collections

from ifam_jax import methods
from ifam_jax.models import fast_attention, ifam
from ifam_jax.objective import accuracy


def stage2_capacities(fractions: Sequence[float], num_patches: int) -> tuple[int, ...]:
  """The patch capacities of `model.stage2_token_tiers`, ascending, always ending with all."""
  if any(not 0.0 <= f <= 1.0 for f in fractions):
    raise ValueError(f'model.stage2_token_tiers must be fractions in [0, 1], got {fractions}')
  return tuple(sorted({math.ceil(f * num_patches) for f in fractions} | {num_patches}))


def packing_applies(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether stage 2 trains on its visible tokens only (`packed_stage2`): the method leaves its
  stage 2 to packing, the tiers are set, stage 2 cannot see the masked-out patches, and its
  loss reaches stage 1 through nothing (hard mask, no surrogate gradient)."""
  facts = ifam.stage2_mask_facts(model_cfg.stage2_mask)
  return (methods.get(model_cfg.kind).packs_stage2 and bool(model_cfg.stage2_token_tiers)
          and facts.hides_masked and not facts.trains_stage1)


def largest_divisor_at_most(n: int, limit: int) -> int:
  """The group count `packed_stage2` uses: groups must split each device's batch evenly."""
  return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def packed_stage2(stage2_loss: Callable, params: Any, images: jax.Array, patch_mask: jax.Array,
                  labels: jax.Array, valid: jax.Array, *, capacities: Sequence[int],
                  groups: int, shards: int) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
  """Stage 2's cross-entropy and its gradient, computed on the visible tokens only.

  Stage 2 never attends to a masked patch, so its output is the same when it runs on the
  visible patches gathered first (`fast_attention.gather_patches`) at any capacity that holds
  them all.
  Each of the `shards` equal slices of the batch (one per device) is sorted by visible-patch
  count and cut into `groups` groups, so group capacities only grow. The trailing groups that
  need every patch run as one batch (a `lax.switch` over their number: fewer, larger kernels);
  a `lax.scan` runs each other group through a `lax.switch` over statically shaped branches,
  one per capacity, at the smallest that fits it. Each branch differentiates its own loss and
  adds to the accumulated gradient, so its activations never leave it. The values are the
  dense step's up to summation order.

  Args:
    stage2_loss: (params, images, patch_mask, keep_index, labels, valid, denominator) ->
      (summed weighted loss / denominator, logits).
    params: what to differentiate.
    patch_mask: [B, N_p] hard mask, > 0 = visible; carries no gradient.
    capacities: ascending patch capacities; the last is N_p.
    groups: groups per slice; must divide B / shards.
    shards: slices of the batch sorted independently, so that no image changes device.

  Returns:
    The loss, its gradient w.r.t. `params`, and metrics: 'accuracy' and 'stage2_tokens', the
    fraction of patch tokens the capacities computed.
  """
  b, n_p = patch_mask.shape
  per_shard = b // shards
  group_size = per_shard // groups
  counts = jnp.sum(patch_mask > 0, axis=1)
  order = jnp.argsort(counts.reshape(shards, per_shard), axis=1)

  def grouped(x):  # [B, ...] -> [groups, shards * group_size, ...], sorted within each shard
    x = x.reshape((shards, per_shard) + x.shape[1:])
    x = jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)
    return einops.rearrange(x, 's (g n) ... -> g (s n) ...', g=groups)

  inputs = {'images': images, 'mask': patch_mask, 'labels': labels, 'valid': valid}
  inputs = {k: grouped(v) for k, v in inputs.items()}
  tier = jnp.searchsorted(jnp.asarray(capacities), jnp.max(grouped(counts), axis=1))
  full = len(capacities) - 1
  num_full = jnp.sum(tier == full)  # the trailing groups, since capacities only grow
  denominator = jnp.maximum(jnp.sum(valid), 1.0)

  def differentiate(batch, capacity):
    keep_index = fast_attention.gather_patches(batch['mask'], capacity)
    (loss, logits), grads = jax.value_and_grad(stage2_loss, has_aux=True)(
        params, batch['images'], batch['mask'], keep_index, batch['labels'], batch['valid'],
        denominator)
    return grads, loss, logits

  group_logits = jax.eval_shape(
      lambda: differentiate(jax.tree.map(lambda x: x[0], inputs), capacities[0])[2])
  no_logits = jnp.zeros((groups,) + group_logits.shape, group_logits.dtype)
  zeros = jax.tree.map(jnp.zeros_like, params)

  def trailing(k):  # the last k groups as one batch, each device's rows kept on it
    def run():
      if k == 0:
        return zeros, jnp.zeros((), jnp.float32), no_logits
      merge = lambda x: jnp.swapaxes(x[groups - k:], 0, 1).reshape((-1,) + x.shape[2:])
      grads, loss, logits = differentiate(jax.tree.map(merge, inputs), n_p)
      logits = jnp.swapaxes(logits.reshape((shards * group_size, k, -1)), 0, 1)
      return grads, loss, no_logits.at[groups - k:].set(logits)
    return run

  grads, loss, merged_logits = jax.lax.switch(num_full, [trailing(k) for k in range(groups + 1)])

  def branch(capacity):
    def run(grads, group):
      group_grads, loss, logits = differentiate(group, capacity)
      return jax.tree.map(jnp.add, grads, group_grads), loss, logits
    return run

  def skip(grads, group):
    del group
    return grads, jnp.zeros((), jnp.float32), no_logits[0]

  def body(carry, xs):
    grads, loss = carry
    group_tier, group = xs
    grads, group_loss, logits = jax.lax.switch(group_tier, branches, grads, group)
    return (grads, loss + group_loss), logits

  branches = [branch(c) for c in capacities[:-1]] + [skip]  # full groups ran merged
  (grads, loss), logits = jax.lax.scan(body, (grads, loss), (tier, inputs))
  logits = logits + merged_logits
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  computed = jnp.sum(jnp.asarray(capacities)[tier]) * shards * group_size
  metrics = {'accuracy': accuracy(flat(logits), flat(inputs['labels']), flat(inputs['valid'])),
             'stage2_tokens': computed / (b * n_p)}
  return loss, grads, metrics
