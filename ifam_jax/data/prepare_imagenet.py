"""Writes ImageNet-1K as the TFDS `imagenet2012` data set in ArrayRecord format, without TensorFlow.

  python -m ifam_jax.data.prepare_imagenet --source /data/imagenet --data_dir /data/tfds
  python -m ifam_jax.main --config configs/imagenet.py:data=tfds,tfds_dir=/data/tfds,weights=$W \
      --workdir /tmp/in1k

`--source` holds either the official archives, `ILSVRC2012_img_train.tar` (a tar of 1000
per-class tars `<wnid>.tar`) and `ILSVRC2012_img_val.tar` (50 000 flat JPEGs), or an extracted
ImageFolder tree `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`; the archives win when both are there.
The validation labels of the flat val tar are TFDS's own `validation_labels.txt` (one wnid per
image, in sorted file-name order), or `--val_labels` in the same format. Labels are indices into
the 1000 sorted wnids, the standard order.

Why TFDS's own builder: `tfds build imagenet2012` needs TensorFlow (tf.io.gfile and tf.image in
the builder), but its writing path does not. `_Imagenet2012` subclasses the official builder and
only replaces where the examples come from, so name, version (5.1.0), features (`image` JPEG,
`label` ClassLabel of all 1000 wnids, `file_name`), metadata, keys, the key-hash shuffle and the
shard layout (1024 train / 64 validation shards by default) are those of an official build, written
by TFDS's own writer; hand-written files would have to track TFDS's file format and metadata by
hand. It is not registered: `tfds.builder('imagenet2012', data_dir=...)` keeps loading the official
class, which is how readers (`tfds.data_source`, `sources.TfdsSource`) see the result. For the same
reason the label names are always the 1000 wnids, even when the source holds fewer classes.

Like the official builder, images that are not baseline RGB or greyscale JPEGs (22 CMYK JPEGs and
one PNG named .JPEG in the train set) are re-encoded as RGB JPEG at quality 100; every other image
is stored byte for byte. Worker processes (`--num_workers`, 0: none) read the archives and fully
decode every image, so a corrupt file stops the run with its name; the single TFDS writer then
shuffles through temporary files in the output folder: plan on twice the data set's size (about
2 x 150 GB) of free space there. Source layout, labels and output are checked before any image is
read; the output is `<data_dir>/imagenet2012/5.1.0`, replaced only with `--overwrite`. A run writes
every requested split at once: TFDS cannot add a split to a prepared data set.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import multiprocessing
import os
import pathlib
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.pool import Pool
from typing import Any, NamedTuple

import tensorflow_datasets as tfds
from absl import app, flags
from PIL import Image

from ifam_jax import progress as progress_lib
from ifam_jax.data import sources, transforms

NAME = 'imagenet2012'
SPLITS = ('train', 'validation')
TAR_NAMES = {'train': 'ILSVRC2012_img_train.tar', 'validation': 'ILSVRC2012_img_val.tar'}
FOLDER_NAMES = {'train': 'train', 'validation': 'val'}
JPEG_QUALITY = 100  # TFDS's jpeg_cmyk_to_rgb and png_to_jpeg
# A worker checks ~600 ImageNet-sized JPEGs/s, the one TFDS writer takes ~2000/s: a few suffice.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
_CHUNK = 256  # images per worker task, where each image is its own file or tar member
_TFDS_DIR = 'datasets/imagenet2012'  # inside the tensorflow_datasets package

PathLike = str | os.PathLike
# The sources' path checks are reused, so that errors read alike.


class Blob(NamedTuple):
  """`size` bytes at `offset` of `path` (size -1: the whole file): one image, or a class tar."""

  path: str
  offset: int
  size: int
  label: int
  name: str  # the image's file name, or the class tar's member name
  is_tar: bool = False

  @property
  def where(self) -> str:
    return self.path if self.size < 0 else f'{self.path}:{self.name}'


Task = tuple[Blob, ...]
Example = tuple[str, bytes, int, str]  # file name, JPEG bytes, label, why it was re-encoded ('')


# ----------------------------------------------------------------------------
# Planning: every check that needs no image data
# ----------------------------------------------------------------------------
def _tfds_file(name: str) -> pathlib.Path:
  return pathlib.Path(os.fspath(tfds.core.tfds_path(f'{_TFDS_DIR}/{name}')))


def wnids() -> list[str]:
  """The 1000 ImageNet-1K wnids in label order (sorted), as TFDS's imagenet2012 names them."""
  return _tfds_file('labels.txt').read_text().split()


