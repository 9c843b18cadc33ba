"""The synthetic spurious-correlation benchmark of the demo: drawn on the fly, no download.

A source like those of `sources.py`: one raw record per example, with its exact object mask.
"""

from __future__ import annotations

import numpy as np

from ifam_jax.data.sources import Record, Source, describe

SYNTHETIC_SHAPES = ('disc', 'plus', 'ring', 'triangle')  # distinct under any rotation
SYNTHETIC_BACKGROUNDS = ('land', 'water', 'desert', 'night')
# Two-tone textures: (colour a, colour b) per background type.
_BACKGROUND_COLOURS = {
    'land': ((70, 150, 50), (35, 95, 30)),
    'water': ((45, 100, 210), (20, 55, 145)),
    'desert': ((215, 185, 125), (175, 140, 85)),
    'night': ((45, 40, 70), (15, 15, 30)),
}
# Object colours, drawn independently of class and background; far from every texture colour.
_OBJECT_COLOURS = ((225, 45, 45), (230, 60, 210), (245, 245, 245))
# How far each shape reaches from its centre along x or y, in radii (the triangle's apex: 1.3 r).
_SHAPE_EXTENT = {'disc': 1.0, 'plus': 1.0, 'ring': 1.0, 'triangle': 1.3}
# What tells the background types apart (see `SyntheticSpuriousSource`).
CUES = ('texture', 'colour', 'both')
_SPLIT_CODES = {'train': 0, 'val': 1, 'test': 2}


