"""`--mode predict`: a trained run applied to a folder (or glob) of new images.

  python -m ifam_jax.main --mode predict --workdir RUN --images DIR_OR_GLOB [--top_k 5]
      [--output PATH.jsonl|.csv] [--save_masks] [--fixed_parts 0,2]

One row per image, in the order found (a folder walked recursively for `IMG_EXTENSIONS`, in
ImageFolder's order; a glob expanded and sorted; a file taken as named): the top-k classes and
probabilities of the model's prediction (stage 2 for iFAM) and, for a method with a stage 1, of
stage 1; the fraction of patches stage 2 saw and whether that mask is empty. A file that cannot be
read or decoded becomes a row with an 'error' and no prediction, never a failure.

Images go through the data pipeline as in `--mode eval`: `transforms.decode` (any PIL mode to RGB;
EXIF orientation is not applied, as in training, so a model sees the stored pixels), the run's
eval transform, the eval batch size (`data.eval_batch_size`) on the configured mesh
(`evaluate.Session`). Interventions are those of `--mode eval`: `eval.thresholds`, and the parts
in `--fixed_parts` removed (`eval.part_removal`).

Stage 2 of iFAM (hard or straight-through mask) runs on the visible patches only: stage 1 first,
then stage 2 on its mask's patches gathered (`fast_attention.gather_patches`) at the smallest
capacity of `model.stage2_token_tiers` (default `GATHER_TIERS`) that holds every mask of the
batch's readable images, with the run's `model.attention`. Since a masked patch never reaches
stage 2's logits, they are the dense eval forward's up to summation order. Other methods (and
stage2_mask 'soft' or 'late') run their eval forward (`method.predict`) unchanged.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from ifam_jax import methods, packed_stage2, visualize
from ifam_jax import progress as progress_lib
from ifam_jax.apply import apply
from ifam_jax.data import sources
from ifam_jax.evaluate import Session
from ifam_jax.evaluators import loop
from ifam_jax.models import fast_attention
from ifam_jax.models.ifam import Intervention, stage2_mask_facts

# Token-gather capacities (fractions of the patches; all patches always one) when the run
# sets no model.stage2_token_tiers: one compiled stage 2 per capacity a batch needs.
GATHER_TIERS = (0.25, 0.5)
OUTPUT_FORMATS = ('.jsonl', '.csv')



# ----------------------------------------------------------------------------
# Finding the images
# ----------------------------------------------------------------------------
def find_images(spec: str) -> list[str]:
  """The files `spec` names: a folder's image files (recursively), a glob's matches (folders
  among them walked), or one file. Raises before anything is loaded when none is found."""
  if os.path.isdir(spec):
    found = sources.image_files(spec)
  elif os.path.lexists(spec):
    found = [spec]
  elif glob.has_magic(spec):
    found = []
    for match in sorted(glob.glob(spec, recursive=True)):
      found += sources.image_files(match) if os.path.isdir(match) else [match]
  else:
    raise FileNotFoundError(f'--images {spec} does not exist')
  if not found:
    raise ValueError(f'--images {spec}: no image files found ({", ".join(sources.IMG_EXTENSIONS)} '
                     'in a folder, or any file a glob matches)')
  return found


def mask_names(paths: Sequence[str]) -> list[str]:
  """A name per image for its mask files: its path relative to the folder common to all, so two
  equal basenames in different folders stay apart."""
  absolute = [os.path.abspath(p) for p in paths]
  root = os.path.commonpath([os.path.dirname(p) for p in absolute])
  return [os.path.relpath(p, root) for p in absolute]


class ImageListSource(sources.FileSource):
  """The images as an eval source: label = position in the list (which identifies each row of
  the gathered outputs), group -1. A file that cannot be opened reads as empty bytes, which
  `transforms.decode` reports undecodable (valid = 0), as a corrupt one."""

  def __init__(self, paths: Sequence[str]):
    super().__init__(paths, range(len(paths)), [-1] * len(paths))
    self.class_names, self.group_names = [], []
    digest = hashlib.sha256('\n'.join(self.paths).encode()).hexdigest()[:12]
    self._repr = sources.describe('ImageListSource', num_images=len(paths), paths_sha=digest)

  def __getitem__(self, index: int) -> sources.Record:
    try:
      return super().__getitem__(index)
    except OSError:
      return {'image': b'', 'label': index, 'group': -1, 'path': self.paths[index]}


def unreadable_reason(path: str) -> str:
  """Why an image gave no prediction, for its error row."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    return f'cannot be read: {type(e).__name__}: {e.strerror or e}'
  if not data:
    return 'empty file'
  buffer = io.BytesIO(data)
  try:
    with Image.open(buffer) as img:
      img.load()
  except Exception as e:  # pylint: disable=broad-except  # decoders raise many error types
    return f'not a decodable image: {type(e).__name__}: {str(e).replace(f" {buffer!r}", "")}'
  return 'not a decodable image'


