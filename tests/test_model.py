"""The two-stage model: faithfulness, token gather, gradient routing, stage-1 maths, interventions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ifam_jax import losses
from ifam_jax.models import fast_attention, ifam, vit

IMAGE = 56  # 4x4 patch grid
PATCH = 14
NUM_CLASSES = 5


def tiny_vit(dtype=jnp.float32, **kw):
  return vit.vit_config('S/14', width=32, depth=2, num_heads=2, mlp_hidden=64, image_size=IMAGE,
                        dtype=dtype, **kw)


def tiny_ifam(dtype=jnp.float32, num_parts=2, seed=0, attention='xla', **kw):
  cfg = tiny_vit(dtype, attention=attention)
  return ifam.IFAM(num_classes=NUM_CLASSES, num_parts=num_parts, stage1=cfg, stage2=cfg,
                   rngs=nnx.Rngs(seed), **kw)


def images(seed=1, batch=3):
  return jax.random.normal(jax.random.key(seed), (batch, IMAGE, IMAGE, 3))


def patch_pixels(mask_flat: np.ndarray) -> np.ndarray:
  """[B, h*w] patch mask -> [B, H, W, 1] pixel mask."""
  grid = IMAGE // PATCH
  m = mask_flat.reshape(-1, grid, grid)
  return np.repeat(np.repeat(m, PATCH, axis=1), PATCH, axis=2)[..., None]


def mixed_mask(batch=3, seed=0):
  """A hard mask with both visible and masked patches in every row (one row nearly empty)."""
  rng = np.random.default_rng(seed)
  m = (rng.random((batch, (IMAGE // PATCH)**2)) < 0.5).astype(np.float32)
  m[:, 0], m[:, 1] = 1.0, 0.0
  m[-1, 2:] = 0.0
  return m


# ----------------------------------------------------------------------------
# ViT basics
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_variants_and_shapes():
  for variant, (width, depth, heads) in {'S/14': (384, 12, 6), 'B/14': (768, 12, 12),
                                         'L/14': (1024, 24, 16), 'g/14': (1536, 40, 24),
                                         'B/16': (768, 12, 12)}.items():
    cfg = vit.vit_config(variant)
    assert (cfg.width, cfg.depth, cfg.num_heads) == (width, depth, heads)
  assert vit.vit_config('g/14').mlp == 'swiglu'
  assert vit.vit_config('B/16').patch_size == 16
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit.vit_config('H/14')
  with pytest.raises(ValueError, match='not divisible'):
    vit.vit_config('B/14', image_size=225)

  model = vit.VisionTransformer(tiny_vit(num_registers=3), rngs=nnx.Rngs(0))
  out = model(images(batch=2))
  assert out['cls'].shape == (2, 32)
  assert out['registers'].shape == (2, 3, 32)
  assert out['patches'].shape == (2, 16, 32)
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    model(jnp.zeros((1, 50, 56, 3)))
  # Another resolution resamples the position embeddings on the fly.
  assert model(jnp.zeros((1, 70, 84, 3)))['patches'].shape == (1, 30, 32)


def test_swiglu_mlp_matches_numpy():
  cfg = vit.vit_config('g/14', width=8, num_heads=2, mlp_hidden=6, image_size=28)
  mlp = vit.Mlp(cfg, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
  h = x @ np.asarray(mlp.fc1.kernel[...]) + np.asarray(mlp.fc1.bias[...])
  gate, value = h[:, :6], h[:, 6:]
  expected = (gate / (1 + np.exp(-gate)) * value) @ np.asarray(mlp.fc2.kernel[...])
  expected += np.asarray(mlp.fc2.bias[...])
  np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['fp32', 'bf16'])
def test_lean_layer_norm_and_gelu_match_autodiff(dtype):
  """Same values as nnx.LayerNorm / jax.nn.gelu; gradients equal autodiff's (fp32: to rounding)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(3 * rng.normal(size=(3, 5, 16)), dtype)
  g = jnp.asarray(rng.normal(size=x.shape), dtype)
  lean = fast_attention.LeanLayerNorm(16, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                                      rngs=nnx.Rngs(0))
  lean.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  lean.bias[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  plain = nnx.LayerNorm(16, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  nnx.update(plain, nnx.state(lean))

  def loss(norm, x):
    return jnp.sum(norm(x).astype(jnp.float32) * g.astype(jnp.float32))

  np.testing.assert_array_equal(lean(x), plain(x))
  x64 = np.asarray(x, np.float64)
  erf = np.vectorize(math.erf)
  expected = (x64 * 0.5 * (1 + erf(x64 / math.sqrt(2)))).astype(np.float32)
  one_ulp = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2**-7, atol=1e-3)
  np.testing.assert_allclose(np.asarray(fast_attention.gelu(x), np.float32), expected, **one_ulp)
  (d_lean, dx_lean), (d_plain, dx_plain) = (nnx.grad(loss, argnums=(0, 1))(m, x)
                                            for m in (lean, plain))
  dgelu = [jax.grad(lambda a, f=f: jnp.sum(f(a).astype(jnp.float32) * g.astype(jnp.float32)))(x)
           for f in (fast_attention.gelu, lambda a: jax.nn.gelu(a, approximate=False))]
  # bf16: autodiff rounds every intermediate to bf16, the lean backward computes in fp32.
  tol = dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=0.1, rtol=0.02)
  np.testing.assert_allclose(np.asarray(dx_lean, np.float32), np.asarray(dx_plain, np.float32),
                             **tol)
  np.testing.assert_allclose(np.asarray(dgelu[0], np.float32), np.asarray(dgelu[1], np.float32),
                             **tol)
  for name in ('scale', 'bias'):
    np.testing.assert_allclose(getattr(d_lean, name)[...], getattr(d_plain, name)[...], **tol)


