"""`--mode predict` on a tiny workdir of randomly initialised, saved parameters: one row per image
file found, checked against the model's own dense forward on the same preprocessed images."""

import copy
import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from flax import nnx
from PIL import Image

from ifam_jax import data as data_lib
from ifam_jax import config_lib, factory, optim
from ifam_jax import predict_images as pi
from ifam_jax import workdir as workdir_lib
from ifam_jax.models.ifam import Intervention
from test_configs import xla_cache  # noqa: F401  (a fixture)
from test_evaluate import NUM_PARTS, tiny_config

CLASSES = ['cat', 'dog']
# The files of the image folder, relative to it, and what predict must make of them.
GOOD = ['a.png', 'b.jpg', 'p.png', 'sub/a.png', 'sub/deep/c.png']
BAD = ['corrupt.jpg', 'dangling.png', 'empty.png', 'notes.jpg']


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------
def save_random_run(workdir, config):
  """A run's workdir without training: config.json and params/final of a fresh model."""
  model = factory.build_model(config.model, len(CLASSES), nnx.Rngs(config.seed))
  _, params, frozen, _ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  workdir_lib.save_params(workdir, 'final', params, frozen,
                          {'num_classes': len(CLASSES), 'class_names': CLASSES, 'step': 0})
  (workdir / 'config.json').write_text(workdir_lib.config_as_json(config))


def write_folder(root):
  """Images of several sizes and modes, nested, plus unreadable files and one ignored .txt."""
  rng = np.random.default_rng(0)
  noise = lambda h, w, c: rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)
  (root / 'sub' / 'deep').mkdir(parents=True)
  Image.fromarray(noise(56, 56, 3)).save(root / 'a.png')
  Image.fromarray(noise(80, 120, 3)).save(root / 'b.jpg', quality=95)
  Image.fromarray(noise(70, 30, 3)).convert('P').save(root / 'p.png')
  Image.fromarray(noise(30, 70, 0), 'L').save(root / 'sub' / 'a.png')
  Image.fromarray(noise(64, 64, 4), 'RGBA').save(root / 'sub' / 'deep' / 'c.png')
  jpeg = io.BytesIO()
  Image.fromarray(noise(64, 64, 3)).save(jpeg, 'JPEG')
  (root / 'corrupt.jpg').write_bytes(jpeg.getvalue()[:200])
  (root / 'notes.jpg').write_text('not an image\n')
  (root / 'empty.png').write_bytes(b'')
  (root / 'readme.txt').write_text('ignored: not an image extension\n')
  os.symlink(root / 'gone.png', root / 'dangling.png')


@pytest.fixture(scope='module')
def run(tmp_path_factory, xla_cache):  # pylint: disable=redefined-outer-name,unused-argument
  """(config, workdir, image folder) of a 2-part iFAM at 56 px (4 x 4 patches)."""
  workdir = tmp_path_factory.mktemp('workdir')
  config = tiny_config()
  save_random_run(workdir, config)
  folder = tmp_path_factory.mktemp('images')
  write_folder(folder)
  return config, workdir, folder


@pytest.fixture(scope='module')
def predicted(run):  # pylint: disable=redefined-outer-name
  """The JSONL rows, with masks, removing part 0 (masks of a few patches: the token gather then
  runs below full capacity), and the gather capacities stage 2 was compiled for."""
  config, workdir, folder = run
  gather, capacities = pi.fast_attention.gather_patches, []

  def spy(patch_mask, num_keep):
    capacities.append(num_keep)
    return gather(patch_mask, num_keep)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pi.fast_attention, 'gather_patches', spy)
    rows = pi.run_predict(config, workdir, str(folder), save_masks=True, removed_parts=(0,))
  return rows, capacities


