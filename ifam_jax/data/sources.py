"""Random-access data sources for grain: one raw record per example, nothing decoded.

Every record is `{'image': encoded bytes or uint8 [H, W, C], 'label': int, 'group': int}`, where
`group` is -1 when the data set defines no groups. File-backed sources add the image's `'path'`
(which names an undecodable image in its warning); CubSource given a `segmentation_dir`,
SiimAcrSource (`siim_acr.py`: pneumothorax masks) and the demo's source (`synthetic.py`) add a
ground-truth foreground mask `'fg_mask'` (uint8 [H, W] in {0, 1}); CubSource with
`part_annotations` adds `'keypoints'` (float32 [P, 3]: x, y, visible) and `'box'` (float32 [4]:
x, y, width, height), in the image's pixels. Every source exposes `class_names`, `num_classes`,
`group_names` and `num_groups` (0 without groups). Records are uint8 [H, W(, C)] arrays rather
than bytes only where the format needs a reader of its own (SIIM-ACR's DICOMs).

Sources validate their inputs when built, with cheap checks only (directory listings, metadata
files, the existence of every listed file), and every error names the offending path: a wrong
root or a missing image then fails in the launcher, not inside a grain worker mid-run.
`__repr__` is stable across runs because grain's DataLoader compares it when restoring a
checkpoint.
"""

from __future__ import annotations

import csv
import io
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

# torchvision's ImageFolder extensions, matched case-insensitively.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# MadryLab Backgrounds Challenge (IN-9) class folders, in label order.
IN9_CLASSES = ('00_dog', '01_bird', '02_wheeled vehicle', '03_reptile', '04_carnivore',
               '05_insect', '06_musical instrument', '07_primate', '08_fish')

WATERBIRDS_SPLITS = {'train': 0, 'val': 1, 'test': 2}
CUB_NUM_CLASSES = 200

Record = dict[str, Any]


class Source:
  """Metadata shared by all sources. Subclasses set the names and implement the protocol."""

  class_names: list[str]
  group_names: list[str]
  _repr: str
  spurious_attribute = 'attribute'  # what a group's '/<value>' names: the mask-leak audit's noun

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_groups(self) -> int:
    return len(self.group_names)

  def __repr__(self) -> str:
    return self._repr


def describe(cls_name: str, **kwargs: Any) -> str:
  return f'{cls_name}(' + ', '.join(f'{k}={v!r}' for k, v in kwargs.items()) + ')'


class FileSource(Source):
  """A source backed by a list of image files; records carry the undecoded file bytes."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], groups: Sequence[int]):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int64)
    self.groups = np.asarray(groups, np.int64)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Record:
    path = self.paths[index]
    with open(path, 'rb') as f:
      image = f.read()
    return {'image': image, 'label': int(self.labels[index]), 'group': int(self.groups[index]),
            'path': path}


# ----------------------------------------------------------------------------
# Folder scanning and validation helpers
# ----------------------------------------------------------------------------
def require_dir(path: pathlib.Path, what: str) -> None:
  if not path.is_dir():
    raise FileNotFoundError(f'{what} {path} does not exist or is not a directory')


def require_file(path: pathlib.Path, what: str) -> None:
  if not path.is_file():
    raise FileNotFoundError(f'{what} {path} does not exist')


def image_files(folder: pathlib.Path) -> list[str]:
  """Image files under `folder`, recursively, in torchvision ImageFolder's order."""
  return [os.path.join(d, f) for d, _, files in sorted(os.walk(folder, followlinks=True))
          for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]


def class_folders(root: str | os.PathLike) -> list[str]:
  """The sorted class folder names of an image folder: its labels, without listing any image."""
  root = pathlib.Path(root)
  require_dir(root, 'image folder')
  found = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not found:
    raise ValueError(f'image folder {root} holds no class folders')
  return found


def _scan_image_folder(root: pathlib.Path, classes: Sequence[str] | None
                       ) -> tuple[list[str], list[str], list[int]]:
  """(class names, paths, labels) of `root/<class>/**/<image>`, as torchvision ImageFolder.

  `classes` (default: the folders found) fixes the label of each class name, so that a split
  with other or fewer class folders is labelled as the one the model was trained on.
  """
  found = class_folders(root)
  class_names = list(classes) if classes is not None else found
  index = {name: i for i, name in enumerate(class_names)}
  paths, labels = [], []
  for name in found:
    if name not in index:
      raise ValueError(f'class folder {root / name} is not in the class set '
                       f'({len(class_names)} classes: {class_names[:3]}...)')
    files = image_files(root / name)
    if not files:
      raise ValueError(f'class folder {root / name} holds no image files {IMG_EXTENSIONS}')
    paths += files
    labels += [index[name]] * len(files)
  return class_names, paths, labels


