"""ImageNet -> TFDS imagenet2012 ArrayRecord, from tiny synthetic ImageFolder and official tars.

Three classes spread over the label range; an image of class k is uniform grey at 40 + 80 k, so
every read-back checks its label against its pixels. Each source has a CMYK JPEG and a PNG named
.JPEG (re-encoded) and a greyscale JPEG (stored as is).
"""

import io
import os
import pathlib
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ifam_jax.data import prepare_imagenet, sources, transforms

REPO = pathlib.Path(__file__).resolve().parents[1]
WNIDS = prepare_imagenet.wnids()
CLASSES = (WNIDS[0], WNIDS[500], WNIDS[999])  # labels 0, 500, 999
# {class k: how its train images are stored}: a plain RGB JPEG first, then the odd ones.
TRAIN = {0: ('RGB', 'CMYK'), 1: ('RGB', 'PNG'), 2: ('RGB', 'L', 'RGB')}
VAL = (2, 0, 1, 0, 2)  # class of ILSVRC2012_val_0000000{i + 1}.JPEG


def encoded(k: int, kind: str) -> bytes:
  """A 16x12 image of grey 40 + 80 k as a `kind` JPEG ('RGB', 'CMYK', 'L'), or as a PNG."""
  value = 40 + 80 * k
  image = Image.new('RGB', (16, 12), (value,) * 3)
  image = image.convert(kind) if kind in ('CMYK', 'L') else image
  buf = io.BytesIO()
  image.save(buf, 'PNG' if kind == 'PNG' else 'JPEG')
  return buf.getvalue()


def expected_images() -> dict[str, dict[str, tuple[int, bytes, str]]]:
  """{split: {file name: (class k, source bytes, kind)}}, the same for both source layouts."""
  train = {f'{CLASSES[k]}_{i}.JPEG': (k, encoded(k, kind), kind)
           for k, kinds in TRAIN.items() for i, kind in enumerate(kinds)}
  val = {f'ILSVRC2012_val_{i + 1:08d}.JPEG': (k, encoded(k, 'RGB'), 'RGB')
         for i, k in enumerate(VAL)}
  return {'train': train, 'validation': val}


def make_image_folder(root: pathlib.Path) -> pathlib.Path:
  for split, folder in prepare_imagenet.FOLDER_NAMES.items():
    for name, (k, data, _) in expected_images()[split].items():
      path = root / folder / CLASSES[k] / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  return root


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_tars(root: pathlib.Path, train_members=None) -> tuple[pathlib.Path, pathlib.Path]:
  """The official archives under root, and a validation labels file for them."""
  root.mkdir(parents=True, exist_ok=True)
  images = expected_images()
  with tarfile.open(root / prepare_imagenet.TAR_NAMES['train'], 'w') as train:
    for k, wnid in enumerate(CLASSES):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for name, (c, data, _) in images['train'].items():
          if c == k:
            add_to_tar(tar, name, data)
      add_to_tar(train, f'{wnid}.tar', inner.getvalue())
    for name, data in (train_members or {}).items():
      add_to_tar(train, name, data)
  with tarfile.open(root / prepare_imagenet.TAR_NAMES['validation'], 'w') as val:
    for name, (_, data, _) in reversed(images['validation'].items()):  # labels follow sorted names
      add_to_tar(val, name, data)
  labels = root / 'validation_labels.txt'
  labels.write_text(''.join(f'{CLASSES[k]}\n' for k in VAL))
  return root, labels


def grey_class(image: np.ndarray) -> int:
  assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8
  k = (image.mean() - 40) / 80
  assert abs(k - round(k)) < 0.05, image.mean()
  return round(k)


def check_prepared(data_dir: pathlib.Path, splits=('train', 'validation'), num_shards=None):
  """Reads data_dir back through TFDS's own imagenet2012 builder, data_source and TfdsSource."""
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  assert type(builder).__module__.startswith('tensorflow_datasets.')  # the official class
  assert str(builder.version) == '5.1.0' and builder.info.file_format.value == 'array_record'
  assert builder.info.features['label'].names == WNIDS
  assert sorted(builder.info.splits.keys()) == sorted(splits)
  out = prepare_imagenet.output_dir(data_dir)
  assert {'dataset_info.json', 'features.json'} <= set(os.listdir(out))
  for split in splits:
    want = expected_images()[split]
    info = builder.info.splits[split]
    assert info.num_examples == sum(info.shard_lengths) == len(want)
    if num_shards:
      assert info.num_shards == num_shards
    shards = sorted(f for f in os.listdir(out) if f.startswith(f'imagenet2012-{split}.'))
    assert shards == [f'imagenet2012-{split}.array_record-{i:05d}-of-{info.num_shards:05d}'
                      for i in range(info.num_shards)]

    decoded = tfds.data_source('imagenet2012', split=split, data_dir=data_dir)
    seen = set()
    for i in range(len(decoded)):
      example = decoded[i]
      name = example['file_name']
      name = name.decode() if isinstance(name, bytes) else name
      k = want[name][0]
      assert example['label'] == WNIDS.index(CLASSES[k])
      assert grey_class(example['image']) == k
      seen.add(name)
    assert seen == set(want)

    src = sources.TfdsSource('imagenet2012', split, data_dir)
    assert len(src) == len(want) and src.class_names == WNIDS and src.num_classes == 1000
    stored = [src[i] for i in range(len(src))]
    assert sorted(r['label'] for r in stored) == sorted(WNIDS.index(CLASSES[k])
                                                        for k, _, _ in want.values())
    originals = {data: kind for _, data, kind in want.values()}
    for record in stored:
      k = grey_class(np.asarray(transforms.decode(record['image'])))
      assert record['label'] == WNIDS.index(CLASSES[k]) and record['group'] == -1
      with Image.open(io.BytesIO(record['image'])) as img:
        assert img.format == 'JPEG' and img.mode in ('RGB', 'L')
      if record['image'] not in originals:  # re-encoded: only the CMYK JPEG and the PNG
        assert split == 'train' and img.mode == 'RGB'
    kept = sum(r['image'] in originals for r in stored)
    assert kept == sum(kind in ('RGB', 'L') for _, _, kind in want.values())
  assert 'tensorflow' not in sys.modules