def _summed_axes(jaxpr):
  """(primitive, summed axes longer than 1) for each reduce_sum and dot_general, sub-jaxprs too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'reduce_sum':
      shape, axes = eqn.invars[0].aval.shape, eqn.params['axes']
      yield 'reduce_sum', sum(shape[a] > 1 for a in axes)
    elif eqn.primitive.name == 'dot_general':
      shape, axes = eqn.invars[0].aval.shape, eqn.params['dimension_numbers'][0][0]
      yield 'dot_general', sum(shape[a] > 1 for a in axes)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _summed_axes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _summed_axes(sub)


def test_block_gradients_sum_over_one_token_axis():
  """A block's backward sums over one axis at a time (the tokens as one [B*T, D] matrix).

  Summed over (B, T), XLA on GPUs laid stage 2's activations out batch-minor and transposed them
  around every matmul (8 % of the 224 px train step)."""
  cfg = vit.ViTConfig(width=16, depth=1, num_heads=2, mlp_hidden=32, image_size=28,
                      num_registers=1)
  graphdef, params = nnx.split(vit.Block(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  x = jax.random.normal(jax.random.key(0), (3, 6, 16))

  def backward(p, x, g):
    _, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), p, x)
    return vjp(g)

  summed = list(_summed_axes(jax.make_jaxpr(backward)(params, x, x).jaxpr))
  assert {'reduce_sum', 'dot_general'} <= {name for name, _ in summed}
  assert max(n for _, n in summed) == 1, summed


def test_resample_pos_embed_identity_and_shape():
  pe = jax.random.normal(jax.random.key(0), (1, 25, 8))
  assert vit.resample_pos_embed(pe, (5, 5)) is pe
  assert vit.resample_pos_embed(pe, (3, 4)).shape == (1, 12, 8)
  # A constant field stays constant under the (normalised) bicubic kernel.
  const = jnp.ones((1, 25, 8))
  np.testing.assert_allclose(vit.resample_pos_embed(const, (7, 7)), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------
# Faithfulness: stage 2 never sees a masked patch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('gather', [False, True], ids=['dense', 'gather'])
@pytest.mark.parametrize('stage2_mask,attention', [('hard', 'xla'), ('hard', 'flash'),
                                                   ('straight_through', 'xla')])
def test_masked_patches_cannot_change_stage2(dtype, train, gather, stage2_mask, attention):
  model = tiny_ifam(dtype, stage2_mask=stage2_mask, attention=attention)
  x = images()
  out = model(x, train=train, rng=jax.random.key(7))
  mask = np.asarray(out.fg_mask).reshape(x.shape[0], -1)
  if mask.all() or not mask.any():  # make sure the test has something to hide and to show
    mask = mixed_mask()
  keep = (fast_attention.gather_patches(jnp.asarray(mask), int(mask.sum(1).max())) if gather
          else None)

  def stage2(pixels):
    return np.asarray(model.stage2(pixels, jnp.asarray(mask), mask_mode=stage2_mask,
                                   keep_index=keep))

  reference = stage2(x)
  noise = 100.0 * jax.random.normal(jax.random.key(99), x.shape)
  hidden = jnp.where(patch_pixels(mask) > 0, x, noise)
  np.testing.assert_array_equal(stage2(hidden), reference)

  # One visible patch changed: the logits must move.
  visible = np.zeros_like(mask)
  visible[0, np.flatnonzero(mask[0])[0]] = 1.0
  shown = jnp.where(patch_pixels(visible) > 0, noise, x)
  assert np.abs(stage2(shown)[0] - reference[0]).max() > 0
  np.testing.assert_array_equal(stage2(shown)[1:], reference[1:])


def test_empty_mask_sees_only_prefix_and_stays_finite():
  model = tiny_ifam()
  x = images()
  empty = jnp.zeros((3, 16))
  logits = model.stage2(x, empty)
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_array_equal(model.stage2(x * 0 + 5.0, empty), logits)


# ----------------------------------------------------------------------------
# Token gather equals masked attention
# ----------------------------------------------------------------------------
def test_token_gather_equals_masked_attention():
  model = tiny_ifam()
  x = images()
  mask = jnp.asarray(mixed_mask())
  dense = model.stage2(x, mask)
  max_count = int(mask.sum(1).max())
  for keep_count in (max_count, 16):
    keep = fast_attention.gather_patches(mask, keep_count)
    gathered = model.stage2(x, mask, keep_index=keep)
    # Tolerance: fp32, same maths over a shorter sequence (different summation length/order).
    np.testing.assert_allclose(gathered, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('multiple', [1, 2, 64])
def test_flash_layout_matches_exact_path_forward_and_gradients(monkeypatch, multiple):
  """'flash' (visible first, lengths, trailing pad tokens up to the kernel's multiple: cuDNN's
  is 2) against 'xla' (dense -inf bias) with the same weights."""
  monkeypatch.setattr(fast_attention, 'sequence_multiple', lambda dtype: multiple)
  exact = tiny_ifam()
  flash = tiny_ifam(attention='flash')
  nnx.update(flash, nnx.state(exact))
  x, labels, rng = images(), jnp.array([0, 1, 2]), jax.random.key(3)
  valid = jnp.ones(3)
  out_exact, out_flash = exact(x, train=True, rng=rng), flash(x, train=True, rng=rng)
  mask = np.asarray(out_exact.fg_mask).reshape(3, -1)
  assert 0 < mask.sum() < mask.size  # something to hide and something to show
  np.testing.assert_array_equal(out_flash.fg_mask, out_exact.fg_mask)
  np.testing.assert_allclose(out_flash.logits, out_exact.logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out_flash.part_maps, out_exact.part_maps, atol=2e-5, rtol=1e-5)
  # Visible patch outputs come back in raster order; masked ones are unspecified.
  m = jnp.asarray(mixed_mask())
  patches = [model.stage2.backbone(x, m)['patches'] for model in (exact, flash)]
  np.testing.assert_allclose(np.asarray(patches[1])[np.asarray(m) > 0],
                             np.asarray(patches[0])[np.asarray(m) > 0], atol=2e-5, rtol=1e-5)

  def loss(model):
    out = model(x, train=True, rng=rng)
    return (losses.cross_entropy(out.logits, labels, valid)
            + losses.cross_entropy(out.stage1_logits, labels, valid)
            + jnp.mean(out.part_maps[..., 0]**2))

  grads = [nnx.grad(loss)(model) for model in (exact, flash)]
  flat = [dict(nnx.to_flat_state(g)) for g in grads]
  assert flat[0].keys() == flat[1].keys()
  for key, value in flat[0].items():
    np.testing.assert_allclose(flat[1][key][...], value[...], atol=1e-5, rtol=1e-4,
                               err_msg=str(key))


@pytest.mark.slow
def test_flash_attention_padding_and_lengths():
  """Padding to a multiple of 64 (what cuDNN's backward needs) changes nothing visible."""
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.normal(size=(2, 21, 2, 8)), jnp.float32) for _ in range(4))
  lengths = jnp.array([21, 9])
  keep = np.arange(21)[None, :] < np.asarray(lengths)[:, None]
  bias = vit.key_bias_from_mask(jnp.asarray(keep))

  def run(attend):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(g * jnp.asarray(keep)[:, :, None, None])

  exact, exact_grads = run(lambda *a: vit.key_masked_attention(*a, bias))
  for pad in (1, 64):
    out, grads = run(lambda *a, pad=pad: fast_attention.flash_attention(
        *a, lengths, kernel='xla', pad_multiple=pad))
    assert out.shape == exact.shape
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(exact)[keep], atol=1e-6)
    for got, want in zip(grads, exact_grads):
      np.testing.assert_allclose(got, want, atol=1e-5)
  full = fast_attention.flash_attention(q, k, v, None, kernel='xla', pad_multiple=64)
  np.testing.assert_allclose(full, vit.key_masked_attention(q, k, v, None), atol=1e-6)


