"""DFR: retrain the last linear layer on group-balanced held-out features (docs/peers.md).

DFR(Val), as the released code (`dfr_on_validation_tune` / `_eval`):
  tune   shuffle the val indices; score on the first `tune_fraction` of them, fit on the rest. For
         each C of the grid: one group-balanced subsample of the fitting part, a StandardScaler
         fit on it, an L1 logistic regression (liblinear semantics, bias penalised); score =
         worst-group accuracy over the groups present in the scoring part. The first C in grid
         order wins ties.
  final  `n_retrain` group-balanced subsamples of the whole val set, each fit with the chosen C
         on features standardised by one scaler; weight and bias averaged over the fits.
DFR(Train), as A² App. I: the same on the given train features, with a random `train_holdout`
share held out for scoring and the balanced retraining on the rest.

Group-balanced = every group present keeps a random m = (smallest group size) of its examples;
a group absent from the set is ignored rather than making m = 0. Class weights are not searched
(the DFR(Val) default {1, 1}); `linear.fit_logistic` takes them for callers that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ifam_jax.evaluators import metrics
from ifam_jax.peers import linear

VARIANTS = ('val', 'train')
SCALER_FITS = ('val', 'train')
C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)
SMALL_GROUP = 20  # docs/peers.md: flag results whose balanced sets hold fewer per group


# ----------------------------------------------------------------------------
# Subsets
# ----------------------------------------------------------------------------
def balanced_subsample(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of m random examples of every group present, m = the smallest group size."""
  groups = np.asarray(groups)
  if groups.ndim != 1 or not len(groups):
    raise ValueError(f'groups must be a non-empty 1-D array, got shape {groups.shape}')
  members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
  m = min(len(idx) for idx in members)
  return np.sort(np.concatenate([rng.choice(idx, m, replace=False) for idx in members]))