def reference(config, workdir, folder, intervention):
  """The model's own dense forward (no gather) on the pipeline's preprocessing of GOOD."""
  model = factory.load_model(config, workdir)
  transform = factory.make_transforms(config)[1]
  records = [{'image': (folder / name).read_bytes(), 'label': 0, 'group': -1} for name in GOOD]
  images = np.stack([data_lib.transforms.process(r, np.random.default_rng(0), transform)['image']
                     for r in records])

  @jax.jit
  def forward(images):
    out = model(data_lib.normalize(images), train=False, intervention=intervention)
    return {'probs': jax.nn.softmax(out.logits), 'probs1': jax.nn.softmax(out.stage1_logits),
            'fg_mask': out.fg_mask}

  return jax.device_get(forward(images))


# ----------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------
def test_one_row_per_image_file_and_the_unreadable_listed(run, predicted):
  _, workdir, folder = run
  rows, _ = predicted
  assert sorted(os.path.relpath(r['path'], folder) for r in rows) == sorted(GOOD + BAD)
  errors = {os.path.relpath(r['path'], folder): r['error'] for r in rows if 'error' in r}
  assert sorted(errors) == sorted(BAD)
  assert errors['empty.png'] == 'empty file'
  assert 'FileNotFoundError' in errors['dangling.png']
  assert errors['notes.jpg'].startswith('not a decodable image: UnidentifiedImageError')
  assert 'BytesIO' not in errors['notes.jpg']
  written = [json.loads(line) for line in
             (workdir / 'predict' / 'final' / 'predictions.jsonl').read_text().splitlines()]
  assert written == rows


def test_probabilities_are_the_models_own(run, predicted):
  config, workdir, folder = run
  rows, _ = predicted
  ref = reference(config, workdir, folder, Intervention(remove_parts=(0,)))
  by_name = {os.path.relpath(r['path'], folder): r for r in rows}
  kept = []
  for i, name in enumerate(GOOD):
    row = by_name[name]
    for key, probs in (('top_k', ref['probs'][i]), ('stage1_top_k', ref['probs1'][i])):
      order = np.argsort(-np.asarray(probs))
      assert [e['index'] for e in row[key]] == list(order)  # k = 5 > 2 classes: all of them
      assert [e['class'] for e in row[key]] == [CLASSES[j] for j in order]
      np.testing.assert_allclose([e['prob'] for e in row[key]], np.asarray(probs)[order],
                                 atol=1e-5)
    mask = np.asarray(ref['fg_mask'][i])
    assert row['kept_fraction'] == pytest.approx(mask.mean())
    assert row['empty_mask'] == (mask.sum() == 0)
    kept.append(row['kept_fraction'])
  # Stage 2 ran at the smallest capacity (tiers 0.25, 0.5 of 16 patches, or all) that holds the
  # readable images of each batch of 4: the files in the order found, of which GOOD are readable.
  found = [os.path.relpath(r['path'], folder) for r in rows]
  counts = [round(16 * by_name[name]['kept_fraction']) if name in GOOD else 0 for name in found]
  expected = {next(c for c in (4, 8, 16) if c >= max(counts[i:i + 4]))
              for i in range(0, len(found), 4)}
  assert sorted(set(predicted[1])) == sorted(expected) and 16 not in expected, kept


