"""The mask remedies (`IFAM.remedy_mask`): floor, erosion, fixed count and stage-2 patch dropout,
against masks computed by hand with numpy; their wiring into the forward, interventions,
straight-through gradients, packing and the config; and that, all off, the forward is the
reference's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ifam_jax import config_lib, factory, losses, packed_stage2
from ifam_jax.models import ifam, vit

IMAGE, PATCH, NUM_CLASSES = 56, 14, 5  # a 4x4 patch grid


def tiny_ifam(num_parts=2, stage2_mask='hard', **remedies):
  cfg = vit.vit_config('S/14', width=32, depth=2, num_heads=2, mlp_hidden=64, image_size=IMAGE,
                       dtype=jnp.float32, attention='xla')
  return ifam.IFAM(num_classes=NUM_CLASSES, num_parts=num_parts, stage1=cfg, stage2=cfg,
                   stage2_mask=stage2_mask, rngs=nnx.Rngs(0), **remedies)


def mask_editor(**remedies):
  """The model without materialised weights: enough for `foreground_mask` and `remedy_mask`."""
  return nnx.eval_shape(lambda: tiny_ifam(**remedies))


def images(seed=1, batch=3):
  return jax.random.normal(jax.random.key(seed), (batch, IMAGE, IMAGE, 3))


def patch_pixels(mask):
  """[B, 4, 4] patch mask -> [B, H, W, 1] pixel mask."""
  return np.repeat(np.repeat(np.asarray(mask), PATCH, axis=1), PATCH, axis=2)[..., None]


# ----------------------------------------------------------------------------
# By hand
# ----------------------------------------------------------------------------
def np_erode(mask, times):
  """Erosion by loops: a visible patch survives if each in-image 4-neighbour is visible."""
  mask = np.asarray(mask, bool)
  for _ in range(times):
    out = mask.copy()
    for b, i, j in zip(*np.nonzero(mask)):
      for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        y, x = i + di, j + dj
        if 0 <= y < mask.shape[1] and 0 <= x < mask.shape[2] and not mask[b, y, x]:
          out[b, i, j] = False
    mask = out
  return mask


def np_top(score, k):
  """The k highest-scoring patches of each image (scores without ties)."""
  flat = np.asarray(score).reshape(len(score), -1)
  out = np.zeros(flat.shape, bool)
  for b, row in enumerate(flat):
    out[b, np.argsort(-row, kind='stable')[:k]] = True
  return out.reshape(np.shape(score))


def np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_score(part_logits, num_parts, removed=()):
  """max over kept foreground parts minus background, of the noiseless maps (tau = 1)."""
  y = np_softmax(np.asarray(part_logits, np.float64))
  kept = [k for k in range(num_parts) if k not in removed]
  fg = y[..., kept].max(-1) if kept else np.zeros(y.shape[:-1])
  return fg - y[..., num_parts]


def distinct_scores(shape, seed=0):
  """Scores in [-1, 1) without ties, in random order."""
  n = int(np.prod(shape))
  return (np.random.default_rng(seed).permutation(n).reshape(shape) / n * 2 - 1).astype(
      np.float32)


# ----------------------------------------------------------------------------
# Each remedy on chosen masks
# ----------------------------------------------------------------------------
def test_erosion_by_hand_and_the_border_rule():
  m = np.zeros((1, 5, 5), bool)
  m[0, :3, :] = True  # three full rows at the top border
  m[0, 4, 4] = True  # a lone corner patch
  once = np.zeros((1, 5, 5), bool)
  once[0, :2, :] = True  # the image's border hides nothing: the top two rows stay whole
  np.testing.assert_array_equal(ifam.erode_patches(jnp.asarray(m), 1), once)
  twice = np.zeros((1, 5, 5), bool)
  twice[0, 0, :] = True
  np.testing.assert_array_equal(ifam.erode_patches(jnp.asarray(m), 2), twice)
  np.testing.assert_array_equal(ifam.erode_patches(jnp.ones((1, 5, 5), bool), 3), np.ones_like(m))
  np.testing.assert_array_equal(ifam.erode_patches(jnp.asarray(m), 0), m)

  rng = np.random.default_rng(0)
  masks = rng.random((40, 5, 5)) < rng.uniform(0.3, 0.95, (40, 1, 1))
  for times in (1, 2):
    np.testing.assert_array_equal(ifam.erode_patches(jnp.asarray(masks), times),
                                  np_erode(masks, times))


def test_floor_fills_an_empty_mask_with_the_best_scoring_patches():
  """On logits chosen so that the background wins everywhere: the floor is the k best patches
  by max(fg) - bg, and a mask with patches below the top k keeps them (a union)."""
  model = mask_editor(mask_min_fraction=0.2)  # k = round(0.2 * 16) = 3
  rng = np.random.default_rng(0)
  logits = np.zeros((2, 4, 4, 3), np.float32)
  logits[..., :2] = rng.uniform(-6.0, -1.0, (2, 4, 4, 2))
  mask, _ = model.foreground_mask(jnp.asarray(logits), noise_rng=None, dropout_rng=None)
  assert not np.asarray(mask).any()
  score = np_score(logits, 2)
  got = model.remedy_mask(mask, jnp.asarray(score, jnp.float32), dropout_rng=None)
  np.testing.assert_array_equal(got, np_top(score, 3))
  assert ifam.remedy_count(0.2, 16) == 3 and ifam.remedy_count(0.01, 16) == 1

  # A hard mask of two patches that rank last: the union holds them and the top three.
  hard = np.zeros((2, 4, 4), np.float32)
  hard[:, 3, 3] = hard[:, 0, 0] = 1.0
  score = distinct_scores((2, 4, 4))
  score[:, 3, 3], score[:, 0, 0] = -1.5, -1.6
  got = model.remedy_mask(jnp.asarray(hard), jnp.asarray(score), dropout_rng=None)
  np.testing.assert_array_equal(got, np_top(score, 3) | (hard > 0))


def test_erosion_then_floor_never_empties_the_mask():
  model = mask_editor(mask_erode=1, mask_min_fraction=0.1)  # k = round(1.6) = 2
  rng = np.random.default_rng(1)
  hard = (rng.random((60, 4, 4)) < rng.uniform(0.0, 1.0, (60, 1, 1))).astype(np.float32)
  hard[0] = 0.0  # empty
  hard[1] = 0.0
  hard[1, 1, 1:3] = 1.0  # a thin line, eroded away
  hard[2] = 1.0  # full: the border erodes nothing
  score = distinct_scores((60, 4, 4), seed=2)
  got = np.asarray(model.remedy_mask(jnp.asarray(hard), jnp.asarray(score), dropout_rng=None))
  np.testing.assert_array_equal(got, np_erode(hard, 1) | np_top(score, 2))
  assert got.reshape(60, -1).sum(1).min() >= 2
  assert got[2].all()


def test_fixed_count_is_exactly_k_whatever_the_hard_mask_holds():
  model = mask_editor(mask_fixed_fraction=0.3)  # k = round(4.8) = 5
  score = distinct_scores((4, 4, 4), seed=3)
  expected = np_top(score, 5)
  for hard in (np.zeros((4, 4, 4)), np.ones((4, 4, 4)),
               (np.random.default_rng(4).random((4, 4, 4)) < 0.5)):
    got = model.remedy_mask(jnp.asarray(hard, jnp.float32), jnp.asarray(score),
                            dropout_rng=None)
    np.testing.assert_array_equal(got, expected)
  assert set(np.asarray(got).reshape(4, -1).sum(1)) == {5}


def test_patch_dropout_rate_keeps_a_patch_and_is_off_at_eval():
  p = 0.3
  model = mask_editor(stage2_patch_dropout=p)
  score = distinct_scores((500, 4, 4), seed=5)
  full = jnp.ones((500, 4, 4))
  got = np.asarray(model.remedy_mask(full, jnp.asarray(score), dropout_rng=jax.random.key(0)))
  # 8000 patches: the standard error of the hidden fraction is 0.005.
  assert abs((1 - got.mean()) - p) < 0.02
  assert np.array_equal(model.remedy_mask(full, jnp.asarray(score), dropout_rng=None), full)

  # Two visible patches at p = 0.5: both hidden a quarter of the time, then the better one stays:
  # p - p**2 / 2 = 0.375 of them hidden on average (0.5 without that rule; s.e. here 0.01).
  model = mask_editor(stage2_patch_dropout=0.5)
  two = np.zeros((500, 4, 4), np.float32)
  two[:, 1, 1] = two[:, 2, 3] = 1.0
  score[:, 1, 1], score[:, 2, 3] = 0.9, 0.5
  got = np.asarray(model.remedy_mask(jnp.asarray(two), jnp.asarray(score),
                                     dropout_rng=jax.random.key(1)))
  assert not (got * (1 - two)).any()
  counts = got.reshape(500, -1).sum(1)
  assert counts.min() == 1 and abs(1 - counts.mean() / 2 - 0.375) < 0.04
  singles = got[counts == 1]  # the better patch: left by chance (1/4) or kept (1/4); else 1/4
  assert singles[:, 1, 1].sum() > 1.5 * singles[:, 2, 3].sum()
  empty = np.zeros((3, 4, 4), np.float32)
  np.testing.assert_array_equal(
      model.remedy_mask(jnp.asarray(empty), jnp.asarray(score[:3]),
                        dropout_rng=jax.random.key(2)), empty)


def test_patch_dropout_forward_hides_patches_from_stage2_in_training_only():
  """Train: the forward's `fg_mask` is what stage 2 read, some patches of the fixed count are
  hidden, and a hidden patch's pixels leave the logits bitwise unchanged. Eval: the model
  without dropout, bit for bit."""
  x, rng = images(), jax.random.key(7)
  model = tiny_ifam(mask_fixed_fraction=0.5, stage2_patch_dropout=0.5)
  plain = tiny_ifam(mask_fixed_fraction=0.5)
  for name in ('logits', 'fg_mask', 'part_maps'):
    np.testing.assert_array_equal(getattr(model(x, train=False), name),
                                  getattr(plain(x, train=False), name), err_msg=name)

  out, before = model(x, train=True, rng=rng), plain(x, train=True, rng=rng)
  np.testing.assert_array_equal(out.part_maps, before.part_maps)  # the same stage-1 draws
  mask, full = np.asarray(out.fg_mask), np.asarray(before.fg_mask)
  assert set(full.reshape(3, -1).sum(1)) == {8}
  assert not (mask * (1 - full)).any() and mask.sum() < full.sum()
  b, i, j = (int(v) for v in np.argwhere(full - mask > 0)[0])
  hidden = np.zeros_like(mask)
  hidden[b, i, j] = 1.0
  noise = 100.0 * jax.random.normal(jax.random.key(99), x.shape)
  changed = jnp.where(patch_pixels(hidden) > 0, noise, x)
  stage2 = lambda pixels: np.asarray(model.stage2(pixels, jnp.asarray(mask).reshape(3, -1)))
  np.testing.assert_array_equal(stage2(x), out.logits)
  np.testing.assert_array_equal(stage2(changed), out.logits)
  shown = jnp.where(patch_pixels(mask * (np.arange(3) == b)[:, None, None]) > 0, noise, x)
  assert np.abs(stage2(shown)[b] - out.logits[b]).max() > 0


# ----------------------------------------------------------------------------
# In the forward
# ----------------------------------------------------------------------------
def without_foreground(model):
  """Moves the foreground prototypes away, so that at eval stage 1's hard mask is empty."""
  model.stage1.prototypes[...] = model.stage1.prototypes[...].at[:-1].add(0.7)
  return model


