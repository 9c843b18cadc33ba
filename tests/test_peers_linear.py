"""Tests of ifam_jax.peers.linear: the JAX solvers against scikit-learn, objectives and optimality
conditions written out here in NumPy, the scaler against StandardScaler."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from fixtures.spurious_embeddings import make_splits
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from ifam_jax.peers import linear


@functools.cache
def data() -> dict[str, np.ndarray]:
  """The synthetic val/test sets, standardised by StandardScaler fit on val (x_raw: val
  as generated); 4 classes = the groups."""
  splits = make_splits(0)
  (xv, yv, gv), (xt, yt, gt) = splits['val'], splits['test']
  scaler = StandardScaler().fit(xv)
  return dict(x=scaler.transform(xv), y=yv, g=gv, x_test=scaler.transform(xt), y_test=yt,
              g_test=gt, x_raw=xv.astype(np.float64))


def softplus(z: np.ndarray) -> np.ndarray:
  return np.logaddexp(0.0, z)


def as_sklearn(model: linear.LinearModel) -> tuple[np.ndarray, np.ndarray]:
  """(coef [K, F], intercept [K]) in scikit-learn's layout; K = 1 for the two-column binary."""
  w, b = np.asarray(model.weight, np.float64), np.asarray(model.bias, np.float64)
  if w.shape[1] == 2:
    return (w[:, 1] - w[:, 0])[None], (b[1] - b[0])[None]
  return w.T, b


def liblinear_objective(coef, intercept, x, y, C):
  """sum over one-vs-rest problems of |w|_1 + |b| + C sum_i log(1 + exp(-s_i (x_i.w + b)))."""
  total = 0.0
  for k, (w, b) in enumerate(zip(coef, intercept)):
    s = np.where(y == (1 if len(coef) == 1 else k), 1.0, -1.0)
    total += np.abs(w).sum() + abs(b) + C * softplus(-s * (x @ w + b)).sum()
  return total


def lbfgs_objective(coef, intercept, x, y, C):
  """1/2 |W|^2 + C sum_i CE_i (binomial for one row), bias free."""
  z = x @ coef.T + intercept
  if len(coef) == 1:
    loss = softplus(-np.where(y == 1, 1.0, -1.0) * z[:, 0])
  else:
    loss = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
  return 0.5 * (coef**2).sum() + C * loss.sum()


def sklearn_l1(x, y, C, **kw):
  base = LogisticRegression(l1_ratio=1.0, C=C, solver='liblinear', **kw)
  if y.max() == 1:
    clf = base.fit(x, y)
    return clf.coef_, clf.intercept_
  ovr = OneVsRestClassifier(base).fit(x, y)
  return (np.concatenate([e.coef_ for e in ovr.estimators_]),
          np.concatenate([e.intercept_ for e in ovr.estimators_]))


# ----------------------------------------------------------------------------
# Parity with scikit-learn
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('labels, C, offset', [('y', 1.0, 0.0), ('y', 0.03, 0.0), ('g', 1.0, 0.0),
                                               ('y', 0.1, 5.0)])
def test_l1_matches_liblinear(labels, C, offset):
  """>= 99 % equal test predictions, objective within 1e-4 relative, bias penalised
  (offset: uncentred features, where an unpenalised bias would move far)."""
  d = data()
  x, y, x_test = d['x'] + offset, d[labels], d['x_test'] + offset
  num_classes = int(y.max()) + 1
  coef, intercept = sklearn_l1(x, y, C)
  model, info = linear.fit_logistic(x, y, num_classes=num_classes, penalty='l1', C=C)
  assert info['converged']
  ours = liblinear_objective(*as_sklearn(model), x, y, C)
  theirs = liblinear_objective(coef, intercept, x, y, C)
  assert abs(ours - theirs) <= 1e-4 * theirs
  assert info['objective'] == pytest.approx(ours, rel=1e-9)
  pred = linear.logits(model, x_test).argmax(1)
  z = x_test @ coef.T + intercept
  theirs_pred = (z[:, 0] > 0).astype(int) if num_classes == 2 else z.argmax(1)
  assert (pred == theirs_pred).mean() >= 0.99
  np.testing.assert_allclose(as_sklearn(model)[1], intercept, rtol=0.02, atol=0.02)


