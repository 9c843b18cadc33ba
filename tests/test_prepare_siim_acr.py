"""SIIM-ACR end to end on a fake release: the preparation's layout and masks, then SiimAcrSource.

The release is built here: 1024 x 1024 DICOMs written with pydicom (pixel values known), a
train-rle.csv whose masks are rectangles at known rows and columns (one image with two rows),
encoded by the competition's rule, and a tube pickle covering the four (label, tube) pairs.
"""

import io
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from ifam_jax import factory
from ifam_jax.data import prepare_siim_acr, siim_acr, transforms
from ifam_jax.evaluators import metrics
from ifam_jax.models import vit
from test_configs import get_config

pydicom = pytest.importorskip('pydicom')

SIZE = prepare_siim_acr.MASK_SIZE
# id: (label, chest tube or None for a training image, rectangles (top, bottom, left, right))
IMAGES = {
    'p_multi': (1, 0, [(100, 180, 600, 700), (700, 720, 40, 300)]),
    'p_tube': (1, 1, [(5, 9, 1000, 1024)]),
    'n_tube': (0, 1, []),
    'n_notube': (0, 0, []),
    't_pos': (1, None, [(0, 1024, 0, 1)]),  # the whole first column: one run
    't_neg1': (0, None, []),
    't_neg2': (0, None, []),
}
SIXTEEN_BIT = 't_neg2'  # stored with 16 bits, values above 255: cast, not rescaled
JPEG = 'n_notube'  # JPEG Baseline, as the release stores its DICOMs: decoded by Pillow


# ----------------------------------------------------------------------------
# The fake release
# ----------------------------------------------------------------------------
def pixels(k: int) -> np.ndarray:
  y, x = np.mgrid[:SIZE, :SIZE]
  values = y + 2 * x + 17 * k
  return values.astype(np.uint16) if k == len(IMAGES) - 1 else (values % 256).astype(np.uint8)


def jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def stored_pixels(image_id: str) -> np.ndarray:
  """What the DICOM of `image_id` decodes to."""
  array = pixels(list(IMAGES).index(image_id))
  return np.asarray(Image.open(io.BytesIO(jpeg(array)))) if image_id == JPEG else array


def write_dicom(path: pathlib.Path, array: np.ndarray, compress: bool = False) -> None:
  ds = pydicom.Dataset()
  ds.file_meta = pydicom.dataset.FileMetaDataset()
  ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.7'
  ds.SOPInstanceUID = pydicom.uid.generate_uid()
  if compress:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds.Rows, ds.Columns = array.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, 'MONOCHROME2'
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pydicom.encaps.encapsulate([jpeg(array)])
    ds['PixelData'].VR = 'OB'
  else:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.set_pixel_data(array, photometric_interpretation='MONOCHROME2',
                      bits_stored=array.dtype.itemsize * 8)
  path.parent.mkdir(parents=True, exist_ok=True)
  ds.save_as(path, enforce_file_format=True)


def rectangle(top, bottom, left, right) -> np.ndarray:
  mask = np.zeros((SIZE, SIZE), bool)
  mask[top:bottom, left:right] = True
  return mask


def encode(mask: np.ndarray) -> str:
  """The competition's encoding: pixels numbered down each column, then across; each start
  counted from the end of the previous run."""
  flat = np.concatenate([[False], mask.T.reshape(-1), [False]])
  edges = np.flatnonzero(flat[1:] != flat[:-1])
  starts, ends = edges[0::2], edges[1::2]
  relative = starts - np.concatenate([[0], ends[:-1]])
  return ' '.join(f'{s} {e - b}' for s, b, e in zip(relative, starts, ends))


def expected_mask(image_id: str) -> np.ndarray:
  mask = np.zeros((SIZE, SIZE), bool)
  for box in IMAGES[image_id][2]:
    mask |= rectangle(*box)
  return mask


