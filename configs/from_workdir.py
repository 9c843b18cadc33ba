"""The config a trained run recorded in <workdir>/config.json, to change some of its settings.

The modes that read a trained run (eval, calibrate, leave_one_out, audit, visualize, export) use
that config when --config is not given; command-line overrides need a --config, which this
recipe provides:

  python -m ifam_jax.main --mode eval --workdir /tmp/w \\
      --config configs/from_workdir.py:/tmp/w --config.eval.splits="('test',)"
"""

import ml_collections
from etils import epath

from ifam_jax import workdir as workdir_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if not arg:
    raise ValueError('name the workdir: --config configs/from_workdir.py:<workdir>')
  return workdir_lib.read_config(epath.Path(arg))
