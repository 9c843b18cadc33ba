"""Input pipelines: sources on tiny on-disk fixtures, transforms, batching, padding, checkpoints."""

import codecs
import io
import os
import re
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from ifam_jax import config_lib, factory
from ifam_jax.data import pipeline, sources, synthetic, transforms


def jpeg_bytes(value: int, size=(6, 8), mode='RGB') -> bytes:
  buf = io.BytesIO()
  Image.new(mode, size, (value,) * len(mode)).save(buf, 'JPEG')
  return buf.getvalue()


def write_image(path, value: int = 128, size=(6, 8), fmt='JPEG'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new('RGB', size, (value, value, value)).save(path, fmt)


def images_of(batches):
  return np.concatenate([b['image'] for b in batches])


class IndexSource:
  """Record i: a uniform 8x8 image of value i % 256, label i; identifies every example."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': np.full((8, 8, 3), i % 256, np.uint8), 'label': i, 'group': -1}

  def __repr__(self):
    return f'IndexSource({self.n})'


# ----------------------------------------------------------------------------
# ImageFolder, ImageNet-9, MetaShift
# ----------------------------------------------------------------------------
def test_image_folder_source(tmp_path):
  root = tmp_path / 'imgs'
  write_image(root / 'b' / 'x1.jpg', 10)
  write_image(root / 'b' / 'deep' / 'x0.JPEG', 20)  # recursive, upper-case extension
  write_image(root / 'a' / 'y.png', 30, fmt='PNG')
  (root / 'a' / 'notes.txt').write_text('not an image')
  src = sources.ImageFolderSource(root)
  assert src.class_names == ['a', 'b'] and src.num_classes == 2
  assert (src.num_groups, src.group_names) == (0, [])
  assert len(src) == 3
  # torchvision order: class by class, os.walk sorted (the class folder's own files first)
  assert [os.path.relpath(p, root) for p in src.paths] == ['a/y.png', 'b/x1.jpg', 'b/deep/x0.JPEG']
  assert [src[i]['label'] for i in range(3)] == [0, 1, 1]
  assert {src[i]['group'] for i in range(3)} == {-1}
  assert np.asarray(transforms.decode(src[0]['image']))[0, 0, 0] == 30
  assert repr(src) == repr(sources.ImageFolderSource(root)) == \
      f"ImageFolderSource(root='{root}', classes=None)"
  fixed = sources.ImageFolderSource(root, classes=['a', 'z', 'b'])  # 'z' has no folder
  assert fixed.num_classes == 3 and [fixed[i]['label'] for i in range(3)] == [0, 2, 2]


def test_image_folder_errors_name_the_path(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    sources.ImageFolderSource(missing)
  (tmp_path / 'flat').mkdir()
  with pytest.raises(ValueError, match='no class folders'):
    sources.ImageFolderSource(tmp_path / 'flat')
  root = tmp_path / 'imgs'
  write_image(root / 'a' / 'y.jpg')
  (root / 'b').mkdir()
  (root / 'b' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=f'{root / "b"} holds no image files'):
    sources.ImageFolderSource(root)
  write_image(root / 'b' / 'y.jpg')
  with pytest.raises(ValueError, match=f'{root / "b"} is not in the class set'):
    sources.ImageFolderSource(root, classes=['a'])


def test_imagenet9_source(tmp_path):
  val = tmp_path / 'bg' / 'mixed_rand' / 'val'
  write_image(val / '00_dog' / 'a.JPEG')
  write_image(val / '08_fish' / 'b.JPEG')
  write_image(val / '08_fish' / 'c.JPEG')
  src = sources.ImageNet9Source(tmp_path / 'bg', 'mixed_rand')
  assert src.num_classes == 9 and src.class_names[8] == '08_fish'
  assert [src[i]['label'] for i in range(len(src))] == [0, 8, 8]
  write_image(tmp_path / 'bg' / 'original' / 'train' / '03_reptile' / 'd.JPEG')
  assert sources.ImageNet9Source(tmp_path / 'bg', 'original', 'train')[0]['label'] == 3
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'bg' / 'only_fg' / 'val')):
    sources.ImageNet9Source(tmp_path / 'bg', 'only_fg')
  write_image(val / '09_frog' / 'e.JPEG')
  with pytest.raises(ValueError, match='09_frog is not in the class set'):
    sources.ImageNet9Source(tmp_path / 'bg', 'mixed_rand')


def test_metashift_source(tmp_path):
  train = tmp_path / 'meta' / 'train'
  for rel in ('dog/dog(bench)/1.jpg', 'cat/cat(sofa)/2.jpg', 'cat/cat(bed)/3.jpg',
              'cat/cat(bed)/sub/4.jpg', 'dog/dog(bench)/5.jpg'):
    write_image(train / rel)
  src = sources.MetaShiftSource(tmp_path / 'meta', 'train')
  assert src.class_names == ['cat', 'dog']
  assert src.group_names == ['cat(bed)', 'cat(sofa)', 'dog(bench)']
  got = [(os.path.relpath(src.paths[i], train), src[i]['label'], src[i]['group'])
         for i in range(len(src))]
  assert got == [('cat/cat(bed)/3.jpg', 0, 0), ('cat/cat(bed)/sub/4.jpg', 0, 0),
                 ('cat/cat(sofa)/2.jpg', 0, 1), ('dog/dog(bench)/1.jpg', 1, 2),
                 ('dog/dog(bench)/5.jpg', 1, 2)]
  write_image(train / 'dog' / 'loose.jpg')
  with pytest.raises(ValueError, match=f'{train / "dog" / "loose.jpg"} is not inside a context'):
    sources.MetaShiftSource(tmp_path / 'meta', 'train')


def write_class_folders(root, splits):
  """`root/in/<split>/<class>/x.jpg` (ImageFolder) and `root/meta/<split>/<class>/<class>(c)/x.jpg`
  (MetaShift) for {split: class names}."""
  for split, names in splits.items():
    for name in names:
      write_image(root / 'in' / split / name / 'x.jpg')
      write_image(root / 'meta' / split / name / f'{name}(c)' / 'x.jpg')


def labels_of(source):
  return [source[i]['label'] for i in range(len(source))]


def test_eval_splits_are_labelled_by_the_training_classes(tmp_path):
  """An eval split with fewer class folders keeps the training split's label of each class."""
  write_class_folders(tmp_path, {'train': ('n01', 'n02', 'n03'), 'val': ('n01', 'n03')})
  classes = sources.ImageFolderSource(tmp_path / 'in' / 'train').class_names
  assert labels_of(sources.ImageFolderSource(tmp_path / 'in' / 'val', classes)) == [0, 2]
  meta = sources.MetaShiftSource(tmp_path / 'meta', 'val', classes=classes)
  assert labels_of(meta) == [0, 2] and meta.class_names == classes
  assert meta.group_names == ['n01(c)', 'n03(c)']
  # Through the builders the train loop uses.
  config = config_lib.base_config()
  config.data.train = dict(source='folder', root=str(tmp_path / 'in' / 'train'))
  config.data.evals = {'in': dict(source='folder', root=str(tmp_path / 'in' / 'val')),
                       'meta': dict(source='metashift', root=str(tmp_path / 'meta'), split='val')}
  evals = factory.make_eval_sources(config)
  assert {name: labels_of(source) for name, source in evals.items()} == \
      {'in': [0, 2], 'meta': [0, 2]}
  assert all(source.class_names == classes for source in evals.values())
  config.data.train = dict(source='metashift', root=str(tmp_path / 'meta'), split='train')
  assert labels_of(factory.make_eval_sources(config)['in']) == [0, 2]


def test_an_eval_class_the_model_does_not_know_fails(tmp_path):
  write_class_folders(tmp_path, {'train': ('n01', 'n02'), 'val': ('n01', 'n03')})
  config = config_lib.base_config()
  config.data.train = dict(source='folder', root=str(tmp_path / 'in' / 'train'))
  for name, spec in (('in', dict(source='folder', root=str(tmp_path / 'in' / 'val'))),
                     ('meta', dict(source='metashift', root=str(tmp_path / 'meta'), split='val'))):
    config.data.evals = {name: spec}
    folder = tmp_path / name / 'val' / 'n03'
    with pytest.raises(ValueError, match=f'class folder {folder} is not in the class set'):
      factory.make_eval_sources(config)
  # data.classes names the classes instead of the training split's folders.
  config.data.classes = ('n01', 'n02', 'n03')
  assert factory.make_source(config.data.train, config.data.classes).num_classes == 3
  assert labels_of(factory.make_eval_sources(config)['meta']) == [0, 2]
  config.data.evals.meta.classes = ('n03', 'n01')
  with pytest.raises(ValueError, match="sets classes .* but the training classes are"):
    factory.make_eval_sources(config)
  config.data.classes = ()
  config.data.train.root = str(tmp_path / 'gone')
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "gone"}.*set data.classes'):
    factory.make_eval_sources(config)