@pytest.mark.parametrize('labels', ['y', 'g'])
def test_l2_matches_lbfgs(labels):
  d = data()
  x, y = d['x'], d[labels]
  num_classes = int(y.max()) + 1
  clf = LogisticRegression(C=0.3, tol=1e-10, max_iter=10000).fit(x, y)
  model, info = linear.fit_logistic(x, y, num_classes=num_classes, penalty='l2', C=0.3)
  assert info['converged']
  ours = lbfgs_objective(*as_sklearn(model), x, y, 0.3)
  theirs = lbfgs_objective(clf.coef_, clf.intercept_, x, y, 0.3)
  assert abs(ours - theirs) <= 1e-4 * theirs
  assert (linear.logits(model, d['x_test']).argmax(1) == clf.predict(d['x_test'])).mean() >= 0.99


def test_l1_class_weight_matches_liblinear():
  """A binary problem weights each example by its class's weight in liblinear."""
  d = data()
  coef, intercept = sklearn_l1(d['x'], d['y'], 0.3, class_weight={0: 1.0, 1: 10.0}, tol=1e-8)
  model, _ = linear.fit_logistic(d['x'], d['y'], num_classes=2, penalty='l1', C=0.3,
                                 class_weight={1: 10.0})
  w, b = as_sklearn(model)
  np.testing.assert_allclose(w, coef, atol=1e-3)
  np.testing.assert_allclose(b, intercept, atol=1e-3)


@pytest.mark.parametrize('labels, penalty', [('y', 'l1'), ('g', 'l1'), ('y', 'l2'), ('g', 'l2')])
def test_sklearn_backend_is_sklearn(labels, penalty):
  """The backend's LinearModel reproduces scikit-learn's decision function, OvR for 4 classes."""
  d = data()
  x, y = d['x'], d[labels]
  num_classes = int(y.max()) + 1
  model, info = linear.fit_logistic(x, y, num_classes=num_classes, penalty=penalty, C=0.3,
                                    backend='sklearn', seed=3)
  if penalty == 'l1':
    coef, intercept = sklearn_l1(x, y, 0.3, random_state=3)
    z = d['x_test'] @ coef.T + intercept
  else:
    z = LogisticRegression(C=0.3).fit(x, y).decision_function(d['x_test'])
  got = linear.logits(model, d['x_test'])
  if num_classes == 2:
    got, z = got[:, 1] - got[:, 0], z.reshape(-1)
  np.testing.assert_allclose(got, z, rtol=1e-6, atol=1e-6)
  assert info['converged'] and info['backend'] == 'sklearn'


# ----------------------------------------------------------------------------
# Optimality of the JAX solutions, in NumPy
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('labels', ['y', 'g'])
def test_l2_gradient_vanishes(labels):
  """Uncentred features, class weights: the gradient of 1/2|W|^2 + C sum s_i CE_i."""
  d = data()
  x, y = d['x_raw'] + 5.0, d[labels]
  num_classes, C, weights = int(y.max()) + 1, 2.0, {1: 3.0}
  s = np.where(y == 1, 3.0, 1.0)
  model, _ = linear.fit_logistic(x, y, num_classes=num_classes, penalty='l2', C=C,
                                 class_weight=weights)
  coef, intercept = as_sklearn(model)

  def gradient(coef, intercept):
    z = x @ coef.T + intercept
    if num_classes == 2:
      r = (s * (1.0 / (1.0 + np.exp(-z[:, 0])) - (y == 1)))[:, None]
    else:
      p = np.exp(z - z.max(1, keepdims=True))
      r = s[:, None] * (p / p.sum(1, keepdims=True) - np.eye(num_classes)[y])
    return np.concatenate([(coef + C * r.T @ x).ravel(), C * r.sum(0)])

  start = np.abs(gradient(np.zeros_like(coef), np.zeros_like(intercept))).max()
  assert np.abs(gradient(coef, intercept)).max() <= 1e-6 * start


