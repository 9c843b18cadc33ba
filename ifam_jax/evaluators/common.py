"""What more than one evaluator reads: user-supplied JSON files."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def read_json_object(path: str | os.PathLike, what: str, expected: str) -> dict[str, Any]:
  """A user-supplied JSON object (local or gs://); errors name the file and what was expected."""
  try:
    raw = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {what} {path}: {e}') from None
  if not isinstance(raw, dict):
    raise ValueError(f'{what} {path}: expected a JSON object {expected}')
  return raw