def test_a_spec_with_keys_its_source_does_not_take_fails_naming_both(tmp_path):
  """The demo's synthetic spec switched to Waterbirds keeps synthetic's keys: named, with the
  spec, before any file is read (tmp_path holds no data)."""
  config = config_lib.base_config()
  config.data.train = dict(source='waterbirds', root=str(tmp_path), split='train',
                           num_examples=4096, image_size=64, majority=0.95)
  config.data.evals = dict(val=dict(source='waterbirds', root=str(tmp_path)))
  with pytest.raises(ValueError, match=re.escape(
      "data.train: the 'waterbirds' source takes no key(s) ['image_size', 'majority', "
      "'num_examples']; its keys are ['attribute_names', 'classes', 'root', 'split']")):
    factory.make_train_source(config)
  with pytest.raises(ValueError, match=re.escape(
      "data.evals.val: the 'waterbirds' source needs key(s) ['split']")):
    factory.make_eval_sources(config)
  with pytest.raises(ValueError, match=re.escape("data.train: the 'waterbirds' source takes no "
                                                 "key(s) ['image_size'")):
    factory.check_data_specs(config)  # what the comparison checks before anything trains
  config.data.train = dict(source='waterbird', root=str(tmp_path), split='train')
  with pytest.raises(ValueError, match="data.train: unknown data source 'waterbird'; known:"):
    factory.make_train_source(config)
  config.data.train = dict(source='synthetic', num_examples=4, split='val', seed=1)
  assert len(factory.make_train_source(config)) == 4  # a spec of its own keys builds


# ----------------------------------------------------------------------------
# Waterbirds and CUB
# ----------------------------------------------------------------------------
WATERBIRDS_CSV = """img_id,img_filename,y,split,place,place_filename
1,001.A/a.jpg,0,0,0,x
2,001.A/b.jpg,0,0,1,x
3,002.B/c.jpg,1,0,1,x
4,002.B/d.jpg,1,2,0,x
5,001.A/e.jpg,0,1,1,x
"""


def make_waterbirds(root, csv_text=WATERBIRDS_CSV):
  for name in ('001.A/a.jpg', '001.A/b.jpg', '002.B/c.jpg', '002.B/d.jpg', '001.A/e.jpg'):
    write_image(root / name)
  (root / 'metadata.csv').write_text(csv_text)


def test_waterbirds_source(tmp_path):
  root = tmp_path / 'waterbird_complete95_forest2water2'
  make_waterbirds(root)
  train = sources.WaterbirdsSource(root, 'train')
  assert [(r['label'], r['group']) for r in (train[i] for i in range(len(train)))] == \
      [(0, 0), (0, 1), (1, 3)]
  assert train.group_names == ['landbird/land', 'landbird/water', 'waterbird/land',
                               'waterbird/water']
  assert train.num_classes == 2 and train.num_groups == 4
  test = sources.WaterbirdsSource(root, 'test')
  assert len(test) == 1 and (test[0]['label'], test[0]['group']) == (1, 2)
  assert test.paths == [str(root / '002.B/d.jpg')]
  assert len(sources.WaterbirdsSource(root, 'val')) == 1