@pytest.mark.gpu
def test_cudnn_flash_attention_matches_xla_on_gpu():
  """cuDNN's fused kernel (bf16, padded 261 -> 320) against XLA's, values and gradients."""
  if jax.default_backend() != 'gpu':
    pytest.skip('needs a GPU')
  rng = np.random.default_rng(0)
  shape = (8, 261, 12, 64)
  q, k, v, g = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16) for _ in range(4))
  lengths = jnp.asarray(rng.integers(5, 262, size=8), jnp.int32)
  keep = jnp.arange(261)[None, :] < lengths[:, None]
  g = g * keep[:, :, None, None].astype(g.dtype)
  results = {}
  for kernel in ('cudnn', 'xla'):
    out, vjp = jax.vjp(
        lambda *a, kernel=kernel: fast_attention.flash_attention(*a, lengths, kernel=kernel),
        q, k, v)
    results[kernel] = [np.asarray(x, np.float32) for x in (out, *vjp(g))]
  valid = np.asarray(keep)
  for got, want in zip(results['cudnn'], results['xla']):
    got, want = got[valid], want[valid]
    # bf16 inputs and outputs: a few bf16 ulps of the largest values.
    np.testing.assert_allclose(got, want, atol=0.03 * np.abs(want).max())


def test_gather_patches_order():
  mask = jnp.asarray([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 1]], jnp.float32)
  np.testing.assert_array_equal(fast_attention.gather_patches(mask, 3), [[1, 3, 4], [0, 5, 1]])


