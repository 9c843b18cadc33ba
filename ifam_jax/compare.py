"""`--mode compare`: iFAM beside its peers on one dataset, in one table.

  python -m ifam_jax.main --config configs/waterbirds.py:root=DATA,weights=DINOV2 --workdir W \
      --mode compare --methods=erm,ifam,late_mask,dfr,dar,a2

Every method runs with the recipe's data pipeline, metrics and backbone, once per seed of
`compare.seeds`, in <workdir>/<method>/seed_<s>:
  training presets (ifam_jax/presets.py: erm, ifam, late masking, ground-truth masks, the paper's
      ablations) train there as `--mode train` would, resumable mid-run;
  post-hoc peers (ifam_jax/peers/) fit on a frozen extractor (`peers.extractor`): 'dfr' and
      'dar' on its features and patch tokens, 'a2' on crops around a ViT's CLS attention. The
      'erm' and 'ifam' extractors are the comparison's own runs of the same seed, trained first.
A finished method (its result.json, written last) is not rerun; a post-hoc peer whose settings
changed is. A trained method whose model has a mask also records what the mask's geometry alone
tells of the spurious attribute on the table's split (`evaluate.measure_mask_leak`; measured
once, also for a result.json written without it). Then one table on the `compare.split` eval
(mean ± std over seeds) is printed and written as compare.json and a bar chart compare.png.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image, ImageDraw

from ifam_jax import evaluate, factory, presets, train, visualize, weights
from ifam_jax import methods as methods_lib
from ifam_jax import workdir as workdir_lib
from ifam_jax.evaluators import metrics
from ifam_jax.evaluators.tables import format_table
from ifam_jax.models import vit
from ifam_jax.peers import a2, attention, dar, dfr, features, linear

POSTHOC = ('dfr', 'dar', 'a2')
POSTHOC_LABELS = {'dfr': 'DFR', 'dar': 'DAR', 'a2': 'A²'}
PICTURE_EXAMPLES = 8


def _print(text: str) -> None:
  if jax.process_index() == 0:
    print(text, flush=True)


# ----------------------------------------------------------------------------
# Checks, before any work
# ----------------------------------------------------------------------------
def check_methods(methods: Sequence[str], config: ml_collections.ConfigDict) -> None:
  """Unknown names and peers the config cannot run fail here, before anything trains."""
  if not methods:
    raise ValueError('--methods is empty (and so is compare.methods); known methods: '
                     f'{sorted(presets.PRESETS) + list(POSTHOC)}')
  unknown = [m for m in methods if m not in presets.PRESETS and m not in POSTHOC]
  if unknown:
    raise ValueError(f'--methods: unknown {unknown}; known: '
                     f'{sorted(presets.PRESETS) + list(POSTHOC)}')
  if len(set(methods)) != len(methods):
    raise ValueError(f'--methods lists a method twice: {list(methods)}')
  if not config.compare.seeds:
    raise ValueError('compare.seeds is empty')
  factory.check_data_specs(config)
  extractor = config.peers.extractor
  if any(m in ('dfr', 'dar') for m in methods):
    if extractor not in features.EXTRACTORS:
      raise ValueError(f'peers.extractor must be one of {features.EXTRACTORS}, got {extractor!r}')
    if extractor == 'dinov2' and not config.model.init_weights:
      raise ValueError("peers.extractor='dinov2' needs DINOv2 weights (model.init_weights)")
  if 'dar' in methods and not config.data.val_split:
    raise ValueError('dar trains on a group-balanced half of data.val_split; the config has none')
  table_split(config)
  kinds = {preset_config(config, m, 0).model.kind for m in methods if m in presets.PRESETS}
  if any(methods_lib.get(kind).batch_inputs for kind in kinds):  # e.g. ground-truth masks
    sources = {'data.train': factory.make_train_source(config),
               **{f'data.evals.{k}': v for k, v in factory.make_eval_sources(config).items()}}
    for kind in kinds:
      methods_lib.check_sources(kind, sources)


def table_split(config: ml_collections.ConfigDict) -> str:
  """The eval the table reports: compare.split, else 'test' if there is one, else the last."""
  evals = list(config.data.evals)
  if not evals:
    raise ValueError('the comparison needs at least one eval in data.evals')
  split = config.compare.split or ('test' if 'test' in evals else evals[-1])
  if split not in evals:
    raise ValueError(f'compare.split {split!r} is not one of the evals {evals}')
  return split


def dependencies(methods: Sequence[str], config: ml_collections.ConfigDict) -> list[str]:
  """`methods` with the runs they read first: the extractor's run for DFR and DAR, the ERM run
  standing in for A²'s ViTs when no DINOv2 files are given."""
  needed = []
  if any(m in ('dfr', 'dar') for m in methods) and config.peers.extractor != 'dinov2':
    needed.append(config.peers.extractor)
  if 'a2' in methods and not (config.peers.a2.attention_weights and _embedding_weights(config)):
    needed.append('erm')
  return [m for m in dict.fromkeys(needed) if m not in methods] + list(methods)