def test_waterbirds_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'none')):
    sources.WaterbirdsSource(tmp_path / 'none', 'train')
  root = tmp_path / 'wb'
  root.mkdir()
  with pytest.raises(FileNotFoundError, match=str(root / 'metadata.csv')):
    sources.WaterbirdsSource(root, 'train')
  make_waterbirds(root, WATERBIRDS_CSV.replace('002.B/c.jpg,1,0', '002.B/c.jpg,2,0'))
  with pytest.raises(ValueError, match=f'{root / "metadata.csv"} line 4: label y=2 is outside'):
    sources.WaterbirdsSource(root, 'train')
  (root / 'metadata.csv').write_text('img_filename,y\na.jpg,0\n')
  with pytest.raises(ValueError, match=f'{root / "metadata.csv"} lacks column'):
    sources.WaterbirdsSource(root, 'train')
  (root / 'metadata.csv').write_bytes(b'\xff\xfe\x00\x81garbage')
  with pytest.raises(ValueError, match=f'cannot read Waterbirds metadata {root / "metadata.csv"}'):
    sources.WaterbirdsSource(root, 'train')
  make_waterbirds(root, WATERBIRDS_CSV.replace('001.A/a.jpg', 'gone/a.jpg'))
  with pytest.raises(FileNotFoundError, match=str(root / 'gone' / 'a.jpg')):
    sources.WaterbirdsSource(root, 'train')


def test_waterbirds_checks_every_listed_image(tmp_path):
  root = tmp_path / 'wb'
  make_waterbirds(root, WATERBIRDS_CSV.replace('002.B/c.jpg', 'gone/c.jpg'))  # the last row
  meta = root / 'metadata.csv'
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'Waterbirds metadata {meta}: 1 of 3 listed images do not exist, e.g. '
      f"['{root / 'gone' / 'c.jpg'}']")):
    sources.WaterbirdsSource(root, 'train')
  assert len(sources.WaterbirdsSource(root, 'test')) == 1  # other splits list existing images


def test_list_files_with_a_byte_order_mark(tmp_path):
  """Excel saves CSVs with a UTF-8 byte-order mark: the first column keeps its name."""
  root = tmp_path / 'wb'
  make_waterbirds(root)
  rows = [line.split(',') for line in WATERBIRDS_CSV.splitlines()]
  text = '\n'.join(','.join(row[1:5]) for row in rows) + '\n'  # img_filename first
  (root / 'metadata.csv').write_bytes(codecs.BOM_UTF8 + text.encode())
  assert labels_of(sources.WaterbirdsSource(root, 'train')) == [0, 0, 1]
  cub = tmp_path / 'CUB_200_2011'
  make_cub(cub)
  for name in ('images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt'):
    (cub / name).write_bytes(codecs.BOM_UTF8 + (cub / name).read_bytes())
  source = sources.CubSource(cub, 'train')
  assert labels_of(source) == [1, 2] and source.class_names == ['001.A', '002.B', '003.C']


def make_cub(root, labels='1 2\n2 1\n3 3\n4 2\n'):
  for sub in ('images', 'waterbird_complete95_forest2water2'):
    for name in ('002.B/a.jpg', '001.A/b.jpg', '003.C/c.jpg', '002.B/d.jpg'):
      write_image(root / sub / name, 200 if sub == 'images' else 50)
  (root / 'images.txt').write_text('1 002.B/a.jpg\n2 001.A/b.jpg\n3 003.C/c.jpg\n4 002.B/d.jpg\n')
  (root / 'image_class_labels.txt').write_text(labels)
  (root / 'train_test_split.txt').write_text('1 1\n2 0\n3 1\n4 0\n')
  (root / 'classes.txt').write_text('1 001.A\n2 002.B\n3 003.C\n')


def test_cub_source(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  train = sources.CubSource(root, 'train')
  assert train.class_names == ['001.A', '002.B', '003.C']
  assert [train[i]['label'] for i in range(len(train))] == [1, 2]
  assert train.paths == [str(root / 'images/002.B/a.jpg'), str(root / 'images/003.C/c.jpg')]
  test = sources.CubSource(root, 'test')
  assert [test[i]['label'] for i in range(len(test))] == [0, 1]
  assert {test[i]['group'] for i in range(len(test))} == {-1} and test.num_groups == 0
  ood = sources.CubSource(root, 'test', image_subdir='waterbird_complete95_forest2water2')
  assert np.asarray(transforms.decode(ood[0]['image'])).mean() == pytest.approx(50, abs=2)
  with pytest.raises(FileNotFoundError, match=str(root / 'segmentations')):
    sources.CubSource(root, 'test', image_subdir='segmentations')
  with pytest.raises(ValueError, match='no val'):
    sources.CubSource(root, 'val')


def test_cub_label_outside_class_set(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root, labels='1 2\n2 1\n3 4\n4 2\n')
  with pytest.raises(ValueError, match=f'{root / "image_class_labels.txt"}: label 4 of image id 3'):
    sources.CubSource(root, 'train')
  make_cub(root, labels='1 2\n2 1\n4 2\n')
  with pytest.raises(ValueError, match=f'{root / "image_class_labels.txt"} has no entry'):
    sources.CubSource(root, 'train')


def test_cub_checks_every_listed_image_and_mask(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  (root / 'images' / '003.C' / 'c.jpg').unlink()  # the second train image
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'CUB images.txt {root / "images.txt"}: 1 of 2 listed images do not exist, e.g. '
      f"['{root / 'images' / '003.C' / 'c.jpg'}']")):
    sources.CubSource(root, 'train')
  band = np.ones((8, 6), bool)
  write_cub_mask(root, '001.A/b.jpg', band)  # the test split's second mask is missing
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'CUB segmentation folder {root / "segmentations"}: 1 of 2 listed masks do not exist, e.g. '
      f"['{root / 'segmentations' / '002.B' / 'd.png'}']")):
    sources.CubSource(root, 'test', segmentation_dir='segmentations')


