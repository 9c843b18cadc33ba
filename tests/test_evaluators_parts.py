"""The part metrics (evaluators/parts.py): CUB part annotations through the part-eval transform,
centroids and activity, the keypoint regression (Kp), NMI / ARI, and `--mode eval` end to end on
a tiny CUB layout. Expected values come from constructions with known answers, numpy by hand,
or scikit-learn's StandardScaler, LinearRegression and clustering scores (the reference's)."""

import copy
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.preprocessing import StandardScaler

from ifam_jax import config_lib, factory, optim
from ifam_jax import data as data_lib
from ifam_jax import evaluate as ev
from ifam_jax import workdir as workdir_lib
from ifam_jax.data import sources, transforms
from ifam_jax.evaluators import parts
from ifam_jax.models.ifam import Intervention
from test_configs import get_config as recipe_config
from test_data import make_cub


# ----------------------------------------------------------------------------
# Annotations: the source and the transform
# ----------------------------------------------------------------------------
def write_parts(root, locs, boxes):
  """parts/part_locs.txt rows (image_id, part_id, x, y, visible), bounding_boxes.txt rows."""
  (root / 'parts').mkdir(parents=True, exist_ok=True)
  (root / 'parts' / 'part_locs.txt').write_text(
      ''.join(' '.join(map(str, row)) + '\n' for row in locs))
  (root / 'bounding_boxes.txt').write_text(''.join(' '.join(map(str, r)) + '\n' for r in boxes))


def test_cub_source_reads_part_annotations(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)  # test split: image ids 2 and 4
  locs = [(i, p, 10 * i + p, 20 * i + p + 0.5, (i + p) % 2) for i in (1, 2, 3, 4) for p in (2, 1)]
  boxes = [(i, i, 2 * i, 3 * i, 4 * i) for i in (4, 3, 2, 1)]
  write_parts(root, locs, boxes)
  test = sources.CubSource(root, 'test', part_annotations=True)
  record = test[1]  # image id 4
  assert record['keypoints'].dtype == np.float32 and record['box'].dtype == np.float32
  np.testing.assert_array_equal(record['keypoints'], [[41, 81.5, 1], [42, 82.5, 0]])
  np.testing.assert_array_equal(record['box'], [4, 8, 12, 16])
  np.testing.assert_array_equal(test[0]['keypoints'], [[21, 41.5, 1], [22, 42.5, 0]])
  assert 'part_annotations=True' in repr(test)
  plain = sources.CubSource(root, 'test')
  assert 'keypoints' not in plain[0] and 'part_annotations' not in repr(plain)

  write_parts(root, [row for row in locs if row[:2] != (4, 2)], boxes)
  with pytest.raises(ValueError, match=re.escape(
      f'{root / "parts" / "part_locs.txt"}: image id 4 has 0 entries for part 2')):
    sources.CubSource(root, 'test', part_annotations=True)
  write_parts(root, locs, boxes[1:])
  with pytest.raises(ValueError, match=re.escape(
      f'{root / "bounding_boxes.txt"} has no box for image id 4')):
    sources.CubSource(root, 'test', part_annotations=True)
  write_parts(root, locs[:-1] + [(4, 1, 3, 'x', 1)], boxes)
  with pytest.raises(ValueError, match='part_locs.txt line 8: expected 5 numbers'):
    sources.CubSource(root, 'test', part_annotations=True)
  write_parts(root, locs, boxes)
  (root / 'bounding_boxes.txt').unlink()
  with pytest.raises(FileNotFoundError, match=str(root / 'bounding_boxes.txt')):
    sources.CubSource(root, 'test', part_annotations=True)