# ----------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------
def gathers_stage2(model_cfg: ml_collections.ConfigDict) -> bool:
  """Whether stage 2 can run on its visible patches alone (`packed_stage2.packing_applies`
  without the tiers): iFAM's stage 2, which no masked-out patch can reach."""
  return (methods.get(model_cfg.kind).packs_stage2
          and stage2_mask_facts(model_cfg.stage2_mask).hides_masked)


def make_predict_step(s: Session, intervention: Intervention | None) -> Callable:
  """(params, frozen, batch, rng) -> 'logits', optionally 'logits1', 'fg_mask' [B, h, w] and
  'part_maps' [B, h, w, K+1]; what `loop.gather_outputs` runs on each batch."""
  cfg = s.config
  method = methods.get(cfg.model.kind)
  if method.batch_inputs:
    raise ValueError(f'model.kind {cfg.model.kind!r} reads {list(method.batch_inputs)} from '
                     'every batch, which new images do not have')

  def forward(params, frozen, images, rng):
    return apply(s.graphdef, s.rest, params, frozen, images, method.predict, rng=rng,
                 intervention=intervention)

  if not gathers_stage2(cfg.model):
    dense = s.jit(forward)
    return lambda params, frozen, batch, rng: dense(params, frozen, batch['image'], rng)

  def stage1(params, frozen, images, valid, rng):
    out = apply(s.graphdef, s.rest, params, frozen, images, train=False, rng=rng,
                intervention=intervention, run_stage2=False)
    visible = jnp.sum(out.fg_mask > 0, axis=(1, 2)) * valid  # padding and unreadable: no say
    return {'logits1': out.stage1_logits, 'fg_mask': out.fg_mask, 'part_maps': out.part_maps,
            'visible': visible}

  def stage2(capacity):
    def run(params, frozen, images, fg_mask):
      patch_mask = fg_mask.reshape(fg_mask.shape[0], -1)
      keep_index = fast_attention.gather_patches(patch_mask, capacity)
      return apply(s.graphdef, s.rest, params, frozen, images,
                   lambda model, x: model.stage2(x, patch_mask, mask_mode=model.stage2_mask,
                                                 keep_index=keep_index))
    return s.jit(run)

  stage1_jit = s.jit(stage1)
  tiers = cfg.model.stage2_token_tiers or GATHER_TIERS
  stage2_jits: dict[int, Callable] = {}

  def step(params, frozen, batch, rng):
    out = dict(stage1_jit(params, frozen, batch['image'], batch['valid'], rng))
    most = int(np.max(out.pop('visible')))  # of the global batch: the outputs are replicated
    num_patches = out['fg_mask'][0].size
    capacity = next(c for c in packed_stage2.stage2_capacities(tiers, num_patches) if c >= most)
    if capacity not in stage2_jits:
      stage2_jits[capacity] = stage2(capacity)
    out['logits'] = stage2_jits[capacity](params, frozen, batch['image'],
                                          jax.device_put(out['fg_mask'], s.batch_sharding))
    return out

  return step


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def top_classes(probs: np.ndarray, k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
  """The k most probable classes, most probable first (ties: lower index first)."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [{'class': class_names[i], 'index': int(i), 'prob': float(probs[i])} for i in order]


def prediction_row(path: str, out: dict[str, np.ndarray], k: int,
                   class_names: Sequence[str]) -> dict[str, Any]:
  """One image's row from its outputs (one example of `make_predict_step`'s)."""
  row = {'path': path, 'top_k': top_classes(softmax(out['logits']), k, class_names)}
  if 'logits1' in out:
    row['stage1_top_k'] = top_classes(softmax(out['logits1']), k, class_names)
  if 'fg_mask' in out:
    row['kept_fraction'] = float(np.mean(out['fg_mask'] > 0))
    row['empty_mask'] = bool(not np.any(out['fg_mask'] > 0))
  return row


def csv_fields(k: int, with_stage1: bool, with_mask: bool, with_files: bool) -> list[str]:
  """The CSV header: top-k columns flattened as class_<i>, prob_<i> (stage1_class_<i>, ...)."""
  fields = ['path', 'error'] + [f'{name}_{i}' for i in range(1, k + 1)
                                for name in ('class', 'prob')]
  if with_stage1:
    fields += [f'stage1_{name}_{i}' for i in range(1, k + 1) for name in ('class', 'prob')]
  if with_mask:
    fields += ['kept_fraction', 'empty_mask']
  return fields + (['parts_png', 'mask_png'] if with_files else [])


def csv_row(row: dict[str, Any]) -> dict[str, Any]:
  flat = {key: value for key, value in row.items() if not key.endswith('top_k')}
  for key, prefix in (('top_k', ''), ('stage1_top_k', 'stage1_')):
    for i, entry in enumerate(row.get(key, ()), 1):
      flat[f'{prefix}class_{i}'], flat[f'{prefix}prob_{i}'] = entry['class'], entry['prob']
  return flat


def write_rows(rows: Sequence[dict[str, Any]], path: epath.Path, fields: Sequence[str]) -> None:
  """JSON lines (absent keys stay absent) or CSV (absent fields empty), by `path`'s suffix."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == '.jsonl':
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return
  text = io.StringIO()
  writer = csv.DictWriter(text, fieldnames=fields)
  writer.writeheader()
  writer.writerows(csv_row(row) for row in rows)
  path.write_text(text.getvalue())