# ----------------------------------------------------------------------------
# Running one method
# ----------------------------------------------------------------------------
def preset_config(config: ml_collections.ConfigDict, name: str,
                  seed: int) -> ml_collections.ConfigDict:
  c = copy.deepcopy(config)
  with c.unlocked():
    c.seed = seed
    c.compare.methods = ()
    presets.apply_preset(c, name)
  return c


def _settings(config: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
  """What a post-hoc result depends on beyond its seed; a change reruns it."""
  peers = config.peers.to_dict()
  return {'extractor': peers['extractor'] if name != 'a2' else None,
          name: peers[name], 'which': config.compare.which}


def run_method(config: ml_collections.ConfigDict, workdir: epath.Path, name: str,
               seed: int) -> dict[str, Any]:
  """One method and seed in workdir/<name>/seed_<seed>; its recorded result if finished."""
  sub = workdir / name / f'seed_{seed}'
  done = sub / 'result.json'
  settings = _settings(config, name) if name in POSTHOC else None
  if done.exists():
    result = json.loads(done.read_text())
    if name not in POSTHOC or result.get('settings') == json.loads(json.dumps(settings)):
      return with_mask_leak(config, workdir, name, seed, result)
  sub.mkdir(parents=True, exist_ok=True)
  start = time.time()
  _print(f'\n=== {name}, seed {seed} -> {sub}')
  lead = jax.process_index() == 0
  with workdir_lib.WorkdirLock(sub) if lead else contextlib.nullcontext():
    if name in presets.PRESETS:
      cfg = preset_config(config, name, seed)
      changed = workdir_lib.check_config_change(sub, cfg)
      if lead:
        workdir_lib.record_config(sub, cfg, changed)
      result = train.train_and_evaluate(cfg, sub)
      result = {'label': presets.PRESETS[name].label,
                'backbone': features.describe_backbone(cfg.model),
                'evals': result['evals'], 'step': result['step']}
    else:
      run = {'dfr': run_dfr, 'dar': run_dar, 'a2': run_a2}[name]
      result = run(config, workdir, sub, seed)
      result['settings'] = settings
  result['wall_time_s'] = time.time() - start
  result = json.loads(json.dumps(result, default=_to_builtin))
  workdir_lib.replace_text(done, json.dumps(result, indent=1))
  return with_mask_leak(config, workdir, name, seed, result)


def with_mask_leak(config: ml_collections.ConfigDict, workdir: epath.Path, name: str, seed: int,
                   result: dict[str, Any]) -> dict[str, Any]:
  """`result` with 'mask_leak': the geometry audit of a trained method with a mask on the
  table's split, without thresholds; measured once per split and saved in its result.json."""
  split = table_split(config)
  if name not in presets.PRESETS or result.get('mask_leak', {}).get('split') == split:
    return result
  cfg = preset_config(config, name, seed)
  if not methods_lib.get(cfg.model.kind).has_mask:
    return result
  with cfg.unlocked():
    cfg.eval.splits, cfg.eval.thresholds = (split,), ''
  sub = workdir / name / f'seed_{seed}'
  leak = evaluate.measure_mask_leak(cfg, sub, config.compare.which)[split]
  result = json.loads(json.dumps({**result, 'mask_leak': {'split': split, **leak}},
                                 default=_to_builtin))
  workdir_lib.replace_text(sub / 'result.json', json.dumps(result, indent=1))
  return result


def _to_builtin(x: Any) -> Any:
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f'{type(x).__name__} is not JSON serialisable')


