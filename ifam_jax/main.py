"""Entry point: `python -m ifam_jax.main --config configs/<recipe>.py[:args] --workdir DIR`.

The resolved config is written to <workdir>/config.json. Running the same command again resumes
from the workdir's latest checkpoint. The modes that read a trained run (`READ_RUN_MODES`) take
that config when --config is not given. On a multi-host slice set IFAM_MULTIHOST=1 on every host
(launch/ does) so that `jax.distributed.initialize()` runs (see `initialize_multihost`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from ifam_jax import compare, config_lib, evaluate, factory, predict_images, train, visualize
from ifam_jax import report as report_lib
from ifam_jax import workdir as workdir_lib
from ifam_jax.weights import exchange

# The modes that read a trained run: without --config they take the one in <workdir>/config.json.
READ_RUN_MODES = ('eval', 'calibrate', 'leave_one_out', 'audit', 'visualize', 'export',
                  'predict')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe file, optionally with :args. Needed by --mode train, compare and '
    "import; the other modes default to the run's <workdir>/config.json, whose settings "
    '--config=configs/from_workdir.py:<workdir> --config.<key>=<value> overrides.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the resolved config: '
                                'a local directory or gs://bucket/path.')
_MODE = flags.DEFINE_enum(
    'mode', 'train',
    ['train', 'compare', 'eval', 'calibrate', 'leave_one_out', 'audit', 'visualize', 'export',
     'import', 'predict', 'report'],
    "What to run ('predict' applies a run to new images: ifam_jax/predict_images.py). "
    "'compare' trains and fits every method of --methods in its own subfolder "
    '(ifam_jax/compare.py); a config with compare.methods set runs it in train mode too. '
    "'report' writes <workdir>/report/index.html from what the other modes wrote, of a run "
    'or a comparison, also mid-training (ifam_jax/report.py).')
_WHICH = flags.DEFINE_string('which', 'final', 'Parameters to use outside training: '
                             "<workdir>/params/<which> ('final', 'best', 'imported'), or "
                             "'step_<N>' for the train checkpoint of step N (EMA if any).")
_SOURCE = flags.DEFINE_string('source', '', '--mode import: a reference PyTorch snapshot (.pth) or '
                              'our model.safetensors, saved as <workdir>/params/<which> '
                              "('imported' unless --which is given).")
_OVERWRITE = flags.DEFINE_bool('overwrite', False, '--mode import: replace the parameters at '
                               "<workdir>/params/<which>, also 'final' or 'best' of training.")
_FIXED_PARTS = flags.DEFINE_list('fixed_parts', [], '--mode leave_one_out: parts removed in '
                                 'every row (each other part is then removed in turn); '
                                 '--mode predict: parts removed.')
_PERCENTILES = flags.DEFINE_list('percentiles', ['97', '99'], '--mode calibrate: percentiles q.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 64, '--mode audit: images audited per split.')
_METHODS = flags.DEFINE_list('methods', [], '--mode compare: the methods, e.g. '
                             'erm,ifam,late_mask,dfr,dar,a2 (default: the config\'s '
                             'compare.methods).')
_SPLIT = flags.DEFINE_string('split', '', 'Eval split to draw pictures from (default: the '
                             'validation split, else the first eval); its part galleries go to '
                             '<workdir>/pictures/<which>/<split>/.')
_IMAGES = flags.DEFINE_string('images', '', '--mode predict: a folder (walked recursively for '
                              'image files), a glob (quote it) or one image file.')
_TOP_K = flags.DEFINE_integer('top_k', 5, '--mode predict: classes (and probabilities) per image.')
_OUTPUT = flags.DEFINE_string('output', '', '--mode predict: a .jsonl or .csv file (default '
                              '<workdir>/predict/<which>/predictions.jsonl).')
_SAVE_MASKS = flags.DEFINE_bool('save_masks', False, '--mode predict: also write each image\'s '
                                'part assignment and stage-2 mask as PNGs beside the output.')
flags.mark_flags_as_required(['workdir'])


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


def check_flags(mode: str, num_parts: int) -> None:
  """Flag values a mode reads, checked before any work (a calibration pass takes hours)."""
  if mode == 'calibrate':
    for q in _PERCENTILES.value:
      try:
        ok = 0 <= float(q) <= 100
      except ValueError:
        ok = False
      if not ok:
        raise app.UsageError(f'--percentiles: {q!r} is not a percentile in [0, 100]')
  if mode in ('leave_one_out', 'predict'):
    for part in _FIXED_PARTS.value:
      if not (part.isdigit() and int(part) < num_parts):
        raise app.UsageError(f'--fixed_parts: {part!r} is not a part of the model '
                             f'(0..{num_parts - 1})')
  if mode == 'audit' and _NUM_IMAGES.value < 1:
    raise app.UsageError(f'--num_images must be at least 1, got {_NUM_IMAGES.value}')
  if mode == 'predict':
    if not _IMAGES.value:
      raise app.UsageError('--mode predict needs --images=<folder, glob or file>')
    if _TOP_K.value < 1:
      raise app.UsageError(f'--top_k must be at least 1, got {_TOP_K.value}')
    try:
      predict_images.check_output(_OUTPUT.value)
      predict_images.find_images(_IMAGES.value)
    except (FileNotFoundError, ValueError) as e:
      raise app.UsageError(str(e)) from None
  if mode == 'import' and not _SOURCE.value:
    raise app.UsageError('--mode import needs --source')


def check_workdir_exists(workdir: epath.Path) -> None:
  if workdir_lib.is_local(workdir) and not workdir.is_dir():
    raise app.UsageError(f'--workdir {workdir} does not exist; pass the workdir of a trained run')


def saved_config(mode: str, workdir: epath.Path) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was trained with, for a mode given no --config."""
  if mode not in READ_RUN_MODES:
    raise app.UsageError(f'--mode {mode} needs --config=<recipe file>[:args]')
  check_workdir_exists(workdir)
  try:
    config = workdir_lib.read_config(workdir)
  except FileNotFoundError as e:
    hint = ('pass --config, the recipe the run was trained with'
            if not (workdir / 'config_compare.json').exists() else
            f'it holds a comparison: pass the --workdir of one run, {workdir}/<method>/seed_<s>')
    raise app.UsageError(f'{e}; {hint}') from None
  config.lock()  # as config_flags locks a recipe's
  return config


