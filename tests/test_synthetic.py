"""The synthetic benchmark family: each setting's effect, measured on drawn records.

Every criterion is computed from the images and masks alone (a background's texture from its
two-tone pattern, its palette from its mean colour, the object's centre and radius from its mask),
and the defaults are checked against the generator as it was before the family's settings.
"""

import numpy as np
import pytest

from ifam_jax.data import synthetic
from ifam_jax.data.synthetic import SyntheticSpuriousSource


# ----------------------------------------------------------------------------
# Helpers: the former generator, and what a record shows
# ----------------------------------------------------------------------------
def former_record(index, num_classes, split, seed, shared_palette, s=64, majority=0.95,
                  object_size=(0.18, 0.28)):
  """The generator's draw before `cue`, `position_jitter`, `no_object_fraction` and
  `size_tied_to_background` existed, step for step (its texture and shape helpers are kept)."""
  c = num_classes
  rng = np.random.default_rng([seed, {'train': 0, 'val': 1, 'test': 2}[split], index])
  if split != 'train':
    label, background = divmod(index % (c * c), c)
  else:
    label = background = index % c
    if rng.random() >= majority:
      background = int((label + 1 + rng.integers(c - 1)) % c)
  y, x = np.mgrid[0:s, 0:s] + 0.5
  jitter = rng.integers(-12, 13, size=3)
  names = synthetic.SYNTHETIC_BACKGROUNDS
  palette = names[rng.integers(c)] if shared_palette else names[background]
  colours = np.clip(np.array(synthetic._BACKGROUND_COLOURS[palette]) + jitter, 0, 255)
  image = np.where(synthetic._texture(names[background], x, y, s, rng)[..., None], colours[0],
                   colours[1])
  r = rng.uniform(*object_size) * s
  cx, cy = s / 2 + rng.uniform(-0.12, 0.12, size=2) * s
  mask = synthetic._shape_mask(synthetic.SYNTHETIC_SHAPES[label], x - cx, y - cy, r)
  colour = np.array(synthetic._OBJECT_COLOURS[rng.integers(3)])
  colour = np.clip(colour + rng.integers(-20, 21, size=3), 0, 255)
  image = np.where(mask[..., None], colour, image).astype(np.uint8)
  return image, mask.astype(np.uint8), label, label * c + background


def looks_striped(record) -> bool:
  """Land's diagonal stripes change as often along x as along y; water's horizontal waves
  change mostly along y. Counted on the two-tone pattern, between background pixels only."""
  image, bg = record['image'].astype(int).sum(-1), record['fg_mask'] == 0
  tone = image == image[bg].max()
  along_x = (tone[:, 1:] != tone[:, :-1])[bg[:, 1:] & bg[:, :-1]].mean()
  along_y = (tone[1:] != tone[:-1])[bg[1:] & bg[:-1]].mean()
  return along_x / along_y > 0.7  # stripes about 1, waves about 0.4


def looks_blue(record) -> bool:
  """Water's palette is bluer than green, land's greener than blue."""
  mean = record['image'][record['fg_mask'] == 0].astype(float).mean(0)
  return mean[2] > mean[1]


def by_background(src):
  """Records per background type (2 classes)."""
  out = {0: [], 1: []}
  for i in range(len(src)):
    r = src[i]
    out[r['group'] % 2].append(r)
  return out


# ----------------------------------------------------------------------------
# Defaults: the generator as it was
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('split', ['train', 'val', 'test'])
@pytest.mark.parametrize('cue,shared_palette', [('texture', True), ('both', False)])
def test_defaults_draw_what_the_former_generator_drew(split, cue, shared_palette):
  for c in (2, 4):
    src = SyntheticSpuriousSource(40, 64, split, seed=3, num_classes=c, cue=cue)
    for i in (0, 1, 5, 17, 39):
      image, mask, label, group = former_record(i, c, split, 3, shared_palette)
      r = src[i]
      np.testing.assert_array_equal(r['image'], image)
      np.testing.assert_array_equal(r['fg_mask'], mask)
      assert (r['label'], r['group']) == (label, group)
  assert SyntheticSpuriousSource(4).cue == 'both'  # the former shared_palette=False


# ----------------------------------------------------------------------------
# Each setting's effect
# ----------------------------------------------------------------------------
def test_cue_decides_what_tells_the_backgrounds_apart():
  """'both': texture and palette follow the type; 'texture': the palette is shared; 'colour':
  the texture is shared."""
  for cue, texture_follows, palette_follows in [('both', True, True), ('texture', True, False),
                                                ('colour', False, True)]:
    records = by_background(SyntheticSpuriousSource(120, 64, 'test', seed=0, cue=cue))
    for feature, follows in [(looks_striped, texture_follows), (looks_blue, palette_follows)]:
      land, water = (np.mean([feature(r) for r in records[b]]) for b in (0, 1))
      if follows:
        assert (feature is looks_striped) == (land == 1.0) and {land, water} == {0.0, 1.0}, \
            (cue, feature.__name__)
      else:  # drawn at random for every type: both types show both
        assert 0.2 < land < 0.8 and 0.2 < water < 0.8, (cue, feature.__name__, land, water)
  with pytest.raises(ValueError, match="cue must be one of .*'colour'"):
    SyntheticSpuriousSource(4, cue='color')
  with pytest.raises(TypeError):
    SyntheticSpuriousSource(4, shared_palette=True)  # no alias