def test_model_keep_count_matches_dense_eval():
  model = tiny_ifam()
  x = images()
  dense = model(x, train=False)
  count = int(np.asarray(dense.fg_mask).reshape(3, -1).sum(1).max())
  gathered = model(x, train=False, keep_count=max(count, 1))
  np.testing.assert_allclose(gathered.logits, dense.logits, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='eval-only'):
    model(x, train=True, rng=jax.random.key(0), keep_count=4)


# ----------------------------------------------------------------------------
# Gradient routing
# ----------------------------------------------------------------------------
def stage2_loss_grads(model, x, labels, rng):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p):
    m = nnx.merge(graphdef, p, rest)
    out = m(x, train=True, rng=rng)
    logp = jax.nn.log_softmax(out.logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

  return jax.grad(loss_fn)(params)


@pytest.mark.slow
def test_hard_stage2_mask_sends_nothing_to_stage1():
  model = tiny_ifam(stage2_mask='hard')
  grads = stage2_loss_grads(model, images(), jnp.array([0, 1, 2]), jax.random.key(3))
  stage1 = jax.tree.leaves(grads['stage1'])
  assert stage1 and all(np.all(np.asarray(g) == 0) for g in stage1)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads['stage2']))


@pytest.mark.slow
def test_straight_through_reaches_prototypes_and_masked_tokens():
  model = tiny_ifam(stage2_mask='straight_through')
  x, labels, rng = images(), jnp.array([0, 1, 2]), jax.random.key(3)
  grads = stage2_loss_grads(model, x, labels, rng)
  assert np.abs(np.asarray(grads['stage1']['prototypes'][...])).max() > 0
  # The part classifier is not on the stage-2 path: its gradient stays exactly zero.
  assert np.all(np.asarray(grads['stage1']['part_classifier']['kernel'][...]) == 0)

  # Gradient w.r.t. the part logits, with the mask built exactly as the model builds it.
  features = model.stage1.features(x)
  logits, _ = model.stage1.part_logits(features)
  keys = model._noise_rngs(True, rng)

  def loss_of_logits(part_logits):
    mask, _ = model.foreground_mask(part_logits, noise_rng=keys[ifam.RNG_MASK_NOISE],
                                    dropout_rng=keys[ifam.RNG_MASK_DROPOUT])
    out = model.stage2(x, mask.reshape(3, -1), mask_mode='straight_through')
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), labels[:, None], axis=1))

  g = np.asarray(jax.grad(loss_of_logits)(logits))
  mask, _ = model.foreground_mask(logits, noise_rng=keys[ifam.RNG_MASK_NOISE],
                                  dropout_rng=keys[ifam.RNG_MASK_DROPOUT])
  masked = np.asarray(mask) == 0
  assert masked.any()
  assert np.abs(g[masked]).max() > 0


def test_straight_through_forward_is_bitwise_identical():
  x, rng = images(), jax.random.key(5)
  a = tiny_ifam(stage2_mask='hard')(x, train=True, rng=rng)
  b = tiny_ifam(stage2_mask='straight_through')(x, train=True, rng=rng)
  for name in ('logits', 'stage1_logits', 'part_maps', 'fg_mask', 'part_features'):
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


