"""DAR (Deep Attention Reweighting): attention pooling over frozen tokens, retrained post hoc.

DAR replaces global average pooling by a small attention module and retrains it, with a linear
head, on a balanced target split while the backbone stays frozen [DAR §4.3, App. E]:

  Q' = MH_1(Q, A, A)         learned queries Q [n_q, D] updated in the context of the tokens A
  Z  = MH_2(Q', A, A)        [n_q, D], the pooling layer
  logits = mean_q(Z) W + b

with MH(Q, K, V) = Concat_i softmax(Q W_i^Q (K W_i^K)^T / sqrt(d_k)) V W_i^V  W^O. The tokens
(here a ViT's final-normed patch tokens, a CNN's flattened activation map in the paper) are both
keys and values. There is no positional encoding, so the head is invariant to the order of the
tokens; ViT tokens already carry their position embeddings, which the paper's CNN maps do not.
The pooling is more than a selection of tokens: from layer 2 on the queries depend on the image,
so how sharply the softmax picks tokens is itself a nonlinear feature of the content (on
synthetic maps where every token holds the same signal plus its own noise, this alone can solve
labels no linear head on the average can; see the overlap control in the tests).

Choices the paper leaves open, each a keyword argument with the default named here:
  - `identity_values=False`: full multi-head attention (App. E). True is the Eq. 5 reading, where
    z_c = sum_n alpha_{c,n} A_{n,c} pools the backbone channels themselves: head i weights the
    channel block i*D/h .. (i+1)*D/h - 1 (no W^V, no W^O);
  - `residual_norm=False`: no residual, LayerNorm or MLP around the attention layers (App. E as
    written); True is the transformer-decoder ablation q <- LayerNorm(q + MH(q, A, A)) (post-norm,
    eps 1e-5, no MLP);
  - projections W^{Q,K,V,O} without biases, so the parameter count is
      n_q*D + depth*(3*D*h*d_k + h*d_k*D) + D*C + C,
    with `identity_values` n_q*D + depth*(2*D*h*d_k) + D*C + C, plus 2*D per layer with
    `residual_norm`;
  - n_q=4, h=4, d_k=D/h; AdamW lr 1e-3, weight decay tuned over {1e-4, 1e-3, 1e-2}, batch 64,
    100 epochs; decay on matrices only (the queries included), never on vectors (the head's bias);
  - learned queries start from N(0, 1) (torch's nn.Embedding, as DETR's query embedding); the
    projections and the head from nnx.Linear's default (LeCun normal kernels, zero bias).

Model selection picks the weight decay by pooled minority-group validation accuracy (accuracy
over all validation samples of the minority groups, DAR's metric), or by worst-group accuracy
when no minority groups are given.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ifam_jax import losses
from ifam_jax.evaluators import metrics as metrics_lib
from ifam_jax.models.vit import key_bias_from_mask


# ----------------------------------------------------------------------------
# The attention module
# ----------------------------------------------------------------------------
def _linear(din: int, dout: int, rngs: nnx.Rngs, use_bias: bool = False) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=use_bias, param_dtype=jnp.float32, rngs=rngs)


class CrossAttention(nnx.Module):
  """Multi-head attention of queries [B, n_q, D] over tokens [B, N, D] (keys and values).

  With `residual_norm` the output is LayerNorm(queries + attention output).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, identity_values: bool,
               residual_norm: bool, *, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = num_heads, head_dim
    self.identity_values = identity_values
    self.query = _linear(dim, num_heads * head_dim, rngs)
    self.key = _linear(dim, num_heads * head_dim, rngs)
    if not identity_values:
      self.value = _linear(dim, num_heads * head_dim, rngs)
      self.out = _linear(num_heads * head_dim, dim, rngs)
    self.norm = (nnx.LayerNorm(dim, epsilon=1e-5, param_dtype=jnp.float32, rngs=rngs)
                 if residual_norm else None)

  def __call__(self, queries: jax.Array, tokens: jax.Array,
               key_bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Returns the updated queries [B, n_q, D] and the attention [B, h, n_q, N] (fp32)."""
    b, n, d = tokens.shape
    h, dk = self.num_heads, self.head_dim
    q = self.query(queries).reshape(b, -1, h, dk)
    k = self.key(tokens).reshape(b, n, h, dk)
    logits = jnp.einsum('bqhd,bnhd->bhqn', q, k) / math.sqrt(dk)
    if key_bias is not None:
      logits = logits + key_bias[:, None, None, :]
    attention = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if self.identity_values:
      channels = tokens.reshape(b, n, h, d // h)
      out = jnp.einsum('bhqn,bnhc->bqhc', attention, channels).reshape(b, -1, d)
    else:
      v = self.value(tokens).reshape(b, n, h, dk)
      out = self.out(jnp.einsum('bhqn,bnhd->bqhd', attention, v).reshape(b, -1, h * dk))
    if self.norm is not None:
      out = self.norm(queries + out)
    return out, attention


class DARHead(nnx.Module):
  """Learned queries -> `depth` cross-attention layers over the tokens -> mean -> linear head.

  Layers before the last update the queries; the last one pools. `head_dim=0` means D // h.
  """

  def __init__(self, dim: int, num_classes: int, *, num_queries: int = 4, num_heads: int = 4,
               head_dim: int = 0, depth: int = 2, identity_values: bool = False,
               residual_norm: bool = False, rngs: nnx.Rngs):
    for name, value in (('dim', dim), ('num_classes', num_classes),
                        ('num_queries', num_queries), ('num_heads', num_heads),
                        ('depth', depth)):
      if value < 1:
        raise ValueError(f'{name} must be >= 1, got {value}')
    if head_dim < 0:
      raise ValueError(f'head_dim must be >= 0 (0 = dim // num_heads), got {head_dim}')
    if (identity_values or not head_dim) and dim % num_heads:
      raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
    head_dim = head_dim or dim // num_heads
    self.queries = nnx.Param(jax.random.normal(rngs.params(), (num_queries, dim), jnp.float32))
    self.layers = nnx.List([CrossAttention(dim, num_heads, head_dim, identity_values,
                                           residual_norm, rngs=rngs) for _ in range(depth)])
    self.head = _linear(dim, num_classes, rngs, use_bias=True)

  def pool(self, tokens: jax.Array,
           key_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """The pooled feature [B, D] (mean over the queries) and each layer's attention."""
    tokens = tokens.astype(jnp.float32)
    key_bias = None if key_mask is None else key_bias_from_mask(key_mask)
    queries = jnp.broadcast_to(self.queries[...], (tokens.shape[0],) + self.queries.shape)
    attentions = []
    for layer in self.layers:
      queries, attention = layer(queries, tokens, key_bias)
      attentions.append(attention)
    return queries.mean(axis=1), attentions

  def __call__(self, tokens: jax.Array,
               key_mask: jax.Array | None = None) -> tuple[jax.Array, list[jax.Array]]:
    """Logits [B, C] (fp32) and the attention [B, h, n_q, N] of each layer.

    `key_mask` [B, N]: False tokens get exactly zero weight; every row needs a True entry.
    """
    pooled, attentions = self.pool(tokens, key_mask)
    return self.head(pooled), attentions


# ----------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------
def _check_tokens(name: str, tokens: Any, key_mask: Any) -> np.ndarray | None:
  """Raises on a tokens array that is not [N, T, D] or a key mask that does not match it."""
  if np.ndim(tokens) != 3:
    raise ValueError(f'{name} must be [N, T, D], got shape {np.shape(tokens)}')
  if key_mask is None:
    return None
  key_mask = np.asarray(key_mask)
  if key_mask.shape != np.shape(tokens)[:2]:
    raise ValueError(f'{name} key mask must be [N, T] = {np.shape(tokens)[:2]}, '
                     f'got {key_mask.shape}')
  if not key_mask.astype(bool).any(axis=1).all():
    raise ValueError(f'{name} key mask has a row with no kept token')
  return key_mask.astype(bool)


def _check_labels(name: str, labels: Any, n: int, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'{name} must be integer [{n}], got {labels.dtype} {labels.shape}')
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f'{name} must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}')
  return labels.astype(np.int32)