# ----------------------------------------------------------------------------
# Shared pieces of the post-hoc peers
# ----------------------------------------------------------------------------
class _Splits:
  """The recipe's sources and eval transform, and the metrics of logits on an eval."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.train = factory.make_train_source(config)
    self.evals = factory.make_eval_sources(config)
    self.transform = factory.make_transforms(config)[1]
    self.num_classes = self.train.num_classes

  def source(self, split: str) -> Any:
    return self.train if split == 'train' else self.evals[split]

  def metrics(self, split: str, logits: np.ndarray, arrays: Mapping[str, np.ndarray]
              ) -> dict[str, Any]:
    source = self.evals[split]
    outputs = {'logits': logits, **{k: arrays[k] for k in ('label', 'group', 'valid')}}
    return metrics.summarize_predictions(outputs, class_names=source.class_names,
                                         group_names=source.group_names,
                                         minority_groups=metrics.minority_groups(source))


def _valid(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  keep = arrays['valid'] > 0
  return {k: v[keep] for k, v in arrays.items()}


def _key(settings: Any) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def _extractor(config: ml_collections.ConfigDict, workdir: epath.Path,
               seed: int) -> features.Extractor:
  kind = config.peers.extractor
  run = None if kind == 'dinov2' else workdir / kind / f'seed_{seed}'
  cfg = preset_config(config, kind, seed) if run is not None else config
  return features.load_extractor(kind, cfg, run, config.compare.which)


def _extracted(ext: features.Extractor, splits: _Splits, split: str, workdir: epath.Path,
               seed: int, what: str) -> dict[str, np.ndarray]:
  """The extractor's 'features' (or 'tokens' and 'token_mask') of a split, cached in
  workdir/features/<extractor>_seed<s>/ for every peer of that seed."""
  keys = ('features',) if what == 'features' else ('tokens', 'token_mask')
  tag = ext.kind if ext.kind == 'dinov2' else f'{ext.kind}_seed{seed}'
  path = workdir / 'features' / tag / f'{split}_{what}.npz'

  def fn(model, x):
    out = ext.features(model, x)
    return {k: out[k] for k in keys}

  return features.cached(path, lambda: features.run_split(
      fn, ext.model, splits.source(split), splits.transform, splits.config))


# ----------------------------------------------------------------------------
# DFR
# ----------------------------------------------------------------------------
def run_dfr(config: ml_collections.ConfigDict, workdir: epath.Path, sub: epath.Path,
            seed: int) -> dict[str, Any]:
  """DFR(Val) on the validation split's features, or DFR(Train) without one (docs/peers.md)."""
  del sub
  cfg = config.peers.dfr
  splits = _Splits(config)
  ext = _extractor(config, workdir, seed)
  get = lambda split: _valid(_extracted(ext, splits, split, workdir, seed, 'features'))
  variant = 'val' if config.data.val_split else 'train'
  fit = get(config.data.val_split or 'train')
  scaler_x = get('train')['features'] if cfg.scaler_fit_on == 'train' else None
  model, report = dfr.run_dfr(
      fit['features'], fit['label'], fit['group'], num_classes=splits.num_classes, seed=seed,
      variant=variant, c_grid=tuple(cfg.c_grid), n_retrain=cfg.n_retrain,
      tune_fraction=cfg.tune_fraction, train_holdout=cfg.train_holdout,
      scaler_fit_on=cfg.scaler_fit_on, scaler_x=scaler_x, backend=cfg.backend)
  evals = {}
  for split in splits.evals:
    arrays = _extracted(ext, splits, split, workdir, seed, 'features')
    evals[split] = splits.metrics(split, linear.logits(model, arrays['features']), arrays)
  return {'label': POSTHOC_LABELS['dfr'], 'backbone': ext.description, 'evals': evals,
          'report': report}


