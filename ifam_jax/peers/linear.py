"""Logistic regression on frozen features: a JAX solver by default, scikit-learn optionally.

Two objectives, each that of the scikit-learn solver the peers' code uses (docs/peers.md), with
per-example weights s_i = class_weight[y_i] (1 without class weights):

  'l2'  lbfgs: 1/2 ||W||^2 + C sum_i s_i CE_i, bias not penalised. Multinomial for more than two
        classes; binomial (1/2 ||w||^2 + C sum_i s_i logloss_i on w = one decision vector) for two,
        as scikit-learn fits binary problems.
  'l1'  liblinear: ||w~||_1 + C sum_i s_i logloss_i with the bias inside w~ = [w; b] and penalised
        (intercept_scaling=1); one-vs-rest, one such problem per class. As in
        liblinear, a one-vs-rest problem weights its positives by class_weight[k] and its
        negatives by 1; a binary problem weights every example by its own class.

The JAX solvers run jitted whole (`lax.while_loop`) in float64 on the host CPU: in float32, FISTA
stalls ~0.4 % above liblinear's objective on uncentred features, where the penalised bias couples
to every weight; the problems are small. The number of examples is padded to a bucket with
zero-weight rows, so that fits on subsamples of different sizes share compilations. L2 runs
`optax.lbfgs` on centred features (exact, the bias being free) and the objective divided by
C sum_i s_i (scikit-learn's scaling) until the largest gradient entry is <= tol. L1 runs FISTA
with adaptive restart and a power-iteration step size until, in every one-vs-rest problem, the l1
norm of the gradient mapping is <= tol times its value at w~ = 0 (liblinear's rule on the
minimum-norm subgradient). Both are deterministic; `seed` reaches liblinear only.

A binary model is stored as two columns, weight [F, 2] = [-w/2, w/2] and bias [-b/2, b/2] for the
decision function f = x.w + b (class 1 when f > 0): the logit difference is f, softmax gives
sigmoid(f), argmax is the prediction, and the parameter-wise mean of such models is the model of
the mean decision function, as for every LinearModel.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PENALTIES = ('l1', 'l2')
BACKENDS = ('jax', 'sklearn')
# Defaults (max_iter, tol) per (backend, penalty): scikit-learn's own for its solvers; for JAX,
# tolerances that reach the optimum to ~1e-8 relative in objective on the peers' features.
DEFAULTS = {('sklearn', 'l1'): (100, 1e-4), ('sklearn', 'l2'): (100, 1e-4),
            ('jax', 'l1'): (20000, 1e-6), ('jax', 'l2'): (1000, 1e-7)}
_POWER_ITERATIONS = 50
_STEP_SAFETY = 1.1  # the power iteration estimates the largest eigenvalue from below


# ----------------------------------------------------------------------------
# Linear models
# ----------------------------------------------------------------------------
class LinearModel(NamedTuple):
  """logits = x @ weight + bias; weight [F, C], bias [C] (host numpy)."""
  weight: np.ndarray
  bias: np.ndarray


def logits(model: LinearModel, x: np.ndarray) -> np.ndarray:
  """[N, F] features -> [N, C] logits; argmax is the prediction."""
  return np.asarray(x) @ model.weight + model.bias


def from_binary(w: np.ndarray, b: float | np.ndarray) -> LinearModel:
  """The two-column model of the decision function x.w + b (positive = class 1)."""
  w, b = np.asarray(w), np.asarray(b, dtype=np.asarray(w).dtype).reshape(())
  return LinearModel(np.stack([-w / 2, w / 2], axis=1), np.stack([-b / 2, b / 2]))


def average(models: Sequence[LinearModel]) -> LinearModel:
  """Parameter-wise mean: the model whose logits are the mean of the models' logits."""
  if not models:
    raise ValueError('models is empty')
  return LinearModel(np.mean([m.weight for m in models], axis=0),
                     np.mean([m.bias for m in models], axis=0))


