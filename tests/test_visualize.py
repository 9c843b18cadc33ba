"""Pictures: overlays by hand, and --mode visualize on a tiny trained workdir."""

import numpy as np
import pytest
from PIL import Image

from fixtures.tiny_config import get_config
from ifam_jax import train, visualize


def test_overlays_by_hand():
  image = np.full((4, 4, 3), 100, np.uint8)
  maps = np.zeros((2, 2, 3))  # K=2 on a 2x2 grid: part 0, part 1, background, background
  maps[0, 0, 0] = maps[0, 1, 1] = maps[1, 0, 2] = maps[1, 1, 2] = 1.0
  out = visualize.part_overlay(image, maps, alpha=0.5)
  np.testing.assert_array_equal(out[2:], image[2:])  # background patches untouched
  expected = (0.5 * 100 + 0.5 * visualize.PART_COLOURS[0].astype(float)).astype(np.uint8)
  np.testing.assert_array_equal(out[0, 0], expected)
  assert not np.array_equal(out[0, 0], out[0, 3])  # parts 0 and 1 get different colours
  masked = visualize.mask_overlay(image, np.array([[1.0, 0.0], [0.0, 1.0]]))
  assert masked[:2, :2].min() == 100 and masked[:2, 2:].max() == 0 and masked[2:, 2:].min() == 100


def test_grid_and_bar_chart(tmp_path):
  tile = np.zeros((8, 8, 3), np.uint8)
  path = visualize.save_grid([[tile, tile], [tile]], tmp_path / 'g.png', ['a', 'b'], scale=2)
  assert Image.open(path).size == (2 * (16 + 4) + 4, 2 * (16 + 14 + 4) + 4)
  chart = visualize.save_bar_chart({'none': 0.9, 'part 0': 0.4}, tmp_path / 'bar.png', 't')
  pixels = np.asarray(Image.open(chart))
  assert pixels.shape[0] == 24 + 2 * 24  # two bars
  bar = np.all(pixels == visualize.PART_COLOURS[3], axis=-1)
  rows = [np.flatnonzero(bar[24 + i * 24 + 9]).size for i in range(2)]
  assert rows[0] > 2 * rows[1] > 0  # 0.9 is drawn longer than twice 0.4


def test_mask_size_histogram_by_hand(tmp_path):
  red, blue = (200, 30, 30), tuple(visualize.PART_COLOURS[3])

  def drawn(visible, groups, names):
    path = visualize.save_mask_sizes(np.asarray(visible, bool), np.asarray(groups), names,
                                     tmp_path / 'sizes.png', 'sizes')
    pixels = np.asarray(Image.open(path).convert('RGB'))
    is_red, is_blue = (np.all(pixels == c, axis=-1) for c in (red, blue))
    return pixels, is_red, is_blue

  full, empty, quarter = [1] * 16, [0] * 16, [1] * 4 + [0] * 12
  _, all_empty, no_blue = drawn([empty] * 4, [0] * 4, ['a/x'])
  assert all_empty.any() and not no_blue.any()
  _, no_red, all_full = drawn([full] * 3, [0] * 3, [])  # no groups: one row of every image
  assert not no_red.any() and all_full.sum() == all_empty.sum()  # one bar, all its images
  # Half empty, half a quarter visible: two half-height bars, the second one column of bars.
  pixels, half_red, half_blue = drawn([empty, quarter] * 2, [1] * 4, ['a/x', 'a/y'])
  assert half_red.sum() == pytest.approx(all_empty.sum() / 2, rel=0.05)
  assert half_blue.sum() == half_red.sum()
  assert np.ptp(np.flatnonzero(half_blue.any(0))) == np.ptp(np.flatnonzero(half_red.any(0)))
  assert np.flatnonzero(half_blue.any(0)).min() > np.flatnonzero(half_red.any(0)).max()
  # Two groups: two rows, one above the other.
  tall, red2, _ = drawn([empty] * 2 + [quarter] * 2, [0, 0, 1, 1], ['a/x', 'a/y'])
  assert tall.shape[0] > pixels.shape[0] and red2.sum() == all_empty.sum()


@pytest.mark.slow
def test_run_visualize_on_a_trained_workdir(tmp_path):
  config = get_config('steps=2')
  train.train_and_evaluate(config, tmp_path)
  paths = visualize.run_visualize(config, tmp_path, gallery_pool=8, gallery_size=3)
  pictures = tmp_path / 'pictures' / 'final'
  assert sorted(paths) == [pictures / 'examples_val.png', pictures / 'mask_sizes_val.png',
                           pictures / 'val' / 'part_0.png']
  for path in paths:
    assert Image.open(path).size[0] > 64
  # Another split's pictures go beside these, not over them.
  val_gallery = (pictures / 'val' / 'part_0.png').read_bytes()
  paths = visualize.run_visualize(config, tmp_path, split='test', gallery_pool=8, gallery_size=3)
  assert sorted(paths) == [pictures / 'examples_test.png', pictures / 'mask_sizes_test.png',
                           pictures / 'test' / 'part_0.png']
  assert (pictures / 'val' / 'part_0.png').read_bytes() == val_gallery