# ----------------------------------------------------------------------------
# DAR
# ----------------------------------------------------------------------------
class _TokensAndHead(nnx.Module):
  """A frozen extractor with a DAR head on its patch tokens, for one streaming eval pass."""

  def __init__(self, model: nnx.Module, head: dar.DARHead):
    self.model, self.head = model, head


def run_dar(config: ml_collections.ConfigDict, workdir: epath.Path, sub: epath.Path,
            seed: int) -> dict[str, Any]:
  """DAR's head trained on a group-balanced half of the validation split's patch tokens and
  selected on the other half; the evals stream through extractor and head (their tokens are
  never stored)."""
  del sub
  cfg = config.peers.dar
  splits = _Splits(config)
  ext = _extractor(config, workdir, seed)
  val_split = config.data.val_split
  val = _valid(_extracted(ext, splits, val_split, workdir, seed, 'tokens'))
  rng = np.random.default_rng([seed, 1])
  target, select = dfr.tuning_split(len(val['label']), rng, 0.5)
  target = target[dfr.balanced_subsample(val['group'][target], rng)]
  tokens = lambda idx: np.asarray(val['tokens'][idx], np.float32)
  head, report = dar.train_dar(
      tokens(target), val['label'][target], num_classes=splits.num_classes,
      key_mask=val['token_mask'][target], val_tokens=tokens(select),
      val_labels=val['label'][select], val_groups=val['group'][select],
      val_key_mask=val['token_mask'][select],
      minority_groups=metrics.minority_groups(splits.evals[val_split]), seed=seed,
      num_queries=cfg.num_queries, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      depth=cfg.depth, lr=cfg.lr, weight_decay_grid=tuple(cfg.weight_decay_grid),
      batch_size=cfg.batch_size, epochs=cfg.epochs)
  report.update(target_size=int(len(target)), selection_size=int(len(select)))

  def fn(both, x):
    out = ext.features(both.model, x)
    logits, _ = both.head(out['tokens'].astype(jnp.float32), out['token_mask'])
    return {'logits': logits}

  both = _TokensAndHead(ext.model, head)
  evals = {}
  for split, source in splits.evals.items():
    arrays = features.run_split(fn, both, source, splits.transform, config)
    evals[split] = splits.metrics(split, arrays['logits'], arrays)
  return {'label': POSTHOC_LABELS['dar'], 'backbone': ext.description, 'evals': evals,
          'report': report}


# ----------------------------------------------------------------------------
# A²
# ----------------------------------------------------------------------------
def _embedding_weights(config: ml_collections.ConfigDict) -> str:
  return config.peers.a2.embedding_weights or config.model.init_weights


def _dinov2_vit(vit_cfg: vit.ViTConfig, path: str) -> vit.VisionTransformer:
  model = vit.VisionTransformer(vit_cfg, rngs=nnx.Rngs(0))
  weights.load_dinov2(model, path)
  return model


def _a2_models(config: ml_collections.ConfigDict, workdir: epath.Path, seed: int
               ) -> tuple[vit.VisionTransformer, vit.VisionTransformer, str, bool]:
  """(attention ViT, embedding ViT, description, stand-in?). Without DINOv2 files the
  comparison's ERM run stands in for the missing one(s): supervised on the same data, not the
  self-supervised attention A² relies on."""
  cfg = config.peers.a2
  size = config.model.image_size
  erm = None
  if not (cfg.attention_weights and _embedding_weights(config)):
    erm = factory.load_model(preset_config(config, 'erm', seed), workdir / 'erm' / f'seed_{seed}',
                             config.compare.which).backbone
  erm_text = f'ERM run ({features.describe_backbone(config.model)})'
  if cfg.attention_weights:
    attention_vit = _dinov2_vit(vit.vit_config(cfg.attention_variant, image_size=size,
                                               num_registers=cfg.attention_registers,
                                               dtype='float32', attention='xla',
                                               **dict(cfg.attention_overrides)),
                                cfg.attention_weights)
    attention_text = f'DINOv2 {cfg.attention_variant}'
  else:
    attention_vit, attention_text = erm, erm_text
  if _embedding_weights(config):
    embedding_vit = _dinov2_vit(factory.vit_from_config(config.model), _embedding_weights(config))
    embedding_text = f'DINOv2 {config.model.variant}'
  else:
    embedding_vit, embedding_text = erm, erm_text
  return (attention_vit, embedding_vit, f'{attention_text} x {embedding_text} @{size}',
          erm is not None)


