"""Lays out the SIIM-ACR pneumothorax release as the iFAM reference trains and tests on it.

  python -m ifam_jax.data.prepare_siim_acr --source /data/siim --tubes cxr_tube_dict.pkl \
      --out /data/siim_ifam
  python -m ifam_jax.main --config configs/siim_acr.py:root=/data/siim_ifam,weights=$W \
      --workdir /tmp/siim

`--source` holds the Kaggle release: `train-rle.csv` (ImageId, EncodedPixels) and
`dicom-images-train/<study>/<series>/<id>.dcm`; `--tubes` is `cxr_tube_dict.pkl` of
khaledsaab/spatial_specificity, {image id: 1 if a chest tube is present, else 0}, hand labels of
1,951 images. The output (the reference's `prepare_siim_acr.py` layout, reference 7.5 and 9):

  <out>/train_set/{0,1}/<id>.dcm            every labelled image without a tube label
  <out>/full_test_set/{0,1}/<id>.dcm        every labelled image with one
  <out>/robust_test_set/{0,1}/<id>.dcm      negatives with a tube, positives without
  <out>/non_robust_test_set/{0,1}/<id>.dcm  positives with a tube, negatives without
  <out>/all_masks/<id>.png                  1024 x 1024, 255 = pneumothorax, every labelled id

The label is the first csv row of an id, 1 unless its EncodedPixels is -1 (the reference's
rule). The mask is the union of all of an id's rows: an image with several pneumothorax regions
has one row per region. The reference draws the first row only, and without the transpose the
column-major SIIM encoding needs (its masks are mirrored about the diagonal); here a row is read
as the competition's own `rle2mask(...).T`: pairs (start, length), each start counted from the
end of the previous run, pixels numbered down the columns. DICOMs are hard-linked by default
(`--link=hard`; `symlink`, or `copy` as the reference): a link takes no space and no time.

Every input is checked before anything is written: the files exist, the csv parses, every run
lies inside the image, every labelled id has one DICOM, tube labels are 0/1 and match some ids.
A rerun skips what is already in place, so an interrupted run resumes; a file in the layout that
the plan does not hold (from another tube file or release) is an error unless `--overwrite`,
which removes it. Files are written under a temporary name and renamed, never left half-written.
"""

from __future__ import annotations

import collections
import csv
import io
import os
import pathlib
import pickle
import shutil
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from absl import app, flags
from PIL import Image

from ifam_jax import progress as progress_lib
from ifam_jax.data import sources

MASK_SIZE = 1024  # every SIIM-ACR image is 1024 x 1024
SPLIT_DIRS = ('train_set', 'full_test_set', 'robust_test_set', 'non_robust_test_set')
LINKS = ('hard', 'symlink', 'copy')

PathLike = str | os.PathLike


class Plan(NamedTuple):
  """What to write: DICOM destination (relative to out) -> source path; id -> its RLE rows."""

  dicoms: dict[str, str]
  masks: dict[str, list[str]]
  counts: dict[str, int]


# ----------------------------------------------------------------------------
# The run-length encoding
# ----------------------------------------------------------------------------
def rle_decode(rle: str, height: int = MASK_SIZE, width: int = MASK_SIZE,
               where: str = 'RLE') -> np.ndarray:
  """uint8 [height, width], 255 on the runs of a SIIM-ACR RLE string, 0 elsewhere.

  Pairs (start, length); a start is relative to the end of the previous run (the first to pixel
  0), and pixels are numbered column by column (index = x * height + y). '-1' is empty.
  """
  flat = np.zeros(height * width, np.uint8)
  text = rle.strip()
  if text != '-1':
    try:
      values = np.array([int(v) for v in text.split()], np.int64)
    except ValueError:
      raise ValueError(f'{where}: {rle.strip()[:60]!r} is not a list of integers') from None
    if values.size % 2 or (values < 0).any():
      raise ValueError(f'{where}: an RLE is pairs of non-negative (start, length), got '
                       f'{values.size} numbers')
    starts, lengths = values[0::2], values[1::2]
    ends = np.cumsum(starts + lengths)
    if ends.size and ends[-1] > flat.size:
      raise ValueError(f'{where}: the runs end at pixel {ends[-1]}, past the {height}x{width} '
                       'image')
    for end, length in zip(ends, lengths):
      flat[end - length:end] = 255
  return flat.reshape(width, height).T