@pytest.mark.parametrize('labels', ['y', 'g'])
def test_l1_subgradient_conditions(labels):
  """Per one-vs-rest problem, g = C grad(loss) over [w; b]: |g_j + sign w_j| ~ 0 where w_j != 0,
  |g_j| <= 1 where w_j = 0; and some coordinates are exactly 0."""
  d = data()
  x, y, C = d['x'], d[labels], 0.05
  model, _ = linear.fit_logistic(x, y, num_classes=int(y.max()) + 1, penalty='l1', C=C)
  coef, intercept = as_sklearn(model)
  x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  for k, wt in enumerate(np.concatenate([coef, intercept[:, None]], axis=1)):
    s = np.where(y == (1 if len(coef) == 1 else k), 1.0, -1.0)
    g = C * x1.T @ (-s / (1.0 + np.exp(s * (x1 @ wt))))
    nonzero = wt != 0
    assert np.abs(g[nonzero] + np.sign(wt[nonzero])).max() <= 1e-3
    assert np.abs(g[~nonzero]).max() <= 1 + 1e-3
    assert (~nonzero).sum() >= 5


# ----------------------------------------------------------------------------
# Models, scaler, input checks
# ----------------------------------------------------------------------------
def test_binary_layout_and_average():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 3))
  w, b = rng.normal(size=3), 0.4
  z = linear.logits(linear.from_binary(w, b), x)
  np.testing.assert_allclose(z[:, 1] - z[:, 0], x @ w + b, rtol=1e-12)
  np.testing.assert_allclose(np.exp(z[:, 1]) / np.exp(z).sum(1), 1 / (1 + np.exp(-(x @ w + b))))
  models = [linear.LinearModel(rng.normal(size=(3, 4)), rng.normal(size=4)) for _ in range(5)]
  mean_logits = np.mean([linear.logits(m, x) for m in models], axis=0)
  np.testing.assert_allclose(linear.logits(linear.average(models), x), mean_logits, rtol=1e-12)


def test_standardizer_and_fold():
  rng = np.random.default_rng(2)
  x = rng.normal(3.0, 2.0, size=(50, 4))
  x[:, 2] = 7.0  # constant: scale 1, as StandardScaler
  ref = StandardScaler().fit(x)
  scaler = linear.Standardizer.fit(x)
  np.testing.assert_allclose(scaler.mean, ref.mean_)
  np.testing.assert_allclose(scaler.scale, ref.scale_)
  np.testing.assert_allclose(scaler.apply(x), ref.transform(x), atol=1e-12)
  model = linear.LinearModel(rng.normal(size=(4, 3)), rng.normal(size=3))
  np.testing.assert_allclose(linear.logits(linear.fold_scaler(model, scaler), x),
                             linear.logits(model, ref.transform(x)), atol=1e-12)


@pytest.mark.parametrize('kw, match', [
    (dict(penalty='l3'), 'penalty'), (dict(backend='torch'), 'backend'), (dict(C=0.0), 'C must'),
    (dict(num_classes=3), 'missing'), (dict(num_classes=1), 'num_classes'),
    (dict(class_weight={5: 1.0}), 'class_weight'), (dict(y=np.array([0, 1, 2, 1])), 'y must')])
def test_bad_input(kw, match):
  args = {**dict(num_classes=2, penalty='l1', C=1.0), **kw}
  y = args.pop('y', np.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match=match):
    linear.fit_logistic(np.zeros((4, 2)), y, **args)


def test_sklearn_backend_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'sklearn.linear_model', None)
  with pytest.raises(ImportError, match=r'\.\[peers\]'):
    linear.fit_logistic(np.eye(2), np.array([0, 1]), num_classes=2, penalty='l1', C=1.0,
                        backend='sklearn')


@pytest.mark.slow
def test_runs_without_sklearn():
  """ifam_jax.peers imports and fits with scikit-learn unimportable."""
  code = ('import sys; sys.modules["sklearn"] = None\n'
          'import numpy as np\n'
          'from ifam_jax.peers import dfr, linear\n'
          'rng = np.random.default_rng(0); x = rng.normal(size=(80, 3)); g = np.arange(80) % 4\n'
          'model, report = dfr.run_dfr(x + (g // 2)[:, None], g // 2, g, num_classes=2, seed=0,\n'
          '                            n_retrain=2)\n'
          'assert model.weight.shape == (3, 2), model\n')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