def write_cub_mask(root, name: str, mask: np.ndarray, mode: str = 'L'):
  """Writes `mask` (bool [H, W]) as segmentations/<name>.png in `mode`, with 'on' values that are
  small and in one channel only, so that binarising at > 0 matters."""
  path = root / 'segmentations' / (os.path.splitext(name)[0] + '.png')
  os.makedirs(path.parent, exist_ok=True)
  if mode == 'RGB':
    img = Image.fromarray(np.stack([np.zeros_like(mask), np.zeros_like(mask), mask], -1)
                          .astype(np.uint8) * 7)
  else:
    img = Image.fromarray(mask.astype(np.uint8) * (1 if mode == 'P' else 3), 'L')
    if mode == 'P':
      img = img.convert('P')
      img.putpalette([0, 0, 0, 255, 255, 255])
  img.save(path)
  return path


def test_cub_segmentations(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  # Test split: b.jpg, d.jpg. A bright left band (x < 14 of 40, all rows) with its mask, so
  # alignment through the eval crop (21x16 -> centre 16x16, 2 px cut on the left) is visible.
  band = np.zeros((30, 40), bool)
  band[:, :14] = True
  for name in ('001.A/b.jpg', '002.B/d.jpg'):
    Image.fromarray(band.astype(np.uint8) * 255).convert('RGB').save(root / 'images' / name)
  for mode in ('L', 'P', 'RGB'):
    for name in ('001.A/b.jpg', '002.B/d.jpg'):
      write_cub_mask(root, name, band, mode)
    test = sources.CubSource(root, 'test', segmentation_dir='segmentations')
    for i in range(len(test)):
      record = test[i]
      assert isinstance(record['image'], bytes)
      assert record['fg_mask'].dtype == np.uint8 and record['fg_mask'].shape == (30, 40)
      np.testing.assert_array_equal(record['fg_mask'], band, err_msg=mode)
  out = transforms.process(test[0], np.random.default_rng(0), transforms.resize_center_crop(16))
  assert out['fg_mask'].shape == (16, 16) and out['valid'] == 1
  image = out['image'].mean(-1)
  edge = 5  # the band ends at x = 14 * 21 / 40 - 2 = 5.35: a blend of bright and dark
  np.testing.assert_array_equal(np.delete(out['fg_mask'], edge, 1),
                                np.delete(image > 128, edge, 1))
  assert out['fg_mask'][:, :edge].all() and not out['fg_mask'][:, edge + 1:].any()
  assert 'segmentation_dir' in repr(test) and 'segmentation_dir' not in repr(
      sources.CubSource(root, 'test'))
  absolute = sources.CubSource(root, 'test', segmentation_dir=str(root / 'segmentations'))
  np.testing.assert_array_equal(absolute[1]['fg_mask'], band)

  wrong_size = write_cub_mask(root, '002.B/d.jpg', band[:, :20])
  with pytest.raises(ValueError, match=f'{wrong_size} is 20x30'):
    test[1]  # pylint: disable=pointless-statement
  missing = root / 'segmentations' / '002.B' / 'd.png'
  missing.unlink()
  with pytest.raises(FileNotFoundError, match=str(missing)):
    test[1]  # pylint: disable=pointless-statement
  (root / 'segmentations' / '001.A' / 'b.png').unlink()  # every mask is checked when built
  with pytest.raises(FileNotFoundError, match=str(root / 'segmentations' / '001.A' / 'b.png')):
    sources.CubSource(root, 'test', segmentation_dir='segmentations')
  with pytest.raises(FileNotFoundError, match=str(root / 'masks')):
    sources.CubSource(root, 'test', segmentation_dir='masks')


# ----------------------------------------------------------------------------
# TFDS ArrayRecord, without TensorFlow
# ----------------------------------------------------------------------------
class IfamTinyTest(tfds.core.GeneratorBasedBuilder):
  """Five JPEGs from a manual folder; written as ArrayRecord by the test."""

  VERSION = tfds.core.Version('1.0.0')
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'written by tests/test_data.py'

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
        'place': tfds.features.ClassLabel(names=['land', 'water']),
    }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, folder):
    for i in range(5):
      yield i, {'image': os.path.join(folder, f'{i}.jpg'), 'label': i % 3, 'place': i % 2}


def prepare_tiny_tfds(tmp_path):
  """Writes `ifam_tiny_test` as ArrayRecord under tmp_path/tfds (image i has value 40 i)."""
  manual = tmp_path / 'manual'
  for i in range(5):
    write_image(manual / f'{i}.jpg', value=40 * i)
  data_dir = tmp_path / 'tfds'
  IfamTinyTest(data_dir=str(data_dir), file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return data_dir


def test_tfds_source_without_tensorflow(tmp_path):
  data_dir = prepare_tiny_tfds(tmp_path)
  src = sources.TfdsSource('ifam_tiny_test', 'train', data_dir, group_key='place')
  assert len(src) == 5 and src.class_names == ['a', 'b', 'c'] and src.num_classes == 3
  assert src.group_names == ['land', 'water']
  seen = set()
  for i in range(len(src)):
    r = src[i]
    assert isinstance(r['image'], bytes) and r['image'][:2] == b'\xff\xd8'  # still encoded
    k = int(round(np.asarray(transforms.decode(r['image'])).mean() / 40))
    assert (r['label'], r['group']) == (k % 3, k % 2)
    seen.add(k)
  assert seen == set(range(5))
  assert len(sources.TfdsSource('ifam_tiny_test', 'train[:40%]', data_dir)) == 2
  assert 'tensorflow' not in sys.modules
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere')):
    sources.TfdsSource('ifam_tiny_test', 'train', tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='not prepared'):
    sources.TfdsSource('ifam_tiny_test', 'train', tmp_path / 'empty')
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.TfdsSource('ifam_tiny_test', 'test', data_dir)
  with pytest.raises(ValueError, match="no feature 'y'"):
    sources.TfdsSource('ifam_tiny_test', 'train', data_dir, label_key='y')


# ----------------------------------------------------------------------------
# Synthetic spurious-correlation source
# ----------------------------------------------------------------------------
def test_synthetic_is_deterministic():
  a = synthetic.SyntheticSpuriousSource(50, 32, 'train', seed=3)
  b = synthetic.SyntheticSpuriousSource(50, 32, 'train', seed=3)
  for i in (0, 7, 49):
    ra, rb = a[i], b[i]
    assert ra.keys() == rb.keys() == {'image', 'label', 'group', 'fg_mask'}
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k])
  assert a[0]['image'].shape == (32, 32, 3) and a[0]['image'].dtype == np.uint8
  assert a[0]['fg_mask'].shape == (32, 32) and a[0]['fg_mask'].dtype == np.uint8
  other_seed = synthetic.SyntheticSpuriousSource(50, 32, 'train', seed=4)
  other_split = synthetic.SyntheticSpuriousSource(50, 32, 'test', seed=3)
  assert not np.array_equal(a[1]['image'], other_seed[1]['image'])
  assert not np.array_equal(a[1]['image'], other_split[1]['image'])
  assert repr(a) == repr(b)
  with pytest.raises(IndexError):
    a[50]