def make_release(root: pathlib.Path) -> pathlib.Path:
  """root/{train-rle.csv, dicom-images-train/...}; returns the tube pickle's path."""
  lines = ['ImageId, EncodedPixels']
  for k, (image_id, (label, _, boxes)) in enumerate(IMAGES.items()):
    write_dicom(root / 'dicom-images-train' / f'study{k}' / f'series{k}' / f'{image_id}.dcm',
                pixels(k), compress=image_id == JPEG)
    rows = [encode(rectangle(*box)) for box in boxes] if label else ['-1']
    lines += [f'{image_id}, {row}' for row in rows]  # the release's ', ' separator
  write_dicom(root / 'dicom-images-train' / 'study9' / 'series9' / 'unlabelled.dcm', pixels(0))
  (root / 'train-rle.csv').write_text('\n'.join(lines) + '\n')
  tubes = {i: np.int64(t) for i, (_, t, _) in IMAGES.items() if t is not None}
  tubes['not_in_release'] = 1
  path = root / 'cxr_tube_dict.pkl'
  path.write_bytes(pickle.dumps(tubes))
  return path


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp('siim')
  return root, make_release(root)


@pytest.fixture(scope='module')
def prepared(release, tmp_path_factory):
  root, tubes = release
  out = tmp_path_factory.mktemp('siim_out')
  counts = prepare_siim_acr.prepare(root, tubes, out)
  return out, counts


def layout(out: pathlib.Path) -> set[str]:
  return {str(p.relative_to(out)) for d in prepare_siim_acr.SPLIT_DIRS if (out / d).is_dir()
          for p in (out / d).rglob('*') if not p.is_dir()}


EXPECTED_LAYOUT = {
    'train_set/1/t_pos.dcm', 'train_set/0/t_neg1.dcm', 'train_set/0/t_neg2.dcm',
    'full_test_set/1/p_multi.dcm', 'full_test_set/1/p_tube.dcm', 'full_test_set/0/n_tube.dcm',
    'full_test_set/0/n_notube.dcm',
    'robust_test_set/1/p_multi.dcm', 'robust_test_set/0/n_tube.dcm',  # positive w/o, negative w/
    'non_robust_test_set/1/p_tube.dcm', 'non_robust_test_set/0/n_notube.dcm',
}


# ----------------------------------------------------------------------------
# The encoding
# ----------------------------------------------------------------------------
def test_rle_decode_by_hand():
  # 4 rows x 3 columns; runs at pixels 1-2 and 6 (down the columns): (1, 0), (2, 0), (2, 1).
  want = np.zeros((4, 3), np.uint8)
  want[1, 0] = want[2, 0] = want[2, 1] = 255
  np.testing.assert_array_equal(prepare_siim_acr.rle_decode('1 2 3 1', 4, 3), want)
  np.testing.assert_array_equal(prepare_siim_acr.rle_decode(' -1', 4, 3), 0 * want)
  box = rectangle(100, 180, 600, 700)
  np.testing.assert_array_equal(prepare_siim_acr.rle_decode(encode(box)), 255 * box)


@pytest.mark.parametrize('rle, message', [('1 2 3', 'pairs'), ('4 -1', 'pairs'),
                                           ('1 x', 'not a list of integers'),
                                           ('10 3', r'end at pixel 13, past the 4x3 image')])
def test_rle_decode_rejects(rle, message):
  with pytest.raises(ValueError, match=message):
    prepare_siim_acr.rle_decode(rle, 4, 3, where='here')