def read_rle_csv(path: pathlib.Path) -> dict[str, list[str]]:
  """{image id: its EncodedPixels rows, in file order}; headers and cells are stripped."""
  try:
    with open(path, newline='', encoding='utf-8-sig') as f:
      rows = list(csv.reader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f'cannot read {path}: {e}') from None
  header = [h.strip() for h in rows[0]] if rows else []
  if header[:2] != ['ImageId', 'EncodedPixels']:
    raise ValueError(f'{path}: expected the columns ImageId, EncodedPixels, got {header}')
  table: dict[str, list[str]] = collections.defaultdict(list)
  for line, row in enumerate(rows[1:], start=2):
    if len(row) < 2 or not row[0].strip():
      raise ValueError(f'{path} line {line}: expected "<ImageId>, <EncodedPixels>", got {row}')
    table[row[0].strip()].append(row[1].strip())
  if not table:
    raise ValueError(f'{path} holds no rows')
  return dict(table)


# ----------------------------------------------------------------------------
# The tube labels: a pickled dict, read without running code
# ----------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
  """Unpickles builtin containers and numpy scalars only: a pickle can otherwise run code."""

  _ALLOWED = {('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
              ('numpy', 'dtype')}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing to unpickle global {module}.{name}: the tube file '
                                   'must be a plain dict of image id -> 0/1')
    return super().find_class(module, name)


def read_tubes(path: pathlib.Path) -> dict[str, int]:
  """{image id: 0/1} from the chest-tube pickle."""
  try:
    with open(path, 'rb') as f:
      data = _PlainUnpickler(f).load()
  except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
    raise ValueError(f'cannot read the tube labels {path}: {e}') from None
  if not isinstance(data, Mapping):
    raise ValueError(f'{path}: expected a dict of image id -> 0/1, got a {type(data).__name__}')
  tubes = {}
  for key, value in data.items():
    if not isinstance(key, str) or value not in (0, 1):
      raise ValueError(f'{path}: entry {key!r}: {value!r}; expected image id -> 0/1')
    tubes[key] = int(value)
  return tubes


# ----------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------
def plan(source: PathLike, tubes_path: PathLike, skip_missing: bool = False) -> Plan:
  """Reads and checks every input; writes nothing."""
  source = pathlib.Path(source)
  sources.require_dir(source, 'SIIM-ACR release folder')
  csv_path, dicom_dir = source / 'train-rle.csv', source / 'dicom-images-train'
  sources.require_file(csv_path, 'SIIM-ACR labels')
  sources.require_dir(dicom_dir, 'SIIM-ACR DICOM folder')
  sources.require_file(pathlib.Path(tubes_path), 'chest-tube labels (cxr_tube_dict.pkl)')
  rles = read_rle_csv(csv_path)
  tubes = read_tubes(pathlib.Path(tubes_path))
  labels = {}
  for image_id, rows in rles.items():
    where = f'{csv_path} ImageId {image_id}'
    labels[image_id] = int(rows[0] != '-1')
    if not labels[image_id] and any(r != '-1' for r in rows):
      raise ValueError(f'{where}: its first row says no pneumothorax (-1), a later one draws one')
    for row in rows:
      rle_decode(row, where=where)  # parses and bounds-checks; cheap next to writing PNGs
  files: dict[str, str] = {}
  for path in sorted(dicom_dir.glob('*/*/*.dcm')):
    if path.stem in files:
      raise ValueError(f'two DICOMs of image {path.stem}: {files[path.stem]} and {path}')
    files[path.stem] = str(path)
  missing = sorted(set(labels) - set(files))
  if missing and not skip_missing:
    raise FileNotFoundError(f'{len(missing)} of {len(labels)} ids of {csv_path} have no DICOM '
                            f'under {dicom_dir}/*/*/, e.g. {missing[:3]} (an incomplete copy? '
                            '--skip_missing leaves them out)')
  labels = {k: v for k, v in labels.items() if k in files}
  tested = {k: t for k, t in tubes.items() if k in labels}
  if not tested:
    raise ValueError(f'none of the {len(tubes)} ids of {tubes_path} is a labelled image of '
                     f'{source}: a wrong tube file?')
  dicoms, counts = {}, collections.Counter()

  def put(split: str, image_id: str) -> None:
    dicoms[f'{split}/{labels[image_id]}/{image_id}.dcm'] = files[image_id]
    counts[f'{split}/{labels[image_id]}'] += 1

  for image_id in sorted(labels):
    if image_id not in tested:
      put('train_set', image_id)
      continue
    put('full_test_set', image_id)
    robust = tested[image_id] != labels[image_id]  # tube and negative, or no tube and positive
    put('robust_test_set' if robust else 'non_robust_test_set', image_id)
  masks = {image_id: rles[image_id] for image_id in sorted(labels)}
  counts['unmatched tube labels'] = len(tubes) - len(tested)
  return Plan(dicoms, masks, dict(sorted(counts.items())))


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------
def _in_place(dest: pathlib.Path, src: str, link: str) -> bool:
  """Whether `dest` already is what `link` makes of `src` (a rerun skips it)."""
  if link == 'symlink':
    return dest.is_symlink() and os.readlink(dest) == os.path.abspath(src)
  if not dest.is_file() or dest.is_symlink():
    return False
  if link == 'hard':
    return os.path.samefile(dest, src)
  return dest.stat().st_size == os.stat(src).st_size