def test_keypoints_follow_the_resize_and_centre_crop():
  """A 120x90 image to 48 px: factor 48/90, resized 64x48, crop offset (8, 0). Bright 3x3
  blocks at two keypoints land where the moved keypoints say."""
  pixels = np.zeros((90, 120, 3), np.uint8)
  for x, y in ((60, 45), (95, 20)):
    pixels[y - 1:y + 2, x - 1:x + 2] = 255
  keypoints = np.array([[60.5, 45.5, 1], [95.5, 20.5, 1], [5, 50, 1], [119, 10, 1], [0, 0, 0]],
                       np.float32)
  record = {'image': pixels, 'label': 0, 'group': -1, 'keypoints': keypoints,
            'box': np.array([30, 9, 60, 45], np.float32)}
  out = transforms.process(record, np.random.default_rng(0), transforms.resize_center_crop(48))
  f = 48 / 90
  expected = [[60.5 * f - 8, 45.5 * f, 1], [95.5 * f - 8, 20.5 * f, 1],
              [0, 50 * f, 0],    # 5 f - 8 < 0: left the crop, clamped
              [48, 10 * f, 0],   # 119 f - 8 > 48
              [0, 0, 0]]         # invisible: untouched
  np.testing.assert_allclose(out['keypoints'], expected, rtol=1e-6)
  np.testing.assert_allclose(out['box'], [30 * f - 8, 9 * f, 60 * f, 45 * f], rtol=1e-6)
  image = out['image'].mean(-1)
  for x, y, _ in expected[:2]:
    window = image[int(y) - 3:int(y) + 4, int(x) - 3:int(x) + 4]
    peak = np.unravel_index(np.argmax(window), window.shape)
    assert abs(int(y) - 3 + peak[0] - (y - 0.5)) <= 1 and abs(int(x) - 3 + peak[1] - (x - 0.5)) <= 1
  # The box corner clamps into the crop; width and height keep their scaled size.
  record['box'] = np.array([2, 3, 60, 45], np.float32)
  out = transforms.process(record, np.random.default_rng(0), transforms.resize_center_crop(48))
  np.testing.assert_allclose(out['box'], [0, 3 * f, 60 * f, 45 * f], rtol=1e-6)

  unreadable = transforms.process({**record, 'image': b'not an image'}, np.random.default_rng(0),
                                  transforms.resize_center_crop(48))
  assert unreadable['valid'] == 0 and not unreadable['keypoints'][:, 2].any()
  with pytest.raises(ValueError, match='resize \\+ centre-crop eval transform'):
    transforms.process(record, np.random.default_rng(0), transforms.cub_original_train(48))
  with pytest.raises(ValueError, match='squashes'):
    transforms.process(record, np.random.default_rng(0), transforms.imagenet_eval(384))


# ----------------------------------------------------------------------------
# Centroids, activity, the regression
# ----------------------------------------------------------------------------
def test_part_centroids_and_activity():
  maps = np.zeros((1, 4, 4, 4))
  maps[0, 1, 3, 0] = 0.9             # one cell: row 1, column 3
  maps[0, :, :, 1] = 0.2             # uniform: the grid's mean index 1.5, never above 0.5
  maps[0, 0, 0, 3] = 1.0             # background: ignored; part 2 is zero everywhere
  centroids, active = parts.part_centroids(maps, image_size=32)
  np.testing.assert_allclose(centroids[0, :2], [[3 * 8, 1 * 8], [1.5 * 8, 1.5 * 8]])
  assert np.isnan(centroids[0, 2]).all()
  np.testing.assert_array_equal(active, [[True, False, False]])


def regression_data(rng, n, k, landmarks, coef, offset):
  """Centroids [n, k, 2] and keypoints = an exact affine function of them [n, L, 2]."""
  centroids = rng.normal(size=(n, k, 2))
  keypoints = (centroids.reshape(n, -1) @ coef + offset).reshape(n, landmarks, 2)
  return {'centroids': centroids, 'keypoints': keypoints, 'active': np.ones((n, k), bool),
          'visible': np.ones((n, landmarks), bool)}


def test_keypoint_regression_of_an_affine_function_is_exact():
  rng = np.random.default_rng(0)
  k, landmarks = 3, 4
  coef, offset = rng.normal(size=(2 * k, 2 * landmarks)), rng.normal(size=2 * landmarks)
  fit = regression_data(rng, 50, k, landmarks, coef, offset)
  evaluated = regression_data(rng, 20, k, landmarks, coef, offset)
  assert parts.keypoint_regression(fit, evaluated)['kp'] == pytest.approx(0, abs=1e-10)
  # Moving every eval landmark by a known vector: each error is its length, Kp their mean,
  # weighted by how many images see each landmark.
  shift = np.array([[0.03, 0.04], [0.0, 0.1], [0.2, 0.0], [0.06, 0.08]])  # lengths .05 .1 .2 .1
  evaluated['visible'][:5, 2] = False  # landmark 2 seen in 15 images, the others in 20
  moved = dict(evaluated, keypoints=evaluated['keypoints'] + shift)
  result = parts.keypoint_regression(fit, moved)
  np.testing.assert_allclose(result['landmark_errors'], [0.05, 0.1, 0.2, 0.1], atol=1e-10)
  assert result['landmark_counts'] == [20, 20, 15, 20]
  assert result['kp'] == pytest.approx((20 * 0.05 + 20 * 0.1 + 15 * 0.2 + 20 * 0.1) / 75)