# ----------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
            key_mask: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, params)(tokens, key_mask)[0]


def predict(head: DARHead, tokens: Any, key_mask: Any = None,
            batch_size: int = 256) -> np.ndarray:
  """Logits [N, C] (host fp32) of `head` on tokens [N, T, D], in jitted batches of one shape.

  Batches are sliced on the host, so `tokens` may be a memory-mapped cache larger than the device.
  """
  key_mask = _check_tokens('tokens', tokens, key_mask)
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  n = len(tokens)
  graphdef, params = nnx.split(head)
  batch_size = max(1, min(batch_size, n))
  out = [np.zeros((0, head.head.out_features), np.float32)]
  for start in range(0, n, batch_size):
    chunk = np.asarray(tokens[start:start + batch_size])
    keep = (np.ones(chunk.shape[:2], bool) if key_mask is None
            else key_mask[start:start + batch_size])
    pad = batch_size - len(chunk)
    chunk = np.pad(chunk, ((0, pad), (0, 0), (0, 0)))
    keep = np.pad(keep, ((0, pad), (0, 0)), constant_values=True)
    out.append(np.asarray(_logits(graphdef, params, chunk, keep))[:batch_size - pad])
  return np.concatenate(out)


# ----------------------------------------------------------------------------
# Training and selection
# ----------------------------------------------------------------------------
def _padded_batches(n: int, batch_size: int):
  """(index [batch_size] with the tail padded by index 0, number of real rows) per batch."""
  for start in range(0, n, batch_size):
    index = np.arange(start, min(start + batch_size, n))
    yield np.pad(index, (0, batch_size - index.size)), index.size