def check_files_exist(paths: Sequence[str], what: str, kind: str = 'images') -> None:
  """Every listed file must exist: one missing would otherwise stop training when first read.

  One stat per file, cheap next to training even for tens of thousands of files.
  """
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{what}: {len(missing)} of {len(paths)} listed {kind} do not exist, '
                            f'e.g. {missing[:3]} (wrong root, or an incomplete copy?)')


# ----------------------------------------------------------------------------
# ImageFolder, ImageNet-9, MetaShift
# ----------------------------------------------------------------------------
class ImageFolderSource(FileSource):
  """`root/<class>/**/<image>`: sorted class folders get labels 0..C-1 (torchvision semantics).

  `classes` fixes the class list (and so the label indices) when a split may lack a class
  folder; every folder must then be one of them.
  """

  def __init__(self, root: str | os.PathLike, classes: Sequence[str] | None = None):
    root = pathlib.Path(root)
    self.class_names, paths, labels = _scan_image_folder(root, classes)
    self.group_names = []
    super().__init__(paths, labels, [-1] * len(paths))
    self._repr = describe('ImageFolderSource', root=str(root), classes=classes)


class ImageNet9Source(FileSource):
  """IN-9 Backgrounds Challenge: `root/<variant>/<split>/<NN_class>/*`, labels 0..8."""

  def __init__(self, root: str | os.PathLike, variant: str = 'original', split: str = 'val'):
    if split not in ('train', 'val'):
      raise ValueError(f"ImageNet-9 split must be 'train' or 'val', got {split!r}")
    folder = pathlib.Path(root) / variant / split
    self.class_names, paths, labels = _scan_image_folder(folder, IN9_CLASSES)
    self.group_names = []
    super().__init__(paths, labels, [-1] * len(paths))
    self._repr = describe('ImageNet9Source', root=str(root), variant=variant, split=split)


class MetaShiftSource(FileSource):
  """MetaShift cat/dog: `root/<split>/<class>/<context>/**/<image>`.

  Labels come from the class folder (ImageFolder order, so cat=0, dog=1, or the order of
  `classes` as in ImageFolderSource); each (class, context) folder pair is a group, numbered in
  sorted order and named after the context folder ('cat(sofa)'), prefixed with the class when
  the folder name does not already carry it.
  """

  def __init__(self, root: str | os.PathLike, split: str, classes: Sequence[str] | None = None):
    folder = pathlib.Path(root) / split
    self.class_names, paths, labels = _scan_image_folder(folder, classes)
    keys = []
    for path, label in zip(paths, labels):
      parts = pathlib.Path(path).relative_to(folder / self.class_names[label]).parts
      if len(parts) < 2:
        raise ValueError(f'{path} is not inside a context folder; expected '
                         f'{folder}/<class>/<context>/<image>')
      keys.append((label, parts[0]))
    unique = sorted(set(keys))
    group_of = {key: g for g, key in enumerate(unique)}
    cls = self.class_names
    self.group_names = [ctx if ctx.startswith(cls[y]) else f'{cls[y]}({ctx})' for y, ctx in unique]
    super().__init__(paths, labels, [group_of[k] for k in keys])
    extra = {'classes': classes} if classes is not None else {}  # stable old reprs
    self._repr = describe('MetaShiftSource', root=str(root), split=split, **extra)


# ----------------------------------------------------------------------------
# Waterbirds and CUB-200-2011
# ----------------------------------------------------------------------------
def _int_field(value: str, where: str, column: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f'{where}: {column}={value!r} is not an integer') from None


def _check_names(names: Sequence[str], flag: str, what: str) -> None:
  """Two names, for the values 0 and 1 of a metadata column; no '/', which joins group names."""
  if len(names) != 2:
    raise ValueError(f'{flag} must name its 2 {what}, got {list(names)}')
  for name in names:
    if '/' in name:
      raise ValueError(f"{flag}: {name!r} holds a '/', which separates the class from the place "
                       'in group names')


