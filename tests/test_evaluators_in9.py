"""The IN-9 mapping and the background challenge on tiny layouts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ifam_jax import data as data_lib
from ifam_jax import sharding
from ifam_jax.evaluators import in9
from ifam_jax.evaluators import metrics
from test_data import write_image


def single_device_batch_sharding():
  return sharding.batch_sharding(sharding.make_mesh([('data', -1), ('fsdp', 1)],
                                                    jax.devices()[:1]))



def test_in9_mapping(tmp_path):
  path = tmp_path / 'in_to_in9.json'
  path.write_text(json.dumps({'0': 0, '1': 0, '2': 1, '3': -1, '4': 8}))
  table = in9.load_in9_mapping(path, 5)
  np.testing.assert_array_equal(table, [0, 0, 1, -1, 8])
  # Predictions 0..4 against IN-9 labels: 1 -> dog is wrong for a reptile, 3 -> -1 always.
  logits = np.eye(5, dtype=np.float32)
  labels = np.array([0, 3, 1, 3, 8])
  m = metrics.summarize_predictions({'logits': logits, 'label': labels,
                                     'group': -np.ones(5, int), 'valid': np.ones(5)},
                                    class_names=data_lib.sources.IN9_CLASSES, class_map=table)
  assert m['accuracy'] == 3 / 5
  assert m['class_accuracy']['00_dog'] == 1.0 and m['class_accuracy']['03_reptile'] == 0.0
  assert 'top5_accuracy' not in m and 'auroc' not in m
  assert metrics.bg_gap({'original': 0.9, 'mixed_same': 0.8, 'mixed_rand': 0.55}) == \
      pytest.approx(0.25)

  for content, error in (({'0': 0, '1': 0, '2': 1, '3': -1, '5': 8}, "key '5'"),
                         ({'0': 0, '1': 9, '2': 1, '3': -1, '4': 8}, 'maps to 9'),
                         ({'0': 0, '1': 0}, 'lacks 3'), ([0, 1], 'JSON object')):
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
      in9.load_in9_mapping(path, 5)


def make_challenge(root, size=8):
  """Foregrounds: a bright dog, a brighter bird (centre masks); backgrounds 30, 30, 240.

  PNG content under .JPEG names: exact pixel values (PIL reads the format from the bytes).
  """
  mask = np.zeros((size, size), bool)
  mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
  for cls, name, value in (('00_dog', 'a', 200), ('01_bird', 'b', 220)):
    write_image(root / 'original' / 'val' / cls / f'{name}.JPEG', value, (size, size), 'PNG')
    (root / 'fg_mask' / 'val' / cls).mkdir(parents=True, exist_ok=True)
    np.save(root / 'fg_mask' / 'val' / cls / f'{name}.npy', mask)
  for cls, name, value in (('00_dog', 'x', 30), ('01_bird', 'y', 30), ('01_bird', 'z', 240)):
    write_image(root / 'only_bg_t' / 'val' / cls / f'{name}.JPEG', value, (size, size), 'PNG')


def pixel_classifier(row, col, num_classes=2, bright_class=1):
  """A stub eval step: class `bright_class` if pixel (row, col) is bright, else 0."""

  def eval_step(params, frozen, batch, rng):
    del params, frozen, rng
    bright = batch['image'][:, row, col, 0] > 128
    return {'logits': jax.nn.one_hot(jnp.where(bright, bright_class, 0), num_classes)}

  return eval_step


def test_bg_challenge_on_a_tiny_layout(tmp_path):
  make_challenge(tmp_path)
  transform = data_lib.transforms.resize_center_crop(8)
  source = data_lib.ImageNet9Source(tmp_path, 'only_bg_t', 'val')
  backgrounds = list(data_lib.make_dataset(source, transform=transform, global_batch_size=2,
                                           seed=0, train=False))
  assert [b['valid'].tolist() for b in backgrounds] == [[1, 1], [1, 0]]
  batch_sharding = single_device_batch_sharding()

  def run(step, class_map=None):
    return in9.bg_challenge(step, {}, {}, in9.challenge_foregrounds(tmp_path, transform),
                            backgrounds, batch_sharding, 0, class_map)

  # Reads the foreground: the dog (bright) is called a bird on every background, the bird never
  # fails. Reads the background corner: each foreground meets a background of the other class.
  assert run(pixel_classifier(4, 4)) == {'num_foregrounds': 2, 'num_vulnerable': 1,
                                         'accuracy': 0.5}
  assert run(pixel_classifier(0, 0))['accuracy'] == 0.0
  # Through a class map: 3 model classes, bright -> class 2 -> bird, or -> -1 (always wrong).
  centre = pixel_classifier(4, 4, num_classes=3, bright_class=2)
  assert run(centre, np.array([0, 1, 1]))['accuracy'] == 0.5
  assert run(centre, np.array([0, 1, -1]))['accuracy'] == 0.0


def test_challenge_foregrounds_name_a_pickled_mask(tmp_path):
  make_challenge(tmp_path)
  path = tmp_path / 'fg_mask' / 'val' / '01_bird' / 'b.npy'
  np.save(path, np.array([{'mask': 1}], dtype=object), allow_pickle=True)
  transform = data_lib.transforms.resize_center_crop(8)
  with pytest.raises(ValueError, match=f'foreground mask {path}: .*plain \\(non-object\\) array'):
    list(in9.challenge_foregrounds(tmp_path, transform))