def test_forward_floor_and_fixed_count_against_numpy():
  x = images()
  for remedies, k in ((dict(mask_min_fraction=0.2), 3), (dict(mask_fixed_fraction=0.4), 6)):
    model = without_foreground(tiny_ifam(**remedies))
    off = without_foreground(tiny_ifam())(x, train=False)
    assert not np.asarray(off.fg_mask).any()
    out = model(x, train=False)
    np.testing.assert_array_equal(out.part_logits, off.part_logits)
    score = np_score(out.part_logits, 2)
    assert (score < 0).all()
    np.testing.assert_array_equal(out.fg_mask, np_top(score, k))
    np.testing.assert_array_equal(out.fg_prob, off.fg_prob)
    direct = model.stage2(x, out.fg_mask.reshape(3, -1))
    np.testing.assert_array_equal(out.logits, direct)


def test_remedies_apply_after_interventions():
  """Removing both parts empties the mask: the floor then takes the patches least background;
  thresholds that reject every token: those the unedited maps score best; removing one part,
  the floor and the fixed count rank the patches the intervention keeps first."""
  x = images()
  model = tiny_ifam(mask_min_fraction=0.3)  # k = 5
  plain = tiny_ifam()
  unedited = plain(x, train=False).part_logits
  none_left = ifam.Intervention(remove_parts=(0, 1))
  assert not np.asarray(plain(x, train=False, intervention=none_left).fg_mask).any()
  got = model(x, train=False, intervention=none_left).fg_mask
  np.testing.assert_array_equal(got, np_top(np_score(unedited, 2, removed=(0, 1)), 5))

  every_token_rejected = ifam.Intervention(thresholds=(-1.0, -1.0))  # distances are >= 0
  assert not np.asarray(plain(x, train=False, intervention=every_token_rejected).fg_mask).any()
  got = model(x, train=False, intervention=every_token_rejected).fg_mask
  np.testing.assert_array_equal(got, np_top(np_score(unedited, 2), 5))

  one_left = ifam.Intervention(remove_parts=(0,))
  hard = np.asarray(plain(x, train=False, intervention=one_left).fg_mask) > 0
  score = np_score(unedited, 2, removed=(0,))
  priority = np.where(hard, score, score - 3.0)
  got = np.asarray(model(x, train=False, intervention=one_left).fg_mask)
  np.testing.assert_array_equal(got, hard | np_top(priority, 5))
  # A fixed count of 4 keeps the patches left first, though others score higher.
  fixed = tiny_ifam(mask_fixed_fraction=0.25)
  got = np.asarray(fixed(x, train=False, intervention=one_left).fg_mask) > 0
  np.testing.assert_array_equal(got, np_top(priority, 4))
  few = hard.reshape(3, -1).sum(1) <= 4
  assert few.any() and not (hard[few] & ~got[few]).any()