def check_saved_params(workdir: epath.Path, which: str) -> None:
  """The modes that read a run's parameters find them before they create anything."""
  check_workdir_exists(workdir)
  if workdir_lib.read_params_info(workdir, which) is None:
    raise FileNotFoundError(f'no saved parameters at {workdir / "params" / which} '
                            f'(--which {which}); train first, or pick another --which')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # library INFO chatter off; progress is printed
  mode = _MODE.value
  workdir = epath.Path(_WORKDIR.value)
  which = _WHICH.value
  if mode == 'report':  # reads the files of the other modes only: no config, no parameters
    check_workdir_exists(workdir)
    print(f'wrote {report_lib.write_report(workdir, which)}')
    return
  config = saved_config(mode, workdir) if _CONFIG.value is None else _CONFIG.value
  check_flags(mode, config.model.num_parts)
  methods = _METHODS.value or list(config.compare.methods)
  if mode == 'train' and config.compare.methods:
    mode = 'compare'
  if mode == 'compare':
    compare.check_methods(methods, config)
  initialize_multihost()
  factory.use_compilation_cache(config)
  if mode in READ_RUN_MODES:
    check_saved_params(workdir, which)
    factory.use_saved_classes(config, workdir, which)
  lead = jax.process_index() == 0
  if mode == 'compare':  # each method and seed locks its own folder: seeds may run side by side
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.check_writable(workdir)
    if lead:
      workdir_lib.replace_text(workdir / 'config_compare.json',
                               workdir_lib.config_as_json(config))
    compare.run_compare(config, workdir, methods)
    return
  if mode == 'train':
    workdir.mkdir(parents=True, exist_ok=True)
    workdir_lib.check_writable(workdir)
    with workdir_lib.WorkdirLock(workdir) if lead else contextlib.nullcontext():
      changed = workdir_lib.check_config_change(workdir, config)
      if lead:
        workdir_lib.record_config(workdir, config, changed)
      train.train_and_evaluate(config, workdir)
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if lead:
    (workdir / f'config_{mode}.json').write_text(workdir_lib.config_as_json(config))
  logging.info('devices: %s', jax.devices())
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
    for name, path in exchange.export(config, workdir, which).items():
      print(f'{name}: {path}')
  elif mode == 'predict':
    predict_images.run_predict(config, workdir, _IMAGES.value, which, _TOP_K.value, _OUTPUT.value,
                               _SAVE_MASKS.value, [int(p) for p in _FIXED_PARTS.value])
  elif mode == 'import':
    which = which if flags.FLAGS['which'].present else 'imported'
    print(exchange.import_to_workdir(_SOURCE.value, config, workdir, which, _OVERWRITE.value))


def check_overrides(argv: Sequence[str]) -> None:
  """`--config.<key>=<value>` needs a --config to change; absl would only call it unknown."""
  overrides = [a for a in argv if a.startswith('--config.')]
  if overrides and not any(a == '--config' or a.startswith('--config=') for a in argv):
    sys.exit(f'{overrides[0]} needs a --config to override; for the config of a trained run pass '
             '--config=configs/from_workdir.py:<workdir>')


if __name__ == '__main__':
  check_overrides(sys.argv)
  app.run(main, flags_parser=config_lib.parse_flags)