@pytest.mark.parametrize('num_classes', [2, 3])
def test_synthetic_group_statistics(num_classes):
  c = num_classes
  train = synthetic.SyntheticSpuriousSource(1500, 16, 'train', seed=0, num_classes=c)
  groups = np.array([train[i]['group'] for i in range(len(train))])
  labels, backgrounds = groups // c, groups % c
  assert np.bincount(labels).tolist() == [1500 // c] * c  # balanced classes
  assert 0.93 < np.mean(labels == backgrounds) < 0.97  # ~95 % majority groups
  assert set(groups[labels != backgrounds]) == {g for g in range(c * c) if g // c != g % c}
  test = synthetic.SyntheticSpuriousSource(c * c * 10, 16, 'test', seed=0, num_classes=c)
  counts = np.bincount([test[i]['group'] for i in range(len(test))], minlength=c * c)
  assert counts.tolist() == [10] * (c * c)  # every group equally often
  assert train.num_groups == c * c and len(train.group_names) == c * c
  assert train.group_names[1] == 'disc/water'
  np.testing.assert_array_equal(train.groups, groups)  # the records' groups, without drawing
  np.testing.assert_array_equal(test.groups, [test[i]['group'] for i in range(len(test))])


def test_synthetic_fg_mask_covers_the_object():
  src = synthetic.SyntheticSpuriousSource(40, 64, 'val', seed=1, num_classes=4)
  for i in range(len(src)):
    r = src[i]
    image, mask = r['image'].reshape(-1, 3), r['fg_mask'].reshape(-1).astype(bool)
    inside = {tuple(p) for p in image[mask]}
    outside = {tuple(p) for p in image[~mask]}
    assert len(inside) == 1 and len(outside) == 2 and not inside & outside
    area = mask.mean()
    assert 0.02 < area < 0.35, (i, area)
    ys, xs = np.nonzero(r['fg_mask'])
    assert 0 < ys.min() and ys.max() < 63 and 0 < xs.min() and xs.max() < 63  # fully inside


def test_synthetic_palette_and_object_size():
  """cue='texture': colours no longer identify the background type; object_size sets the area."""

  def background_colours(src):
    by_type = {}
    for i in range(len(src)):
      r = src[i]
      outside = r['image'][r['fg_mask'] == 0]
      brightest = tuple(outside[np.argmax(outside.sum(1))] // 40)  # the palette's light tone
      by_type.setdefault(r['group'] % 2, set()).add(brightest)
    return by_type

  own = background_colours(synthetic.SyntheticSpuriousSource(40, 32, 'test', seed=2))
  assert not own[0] & own[1]  # by default each type has its own colours
  shared = background_colours(synthetic.SyntheticSpuriousSource(40, 32, 'test', seed=2,
                                                              cue='texture'))
  assert shared[0] & shared[1]  # with a shared palette both types show the same colours
  small = synthetic.SyntheticSpuriousSource(20, 64, 'test', object_size=(0.1, 0.12))
  large = synthetic.SyntheticSpuriousSource(20, 64, 'test', object_size=(0.3, 0.35))
  assert (np.mean([small[i]['fg_mask'].mean() for i in range(20)]) * 4
          < np.mean([large[i]['fg_mask'].mean() for i in range(20)]))
  with pytest.raises(ValueError, match='object_size'):
    synthetic.SyntheticSpuriousSource(4, 32, object_size=(0.3, 0.6))


# ----------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------
def test_decode_handles_formats():
  buf = io.BytesIO()
  Image.new('L', (5, 4), 77).save(buf, 'PNG')
  cmyk = io.BytesIO()
  Image.new('CMYK', (5, 4), (0, 0, 0, 0)).save(cmyk, 'JPEG')
  rgba = io.BytesIO()
  Image.new('RGBA', (5, 4), (10, 20, 30, 0)).save(rgba, 'PNG')
  cases = [jpeg_bytes(90, (5, 4)), buf.getvalue(), cmyk.getvalue(), rgba.getvalue(),
           np.full((4, 5), 3, np.uint8), np.full((4, 5, 1), 3, np.uint8),
           np.full((4, 5, 3), 3, np.uint8)]
  for case in cases:
    img = transforms.decode(case)
    assert img.mode == 'RGB' and np.asarray(img).shape == (4, 5, 3)
  assert np.asarray(transforms.decode(buf.getvalue())).tolist()[0][0] == [77, 77, 77]
  assert np.asarray(transforms.decode(cmyk.getvalue())).min() > 240  # CMYK 0 ink is white


def encode(array: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt)
  return buf.getvalue()


def test_decode_scales_deep_greyscale_to_8_bits():
  """16-bit PNGs and 32-bit integer or float TIFFs decode as their 8-bit RGB copy, not white."""
  grey = np.tile(np.arange(256, dtype=np.uint8), (3, 1))  # every 8-bit value
  rgb = np.stack([grey] * 3, -1)
  np.testing.assert_array_equal(np.asarray(transforms.decode(encode(rgb, 'PNG'))), rgb)
  cases = [('I;16', grey.astype(np.uint16) * 257, 'PNG'),  # 16-bit range
           ('I', grey.astype(np.int32) * 257, 'TIFF'),
           ('F', grey.astype(np.float32) * 257, 'TIFF'),
           ('F', grey.astype(np.float32) / 255, 'TIFF'),  # floats within [0, 1]
           ('I', grey.astype(np.int32) * 1000 - 70000, 'TIFF'),  # beyond 16 bits: min..max
           ('F', grey.astype(np.float32) * 0.5 - 10, 'TIFF')]
  for mode, array, fmt in cases:
    data = encode(array, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    got = np.asarray(transforms.decode(data)).astype(int)
    assert got.shape == rgb.shape and np.abs(got - rgb).max() <= 1, (mode, array.min())
  nan = grey.astype(np.float32)
  nan[0, 0] = np.nan
  assert transforms.decode(encode(nan, 'TIFF')) is None


def test_corrupt_image_is_marked_invalid_not_raised():
  good = jpeg_bytes(120, (20, 20))
  truncated = good[:len(good) // 2]
  tr = transforms.resize_center_crop(8)
  for bad in (b'not an image at all', truncated, b''):
    out = transforms.process({'image': bad, 'label': 3, 'group': 1}, np.random.default_rng(0), tr)
    assert out['valid'] == 0 and out['label'] == 3 and out['group'] == 1
    assert out['image'].shape == (8, 8, 3) and not out['image'].any()
  out = transforms.process({'image': good, 'label': 3, 'group': 1}, np.random.default_rng(0), tr)
  assert out['valid'] == 1 and out['image'].dtype == np.uint8
  assert {k: v.dtype for k, v in out.items() if k != 'image'} == \
      {'label': np.int32, 'group': np.int32, 'valid': np.int32}


TRANSFORMS = {
    'imagenet_train': transforms.imagenet_train,
    'cub_original_train': transforms.cub_original_train,
    'resize_center_crop': transforms.resize_center_crop,
    'imagenet_eval': transforms.imagenet_eval,
    'siim_acr_train': lambda size: transforms.siim_acr(size, train=True),
    'siim_acr_eval': lambda size: transforms.siim_acr(size, train=False),
}


@pytest.mark.parametrize('name', list(TRANSFORMS))
def test_transform_shapes_and_determinism(name):
  size = 24
  tr = TRANSFORMS[name](size)
  img = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
  mask = np.zeros((37, 53), np.uint8)
  mask[10:25, 20:40] = 1
  record = {'image': img, 'label': 1, 'group': 0, 'fg_mask': mask}
  # Seed 8: the one flip of siim_acr_train differs from seeds 5-7.
  runs = [transforms.process(record, np.random.default_rng(s), tr) for s in (5, 5, 6, 7, 8)]
  for out in runs:
    assert out['image'].shape == (size, size, 3) and out['image'].dtype == np.uint8
    assert out['fg_mask'].shape == (size, size) and out['fg_mask'].dtype == np.uint8
    assert set(np.unique(out['fg_mask'])) <= {0, 1}
  np.testing.assert_array_equal(runs[0]['image'], runs[1]['image'])
  np.testing.assert_array_equal(runs[0]['fg_mask'], runs[1]['fg_mask'])
  random = name.endswith('train')
  differs = any(not np.array_equal(runs[0]['image'], r['image']) for r in runs[2:])
  assert differs == random


def test_cub_original_train_moves_the_mask_with_the_image():
  src = synthetic.SyntheticSpuriousSource(12, 64, 'train', seed=2)
  tr = transforms.cub_original_train(64)
  for i in range(len(src)):
    out = transforms.process(src[i], np.random.default_rng(i), tr)
    inside = {tuple(p) for p in out['image'][out['fg_mask'] == 1]}
    assert len(inside) == 1  # nearest sampling + a per-channel gain: the object stays one colour


def test_eval_resize_and_crop_geometry():
  img = Image.fromarray(np.arange(40 * 20, dtype=np.uint32).reshape(20, 40).astype(np.uint8))
  out, _ = transforms.resize_center_crop(10)(img.convert('RGB'), None, None)
  assert out.size == (10, 10)
  # shorter side 20 -> 10 gives 20x10; the centre crop keeps columns 5..14
  full = img.convert('RGB').resize((20, 10), Image.BILINEAR)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(full)[:, 5:15])
  big = Image.new('RGB', (300, 260))
  assert transforms.imagenet_eval(224)(big, None, None)[0].size == (224, 224)
  assert transforms.imagenet_eval(448)(big, None, None)[0].size == (448, 448)


def test_siim_acr_resizes_as_cv2_and_flips_in_training_only():
  # cv2 INTER_LINEAR, one row: 2 -> 4 samples at half-pixel centres -0.25, 0.25, 0.75, 1.25
  # (clamped at the ends); 4 -> 2 at 0.5 and 2.5, no antialiasing. INTER_NEAREST 3 -> 5 reads
  # floor(i * 3 / 5) = 0, 0, 1, 1, 2.
  up = transforms.resize_like_cv2(np.array([[0, 100]], np.uint8), 1, 4, nearest=False)
  np.testing.assert_array_equal(up, [[0, 25, 75, 100]])
  down = transforms.resize_like_cv2(np.array([[0, 10, 100, 255]] * 2, np.uint8), 1, 2, False)
  np.testing.assert_array_equal(down, [[5, 178]])  # (100 + 255) / 2 = 177.5 rounds to even
  near = transforms.resize_like_cv2(np.array([[7, 8, 9]], np.uint8), 2, 5, nearest=True)
  np.testing.assert_array_equal(near, [[7, 7, 8, 8, 9]] * 2)
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  per_channel = [transforms.resize_like_cv2(rgb[..., c], 3, 4, False) for c in range(3)]
  np.testing.assert_array_equal(transforms.resize_like_cv2(rgb, 3, 4, False),
                                np.stack(per_channel, -1))
  # The whole image is squashed (no crop); the flip moves the mask along, in training only.
  grey = np.zeros((30, 50), np.uint8)
  grey[:, :10] = 200
  mask = (grey > 0).astype(np.uint8)
  record = {'image': grey, 'label': 0, 'group': -1, 'fg_mask': mask}
  flips = []
  for seed in range(16):
    out = transforms.process(record, np.random.default_rng(seed), transforms.siim_acr(10, True))
    left = out['image'][:, :2, 0].min() == 200
    assert (out['image'][..., 0] == 200).sum() == 20 and (out['fg_mask'] == 1).sum() == 20
    np.testing.assert_array_equal(out['fg_mask'] == 1, out['image'][..., 0] == 200)
    flips.append(not left)
  assert 0 < sum(flips) < 16
  out = transforms.process(record, np.random.default_rng(0), transforms.siim_acr(10, False))
  assert (out['image'][:, :2] == 200).all() and not out['image'][:, 2:].any()
  c = config_lib.base_config()
  c.data.augment, c.model.image_size = 'siim_acr', 518
  assert factory.make_transforms(c) == (transforms.siim_acr(518, True),
                                        transforms.siim_acr(518, False))


def test_planckian_jitter_hand_computed():
  image = np.array([[[100, 50, 200], [200, 0, 255]]], np.uint8)
  # blackbody row 0: r/g = 0.6743/0.4029 = 1.6736, b/g = 0.0013/0.4029 = 0.0032
  # 100 * 1.6736 = 167.4 -> 167; 200 * 0.0032 = 0.65 -> 0; 200 * 1.6736 clips at 255
  np.testing.assert_array_equal(transforms.planckian_jitter(image, 0),
                                [[[167, 50, 0], [255, 0, 0]]])
  # row 24: r/g = 0.3503/0.4653 = 0.7528, b/g = 0.6933/0.4653 = 1.4900
  # 100 * 0.7528 = 75.3 -> 75; 200 * 1.49 = 298 clips at 255; 200 * 0.7528 = 150.6 -> 150
  np.testing.assert_array_equal(transforms.planckian_jitter(image, 24),
                                [[[75, 50, 255], [150, 0, 255]]])
  assert transforms.BLACKBODY.shape == (25, 3)


def test_affine_hand_computed():
  a = (np.arange(16).reshape(4, 4) * 10).astype(np.uint8)
  img = Image.fromarray(a)
  # 90 degrees is clockwise on screen about (2, 2): out[y, x] = in[3 - x, y]
  np.testing.assert_array_equal(np.asarray(transforms.affine(img, 90.0, (0, 0), 1.0)),
                                np.rot90(a, -1))
  # translate (+1 right, -1 up): out[y, x] = in[y + 1, x - 1], fill 0
  expected = np.zeros_like(a)
  expected[:3, 1:] = a[1:, :3]
  np.testing.assert_array_equal(np.asarray(transforms.affine(img, 0.0, (1, -1), 1.0)), expected)
  # scale 2 about the centre: output pixel centres 0.5..3.5 map to 1.25, 1.75, 2.25, 2.75
  np.testing.assert_array_equal(np.asarray(transforms.affine(img, 0.0, (0, 0), 2.0)),
                                a[[1, 1, 2, 2]][:, [1, 1, 2, 2]])
  # torchvision's inverse matrix for angle 30, t = (2, -3), scale 1.5 about (5, 4)
  c, s = np.cos(np.pi / 6) / 1.5, np.sin(np.pi / 6) / 1.5
  m = transforms.inverse_affine_matrix((5.0, 4.0), 30.0, (2, -3), 1.5)
  np.testing.assert_allclose(m, [c, s, c * -7 + s * -1 + 5, -s, c, -s * -7 + c * -1 + 4])


def test_rand_augment_ops_are_timm_rand_m6():
  assert len(transforms.RAND_AUGMENT_OPS) == 15 and 'Cutout' not in transforms.RAND_AUGMENT_OPS
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
  mask = Image.fromarray(np.ones((16, 16), np.uint8))
  changed = 0
  for seed in range(40):
    out, m = transforms.rand_augment(img, mask, np.random.default_rng(seed))
    assert out.size == (16, 16) and set(np.unique(np.asarray(m))) <= {0, 1}
    changed += not np.array_equal(np.asarray(out), np.asarray(img))
  assert 15 < changed < 40  # two ops, each applied with probability 0.5


# ----------------------------------------------------------------------------
# Pipeline
# ----------------------------------------------------------------------------
def eval_batches(source, global_batch, process_index=0, process_count=1, num_workers=0):
  ds = pipeline.make_dataset(source, transform=transforms.resize_center_crop(8),
                             global_batch_size=global_batch, seed=0, train=False,
                             process_index=process_index, process_count=process_count,
                             num_workers=num_workers)
  it = iter(ds)
  batches = list(it)
  it.close()
  return batches


def test_eval_padding_sees_every_example_once():
  n, global_batch, procs = 11, 4, 2
  per_process = [eval_batches(IndexSource(n), global_batch, p, procs) for p in range(procs)]
  want = pipeline.num_eval_batches(n, global_batch, procs)
  assert want == 3 and [len(b) for b in per_process] == [want] * procs  # lockstep
  labels = []
  for batches in per_process:
    for b in batches:
      assert b['image'].shape == (2, 8, 8, 3) and b['image'].dtype == np.uint8
      assert {k: b[k].dtype for k in ('label', 'group', 'valid')} == \
          {'label': np.int32, 'group': np.int32, 'valid': np.int32}
      labels += b['label'][b['valid'] == 1].tolist()
      # image content agrees with the label: the record really is example `label`
      np.testing.assert_array_equal(b['image'][b['valid'] == 1][:, 0, 0, 0],
                                    b['label'][b['valid'] == 1])
  assert sorted(labels) == list(range(n))
  single = eval_batches(IndexSource(n), 4)
  assert [int(b['valid'].sum()) for b in single] == [4, 4, 3]
  assert np.concatenate([b['label'] for b in single])[:n].tolist() == list(range(n))


@pytest.mark.slow
def test_eval_with_workers_keeps_static_batches():
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  batches = eval_batches(IndexSource(5), 2, num_workers=2)
  assert [b['label'].shape for b in batches] == [(2,)] * 3  # workers slice whole batches
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.tolist() == [1] * 5 + [0]
  assert np.concatenate([b['label'] for b in batches])[:5].tolist() == list(range(5))


def test_eval_skips_a_corrupt_jpeg(tmp_path):
  root = tmp_path / 'imgs'
  write_image(root / 'a' / '0.jpg', 100, size=(12, 12))
  write_image(root / 'b' / '1.jpg', 150, size=(12, 12))
  (root / 'b' / '2.jpg').write_bytes(jpeg_bytes(0, (12, 12))[:40])  # truncated
  batches = eval_batches(sources.ImageFolderSource(root), 2)
  valid = np.concatenate([b['valid'] for b in batches])
  assert valid.tolist() == [1, 1, 0, 0]  # the corrupt one, then padding
  assert not images_of(batches)[2].any()


def test_an_unreadable_training_image_is_named_and_counted_once(tmp_path, monkeypatch):
  """Over three epochs: one warning naming the file, and one first-pass unreadable record."""
  root = tmp_path / 'imgs'
  for i in range(3):
    write_image(root / 'a' / f'{i}.jpg', 100, size=(12, 12))
  bad = root / 'b' / 'bad.jpg'
  bad.parent.mkdir()
  bad.write_bytes(b'not an image')
  warnings = []
  monkeypatch.setattr(transforms.logging, 'warning',
                      lambda message, *args: warnings.append(message % args))
  it = iter(train_dataset(sources.ImageFolderSource(root), batch=2))
  batches = [next(it) for _ in range(6)]  # 3 epochs of 2 batches
  valid, first = (np.concatenate([b[k] for b in batches]) for k in ('valid', 'first_pass'))
  assert (valid == 0).sum() == 3  # skipped in every epoch
  assert first.tolist() == [1] * 4 + [0] * 8
  assert ((valid == 0) & (first == 1)).sum() == 1  # what the train state counts
  assert len(warnings) == 1 and str(bad) in warnings[0] and 'BytesIO' not in warnings[0]


def train_dataset(source, seed=0, batch=4, size=16, **kw):
  return pipeline.make_dataset(source, transform=transforms.cub_original_train(size),
                               global_batch_size=batch, seed=seed, train=True, **kw)


def test_train_batches_epochs_and_determinism():
  src = synthetic.SyntheticSpuriousSource(6, 16, 'train', seed=0)
  it = iter(train_dataset(src, batch=2))
  batches = [next(it) for _ in range(9)]  # 3 epochs of 3 batches
  b = batches[0]
  assert b['image'].shape == (2, 16, 16, 3) and b['fg_mask'].shape == (2, 16, 16)
  assert b['image'].dtype == np.uint8 and b['fg_mask'].dtype == np.uint8
  assert b['valid'].tolist() == [1, 1]
  # each epoch holds every example once, in a new order, with new augmentations
  masks_per_epoch = [np.concatenate([x['fg_mask'] for x in batches[e * 3:e * 3 + 3]])
                     for e in range(3)]
  orders = [np.concatenate([x['label'] for x in batches[e * 3:e * 3 + 3]]) for e in range(3)]
  assert all(sorted(o.tolist()) == [0, 0, 0, 1, 1, 1] for o in orders)
  assert not np.array_equal(masks_per_epoch[0], masks_per_epoch[1])
  again = iter(train_dataset(src, batch=2))
  for want in batches:
    np.testing.assert_array_equal(next(again)['image'], want['image'])
  other = next(iter(train_dataset(src, batch=2, seed=1)))
  assert not np.array_equal(other['image'], b['image'])


def test_train_shards_are_disjoint():
  src = IndexSource(10)
  seen = []
  for p in range(2):
    ds = pipeline.make_dataset(src, transform=transforms.resize_center_crop(8),
                               global_batch_size=4, seed=0, train=True, num_epochs=1,
                               process_index=p, process_count=2)
    labels = np.concatenate([b['label'] for b in ds]).tolist()
    assert len(labels) == 4  # 5 per shard, batch 2, remainder dropped
    assert {x % 2 for x in labels} == {p}
    seen += labels
  assert len(set(seen)) == 8


def test_batch_and_patch_size_checks():
  with pytest.raises(ValueError, match='does not divide evenly over 3 processes'):
    train_dataset(IndexSource(10), batch=4, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='is empty'):
    train_dataset(IndexSource(0))
  with pytest.raises(ValueError, match='image size 63 is not a positive multiple of the patch '
                     'size 8'):
    pipeline.check_image_size(63, 8)
  pipeline.check_image_size(64, 8)


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('num_workers', [0, pytest.param(2, marks=pytest.mark.slow)])
def test_checkpoint_state_restores_the_next_batches(num_workers):
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  src = synthetic.SyntheticSpuriousSource(10, 16, 'train', seed=0)
  ds = train_dataset(src, batch=2, num_workers=num_workers)
  it = iter(ds)
  for _ in range(4):
    next(it)
  state = it.get_state()
  following = [next(it) for _ in range(5)]
  fresh = iter(train_dataset(src, batch=2, num_workers=num_workers))
  fresh.set_state(state)
  assert_same_batches([next(fresh) for _ in range(5)], following)
  it.close()
  fresh.close()
  serial = iter(train_dataset(src, batch=2))  # workers slice whole batches: same stream
  assert_same_batches([next(serial) for _ in range(9)][4:], following)


def test_global_batch_and_normalize():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  batch = eval_batches(IndexSource(4), 4)[0]
  arrays = pipeline.global_batch(batch, sharding)
  assert arrays['image'].shape == (4, 8, 8, 3) and arrays['label'].dtype == np.int32
  x = pipeline.normalize(arrays['image'])
  want = (batch['image'] / 255.0 - np.array(pipeline.IMAGENET_MEAN)) / np.array(
      pipeline.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-6)
  assert x.dtype == np.float32