def test_an_explicit_mask_is_not_remedied():
  model = tiny_ifam(mask_min_fraction=0.3, mask_erode=1)
  x, given = images(), jnp.zeros((3, 4, 4)).at[:, 1:3, 1:3].set(1.0)
  out = model(x, train=False, fg_mask=given)
  np.testing.assert_array_equal(out.fg_mask, given)
  np.testing.assert_array_equal(out.logits, model.stage2(x, given.reshape(3, -1)))


def test_late_mask_pools_under_the_remedied_mask():
  model = without_foreground(tiny_ifam(stage2_mask='late', mask_min_fraction=0.2))
  x = images()
  out = model(x, train=False)
  np.testing.assert_array_equal(out.fg_mask, np_top(np_score(out.part_logits, 2), 3))
  np.testing.assert_array_equal(
      out.logits, model.stage2(x, out.fg_mask.reshape(3, -1), mask_mode='late'))


@pytest.mark.parametrize('stage2_mask', ['hard', 'straight_through', 'late'])
def test_all_off_is_the_reference_forward(stage2_mask):
  """With every remedy at 0 (as built from base_config) the forward is the reference's
  composition of stage 1, `foreground_mask` and stage 2, bit for bit, in training and at eval;
  `foreground_mask` is the hard argmax of the maps (numpy)."""
  model = tiny_ifam(stage2_mask=stage2_mask,
                    **{k: config_lib.base_config().model[k] for k in
                       ('mask_min_fraction', 'mask_erode', 'mask_fixed_fraction',
                        'stage2_patch_dropout')})
  x, rng = images(), jax.random.key(3)
  for train in (False, True):
    out = model(x, train=train, rng=rng)
    keys = {tag: jax.random.fold_in(rng, tag) if train else None for tag in range(4)}
    features = model.stage1.features(x)
    logits, _ = model.stage1.part_logits(features)
    mask, fg_prob = model.foreground_mask(logits, noise_rng=keys[ifam.RNG_MASK_NOISE],
                                          dropout_rng=keys[ifam.RNG_MASK_DROPOUT])
    want = model.stage2(x, mask.reshape(3, -1), mask_mode=stage2_mask)
    np.testing.assert_array_equal(out.fg_mask, mask)
    np.testing.assert_array_equal(out.fg_prob, fg_prob)
    np.testing.assert_array_equal(out.logits, want)
  eval_out = model(x, train=False)
  np.testing.assert_array_equal(eval_out.fg_mask, np_score(eval_out.part_logits, 2) >= 0)