def _place(dest: pathlib.Path, src: str, link: str) -> None:
  tmp = dest.with_name(dest.name + '.tmp')
  if link == 'hard':
    os.link(src, tmp)
  elif link == 'symlink':
    os.symlink(os.path.abspath(src), tmp)
  else:
    shutil.copyfile(src, tmp)
  os.replace(tmp, dest)


def _mask_png(rows: Sequence[str]) -> bytes:
  mask = np.zeros((MASK_SIZE, MASK_SIZE), np.uint8)
  for row in rows:
    mask |= rle_decode(row)
  buffer = io.BytesIO()
  Image.fromarray(mask).save(buffer, format='PNG')
  return buffer.getvalue()


def _stale(out: pathlib.Path, wanted: set[str]) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """(files in the output layout that the plan does not hold, an interrupted run's temporaries)."""
  found = [p for d in SPLIT_DIRS + ('all_masks',) if (out / d).is_dir()
           for p in (out / d).rglob('*') if p.is_file() or p.is_symlink()]
  temporary = [p for p in found if p.name.endswith('.tmp')]
  return sorted(p for p in found if str(p.relative_to(out)) not in wanted
                and not p.name.endswith('.tmp')), temporary


def prepare(source: PathLike, tubes: PathLike, out: PathLike, *, link: str = 'hard',
            overwrite: bool = False, skip_missing: bool = False) -> dict[str, int]:
  """Writes the layout of the module docstring into `out`; returns the images per split/label."""
  if link not in LINKS:
    raise ValueError(f'--link must be one of {list(LINKS)}, got {link!r}')
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise NotADirectoryError(f'--out {out} is not a directory')
  the_plan = plan(source, tubes, skip_missing)
  wanted = set(the_plan.dicoms) | {f'all_masks/{k}.png' for k in the_plan.masks}
  stale, temporary = _stale(out, wanted) if out.is_dir() else ([], [])
  if stale and not overwrite:
    raise FileExistsError(f'{out} holds {len(stale)} file(s) this release and tube file do not '
                          f'make, e.g. {[str(p) for p in stale[:3]]}; --overwrite removes them')
  existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
  if link == 'hard' and os.stat(existing).st_dev != os.stat(source).st_dev:
    raise ValueError(f'--link=hard: {out} and {source} are on different file systems; use '
                     '--link=symlink or --link=copy')
  out.mkdir(parents=True, exist_ok=True)
  for path in stale + temporary:
    path.unlink()
  for name in {str(pathlib.Path(d).parent) for d in wanted}:
    (out / name).mkdir(parents=True, exist_ok=True)
  progress = progress_lib.Progress(f'DICOMs ({link})', len(the_plan.dicoms))
  for dest, src in the_plan.dicoms.items():
    if not _in_place(out / dest, src, link):
      _place(out / dest, src, link)
    progress.update()
  progress = progress_lib.Progress('masks', len(the_plan.masks))
  for image_id, rows in the_plan.masks.items():
    dest = out / 'all_masks' / f'{image_id}.png'
    if not dest.is_file():  # written whole, then renamed: one that exists is complete
      tmp = dest.with_name(dest.name + '.tmp')
      tmp.write_bytes(_mask_png(rows))
      os.replace(tmp, dest)
    progress.update()
  print(f'{out}: ' + ', '.join(f'{k} {v:,}' for k, v in the_plan.counts.items()), flush=True)
  return the_plan.counts


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  prepare(_SOURCE.value, _TUBES.value, _OUT.value or _SOURCE.value, link=_LINK.value,
          overwrite=_OVERWRITE.value, skip_missing=_SKIP_MISSING.value)


if __name__ == '__main__':
  # Defined here, not on import: other modules of the package own flags of the same names.
  _SOURCE = flags.DEFINE_string('source', None, 'The release: train-rle.csv and '
                                'dicom-images-train/.')
  _TUBES = flags.DEFINE_string('tubes', None, 'cxr_tube_dict.pkl (khaledsaab/'
                               'spatial_specificity).')
  _OUT = flags.DEFINE_string('out', '', 'Where to write the layout (default: --source, as the '
                             'reference does).')
  _LINK = flags.DEFINE_enum('link', 'hard', LINKS, 'How DICOMs enter the layout: hard links, '
                            'absolute symbolic links, or copies.')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Remove files in the layout that this run '
                                 'would not write.')
  _SKIP_MISSING = flags.DEFINE_bool('skip_missing', False, 'Leave out labelled ids without a '
                                    'DICOM instead of failing.')
  flags.mark_flags_as_required(['source', 'tubes'])
  app.run(main)