@functools.cache
def _adamw() -> optax.GradientTransformation:
  """AdamW with lr and weight decay in the state, so one compiled step serves the whole grid."""
  decays = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.inject_hyperparams(optax.adamw, static_args=('mask',))(
      learning_rate=0.0, weight_decay=0.0, mask=decays)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
                opt_state: Any, tokens: jax.Array, labels: jax.Array, key_mask: jax.Array,
                index: jax.Array, weights: jax.Array) -> tuple[nnx.State, Any, jax.Array]:
  """One AdamW step on the rows `index` of the target split (padding rows have weight 0)."""

  def loss_fn(p):
    logits = nnx.merge(graphdef, p)(tokens[index], key_mask[index])[0]
    return losses.cross_entropy(logits, labels[index], weights)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def _val_scores(logits: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                minority_groups: Sequence[int]) -> dict[str, float]:
  """Validation accuracy, worst-group accuracy and pooled minority-group accuracy."""
  names = [str(g) for g in range(int(groups.max()) + 1)]
  m = metrics_lib.classification_metrics(logits, labels, groups, group_names=names,
                                         minority_groups=minority_groups)
  keys = ('accuracy', 'worst_group_accuracy', 'minority_accuracy_pooled')
  return {k: m[k] for k in keys if k in m}