# ----------------------------------------------------------------------------
# The preparation
# ----------------------------------------------------------------------------
def test_prepare_writes_the_reference_layout(release, prepared):
  root, _ = release
  out, counts = prepared
  assert layout(out) == EXPECTED_LAYOUT
  source = root / 'dicom-images-train' / 'study4' / 'series4' / 't_pos.dcm'
  assert os.path.samefile(out / 'train_set' / '1' / 't_pos.dcm', source)  # hard links
  assert counts == {'full_test_set/0': 2, 'full_test_set/1': 2, 'non_robust_test_set/0': 1,
                    'non_robust_test_set/1': 1, 'robust_test_set/0': 1, 'robust_test_set/1': 1,
                    'train_set/0': 2, 'train_set/1': 1, 'unmatched tube labels': 1}
  assert sorted(os.listdir(out / 'all_masks')) == sorted(f'{i}.png' for i in IMAGES)
  for image_id in IMAGES:
    mask = np.asarray(Image.open(out / 'all_masks' / f'{image_id}.png'))
    assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask, 255 * expected_mask(image_id), err_msg=image_id)
  assert expected_mask('p_multi').sum() == 80 * 100 + 20 * 260  # both rows drawn


def test_prepare_resumes_and_refuses_foreign_files(release, tmp_path):
  root, tubes = release
  out = tmp_path / 'out'
  prepare_siim_acr.prepare(root, tubes, out, link='symlink')
  link = out / 'full_test_set' / '0' / 'n_tube.dcm'
  assert link.is_symlink() and os.path.isabs(os.readlink(link))
  mask = out / 'all_masks' / 'p_multi.png'
  stamp = mask.stat().st_mtime_ns
  mask.with_name('p_tube.png.tmp').write_bytes(b'half')  # an interrupted run's leftover
  (out / 'train_set' / '0' / 't_neg1.dcm').unlink()
  prepare_siim_acr.prepare(root, tubes, out, link='symlink')
  assert layout(out) == EXPECTED_LAYOUT and mask.stat().st_mtime_ns == stamp
  assert not mask.with_name('p_tube.png.tmp').exists()
  (out / 'train_set' / '1' / 'other.dcm').write_bytes(b'x')
  with pytest.raises(FileExistsError, match=r'1 file\(s\) .*other.dcm.*--overwrite'):
    prepare_siim_acr.prepare(root, tubes, out, link='copy')
  prepare_siim_acr.prepare(root, tubes, out, link='copy', overwrite=True)
  copied = out / 'train_set' / '1' / 't_pos.dcm'
  assert layout(out) == EXPECTED_LAYOUT and not copied.is_symlink()
  assert copied.read_bytes() == next(root.glob('*/*/*/t_pos.dcm')).read_bytes()


def test_prepare_checks_every_input_before_writing(release, tmp_path):
  root, tubes = release
  out = tmp_path / 'out'
  with pytest.raises(FileNotFoundError, match=r'SIIM-ACR release folder .*no_release does not'):
    prepare_siim_acr.prepare(tmp_path / 'no_release', tubes, out)
  tmp_path.joinpath('no_release').mkdir()
  with pytest.raises(FileNotFoundError, match=r'SIIM-ACR labels .*no_release/train-rle.csv'):
    prepare_siim_acr.prepare(tmp_path / 'no_release', tubes, out)
  with pytest.raises(FileNotFoundError, match=r'tube labels \(cxr_tube_dict.pkl\) .*nope.pkl'):
    prepare_siim_acr.prepare(root, tmp_path / 'nope.pkl', out)
  evil = tmp_path / 'evil.pkl'
  evil.write_bytes(b'cos\nsystem\n(S"true"\ntR.')  # would call os.system
  with pytest.raises(ValueError, match='refusing to unpickle global os.system'):
    prepare_siim_acr.prepare(root, evil, out)
  broken = tmp_path / 'broken'
  (broken / 'dicom-images-train').mkdir(parents=True)
  csv_text = (root / 'train-rle.csv').read_text()
  (broken / 'train-rle.csv').write_text(csv_text)
  with pytest.raises(FileNotFoundError, match=r'7 of 7 ids .* have no DICOM .*--skip_missing'):
    prepare_siim_acr.prepare(broken, tubes, out)
  (broken / 'train-rle.csv').write_text(csv_text + 'p_tube, 1048570 10\n')
  with pytest.raises(ValueError, match='ImageId p_tube: the runs end at pixel 1048580'):
    prepare_siim_acr.prepare(broken, tubes, out)
  assert not out.exists()
  with pytest.raises(ValueError, match="--link must be one of"):
    prepare_siim_acr.prepare(root, tubes, out, link='soft')