class WaterbirdsSource(FileSource):
  """Waterbirds from `root/metadata.csv` (img_filename, y, split, place); images under root.

  y: 0 landbird, 1 waterbird; place: 0 land, 1 water; group = 2 * y + place, named
  '<class>/<place>'. Another data set in this layout names its two classes (y) and two places
  by `classes` and `attribute_names` (the config's data.classes and data.attribute_names).
  """

  spurious_attribute = 'background'

  def __init__(self, root: str | os.PathLike, split: str, classes: Sequence[str] | None = None,
               attribute_names: Sequence[str] | None = None):
    root = pathlib.Path(root)
    if split not in WATERBIRDS_SPLITS:
      raise ValueError(f'Waterbirds split must be one of {list(WATERBIRDS_SPLITS)}, got {split!r}')
    require_dir(root, 'Waterbirds root')
    meta = root / 'metadata.csv'
    class_names = list(classes or ('landbird', 'waterbird'))
    places = list(attribute_names or ('land', 'water'))
    _check_names(class_names, 'data.classes', f'classes (y = 0, 1 in {meta})')
    _check_names(places, 'data.attribute_names', f'places (place = 0, 1 in {meta})')
    require_file(meta, 'Waterbirds metadata')
    try:
      with open(meta, newline='', encoding='utf-8-sig') as f:  # Excel writes a byte-order mark
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = set(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
      raise ValueError(f'cannot read Waterbirds metadata {meta}: {e}') from None
    missing = {'img_filename', 'y', 'split', 'place'} - columns
    if missing:
      raise ValueError(f'Waterbirds metadata {meta} lacks column(s) {sorted(missing)}')
    paths, labels, groups = [], [], []
    for line, row in enumerate(rows, start=2):
      y, place, s = (_int_field(row[c], f'{meta} line {line}', c) for c in ('y', 'place', 'split'))
      if y not in (0, 1):
        raise ValueError(f'{meta} line {line}: label y={y} is outside the class set {{0, 1}}')
      if place not in (0, 1) or s not in (0, 1, 2):
        raise ValueError(f'{meta} line {line}: place={place} / split={s} out of range')
      if s == WATERBIRDS_SPLITS[split]:
        paths.append(str(root / row['img_filename']))
        labels.append(y)
        groups.append(2 * y + place)
    check_files_exist(paths, f'Waterbirds metadata {meta}')
    self.class_names = class_names
    self.group_names = [f'{name}/{place}' for name in class_names for place in places]
    super().__init__(paths, labels, groups)
    named = {k: list(v) for k, v in (('classes', classes), ('attribute_names', attribute_names))
             if v}  # stable old reprs
    self._repr = describe('WaterbirdsSource', root=str(root), split=split, **named)


def _read_id_table(path: pathlib.Path) -> dict[int, str]:
  """`<id> <value>` per line (CUB's list files) -> {id: value}."""
  require_file(path, 'CUB list file')
  table = {}
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'cannot read CUB list file {path}: {e}') from None
  for line, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    key, _, value = text.strip().partition(' ')
    if not value:
      raise ValueError(f'{path} line {line}: expected "<id> <value>", got {text!r}')
    table[_int_field(key, f'{path} line {line}', 'id')] = value.strip()
  return table


def _read_number_rows(path: pathlib.Path, columns: int, what: str) -> np.ndarray:
  """float64 [N, columns] of a whitespace-separated numeric list file (CUB's part files)."""
  require_file(path, what)
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'cannot read {what} {path}: {e}') from None
  rows = []
  for line, text in enumerate(lines, start=1):
    fields = text.split()
    if not fields:
      continue
    try:
      if len(fields) != columns:
        raise ValueError
      rows.append([float(v) for v in fields])
    except ValueError:
      raise ValueError(f'{path} line {line}: expected {columns} numbers, got {text!r}') from None
  return np.asarray(rows, np.float64).reshape(-1, columns)