def _chunks(blobs: Sequence[Blob]) -> list[Task]:
  return [tuple(blobs[i:i + _CHUNK]) for i in range(0, len(blobs), _CHUNK)]


def _tar_members(path: pathlib.Path) -> list[tarfile.TarInfo]:
  """The archive's files; reads only the tar headers. Uncompressed, so workers can seek."""
  sources.require_file(path, 'ImageNet archive')
  try:
    with tarfile.open(path, 'r:') as tar:
      return [m for m in tar.getmembers() if m.isfile()]
  except (tarfile.TarError, OSError) as e:
    raise ValueError(f'cannot read ImageNet archive {path} as an uncompressed tar: {e}') from None


def _plan_train_tar(path: pathlib.Path, index: dict[str, int]) -> list[Task]:
  """One task per class tar `<wnid>.tar` of the train archive."""
  tasks = []
  for m in _tar_members(path):
    wnid, ext = os.path.splitext(os.path.basename(m.name))
    if ext != '.tar' or wnid not in index:
      raise ValueError(f'{path} holds {m.name!r}; expected only class tars <wnid>.tar of the '
                       f'1000 ImageNet-1K wnids (is this ILSVRC2012_img_train.tar?)')
    tasks.append((Blob(str(path), m.offset_data, m.size, index[wnid], m.name, is_tar=True),))
  if not tasks:
    raise ValueError(f'{path} holds no class tars')
  return tasks


def _read_val_labels(path: pathlib.Path, index: dict[str, int]) -> list[int]:
  sources.require_file(path, 'validation labels file')
  labels = []
  for line, text in enumerate(path.read_text().strip().splitlines(), start=1):
    if text.strip() not in index:
      raise ValueError(f'{path} line {line}: {text!r} is not an ImageNet-1K wnid')
    labels.append(index[text.strip()])
  return labels


def _plan_val_tar(path: pathlib.Path, labels_path: pathlib.Path,
                  index: dict[str, int]) -> list[Task]:
  """The flat val archive; the i-th label belongs to the i-th file name in sorted order."""
  labels = _read_val_labels(labels_path, index)
  members = sorted(_tar_members(path), key=lambda m: m.name)
  if len(members) != len(labels):
    raise ValueError(f'{path} holds {len(members)} files but {labels_path} has {len(labels)} '
                     f'labels; they must match one to one (sorted file names)')
  nested = [m.name for m in members if m.name.lower().endswith('.tar')]
  if nested:
    raise ValueError(f'{path} holds tars ({nested[0]!r}, ...); expected the flat val archive')
  return _chunks([Blob(str(path), m.offset_data, m.size, y, os.path.basename(m.name))
                  for m, y in zip(members, labels)])


def _plan_folder(root: pathlib.Path, names: list[str]) -> list[Task]:
  """`root/<wnid>/**/<image>`, scanned like every ImageFolder of this package."""
  src = sources.ImageFolderSource(root, classes=names)
  file_names = [os.path.basename(p) for p in src.paths]
  repeated = [n for n, c in collections.Counter(file_names).items() if c > 1]
  if repeated:
    raise ValueError(f'{root} holds {len(repeated)} file names more than once (e.g. '
                     f'{repeated[0]!r}); TFDS keys examples by file name')
  return _chunks([Blob(p, 0, -1, int(y), n) for p, y, n in zip(src.paths, src.labels, file_names)])