def test_mask_pngs(run, predicted):
  config, _, folder = run
  rows, _ = predicted
  good = [r for r in rows if 'error' not in r]
  names = {r['mask_png'] for r in good} | {r['parts_png'] for r in good}
  assert len(names) == 2 * len(GOOD)  # a.png and sub/a.png apart
  for row in good:
    with Image.open(row['mask_png']) as mask, Image.open(row['parts_png']) as parts:
      size = (config.model.image_size,) * 2
      assert mask.size == parts.size == size and parts.mode == 'RGB'
      assert np.mean(np.asarray(mask) > 0) == pytest.approx(row['kept_fraction'])
      assert set(np.unique(np.asarray(mask))) <= {0, 255}
  assert good[0]['mask_png'].endswith(os.path.join('masks', 'a.png.mask.png'))


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_csv_holds_the_jsonl_rows(predicted, tmp_path):
  rows, _ = predicted
  path = tmp_path / 'p.csv'
  pi.write_rows(rows, epath.Path(path), pi.csv_fields(2, True, True, True))
  table = read_csv(path)
  assert [t['path'] for t in table] == [r['path'] for r in rows]
  for t, r in zip(table, rows):
    if 'error' in r:
      assert t['error'] == r['error'] and t['class_1'] == '' and t['mask_png'] == ''
      continue
    assert t['error'] == ''
    for prefix, key in (('', 'top_k'), ('stage1_', 'stage1_top_k')):
      assert [t[f'{prefix}class_{i}'] for i in (1, 2)] == [e['class'] for e in r[key]]
      np.testing.assert_allclose([float(t[f'{prefix}prob_{i}']) for i in (1, 2)],
                                 [e['prob'] for e in r[key]])
    assert float(t['kept_fraction']) == pytest.approx(r['kept_fraction'])
    assert t['empty_mask'] == str(r['empty_mask']) and t['mask_png'] == r['mask_png']


def test_removing_every_part_empties_the_mask(run, tmp_path):
  """Also: --output .csv, and --top_k 1 of 2 classes."""
  config, workdir, folder = run
  path = tmp_path / 'e.csv'
  rows = pi.run_predict(config, workdir, str(folder / 'sub'), top_k=1, output=str(path),
                        removed_parts=tuple(range(NUM_PARTS)))
  assert len(rows) == 2
  assert all(r['empty_mask'] and r['kept_fraction'] == 0 and len(r['top_k']) == 1 for r in rows)
  table = read_csv(path)
  assert [t['path'] for t in table] == [str(folder / 'sub' / 'a.png'),
                                        str(folder / 'sub' / 'deep' / 'c.png')]
  assert all(t['empty_mask'] == 'True' and float(t['kept_fraction']) == 0 for t in table)
  assert 'class_2' not in table[0] and 'mask_png' not in table[0]


@pytest.mark.slow
def test_thresholds_apply_as_in_eval(run, tmp_path):
  """eval.thresholds reach predict: part 1 rejected everywhere (distance 0), part 0 kept."""
  config, workdir, folder = run
  path = tmp_path / 'thresholds.json'
  path.write_text(json.dumps({'rule': 'distance', 'thresholds': [None, 0.0]}))
  config = copy.deepcopy(config)
  config.eval.thresholds = str(path)
  rows = pi.run_predict(config, workdir, str(folder), output=str(tmp_path / 't.jsonl'))
  ref = reference(config, workdir, folder,
                  Intervention(thresholds=(np.inf, 0.0), threshold_rule='distance'))
  by_name = {os.path.relpath(r['path'], folder): r for r in rows}
  for i, name in enumerate(GOOD):
    np.testing.assert_allclose([e['prob'] for e in sorted(by_name[name]['top_k'],
                                                          key=lambda e: e['index'])],
                               ref['probs'][i], atol=1e-5)
    assert by_name[name]['kept_fraction'] == pytest.approx(np.mean(ref['fg_mask'][i]))


@pytest.mark.slow
def test_exif_orientation_is_not_applied_as_in_training(run, tmp_path):
  """The data pipeline decodes the stored pixels; an EXIF rotation tag changes nothing."""
  config, workdir, folder = run
  pixels = np.asarray(Image.open(folder / 'b.jpg'))
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
  Image.fromarray(pixels).save(tmp_path / 'plain.jpg', quality=95)
  Image.fromarray(pixels).save(tmp_path / 'tagged.jpg', quality=95, exif=exif)
  with Image.open(tmp_path / 'tagged.jpg') as tagged:
    assert tagged.getexif()[0x0112] == 6
  rows = pi.run_predict(config, workdir, str(tmp_path / '*.jpg'), output=str(tmp_path / 'x.jsonl'))
  assert [os.path.basename(r['path']) for r in rows] == ['plain.jpg', 'tagged.jpg']
  assert rows[0]['top_k'] == rows[1]['top_k']


