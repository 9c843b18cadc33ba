"""DAR's attention head and trainer: the head's maths against NumPy, its
reduction to GAP, and the synthetic token-map benchmark against scikit-learn's DFR-on-GAP."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from ifam_jax.peers import dar

B, N, D, C = 3, 7, 8, 3


def tokens_and_mask(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.normal(size=(B, N, D)).astype(np.float32)
  mask = rng.random((B, N)) < 0.6
  mask[:, 0], mask[:, 1] = True, False
  return tokens, mask


# Jitted, so each shape compiles once instead of every primitive apart.
forward = nnx.jit(lambda head, tokens, mask=None: head(tokens, mask))
pool = nnx.jit(lambda head, tokens, mask=None: head.pool(tokens, mask))


def param_leaves(module):
  return dict(jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0])


# ----------------------------------------------------------------------------
# 1. Shapes, normalised attention, masked keys
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('identity_values', [False, True])
def test_shapes_attention_rows_and_masked_keys(identity_values):
  head = dar.DARHead(D, C, num_queries=3, num_heads=2, head_dim=5, depth=2,
                     identity_values=identity_values, rngs=nnx.Rngs(0))
  tokens, mask = tokens_and_mask()
  for key_mask in (None, mask):
    logits, attentions = forward(head, jnp.asarray(tokens),
                                 None if key_mask is None else jnp.asarray(key_mask))
    assert logits.shape == (B, C) and logits.dtype == jnp.float32
    assert len(attentions) == 2
    for attention in attentions:
      attention = np.asarray(attention)
      assert attention.shape == (B, 2, 3, N)
      np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-6)
      if key_mask is not None:
        assert np.all(attention[np.broadcast_to(~key_mask[:, None, None], attention.shape)] == 0)
        assert np.all(attention[:, :, :, 0] > 0)
  # A masked token's content cannot reach the logits.
  changed = tokens.copy()
  changed[~mask] = 100.0
  np.testing.assert_array_equal(np.asarray(forward(head, jnp.asarray(changed), mask)[0]),
                                np.asarray(forward(head, jnp.asarray(tokens), mask)[0]))


def test_identity_values_pool_backbone_channels():
  """Eq. 5: z_c = mean_q sum_n alpha_{head(c), q, n} A_{n, c}, head i owning channel block i."""
  h = 2
  head = dar.DARHead(D, C, num_queries=3, num_heads=h, identity_values=True, rngs=nnx.Rngs(1))
  assert not hasattr(head.layers[0], 'value') and not hasattr(head.layers[0], 'out')
  tokens, mask = tokens_and_mask(1)
  pooled, attentions = pool(head, jnp.asarray(tokens), jnp.asarray(mask))
  alpha = np.asarray(attentions[-1], np.float64)
  expected = np.zeros((B, D))
  for c in range(D):
    expected[:, c] = np.einsum('bqn,bn->b', alpha[:, c // (D // h)], tokens[:, :, c]) / 3
  np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-6)


def test_residual_norm_is_post_norm_around_the_same_attention():
  """The decoder ablation: layer(q) = LayerNorm(q + plain layer(q)), LayerNorm by hand."""
  plain = dar.DARHead(D, C, num_queries=3, num_heads=2, rngs=nnx.Rngs(9))
  res = dar.DARHead(D, C, num_queries=3, num_heads=2, residual_norm=True, rngs=nnx.Rngs(9))
  nnx.update(res, nnx.state(plain))  # same projections; the LayerNorm keeps scale 1, bias 0
  tokens, mask = tokens_and_mask(9)
  queries = np.random.default_rng(9).normal(size=(B, 3, D)).astype(np.float32)
  attend = nnx.jit(lambda layer, q, t, m: layer(q, t, m)[0])
  bias = jnp.where(jnp.asarray(mask), 0.0, -jnp.inf)
  x = queries + np.asarray(attend(plain.layers[0], queries, tokens, bias), np.float64)
  expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(attend(res.layers[0], queries, tokens, bias)), expected,
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# 2. No positional encoding: invariant to the order of the tokens
# ----------------------------------------------------------------------------
def test_permutation_invariance():
  head = dar.DARHead(D, C, num_queries=4, num_heads=2, rngs=nnx.Rngs(2))
  tokens, mask = tokens_and_mask(2)
  perm = np.random.default_rng(3).permutation(N)
  for key_mask in (None, mask):
    km = None if key_mask is None else jnp.asarray(key_mask)
    km_perm = None if key_mask is None else jnp.asarray(key_mask[:, perm])
    logits = np.asarray(forward(head, jnp.asarray(tokens), km)[0])
    permuted = np.asarray(forward(head, jnp.asarray(tokens[:, perm]), km_perm)[0])
    np.testing.assert_allclose(permuted, logits, atol=1e-5, rtol=0)
    assert np.abs(logits).max() > 1e-2  # not trivially zero


# ----------------------------------------------------------------------------
# 3. Reduction to GAP: DAR contains DFR on averaged tokens
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('identity_values', [False, True])
def test_reduces_to_gap(identity_values):
  head = dar.DARHead(D, C, num_queries=1, num_heads=1, head_dim=D, depth=2,
                     identity_values=identity_values, rngs=nnx.Rngs(4))
  last = head.layers[-1]
  last.key.kernel[...] = jnp.zeros((D, D))
  if not identity_values:
    last.value.kernel[...] = jnp.eye(D)
    last.out.kernel[...] = jnp.eye(D)
  tokens, mask = tokens_and_mask(4)
  w, b = np.asarray(head.head.kernel[...]), np.asarray(head.head.bias[...])
  for key_mask, expected in ((None, tokens.mean(1)),
                             (mask, (tokens * mask[..., None]).sum(1) / mask.sum(1)[:, None])):
    km = None if key_mask is None else jnp.asarray(key_mask)
    pooled, _ = pool(head, jnp.asarray(tokens), km)
    np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-6, atol=1e-7)
    logits, _ = forward(head, jnp.asarray(tokens), km)
    np.testing.assert_allclose(np.asarray(logits), expected @ w + b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# 4. What trains, and how many parameters
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('nq, h, dk, depth, identity_values, residual_norm',
                         [(4, 4, 0, 2, False, False), (3, 2, 5, 2, False, False),
                          (2, 3, 7, 3, False, False), (4, 2, 6, 2, True, False),
                          (4, 4, 0, 2, False, True)])
def test_parameter_count(nq, h, dk, depth, identity_values, residual_norm):
  """n_q D + depth (3 D h d_k + h d_k D) + D C + C; Eq. 5 drops W^V and W^O;
  the decoder ablation adds a LayerNorm (2 D) per layer."""
  dim, num_classes = 12, 5
  head = nnx.eval_shape(lambda: dar.DARHead(
      dim, num_classes, num_queries=nq, num_heads=h, head_dim=dk, depth=depth,
      identity_values=identity_values, residual_norm=residual_norm, rngs=nnx.Rngs(0)))
  dk = dk or dim // h
  per_layer = 2 * dim * h * dk if identity_values else 3 * dim * h * dk + h * dk * dim
  per_layer += 2 * dim if residual_norm else 0
  expected = nq * dim + depth * per_layer + dim * num_classes + num_classes
  assert sum(x.size for x in param_leaves(head).values()) == expected


def test_gradients_cover_exactly_the_head_parameters():
  head = dar.DARHead(D, C, num_queries=2, num_heads=2, rngs=nnx.Rngs(5))
  # Nothing but parameters lives in the head (no statistics, no RNG state).
  assert (jax.tree_util.tree_structure(nnx.state(head))
          == jax.tree_util.tree_structure(nnx.state(head, nnx.Param)))
  tokens, mask = tokens_and_mask(5)
  labels = jnp.asarray([0, 1, 2])

  def loss(model):
    logits = model(jnp.asarray(tokens), jnp.asarray(mask))[0]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(B), labels])

  grads = dict(jax.tree_util.tree_flatten_with_path(nnx.jit(nnx.grad(loss))(head))[0])
  params = param_leaves(head)
  assert grads.keys() == params.keys()
  assert all(np.abs(np.asarray(g)).max() > 0 for g in grads.values())


def test_weight_decay_reaches_matrices_only():
  """AdamW's decoupled decay, -lr wd p, on the queries and kernels; never on vectors (bias)."""
  head = dar.DARHead(D, C, num_queries=2, num_heads=2, rngs=nnx.Rngs(10))
  params = nnx.state(head, nnx.Param)
  tx = dar._adamw()
  state = tx.init(params)
  state.hyperparams['learning_rate'] = jnp.asarray(0.1)
  state.hyperparams['weight_decay'] = jnp.asarray(0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates = param_leaves(tx.update(zeros, state, params)[0])
  for path, p in param_leaves(head).items():
    p = np.asarray(p)
    expected = -0.05 * p if p.ndim >= 2 else np.zeros_like(p)
    np.testing.assert_allclose(np.asarray(updates[path]), expected, rtol=1e-6, err_msg=str(path))


# ----------------------------------------------------------------------------
# 5. Synthetic token maps: channel-entangled, spatially separable signals
# ----------------------------------------------------------------------------
T, DIM, SIGMA, BETA = 32, 16, 0.5, 2.0
MINORITY = (1, 2)  # group = 2 y + a; a != y


def token_maps(rng, groups, dirs, overlap):
  """16 spurious tokens beta(2a-1) u + 2v and 16 core tokens (2y-1) u + 2w, noise sigma.

  `overlap`: the control, every token carries both signals. Its noise is drawn once per image,
  so the tokens of an image are identical and no pooling can select anything. With noise drawn
  per token instead, DAR's worst-group accuracy depends on the seed (0.97 to 0.99 on seeds 1 and
  3, 0.32 on seed 2; the published run gave 0.251), and with depth 1 it stays at 0.23 to 0.31: layer
  1 makes the layer-2 queries a function of the shared signal c = 2(2a-1) + (2y-1), which sets
  how sharply the softmax picks the noisiest tokens, and the mean of the picked noise is a
  saturating, hence nonlinear, feature of c. A few such features can separate y = [c in {3, -1}]
  (an XOR of a and y), which no linear head on the mean can. Spatial selection plays no part:
  both halves of the map get half of the attention.
  """
  u, v, w = dirs
  y, a = groups // 2, groups % 2
  spurious = (BETA * (2 * a - 1))[:, None] * u + 2 * v
  core = (2 * y - 1)[:, None] * u + 2 * w
  n = len(groups)
  if overlap:
    clean = np.broadcast_to((spurious + core)[:, None], (n, T, DIM))
    noise = rng.normal(size=(n, 1, DIM))
  else:
    clean = np.concatenate([np.broadcast_to(spurious[:, None], (n, T // 2, DIM)),
                            np.broadcast_to(core[:, None], (n, T // 2, DIM))], axis=1)
    noise = rng.normal(size=(n, T, DIM))
  return (clean + SIGMA * noise).astype(np.float32)


def worst_group_accuracy(pred, labels, groups):
  return min(float((pred[groups == g] == labels[groups == g]).mean()) for g in range(4))


@pytest.fixture(scope='module')
def benchmark():
  """DFR-on-GAP and DAR on the disjoint maps and on the overlap control.

  Target: 1,000 draws with a independent of y (balanced), subsampled to the smallest group;
  val 400 and test 4,000, a quarter per group. Both cases share the group draws (one compile).
  DAR: n_q 4, h 2, d_k 8, AdamW 3e-3, 600 steps of 64 (40 epochs of the 944 targets).
  """
  rng = np.random.default_rng(1)
  dirs = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0][:, :3].T
  drawn = rng.integers(0, 4, 1000)
  smallest = np.bincount(drawn, minlength=4).min()
  target = np.concatenate([np.flatnonzero(drawn == g)[:smallest] for g in range(4)])
  groups = {'target': drawn[target], 'val': np.repeat(np.arange(4), 100),
            'test': np.repeat(np.arange(4), 1000)}
  out = {}
  for overlap in (False, True):
    x = {k: token_maps(rng, g, dirs, overlap) for k, g in groups.items()}
    y = {k: g // 2 for k, g in groups.items()}
    gap = StandardScaler().fit(x['target'].mean(1))
    dfr = LogisticRegression(l1_ratio=1.0, solver='liblinear').fit(
        gap.transform(x['target'].mean(1)), y['target'])
    dfr_pred = dfr.predict(gap.transform(x['test'].mean(1)))
    head, report = dar.train_dar(
        x['target'], y['target'], num_classes=2, val_tokens=x['val'], val_labels=y['val'],
        val_groups=groups['val'], minority_groups=MINORITY, seed=1, num_queries=4, num_heads=2,
        head_dim=8, lr=3e-3, weight_decay_grid=(1e-4,), batch_size=64, epochs=40)
    out[overlap] = dict(
        x=x, y=y, groups=groups, head=head, report=report,
        dfr_wga=worst_group_accuracy(dfr_pred, y['test'], groups['test']),
        dar_wga=worst_group_accuracy(dar.predict(head, x['test']).argmax(1), y['test'],
                                     groups['test']))
  return out


@pytest.mark.slow
def test_benchmark_dar_recovers_spatially_separable_core(benchmark):
  """Published: DFR-on-GAP WGA 0.049, DAR 0.999 (seed 1); overlap control DFR 0.026, DAR 0.251."""
  disjoint, overlap = benchmark[False], benchmark[True]
  assert disjoint['report']['steps'] == 600
  assert disjoint['dfr_wga'] < 0.2
  assert disjoint['dar_wga'] > 0.95
  # Published: layer-2 mass on core tokens 0.990. Averaged over heads and queries it depends on the
  # seed (0.51 to 0.996 over seeds 1-4), but some head and query always locks onto them.
  test_tokens = jnp.asarray(disjoint['x']['test'][:1000])
  attention = np.asarray(forward(disjoint['head'], test_tokens)[1][-1])
  assert attention[..., T // 2:].sum(-1).mean(0).max() > 0.9
  assert overlap['dfr_wga'] < 0.2
  assert overlap['dar_wga'] < 0.5


@pytest.mark.slow
def test_report_scores_are_the_returned_heads(benchmark):
  """The report's val scores, recomputed by hand from the returned head's predictions."""
  run = benchmark[False]
  report = run['report']
  pred = dar.predict(run['head'], run['x']['val']).argmax(1)
  groups, labels = run['groups']['val'], run['y']['val']
  minority = np.isin(groups, MINORITY)
  assert report['selection_rule'] == 'val minority_accuracy_pooled'
  assert report['val']['minority_accuracy_pooled'] == pytest.approx(
      float((pred == labels)[minority].mean()))
  assert report['val']['worst_group_accuracy'] == pytest.approx(
      worst_group_accuracy(pred, labels, groups))
  assert report['val']['accuracy'] == pytest.approx(float((pred == labels).mean()))
  assert json.loads(json.dumps(report)) == report  # written as report.json


@pytest.mark.slow
def test_trained_head_moved_every_parameter(benchmark):
  """The trainer updates every head parameter (and there is nothing else to update)."""
  head = benchmark[False]['head']
  init = param_leaves(dar.DARHead(DIM, 2, num_queries=4, num_heads=2, head_dim=8,
                                  rngs=nnx.Rngs(1)))
  trained = param_leaves(head)
  assert trained.keys() == init.keys()
  for path, value in trained.items():
    assert not np.allclose(np.asarray(value), np.asarray(init[path])), path
  count = 4 * DIM + 2 * (3 * DIM * 2 * 8 + 2 * 8 * DIM) + DIM * 2 + 2
  assert benchmark[False]['report']['num_parameters'] == count


# Made-up validation scores per grid entry: the pooled-minority and worst-group rules disagree.
POOLED = [0.70, 0.90, 0.80]
WORST = [0.60, 0.10, 0.20]
GRID = (0.0, 0.5, 5.0)  # with lr 1e-2, large enough that the three heads differ


@pytest.mark.parametrize('minority_groups, chosen', [((1, 2), 1), ((), 0)])
def test_selection_rule_and_returned_head(monkeypatch, minority_groups, chosen):
  rng = np.random.default_rng(8)
  tokens = rng.normal(size=(24, 5, D)).astype(np.float32)
  labels = np.arange(24) % 2
  groups = np.arange(24) % 4
  calls = iter(range(len(GRID)))

  def scores(*args):
    i = next(calls)
    return {'accuracy': 0.5, 'worst_group_accuracy': WORST[i],
            'minority_accuracy_pooled': POOLED[i]}

  monkeypatch.setattr(dar, '_val_scores', scores)
  kw = dict(num_classes=2, val_tokens=tokens, val_labels=labels, val_groups=groups,
            minority_groups=minority_groups, seed=3, num_heads=2, lr=1e-2, batch_size=8,
            epochs=2)
  head, report = dar.train_dar(tokens, labels, weight_decay_grid=GRID, **kw)
  rule = 'minority_accuracy_pooled' if minority_groups else 'worst_group_accuracy'
  assert report['selection_rule'] == f'val {rule}'
  assert report['weight_decay'] == GRID[chosen]
  assert [g['weight_decay'] for g in report['grid']] == list(GRID)
  assert [g['val'][rule] for g in report['grid']] == (POOLED if minority_groups else WORST)
  # The returned head is the one trained with the chosen decay alone (same init, same batches),
  # and not the one of another decay.
  calls = iter([chosen, 2])
  alone, _ = dar.train_dar(tokens, labels, weight_decay_grid=(GRID[chosen],), **kw)
  other, _ = dar.train_dar(tokens, labels, weight_decay_grid=(GRID[2],), **kw)
  returned = param_leaves(head)
  for path, value in param_leaves(alone).items():
    np.testing.assert_array_equal(np.asarray(returned[path]), np.asarray(value))
  kernel = lambda h: np.asarray(h.layers[0].key.kernel[...])
  assert not np.allclose(kernel(head), kernel(other))


# ----------------------------------------------------------------------------
# Prediction and bad input
# ----------------------------------------------------------------------------
def test_predict_matches_the_module_in_padded_batches():
  head = dar.DARHead(D, C, num_queries=2, num_heads=2, rngs=nnx.Rngs(6))
  tokens, mask = tokens_and_mask(6)
  tokens = np.concatenate([tokens, tokens[::-1] + 1.0])
  mask = np.concatenate([mask, mask[::-1]])
  expected = np.asarray(forward(head, jnp.asarray(tokens), jnp.asarray(mask))[0])
  got = dar.predict(head, tokens, mask, batch_size=4)
  assert got.shape == (2 * B, C) and isinstance(got, np.ndarray)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_input_raises():
  tokens, mask = tokens_and_mask(7)
  labels = np.array([0, 1, 2])
  kw = dict(num_classes=C, val_tokens=tokens, val_labels=labels, val_groups=labels,
            minority_groups=(1,), seed=0, epochs=1)
  with pytest.raises(ValueError, match='dim 8 is not divisible by num_heads 3'):
    dar.DARHead(D, C, num_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='depth'):
    dar.DARHead(D, C, depth=0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r'tokens must be \[N, T, D\]'):
    dar.train_dar(tokens[0], labels, **kw)
  with pytest.raises(ValueError, match='labels must lie'):
    dar.train_dar(tokens, np.array([0, 1, 3]), **kw)
  bad_mask = mask.copy()
  bad_mask[1] = False
  with pytest.raises(ValueError, match='no kept token'):
    dar.train_dar(tokens, labels, key_mask=bad_mask, **kw)
  with pytest.raises(ValueError, match='minority_groups'):
    dar.train_dar(tokens, labels, **{**kw, 'minority_groups': (7,)})
  with pytest.raises(ValueError, match='weight_decay_grid'):
    dar.train_dar(tokens, labels, **kw, weight_decay_grid=())
  with pytest.raises(ValueError, match='key mask must be'):
    dar.predict(dar.DARHead(D, C, rngs=nnx.Rngs(0)), tokens, mask[:, :3])
  assert math.isfinite(dar.predict(dar.DARHead(D, C, rngs=nnx.Rngs(0)), tokens).sum())
