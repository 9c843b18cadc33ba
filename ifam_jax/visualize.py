"""Pictures of what the model sees: part assignments, the stage-2 mask, predictions (PIL only).

`run_visualize` (`--mode visualize`) writes, for a trained workdir, an example grid (image | part
assignment | what stage 2 sees, with both stages' predictions), one gallery per part (the images
where that part covers the most patches, to decide which part to drop), a histogram of the mask
size per group (a size, or an empty mask, that depends on the group tells stage 2 the group)
and, when a leave-one-out report exists, its bar chart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image, ImageDraw

from ifam_jax import data as data_lib
from ifam_jax import factory, methods, optim, sharding
from ifam_jax.apply import apply
from ifam_jax.evaluators import audit, leak

# Distinct colours for up to 16 parts (background is left transparent).
PART_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)], np.uint8)


def upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest upsampling of a [h, w] patch grid to [height, width] pixels."""
  rows = np.arange(height) * grid.shape[0] // height
  cols = np.arange(width) * grid.shape[1] // width
  return grid[rows][:, cols]


def part_overlay(image: np.ndarray, maps: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """Colours each patch by its most likely foreground part; background patches stay as they are.

  Args:
    image: uint8 [H, W, 3].
    maps: part maps [h, w, K+1], background last.
  """
  num_parts = maps.shape[-1] - 1
  assigned = upsample(np.argmax(maps, axis=-1), *image.shape[:2])
  colours = PART_COLOURS[np.minimum(assigned, len(PART_COLOURS) - 1)].astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
  return np.where((assigned < num_parts)[..., None], blended, image).astype(np.uint8)


def mask_overlay(image: np.ndarray, fg_mask: np.ndarray) -> np.ndarray:
  """The stage-2 view: patches outside the mask are blacked out (stage 2 cannot attend to them)."""
  keep = upsample(np.asarray(fg_mask) > 0.5, *image.shape[:2])
  return np.where(keep[..., None], image, 0).astype(np.uint8)


def save_png(canvas: Image.Image, path: str | os.PathLike) -> epath.Path:
  """Writes `canvas` through a file object, which also reaches a gs:// workdir."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    canvas.save(f, format='PNG')
  return path


def grid_picture(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None,
                 scale: float = 2) -> Image.Image:
  """Equally sized uint8 images, one list per row, each row with an optional caption, in one
  picture; each image resized by `scale` (nearest: a patch stays a block)."""
  h, w = rows[0][0].shape[:2]
  h, w = max(1, round(h * scale)), max(1, round(w * scale))
  caption_h = 14 if captions else 0
  ncols = max(len(r) for r in rows)
  canvas = Image.new('RGB', (ncols * (w + 4) + 4, len(rows) * (h + caption_h + 4) + 4),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, row in enumerate(rows):
    top = 4 + i * (h + caption_h + 4)
    if captions:
      draw.text((4, top), captions[i], fill=(0, 0, 0))
    for j, tile in enumerate(row):
      picture = Image.fromarray(tile).resize((w, h), Image.NEAREST)
      canvas.paste(picture, (4 + j * (w + 4), top + caption_h))
  return canvas


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike,
              captions: Sequence[str] | None = None, scale: float = 2) -> epath.Path:
  """Writes `grid_picture` as a PNG."""
  return save_png(grid_picture(rows, captions, scale), path)


def save_bar_chart(values: Mapping[str, float], path: str | os.PathLike, title: str,
                   width: int = 480, bar_height: int = 18) -> epath.Path:
  """Horizontal bars in [0, 1] (accuracies), one per label, with the value written beside it."""
  label_w = 8 * max(len(k) for k in values) + 8
  height = 24 + len(values) * (bar_height + 6)
  canvas = Image.new('RGB', (label_w + width + 60, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 4), title, fill=(0, 0, 0))
  for i, (label, value) in enumerate(values.items()):
    top = 24 + i * (bar_height + 6)
    draw.text((4, top + 3), label, fill=(0, 0, 0))
    length = int(width * min(max(value, 0.0), 1.0))
    draw.rectangle((label_w, top, label_w + length, top + bar_height),
                   fill=tuple(int(c) for c in PART_COLOURS[3]))
    draw.text((label_w + length + 4, top + 3), f'{100 * value:.1f}', fill=(0, 0, 0))
  return save_png(canvas, path)


def save_mask_sizes(visible: np.ndarray, groups: np.ndarray, group_names: Sequence[str],
                    path: str | os.PathLike, title: str, bins: int = 10,
                    plot_height: int = 60) -> epath.Path:
  """Per group, the share of its images by mask size: `bins` bars over visible-patch fractions
  (0, 1/bins], ..., ((bins-1)/bins, 1], and apart, in red, the empty masks.

  Args:
    visible: bool [N, h*w] patch masks; groups: [N] in range(len(group_names)) ('all' without
      group names).
  """
  count, patches = visible.sum(axis=1), visible.shape[1]
  bin_of = -(-count * bins // patches)  # 0: empty; k: fraction in ((k-1)/bins, k/bins]
  rows = [(name, groups == g) for g, name in enumerate(group_names) if (groups == g).any()]
  rows = [(f'{name}: n={m.sum()}, {100 * (count[m] == 0).mean():.0f}% empty', m)
          for name, m in rows or [('all', np.ones(len(count), bool))]]
  bar, label_w, row_h = 14, 6 * max(len(label) for label, _ in rows) + 16, plot_height + 16
  x_of = lambda k: label_w + k * (bar + 2) + (8 if k else 0)  # a gap after the empty bar
  canvas = Image.new('RGB', (max(x_of(bins + 1) + 8, 6 * len(title) + 8),
                             24 + len(rows) * row_h + 14), 'white')
  draw = ImageDraw.Draw(canvas)
  draw.text((4, 4), title, fill='black')
  for i, (label, members) in enumerate(rows):
    base = 24 + i * row_h + plot_height
    draw.text((4, base - plot_height // 2), label, fill='black')
    shares = np.bincount(bin_of[members], minlength=bins + 1) / members.sum()
    for k, share in enumerate(shares):
      if share > 0:
        draw.rectangle((x_of(k), base - round(plot_height * share), x_of(k) + bar - 1, base),
                       fill=(200, 30, 30) if k == 0 else tuple(int(c) for c in PART_COLOURS[3]))
    draw.line((label_w, base, x_of(bins + 1), base), fill='black')
  bottom = 24 + len(rows) * row_h
  for x, text in ((x_of(1), '0'), ((x_of(1) + x_of(bins + 1)) // 2 - 8, '0.5'),
                  (x_of(bins + 1) - 8, '1')):
    draw.text((x, bottom), text, fill='black')
  return save_png(canvas, path)


def mask_size_picture(model, config: ml_collections.ConfigDict, source,
                      path: str | os.PathLike, title: str) -> epath.Path:
  """`save_mask_sizes` of the eval forward's masks on the images the mask-geometry audit reads
  (the first eval.leak_num_images of `source`)."""
  leak.check_config(config)
  graphdef, params, frozen, rest = optim.split_frozen(model, config.optim.group_rules,
                                                      config.optim.groups)
  mesh = sharding.make_mesh(config.mesh)
  params, frozen = jax.device_put((params, frozen), sharding.replicated(mesh))
  step = leak.make_leak_step(jax.jit(audit.make_mask_step(graphdef, rest, None)))
  with jax.set_mesh(mesh):
    out = leak.collect_masks(step, params, frozen, source, factory.make_transforms(config)[1],
                             config, sharding.batch_sharding(mesh))
  return save_mask_sizes(out['patch_mask'] > 0.5, out['group'], source.group_names, path, title)


# ----------------------------------------------------------------------------
# --mode visualize
# ----------------------------------------------------------------------------
def examples_per_group(source, count: int) -> list[int]:
  """The first examples of each group in turn (or simply the first ones without groups)."""
  if not source.num_groups:
    return list(range(min(count, len(source))))
  per_group = max(1, count // source.num_groups)
  picked: dict[int, list[int]] = {}
  for i in range(min(len(source), 50 * count)):
    members = picked.setdefault(source[i]['group'], [])
    if len(members) < per_group:
      members.append(i)
  return sorted(sum(picked.values(), []), key=lambda i: source[i]['group'])[:count]


def eval_batch(config: ml_collections.ConfigDict, source, indices: Sequence[int],
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Eval-transformed uint8 images of `indices` and the method's `batch_inputs` (host arrays)."""
  _, transform = factory.make_transforms(config)
  rng = np.random.default_rng(0)
  records = [data_lib.transforms.process(source[i], rng, transform) for i in indices]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
  return batch['image'], methods.batch_inputs(config.model.kind, batch, repr(source))


def _predict(model, config: ml_collections.ConfigDict, source, indices: Sequence[int],
             batch_size: int = 64) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Eval-transformed uint8 images and the model's outputs for `indices` (host arrays)."""
  images, inputs = eval_batch(config, source, indices)
  graphdef, params, frozen, rest = optim.split_frozen(model, config.optim.group_rules,
                                                      config.optim.groups)
  predict = methods.get(config.model.kind).predict
  forward = jax.jit(lambda x, inputs: apply(graphdef, rest, params, frozen, x, predict,
                                            rng=jax.random.key(config.seed), **inputs))
  outputs = [jax.device_get(forward(images[i:i + batch_size],
                                    {k: v[i:i + batch_size] for k, v in inputs.items()}))
             for i in range(0, len(images), batch_size)]
  return images, {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def example_picture(source, indices: Sequence[int], images: np.ndarray,
                    out: Mapping[str, np.ndarray], scale: float = 2) -> Image.Image:
  """One row per image: image | part assignment | stage-2 view, captioned with predictions.

  `images` and `out` are `indices`' eval images and the method's predict outputs for them.
  """
  names = source.class_names
  rows, captions = [], []
  for n, i in enumerate(indices):
    record = source[i]
    truth = (source.group_names[record['group']] if source.num_groups
             else names[record['label']])
    caption = f'{truth}: stage 2 -> {names[out["logits"][n].argmax()]}'
    row = [images[n]]
    if 'part_maps' in out:
      caption += f', stage 1 -> {names[out["logits1"][n].argmax()]}'
      row.append(part_overlay(images[n], out['part_maps'][n]))
    if 'fg_mask' in out:  # the foreground mask, in patches
      row.append(mask_overlay(images[n], out['fg_mask'][n]))
    rows.append(row)
    captions.append(caption)
  return grid_picture(rows, captions, scale)


def example_grid(model, config: ml_collections.ConfigDict, source, indices: Sequence[int],
                 path: str | os.PathLike) -> epath.Path:
  """Writes `example_picture` of the model's outputs for `indices` as a PNG."""
  images, out = _predict(model, config, source, indices)
  return save_png(example_picture(source, indices, images, out), path)


def part_galleries(model, config: ml_collections.ConfigDict, source, pool: int, size: int,
                   out_dir: epath.Path) -> list[epath.Path]:
  """For each part, the `size` images (of the first `pool`) where it covers the most patches."""
  indices = list(range(min(pool, len(source))))
  images, out = _predict(model, config, source, indices)
  num_parts = out['part_maps'].shape[-1] - 1
  assigned = out['part_maps'].argmax(-1)  # [N, h, w]
  area = np.stack([(assigned == k).mean((1, 2)) for k in range(num_parts)], axis=1)  # [N, K]
  paths = []
  for k in range(num_parts):
    best = np.argsort(-area[:, k], kind='stable')[:size]
    # One-hot maps that keep part k and send every other token to the background.
    row = [part_overlay(images[n], np.eye(num_parts + 1)[np.where(assigned[n] == k, k, num_parts)])
           for n in best]
    paths.append(save_grid([row], out_dir / f'part_{k}.png',
                           [f'part {k}: largest in ' + ', '.join(
                               f'{100 * area[n, k]:.0f}%' for n in best)]))
  return paths


def run_visualize(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  which: str = 'final', split: str = '', num_images: int = 8,
                  gallery_pool: int = 256, gallery_size: int = 6) -> list[epath.Path]:
  """Writes the pictures of <workdir>/params/<which> under <workdir>/pictures/<which>/, those of
  one split (the part galleries) under <which>/<split>/."""
  workdir = epath.Path(workdir)
  if not split:
    split = config.data.val_split or next(iter(config.data.evals), '')
    if jax.process_index() == 0:
      default = 'data.val_split' if config.data.val_split else 'the first of data.evals'
      print(f'drawing from split {split!r} ({default}; --split picks another)', flush=True)
  if split not in config.data.evals:
    raise ValueError(f'no eval split {split!r} to draw from; configured: '
                     f'{sorted(config.data.evals)}')
  model = factory.load_model(config, workdir, which)
  source = factory.make_eval_source(config, config.data.evals[split])
  out_dir = workdir / 'pictures' / which
  paths = [example_grid(model, config, source, examples_per_group(source, num_images),
                        out_dir / f'examples_{split}.png')]
  if methods.get(config.model.kind).has_mask:
    paths += part_galleries(model, config, source, gallery_pool, gallery_size, out_dir / split)
  loo = workdir / 'eval' / which / 'leave_one_out.json'
  if loo.exists():  # written by --mode leave_one_out
    for name, rows in json.loads(loo.read_text())['splits'].items():
      bars = {('removed ' + ','.join(map(str, r['removed_parts'])) if r['removed_parts']
               else 'none'): r['accuracy'] for r in rows}
      paths.append(save_bar_chart(bars, out_dir / f'leave_one_out_{name}.png',
                                  f'{name}: accuracy with parts removed'))
  if methods.get(config.model.kind).has_mask:
    paths.append(mask_size_picture(model, config, source, out_dir / f'mask_sizes_{split}.png',
                                   f'{split}: images by visible-patch fraction (red: empty mask)'))
  if jax.process_index() == 0:
    for path in paths:
      print(f'wrote {path}')
  return paths