def run_a2(config: ml_collections.ConfigDict, workdir: epath.Path, sub: epath.Path,
           seed: int) -> dict[str, Any]:
  """A²: the attention ViT's CLS attention (cached per split), greedy crops, their embeddings
  concatenated (cached per crop setting), a logistic regression fit on the train split."""
  cfg = config.peers.a2
  splits = _Splits(config)
  attention_vit, embedding_vit, description, stand_in = _a2_models(config, workdir, seed)
  grid = attention_vit.cfg.grid
  attention_key = _key([cfg.attention_weights, cfg.attention_variant, cfg.attention_registers,
                        cfg.block, cfg.renormalise])
  crops_key = _key([attention_key, _embedding_weights(config), list(cfg.crop_sizes),
                    cfg.tie_break, cfg.resize_method])

  def attention_map(model, x):
    probs = attention.cls_attention(model, x, block=cfg.block)
    return {'map': attention.patch_map(probs, model.cfg.num_prefix, grid,
                                       renormalise=cfg.renormalise)}

  def crop_features(model, x, map):
    z, boxes = a2.a2_features(x, map, lambda crops: model(crops)['cls'].astype(jnp.float32),
                              sizes=tuple(cfg.crop_sizes), out=config.model.image_size,
                              tie_break=cfg.tie_break, method=cfg.resize_method)
    return {'z': z, 'boxes': boxes}

  def split_features(split: str) -> dict[str, np.ndarray]:
    source = splits.source(split)
    maps = features.cached(sub / 'attention' / attention_key / f'{split}.npz',
                           lambda: features.run_split(attention_map, attention_vit, source,
                                                      splits.transform, config))
    return features.cached(sub / 'crops' / crops_key / f'{split}.npz',
                           lambda: features.run_split(crop_features, embedding_vit, source,
                                                      splits.transform, config,
                                                      inputs={'map': maps['map']}))

  train_z = _valid(split_features('train'))
  model, info = linear.fit_logistic(train_z['z'], train_z['label'],
                                    num_classes=splits.num_classes, penalty='l2', C=cfg.C,
                                    backend=cfg.backend, max_iter=cfg.max_iter, seed=seed)
  evals = {split: splits.metrics(split, linear.logits(model, arrays['z']), arrays)
           for split, arrays in ((s, split_features(s)) for s in splits.evals)}
  label = POSTHOC_LABELS['a2'] + (' (stand-in ViT)' if stand_in else '')
  return {'label': label, 'backbone': description, 'evals': evals,
          'report': {'classifier': info, 'crop_sizes': list(cfg.crop_sizes),
                     'tie_break': cfg.tie_break, 'stand_in': stand_in}}


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------
def train_group_counts(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Examples per group of the training split, by group name (for the train-weighted mean)."""
  source = factory.make_train_source(config)
  if not source.group_names or not hasattr(source, 'groups'):
    return {}
  counts = np.bincount(np.asarray(source.groups), minlength=source.num_groups)
  return {name: int(n) for name, n in zip(source.group_names, counts)}


def _row_values(result: Mapping[str, Any], split: str,
                train_counts: Mapping[str, int]) -> dict[str, float]:
  """The table's numbers of one method and seed."""
  m = result['evals'][split]
  values = {k: m[k] for k in ('accuracy', 'worst_group_accuracy', 'worst_group_accuracy_minority',
                              'minority_accuracy_pooled', 'worst_class_accuracy', 'auroc',
                              'worst_group_auroc', 'fg_fraction')
            if k in m}
  if 'group_accuracy' in m:
    values.update({f'group:{g}': a for g, a in m['group_accuracy'].items()})
    if train_counts:
      values['accuracy_train_weighted'] = metrics.train_weighted_accuracy(m['group_accuracy'],
                                                                         train_counts)
  leak = result.get('mask_leak', {})
  if leak.get('split') == split and leak.get('auroc') is not None:
    values['mask_leak_auroc'] = leak['auroc']
  if leak.get('split') == split and 'empty_rate' in leak:
    values['empty_mask_rate'] = leak['empty_rate']
  evals = result['evals']
  if {'mixed_same', 'mixed_rand'} <= evals.keys():
    values['bg_gap'] = metrics.bg_gap({k: evals[k]['accuracy'] for k in evals})
  values['wall_time_s'] = result['wall_time_s']
  return values


def summarise(results: Mapping[str, Mapping[int, Mapping[str, Any]]], split: str,
              train_counts: Mapping[str, int]) -> dict[str, Any]:
  """Per method: label, backbone, seeds, and mean/std over seeds of every table value."""
  rows = {}
  for name, by_seed in results.items():
    per_seed = [_row_values(r, split, train_counts) for r in by_seed.values()]
    first = next(iter(by_seed.values()))
    keys = [k for k in per_seed[0] if all(k in v for v in per_seed)]
    rows[name] = {'label': first['label'], 'backbone': first['backbone'],
                  'seeds': list(by_seed),
                  'mean': {k: float(np.mean([v[k] for v in per_seed])) for k in keys},
                  'std': {k: float(np.std([v[k] for v in per_seed])) for k in keys}}
  return rows


_COLUMNS = (('avg', 'accuracy'), ('worst grp', 'worst_group_accuracy'),
            ('worst minority', 'worst_group_accuracy_minority'),
            ('minority pooled', 'minority_accuracy_pooled'),
            ('worst class', 'worst_class_accuracy'),
            ('train-wtd avg', 'accuracy_train_weighted'), ('AUROC', 'auroc'),
            ('WG AUROC', 'worst_group_auroc'), ('BG-GAP', 'bg_gap'),
            ('fg', 'fg_fraction'), ('mask→bg AUROC', 'mask_leak_auroc'),
            ('empty masks', 'empty_mask_rate'))
_AS_IS = ('mask_leak_auroc',)  # shown with two decimals, not as percentages


def table_cells(rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  """The header and rows of the table: a column per metric that any row has, per-group
  accuracies last."""
  has = lambda key: any(key in r['mean'] for r in rows.values())
  groups = list(dict.fromkeys(k for r in rows.values() for k in r['mean']
                              if k.startswith('group:')))
  columns = [(h, k) for h, k in _COLUMNS if has(k)] + [(k[6:], k) for k in groups]

  def cell(row, key):
    if key not in row['mean']:
      return '-'
    scale, digits = (1, 2) if key in _AS_IS else (100, 1)
    mean, std = scale * row['mean'][key], scale * row['std'][key]
    return f'{mean:.{digits}f}' + (f' ± {std:.{digits}f}' if len(row['seeds']) > 1 else '')

  header = ['method', 'backbone', 'seeds'] + [h for h, _ in columns] + ['wall time']
  body = [[r['label'], r['backbone'], str(len(r['seeds']))] + [cell(r, k) for _, k in columns]
          + [f'{r["mean"]["wall_time_s"] / 60:.1f} min'] for r in rows.values()]
  return header, body


def format_rows(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """The Markdown table of `table_cells`."""
  return format_table(*table_cells(rows))


def bar_chart(rows: Mapping[str, Mapping[str, Any]], path: epath.Path, title: str) -> None:
  """Average and worst-group accuracy per method, with the seeds' standard deviation."""
  bar, gap, left, top, plot_h = 18, 22, 46, 48, 260  # title, then the legend, above the plot
  width = max(left + len(rows) * (2 * bar + gap) + 20, left + 7 * len(title) + 10)
  label_h = 10 + 7 * max(len(r['label']) for r in rows.values())
  image = Image.new('RGB', (max(width, 360), top + plot_h + label_h), 'white')
  draw = ImageDraw.Draw(image)
  draw.text((left, 8), title, fill='black')
  y_of = lambda v: top + plot_h * (1 - v)
  for tick in range(0, 101, 20):
    y = y_of(tick / 100)
    draw.line([(left, y), (image.width - 10, y)], fill=(225, 225, 225))
    draw.text((8, y - 6), f'{tick}', fill='black')
  colours = {'accuracy': (120, 160, 220), 'worst_group_accuracy': (30, 70, 150)}
  for i, row in enumerate(rows.values()):
    x0 = left + 10 + i * (2 * bar + gap)
    for j, (key, colour) in enumerate(colours.items()):
      if key not in row['mean']:
        continue
      mean, std = row['mean'][key], row['std'][key]
      x = x0 + j * bar
      draw.rectangle([x, y_of(mean), x + bar - 3, y_of(0)], fill=colour)
      if std:
        xc = x + (bar - 3) / 2
        draw.line([(xc, y_of(min(mean + std, 1))), (xc, y_of(max(mean - std, 0)))], fill='black')
    name = Image.new('RGB', (label_h - 6, 12), 'white')
    ImageDraw.Draw(name).text((0, 0), row['label'], fill='black')
    image.paste(name.rotate(90, expand=True), (int(x0 + bar - 6), top + plot_h + 4))
  for j, (text, colour) in enumerate((('average', colours['accuracy']),
                                      ('worst group', colours['worst_group_accuracy']))):
    draw.rectangle([left + 100 * j, 26, left + 100 * j + 10, 36], fill=colour)
    draw.text((left + 100 * j + 14, 25), text, fill='black')
  with path.open('wb') as f:
    image.save(f, format='PNG')


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def run_compare(config: ml_collections.ConfigDict, workdir: epath.Path,
                methods: Sequence[str]) -> dict[str, Any]:
  """Runs every method and seed (dependencies first), prints the table, writes compare.json and
  compare.png in `workdir`; returns what compare.json holds."""
  check_methods(methods, config)
  split = table_split(config)
  seeds = list(config.compare.seeds)
  results: dict[str, dict[int, Any]] = {}
  for name in dependencies(methods, config):
    results[name] = {seed: run_method(config, workdir, name, seed) for seed in seeds}
  rows = summarise({m: results[m] for m in methods}, split, train_group_counts(config))
  report = {'split': split, 'seeds': seeds, 'methods': rows,
            'results': {m: {str(s): r for s, r in results[m].items()} for m in methods}}
  if jax.process_index() == 0:
    workdir_lib.replace_text(workdir / 'compare.json', json.dumps(report, indent=1))
    bar_chart(rows, workdir / 'compare.png',
              f'{split}: average and worst-group accuracy (%), {len(seeds)} seed(s)')
  leaks = [f'{rows[m]["label"]}, seed {s}: {r["mask_leak"]["verdict"]}'
           for m in methods for s, r in results[m].items() if r.get('mask_leak', {}).get('leak')]
  _print(f'\nComparison on {split!r} ({len(seeds)} seed(s); mean ± std):\n'
         + format_rows(rows) + ''.join(f'\n{line}' for line in leaks)
         + f'\n\nWritten: {workdir / "compare.json"}, {workdir / "compare.png"}')
  run = workdir / 'ifam' / f'seed_{seeds[0]}'
  if 'ifam' in methods and workdir_lib.read_params_info(run, config.compare.which) is None:
    _print(f'No iFAM part-map picture: {run}/params/{config.compare.which} is gone (results '
           'copied without parameters?)')
  elif 'ifam' in methods:
    picture = part_maps_picture(config, workdir, split, seeds[0])
    _print(f'iFAM part maps (image | parts | what stage 2 sees): {picture}')
  return report


def part_maps_picture(config: ml_collections.ConfigDict, workdir: epath.Path, split: str,
                      seed: int) -> epath.Path:
  """The iFAM run's part maps on examples of every group of `split`, next to its run."""
  cfg = preset_config(config, 'ifam', seed)
  run = workdir / 'ifam' / f'seed_{seed}'
  source = factory.make_eval_sources(cfg)[split]
  return visualize.example_grid(factory.load_model(cfg, run, config.compare.which), cfg, source,
                                visualize.examples_per_group(source, PICTURE_EXAMPLES),
                                run / 'part_maps.png')
