"""The no-download demo: iFAM against the ERM baseline on a spurious-correlation benchmark.

Trains iFAM and the plain ViT on the same synthetic data (the label is an object's shape; the
background type agrees with the label for 95% of training images and is balanced at test),
then prints average and worst-group accuracy of both and saves a picture of iFAM's part maps.
"""

from __future__ import annotations

import copy
import pathlib

import jax
import ml_collections
import numpy as np

from ifam_jax import config_lib, train, visualize
from ifam_jax import data as data_lib

PICTURE_EXAMPLES = 8


def _row(name: str, metrics: dict) -> str:
  return (f'| {name:<16} | {100 * metrics["accuracy"]:>8.1f} | '
          f'{100 * metrics["worst_group_accuracy"]:>14.1f} |')


def _examples_per_group(source, count: int) -> list[int]:
  """The first examples of each group in turn, so every group shows up in the picture."""
  per_group = max(1, count // max(source.num_groups, 1))
  picked: dict[int, list[int]] = {}
  for i in range(min(len(source), 50 * count)):
    members = picked.setdefault(source[i]['group'], [])
    if len(members) < per_group:
      members.append(i)
  return sorted(sum(picked.values(), []), key=lambda i: source[i]['group'])[:count]


def save_part_maps(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                   split: str) -> pathlib.Path:
  """Image, part overlay and stage-2 view for a few examples of `split`, one row each."""
  model = train.load_model(config, workdir)
  source = train.make_source(config.data.evals[split])
  _, eval_transform = train.make_transforms(config)
  indices = _examples_per_group(source, PICTURE_EXAMPLES)
  rng = np.random.default_rng(0)
  images = np.stack([data_lib.transforms.process(source[i], rng, eval_transform)['image']
                     for i in indices])
  out = jax.jit(lambda x: model(data_lib.normalize(x), train=False))(images)
  maps, masks = np.asarray(out.part_maps), np.asarray(out.fg_mask)
  preds, stage1 = np.asarray(out.logits.argmax(-1)), np.asarray(out.stage1_logits.argmax(-1))
  rows, captions = [], []
  for n, i in enumerate(indices):
    record = source[i]
    rows.append([images[n], visualize.part_overlay(images[n], maps[n]),
                 visualize.mask_overlay(images[n], masks[n])])
    captions.append(f'{source.group_names[record["group"]]}: stage 2 -> '
                    f'{source.class_names[preds[n]]}, stage 1 -> {source.class_names[stage1[n]]}')
  return visualize.save_grid(rows, workdir / 'part_maps.png', captions)


def train_and_compare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains both models in workdir/{ifam,baseline} and prints the comparison table."""
  test_split = config.demo_test_split
  results = {'iFAM': train.train_and_evaluate(config, workdir / 'ifam')}
  baseline = copy.deepcopy(config)
  with baseline.unlocked():
    config_lib.use_baseline(baseline)
  results['ERM baseline'] = train.train_and_evaluate(baseline, workdir / 'baseline')
  picture = save_part_maps(config, workdir / 'ifam', test_split)

  if jax.process_index() == 0:
    print(f'\nTest split {test_split!r} (backgrounds balanced; train was '
          f'{100 * config.data.train.majority:.0f}% spurious):')
    print('| model            | avg acc. | worst-group acc. |')
    print('|------------------|----------|------------------|')
    for name, result in results.items():
      print(_row(name, result['evals'][test_split]))
    print(f'\nPart maps (image | parts | what stage 2 sees): {picture}')
  return results