@pytest.mark.slow
def test_a_model_without_stage_1(tmp_path, run):
  _, _, folder = run
  config = tiny_config()
  config_lib.use_baseline(config)
  save_random_run(tmp_path, config)
  rows = pi.run_predict(config, tmp_path, str(folder / 'a.png'), top_k=1)
  assert len(rows) == 1 and set(rows[0]) == {'path', 'top_k'}


# ----------------------------------------------------------------------------
# Finding images, before any model
# ----------------------------------------------------------------------------
def test_find_images(tmp_path, run):
  _, _, folder = run
  assert pi.find_images(str(folder / 'sub')) == [str(folder / 'sub' / 'a.png'),
                                                 str(folder / 'sub' / 'deep' / 'c.png')]
  assert pi.find_images(str(folder / '*.jpg')) == [str(folder / n)
                                                   for n in ('b.jpg', 'corrupt.jpg', 'notes.jpg')]
  assert pi.find_images(str(folder / '**' / 'c.png')) == [str(folder / 'sub' / 'deep' / 'c.png')]
  with pytest.raises(FileNotFoundError, match='nowhere'):
    pi.find_images(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty_dir').mkdir()
  (tmp_path / 'empty_dir' / 'x.txt').write_text('')
  with pytest.raises(ValueError, match='no image files'):
    pi.find_images(str(tmp_path / 'empty_dir'))
  with pytest.raises(ValueError, match='no image files'):
    pi.find_images(str(tmp_path / '*.png'))
  # before the model: this workdir holds no parameters
  with pytest.raises(ValueError, match='no image files'):
    pi.run_predict(tiny_config(), tmp_path, str(tmp_path / 'empty_dir'))
  with pytest.raises(ValueError, match='--output'):
    pi.run_predict(tiny_config(), tmp_path, str(folder), output=str(tmp_path / 'x.txt'))
  with pytest.raises(ValueError, match='--fixed_parts'):
    pi.run_predict(tiny_config(), tmp_path, str(folder), removed_parts=(NUM_PARTS,))
  erm = tiny_config()
  config_lib.use_baseline(erm)
  with pytest.raises(ValueError, match='--save_masks needs a model with a foreground mask'):
    pi.run_predict(erm, tmp_path, str(folder), save_masks=True)


def test_mask_names_keep_equal_basenames_apart():
  assert pi.mask_names(['/d/x/a.png', '/d/y/z/a.png']) == ['x/a.png', 'y/z/a.png']
  assert pi.mask_names(['/d/a.png']) == ['a.png']


def test_top_classes_order_and_ties():
  top = pi.top_classes(np.array([0.2, 0.5, 0.2, 0.1]), 3, 'abcd')
  assert [(t['class'], t['prob']) for t in top] == [('b', 0.5), ('a', 0.2), ('c', 0.2)]
  np.testing.assert_allclose(pi.softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])


# ----------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli(run, tmp_path):
  _, workdir, folder = run
  env = {**os.environ, 'PYTHONPATH': os.getcwd()}
  out = tmp_path / 'cli.csv'
  cmd = [sys.executable, '-m', 'ifam_jax.main', '--mode', 'predict', '--workdir', str(workdir)]
  done = subprocess.run(cmd + ['--images', str(folder), '--output', str(out), '--top_k', '2'],
                        capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 0, done.stderr
  assert f'{len(GOOD)} images predicted' in done.stdout
  assert f'{len(BAD)} unreadable' in done.stdout and 'ETA' in done.stdout
  with open(out, newline='') as f:
    assert len(list(csv.DictReader(f))) == len(GOOD + BAD)
  missing = subprocess.run(cmd + ['--images', str(tmp_path / 'nowhere')], capture_output=True,
                           text=True, env=env, check=False)
  assert missing.returncode != 0 and 'nowhere does not exist' in missing.stderr
  no_flag = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
  assert no_flag.returncode != 0 and '--mode predict needs --images' in no_flag.stderr