class Standardizer(NamedTuple):
  """scikit-learn's StandardScaler: (x - mean) / scale, population std, constant features kept."""
  mean: np.ndarray
  scale: np.ndarray

  @classmethod
  def fit(cls, x: np.ndarray) -> Standardizer:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not len(x):
      raise ValueError(f'x must be a non-empty [N, F] array, got shape {x.shape}')
    mean, std = x.mean(axis=0), x.std(axis=0)
    constant = std <= 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))
    return cls(mean, np.where(constant, 1.0, std))

  def apply(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    return ((x - self.mean) / self.scale).astype(dtype)


def fold_scaler(model: LinearModel, scaler: Standardizer) -> LinearModel:
  """The model on raw features equal to `model` applied to `scaler.apply(x)`."""
  weight = model.weight / scaler.scale[:, None]
  bias = model.bias - (scaler.mean / scaler.scale) @ model.weight
  return LinearModel(weight.astype(model.weight.dtype), bias.astype(model.bias.dtype))


# ----------------------------------------------------------------------------
# Objectives (host, float64)
# ----------------------------------------------------------------------------
def _softplus(z: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, z)


def _class_weights(num_classes: int, class_weight: Mapping[int, float] | None) -> np.ndarray:
  cw = np.ones(num_classes)
  for k, v in (class_weight or {}).items():
    cw[k] = v
  return cw


def _ovr_weights(y: np.ndarray, num_classes: int,
                 class_weight: Mapping[int, float] | None) -> np.ndarray:
  """[N, K] example weights of the one-vs-rest problems (K = 1 for binary), liblinear's rule."""
  cw = _class_weights(num_classes, class_weight)
  if num_classes == 2:
    return cw[y][:, None]
  return np.where(y[:, None] == np.arange(num_classes), cw[None, :], 1.0)


def objective(model: LinearModel, x: np.ndarray, y: np.ndarray, *, penalty: str, C: float,
              class_weight: Mapping[int, float] | None = None) -> float:
  """The objective `penalty` minimises (module docstring) at `model`, in float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y)
  w, b = np.asarray(model.weight, np.float64), np.asarray(model.bias, np.float64)
  num_classes = w.shape[1]
  if num_classes == 2:  # one decision vector
    w, b = (w[:, 1] - w[:, 0])[:, None], (b[1] - b[0])[None]
    sign = np.where(y == 1, 1.0, -1.0)[:, None]
  else:
    sign = np.where(y[:, None] == np.arange(num_classes), 1.0, -1.0)
  z = x @ w + b
  if penalty == 'l1':
    loss = _softplus(-sign * z) * _ovr_weights(y, num_classes, class_weight)
    return float(np.abs(w).sum() + np.abs(b).sum() + C * loss.sum())
  s = _class_weights(num_classes, class_weight)[y]
  if num_classes == 2:
    loss = _softplus(-sign[:, 0] * z[:, 0])
  else:
    zmax = z.max(axis=1)
    loss = zmax + np.log(np.exp(z - zmax[:, None]).sum(axis=1)) - z[np.arange(len(y)), y]
  return float(0.5 * (w**2).sum() + C * (s * loss).sum())


# ----------------------------------------------------------------------------
# JAX solvers
# ----------------------------------------------------------------------------
def _bucket(n: int) -> int:
  """n rounded up to a multiple of 2^(bits(n) - 3): at most 25 % padding, few distinct sizes."""
  step = 1 << max(0, n.bit_length() - 3)
  return -(-n // step) * step


def _pad_rows(a: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:], a.dtype)])


@functools.partial(jax.jit, static_argnames='num_outputs')
def _solve_l2(x, y, s, reg, max_iter, tol, *, num_outputs: int):
  """lbfgs on reg/2 ||W||^2 + sum_i s_i loss_i (s sums to 1): -> (W, b, iterations, max |grad|).

  num_outputs = 1: binomial on one decision vector; otherwise multinomial.
  """
  binary = num_outputs == 1

  def fun(params):
    w, b = params
    z = x @ w + b
    if binary:
      loss = jax.nn.softplus(-(2.0 * y - 1.0) * z[:, 0])
    else:
      loss = jax.nn.logsumexp(z, axis=1) - jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    return 0.5 * reg * jnp.sum(w * w) + jnp.sum(s * loss)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(fun)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
    return optax.apply_updates(params, updates), state

  def grad_max(state):
    return optax.tree.max(jax.tree.map(jnp.abs, optax.tree.get(state, 'grad')))

  def running(carry):
    count = optax.tree.get(carry[1], 'count')
    return (count == 0) | ((count < max_iter) & (grad_max(carry[1]) > tol))

  params = (jnp.zeros((x.shape[1], num_outputs), x.dtype), jnp.zeros((num_outputs,), x.dtype))
  params, state = jax.lax.while_loop(running, step, (params, opt.init(params)))
  return params[0], params[1], optax.tree.get(state, 'count'), grad_max(state)


@jax.jit
def _solve_l1(x1, sign, cw, max_iter, tol):
  """FISTA on sum_k ||w_k||_1 + sum_ik cw_ik logloss(sign_ik x1_i.w_k), x1 = [x, 1].

  -> (W~ [F+1, K], iterations, max over k of |gradient mapping|_1 / its value at 0).
  """
  def grad(w):
    return x1.T @ (-cw * sign * jax.nn.sigmoid(-sign * (x1 @ w)))

  def power(_, v):
    v = x1.T @ (cw * (x1 @ v))
    return v / jnp.maximum(jnp.linalg.norm(v, axis=0), 1e-30)

  v0 = jnp.ones((x1.shape[1], cw.shape[1]), x1.dtype) / np.sqrt(x1.shape[1])
  v = jax.lax.fori_loop(0, _POWER_ITERATIONS, power, v0)
  lam = jnp.linalg.norm(x1.T @ (cw * (x1 @ v)), axis=0)
  lipschitz = jnp.maximum(0.25 * _STEP_SAFETY * lam, 1e-12)

  def prox_step(w):
    """The proximal-gradient point from w and the l1 norm of its gradient mapping, per column."""
    w_new = w - grad(w) / lipschitz
    w_new = jnp.sign(w_new) * jnp.maximum(jnp.abs(w_new) - 1.0 / lipschitz, 0.0)
    return w_new, jnp.sum(jnp.abs(w - w_new), axis=0) * lipschitz

  w0 = jnp.zeros_like(v0)
  _, scale0 = prox_step(w0)
  scale0 = jnp.where(scale0 > 0, scale0, 1.0)

  def step(carry):
    k, w, y, t, _ = carry
    w_new, gmap = prox_step(y)
    restart = jnp.sum((y - w_new) * (w_new - w), axis=0) > 0
    t_new = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    beta = jnp.where(restart, 0.0, (t - 1.0) / t_new)
    t_new = jnp.where(restart, 1.0, t_new)
    return k + 1, w_new, w_new + beta * (w_new - w), t_new, jnp.max(gmap / scale0)

  def running(carry):
    return (carry[0] < max_iter) & (carry[4] > tol)

  ones = jnp.ones((cw.shape[1],), x1.dtype)
  init = (jnp.int32(0), w0, w0, ones, jnp.asarray(jnp.inf, x1.dtype))
  k, w, _, _, err = jax.lax.while_loop(running, step, init)
  return w, k, err


def _fit_jax(x, y, num_classes, penalty, C, class_weight, max_iter, tol):
  with jax.enable_x64(True), jax.default_device(jax.devices('cpu')[0]):
    return _fit_jax_x64(x, y, num_classes, penalty, C, class_weight, max_iter, tol)


def _fit_jax_x64(x, y, num_classes, penalty, C, class_weight, max_iter, tol):
  n = len(y)
  size = _bucket(n)
  x = x.astype(np.float64)
  if penalty == 'l2':
    # The bias is free, so centring the features is an exact change of variables (b absorbs
    # -mean.W); it removes the bias-weight coupling that slows lbfgs on uncentred features.
    mean = x.mean(axis=0)
    s = _class_weights(num_classes, class_weight)[y]
    total = s.sum()
    w, b, count, err = _solve_l2(_pad_rows(x - mean, size), _pad_rows(y.astype(np.int32), size),
                                 _pad_rows(s / total, size), 1.0 / (C * total), max_iter, tol,
                                 num_outputs=1 if num_classes == 2 else num_classes)
    w = np.asarray(w)
    b = np.asarray(b) - mean @ w
    model = from_binary(w[:, 0], b[0]) if num_classes == 2 else LinearModel(w, b)
    return model, int(count), bool(err <= tol)
  xp = _pad_rows(x, size)
  if num_classes == 2:
    sign = np.where(y == 1, 1.0, -1.0)[:, None]
  else:
    sign = np.where(y[:, None] == np.arange(num_classes), 1.0, -1.0)
  cw = C * _ovr_weights(y, num_classes, class_weight)
  x1 = np.concatenate([xp, (np.arange(size) < n)[:, None].astype(np.float64)], axis=1)
  w, count, err = _solve_l1(x1, _pad_rows(sign, size), _pad_rows(cw, size), max_iter, tol)
  w = np.asarray(w)
  model = from_binary(w[:-1, 0], w[-1, 0]) if num_classes == 2 else LinearModel(w[:-1], w[-1])
  return model, int(count), bool(err <= tol)


# ----------------------------------------------------------------------------
# scikit-learn backend
# ----------------------------------------------------------------------------
def _fit_sklearn(x, y, num_classes, penalty, C, class_weight, max_iter, tol, seed):
  try:
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("backend='sklearn' needs scikit-learn: pip install -e '.[peers]'") from e
  if penalty == 'l2':
    clf = LogisticRegression(C=C, solver='lbfgs', class_weight=dict(class_weight or {}) or None,
                             max_iter=max_iter, tol=tol).fit(x, y)
    model = (from_binary(clf.coef_[0], clf.intercept_[0]) if num_classes == 2 else
             LinearModel(np.ascontiguousarray(clf.coef_.T), clf.intercept_.copy()))
    iterations = int(np.max(clf.n_iter_))
    return model, iterations, iterations < max_iter
  # liblinear is binary in scikit-learn >= 1.8: one binary problem per class, as liblinear's own
  # one-vs-rest (positives weighted by their class, negatives by 1).
  cw = dict(class_weight or {})
  problems = [(y, cw)] if num_classes == 2 else [
      ((y == k).astype(int), {0: 1.0, 1: cw.get(k, 1.0)}) for k in range(num_classes)]
  coefs, intercepts, iterations = [], [], 0
  for labels, weights in problems:
    clf = LogisticRegression(l1_ratio=1.0, C=C, solver='liblinear', random_state=seed,
                             class_weight=weights or None, max_iter=max_iter, tol=tol)
    clf.fit(x, labels)
    coefs.append(clf.coef_[0])
    intercepts.append(clf.intercept_[0])
    iterations = max(iterations, int(np.max(clf.n_iter_)))
  if num_classes == 2:
    model = from_binary(coefs[0], intercepts[0])
  else:
    model = LinearModel(np.stack(coefs, axis=1), np.asarray(intercepts))
  return model, iterations, iterations < max_iter


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def fit_logistic(x: np.ndarray, y: np.ndarray, *, num_classes: int, penalty: str, C: float,
                 backend: str = 'jax', class_weight: Mapping[int, float] | None = None,
                 max_iter: int | None = None, tol: float | None = None,
                 seed: int = 0) -> tuple[LinearModel, dict[str, Any]]:
  """Fits the `penalty` objective of the module docstring on x [N, F], y [N] in [0, num_classes).

  Every class must occur in y. max_iter / tol default per backend and penalty (`DEFAULTS`); they
  mean the backend's own stopping rule. Returns the model and info: converged, iterations and the
  final objective (`objective`, float64).
  """
  x, y = np.asarray(x), np.asarray(y)
  if penalty not in PENALTIES:
    raise ValueError(f'penalty must be one of {PENALTIES}, got {penalty!r}')
  if backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}, got {backend!r}')
  if not C > 0:
    raise ValueError(f'C must be > 0, got {C}')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}')
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
    raise ValueError(f'x must be a finite numeric [N, F] array, got shape {x.shape}')
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'y must be integer labels of shape ({len(x)},), got {y.dtype} {y.shape}')
  if not len(y) or y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f'y must be non-empty and lie in [0, {num_classes})')
  if missing := sorted(set(range(num_classes)) - set(np.unique(y).tolist())):
    raise ValueError(f'y must hold every class of range({num_classes}); missing {missing}')
  if class_weight and any(k not in range(num_classes) or not v > 0
                          for k, v in class_weight.items()):
    raise ValueError(f'class_weight must map classes in range({num_classes}) to weights > 0, '
                     f'got {dict(class_weight)}')
  default_iter, default_tol = DEFAULTS[backend, penalty]
  max_iter = default_iter if max_iter is None else int(max_iter)
  tol = default_tol if tol is None else float(tol)
  if backend == 'jax':
    model, iterations, converged = _fit_jax(x, y, num_classes, penalty, float(C), class_weight,
                                            max_iter, tol)
  else:
    model, iterations, converged = _fit_sklearn(x, y, num_classes, penalty, float(C),
                                                class_weight, max_iter, tol, seed)
  info = {'converged': converged, 'iterations': iterations, 'backend': backend,
          'objective': objective(model, x, y, penalty=penalty, C=C, class_weight=class_weight)}
  return model, info