def read_cub_parts(root: pathlib.Path, image_ids: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(keypoints float32 [N, P, 3] (x, y, visible), boxes float32 [N, 4] (x, y, w, h)) of
  `image_ids`, from root/parts/part_locs.txt (image_id part_id x y visible) and
  root/bounding_boxes.txt (image_id x y width height).

  P is the largest part id; every listed image needs each part 1..P once, and a box.
  """
  locs_path, boxes_path = root / 'parts' / 'part_locs.txt', root / 'bounding_boxes.txt'
  locs = _read_number_rows(locs_path, 5, 'CUB part annotations')
  boxes = _read_number_rows(boxes_path, 5, 'CUB bounding boxes')
  num_parts = int(locs[:, 1].max()) if len(locs) else 0
  if num_parts < 1 or (locs[:, 1] < 1).any():
    raise ValueError(f'{locs_path}: part ids must be 1, 2, ...; found '
                     f'{sorted(set(locs[:, 1].astype(int)))[:5]}')
  row_of = {int(i): n for n, i in enumerate(image_ids)}
  keypoints = np.zeros((len(row_of), num_parts, 3), np.float32)
  seen = np.zeros((len(row_of), num_parts), np.int64)
  for image_id, part_id, x, y, visible in locs:
    n = row_of.get(int(image_id))
    if n is not None:
      keypoints[n, int(part_id) - 1] = (x, y, visible)
      seen[n, int(part_id) - 1] += 1
  if (bad := np.argwhere(seen != 1)).size:
    n, k = bad[0]
    raise ValueError(f'{locs_path}: image id {image_ids[n]} has {seen[n, k]} entries for part '
                     f'{k + 1} (every image needs parts 1..{num_parts} once)')
  box_of = {int(row[0]): row[1:] for row in boxes}
  if missing := [i for i in image_ids if int(i) not in box_of]:
    raise ValueError(f'{boxes_path} has no box for image id {missing[0]} '
                     f'({len(missing)} images lack one)')
  return keypoints, np.asarray([box_of[int(i)] for i in image_ids], np.float32).reshape(-1, 4)


def encoded_image_size(image: bytes) -> tuple[int, int] | None:
  """(width, height) from an encoded image's header; None if unreadable."""
  try:
    with Image.open(io.BytesIO(image)) as img:
      return img.size
  except Exception:  # pylint: disable=broad-except  # transforms.decode logs and blanks it
    return None


def read_binary_mask(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 [H, W]: 1 where the mask image at `path` is > 0 (in any colour channel).

  Single-band modes (L, 1, I, ...) are read as stored; palette, RGB(A) and LA images through their
  RGB colours. `size`, when given, is the (width, height) the mask must have.
  """
  try:
    with Image.open(path) as img:
      if len(img.getbands()) > 1 or img.mode == 'P':
        img = img.convert('RGB')
      values = np.asarray(img)
  except FileNotFoundError:
    raise FileNotFoundError(f'segmentation mask {path} does not exist') from None
  except Exception as e:  # pylint: disable=broad-except  # decoders raise many error types
    raise ValueError(f'cannot read segmentation mask {path}: {type(e).__name__}: {e}') from None
  mask = (values.max(axis=-1) if values.ndim == 3 else values) > 0
  if size is not None and mask.shape[::-1] != tuple(size):
    raise ValueError(f'segmentation mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH), but its '
                     f'image is {size[0]}x{size[1]}')
  return mask.astype(np.uint8)


class CubSource(FileSource):
  """CUB-200-2011 from its list files under `root` (the CUB_200_2011 folder).

  images.txt names the files (under `root/image_subdir`; 'waterbird_complete95_forest2water2'
  gives Waterbird200), image_class_labels.txt holds labels 1..200 (-> 0..199) and
  train_test_split.txt marks train (1) and test (0). classes.txt, when present, names the classes
  and sets their number. `segmentation_dir` (relative to root, or absolute; the official release
  unpacks as 'segmentations') adds 'fg_mask' from `<segmentation_dir>/<images.txt name>.png`,
  binarised at > 0 and read lazily; a missing mask (checked when built) or one whose size differs
  from its image raises an error naming the file. `part_annotations` adds each image's CUB
  keypoints and bounding box (`read_cub_parts`), for the part metrics (evaluators/parts.py).
  """

  def __init__(self, root: str | os.PathLike, split: str, image_subdir: str = 'images',
               segmentation_dir: str = '', part_annotations: bool = False):
    root = pathlib.Path(root)
    if split not in ('train', 'test'):
      raise ValueError(f"CUB split must be 'train' or 'test' (the reference has no val), "
                       f'got {split!r}')
    require_dir(root, 'CUB root')
    image_dir = root / image_subdir
    require_dir(image_dir, 'CUB image folder')
    if (root / 'classes.txt').is_file():
      named = _read_id_table(root / 'classes.txt')
      self.class_names = [named[k] for k in sorted(named)]
    else:
      self.class_names = [str(k) for k in range(1, CUB_NUM_CLASSES + 1)]
    files = _read_id_table(root / 'images.txt')
    label_path, split_path = root / 'image_class_labels.txt', root / 'train_test_split.txt'
    label_of, is_train = _read_id_table(label_path), _read_id_table(split_path)
    want = '1' if split == 'train' else '0'
    paths, labels, names, ids = [], [], [], []
    for image_id, name in files.items():
      for table, path in ((label_of, label_path), (is_train, split_path)):
        if image_id not in table:
          raise ValueError(f'{path} has no entry for image id {image_id} ({name})')
      label = _int_field(label_of[image_id], f'{label_path} (image id {image_id})', 'label')
      if not 1 <= label <= self.num_classes:
        raise ValueError(f'{label_path}: label {label} of image id {image_id} is outside the '
                         f'class set 1..{self.num_classes}')
      if is_train[image_id] == want:
        paths.append(str(image_dir / name))
        labels.append(label - 1)
        names.append(name)
        ids.append(image_id)
    check_files_exist(paths, f'CUB images.txt {root / "images.txt"}')
    self.mask_paths = None
    if segmentation_dir:
      mask_dir = root / segmentation_dir
      require_dir(mask_dir, 'CUB segmentation folder')
      self.mask_paths = [str(mask_dir / (os.path.splitext(n)[0] + '.png')) for n in names]
      check_files_exist(self.mask_paths, f'CUB segmentation folder {mask_dir}', 'masks')
    self.keypoints, self.boxes = read_cub_parts(root, ids) if part_annotations else (None, None)
    self.group_names = []
    super().__init__(paths, labels, [-1] * len(paths))
    extra = {'segmentation_dir': segmentation_dir} if segmentation_dir else {}  # stable old reprs
    if part_annotations:
      extra['part_annotations'] = True
    self._repr = describe('CubSource', root=str(root), split=split, image_subdir=image_subdir,
                           **extra)

  def __getitem__(self, index: int) -> Record:
    record = super().__getitem__(index)
    if self.mask_paths is not None:
      size = encoded_image_size(record['image'])
      record['fg_mask'] = read_binary_mask(self.mask_paths[index], size)
    if self.keypoints is not None:
      record['keypoints'], record['box'] = self.keypoints[index], self.boxes[index]
    return record


# ----------------------------------------------------------------------------
# TFDS (ArrayRecord, read without TensorFlow)
# ----------------------------------------------------------------------------
class TfdsSource(Source):
  """A prepared TFDS data set in ArrayRecord format; images stay encoded (SkipDecoding).

  `label_key` must be a ClassLabel feature; `group_key`, when given, a ClassLabel too.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None, *,
               image_key: str = 'image', label_key: str = 'label',
               group_key: str | None = None):
    if data_dir is not None:
      require_dir(pathlib.Path(data_dir), 'TFDS data_dir')
    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
      raise FileNotFoundError(f'TFDS data set {name!r} is not prepared in {builder.data_dir}')
    features = builder.info.features
    for key in (image_key, label_key) + ((group_key,) if group_key else ()):
      if key not in features:
        raise ValueError(f'TFDS data set {name!r} in {builder.data_dir} has no feature {key!r}; '
                         f'it has {sorted(features.keys())}')
    for key in (label_key, group_key):
      if key and not isinstance(features[key], tfds.features.ClassLabel):
        raise ValueError(f'TFDS feature {key!r} of {name!r} in {builder.data_dir} is not a '
                         f'ClassLabel')
    for part in split.split('+'):
      base = part.split('[')[0].strip()
      if base not in builder.info.splits:
        raise ValueError(f'TFDS data set {name!r} in {builder.data_dir} has no split {base!r}; '
                         f'it has {sorted(builder.info.splits.keys())}')
    self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                    decoders={image_key: tfds.decode.SkipDecoding()})
    self._keys = (image_key, label_key, group_key)
    self.class_names = list(features[label_key].names)
    self.group_names = list(features[group_key].names) if group_key else []
    self._repr = describe('TfdsSource', name=name, split=split, data_dir=str(data_dir),
                           image_key=image_key, label_key=label_key, group_key=group_key)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    example = self._source[index]
    image_key, label_key, group_key = self._keys
    group = int(example[group_key]) if group_key else -1
    return {'image': example[image_key], 'label': int(example[label_key]), 'group': group}