def save_mask_pngs(image: np.ndarray, out: dict[str, np.ndarray], stem: epath.Path
                   ) -> dict[str, str]:
  """<stem>.parts.png (each patch coloured by its part over the eval-transformed image, as
  `visualize.part_overlay`) and <stem>.mask.png (the patches stage 2 saw: 255, else 0), both
  at the model's input size."""
  parts = visualize.part_overlay(image, out['part_maps'])
  keep = visualize.upsample(out['fg_mask'] > 0, *image.shape[:2])
  mask = Image.fromarray(np.where(keep, 255, 0).astype(np.uint8), 'L')
  return {'parts_png': str(visualize.save_png(Image.fromarray(parts), f'{stem}.parts.png')),
          'mask_png': str(visualize.save_png(mask, f'{stem}.mask.png'))}


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def default_output(workdir: str | os.PathLike, which: str) -> epath.Path:
  return epath.Path(workdir) / 'predict' / which / 'predictions.jsonl'


def check_output(output: str) -> None:
  if output and epath.Path(output).suffix not in OUTPUT_FORMATS:
    raise ValueError(f'--output {output}: write a {" or ".join(OUTPUT_FORMATS)} file')


def run_predict(config: ml_collections.ConfigDict, workdir: str | os.PathLike, images: str,
                which: str = 'final', top_k: int = 5, output: str = '',
                save_masks: bool = False, removed_parts: Sequence[int] = ()
                ) -> list[dict[str, Any]]:
  """Predicts every image `images` names (`find_images`) with <workdir>/params/<which>.

  Writes `output` (default <workdir>/predict/<which>/predictions.jsonl; .csv flattens the top-k
  lists) and, with `save_masks`, <output folder>/masks/<path below the images' common
  folder>.{parts,mask}.png. Rows, in the order found: 'path', 'top_k' [{'class', 'index',
  'prob'}] of the model's prediction; with a mask also 'stage1_top_k', 'kept_fraction',
  'empty_mask' (and the PNG paths); an unreadable file {'path', 'error'} only. Returns them.
  """
  if top_k < 1:
    raise ValueError(f'--top_k must be at least 1, got {top_k}')
  check_output(output)
  has_mask = methods.get(config.model.kind).has_mask
  for flag, needed in (('--fixed_parts (parts removed)', removed_parts),
                       ('--save_masks', save_masks)):
    if needed and not has_mask:
      raise ValueError(f'{flag} needs a model with a foreground mask; model.kind is '
                       f'{config.model.kind!r}')
  if any(not 0 <= p < config.model.num_parts for p in removed_parts):
    raise ValueError(f'--fixed_parts {list(removed_parts)} outside the parts '
                     f'0..{config.model.num_parts - 1}')
  paths = find_images(images)  # before the model: a wrong --images fails in a second
  output_path = epath.Path(output) if output else default_output(workdir, which)
  s = Session(config, workdir, which)
  saved = s.info.get('class_names') or list(config.data.classes)
  class_names = list(saved) if saved else [str(i) for i in range(s.num_classes)]
  k = min(top_k, s.num_classes)
  step = make_predict_step(s, s.with_removed(tuple(sorted(set(removed_parts)))))
  source = ImageListSource(paths)
  ds, num_batches = loop.eval_dataset(source, s.eval_transform, config)
  stems = mask_names(paths)
  lead = jax.process_index() == 0
  found: dict[int, dict[str, Any]] = {}
  seen: set[int] = set()
  progress = progress_lib.Progress('predict', len(paths), unit='images', every=10.0,
                                    show=lead)

  with jax.set_mesh(s.mesh):
    def with_images(params, frozen, batch, rng):
      out = step(params, frozen, batch, rng)
      return {**out, 'image': batch['image']} if save_masks else out

    for outputs in loop.gather_outputs(with_images, s.params, s.frozen, ds, num_batches,
                                       s.batch_sharding, config.seed):
      new = set(map(int, outputs['label'])) - seen
      seen |= new
      for j, index in enumerate(outputs['label']):
        if not outputs['valid'][j] or int(index) in found:  # padding, or unreadable
          continue
        out = {key: v[j] for key, v in outputs.items()}
        row = prediction_row(paths[index], out, k, class_names)
        if save_masks and lead:
          row.update(save_mask_pngs(out['image'], out, output_path.parent / 'masks' / stems[index]))
        found[int(index)] = row
      progress.update(len(new))

  rows = [found.get(i) or {'path': p, 'error': unreadable_reason(p)} for i, p in enumerate(paths)]
  errors = [r for r in rows if 'error' in r]
  with_stage1 = any('stage1_top_k' in r for r in rows)
  if lead:
    write_rows(rows, output_path, csv_fields(k, with_stage1, has_mask, save_masks))
    for r in errors:
      print(f'unreadable: {r["path"]} ({r["error"]})', flush=True)
    print(f'predict: {len(rows) - len(errors)} images predicted with params/{which}'
          + (f' ({s.thresholds["rule"]} thresholds)' if s.thresholds else '')
          + (f', parts {sorted(set(removed_parts))} removed' if removed_parts else '')
          + f', {len(errors)} unreadable; written to {output_path}', flush=True)
  return rows