def test_position_jitter_bounds_the_centre():
  """The mask's centroid (the centre of a disc or a plus) lies within the jitter of the middle,
  and uses the range."""
  for jitter in (0.0, 0.3):
    src = SyntheticSpuriousSource(60, 64, 'val', seed=1, object_size=(0.1, 0.15),
                                  position_jitter=jitter)
    offsets = []
    for i in range(len(src)):
      ys, xs = np.nonzero(src[i]['fg_mask'])
      offsets.append(np.abs([xs.mean() + 0.5 - 32, ys.mean() + 0.5 - 32]))
    offsets = np.array(offsets)
    assert offsets.max() <= jitter * 64 + 0.5
    assert offsets.max() >= jitter * 64 * 0.8  # uses the range
  with pytest.raises(ValueError, match='position_jitter 0.3 with object_size'):
    SyntheticSpuriousSource(4, position_jitter=0.3)  # 0.3 + 0.28 > 0.5
  with pytest.raises(ValueError, match='position_jitter'):
    SyntheticSpuriousSource(4, position_jitter=-0.1)
  SyntheticSpuriousSource(4, object_size=(0.3, 0.3), position_jitter=0.2)  # discs fit: 0.5
  with pytest.raises(ValueError, match='triangle'):  # the apex reaches 1.3 r: 0.59
    SyntheticSpuriousSource(4, num_classes=4, object_size=(0.3, 0.3), position_jitter=0.2)


def test_objects_stay_whole_at_the_largest_setting():
  """At the bound (jitter + reach = 1/2 of the side) no mask is cut by the border: every disc
  keeps the area of a whole disc of radius 0.2 of the side."""
  src = SyntheticSpuriousSource(40, 64, 'val', seed=2, object_size=(0.2, 0.2),
                                position_jitter=0.3)
  for i in range(0, 40, 4):  # discs: label 0
    mask = src[i]['fg_mask']
    assert src[i]['label'] == 0
    assert abs(mask.sum() - np.pi * 12.8**2) < 0.05 * np.pi * 12.8**2


def test_no_object_fraction_empties_training_images_only():
  full = SyntheticSpuriousSource(400, 32, 'train', seed=0)
  part = SyntheticSpuriousSource(400, 32, 'train', seed=0, no_object_fraction=0.3)
  empty = [i for i in range(len(part)) if not part[i]['fg_mask'].any()]
  assert 0.3 - 0.07 < len(empty) / len(part) < 0.3 + 0.07  # 3 binomial sigmas
  for i in empty[:10]:  # the same draw, without the object: label, group and background kept
    a, b = part[i], full[i]
    assert (a['label'], a['group']) == (b['label'], b['group'])
    keep = b['fg_mask'] == 0
    np.testing.assert_array_equal(a['image'][keep], b['image'][keep])
    assert len({tuple(p) for p in a['image'].reshape(-1, 3)}) == 2  # background colours only
  np.testing.assert_array_equal(part.groups, full.groups)
  for split in ('val', 'test'):  # every eval image keeps its object
    src = SyntheticSpuriousSource(200, 32, split, seed=0, no_object_fraction=0.5)
    assert all(src[i]['fg_mask'].any() for i in range(len(src)))
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match='no_object_fraction'):
      SyntheticSpuriousSource(4, no_object_fraction=bad)


@pytest.mark.parametrize('split', ['train', 'test'])
def test_size_tied_to_background_leaks_it(split):
  """Tied, a shape's width (2 r, read off its mask) stays below 2 r_mid on background 0 and
  above it on background 1, so its area tells the background; untied, both span the range."""
  s, mid = 64, (0.18 + 0.28) / 2 * 64

  def widths(tied):
    src = SyntheticSpuriousSource(200, s, split, seed=0, majority=0.5,
                                  size_tied_to_background=tied)
    out = {}
    for i in range(len(src)):
      r = src[i]
      xs = np.nonzero(r['fg_mask'])[1]
      out.setdefault((r['label'], r['group'] % 2), []).append(
          (xs.max() - xs.min() + 1, r['fg_mask'].sum()))
    return {k: np.array(v) for k, v in out.items()}

  tied, untied = widths(True), widths(False)
  for label in (0, 1):  # disc, plus: both are 2 r wide
    low, high = tied[label, 0], tied[label, 1]
    assert low[:, 0].max() <= 2 * mid + 1 and high[:, 0].min() >= 2 * mid - 1
    assert low[:, 1].mean() < 0.75 * high[:, 1].mean()
    for b in (0, 1):
      spread = untied[label, b][:, 0]
      assert spread.min() < 2 * mid - 1 and spread.max() > 2 * mid + 1
  with pytest.raises(ValueError, match='size_tied_to_background'):
    SyntheticSpuriousSource(4, object_size=(0.2, 0.2), size_tied_to_background=True)


def test_groups_property_matches_the_records_under_every_setting():
  src = SyntheticSpuriousSource(150, 16, 'train', seed=4, majority=0.6, cue='colour',
                                object_size=(0.1, 0.3), position_jitter=0.2,
                                no_object_fraction=0.4, size_tied_to_background=True)
  np.testing.assert_array_equal(src.groups, [src[i]['group'] for i in range(len(src))])
  assert "cue='colour'" in repr(src) and 'no_object_fraction=0.4' in repr(src)