def plan(source: PathLike, splits: Sequence[str] = SPLITS,
         val_labels: PathLike | None = None) -> dict[str, list[Task]]:
  """Worker tasks per split, after checking the source's layout, names and labels."""
  source = pathlib.Path(source)
  sources.require_dir(source, 'ImageNet source')
  unknown = set(splits) - set(SPLITS)
  if unknown or not splits:
    raise ValueError(f'splits must be some of {list(SPLITS)}, got {list(splits)}')
  names = wnids()
  index = {wnid: i for i, wnid in enumerate(names)}
  if any((source / TAR_NAMES[s]).exists() for s in SPLITS):
    for s in splits:
      if not (source / TAR_NAMES[s]).is_file():
        raise FileNotFoundError(f'ImageNet archive {source / TAR_NAMES[s]} does not exist; leave '
                                f'{s!r} out of splits to prepare the other split only')
    labels_path = pathlib.Path(val_labels) if val_labels else _tfds_file('validation_labels.txt')
    plans = {s: (_plan_train_tar(source / TAR_NAMES[s], index) if s == 'train' else
                 _plan_val_tar(source / TAR_NAMES[s], labels_path, index)) for s in splits}
    print(f'{source}: official archives ({", ".join(TAR_NAMES[s] for s in splits)})', flush=True)
  elif any((source / FOLDER_NAMES[s]).is_dir() for s in SPLITS):
    if val_labels:
      raise ValueError('val_labels applies to the official val archive only; an ImageFolder '
                       f'source {source} takes its labels from the class folders')
    plans = {s: _plan_folder(source / FOLDER_NAMES[s], names) for s in splits}
    print(f'{source}: ImageFolder ({", ".join(FOLDER_NAMES[s] for s in splits)}/<wnid>/*)',
          flush=True)
  else:
    raise ValueError(f'{source} holds neither {" nor ".join(TAR_NAMES.values())} nor the '
                     f'ImageFolder folders {" / ".join(FOLDER_NAMES.values())}/<wnid>/*.JPEG')
  for split, tasks in plans.items():
    classes = len({b.label for task in tasks for b in task})
    images = 'one tar per class' if tasks[0][0].is_tar else f'{sum(map(len, tasks)):,} images'
    note = '' if classes == len(names) else f' (of {len(names)}: a partial ImageNet)'
    print(f'  {split}: {classes} classes{note}, {images}', flush=True)
  return plans


# ----------------------------------------------------------------------------
# Worker side: read, fully decode, re-encode what is not an RGB or greyscale JPEG
# ----------------------------------------------------------------------------
def checked_jpeg(data: bytes, where: str) -> tuple[bytes, str]:
  """(JPEG bytes that decode to RGB or greyscale, why they were re-encoded or '').

  TFDS's numpy decoder (PIL, no colour conversion) would return 4 channels for a CMYK JPEG, and a
  PNG would break `encoding_format='jpeg'`, so both become RGB JPEGs; greyscale JPEGs stay, TFDS
  widens them to 3 channels. Raises for bytes no decoder reads, naming `where`.
  """
  image = transforms.decode(data)
  if image is None:
    raise ValueError(f'{where} is not a readable image')
  with Image.open(io.BytesIO(data)) as header:
    kind = f'{header.format} {header.mode}'
  if kind in ('JPEG RGB', 'JPEG L'):
    return data, ''
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=JPEG_QUALITY)
  return out.getvalue(), kind


def _example(name: str, data: bytes, label: int, where: str) -> Example:
  image, why = checked_jpeg(data, where)
  return name, image, label, why


def load(task: Task) -> list[Example]:
  """The checked examples of one task, in archive order."""
  examples = []
  for blob in task:
    with open(blob.path, 'rb') as f:
      f.seek(blob.offset)
      data = f.read(blob.size)
    if not blob.is_tar:
      examples.append(_example(blob.name, data, blob.label, blob.where))
      continue
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
      for m in tar:
        if m.isfile():
          examples.append(_example(os.path.basename(m.name), tar.extractfile(m).read(),
                                   blob.label, f'{blob.where}:{m.name}'))
  return examples


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], pool: Pool | None,
                 window: int) -> Iterator[Any]:
  """`map(fn, items)` in `pool` (None: in this process), in order.

  At most `window` results wait, which bounds memory (a class tar is ~150 MB) when the writer is
  slower than the workers.
  """
  if pool is None:
    yield from map(fn, items)
    return
  pending = collections.deque()
  for item in items:
    pending.append(pool.apply_async(fn, (item,)))
    if len(pending) >= window:
      yield pending.popleft().get()
  while pending:
    yield pending.popleft().get()


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------
def _report_reencoded(split: str, examples: list[Example]) -> int:
  """Says which images were re-encoded as RGB JPEGs; returns how many."""
  reencoded = [(name, why) for name, _, _, why in examples if why]
  for name, why in reencoded:
    print(f'{split}: re-encoded {name} ({why}) as RGB JPEG', flush=True)
  return len(reencoded)


