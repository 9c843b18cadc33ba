"""Entry point: `python -m ifam_jax.main --config configs/<recipe>.py[:args] --workdir DIR`.

The resolved config is written to <workdir>/config.json. Running the same command again resumes
from the workdir's latest checkpoint. On a multi-host slice set IFAM_MULTIHOST=1 on every host
(launch/ does) so that `jax.distributed.initialize()` runs (see `initialize_multihost`).
"""

from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from ifam_jax import demo, evaluate, export, train, visualize

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file, optionally with :args.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the resolved config: '
                                'a local directory or gs://bucket/path.')
_MODE = flags.DEFINE_enum(
    'mode', 'train',
    ['train', 'eval', 'calibrate', 'leave_one_out', 'audit', 'visualize', 'export', 'import'],
    'What to run.')
_WHICH = flags.DEFINE_string('which', 'final', 'Parameters to use outside training: '
                             "<workdir>/params/<which> ('final', 'best', 'imported'), or "
                             "'step_<N>' for the train checkpoint of step N (EMA if any).")
_SOURCE = flags.DEFINE_string('source', '', '--mode import: a reference PyTorch snapshot (.pth) or '
                              'our model.safetensors, saved as <workdir>/params/<which> '
                              "('imported' unless --which is given).")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, '--mode import: replace the parameters at '
                               "<workdir>/params/<which>, also 'final' or 'best' of training.")
_FIXED_PARTS = flags.DEFINE_list('fixed_parts', [], '--mode leave_one_out: parts removed in '
                                 'every row (each other part is then removed in turn).')
_PERCENTILES = flags.DEFINE_list('percentiles', ['97', '99'], '--mode calibrate: percentiles q.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, '--mode audit: images audited per split.')
_SPLIT = flags.DEFINE_string('split', '', 'Eval split to draw pictures from (default: the '
                             'validation split, else the first eval).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_multihost() -> None:
  """`jax.distributed.initialize` when IFAM_MULTIHOST=1, and never otherwise.

  On Cloud TPU and under SLURM, JAX finds the coordinator, process count and id itself. Elsewhere
  (ssh fan-out, localhost tests) JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID name them; launch/ sets them.
  """
  if os.environ.get('IFAM_MULTIHOST') != '1':
    return
  count, index = os.environ.get('JAX_NUM_PROCESSES'), os.environ.get('JAX_PROCESS_ID')
  jax.distributed.initialize(
      coordinator_address=os.environ.get('JAX_COORDINATOR_ADDRESS') or None,
      num_processes=int(count) if count else None, process_id=int(index) if index else None)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off; progress is printed
  initialize_multihost()
  config = _CONFIG.value
  workdir = epath.Path(_WORKDIR.value)
  workdir.mkdir(parents=True, exist_ok=True)
  mode = _MODE.value
  if jax.process_index() == 0:
    name = 'config.json' if mode == 'train' else f'config_{mode}.json'
    (workdir / name).write_text(config.to_json_best_effort(indent=2) + '\n')
  logging.info('devices: %s', jax.devices())
  which = _WHICH.value
  if mode == 'eval':
    evaluate.run_eval(config, workdir, which)
  elif mode == 'calibrate':
    evaluate.run_calibrate(config, workdir, which, tuple(float(q) for q in _PERCENTILES.value))
  elif mode == 'leave_one_out':
    evaluate.run_leave_one_out(config, workdir, which, [int(p) for p in _FIXED_PARTS.value])
  elif mode == 'audit':
    report = evaluate.run_audit(config, workdir, which, _NUM_IMAGES.value)
    if not report['passed']:
      raise SystemExit('audit failed: stage 2 depends on masked-out pixels')
  elif mode == 'visualize':
    visualize.run_visualize(config, workdir, which, _SPLIT.value)
  elif mode == 'export':
    for name, path in export.export(config, workdir, which).items():
      print(f'{name}: {path}')
  elif mode == 'import':
    if not _SOURCE.value:
      raise app.UsageError('--mode import needs --source')
    which = which if flags.FLAGS['which'].present else 'imported'
    print(export.import_to_workdir(_SOURCE.value, config, workdir, which, _OVERWRITE.value))
  elif config.compare_with_baseline:
    demo.train_and_compare(config, workdir)
  else:
    train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  app.run(main)