# ----------------------------------------------------------------------------
# Reading it back
# ----------------------------------------------------------------------------
def test_siim_source_reads_the_prepared_layout(prepared):
  out, _ = prepared
  spec = dict(source='siim_acr', root=str(out))
  train = factory.make_source(dict(spec, split='train'))
  assert isinstance(train, siim_acr.SiimAcrSource) and len(train) == 3
  assert train.class_names == ['no pneumothorax', 'pneumothorax'] and train.num_groups == 0
  assert list(train.labels) == [0, 0, 1] and set(train.groups) == {-1}
  tube_group = lambda i: 2 * IMAGES[i][0] + IMAGES[i][1]
  for split, ids in (('full_test', ['n_notube', 'n_tube', 'p_multi', 'p_tube']),
                     ('robust_test', ['n_tube', 'p_multi']),
                     ('non_robust_test', ['n_notube', 'p_tube'])):
    src = factory.make_source(dict(spec, split=split))
    assert [pathlib.Path(p).stem for p in src.paths] == ids
    assert list(src.labels) == [IMAGES[i][0] for i in ids]
    assert list(src.groups) == [tube_group(i) for i in ids]
    assert src.group_names == ['no pneumothorax/no tube', 'no pneumothorax/tube',
                               'pneumothorax/no tube', 'pneumothorax/tube']
    assert metrics.minority_groups(src) == (1, 2) and metrics.mask_labels(src) == (1,)
    assert src.spurious_attribute == 'chest tube'
  robust = factory.make_source(dict(spec, split='robust_test'))
  assert set(robust.groups) == set(metrics.minority_groups(robust))
  for src in (train, factory.make_source(dict(spec, split='full_test'))):
    for i in range(len(src)):
      record = src[i]
      image_id = pathlib.Path(record['path']).stem
      want = stored_pixels(image_id).astype(np.int64) % 256
      np.testing.assert_array_equal(record['image'], want.astype(np.uint8), err_msg=image_id)
      np.testing.assert_array_equal(record['fg_mask'], expected_mask(image_id))
  assert stored_pixels(SIXTEEN_BIT).max() > 255  # so the cast above wrapped values
  assert not np.array_equal(stored_pixels(JPEG), pixels(list(IMAGES).index(JPEG)))  # lossy
  transform = transforms.siim_acr(28, train=False)
  processed = transforms.process(train[2], np.random.default_rng(0), transform)
  image = processed['image']
  assert image.shape == (28, 28, 3) and (image == image[..., :1]).all()  # grey -> RGB
  assert processed['fg_mask'][:, 0].all() and not processed['fg_mask'][:, 1:].any()