def tuning_split(n: int, rng: np.random.Generator,
                 fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(fit_idx, score_idx) of a random permutation of range(n): the first floor(fraction * n)
  indices score, the rest fit (the code's `idx[:n // 2]` / `idx[n // 2:]` at 0.5)."""
  if not 0 < fraction < 1:
    raise ValueError(f'fraction must lie in (0, 1), got {fraction}')
  num_score = int(n * fraction)
  if not 0 < num_score < n:
    raise ValueError(f'n={n} with fraction={fraction} leaves an empty part')
  idx = rng.permutation(n)
  return idx[num_score:], idx[:num_score]


def _group_sizes(groups: np.ndarray) -> dict[int, int]:
  values, counts = np.unique(groups, return_counts=True)
  return {int(v): int(c) for v, c in zip(values, counts)}


def worst_group_accuracy(model: linear.LinearModel, x: np.ndarray, y: np.ndarray,
                         g: np.ndarray) -> float:
  """The minimum over the groups present of the model's accuracy."""
  names = [str(i) for i in range(int(g.max()) + 1)]
  return metrics.classification_metrics(linear.logits(model, x), y, g,
                                        group_names=names)['worst_group_accuracy']


# ----------------------------------------------------------------------------
# Tuning and the final model
# ----------------------------------------------------------------------------
def _check(x: np.ndarray, y: np.ndarray, g: np.ndarray, num_classes: int) -> None:
  if x.ndim != 2:
    raise ValueError(f'x must be [N, F], got shape {x.shape}')
  for name, a in (('y', y), ('g', g)):
    if a.shape != (len(x),) or not np.issubdtype(a.dtype, np.integer) or (a < 0).any():
      raise ValueError(f'{name} must be non-negative integers of shape ({len(x)},), got '
                       f'{a.dtype} {a.shape}')
  if missing := sorted(set(range(num_classes)) - set(np.unique(y).tolist())):
    raise ValueError(f'y must hold every class of range({num_classes}); missing {missing}')


def _check_grid(c_grid: Sequence[float]) -> None:
  if not len(c_grid) or any(not c > 0 for c in c_grid):
    raise ValueError(f'c_grid must be non-empty and positive, got {c_grid}')


def tune(x: np.ndarray, y: np.ndarray, g: np.ndarray, *, num_classes: int,
         c_grid: Sequence[float] = C_GRID, rng: np.random.Generator, backend: str = 'jax',
         tune_fraction: float = 0.5,
         split: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, dict[float, float]]:
  """The C of `c_grid` with the best worst-group accuracy on the scoring part, and every score.

  `split` = (fit_idx, score_idx) replaces the random `tuning_split(len(y), rng, tune_fraction)`
  (drawn first from rng otherwise). One balanced subsample of the fitting part serves every C.
  """
  x, y, g = np.asarray(x), np.asarray(y), np.asarray(g)
  _check(x, y, g, num_classes)
  _check_grid(c_grid)
  fit, score = tuning_split(len(y), rng, tune_fraction) if split is None else split
  fit = fit[balanced_subsample(g[fit], rng)]
  scaler = linear.Standardizer.fit(x[fit])
  x_fit, x_score = scaler.apply(x[fit]), scaler.apply(x[score])
  scores = {}
  for c in c_grid:
    model, _ = linear.fit_logistic(x_fit, y[fit], num_classes=num_classes, penalty='l1', C=c,
                                   backend=backend, seed=int(rng.integers(2**31 - 1)))
    scores[float(c)] = worst_group_accuracy(model, x_score, y[score], g[score])
  best = max(scores.values())
  return next(c for c, s in scores.items() if s == best), scores


def _retrain(z, y, g, num_classes, C, n_retrain, rng, backend):
  """`n_retrain` L1 fits on balanced subsamples of standardised z: (mean model, infos)."""
  models, infos = [], []
  for _ in range(n_retrain):
    idx = balanced_subsample(g, rng)
    model, info = linear.fit_logistic(z[idx], y[idx], num_classes=num_classes, penalty='l1', C=C,
                                      backend=backend, seed=int(rng.integers(2**31 - 1)))
    models.append(model)
    infos.append(info)
  return linear.average(models), infos


def fit_final(x: np.ndarray, y: np.ndarray, g: np.ndarray, *, num_classes: int, C: float,
              n_retrain: int = 20, rng: np.random.Generator, backend: str = 'jax',
              scaler: linear.Standardizer) -> linear.LinearModel:
  """The mean of `n_retrain` L1 fits on balanced subsamples of scaler-standardised x, folded
  back to act on raw features."""
  x, y, g = np.asarray(x), np.asarray(y), np.asarray(g)
  _check(x, y, g, num_classes)
  if n_retrain < 1:
    raise ValueError(f'n_retrain must be >= 1, got {n_retrain}')
  model, _ = _retrain(scaler.apply(x), y, g, num_classes, C, n_retrain, rng, backend)
  return linear.fold_scaler(model, scaler)


# ----------------------------------------------------------------------------
# DFR(Val) / DFR(Train)
# ----------------------------------------------------------------------------
def run_dfr(fit_x: np.ndarray, fit_y: np.ndarray, fit_g: np.ndarray, *, num_classes: int,
            seed: int, variant: str = 'val', c_grid: Sequence[float] = C_GRID,
            n_retrain: int = 20, tune_fraction: float = 0.5, train_holdout: float = 0.2,
            scaler_fit_on: str = 'val', scaler_x: np.ndarray | None = None,
            backend: str = 'jax') -> tuple[linear.LinearModel, dict[str, Any]]:
  """DFR on the features it retrains on (val for variant 'val', train for 'train').

  variant        'val': tune on a tune_fraction / rest split of fit_x, retrain on all of it.
                 'train': A² App. I, a train_holdout share of fit_x scores the grid, the rest is
                 tuned on and retrained on.
  scaler_fit_on  the final model's StandardScaler (docs/peers.md): 'val' (default; the
                 izmailovpavel code A² used) fits it on all of fit_x, which for variant 'train'
                 is all train, as the original DFR(Train); 'train' fits it on scaler_x, the train
                 features (the original DFR(Val)). Tuning always scales by its balanced fitting
                 part.
  seed           seeds one np.random.Generator for every split, subsample and liblinear fit.

  Returns the averaged model on raw features and a report: variant, C, scores, the smallest
  group of the tuning and of the retraining set (min_group_size) with small_group = either
  below SMALL_GROUP, n_retrain, the sizes, and whether every final fit converged.
  """
  fit_x, fit_y, fit_g = np.asarray(fit_x), np.asarray(fit_y), np.asarray(fit_g)
  if variant not in VARIANTS:
    raise ValueError(f'variant must be one of {VARIANTS}, got {variant!r}')
  if scaler_fit_on not in SCALER_FITS:
    raise ValueError(f'scaler_fit_on must be one of {SCALER_FITS}, got {scaler_fit_on!r}')
  if (scaler_fit_on == 'train') != (scaler_x is not None):
    raise ValueError("scaler_x (the train features) is needed with scaler_fit_on='train' and "
                     'only there')
  if scaler_x is not None and (np.ndim(scaler_x) != 2 or np.shape(scaler_x)[1] != fit_x.shape[1]):
    raise ValueError(f'scaler_x must be [M, {fit_x.shape[1]}], got shape {np.shape(scaler_x)}')
  if backend not in linear.BACKENDS:
    raise ValueError(f'backend must be one of {linear.BACKENDS}, got {backend!r}')
  if n_retrain < 1:
    raise ValueError(f'n_retrain must be >= 1, got {n_retrain}')
  _check_grid(c_grid)
  for name, value in (('tune_fraction', tune_fraction), ('train_holdout', train_holdout)):
    if not 0 < value < 1:
      raise ValueError(f'{name} must lie in (0, 1), got {value}')
  _check(fit_x, fit_y, fit_g, num_classes)
  rng = np.random.default_rng(seed)
  fraction = tune_fraction if variant == 'val' else train_holdout
  fit_idx, score_idx = tuning_split(len(fit_y), rng, fraction)
  C, scores = tune(fit_x, fit_y, fit_g, num_classes=num_classes, c_grid=c_grid, rng=rng,
                   backend=backend, split=(fit_idx, score_idx))
  retrain = np.arange(len(fit_y)) if variant == 'val' else np.sort(fit_idx)
  scaler = linear.Standardizer.fit(fit_x if scaler_x is None else scaler_x)
  model, infos = _retrain(scaler.apply(fit_x[retrain]), fit_y[retrain], fit_g[retrain],
                         num_classes, C, n_retrain, rng, backend)
  tune_sizes, retrain_sizes = _group_sizes(fit_g[fit_idx]), _group_sizes(fit_g[retrain])
  m_tune, m = min(tune_sizes.values()), min(retrain_sizes.values())
  report = {'variant': variant, 'C': C, 'scores': scores, 'seed': seed, 'backend': backend,
            'scaler_fit_on': scaler_fit_on, 'n_retrain': n_retrain,
            'min_group_size': m, 'tune_min_group_size': m_tune,
            'small_group': min(m, m_tune) < SMALL_GROUP,
            'group_sizes': retrain_sizes, 'tune_group_sizes': tune_sizes,
            'num_fit': len(fit_idx), 'num_score': len(score_idx),
            'converged': all(i['converged'] for i in infos)}
  return linear.fold_scaler(model, scaler), report