# ----------------------------------------------------------------------------
# Gradients, packing, settings
# ----------------------------------------------------------------------------
def test_straight_through_surrogate_rides_on_the_remedied_mask():
  """The values are the remedied hard mask; the gradient of <w, mask> w.r.t. the part logits is
  the surrogate's, that of <w, 1 - p_bg> (by hand: w p_bg (p_j - [j = bg])); none when hard."""
  remedies = dict(mask_erode=1, mask_min_fraction=0.3, stage2_patch_dropout=0.3)
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(0.0, 2.0, (3, 4, 4, 3)), jnp.float32)
  w = rng.normal(size=(3, 4, 4))
  for stage2_mask in ('hard', 'straight_through'):
    model = mask_editor(stage2_mask=stage2_mask, **remedies)

    def remedied(part_logits):
      mask, _, score = model._foreground_mask_and_score(part_logits, None, None)
      return model.remedy_mask(mask, score, dropout_rng=jax.random.key(0))

    mask = np.asarray(remedied(logits))
    score = np_score(logits, 2)
    floor = np_erode(score >= 0, 1) | np_top(score, 5)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert not (mask * (1 - floor)).any() and mask.reshape(3, -1).sum(1).min() >= 1
    grad = np.asarray(jax.grad(lambda z: jnp.sum(w * remedied(z)))(logits))
    if stage2_mask == 'hard':
      assert not grad.any()
    else:
      p = np_softmax(np.asarray(logits, np.float64))
      want = (w * p[..., 2])[..., None] * (p - np.eye(3)[2])
      np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)


