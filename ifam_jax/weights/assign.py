"""Assigning converted arrays to a model: every name and shape checked before any value moves.

Shared by the DINOv2 import and by export's importers, so a bad checkpoint never leaves a model
half loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

Pairs = list[tuple[nnx.Variable, Any]]


def checked_pairs(module: nnx.Module, params: Mapping[str, Any]) -> Pairs:
  """Pairs each model parameter with its new value after checking that names and shapes agree."""
  variables = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
  values = traverse_util.flatten_dict(params)
  unexpected = sorted('.'.join(map(str, p)) for p in set(values) - set(variables))
  missing = sorted('.'.join(map(str, p)) for p in set(variables) - set(values))
  if unexpected or missing:
    raise ValueError(f'converted params do not match the model: unexpected {unexpected}; '
                     f'missing {missing}')
  wrong = [f'{".".join(map(str, p))}: converted {values[p].shape}, model {v.shape}'
           for p, v in variables.items() if values[p].shape != v.shape]
  if wrong:
    raise ValueError(f'converted params do not match the model: {"; ".join(wrong)}')
  return [(v, values[p]) for p, v in variables.items()]


def assign(pairs: Pairs) -> None:
  """Replaces each value by the new one, in the old dtype and on the old sharding.

  A module from `nnx.eval_shape` (ShapeDtypeStruct values) works too, which saves randomly
  initialising a large backbone only to overwrite it.
  """
  for variable, value in pairs:
    old = variable.get_value()
    variable.set_value(jax.device_put(np.asarray(value, old.dtype), old.sharding))


def load_params(module: nnx.Module, params: Mapping[str, Any]) -> None:
  """Assigns a nested dict of arrays to the module's parameters, after checking every name and
  shape (a module from `nnx.eval_shape` becomes a real one)."""
  assign(checked_pairs(module, params))
