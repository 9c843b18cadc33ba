"""Entry point: `python -m ifam_jax.main --config configs/<recipe>.py[:args] --workdir DIR`.

The resolved config is written to <workdir>/config.json. Running the same command again resumes
from the workdir's latest checkpoint. On a multi-host slice set IFAM_MULTIHOST=1 on every host
(launch/ does) so that `jax.distributed.initialize()` runs; it is the only environment variable
the project reads.
"""

from __future__ import annotations

import os
import pathlib

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ifam_jax import demo, export, train, visualize

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file, optionally with :args.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the resolved config.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'visualize', 'export', 'import'],
                          'What to run.')
_WHICH = flags.DEFINE_string('which', 'final', 'Saved parameters to use outside training: '
                             "<workdir>/params/<which> ('final', 'best', ...).")
_SOURCE = flags.DEFINE_string('source', '', '--mode import: a reference PyTorch snapshot (.pth) or '
                              'our model.safetensors, saved as <workdir>/params/<which> '
                              "('imported' unless --which is given).")
_SPLIT = flags.DEFINE_string('split', '', 'Eval split to draw pictures from (default: the '
                             'validation split, else the first eval).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off; progress is printed
  if os.environ.get('IFAM_MULTIHOST') == '1':
    jax.distributed.initialize()
  config = _CONFIG.value
  workdir = pathlib.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  mode = _MODE.value
  if jax.process_index() == 0:
    name = 'config.json' if mode == 'train' else f'config_{mode}.json'
    (workdir / name).write_text(config.to_json_best_effort(indent=2) + '\n')
  logging.info('devices: %s', jax.devices())
  if mode == 'visualize':
    visualize.run_visualize(config, workdir, _WHICH.value, _SPLIT.value)
  elif mode == 'export':
    for name, path in export.export(config, workdir, _WHICH.value).items():
      print(f'{name}: {path}')
  elif mode == 'import':
    if not _SOURCE.value:
      raise app.UsageError('--mode import needs --source')
    which = _WHICH.value if flags.FLAGS['which'].present else 'imported'
    print(export.import_to_workdir(_SOURCE.value, config, workdir, which))
  elif config.compare_with_baseline:
    demo.train_and_compare(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
