"""SIIM-ACR pneumothorax (chest X-rays, chest-tube groups) as a random-access source.

The layout is the one `python -m ifam_jax.data.prepare_siim_acr` (and the reference's script)
writes. DICOMs need pydicom (the `siim` extra), checked when the source is built.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from ifam_jax.data.sources import (FileSource, Record, check_files_exist, describe,
                                   encoded_image_size, read_binary_mask, require_dir)

SIIM_SPLITS = ('train', 'full_test', 'robust_test', 'non_robust_test')
SIIM_CLASSES = ('no pneumothorax', 'pneumothorax')
SIIM_TUBE = ('no tube', 'tube')


def read_dicom_uint8(path: str) -> np.ndarray:
  """A DICOM's `pixel_array` cast to uint8 without rescaling, as the reference's CXR loader:
  SIIM-ACR stores 8-bit greyscale, so the cast keeps its values."""
  try:
    import pydicom  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError('reading DICOM files needs pydicom: pip install -e ".[siim]"') from None
  return np.asarray(pydicom.dcmread(path).pixel_array).astype(np.uint8)


class SiimAcrSource(FileSource):
  """SIIM-ACR as `python -m ifam_jax.data.prepare_siim_acr` (and the reference's script) lays it
  out: `root/<split>_set/{0,1}/<id>.dcm` (or .png), masks `root/all_masks/<id>.png`.

  The label is the parent folder (1 = pneumothorax). DICOMs are read here (`read_dicom_uint8`),
  so records carry a uint8 [H, W] array that decoding replicates to RGB; PNGs travel encoded.
  The test splits' group is 2 * label + chest tube, named '<class>/<tube>': the robust test set
  holds the negatives with a tube and the positives without one (groups 1 and 2, the minority
  groups), the non-robust set the others, and `full_test` reads each image's tube off which of
  the two holds it. The chest tube of the training images is unknown: they have no groups.
  `masks` adds 'fg_mask' (pneumothorax > 0; negatives are empty), all checked when built. The
  reference's own script writes them mirrored about the diagonal (prepare_siim_acr says why):
  for a foreground IoU, prepare the layout with prepare_siim_acr.
  """

  spurious_attribute = 'chest tube'

  def __init__(self, root: str | os.PathLike, split: str, masks: bool = True):
    root = pathlib.Path(root)
    if split not in SIIM_SPLITS:
      raise ValueError(f'SIIM-ACR split must be one of {list(SIIM_SPLITS)}, got {split!r}')
    require_dir(root, 'SIIM-ACR root')
    paths, labels = self._scan(root, split)
    if split == 'train':
      groups, self.group_names = [-1] * len(paths), []
    else:
      tubes = self._tubes(root, split, paths, labels)
      groups = [2 * y + t for y, t in zip(labels, tubes)]
      self.group_names = [f'{c}/{t}' for c in SIIM_CLASSES for t in SIIM_TUBE]
    if any(p.endswith('.dcm') for p in paths):
      self._check_pydicom()
    self.mask_paths = None
    if masks:
      mask_dir = root / 'all_masks'
      require_dir(mask_dir, 'SIIM-ACR mask folder')
      self.mask_paths = [str(mask_dir / (pathlib.Path(p).stem + '.png')) for p in paths]
      check_files_exist(self.mask_paths, f'SIIM-ACR mask folder {mask_dir}', 'masks')
    self.class_names = list(SIIM_CLASSES)
    super().__init__(paths, labels, groups)
    self._repr = describe('SiimAcrSource', root=str(root), split=split, masks=masks)

  @staticmethod
  def _check_pydicom() -> None:
    """Fails in the launcher, not in a data worker, when DICOMs cannot be read."""
    if importlib.util.find_spec('pydicom') is None:
      raise ImportError('the SIIM-ACR source holds DICOM files, which need pydicom: '
                        'pip install -e ".[siim]"')

  @staticmethod
  def _scan(root: pathlib.Path, split: str) -> tuple[list[str], list[int]]:
    folder = root / f'{split}_set'
    require_dir(folder, f'SIIM-ACR {split} folder')
    extra = sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name not in ('0', '1'))
    if extra:
      raise ValueError(f'{folder} holds folders {extra}; expected the class folders 0 and 1')
    paths, labels = [], []
    for label in (0, 1):
      sub = folder / str(label)
      if sub.is_dir():
        files = sorted(e.name for e in os.scandir(sub)
                       if e.is_file() and e.name.lower().endswith(('.dcm', '.png')))
        paths += [str(sub / f) for f in files]
        labels += [label] * len(files)
    if not paths:
      raise ValueError(f'{folder} holds no .dcm or .png files in its class folders 0 and 1 '
                       '(prepare it with python -m ifam_jax.data.prepare_siim_acr)')
    return paths, labels

  @staticmethod
  def _tubes(root: pathlib.Path, split: str, paths: Sequence[str],
             labels: Sequence[int]) -> list[int]:
    """Chest tube (0/1) per image: robust = {negative with tube} | {positive without}."""
    if split != 'full_test':
      robust = split == 'robust_test'
      return [int(robust != (y == 1)) for y in labels]
    membership = {}
    for subset in ('robust_test', 'non_robust_test'):
      for p in SiimAcrSource._scan(root, subset)[0]:
        membership.setdefault(pathlib.Path(p).stem, []).append(subset)
    tubes = []
    for path, y in zip(paths, labels):
      found = membership.get(pathlib.Path(path).stem, [])
      if len(found) != 1:
        where = ' and '.join(found) or 'neither robust_test_set nor non_robust_test_set'
        raise ValueError(f'{path}: its chest tube is read off the robust and non-robust test '
                         f'sets, but it is in {where}')
      tubes.append(int((found[0] == 'robust_test') != (y == 1)))
    return tubes

  def __getitem__(self, index: int) -> Record:
    record = super().__getitem__(index)
    path = record['path']
    if path.lower().endswith('.dcm'):
      try:
        record['image'] = read_dicom_uint8(path)
      except ImportError:
        raise
      except Exception:  # pylint: disable=broad-except  # pydicom raises many error types
        pass  # the file's bytes stay: decoding then fails and names the file (valid=0)
    image = record['image']
    size = image.shape[1::-1] if isinstance(image, np.ndarray) else encoded_image_size(image)
    if self.mask_paths is not None:
      record['fg_mask'] = read_binary_mask(self.mask_paths[index], size)
    return record