def _texture(kind: str, x: np.ndarray, y: np.ndarray, size: int,
             rng: np.random.Generator) -> np.ndarray:
  """Boolean [H, W] two-tone pattern of a background type, with a random phase."""
  phase = rng.uniform(0, size)
  if kind == 'land':  # diagonal stripes
    return ((x + y + phase) // (size / 8)) % 2 == 0
  if kind == 'water':  # horizontal waves
    wave = (size / 20) * np.sin(2 * np.pi * x / (size / 2) + phase)
    return ((y + wave + phase) // (size / 10)) % 2 == 0
  if kind == 'desert':  # dots
    p = size / 6
    return ((x + phase) % p - p / 2)**2 + ((y + phase) % p - p / 2)**2 < (p / 4)**2
  return ((x + phase) // (size / 8) + y // (size / 8)) % 2 == 0  # night: checker


def _shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Boolean [H, W] object mask for offsets (dx, dy) from the object centre."""
  if kind == 'triangle':  # equilateral, apex up, inside all three edges; 1.3 r matches areas
    normals = np.deg2rad([90.0, 210.0, 330.0])
    return np.all([dx * np.cos(a) + dy * np.sin(a) <= 0.65 * r for a in normals], axis=0)
  if kind == 'plus':
    t = 0.3 * r
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= r) & (ay <= t)) | ((ay <= r) & (ax <= t))
  d2 = dx**2 + dy**2
  if kind == 'ring':
    return (d2 <= r**2) & (d2 >= (0.55 * r)**2)
  return d2 <= r**2  # disc


class SyntheticSpuriousSource(Source):
  """Shapes on textured backgrounds, where the background is a shortcut for the label.

  The label is the object's SHAPE (disc, plus, ring, triangle; `num_classes` of them). Background
  type b in (land: green stripes, water: blue waves, desert: sand dots, night: dark checker) is
  the label's own type with probability `majority` in 'train' and any other type otherwise; in
  'val' and 'test' every (shape, background) group is equally frequent (index % groups).
  group = label * num_classes + background.

  The background is the easier cue (about 80% of the pixels, one strong colour), so a model
  looking at the whole image learns it and fails on the minority groups; the shape alone is
  easy for a small ViT (radius `object_size`, 18-28% of the side by default, centre within
  `position_jitter` = 12% of the middle, a random object colour unrelated to label and
  background). Records are drawn on the fly, fully determined by (seed, split, index), and carry
  the exact object mask as `'fg_mask'` (uint8 [H, W], 1 on the object). Every image has one
  object colour and two background colours (an objectless one, below, only the two).

  The settings make a family of benchmarks, each stressing one way the background can reach a
  masked model:
    cue: what tells the background types apart. 'both': each type has its own texture and its
      own palette. 'texture': every type draws its two colours from one shared palette (that of a
      type drawn at random), so only the texture differs. 'colour': every type draws its texture
      at random from the same set, so only the palette differs; a colour cue also shows in the
      background pixels of the patches at the object's edge.
    position_jitter, object_size: the centre's offset range and the radius range, as fractions
      of the side; the object must stay whole inside the image (checked, for the shapes used).
    no_object_fraction: the fraction of TRAINING images drawn without the object (label,
      background and the rest drawn as usual, fg_mask all zero): there only the background tells
      the label. 'val' and 'test' keep every object, so that every group stays classifiable by
      its shape.
    size_tied_to_background: the radius comes from the lower half of `object_size` on background
      0 and from the upper half on the others, in every split: even a perfect segmentation's
      area then predicts the background (a geometry leak by construction).
  """

  spurious_attribute = 'background'

  def __init__(self, num_examples: int, image_size: int = 64, split: str = 'train', seed: int = 0,
               majority: float = 0.95, num_classes: int = 2,
               object_size: tuple[float, float] = (0.18, 0.28), cue: str = 'both',
               position_jitter: float = 0.12, no_object_fraction: float = 0.0,
               size_tied_to_background: bool = False):
    if split not in _SPLIT_CODES:
      raise ValueError(f'synthetic split must be one of {list(_SPLIT_CODES)}, got {split!r}')
    if not 2 <= num_classes <= len(SYNTHETIC_SHAPES):
      raise ValueError(f'num_classes must be in 2..{len(SYNTHETIC_SHAPES)}, got {num_classes}')
    if not 0.0 <= majority <= 1.0:
      raise ValueError(f'majority must be a probability, got {majority}')
    if cue not in CUES:
      raise ValueError(f'synthetic cue must be one of {list(CUES)}, got {cue!r}')
    if not 0.05 <= object_size[0] <= object_size[1] <= 0.4:
      raise ValueError(f'object_size must be radii within [0.05, 0.4] of the side, got '
                       f'{object_size}')
    shapes = SYNTHETIC_SHAPES[:num_classes]
    reach = position_jitter + max(_SHAPE_EXTENT[s] for s in shapes) * object_size[1]
    if position_jitter < 0 or reach > 0.5:
      raise ValueError(f'position_jitter {position_jitter} with object_size {object_size} puts '
                       f'parts of the objects ({", ".join(shapes)}) up to {reach:.3g} of the side '
                       'from the middle; keep position_jitter >= 0 and within 0.5 (whole objects)')
    if not 0.0 <= no_object_fraction < 1.0:
      raise ValueError(f'no_object_fraction must be in [0, 1), got {no_object_fraction}')
    if size_tied_to_background and not object_size[0] < object_size[1]:
      raise ValueError(f'size_tied_to_background needs object_size[0] < object_size[1], got '
                       f'{object_size}')
    if num_examples < 1 or image_size < 16:
      raise ValueError(f'need num_examples >= 1 and image_size >= 16, got {num_examples}, '
                       f'{image_size}')
    self.num_examples, self.image_size, self.split = num_examples, image_size, split
    self.seed, self.majority, self.object_size = seed, majority, tuple(object_size)
    self.cue, self.position_jitter = cue, position_jitter
    self.no_object_fraction = no_object_fraction
    self.size_tied_to_background = size_tied_to_background
    self.class_names = list(shapes)
    backgrounds = SYNTHETIC_BACKGROUNDS[:num_classes]
    self.group_names = [f'{s}/{b}' for s in self.class_names for b in backgrounds]
    self._repr = describe('SyntheticSpuriousSource', num_examples=num_examples,
                           image_size=image_size, split=split, seed=seed, majority=majority,
                           num_classes=num_classes, object_size=tuple(object_size), cue=cue,
                           position_jitter=position_jitter,
                           no_object_fraction=no_object_fraction,
                           size_tied_to_background=size_tied_to_background)

  def __len__(self) -> int:
    return self.num_examples

  def _label_background(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
    c = self.num_classes
    if self.split != 'train':
      return divmod(index % (c * c), c)
    label = index % c
    if rng.random() < self.majority:
      return label, label
    return label, int((label + 1 + rng.integers(c - 1)) % c)

  @property
  def groups(self) -> np.ndarray:
    """Every example's group, without drawing the images (as `FileSource.groups`)."""
    c = self.num_classes
    pairs = [self._label_background(i, np.random.default_rng([self.seed,
                                                              _SPLIT_CODES[self.split], i]))
             for i in range(self.num_examples)]
    return np.asarray([label * c + background for label, background in pairs], np.int64)

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
    label, background = self._label_background(index, rng)
    s = self.image_size
    y, x = np.mgrid[0:s, 0:s] + 0.5  # pixel centres
    jitter = rng.integers(-12, 13, size=3)
    own = SYNTHETIC_BACKGROUNDS[background]
    drawn = own if self.cue == 'both' else SYNTHETIC_BACKGROUNDS[rng.integers(self.num_classes)]
    palette, texture = (drawn, own) if self.cue == 'texture' else (own, drawn)
    colours = np.clip(np.array(_BACKGROUND_COLOURS[palette]) + jitter, 0, 255)
    image = np.where(_texture(texture, x, y, s, rng)[..., None], colours[0], colours[1])
    low, high = self.object_size
    if self.size_tied_to_background:
      low, high = (low, (low + high) / 2) if background == 0 else ((low + high) / 2, high)
    r = rng.uniform(low, high) * s
    j = self.position_jitter
    cx, cy = s / 2 + rng.uniform(-j, j, size=2) * s
    mask = _shape_mask(SYNTHETIC_SHAPES[label], x - cx, y - cy, r)
    colour = np.array(_OBJECT_COLOURS[rng.integers(len(_OBJECT_COLOURS))])
    colour = np.clip(colour + rng.integers(-20, 21, size=3), 0, 255)
    if self.split == 'train' and rng.random() < self.no_object_fraction:  # the last draw
      mask = np.zeros_like(mask)
    image = np.where(mask[..., None], colour, image).astype(np.uint8)
    return {'image': image, 'label': label, 'group': label * self.num_classes + background,
            'fg_mask': mask.astype(np.uint8)}