def test_token_gather_under_remedies_matches_the_dense_eval():
  """What packing rests on: stage 2 on the remedied mask's visible tokens gathered first."""
  model = tiny_ifam(mask_erode=1, mask_min_fraction=0.2)
  x = images()
  dense = model(x, train=False)
  count = int(np.asarray(dense.fg_mask).reshape(3, -1).sum(1).max())
  gathered = model(x, train=False, keep_count=count)
  np.testing.assert_allclose(gathered.logits, dense.logits, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_straight_through_remedies_train_stage1():
  """The stage-2 loss of the whole forward, with every remedy that edits a training mask on,
  reaches stage 1's prototypes."""
  model = tiny_ifam(stage2_mask='straight_through', mask_erode=1, mask_min_fraction=0.3,
                    stage2_patch_dropout=0.3)
  x, labels = images(), jnp.array([0, 1, 2])

  def loss(m):
    out = m(x, train=True, rng=jax.random.key(3))
    return losses.cross_entropy(out.logits, labels)

  grads = nnx.grad(loss)(model)
  assert np.abs(np.asarray(grads['stage1']['prototypes'][...])).max() > 0


@pytest.mark.slow
def test_packed_stage2_matches_the_dense_forward_under_remedies():
  """Stage 2 packed on the training forward's remedied mask (dropout included), as the train
  step runs it, gives the dense forward's loss and gradient."""
  model = tiny_ifam(mask_erode=1, mask_min_fraction=0.2, stage2_patch_dropout=0.3)
  x, rng = images(batch=4), jax.random.key(11)
  labels, valid = jnp.array([0, 1, 2, 3]), jnp.ones((4,))
  dense = model(x, train=True, rng=rng)
  mask = model(x, train=True, rng=rng, run_stage2=False).fg_mask.reshape(4, -1)
  np.testing.assert_array_equal(mask, dense.fg_mask.reshape(4, -1))
  graphdef, params = nnx.split(model.stage2)

  def stage2_loss(params, images, patch_mask, keep_index, labels, valid, denominator):
    logits = nnx.merge(graphdef, params)(images, patch_mask, keep_index=keep_index)
    nll = losses.negative_log_likelihood(logits, labels)
    return jnp.sum(nll * valid) / denominator, logits

  capacities = packed_stage2.stage2_capacities((0.0, 0.5), 16)
  loss, grads, metrics = packed_stage2.packed_stage2(
      stage2_loss, params, x, mask, labels, valid, capacities=capacities, groups=2, shards=1)
  everything = jnp.broadcast_to(jnp.arange(16), (4, 16))
  (want, logits), want_grads = jax.value_and_grad(stage2_loss, has_aux=True)(
      params, x, mask, everything, labels, valid, 4.0)
  np.testing.assert_array_equal(logits, dense.logits)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  assert metrics['stage2_tokens'] < 1
  cfg = config_lib.base_config().model
  cfg.update(mask_erode=1, mask_min_fraction=0.2, stage2_patch_dropout=0.3,
             stage2_token_tiers=(0.5,))
  assert packed_stage2.packing_applies(cfg)


@pytest.mark.parametrize('settings,match', [
    (dict(mask_min_fraction=1.0), r'model.mask_min_fraction must be in \[0, 1\), got 1.0'),
    (dict(mask_fixed_fraction=-0.1), 'model.mask_fixed_fraction must be in'),
    (dict(stage2_patch_dropout=1.5), 'model.stage2_patch_dropout must be in'),
    (dict(mask_erode=-1), 'model.mask_erode must be an integer >= 0, got -1'),
    (dict(mask_erode=1.0), 'model.mask_erode must be an integer'),
    (dict(mask_fixed_fraction=0.1, mask_min_fraction=0.05), 'set them to 0 with it'),
    (dict(mask_fixed_fraction=0.1, mask_erode=1), 'set them to 0 with it'),
    (dict(stage2_mask='soft', mask_min_fraction=0.05), "stage2_mask='soft'"),
    (dict(stage2_mask='soft', stage2_patch_dropout=0.1), "stage2_mask='soft'"),
])
def test_bad_remedy_settings_are_refused_at_construction(settings, match):
  with pytest.raises(ValueError, match=match):
    tiny_ifam(**settings)


def test_the_config_reaches_the_model():
  c = config_lib.base_config()
  c.model.update(variant='S/14', image_size=IMAGE, vit_overrides=dict(width=32, depth=1,
                                                                      num_heads=2, mlp_hidden=64))
  c.model.update(mask_erode=2, mask_min_fraction=0.1, stage2_patch_dropout=0.2)
  model = factory.abstract_model(c.model, 3)
  assert (model.mask_erode, model.mask_min_fraction, model.mask_fixed_fraction,
          model.stage2_patch_dropout) == (2, 0.1, 0.0, 0.2)
  c.model.update(kind='pdiscoformer', mask_erode=0, mask_min_fraction=0.0,
                 mask_fixed_fraction=0.25)
  assert factory.abstract_model(c.model, 3).mask_fixed_fraction == 0.25
  c.model.update(kind='ifam', stage2_mask='soft')
  with pytest.raises(ValueError, match="stage2_mask='soft'"):
    factory.abstract_model(c.model, 3)
