"""ImageNet-9: the class mapping of ImageNet-1K models and the adversarial-background challenge.

The IN-9 variants themselves are eval sets like any other (`loop.Classification` with the
mapping as its class map); BG-GAP is `metrics.bg_gap` of their accuracies.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ifam_jax import data as data_lib
from ifam_jax.data.sources import IN9_CLASSES
from ifam_jax.evaluators import loop
from ifam_jax.evaluators.common import read_json_object


# ----------------------------------------------------------------------------
# Class mapping
# ----------------------------------------------------------------------------
def load_in9_mapping(path: str | os.PathLike, num_classes: int) -> np.ndarray:
  """in_to_in9.json ({"<model class>": IN-9 class 0..8 or -1}) as an int array over all classes."""
  raw = read_json_object(path, 'the IN-9 mapping', '{"<class>": <IN-9 class>}')
  table = np.full(num_classes, -2, np.int64)
  for key, value in raw.items():
    if not (key.isdigit() and int(key) < num_classes):
      raise ValueError(f'IN-9 mapping {path}: key {key!r} is not a class of the model '
                       f'(0..{num_classes - 1})')
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value < len(IN9_CLASSES):
      raise ValueError(f'IN-9 mapping {path}: class {key} maps to {value!r}, not -1..8')
    table[int(key)] = value
  missing = np.flatnonzero(table == -2)
  if missing.size:
    raise ValueError(f'IN-9 mapping {path} lacks {missing.size} of the model\'s {num_classes} '
                     f'classes (first: {missing[:5].tolist()}); map unused classes to -1')
  return table


# ----------------------------------------------------------------------------
# The adversarial-background challenge (reference 7.7)
# ----------------------------------------------------------------------------
def _load_foreground(path: pathlib.Path) -> np.ndarray:
  """A foreground mask .npy as uint8; never unpickles, which could run code from the file."""
  try:
    return np.load(path, allow_pickle=False).astype(np.uint8)
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f'foreground mask {path}: {e}; it must be a plain (non-object) '
                     'array') from None


def challenge_foregrounds(root: str | pathlib.Path, transform: Any
                          ) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """(image uint8 [S, S, 3], mask bool [S, S], IN-9 label) for each fg_mask/val/<class>/<x>.npy
  with its image original/val/<class>/<x>.JPEG, in the reference's sorted order."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(0)  # the eval transforms draw nothing
  for folder in sorted(p for p in (root / 'fg_mask' / 'val').iterdir() if p.is_dir()):
    if folder.name not in IN9_CLASSES:
      raise ValueError(f'{folder} is not an IN-9 class folder {IN9_CLASSES}')
    for mask_path in sorted(folder.glob('*.npy')):
      image_path = root / 'original' / 'val' / folder.name / (mask_path.stem + '.JPEG')
      record = {'image': image_path.read_bytes(), 'label': IN9_CLASSES.index(folder.name),
                'group': -1, 'fg_mask': _load_foreground(mask_path)}
      out = data_lib.transforms.process(record, rng, transform)
      if not out['valid']:
        raise ValueError(f'challenge foreground {image_path} is unreadable')
      yield out['image'], out['fg_mask'] > 0, int(out['label'])


def bg_challenge(eval_step: Callable, params: Any, frozen: Any,
                 foregrounds: Iterable[tuple[np.ndarray, np.ndarray, int]],
                 backgrounds: Sequence[Mapping[str, np.ndarray]], batch_sharding: Any, seed: int,
                 class_map: np.ndarray | None = None) -> dict[str, Any]:
  """The adversarial-background challenge (reference 7.7).

  Each foreground is pasted (mask * fg + (1 - mask) * bg) on every background; it is vulnerable
  if any composite is misclassified, and the search stops at the first background batch that
  fools the model, as the reference's does. Accuracy = 1 - fraction vulnerable. The cost is up
  to |foregrounds| x |backgrounds| forward passes: about 4k x 4k = 16M on the IN-9 release, a
  few GPU-hours for ViT-B (backgrounds are decoded once and kept in host memory, ~0.6 GB).

  Args:
    eval_step: as `make_eval_step` (not jitted; its 'logits' are used).
    foregrounds: (image, mask, label) as `challenge_foregrounds` yields them.
    backgrounds: per-process eval batches ('image', 'valid') of the only_bg_t images.
  """
  table = None if class_map is None else jnp.asarray(class_map)

  @jax.jit
  def misclassified(params, frozen, image, mask, label, batch, rng):
    composite = jnp.where(mask[None, :, :, None], image[None], batch['image'])
    pred = jnp.argmax(eval_step(params, frozen, {'image': composite}, rng)['logits'], axis=-1)
    if table is not None:
      pred = table[pred]
    return jnp.any((pred != label) & (batch['valid'] > 0))

  total = vulnerable = 0
  for j, (image, mask, label) in enumerate(foregrounds):
    total += 1
    for i, batch in enumerate(backgrounds):
      arrays = data_lib.global_batch({k: batch[k] for k in ('image', 'valid')}, batch_sharding)
      rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), j), i)
      if bool(misclassified(params, frozen, image, mask, label, arrays, rng)):
        vulnerable += 1
        break
  return {'num_foregrounds': total, 'num_vulnerable': vulnerable,
          'accuracy': 1.0 - vulnerable / total if total else float('nan')}


@dataclasses.dataclass
class BackgroundChallenge:
  """`bg_challenge` on the IN-9 release at `root` (fg_mask/val, original/val, only_bg_t/val).

  `run`'s predict function yields `make_eval_step`'s outputs and is not jitted (`bg_challenge`
  jits it with the compositing). `class_map` sends the model's classes to IN-9's.
  """

  root: pathlib.Path
  config: ml_collections.ConfigDict
  batch_sharding: Any
  class_map: np.ndarray | None = None

  def run(self, predict: Callable, params: Any, frozen: Any) -> dict[str, Any]:
    transform = data_lib.transforms.resize_center_crop(self.config.model.image_size)
    source = data_lib.ImageNet9Source(self.root, 'only_bg_t', 'val')
    ds, num_batches = loop.eval_dataset(source, transform, self.config)
    backgrounds = [dict(batch) for _, batch in zip(range(num_batches), ds)]
    return bg_challenge(predict, params, frozen, challenge_foregrounds(self.root, transform),
                        backgrounds, self.batch_sharding, self.config.seed, self.class_map)