@pytest.mark.slow
def test_attention_mask_gradient_is_the_relaxed_derivative():
  """Against autodiff of p_ij = m_j e_ij / sum_l m_l e_il, in a regime where the cap is inactive."""
  b, t, h, d = 2, 7, 2, 4
  q, k, v = (jax.random.normal(jax.random.key(i), (b, t, h, d)) for i in range(3))
  k = k.at[:, 4:].multiply(0.05)  # masked keys 4.. are unattractive: e_ij / Z_i < 1
  w = jnp.array([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 1, 0]], jnp.float32)
  cot = jax.random.normal(jax.random.key(9), (b, t, h, d))

  def relaxed(q, k, v, w):
    s = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(d)
    e = jnp.exp(s - s.max(-1, keepdims=True)) * w[:, None, None, :]
    return jnp.einsum('bhts,bshd->bthd', e / e.sum(-1, keepdims=True), v)

  ours = jax.grad(lambda *a: jnp.sum(vit.attention_with_mask_gradient(*a) * cot), (0, 1, 2, 3))
  theirs = jax.grad(lambda *a: jnp.sum(relaxed(*a) * cot), (0, 1, 2, 3))
  for g_ours, g_theirs in zip(ours(q, k, v, w), theirs(q, k, v, w)):
    np.testing.assert_allclose(g_ours, g_theirs, atol=2e-5)
  assert np.abs(np.asarray(ours(q, k, v, w)[3])[w == 0]).min() > 0


@pytest.mark.slow
def test_soft_mask_ablation_is_differentiable_into_stage1():
  model = tiny_ifam(stage2_mask='soft')
  grads = stage2_loss_grads(model, images(), jnp.array([0, 1, 2]), jax.random.key(3))
  assert np.abs(np.asarray(grads['stage1']['prototypes'][...])).max() > 0


@pytest.mark.slow  # a compile per mode
@pytest.mark.parametrize('stage2_mask', ['hard', 'straight_through', 'soft', 'late'])
def test_stage2_mask_facts_match_the_model(stage2_mask):
  """What `stage2_mask_facts` says of each mode is what the model does: whether stage 1 gets a
  stage-2 gradient, and whether stage 2 reads a {0, 1} mask (pixels it masks cannot reach it)."""
  facts = ifam.stage2_mask_facts(stage2_mask)
  model = tiny_ifam(stage2_mask=stage2_mask)
  x, rng = images(), jax.random.key(3)
  grads = stage2_loss_grads(model, x, jnp.array([0, 1, 2]), rng)
  assert (np.abs(np.asarray(grads['stage1']['prototypes'][...])).max() > 0) == facts.trains_stage1
  out = model(x, train=True, rng=rng)
  read = np.asarray(out.fg_mask if facts.binary else out.fg_prob)
  assert np.isin(read, (0.0, 1.0)).all() == facts.binary


def test_unknown_stage2_mask_names_the_key():
  for make in (lambda: ifam.stage2_mask_facts('none'), lambda: tiny_ifam(stage2_mask='none')):
    with pytest.raises(ValueError, match=r'model\.stage2_mask .*\'none\''):
      make()


# ----------------------------------------------------------------------------
# An explicit foreground mask
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('stage2_mask,attention', [('hard', 'xla'), ('hard', 'flash'),
                                                   ('straight_through', 'xla'), ('soft', 'xla')])
