"""The no-download demo: iFAM against the ERM baseline on a spurious-correlation benchmark.

Trains iFAM and the plain ViT on the same synthetic data (the label is an object's shape; the
background type agrees with the label for 95% of training images and is balanced at test),
then prints average and worst-group accuracy of both and saves a picture of iFAM's part maps.
"""

from __future__ import annotations

import copy

import jax
import ml_collections
from etils import epath

from ifam_jax import config_lib, factory, train, visualize

PICTURE_EXAMPLES = 8


def _row(name: str, metrics: dict) -> str:
  return (f'| {name:<16} | {100 * metrics["accuracy"]:>8.1f} | '
          f'{100 * metrics["worst_group_accuracy"]:>14.1f} |')


def train_and_compare(config: ml_collections.ConfigDict, workdir: epath.Path) -> dict:
  """Trains both models in workdir/{ifam,baseline} and prints the comparison table."""
  test_split = config.demo_test_split
  results = {'iFAM': train.train_and_evaluate(config, workdir / 'ifam')}
  baseline = copy.deepcopy(config)
  with baseline.unlocked():
    config_lib.use_baseline(baseline)
  results['ERM baseline'] = train.train_and_evaluate(baseline, workdir / 'baseline')
  source = factory.make_source(config.data.evals[test_split])
  picture = visualize.example_grid(
      factory.load_model(config, workdir / 'ifam'), config, source,
      visualize.examples_per_group(source, PICTURE_EXAMPLES), workdir / 'ifam' / 'part_maps.png')

  if jax.process_index() == 0:
    print(f'\nTest split {test_split!r} (backgrounds balanced; train was '
          f'{100 * config.data.train.majority:.0f}% spurious):')
    print('| model            | avg acc. | worst-group acc. |')
    print('|------------------|----------|------------------|')
    for name, result in results.items():
      print(_row(name, result['evals'][test_split]))
    print(f'\nPart maps (image | parts | what stage 2 sees): {picture}')
  return results