def train_dar(tokens: Any, labels: Any, *, num_classes: int, key_mask: Any = None,
              val_tokens: Any, val_labels: Any, val_groups: Any, val_key_mask: Any = None,
              minority_groups: Sequence[int], seed: int, num_queries: int = 4,
              num_heads: int = 4, head_dim: int = 0, depth: int = 2,
              identity_values: bool = False, residual_norm: bool = False, lr: float = 1e-3,
              weight_decay_grid: Sequence[float] = (1e-4, 1e-3, 1e-2), batch_size: int = 64,
              epochs: int = 100) -> tuple[DARHead, dict[str, Any]]:
  """Trains one DARHead per weight decay on the target tokens and keeps the best on val.

  Args:
    tokens, labels, key_mask: the target split, [N, T, D] tokens of the frozen backbone (any
      float dtype; computed in fp32), [N] labels, optional [N, T] bool key mask. The tokens are
      used as given: the caller builds the balanced target split (DAR's "uniform distribution over
      classes within each spurious attribute", e.g. by subsampling every group to the smallest).
    val_tokens, val_labels, val_groups, val_key_mask: the validation split, with group ids.
    minority_groups: group ids whose samples make up the selection metric, the pooled
      minority-group accuracy; empty selects by worst-group accuracy over the groups present.
    seed: every head of the grid starts from DARHead(rngs=nnx.Rngs(seed)) and sees the same
      minibatch order (per-epoch shuffles of np.random.default_rng(seed)).
    num_queries, num_heads, head_dim, depth, identity_values, residual_norm: DARHead's
      (head_dim 0 = D // num_heads).
    lr, weight_decay_grid, batch_size, epochs: AdamW; the last minibatch of an epoch is padded
      with zero-weight rows, so each step has one shape. batch_size >= N trains full-batch.

  Returns:
    The selected head and a report: the grid's validation scores and final train losses, the
    chosen weight decay, the selection rule and the hyperparameters.
  """
  key_mask = _check_tokens('tokens', tokens, key_mask)
  val_key_mask = _check_tokens('val_tokens', val_tokens, val_key_mask)
  n, num_tokens, dim = np.shape(tokens)
  if np.shape(val_tokens)[2] != dim:
    raise ValueError(f'val_tokens have {np.shape(val_tokens)[2]} channels, tokens have {dim}')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}')
  if not n:
    raise ValueError('tokens are empty')
  labels = _check_labels('labels', labels, n, num_classes)
  val_labels = _check_labels('val_labels', val_labels, len(val_tokens), num_classes)
  val_groups = np.asarray(val_groups)
  if val_groups.shape != val_labels.shape or not np.issubdtype(val_groups.dtype, np.integer):
    raise ValueError(f'val_groups must be integer {val_labels.shape}, got {val_groups.dtype} '
                     f'{val_groups.shape}')
  if not len(val_labels):
    raise ValueError('val_tokens are empty')
  if val_groups.min() < 0:
    raise ValueError(f'val_groups must be >= 0, got {val_groups.min()}')
  minority_groups = [int(g) for g in minority_groups]
  if minority_groups and not np.isin(val_groups, minority_groups).any():
    raise ValueError(f'no validation sample is in minority_groups {minority_groups}')
  if not weight_decay_grid or min(weight_decay_grid) < 0:
    raise ValueError(f'weight_decay_grid must be non-empty and >= 0, got {weight_decay_grid}')
  if batch_size < 1 or epochs < 1 or lr <= 0:
    raise ValueError(f'batch_size and epochs must be >= 1 and lr > 0, got {batch_size}, '
                     f'{epochs}, {lr}')
  head_kw = dict(num_queries=num_queries, num_heads=num_heads, head_dim=head_dim, depth=depth,
                 identity_values=identity_values, residual_norm=residual_norm)
  graphdef, init_params = nnx.split(DARHead(dim, num_classes, **head_kw, rngs=nnx.Rngs(seed)))

  # The same minibatch schedule for every weight decay.
  batch = min(batch_size, n)
  rng = np.random.default_rng(seed)
  batches = list(_padded_batches(n, batch))
  orders = [rng.permutation(n) for _ in range(epochs)]
  tx = _adamw()
  device_tokens = jnp.asarray(tokens)
  device_labels = jnp.asarray(labels)
  device_mask = jnp.ones((n, num_tokens), bool) if key_mask is None else jnp.asarray(key_mask)

  runs = []
  for weight_decay in weight_decay_grid:
    params = jax.tree.map(jnp.array, init_params)  # a copy: the step donates its input
    opt_state = tx.init(params)
    opt_state.hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
    opt_state.hyperparams['weight_decay'] = jnp.asarray(weight_decay, jnp.float32)
    for order in orders:
      last_epoch_loss = 0.0
      for index, size in batches:
        weights = (np.arange(batch) < size).astype(np.float32)
        params, opt_state, loss = _train_step(graphdef, tx, params, opt_state, device_tokens,
                                              device_labels, device_mask, order[index], weights)
        last_epoch_loss += loss * size
    head = nnx.merge(graphdef, params)
    scores = _val_scores(predict(head, val_tokens, val_key_mask), val_labels, val_groups,
                         minority_groups)
    runs.append((head, float(last_epoch_loss) / n, scores))

  rule = 'minority_accuracy_pooled' if minority_groups else 'worst_group_accuracy'
  best = int(np.argmax([scores[rule] for _, _, scores in runs]))  # ties: the first in the grid
  report = {
      'selection_rule': f'val {rule}',
      'weight_decay': float(weight_decay_grid[best]),
      'val': runs[best][2],
      'grid': [{'weight_decay': float(wd), 'train_loss': loss, 'val': scores}
               for wd, (_, loss, scores) in zip(weight_decay_grid, runs)],
      'minority_groups': minority_groups,
      'num_train': n,
      'steps': epochs * len(batches),
      'num_parameters': sum(x.size for x in jax.tree.leaves(init_params)),
      'hyperparameters': dict(head_kw, lr=lr, batch_size=batch_size, epochs=epochs, seed=seed,
                              optimizer='adamw'),
      'target': 'as given (balanced by the caller)',
  }
  return runs[best][0], report