def test_explicit_fg_mask_is_what_stage2_reads(stage2_mask, attention):
  """Stage 2's logits are `stage2` called directly with the given mask; stage 1 runs as without
  it, and the output carries the given mask."""
  model = tiny_ifam(stage2_mask=stage2_mask, attention=attention)
  x, rng = images(), jax.random.key(7)
  mask = mixed_mask()
  if stage2_mask == 'soft':
    mask = np.random.default_rng(1).random(mask.shape).astype(np.float32)
  given = jnp.asarray(mask.reshape(3, 4, 4))
  own = model(x, train=True, rng=rng)
  out = model(x, train=True, rng=rng, fg_mask=given)
  direct = np.asarray(model.stage2(x, jnp.asarray(mask), mask_mode=stage2_mask))
  assert not np.array_equal(np.asarray(own.logits), direct)  # the given mask is not stage 1's
  np.testing.assert_array_equal(out.logits, direct)
  np.testing.assert_array_equal(out.fg_prob if stage2_mask == 'soft' else out.fg_mask, given)
  for name in ('stage1_logits', 'part_maps', 'part_features'):
    np.testing.assert_array_equal(getattr(out, name), getattr(own, name), err_msg=name)
  gathered = model(x, train=False, fg_mask=given, keep_count=16)
  np.testing.assert_allclose(gathered.logits, direct, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('attention', ['xla', 'flash'])
def test_explicit_fg_mask_hides_masked_pixels_from_stage2(attention):
  model = tiny_ifam(attention=attention)
  x, rng = images(), jax.random.key(7)
  mask = mixed_mask()
  given = jnp.asarray(mask.reshape(3, 4, 4))
  noise = 100.0 * jax.random.normal(jax.random.key(99), x.shape)
  hidden = jnp.where(patch_pixels(mask) > 0, x, noise)
  visible = np.zeros_like(mask)
  visible[0, np.flatnonzero(mask[0])[0]] = 1.0
  shown = jnp.where(patch_pixels(visible) > 0, noise, x)
  for train in (False, True):
    reference = model(x, train=train, rng=rng, fg_mask=given)
    out = model(hidden, train=train, rng=rng, fg_mask=given)
    assert not np.array_equal(out.stage1_logits, reference.stage1_logits)  # stage 1 saw it
    np.testing.assert_array_equal(out.logits, reference.logits)
    moved = np.asarray(model(shown, train=train, rng=rng, fg_mask=given).logits)
    assert np.abs(moved[0] - reference.logits[0]).max() > 0
    np.testing.assert_array_equal(moved[1:], reference.logits[1:])


def test_explicit_fg_mask_errors():
  model = tiny_ifam()
  with pytest.raises(ValueError, match=r'fg_mask has shape \(3, 16\)'):
    model(images(), train=False, fg_mask=jnp.ones((3, 16)))
  with pytest.raises(ValueError, match='pass one of them'):
    model(images(), train=False, fg_mask=jnp.ones((3, 4, 4)),
          intervention=ifam.Intervention(remove_parts=(0,)))


# ----------------------------------------------------------------------------
# Stage 1 against numpy
# ----------------------------------------------------------------------------
def test_stage1_against_numpy():
  model = tiny_ifam(num_parts=3)
  x = images()
  features = np.asarray(model.stage1.features(x), np.float64)
  w = np.asarray(model.stage1.prototypes[...], np.float64)
  neg_dist, dot = model.stage1.part_logits(jnp.asarray(features, jnp.float32))
  expected = -((features[..., None, :] - w) ** 2).sum(-1)
  np.testing.assert_allclose(neg_dist, expected, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(dot, features @ w.T, rtol=1e-5, atol=1e-4)

  maps = np.exp(expected - expected.max(-1, keepdims=True))
  maps /= maps.sum(-1, keepdims=True)
  out = model(x, train=False)
  np.testing.assert_allclose(out.part_maps, maps, atol=1e-5)

  pooled = np.einsum('bhwk,bhwd->bkd', maps, features) / 16
  mu = pooled.mean(axis=(1, 2), keepdims=True)
  var = pooled.var(axis=(1, 2), keepdims=True)
  modulated = (pooled - mu) / np.sqrt(var + 1e-5)
  modulated = modulated * np.asarray(model.stage1.modulation.scale[...])
  modulated += np.asarray(model.stage1.modulation.bias[...])
  np.testing.assert_allclose(out.part_features, modulated, atol=1e-4)
  scores = modulated[:, :3] @ np.asarray(model.stage1.part_classifier.kernel[...], np.float64)
  np.testing.assert_allclose(out.part_scores, scores, atol=1e-4)
  np.testing.assert_allclose(out.stage1_logits, scores.mean(1), atol=1e-4)

  # Deterministic eval mask: a token is foreground iff its nearest prototype is a foreground one.
  np.testing.assert_array_equal(out.fg_mask, expected.argmax(-1) < 3)


@pytest.mark.slow
def test_part_dropout_zeroes_whole_parts():
  model = tiny_ifam(num_parts=4)
  x = images(batch=8)
  features = model.stage1.features(x)
  maps = jax.nn.softmax(model.stage1.part_logits(features)[0], axis=-1)
  modulated, _ = model.stage1.classify(maps, features, part_dropout=0.5, rng=None)
  kernel = model.stage1.part_classifier.kernel[...]
  _, scores = model.stage1.classify(maps, features, part_dropout=0.5, rng=jax.random.key(0))
  full = np.asarray(jnp.einsum('bkd,dc->bkc', modulated[:, :4], kernel))
  scores = np.asarray(scores)
  dropped = np.all(scores == 0, axis=-1)
  assert 0 < dropped.mean() < 1
  np.testing.assert_allclose(scores[~dropped], 2.0 * full[~dropped], rtol=1e-4, atol=1e-5)


def test_mask_part_dropout_k1_empties_the_mask():
  """K=1, p=0.3: the only part is dropped for ~30% of images, whose mask is then empty."""
  model = tiny_ifam(num_parts=1)
  logits = jnp.zeros((400, 4, 4, 2)).at[..., 0].set(5.0)  # foreground everywhere
  mask, _ = model.foreground_mask(logits, noise_rng=None, dropout_rng=jax.random.key(0))
  empty = np.asarray(mask).reshape(400, -1).sum(1) == 0
  full = np.asarray(mask).reshape(400, -1).sum(1) == 16
  assert np.all(empty | full)
  assert 0.22 < empty.mean() < 0.38


def test_eval_is_deterministic_unless_noise_is_asked_for():
  x = images()
  model = tiny_ifam()
  a, b = model(x, train=False), model(x, train=False)
  np.testing.assert_array_equal(a.part_maps, b.part_maps)
  noisy = tiny_ifam(eval_gumbel_noise=True)
  with pytest.raises(ValueError, match='rng is required'):
    noisy(x, train=False)
  c = noisy(x, train=False, rng=jax.random.key(1))
  d = noisy(x, train=False, rng=jax.random.key(2))
  assert np.abs(np.asarray(c.part_maps) - np.asarray(d.part_maps)).max() > 0


# ----------------------------------------------------------------------------
# Interventions
# ----------------------------------------------------------------------------
def hand_logits():
  """One image, 1x4 grid, K=2: token 0 -> part 0, 1 -> part 1, 2 -> bg, 3 -> part 0 (far)."""
  neg_dist = np.array([[[[-1.0, -5.0, -4.0], [-6.0, -2.0, -3.0], [-9.0, -8.0, -1.0],
                         [-7.0, -9.0, -8.0]]]], np.float32)
  similarity = np.array([[[[3.0, 1.0, 0.0], [0.5, 2.0, 1.0], [0.1, 0.2, 4.0],
                           [2.5, 2.4, 0.0]]]], np.float32)
  return jnp.asarray(neg_dist), jnp.asarray(similarity)


def test_remove_parts():
  model = tiny_ifam()
  logits, sim = hand_logits()
  _, mask = model.intervene(logits, sim, ifam.Intervention(), None)
  np.testing.assert_array_equal(mask, [[[1, 1, 0, 1]]])
  edited, mask = model.intervene(logits, sim, ifam.Intervention(remove_parts=(0,)), None)
  np.testing.assert_array_equal(mask, [[[0, 1, 0, 0]]])
  # Tokens of the removed part go to background, never to another part.
  assert np.all(np.argmax(np.asarray(edited), -1) == [[[2, 1, 2, 2]]])
  _, mask = model.intervene(logits, sim, ifam.Intervention(remove_parts=(0, 1)), None)
  assert not np.asarray(mask).any()
  with pytest.raises(ValueError, match='outside'):
    model.intervene(logits, sim, ifam.Intervention(remove_parts=(2,)), None)


def test_distance_thresholds():
  model = tiny_ifam()
  logits, sim = hand_logits()
  # Distances of the assigned parts: token 0: 1, token 1: 2, token 3: 7.
  _, mask = model.intervene(logits, sim, ifam.Intervention(thresholds=(5.0, 5.0)), None)
  np.testing.assert_array_equal(mask, [[[1, 1, 0, 0]]])
  _, mask = model.intervene(logits, sim, ifam.Intervention(thresholds=(0.5, 5.0)), None)
  np.testing.assert_array_equal(mask, [[[0, 1, 0, 0]]])
  _, mask = model.intervene(logits, sim, ifam.Intervention(thresholds=(np.inf, np.inf)), None)
  np.testing.assert_array_equal(mask, [[[1, 1, 0, 1]]])


def test_dot_product_thresholds_follow_the_reference_script():
  model = tiny_ifam()
  logits, sim = hand_logits()
  rule = dict(threshold_rule='dot_product')
  # Token 3: part 0 has 2.5 < 2.6 and is dropped, part 1 (2.4 >= 2.0) beats bg (0.0): still fg.
  edited, mask = model.intervene(logits, sim, ifam.Intervention(thresholds=(2.6, 2.0), **rule),
                                 None)
  np.testing.assert_array_equal(mask, [[[1, 1, 0, 1]]])
  assert np.argmax(np.asarray(edited)[0, 0, 3]) == 1
  # Both below threshold at token 1 -> bg (1.0 beats nothing else left).
  _, mask = model.intervene(logits, sim, ifam.Intervention(thresholds=(2.6, 2.5), **rule), None)
  np.testing.assert_array_equal(mask, [[[1, 0, 0, 0]]])


def test_intervention_runs_end_to_end():
  model = tiny_ifam()
  x = images()
  base = model(x, train=False)
  out = model(x, train=False, intervention=ifam.Intervention(remove_parts=(0, 1)))
  assert not np.asarray(out.fg_mask).any()
  np.testing.assert_array_equal(out.logits, model.stage2(x, jnp.zeros((3, 16))))
  kept = model(x, train=False, intervention=ifam.Intervention(thresholds=(np.inf, np.inf)))
  np.testing.assert_array_equal(kept.fg_mask, base.fg_mask)
  np.testing.assert_array_equal(kept.logits, base.logits)


def np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def most_used_part(out, num_parts):
  """The foreground part assigned to the most tokens of the unedited forward `out`."""
  assigned = np.asarray(out.part_logits).argmax(-1)
  return int(np.bincount(assigned[assigned < num_parts], minlength=num_parts).argmax())


def test_part_removal_follows_the_reference_by_default():
  k, x = 3, images()
  model = tiny_ifam(num_parts=k, stage2_mask='soft')
  base = model(x, train=False)
  removed = most_used_part(base, k)
  out = model(x, train=False, intervention=ifam.Intervention(remove_parts=(removed,)))
  # Stage 1 is scored before the removal: bit for bit the unedited forward's.
  for name in ('stage1_logits', 'part_scores', 'part_features'):
    np.testing.assert_array_equal(getattr(out, name), getattr(base, name))
  # The mask: the kept parts' original probabilities, non-zero at the removed part's tokens.
  logits = np.asarray(base.part_logits, np.float64)
  assigned = logits.argmax(-1)
  kept = [p for p in range(k) if p != removed]
  fg_prob = np_softmax(logits / model.gumbel_tau)[..., kept].max(-1)
  assert (fg_prob[assigned == removed] > 0).all()
  np.testing.assert_allclose(out.fg_prob, fg_prob, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out.fg_mask, np.isin(assigned, kept))
  soft = jnp.asarray(fg_prob.reshape(x.shape[0], -1), jnp.float32)
  np.testing.assert_allclose(out.logits, model.stage2(x, soft, mask_mode='soft'), atol=1e-5)
  # With thresholds, stage 1 is scored after them: as with the thresholds alone.
  tau = tuple(float(np.median(-logits[..., p][assigned == p])) for p in range(k))
  thresholded = model(x, train=False, intervention=ifam.Intervention(thresholds=tau))
  both = model(x, train=False,
               intervention=ifam.Intervention(thresholds=tau, remove_parts=(removed,)))
  assert np.abs(np.asarray(thresholded.stage1_logits - base.stage1_logits)).max() > 0
  np.testing.assert_array_equal(both.stage1_logits, thresholded.stage1_logits)
  # Eval Gumbel noise: the same draw scores stage 1 with and without the removal.
  noisy, rng = tiny_ifam(num_parts=k, eval_gumbel_noise=True), jax.random.key(3)
  noisy_out = noisy(x, train=False, rng=rng, intervention=ifam.Intervention(remove_parts=(0,)))
  np.testing.assert_array_equal(noisy_out.stage1_logits,
                                noisy(x, train=False, rng=rng).stage1_logits)


def test_part_removal_renormalise_rescores_the_edited_maps():
  k, x = 3, images()
  model = tiny_ifam(num_parts=k, stage2_mask='soft')
  base = model(x, train=False)
  removed = most_used_part(base, k)
  out = model(x, train=False, intervention=ifam.Intervention(remove_parts=(removed,),
                                                             part_removal='renormalise'))
  # By hand: the removed part is gone everywhere, its tokens lose every foreground part.
  logits = np.asarray(base.part_logits, np.float64)
  assigned = logits.argmax(-1)
  edited = logits.copy()
  edited[..., removed] = -np.inf
  edited[assigned == removed, :k] = -np.inf
  maps = np_softmax(edited / model.gumbel_tau)
  np.testing.assert_allclose(out.part_maps, maps, rtol=1e-5, atol=1e-7)
  features = model.stage1.features(x)
  _, scores = model.stage1.classify(jnp.asarray(maps, jnp.float32), features,
                                    part_dropout=model.part_dropout, rng=None)
  np.testing.assert_allclose(out.stage1_logits, np.mean(scores, axis=1), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out.stage1_logits - base.stage1_logits)).max() > 1e-4
  fg_prob = maps[..., :k].max(-1)
  assert (fg_prob[assigned == removed] == 0).all()
  np.testing.assert_allclose(out.fg_prob, fg_prob, rtol=1e-5, atol=1e-7)
  soft = jnp.asarray(fg_prob.reshape(x.shape[0], -1), jnp.float32)
  np.testing.assert_allclose(out.logits, model.stage2(x, soft, mask_mode='soft'), atol=1e-5)
  with pytest.raises(ValueError, match='part_removal'):
    model(x, train=False, intervention=ifam.Intervention(remove_parts=(0,), part_removal='x'))