def sklearn_kp(fit, evaluated):
  """The reference's eval_kpr with scikit-learn, on flattened centroids and masks."""
  error, count = 0.0, 0
  for l in range(fit['keypoints'].shape[1]):
    f, e = fit['visible'][:, l], evaluated['visible'][:, l]
    xf, xe = (d['centroids'][m].reshape(m.sum(), -1) for d, m in ((fit, f), (evaluated, e)))
    af, ae = (np.repeat(d['active'][m], 2, axis=1) for d, m in ((fit, f), (evaluated, e)))
    sx, sy = StandardScaler().fit(xf), StandardScaler().fit(fit['keypoints'][f, l])
    reg = LinearRegression(fit_intercept=False).fit(
        np.where(af, sx.transform(xf), 0), sy.transform(fit['keypoints'][f, l]))
    pred = sy.inverse_transform(reg.predict(np.where(ae, sx.transform(xe), 0)))
    error += np.linalg.norm(pred - evaluated['keypoints'][e, l], axis=-1).mean() * e.sum()
    count += e.sum()
  return error / count


def test_keypoint_regression_matches_scikit_learn_with_inactive_parts():
  rng = np.random.default_rng(1)
  k, landmarks = 4, 5

  def data(n):
    d = {'centroids': rng.normal(size=(n, k, 2)), 'keypoints': rng.normal(size=(n, landmarks, 2)),
         'active': rng.random((n, k)) < 0.7, 'visible': rng.random((n, landmarks)) < 0.8}
    d['centroids'][:, 3, 1] = 0.25  # a constant feature: sklearn's scale 1
    d['centroids'][~d['active'][:, 2], 2] = np.nan  # a map that is zero everywhere
    return d

  fit, evaluated = data(60), data(25)
  got = parts.keypoint_regression(fit, evaluated)['kp']
  assert np.isfinite(got) and got == pytest.approx(sklearn_kp(fit, evaluated), rel=1e-9)
  # Inactive parts are zeroed: what they hold does not matter.
  garbage = copy.deepcopy(evaluated)
  garbage['centroids'][~garbage['active']] = 1e6
  assert parts.keypoint_regression(fit, garbage)['kp'] == pytest.approx(got, rel=1e-12)
  evaluated['visible'][:, 1] = True
  fit['visible'][:, 1] = False
  with pytest.raises(ValueError, match='landmark 2 is visible in 25 eval images but in no image'):
    parts.keypoint_regression(fit, evaluated)


# ----------------------------------------------------------------------------
# Assignments at the keypoints, NMI, ARI
# ----------------------------------------------------------------------------
def test_keypoint_parts_read_the_upsampled_maps_at_the_nearest_pixel():
  rng = np.random.default_rng(2)
  size, grid, channels = 28, 4, 5
  maps = jax.nn.softmax(3 * rng.normal(size=(3, grid, grid, channels)), axis=-1)
  # Non-integer positions (grid_sample's nearest pixel is then floor(x)), the far edges too.
  keypoints = np.concatenate([rng.uniform(0, size, (3, 20, 2)), np.ones((3, 20, 1))], -1)
  keypoints[0, 0, :2] = (size, 3.3)  # on the far edge: outside grid_sample's pixels
  upsampled = np.asarray(jax.image.resize(maps, (3, size, size, channels), 'bilinear'))
  got = parts.keypoint_parts(np.asarray(maps), keypoints, size)
  col, row = np.floor(keypoints[..., 0]).astype(int), np.floor(keypoints[..., 1]).astype(int)
  inside = col < size
  expected = np.argmax(upsampled[np.arange(3)[:, None], np.minimum(row, size - 1),
                                 np.minimum(col, size - 1)], -1)
  np.testing.assert_array_equal(got[inside], expected[inside])
  assert got[0, 0] == 0 and not inside[0, 0]
  assert len(np.unique(got)) > 2  # the maps are not trivially one part


