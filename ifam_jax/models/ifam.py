"""The two-stage iFAM model: part discovery, a hard foreground mask, a masked classifier.

Stage 1 (`PartDiscovery`) assigns every patch to one of K foreground parts or the background.
The foreground mask is a hard argmax of foreground-vs-background; stage 2 (`ViTClassifier`) sees
the full image but its attention keys are restricted to the prefix tokens and the foreground
patches, so no pixel of a background patch can influence its logits.

Randomness is explicit: one `rng` per call, folded per purpose (Gumbel noise of the maps, Gumbel
noise of the mask, part dropout of the classifier, part dropout of the mask, patch dropout of
stage 2's mask).

Remedies against a mask whose geometry tells stage 2 the background (all off by default): stage 1
decides from the whole image, background included, whether the mask is empty (stage 2 then sees
its prefix tokens alone), how many patches it holds, and which edge patches, with their
background pixels, it shows. `IFAM.remedy_mask` edits the mask stage 2 reads against each.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from ifam_jax.models.fast_attention import gather_patches
from ifam_jax.models.parts import PartDiscovery, gumbel_softmax
from ifam_jax.models.vit import MASK_MODES, MaskMode, ViTClassifier, ViTConfig

ThresholdRule = Literal['distance', 'dot_product']
PartRemoval = Literal['reference', 'renormalise']
PART_REMOVALS = ('reference', 'renormalise')

# fold_in tags, one per source of randomness.
RNG_MAP_NOISE, RNG_MASK_NOISE, RNG_PART_DROPOUT, RNG_MASK_DROPOUT = range(4)
RNG_STAGE2_PATCH_DROPOUT = 4


# ----------------------------------------------------------------------------
# How the foreground mask reaches stage 2
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage2MaskFacts:
  """What a `stage2_mask` value implies for its users (training, packing, audits)."""

  binary: bool  # stage 2 reads the {0, 1} mask (not the soft probabilities)
  trains_stage1: bool  # the stage-2 loss sends stage 1 a gradient through the mask
  # No masked-out pixel can reach stage 2's logits: it may run on the visible patches alone
  # (packing, token gather) and the audit holds.
  hides_masked: bool


def stage2_mask_facts(stage2_mask: str) -> Stage2MaskFacts:
  """The one place that decides what each `model.stage2_mask` value means.

  'hard' (the reference): the hard mask, no gradient to stage 1. 'straight_through': the same
  forward values bit for bit; the stage-2 loss trains stage 1 through a surrogate (`IFAM`).
  'soft' (the paper's ablation): stage 2 adds log(p_fg + 1e-10) to its attention logits.
  'late' (the paper's late-masking baseline): stage 2 sees the whole image and averages its
  final patch tokens under the hard mask (`vit.late_pool`), no gradient to stage 1.
  """
  if stage2_mask not in MASK_MODES:
    raise ValueError(f'model.stage2_mask must be one of {MASK_MODES}, got {stage2_mask!r}')
  return Stage2MaskFacts(binary=stage2_mask != 'soft',
                         trains_stage1=stage2_mask in ('straight_through', 'soft'),
                         hides_masked=stage2_mask in ('hard', 'straight_through'))


# ----------------------------------------------------------------------------
# Remedies for a mask whose geometry leaks the background
# ----------------------------------------------------------------------------
def check_mask_remedies(stage2_mask: str, min_fraction: float, erode: int,
                        fixed_fraction: float, patch_dropout: float) -> None:
  """Raises a ValueError naming the flag for a remedy setting `IFAM` cannot honour."""
  for name, value in (('mask_min_fraction', min_fraction),
                      ('mask_fixed_fraction', fixed_fraction),
                      ('stage2_patch_dropout', patch_dropout)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'model.{name} must be in [0, 1), got {value!r}')
  if isinstance(erode, bool) or not isinstance(erode, int) or erode < 0:
    raise ValueError(f'model.mask_erode must be an integer >= 0, got {erode!r}')
  if fixed_fraction and (min_fraction or erode):
    raise ValueError('model.mask_fixed_fraction shows stage 2 a fixed number of patches whatever '
                     'the hard mask says; model.mask_min_fraction and model.mask_erode edit that '
                     'hard mask, so set them to 0 with it')
  if stage2_mask == 'soft' and (min_fraction or erode or fixed_fraction or patch_dropout):
    raise ValueError("the mask remedies (model.mask_min_fraction, mask_erode, "
                     "mask_fixed_fraction, stage2_patch_dropout) edit a binary mask; "
                     "stage2_mask='soft' reads the soft probabilities")


def remedy_count(fraction: float, num_patches: int) -> int:
  """The patches a floor or a fixed count keeps: max(1, round(fraction * num_patches))."""
  return max(1, round(fraction * num_patches))


def erode_patches(visible: jax.Array, times: int) -> jax.Array:
  """`visible` [B, h, w] bool without, `times` times over, each visible patch that has a hidden
  4-neighbour; outside the image counts as visible, so the border alone erodes nothing."""
  for _ in range(times):
    v = jnp.pad(visible, ((0, 0), (1, 1), (1, 1)), constant_values=True)
    visible = visible & v[:, :-2, 1:-1] & v[:, 2:, 1:-1] & v[:, 1:-1, :-2] & v[:, 1:-1, 2:]
  return visible


def top_patches(priority: jax.Array, k: int) -> jax.Array:
  """bool [B, h, w]: the `k` patches of highest `priority` [B, h, w] in each image (ties: the
  first in raster order)."""
  b = priority.shape[0]
  _, index = jax.lax.top_k(priority.reshape(b, -1), k)
  chosen = jnp.zeros((b, priority[0].size), bool).at[jnp.arange(b)[:, None], index].set(True)
  return chosen.reshape(priority.shape)


@struct.dataclass
class IFAMOutput:
  """What one forward pass returns. Maps and logits are channels-last, background last."""

  logits: jax.Array | None  # [B, C] stage-2 logits (the model's prediction); None if not run
  stage1_logits: jax.Array  # [B, C] mean of the foreground part scores (see Intervention)
  part_scores: jax.Array  # [B, K, C]
  part_maps: jax.Array  # [B, h, w, K+1] soft maps A (Gumbel softmax while training; edited)
  part_logits: jax.Array  # [B, h, w, K+1] -distance logits (after any intervention)
  part_similarity: jax.Array  # [B, h, w, K+1] <F, W_k>, what 'dot_product' thresholds compare
  part_features: jax.Array  # [B, K+1, D] modulated pooled features
  # [B, h, w] in {0, 1}, what stage 2 read (after the remedies), or the explicit one; the
  # surrogate gradient if on.
  fg_mask: jax.Array
  fg_prob: jax.Array  # [B, h, w] max over kept foreground parts (the soft mask)


@dataclasses.dataclass(frozen=True)
class Intervention:
  """Test-time edits of the foreground mask.

  remove_parts: foreground parts whose tokens become background (leave-one-out).
  thresholds: one value per foreground part. Rule 'distance': a token farther than tau_k from
    its assigned prototype k becomes background (the paper). Rule 'dot_product': the reference's
    calibration script, which replaces all logits by <F, W_k> and drops part k at tokens where
    <F, W_k> < tau_k (the token then falls to its next best channel).
  part_removal: what the removal edits. 'reference': as the reference, only the mask; stage 1 is
    scored on the maps before the removal (after any thresholds) and the soft mask is the kept
    parts' original probabilities. 'renormalise': stage 1 is scored on the edited, renormalised
    maps, and the soft mask is read from them (zero at the removed part's tokens).
  """

  remove_parts: tuple[int, ...] = ()
  thresholds: tuple[float, ...] | None = None
  threshold_rule: ThresholdRule = 'distance'
  part_removal: PartRemoval = 'reference'


class IFAM(nnx.Module):
  """Two-stage iFAM model.

  Fidelity switches:
    stage2_mask: how the foreground mask reaches stage 2 (`stage2_mask_facts`). 'hard'
      reproduces the reference, where no stage-2 gradient reaches stage 1. 'straight_through'
      keeps the forward values bit for bit but lets the stage-2 loss train stage 1: the hard
      mask h gets the straight-through surrogate m = h + S - sg(S), with S the summed probability
      of the surviving foreground parts, and stage-2 attention passes to m the derivative of its
      multiplicative relaxation (see `vit.attention_with_mask_gradient`), which is non-zero at
      masked tokens too. 'soft', the paper's ablation: stage 2 reads the soft mask p_fg.
      'late', the late-masking baseline: the same hard mask pools stage 2's patch tokens.
    eval_gumbel_noise: False gives deterministic argmax maps and masks at eval; True samples
      them as the reference does.

  Mask remedies (all 0 = off, the reference), applied by `remedy_mask` in this order to the
  mask stage 2 reads and the forward returns, after any intervention, never to an explicit
  `fg_mask`; N_p is the number of patches and a patch's foreground score is what the hard mask
  thresholds, max over the kept foreground parts minus the background of the mask's draw:
    mask_erode: rounds of erosion; each removes every visible patch with a hidden 4-neighbour
      (the edge patches, which hold background pixels).
    mask_min_fraction f: a floor; the mask becomes its union with the max(1, round(f N_p))
      best-scoring patches, so it is never empty (also after erosion).
    mask_fixed_fraction f: stage 2 sees exactly the max(1, round(f N_p)) best-scoring patches,
      whatever the hard mask holds, so their number tells it nothing; excludes the two above.
    stage2_patch_dropout p: training only; each visible patch is hidden with probability p, so
      stage 2 cannot rely on any one patch. A non-empty mask keeps at least its best-scoring
      patch (a mask of m patches loses p - p**m / m of them on average), so the remedies above
      still never hand stage 2 an empty mask.
  With 'straight_through' the surrogate gradient rides on the remedied mask; 'soft' refuses them;
  with 'late' they edit the pooling mask.
  """

  def __init__(self, *, num_classes: int, num_parts: int, stage1: ViTConfig, stage2: ViTConfig,
               gumbel_tau: float = 1.0, part_dropout: float = 0.3,
               mask_part_dropout: float = 0.3, stage2_mask: MaskMode = 'hard',
               eval_gumbel_noise: bool = False, mask_min_fraction: float = 0.0,
               mask_erode: int = 0, mask_fixed_fraction: float = 0.0,
               stage2_patch_dropout: float = 0.0, rngs: nnx.Rngs):
    stage2_mask_facts(stage2_mask)
    check_mask_remedies(stage2_mask, mask_min_fraction, mask_erode, mask_fixed_fraction,
                        stage2_patch_dropout)
    if stage1.patch_size != stage2.patch_size:
      raise ValueError('both stages must use the same patch size to share the patch mask')
    self.num_parts = num_parts
    self.gumbel_tau = gumbel_tau
    self.part_dropout = part_dropout
    self.mask_part_dropout = mask_part_dropout
    self.stage2_mask = stage2_mask
    self.eval_gumbel_noise = eval_gumbel_noise
    self.mask_min_fraction = mask_min_fraction
    self.mask_erode = mask_erode
    self.mask_fixed_fraction = mask_fixed_fraction
    self.stage2_patch_dropout = stage2_patch_dropout
    self.stage1 = PartDiscovery(stage1, num_parts=num_parts, num_classes=num_classes, rngs=rngs)
    self.stage2 = ViTClassifier(stage2, num_classes=num_classes, rngs=rngs)

  # --------------------------------------------------------------------------
  def _noise_rngs(self, train: bool, rng: jax.Array | None) -> dict[int, jax.Array | None]:
    noisy = train or self.eval_gumbel_noise
    if noisy and rng is None:
      raise ValueError('an rng is required in training mode or with eval_gumbel_noise')
    keys = {tag: jax.random.fold_in(rng, tag) if noisy else None
            for tag in (RNG_MAP_NOISE, RNG_MASK_NOISE)}
    keys.update({tag: jax.random.fold_in(rng, tag) if train else None
                 for tag in (RNG_PART_DROPOUT, RNG_MASK_DROPOUT, RNG_STAGE2_PATCH_DROPOUT)})
    return keys

  def stage1_maps(self, images: jax.Array, *, train: bool,
                  rng: jax.Array | None = None) -> jax.Array:
    """Part maps A [B, h, w, K+1] alone (the equivariance pass needs nothing else)."""
    keys = self._noise_rngs(train, rng)
    logits, _ = self.stage1.part_logits(self.stage1.features(images))
    return gumbel_softmax(logits, self.gumbel_tau, keys[RNG_MAP_NOISE])

  def foreground_mask(self, logits: jax.Array, *, noise_rng: jax.Array | None,
                      dropout_rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Hard fg mask [B, h, w] (with the surrogate gradient if enabled) and the soft fg prob.

    An independent Gumbel draw, part dropout on the foreground channels (no rescale), the max
    over foreground parts against the background, hard argmax (ties go to foreground).
    """
    mask, fg_prob, _ = self._foreground_mask_and_score(logits, noise_rng, dropout_rng)
    return mask, fg_prob

  def _foreground_mask_and_score(self, logits: jax.Array, noise_rng: jax.Array | None,
                                 dropout_rng: jax.Array | None,
                                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`foreground_mask`, and the foreground score fg_prob - p_bg that the hard mask thresholds
    at 0 (the remedies' ranking of the patches)."""
    y = gumbel_softmax(logits, self.gumbel_tau, noise_rng)
    y_fg, y_bg = y[..., :self.num_parts], y[..., self.num_parts]
    if dropout_rng is not None and self.mask_part_dropout > 0:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - self.mask_part_dropout,
                                  (y.shape[0], 1, 1, self.num_parts))
      y_fg = jnp.where(keep, y_fg, 0.0)
    fg_prob = jnp.max(y_fg, axis=-1)
    mask = (fg_prob >= y_bg).astype(jnp.float32)
    if self.stage2_mask == 'straight_through':
      surrogate = jnp.sum(y_fg, axis=-1)
      mask = mask + (surrogate - jax.lax.stop_gradient(surrogate))
    return mask, fg_prob, fg_prob - y_bg

  def remedies_apply(self, train: bool) -> bool:
    """Whether `remedy_mask` changes anything in this mode (patch dropout trains only)."""
    return bool(self.mask_min_fraction or self.mask_erode or self.mask_fixed_fraction
                or (train and self.stage2_patch_dropout))

  def remedy_mask(self, mask: jax.Array, score: jax.Array, *,
                  dropout_rng: jax.Array | None) -> jax.Array:
    """The mask [B, h, w] stage 2 reads once the configured remedies (see `IFAM`) edit stage 1's
    `mask` (hard, or with the straight-through surrogate, whose gradient the result keeps).

    `score` [B, h, w] ranks the patches for the floor, the fixed count and the patch that
    dropout keeps; `dropout_rng` (None at eval) draws the patch dropout.
    """
    hard = jax.lax.stop_gradient(mask) > 0
    score = jax.lax.stop_gradient(score)
    num_patches = hard[0].size
    if self.mask_fixed_fraction:
      visible = top_patches(score, remedy_count(self.mask_fixed_fraction, num_patches))
    else:
      visible = erode_patches(hard, self.mask_erode)
      if self.mask_min_fraction:
        visible |= top_patches(score, remedy_count(self.mask_min_fraction, num_patches))
    if dropout_rng is not None and self.stage2_patch_dropout > 0:
      hidden = jax.random.bernoulli(dropout_rng, self.stage2_patch_dropout, visible.shape)
      kept = visible & ~hidden
      emptied = jnp.any(visible, axis=(1, 2)) & ~jnp.any(kept, axis=(1, 2))
      best = top_patches(jnp.where(visible, score, -jnp.inf), 1)
      visible = kept | (emptied[:, None, None] & best)
    remedied = visible.astype(mask.dtype)
    if self.stage2_mask == 'straight_through':
      remedied = remedied + (mask - jax.lax.stop_gradient(mask))
    return remedied

  def _intervened_score(self, unedited: jax.Array, mask: jax.Array, intervention: Intervention,
                        noise_rng: jax.Array | None) -> jax.Array:
    """The remedies' ranking after an intervention: the patches it keeps first, then the others,
    each group by the foreground score of the unedited maps over the parts it keeps (so patches
    that thresholds reject rank by how foreground they looked before)."""
    y = gumbel_softmax(unedited, self.gumbel_tau, noise_rng)
    removed = jnp.isin(jnp.arange(self.num_parts), jnp.asarray(intervention.remove_parts))
    score = jnp.max(jnp.where(removed, 0.0, y[..., :self.num_parts]), axis=-1)
    score = score - y[..., self.num_parts]
    return jnp.where(mask > 0, score, score - 3.0)  # scores lie in [-1, 1]

  def intervene(self, logits: jax.Array, similarity: jax.Array, intervention: Intervention,
                noise_rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Edited part logits and the fg mask they imply (argmax is a kept foreground part).

    The assignment a(u) is the argmax of the part maps (Gumbel-noised if eval noise is on, as the
    reference's leave-one-out does); rejected tokens lose all foreground channels, removed parts
    are -inf everywhere, so a rejected token is never re-assigned to another part.
    """
    k = self.num_parts
    if intervention.thresholds is not None and len(intervention.thresholds) != k:
      raise ValueError(f'expected {k} part thresholds, got {len(intervention.thresholds)}')
    if any(not 0 <= p < k for p in intervention.remove_parts):
      raise ValueError(f'remove_parts {intervention.remove_parts} outside 0..{k - 1}')
    if intervention.threshold_rule not in ('distance', 'dot_product'):
      raise ValueError(f'unknown threshold_rule {intervention.threshold_rule!r}')
    if intervention.part_removal not in PART_REMOVALS:
      raise ValueError(f'part_removal must be one of {PART_REMOVALS}, got '
                       f'{intervention.part_removal!r}')
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    use_dot = intervention.thresholds is not None and intervention.threshold_rule == 'dot_product'
    if use_dot:
      tau = jnp.asarray(intervention.thresholds + (-jnp.inf,), jnp.float32)
      logits = jnp.where(similarity >= tau, similarity, neg_inf)

    noisy = logits
    if noise_rng is not None:
      noisy = logits + jax.random.gumbel(noise_rng, logits.shape, jnp.float32)
    assigned = jnp.argmax(noisy, axis=-1)  # argmax of the maps = argmax of noisy logits
    rejected = jnp.zeros(assigned.shape, bool)
    if intervention.remove_parts:
      rejected |= jnp.isin(assigned, jnp.asarray(intervention.remove_parts))
    if intervention.thresholds is not None and not use_dot:
      tau = jnp.asarray(intervention.thresholds + (jnp.inf,), jnp.float32)
      distance = -jnp.take_along_axis(logits, assigned[..., None], axis=-1)[..., 0]
      rejected |= distance > tau[assigned]
    channel = jnp.arange(k + 1)
    drop = (channel < k) & rejected[..., None]
    if intervention.remove_parts:
      drop |= jnp.isin(channel, jnp.asarray(intervention.remove_parts))
    logits = jnp.where(drop, neg_inf, logits)
    mask = ((assigned < k) & ~rejected).astype(jnp.float32)
    return logits, mask

  def __call__(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None,
               intervention: Intervention | None = None,
               keep_count: int | None = None, run_stage2: bool = True,
               fg_mask: jax.Array | None = None) -> IFAMOutput:
    """Both stages on normalised NHWC images.

    Args:
      images: [B, H, W, 3], normalised.
      train: Gumbel noise and part dropout on (the reference's training mode).
      rng: required when training or when `eval_gumbel_noise` is set.
      intervention: eval-only edits of the mask (see `Intervention`).
      keep_count: eval-only token gather: stage 2 runs on this many patch tokens, foreground
        first. Exact when it is >= the largest foreground count in the batch. Not with
        stage2_mask='late', whose stage 2 sees every patch.
      run_stage2: False leaves `logits` None, for a caller that runs stage 2 on the returned
        `fg_mask` itself (`packed_stage2.packed_stage2`).
      fg_mask: an explicit foreground mask [B, h, w] for stage 2 in place of stage 1's (oracle
        masks, forced densities): {0, 1}, or probabilities with `stage2_mask='soft'`. Stage 1
        still runs for its maps and logits; the output's `fg_mask` (`fg_prob` when soft) is this
        mask, read by stage 2 as given (no surrogate gradient, no remedy is added).
    """
    if train and (intervention is not None or keep_count is not None):
      raise ValueError('interventions and token gather are eval-only')
    if fg_mask is not None and intervention is not None:
      raise ValueError('fg_mask replaces the mask that an intervention edits; pass one of them')
    keys = self._noise_rngs(train, rng)
    features = self.stage1.features(images)
    logits, similarity = self.stage1.part_logits(features)

    if intervention is not None:
      unedited = logits
      logits, fg_mask = self.intervene(unedited, similarity, intervention, keys[RNG_MAP_NOISE])
      maps = scored = gumbel_softmax(logits, self.gumbel_tau, keys[RNG_MAP_NOISE])
      fg_maps = maps[..., :self.num_parts]
      if intervention.remove_parts and intervention.part_removal == 'reference':
        # The reference scores stage 1 first, then removes the parts from the mask alone.
        kept_all = dataclasses.replace(intervention, remove_parts=())
        before, _ = self.intervene(unedited, similarity, kept_all, keys[RNG_MAP_NOISE])
        scored = gumbel_softmax(before, self.gumbel_tau, keys[RNG_MAP_NOISE])
        removed = jnp.isin(jnp.arange(self.num_parts), jnp.asarray(intervention.remove_parts))
        fg_maps = jnp.where(removed, 0.0, scored[..., :self.num_parts])
      fg_prob = jnp.max(fg_maps, axis=-1)
      if self.remedies_apply(train):
        score = self._intervened_score(unedited, fg_mask, intervention, keys[RNG_MAP_NOISE])
        fg_mask = self.remedy_mask(fg_mask, score, dropout_rng=None)
    else:
      maps = scored = gumbel_softmax(logits, self.gumbel_tau, keys[RNG_MAP_NOISE])
      derived, fg_prob, score = self._foreground_mask_and_score(
          logits, keys[RNG_MASK_NOISE], keys[RNG_MASK_DROPOUT])
      if fg_mask is None:
        fg_mask = derived
        if self.remedies_apply(train):
          fg_mask = self.remedy_mask(derived, score,
                                     dropout_rng=keys[RNG_STAGE2_PATCH_DROPOUT])
      elif fg_mask.shape != derived.shape:
        raise ValueError(f'fg_mask has shape {fg_mask.shape}; stage 1 gives masks of shape '
                         f'{derived.shape} ([B, h, w] patches)')
      elif self.stage2_mask == 'soft':
        fg_mask, fg_prob = derived, fg_mask

    part_features, part_scores = self.stage1.classify(
        scored, features, part_dropout=self.part_dropout, rng=keys[RNG_PART_DROPOUT])

    stage2_logits = None
    if run_stage2:
      binary = stage2_mask_facts(self.stage2_mask).binary
      patch_mask = (fg_mask if binary else fg_prob).reshape(images.shape[0], -1)
      keep_index = None if keep_count is None else gather_patches(patch_mask, keep_count)
      stage2_logits = self.stage2(images, patch_mask, mask_mode=self.stage2_mask,
                                  keep_index=keep_index)

    return IFAMOutput(
        logits=stage2_logits,
        stage1_logits=jnp.mean(part_scores, axis=1),
        part_scores=part_scores,
        part_maps=maps,
        part_logits=logits,
        part_similarity=similarity,
        part_features=part_features,
        fg_mask=fg_mask,
        fg_prob=fg_prob,
    )