def test_siim_source_reads_png_and_names_problems(tmp_path):
  root = tmp_path / 'siim'
  for split, label, name in (('train', 0, 'a'), ('train', 1, 'b'), ('full_test', 1, 'b'),
                             ('robust_test', 1, 'b')):
    (root / f'{split}_set' / str(label)).mkdir(parents=True, exist_ok=True)
    Image.new('L', (8, 6), 40 * label).save(root / f'{split}_set' / str(label) / f'{name}.png')
  with pytest.raises(FileNotFoundError, match='SIIM-ACR mask folder'):
    siim_acr.SiimAcrSource(root, 'train')
  (root / 'all_masks').mkdir()
  Image.new('L', (8, 6), 0).save(root / 'all_masks' / 'a.png')
  with pytest.raises(FileNotFoundError, match=r'1 of 2 listed masks .*b.png'):
    siim_acr.SiimAcrSource(root, 'train')
  Image.new('L', (8, 6), 255).save(root / 'all_masks' / 'b.png')
  src = siim_acr.SiimAcrSource(root, 'train')
  assert isinstance(src[1]['image'], bytes) and src[1]['fg_mask'].all()
  assert list(siim_acr.SiimAcrSource(root, 'train', masks=False)[0]) == [
      'image', 'label', 'group', 'path']
  with pytest.raises(FileNotFoundError, match='non_robust_test_set'):
    siim_acr.SiimAcrSource(root, 'full_test')  # its tubes come from the two subsets
  (root / 'non_robust_test_set' / '1').mkdir(parents=True)
  Image.new('L', (8, 6), 0).save(root / 'non_robust_test_set' / '1' / 'b.png')
  with pytest.raises(ValueError, match=r'b.png: .* it is in robust_test and non_robust_test'):
    siim_acr.SiimAcrSource(root, 'full_test')
  with pytest.raises(ValueError, match="SIIM-ACR split must be one of"):
    siim_acr.SiimAcrSource(root, 'test')
  (root / 'train_set' / 'maybe').mkdir()
  with pytest.raises(ValueError, match=r"holds folders \['maybe'\]"):
    siim_acr.SiimAcrSource(root, 'train')


def test_the_recipe_normalises_with_the_cxr_statistics(tmp_path):
  c = get_config('siim_acr', f'runlocal,root={tmp_path}')
  model = factory.abstract_model(c.model, 2)
  assert vit.pixel_stats(model) == {'mean': (0.48865,) * 3, 'std': (0.24621,) * 3}
  c.model.pixel_std = (0.2, 0.0, 0.2)
  with pytest.raises(ValueError, match='pixel_std must be 3 numbers'):
    factory.abstract_model(c.model, 2)


@pytest.mark.slow
def test_tiny_recipe_trains_and_reports_the_papers_aucs(prepared, tmp_path, monkeypatch):
  """Two steps of `configs/siim_acr.py:tiny` from the prepared DICOMs, then the final eval:
  every split's AUROC and worst-group AUROC are scikit-learn's on the logits it scored, and
  full_test's worst-group AUROC is robust_test's AUROC (the same images)."""
  roc_auc_score = pytest.importorskip('sklearn.metrics').roc_auc_score
  from ifam_jax import train  # pylint: disable=import-outside-toplevel
  from test_configs import tiny  # pylint: disable=import-outside-toplevel
  out, _ = prepared
  c = tiny(get_config('siim_acr', f'tiny,root={out}'))
  c.max_steps = 2
  scored = []
  summarize = metrics.summarize_predictions

  def capture(outputs, **kwargs):
    scored.append((outputs, summarize(outputs, **kwargs)))
    return scored[-1][1]

  monkeypatch.setattr(metrics, 'summarize_predictions', capture)
  result = train.train_and_evaluate(c, str(tmp_path / 'workdir'))
  evals = result['evals']
  assert sorted(evals) == ['full_test', 'non_robust_test', 'robust_test']
  assert [m['num_examples'] for _, m in scored] == [evals[n]['num_examples'] for n in evals]
  for outputs, m in scored:
    keep = outputs['valid'] > 0
    y, g = outputs['label'][keep], outputs['group'][keep]
    for stage, logits in ((m, outputs['logits']), (m['stage1'], outputs['logits1'])):
      z = logits[keep].astype(np.float64)
      prob = np.exp(z[:, 1]) / np.exp(z).sum(-1)
      assert stage['auroc'] == pytest.approx(roc_auc_score(y, prob), abs=1e-9)
      robust = np.isin(g, (1, 2))
      if len(set(y[robust])) == 2:
        assert stage['worst_group_auroc'] == pytest.approx(roc_auc_score(y[robust], prob[robust]),
                                                           abs=1e-9)
  assert evals['full_test']['worst_group_auroc'] == pytest.approx(evals['robust_test']['auroc'])
  assert 'fg_iou' in evals['full_test']