def test_nmi_ari():
  truth = np.repeat(np.arange(15), 4)
  assert parts.nmi(truth, truth) == pytest.approx(1.0) and parts.ari(truth, truth) == 1.0
  relabelled = (truth * 7 + 3) % 15  # a permutation of the labels changes nothing
  assert parts.nmi_numpy(truth, relabelled) == pytest.approx(1.0)
  assert parts.ari_numpy(truth, relabelled) == pytest.approx(1.0)
  merged = np.minimum(truth, 8)  # a known confusion: parts 8..14 merged into one
  for ours, theirs in ((parts.nmi_numpy, normalized_mutual_info_score),
                       (parts.ari_numpy, adjusted_rand_score)):
    assert ours(truth, merged) == pytest.approx(theirs(truth, merged), rel=1e-12)
  rng = np.random.default_rng(3)
  for _ in range(5):
    a, b = rng.integers(0, 15, 300), rng.integers(0, 9, 300)
    b[:150] = a[:150] % 9
    assert parts.nmi_numpy(a, b) == pytest.approx(normalized_mutual_info_score(a, b), rel=1e-12)
    assert parts.ari_numpy(a, b) == pytest.approx(adjusted_rand_score(a, b), rel=1e-12)
  one = np.zeros(10, int)
  assert parts.nmi_numpy(one, one) == parts.ari_numpy(one, one) == 1.0
  assert parts.nmi_numpy(truth, np.zeros_like(truth)) == normalized_mutual_info_score(
      truth, np.zeros_like(truth))


def test_part_metrics_count_visible_keypoints_only():
  landmarks = 3
  visible = np.array([[True, True, False], [True, False, True]])
  evaluated = {'visible': visible, 'parts': np.array([[0, 1, 1], [0, 2, 2]]),
               'centroids': np.zeros((2, 1, 2)), 'active': np.ones((2, 1), bool),
               'keypoints': np.zeros((2, landmarks, 2))}
  fit = dict(evaluated, visible=np.ones((2, landmarks), bool))
  m = parts.part_metrics(fit, evaluated)
  # visible: (landmark 0, part 0) x2, (1, 1), (2, 2): parts identical to the landmarks
  assert m['num_keypoints'] == 4 and m['nmi'] == pytest.approx(1.0) and m['ari'] == 1.0
  assert m['kp'] == pytest.approx(0.0)


# ----------------------------------------------------------------------------
# Config checks and --mode eval end to end
# ----------------------------------------------------------------------------
K = 2
SIZE = 32
TRAIN_SIZES = [(48, 40), (40, 56), (64, 48), (50, 50), (36, 60), (60, 36), (44, 52), (52, 44),
               (70, 40), (40, 70), (48, 48), (56, 40)]
TEST_SIZES = [(48, 40), (40, 52), (60, 45), (45, 60), (38, 38), (64, 40), (40, 64), (50, 42)]
LANDMARKS = 3