# ----------------------------------------------------------------------------
# Both layouts, read back
# ----------------------------------------------------------------------------
def test_image_folder_in_process(tmp_path, capsys):
  source = make_image_folder(tmp_path / 'imagenet')
  data_dir = tmp_path / 'tfds'
  out = prepare_imagenet.prepare(source, data_dir, num_workers=0)
  assert out == data_dir / 'imagenet2012' / '5.1.0'
  check_prepared(data_dir)
  printed = capsys.readouterr().out
  assert 'ImageFolder' in printed and 'ETA' in printed
  assert 're-encoded' in printed and 'JPEG CMYK' in printed and 'PNG RGB' in printed
  assert not (data_dir / 'downloads').exists()

  with pytest.raises(FileExistsError, match=f'{out} already holds .* pass --overwrite'):
    prepare_imagenet.prepare(source, data_dir, num_workers=0)
  prepare_imagenet.prepare(source, data_dir, ['validation'], num_shards=2, num_workers=0,
                           overwrite=True)
  check_prepared(data_dir, ['validation'], num_shards=2)


@pytest.mark.slow
def test_official_tars_on_the_command_line(tmp_path):
  source, labels = make_tars(tmp_path / 'manual')
  data_dir = tmp_path / 'tfds'
  result = subprocess.run(
      [sys.executable, '-m', 'ifam_jax.data.prepare_imagenet', f'--source={source}',
       f'--data_dir={data_dir}', f'--val_labels={labels}', '--num_shards=2', '--num_workers=2'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'official archives' in result.stdout and 'ETA' in result.stdout
  assert result.stdout.count('re-encoded ') == 2
  check_prepared(data_dir, num_shards=2)


# ----------------------------------------------------------------------------
# Errors, raised before anything is written
# ----------------------------------------------------------------------------
def test_errors_name_the_problem(tmp_path):
  data_dir = tmp_path / 'tfds'

  def prepare(source, splits=prepare_imagenet.SPLITS, **kwargs):
    return prepare_imagenet.prepare(source, data_dir, splits, num_workers=0, **kwargs)

  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'none')):
    prepare(tmp_path / 'none')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='holds neither ILSVRC2012_img_train.tar'):
    prepare(tmp_path / 'empty')

  folder = make_image_folder(tmp_path / 'folder')
  with pytest.raises(ValueError, match="splits must be some of .*'test'"):
    prepare(folder, ['train', 'test'])
  with pytest.raises(ValueError, match='val_labels applies to the official val archive only'):
    prepare(folder, val_labels=tmp_path / 'labels.txt')
  (folder / 'val' / 'n99999999').mkdir()
  (folder / 'val' / 'n99999999' / 'x.JPEG').write_bytes(encoded(0, 'RGB'))
  with pytest.raises(ValueError, match=f'{folder / "val" / "n99999999"} is not in the class set'):
    prepare(folder)
  with pytest.raises(ValueError, match='num_shards must be >= 1'):
    prepare(folder, ['train'], num_shards=0)

  tars, labels = make_tars(tmp_path / 'tars')
  assert len(WNIDS) == 1000 and WNIDS == sorted(WNIDS)
  with pytest.raises(ValueError, match=r'holds 5 files but \S*validation_labels.txt has 50000'):
    prepare(tars, ['validation'])  # TFDS's own labels, for the real 50 000 images
  labels.write_text(f'{CLASSES[0]}\n' * 6)
  with pytest.raises(ValueError, match=re.escape(f'holds 5 files but {labels} has 6 labels')):
    prepare(tars, ['validation'], val_labels=labels)
  labels.write_text('n00000000\n' + f'{CLASSES[0]}\n' * 4)
  with pytest.raises(ValueError, match=re.escape(f"{labels} line 1: 'n00000000' is not an")):
    prepare(tars, ['validation'], val_labels=labels)
  (tars / prepare_imagenet.TAR_NAMES['validation']).unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(f'{tars / "ILSVRC2012_img_val.tar"} does '
                                                        'not exist')):
    prepare(tars)
  stray, _ = make_tars(tmp_path / 'stray', train_members={'README.txt': b'hello'})
  with pytest.raises(ValueError, match="holds 'README.txt'; expected only class tars"):
    prepare(stray, ['train'])
  (stray / prepare_imagenet.TAR_NAMES['train']).write_bytes(b'not a tar')
  with pytest.raises(ValueError, match='cannot read ImageNet archive .* as an uncompressed tar'):
    prepare(stray, ['train'])
  assert not data_dir.exists()


def test_unreadable_image_stops_the_run(tmp_path):
  folder = make_image_folder(tmp_path / 'folder')
  bad = folder / 'train' / CLASSES[1] / 'broken.JPEG'
  bad.write_bytes(encoded(1, 'RGB')[:40])
  with pytest.raises(ValueError, match=f'{bad} is not a readable image'):
    prepare_imagenet.prepare(folder, tmp_path / 'tfds', ['train'], num_workers=0)
  assert not prepare_imagenet.output_dir(tmp_path / 'tfds').exists()