# ----------------------------------------------------------------------------
# The builder: TFDS's imagenet2012, fed from a plan
# ----------------------------------------------------------------------------
class _Imagenet2012(tfds.builder_cls(NAME), skip_registration=True):
  """The official builder, its examples drawn from `tasks` (see `plan`) through `loader`."""

  name = NAME
  # Only locates download checksums, which a builder that downloads nothing never reads; TFDS
  # 4.9.10 derives it through `importlib_resources`, which current etils no longer installs.
  code_path = None

  def __init__(self, *, tasks: dict[str, list[Task]],
               loader: Callable[[list[Task]], Iterator[list[Example]]], **kwargs: Any):
    self._tasks, self._loader = tasks, loader
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # the plan has located every image
    return {split: self._generate_examples(split) for split in self._tasks}

  def _generate_examples(self, split):  # pylint: disable=arguments-differ
    tasks = self._tasks[split]
    progress = progress_lib.Progress(split, len(tasks), unit='tasks', rate_unit='images')
    reencoded = 0
    for examples in self._loader(tasks):
      reencoded += _report_reencoded(split, examples)
      progress.update(1, items=len(examples))
      for name, image, label, _ in examples:
        yield name, {'image': image, 'label': label, 'file_name': name}
    print(f'{split}: all {progress.items:,} images read ({reencoded} re-encoded); TFDS now '
          'shuffles and writes the shards', flush=True)


def output_dir(data_dir: PathLike) -> pathlib.Path:
  """Where TFDS keeps the prepared data set: <data_dir>/imagenet2012/<version>."""
  return pathlib.Path(data_dir) / NAME / str(_Imagenet2012.VERSION)


def prepare(source: PathLike, data_dir: PathLike, splits: Sequence[str] = SPLITS, *,
            num_shards: int | None = None, num_workers: int = DEFAULT_WORKERS,
            overwrite: bool = False, val_labels: PathLike | None = None) -> pathlib.Path:
  """Writes `splits` of the ImageNet at `source` as TFDS imagenet2012 in `data_dir`.

  `num_shards` (every split; default TFDS's choice by size) and `num_workers` (0: read and check
  images in this process). Returns the output folder.
  """
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  if num_workers < 0:
    raise ValueError(f'num_workers must be >= 0, got {num_workers}')
  if pathlib.Path(data_dir).exists() and not pathlib.Path(data_dir).is_dir():
    raise NotADirectoryError(f'TFDS data_dir {data_dir} is not a directory')
  out = output_dir(data_dir)
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f'{out} already holds a prepared {NAME}; pass --overwrite to replace it')
  plans = plan(source, splits, val_labels)
  if out.exists():
    shutil.rmtree(out)
  config = tfds.download.DownloadConfig(num_shards=num_shards)
  with contextlib.ExitStack() as stack:
    # Spawned, not forked: this process has imported JAX. One pool serves every split.
    pool = (stack.enter_context(multiprocessing.get_context('spawn').Pool(num_workers))
            if num_workers else None)
    loader = functools.partial(_ordered_map, load, pool=pool, window=2 * num_workers)
    builder = _Imagenet2012(tasks=plans, loader=loader, data_dir=os.fspath(data_dir),
                            file_format='array_record')
    downloads = stack.enter_context(tempfile.TemporaryDirectory())  # keeps data_dir clean
    builder.download_and_prepare(download_dir=downloads, download_config=config)
  splits_info = builder.info.splits
  print(f'{out}: ' + ', '.join(f'{s} {splits_info[s].num_examples:,} examples in '
                               f'{splits_info[s].num_shards} shards' for s in plans), flush=True)
  return out


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  prepare(_SOURCE.value, _DATA_DIR.value, _SPLITS.value, num_shards=_NUM_SHARDS.value,
          num_workers=_NUM_WORKERS.value, overwrite=_OVERWRITE.value,
          val_labels=_VAL_LABELS.value or None)


if __name__ == '__main__':
  # Defined here, not on import: other modules of the package own flags of the same names.
  _SOURCE = flags.DEFINE_string('source', None, 'The official tars or an ImageFolder tree.')
  _DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir to write imagenet2012 into.')
  _SPLITS = flags.DEFINE_list('splits', list(SPLITS), 'Splits to write.')
  _NUM_SHARDS = flags.DEFINE_integer('num_shards', None, 'Shards per split (default: TFDS picks '
                                     'by size, 1024 train / 64 validation for ImageNet).')
  _NUM_WORKERS = flags.DEFINE_integer('num_workers', DEFAULT_WORKERS, 'Processes reading and '
                                      'checking images (0: none).')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing prepared imagenet2012.')
  _VAL_LABELS = flags.DEFINE_string('val_labels', '', 'Validation labels, one wnid per line in '
                                    "sorted file-name order (default: TFDS's).")
  flags.mark_flags_as_required(['source', 'data_dir'])
  app.run(main)