def make_cub_with_parts(root, rng):
  """A CUB layout of 12 train and 8 test images of varied sizes (random colour blocks, which
  a random model's parts tell apart), 3 keypoints each (some invisible, some outside the centre
  crop) and a box."""
  sizes = TRAIN_SIZES + TEST_SIZES
  names, locs, boxes = [], [], []
  for i, (w, h) in enumerate(sizes, start=1):
    name = f'00{1 + i % 3}.C/{i}.jpg'
    (root / 'images' / name).parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((h, w, 3), np.uint8)
    for _ in range(4):
      x, y = rng.integers(0, w), rng.integers(0, h)
      pixels[y:y + h // 3, x:x + w // 3] = rng.integers(0, 256, 3)
    Image.fromarray(pixels).save(root / 'images' / name, quality=95)
    names.append(name)
    for p in range(1, LANDMARKS + 1):
      locs.append((i, p, round(rng.uniform(0, w), 2), round(rng.uniform(0, h), 2),
                   int(rng.random() < 0.85)))
    boxes.append((i, round(rng.uniform(0, w / 3), 1), round(rng.uniform(0, h / 3), 1),
                  round(rng.uniform(w / 3, w / 2), 1), round(rng.uniform(h / 3, h / 2), 1)))
  (root / 'images.txt').write_text(''.join(f'{i} {n}\n' for i, n in enumerate(names, start=1)))
  (root / 'image_class_labels.txt').write_text(
      ''.join(f'{i} {1 + i % 3}\n' for i in range(1, len(sizes) + 1)))
  (root / 'train_test_split.txt').write_text(
      ''.join(f'{i} {int(i <= len(TRAIN_SIZES))}\n' for i in range(1, len(sizes) + 1)))
  (root / 'classes.txt').write_text('1 001.C\n2 002.C\n3 003.C\n')
  write_parts(root, locs, boxes)


def parts_config(root):
  c = config_lib.base_config()
  config_lib.shrink_for_local_run(c)
  c.optim.groups = optim.ifam_groups(freeze_backbone=False)
  # Soft maps (tau 5): this random model's parts are then active in some images only.
  c.model.image_size, c.model.num_parts, c.model.gumbel_tau = SIZE, K, 5.0
  c.model.vit_overrides = dict(width=16, depth=1, num_heads=2, mlp_hidden=32, patch_size=8)
  c.data.train = dict(source='cub', root=str(root), split='train')
  c.data.evals = dict(test=dict(source='cub', root=str(root), split='test',
                                part_annotations=True))
  c.data.augment = 'none'
  c.data.eval_batch_size = 4
  c.eval.part_metrics = True
  return c


def test_bad_part_metric_configs_fail_before_the_model_loads(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  empty = tmp_path / 'no_params'  # loading a model here would fail with FileNotFoundError
  c = parts_config(root)
  with pytest.raises(FileNotFoundError, match=str(root / 'parts' / 'part_locs.txt')):
    ev.run_eval(c, empty)
  c.data.evals.test.part_annotations = False
  with pytest.raises(ValueError, match='no selected eval set carries part annotations'):
    ev.run_eval(c, empty)
  c.data.evals.test.part_annotations = True
  c.data.train = dict(source='synthetic', split='train', num_examples=4)
  with pytest.raises(ValueError, match="data.train, which must be a 'cub' source"):
    ev.run_eval(c, empty)
  c.model.kind = 'baseline'  # no part maps: skipped (a recipe's ERM row), then no parameters
  with pytest.raises(FileNotFoundError, match='no saved parameters'):
    ev.run_eval(c, empty)


def reference_part_metrics(model, root, intervention):
  """Kp, NMI, ARI of the saved model recomputed independently: images and keypoints moved by
  hand, [0, 1] pixels, jax.image.resize for the upsampling, scikit-learn for the rest."""
  def split(is_train):
    sizes = TRAIN_SIZES if is_train else TEST_SIZES
    first = 1 if is_train else len(TRAIN_SIZES) + 1
    locs = np.loadtxt(root / 'parts' / 'part_locs.txt').reshape(-1, LANDMARKS, 5)
    boxes = np.loadtxt(root / 'bounding_boxes.txt')
    names = (root / 'images.txt').read_text().split()[1::2]
    images, keypoints, crop_boxes = [], [], []
    for i, (w, h) in enumerate(sizes, start=first):
      f = SIZE / min(w, h)
      rw, rh = (SIZE, int(SIZE * h / w)) if w <= h else (int(SIZE * w / h), SIZE)
      left, top = round((rw - SIZE) / 2), round((rh - SIZE) / 2)
      img = Image.open(root / 'images' / names[i - 1]).resize((rw, rh), Image.BILINEAR)
      images.append(np.asarray(img.crop((left, top, left + SIZE, top + SIZE))))
      xy = locs[i - 1, :, 2:4] * f - (left, top)
      vis = (locs[i - 1, :, 4] > 0) & (xy >= 0).all(-1) & (xy <= SIZE).all(-1)
      keypoints.append(np.concatenate([np.clip(xy, 0, SIZE), vis[:, None]], -1))
      x, y, bw, bh = boxes[i - 1, 1:] * f
      crop_boxes.append([min(max(x - left, 0), SIZE), min(max(y - top, 0), SIZE), bw, bh])
    out = model(np.stack(images).astype(np.float32) / 255, train=False,
                intervention=intervention)
    maps = np.asarray(out.part_maps, np.float64)
    return maps, np.stack(keypoints), np.array(crop_boxes)

  def features(maps, keypoints, boxes):
    fg = maps[..., :K]
    grid = maps.shape[1]
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
    mass = fg.sum((1, 2))
    centre = np.stack([(fg * cols[..., None]).sum((1, 2)) / mass,
                       (fg * rows[..., None]).sum((1, 2)) / mass], -1) * SIZE / grid
    box_xy, box_wh = boxes[:, None, :2], boxes[:, None, 2:]
    return {'centroids': (centre - box_xy) / box_wh, 'active': fg.max((1, 2)) > 0.5,
            'keypoints': (keypoints[..., :2] - box_xy) / box_wh,
            'visible': keypoints[..., 2] > 0}

  fit, (maps, keypoints, boxes) = features(*split(True)), split(False)
  evaluated = features(maps, keypoints, boxes)
  upsampled = np.asarray(jax.image.resize(maps, (len(maps), SIZE, SIZE, K + 1), 'bilinear'))
  visible = evaluated['visible']
  n, l = np.nonzero(visible)
  # grid_sample(nearest, align_corners=False): pixel round-half-even(x - 1/2); x = size is out
  col, row = (np.rint(keypoints[n, l, i] - 0.5).astype(int) for i in (0, 1))
  predicted = np.where(col < SIZE, upsampled[n, np.minimum(row, SIZE - 1),
                                             np.minimum(col, SIZE - 1)].argmax(-1), 0)
  return {'kp': sklearn_kp(fit, evaluated), 'nmi': normalized_mutual_info_score(l, predicted),
          'ari': adjusted_rand_score(l, predicted), 'num_keypoints': len(l),
          'active_fraction': float(np.mean(np.concatenate([fit['active'],
                                                           evaluated['active']])))}


@pytest.mark.slow
def test_run_eval_reports_part_metrics_with_and_without_thresholds(tmp_path, capsys):
  root = tmp_path / 'CUB_200_2011'
  make_cub_with_parts(root, np.random.default_rng(0))
  config = parts_config(root)
  workdir = tmp_path / 'run'
  model = factory.build_model(config.model, 3, nnx.Rngs(0))
  _, params, frozen, _ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  workdir_lib.save_params(workdir, 'final', params, frozen, {'step': 0, 'num_classes': 3})
  # Distance thresholds at the median distance of each part's tokens: some are rejected.
  test_images = np.stack([transforms.process(r, None, transforms.resize_center_crop(SIZE))['image']
                          for r in factory.make_source(config.data.evals.test)])
  distances = -np.asarray(model(data_lib.normalize(test_images), train=False).part_logits)
  values = [float(np.median(distances[..., k])) for k in range(K)]
  (tmp_path / 'thresholds.json').write_text(json.dumps({'rule': 'distance',
                                                        'thresholds': values}))
  config.eval.thresholds = str(tmp_path / 'thresholds.json')

  report = ev.run_eval(config, workdir)
  with_thresholds = Intervention(thresholds=tuple(values), threshold_rule='distance')
  printed = capsys.readouterr().out
  header = next(line for line in printed.splitlines() if ' acc |' in line)
  assert {'Kp', 'NMI', 'ARI'} <= {cell.strip() for cell in header.split('|')}
  assert 'test (no thresholds)' in printed
  for key, intervention in (('evals_without_thresholds', None), ('evals', with_thresholds)):
    got = report[key]['test']
    expected = reference_part_metrics(model, root, intervention)
    assert 0 < expected['active_fraction'] < 1  # activity matters in this construction
    assert expected['nmi'] > 0.05  # the parts at the keypoints vary
    assert got['num_keypoints'] == expected['num_keypoints'] > 0
    for name in ('kp', 'nmi', 'ari'):
      assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), (key, name)
    assert 'accuracy' in got  # next to the classification metrics
  assert report['evals']['test']['kp'] != report['evals_without_thresholds']['test']['kp']
  assert json.loads((workdir / 'eval' / 'final' / 'eval.json').read_text()) == report


def test_cub_recipe_turns_part_metrics_on_where_the_annotations_exist(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  args = f'root={root},tiny,waterbird200_root=waterbird_complete95_forest2water2'
  c = recipe_config('cub', args)
  assert not c.eval.part_metrics and 'part_annotations' not in c.data.evals.test
  ids = range(1, 5)
  write_parts(root, [(i, 1, 1.5, 2.5, 1) for i in ids], [(i, 0, 0, 4, 4) for i in ids])
  c = recipe_config('cub', args)
  assert c.eval.part_metrics and not c.eval.part_metrics_normalise
  assert c.data.evals.test.part_annotations and c.data.evals.waterbird200.part_annotations
  assert 'part_annotations' not in c.data.train  # the fit split reads them itself
  assert len(parts.check_config(c)) == 2 and parts.check_config(c).keypoints.shape == (2, 1, 3)
  c.eval.splits = ('waterbird200',)
  assert parts.annotated_evals(c) == ['waterbird200']
  assert parts.check_config(recipe_config('cub', args + ',baseline')) is None  # no part maps
