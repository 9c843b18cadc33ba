"""Evaluation: every metric against hand counts, the IN-9 mapping and background challenge on tiny
layouts, thresholds against numpy, the audit's power to fail, and the four entry points end to
end on a tiny synthetic workdir trained for two steps (with an IN-9 layout and mapping file)."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ifam_jax import config_lib, factory, optim, sharding, train
from ifam_jax import workdir as workdir_lib
from ifam_jax import data as data_lib
from ifam_jax import evaluate as ev
from test_configs import xla_cache  # noqa: F401  (a fixture)
from test_data import make_waterbirds, write_image

NUM_PARTS = 2


def single_device_batch_sharding():
  return sharding.batch_sharding(sharding.make_mesh([('data', -1), ('fsdp', 1)],
                                                    jax.devices()[:1]))


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------
def pairwise_auroc(scores, positive):
  pos, neg = scores[positive][:, None], scores[~positive][None]
  return (np.sum(pos > neg) + 0.5 * np.sum(pos == neg)) / (pos.size * neg.size)


@pytest.mark.parametrize('seed', range(4))
def test_auroc_is_the_pairwise_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, 60).astype(np.float32)  # many ties
  positive = rng.random(60) < 0.3
  assert ev.auroc(scores, positive) == pytest.approx(pairwise_auroc(scores, positive), abs=1e-12)
  assert ev.auroc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
  assert ev.auroc([0.5, 0.5], [False, True]) == 0.5
  assert np.isnan(ev.auroc([0.1, 0.2], [True, True]))


def ranked_logits(pred, label, label_rank, num_classes=7):
  """Logits whose top-1 is `pred` and whose label sits at `label_rank` (0 = top)."""
  order = [pred] + [c for c in range(num_classes) if c not in (pred, label)]
  if label != pred:
    order.insert(label_rank, label)
  logits = np.zeros(num_classes, np.float32)
  logits[order] = np.arange(num_classes, 0, -1)
  return logits


def test_metrics_by_hand():
  # 8 valid examples (right: 0, 2, 3, 4, 6), 2 padding rows that are wrong.
  labels = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1])
  groups = np.array([0, 1, 0, 1, 2, 3, 2, 3, 3, 3])
  valid = np.array([1] * 8 + [0, 0])
  cases = [(0, 0), (4, 3), (1, 0), (1, 0), (2, 0), (5, 6), (3, 0), (0, 1), (6, 1), (6, 1)]
  logits = np.stack([ranked_logits(p, y, r) for (p, r), y in zip(cases, labels)])
  inter = np.array([2, 0, 3, 0, 0, 0, 0, 0, 9, 9])
  union = np.array([4, 0, 3, 1, 0, 0, 0, 0, 9, 9])
  outputs = {'logits': logits, 'logits1': np.eye(7, dtype=np.float32)[labels], 'label': labels,
             'group': groups, 'valid': valid, 'fg_fraction': np.arange(10) / 10,
             'fg_intersection': inter, 'fg_union': union}
  m = ev.summarize_predictions(outputs, class_names=[f'c{i}' for i in range(7)],
                               group_names=['g0', 'g1', 'g2', 'g3'], minority_groups=(1, 2))
  assert m['num_examples'] == 8
  assert m['accuracy'] == 5 / 8
  assert m['top5_accuracy'] == 7 / 8  # example 5's label is ranked 7th
  assert m['class_accuracy'] == {'c0': 0.5, 'c1': 1.0, 'c2': 0.5, 'c3': 0.5}
  assert m['macro_accuracy'] == 0.625
  assert m['group_accuracy'] == {'g0': 1.0, 'g1': 0.5, 'g2': 1.0, 'g3': 0.0}
  assert (m['mean_group_accuracy'], m['worst_group_accuracy']) == (0.625, 0.0)
  assert m['worst_group_accuracy_minority'] == 0.5  # min over g1, g2 only
  assert 'auroc' not in m  # 7 classes
  assert m['stage1']['accuracy'] == 1.0 and m['stage1']['worst_group_accuracy'] == 1.0
  assert m['fg_fraction'] == pytest.approx(np.arange(8).mean() / 10)
  assert m['fg_iou'] == 5 / 8  # (2 + 3) / (4 + 3 + 1), padding left out
  assert m['fg_iou_image_mean'] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # empty unions skipped

  no_groups = ev.summarize_predictions({k: outputs[k] for k in ('logits', 'label', 'group',
                                                                'valid')})
  assert set(no_groups) == {'num_examples', 'accuracy', 'top5_accuracy', 'macro_accuracy',
                            'class_accuracy'}
  assert set(no_groups['class_accuracy']) == {'0', '1', '2', '3'}
  empty = ev.summarize_predictions({**outputs, 'valid': np.zeros(10)})
  assert empty['num_examples'] == 0 and np.isnan(empty['accuracy'])


def test_binary_auroc_uses_the_class_1_probability():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 2)).astype(np.float32)
  logits[:10] = logits[10:20]  # tied scores
  labels = rng.integers(0, 2, 40)
  m = ev.summarize_predictions({'logits': logits, 'label': labels, 'group': -np.ones(40, int),
                                'valid': np.ones(40)})
  z = np.exp(logits.astype(np.float64))
  prob = z[:, 1] / z.sum(-1)
  assert m['auroc'] == pytest.approx(pairwise_auroc(prob, labels == 1), abs=1e-12)
  assert 'top5_accuracy' not in m


def test_minority_groups(tmp_path):
  make_waterbirds(tmp_path)
  waterbirds = data_lib.WaterbirdsSource(tmp_path, 'test')
  assert [waterbirds.group_names[g] for g in ev.minority_groups(waterbirds)] == \
      ['landbird/water', 'waterbird/land']
  synthetic = data_lib.SyntheticSpuriousSource(4, 16, num_classes=3)
  assert ev.minority_groups(synthetic) == (1, 2, 3, 5, 6, 7)  # background != shape
  assert ev.minority_groups(data_lib.SyntheticSpuriousSource(4, 16)) == (1, 2)


def test_fg_overlap_by_hand():
  mask = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]], np.float32)
  truth = np.zeros((3, 4, 4), np.uint8)
  truth[0, :2] = 1  # top half
  truth[2] = 1
  counts = jax.device_get(ev.fg_overlap(jnp.asarray(mask), jnp.asarray(truth)))
  # Image 0: 2x2-pixel patches top-left and bottom-right vs the top 8 pixels.
  np.testing.assert_array_equal(counts['fg_intersection'], [4, 0, 16])
  np.testing.assert_array_equal(counts['fg_union'], [12, 0, 16])


# ----------------------------------------------------------------------------
# ImageNet-9
# ----------------------------------------------------------------------------
def test_in9_mapping(tmp_path):
  path = tmp_path / 'in_to_in9.json'
  path.write_text(json.dumps({'0': 0, '1': 0, '2': 1, '3': -1, '4': 8}))
  table = ev.load_in9_mapping(path, 5)
  np.testing.assert_array_equal(table, [0, 0, 1, -1, 8])
  # Predictions 0..4 against IN-9 labels: 1 -> dog is wrong for a reptile, 3 -> -1 always.
  logits = np.eye(5, dtype=np.float32)
  labels = np.array([0, 3, 1, 3, 8])
  m = ev.summarize_predictions({'logits': logits, 'label': labels, 'group': -np.ones(5, int),
                                'valid': np.ones(5)}, class_names=data_lib.sources.IN9_CLASSES,
                               class_map=table)
  assert m['accuracy'] == 3 / 5
  assert m['class_accuracy']['00_dog'] == 1.0 and m['class_accuracy']['03_reptile'] == 0.0
  assert 'top5_accuracy' not in m and 'auroc' not in m
  assert ev.bg_gap({'original': 0.9, 'mixed_same': 0.8, 'mixed_rand': 0.55}) == \
      pytest.approx(0.25)

  for content, error in (({'0': 0, '1': 0, '2': 1, '3': -1, '5': 8}, "key '5'"),
                         ({'0': 0, '1': 9, '2': 1, '3': -1, '4': 8}, 'maps to 9'),
                         ({'0': 0, '1': 0}, 'lacks 3'), ([0, 1], 'JSON object')):
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
      ev.load_in9_mapping(path, 5)


def make_challenge(root, size=8):
  """Foregrounds: a bright dog, a brighter bird (centre masks); backgrounds 30, 30, 240.

  PNG content under .JPEG names: exact pixel values (PIL reads the format from the bytes).
  """
  mask = np.zeros((size, size), bool)
  mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = True
  for cls, name, value in (('00_dog', 'a', 200), ('01_bird', 'b', 220)):
    write_image(root / 'original' / 'val' / cls / f'{name}.JPEG', value, (size, size), 'PNG')
    (root / 'fg_mask' / 'val' / cls).mkdir(parents=True, exist_ok=True)
    np.save(root / 'fg_mask' / 'val' / cls / f'{name}.npy', mask)
  for cls, name, value in (('00_dog', 'x', 30), ('01_bird', 'y', 30), ('01_bird', 'z', 240)):
    write_image(root / 'only_bg_t' / 'val' / cls / f'{name}.JPEG', value, (size, size), 'PNG')


def pixel_classifier(row, col, num_classes=2, bright_class=1):
  """A stub eval step: class `bright_class` if pixel (row, col) is bright, else 0."""

  def eval_step(params, frozen, batch, rng):
    del params, frozen, rng
    bright = batch['image'][:, row, col, 0] > 128
    return {'logits': jax.nn.one_hot(jnp.where(bright, bright_class, 0), num_classes)}

  return eval_step


def test_bg_challenge_on_a_tiny_layout(tmp_path):
  make_challenge(tmp_path)
  transform = data_lib.transforms.resize_center_crop(8)
  source = data_lib.ImageNet9Source(tmp_path, 'only_bg_t', 'val')
  backgrounds = list(data_lib.make_dataset(source, transform=transform, global_batch_size=2,
                                           seed=0, train=False))
  assert [b['valid'].tolist() for b in backgrounds] == [[1, 1], [1, 0]]
  batch_sharding = single_device_batch_sharding()

  def run(step, class_map=None):
    return ev.bg_challenge(step, {}, {}, ev.challenge_foregrounds(tmp_path, transform),
                           backgrounds, batch_sharding, 0, class_map)

  # Reads the foreground: the dog (bright) is called a bird on every background, the bird never
  # fails. Reads the background corner: each foreground meets a background of the other class.
  assert run(pixel_classifier(4, 4)) == {'num_foregrounds': 2, 'num_vulnerable': 1,
                                         'accuracy': 0.5}
  assert run(pixel_classifier(0, 0))['accuracy'] == 0.0
  # Through a class map: 3 model classes, bright -> class 2 -> bird, or -> -1 (always wrong).
  centre = pixel_classifier(4, 4, num_classes=3, bright_class=2)
  assert run(centre, np.array([0, 1, 1]))['accuracy'] == 0.5
  assert run(centre, np.array([0, 1, -1]))['accuracy'] == 0.0


def test_challenge_foregrounds_name_a_pickled_mask(tmp_path):
  make_challenge(tmp_path)
  path = tmp_path / 'fg_mask' / 'val' / '01_bird' / 'b.npy'
  np.save(path, np.array([{'mask': 1}], dtype=object), allow_pickle=True)
  transform = data_lib.transforms.resize_center_crop(8)
  with pytest.raises(ValueError, match=f'foreground mask {path}: .*plain \\(non-object\\) array'):
    list(ev.challenge_foregrounds(tmp_path, transform))


# ----------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------
def test_calibration_percentiles_match_numpy():
  rng = np.random.default_rng(0)
  batches = [{'assigned': rng.choice([0, 1, 3], size=(5, 4, 4)),  # part 2 never; 3 = background
              'distance': rng.gamma(2.0, size=(5, 4, 4)).astype(np.float32),
              'dot': rng.normal(size=(5, 4, 4)).astype(np.float32),
              'valid': np.array([1, 1, 1, 0, 1])} for _ in range(3)]
  thresholds, counts = ev.calibrate(iter(batches), 3, (97, 99), capacity=10_000)
  keep = [b['valid'] > 0 for b in batches]
  for k in range(2):
    distances = np.concatenate([b['distance'][v][b['assigned'][v] == k]
                                for b, v in zip(batches, keep)])
    dots = np.concatenate([b['dot'][v][b['assigned'][v] == k] for b, v in zip(batches, keep)])
    assert counts[k] == distances.size
    for q in (97, 99):
      assert thresholds['distance'][q][k] == np.percentile(distances, q)
      assert thresholds['dot_product'][q][k] == np.quantile(dots, 1 - q / 100)
  assert counts[2] == 0 and thresholds['distance'][99][2] is None
  assert thresholds['dot_product'][97][2] is None


def test_part_sample_is_bounded_and_uniform():
  rng = np.random.default_rng(0)
  sample = ev.PartSample(1000, rng)
  for start in range(0, 20_000, 700):
    values = np.arange(start, min(start + 700, 20_000), dtype=np.float32)
    sample.add(np.stack([values, -values], axis=-1))
  rows = sample.rows()
  assert sample.seen == 20_000 and rows.shape == (1000, 2)
  assert np.unique(rows[:, 0]).size == 1000 and np.array_equal(rows[:, 1], -rows[:, 0])
  assert abs(np.median(rows[:, 0]) - 10_000) < 1000  # an unbiased sample of 0..19999


def test_load_thresholds(tmp_path):
  path = tmp_path / 't.json'
  path.write_text(json.dumps({'rule': 'distance', 'q': 99, 'thresholds': [1.5, None, 3]}))
  assert ev.load_thresholds(path, 3) == ((1.5, np.inf, 3.0), 'distance')
  with pytest.raises(ValueError, match='hold 3 values; the model has 2 parts'):
    ev.load_thresholds(path, 2)
  with pytest.raises(ValueError, match="for rule 'distance', not 'dot_product'"):
    ev.load_thresholds(path, 3, 'dot_product')
  path.write_text(json.dumps({'1': 0.25, '0': 0.5}))  # the reference's format, keys by part
  assert ev.load_thresholds(path, 2, 'dot_product') == ((0.5, 0.25), 'dot_product')
  with pytest.raises(ValueError, match='set eval.threshold_rule'):
    ev.load_thresholds(path, 2)
  for content, error in (({'rule': 'cosine', 'thresholds': [1]}, "rule 'cosine'"),
                         ({'a': 1}, 'expected'), ({'rule': 'distance', 'thresholds': ['x']},
                                                  'numbers or null')):
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=error):
      ev.load_thresholds(path, 1)
  with pytest.raises(ValueError, match='cannot read'):
    ev.load_thresholds(tmp_path / 'missing.json', 1)


# ----------------------------------------------------------------------------
# The audit can fail
# ----------------------------------------------------------------------------
def test_audit_detects_a_stage2_that_reads_masked_out_pixels():
  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8)
  fg_mask = np.zeros((4, 2, 2), np.float32)
  fg_mask[:, 0, 0] = 1  # one of four 4x4 patches kept
  batch_sharding = single_device_batch_sharding()
  batch = {'image': images, 'label': np.zeros(4, np.int32), 'group': np.zeros(4, np.int32),
           'valid': np.array([1, 1, 1, 0], np.int32)}

  def forward(params, frozen, batch, rng):
    del params, frozen, rng
    return {'fg_mask': jnp.asarray(fg_mask), 'patch_mask': jnp.asarray(fg_mask.reshape(4, -1)),
            'kept_fraction': jnp.full(4, 0.25), 'logits': jnp.zeros((4, 3))}

  def audit(stage2):
    step = ev.make_audit_step(forward, jax.jit(stage2))
    outputs = ev.collect_outputs(step, {}, {}, [batch], 1, batch_sharding, seed=0)
    return ev.summarize_audit(outputs, num_images=64)

  def honest(params, frozen, images, patch_mask):  # reads kept patches only
    keep = ev.upsample_patches(patch_mask.reshape(-1, 2, 2), 8, 8)[..., None]
    return jnp.mean(jnp.where(keep > 0, images, 0).astype(jnp.float32), axis=(1, 2))

  def leaky(params, frozen, images, patch_mask):
    return jnp.mean(images.astype(jnp.float32), axis=(1, 2))

  assert audit(honest) == {'num_images': 3, 'unchanged_noise': 1.0,
                           'unchanged_other_image': 1.0, 'mean_kept_fraction': 0.25,
                           'forward_max_abs_diff': pytest.approx(
                               np.abs(honest(0, 0, images, fg_mask.reshape(4, -1))[:3]).max())}
  leaked = audit(leaky)
  assert leaked['unchanged_noise'] == 0.0 and leaked['unchanged_other_image'] == 0.0


# ----------------------------------------------------------------------------
# Entry points on a tiny trained workdir
# ----------------------------------------------------------------------------
def tiny_config():
  """iFAM with 2 parts, a one-block 16-wide ViT on 56 px synthetic images, 2 training steps."""
  c = config_lib.base_config()
  config_lib.shrink_for_local_run(c)
  c.optim.groups = optim.ifam_groups(freeze_backbone=False)
  c.global_batch_size, c.total_epochs, c.max_steps = 4, 100, 2
  c.model.image_size, c.model.num_parts = 56, NUM_PARTS
  c.model.vit_overrides = dict(width=16, depth=1, num_heads=2, mlp_hidden=32)
  synthetic = dict(source='synthetic', image_size=56, num_classes=2)
  c.data.train = dict(synthetic, split='train', num_examples=8)
  c.data.evals = dict(val=dict(synthetic, split='val', num_examples=6),
                      test=dict(synthetic, split='test', num_examples=10))
  c.data.augment = 'none'
  c.data.eval_batch_size = 4
  c.eval_every_epochs = 100.0
  c.checkpoint_every_steps = 2
  c.loss.presence_group_size = 0
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory, xla_cache):  # pylint: disable=redefined-outer-name,unused-argument
  """(config, workdir): trained; plus an IN-9 layout and mapping under workdir/in9.

  The entry points compile the same steps again (one session each): the cache serves them.
  """
  workdir = tmp_path_factory.mktemp('workdir')
  config = tiny_config()
  train.train_and_evaluate(config, str(workdir))
  root = workdir / 'in9'
  make_challenge(root, size=64)
  for variant, values in (('mixed_same', (40, 200)), ('mixed_rand', (120, 60))):
    for cls, value in zip(('00_dog', '01_bird'), values):
      for i in range(2):
        write_image(root / variant / 'val' / cls / f'{i}.JPEG', value + 10 * i, (64, 64), 'PNG')
  (root / 'in_to_in9.json').write_text(json.dumps({'0': 0, '1': -1}))
  return config, workdir


def with_eval(config, **kw):
  c = copy.deepcopy(config)
  c.eval.update(kw)
  return c


def read_json(path):
  return json.loads(path.read_text())


def stage1_outputs(config, workdir, spec):
  """Our own eval forward of the saved model over the source `spec` (eval transform):
  (part_maps, part_logits, part_similarity) as numpy."""
  model = workdir_lib.load_model(config, workdir)
  source = factory.make_source(spec)
  transform = factory.make_transforms(config)[1]
  rng = np.random.default_rng(0)
  images = np.stack([data_lib.transforms.process(source[i], rng, transform)['image']
                     for i in range(len(source))])

  @jax.jit
  def forward(images):
    out = model(data_lib.normalize(images), train=False)
    return out.part_maps, out.part_logits, out.part_similarity

  return jax.device_get(forward(images))


def test_run_eval(trained):
  config, workdir = trained
  report = ev.run_eval(config, workdir)
  assert read_json(workdir / 'eval' / 'final' / 'eval.json') == report
  assert sorted(report['evals']) == ['test', 'val'] and report['step'] == 2
  # The same loop as training's evals: the same numbers for the same parameters.
  assert report['evals'] == read_json(workdir / 'params' / 'final.json')['evals']
  val = report['evals']['val']
  assert val['num_examples'] == 6 and len(val['group_accuracy']) == 4
  assert {'auroc', 'worst_group_accuracy_minority', 'fg_iou', 'fg_iou_image_mean',
          'stage1', 'fg_fraction'} <= val.keys()

  with pytest.raises(ValueError, match=r"eval.splits \['nope'\] are not evals"):
    ev.run_eval(with_eval(config, splits=('nope',)), workdir)
  only_val = ev.run_eval(with_eval(config, splits=('val',)), workdir)
  assert list(only_val['evals']) == ['val'] and only_val['evals']['val'] == val


def test_run_eval_in9_mapping_bg_gap_and_challenge(trained):
  config, workdir = trained
  in9 = workdir / 'in9'
  variants = ('mixed_same', 'mixed_rand')
  with pytest.raises(ValueError, match='needs eval.in9_mapping'):
    ev.run_eval(with_eval(config, in9_root=str(in9), in9_variants=variants), workdir)
  config = with_eval(config, in9_root=str(in9), in9_variants=variants,
                     in9_mapping=str(in9 / 'in_to_in9.json'),
                     splits=('in9_mixed_same', 'in9_mixed_rand', 'bg_challenge'))
  report = ev.run_eval(config, workdir)
  assert sorted(report['evals']) == ['in9_mixed_rand', 'in9_mixed_same']
  for metrics in report['evals'].values():
    assert metrics['num_examples'] == 4
    assert metrics['class_accuracy']['01_bird'] == 0.0  # model class 1 maps to -1
  accuracy = {v: report['evals'][f'in9_{v}']['accuracy'] for v in variants}
  assert report['in9_accuracy'] == accuracy
  assert report['bg_gap'] == accuracy['mixed_same'] - accuracy['mixed_rand']
  challenge = report['bg_challenge']
  assert challenge['num_foregrounds'] == 2 and challenge['num_vulnerable'] >= 1  # the bird
  assert challenge['accuracy'] == 1 - challenge['num_vulnerable'] / 2


def test_eval_splits_are_labelled_by_the_training_classes(trained, tmp_path):
  """A folder eval split lacking a training class keeps the training labels; an unknown class
  folder fails, naming it."""
  config, workdir = trained
  c = copy.deepcopy(config)
  for split, names in (('train', ('n01', 'n02')), ('val', ('n02',))):
    for name in names:
      write_image(tmp_path / split / name / 'x.jpg', size=(56, 56))
  c.data.train = dict(source='folder', root=str(tmp_path / 'train'))
  c.data.evals = {'val': dict(source='folder', root=str(tmp_path / 'val'))}
  session = ev._Session(c, workdir, 'final')  # pylint: disable=protected-access
  source = session.splits()['val'].source
  assert source.class_names == ['n01', 'n02'] and source[0]['label'] == 1
  write_image(tmp_path / 'val' / 'n03' / 'x.jpg', size=(56, 56))
  with pytest.raises(ValueError, match=f'class folder {tmp_path / "val" / "n03"} is not in'):
    session.splits()


def test_run_calibrate_and_thresholded_eval(trained):
  config, workdir = trained
  paths = ev.run_calibrate(config, workdir)
  assert sorted(p.name for p in paths) == ['distance_q97.json', 'distance_q99.json',
                                           'dot_product_q97.json', 'dot_product_q99.json']
  assert all(p.parent == workdir / 'thresholds' / 'final' for p in paths)

  # Against numpy on our own forward pass over the training split.
  maps, logits, similarity = stage1_outputs(config, workdir, config.data.train)
  assigned = maps.argmax(-1)
  for path in paths:
    saved = read_json(path)
    assert (saved['which'], saved['sampled']) == ('final', False)
    for k, tau in enumerate(saved['thresholds']):
      picked = assigned == k
      assert saved['tokens_per_part'][k] == picked.sum()
      if saved['rule'] == 'distance':
        want = np.percentile(-logits[..., k][picked], saved['q'])
      else:
        want = np.quantile(similarity[..., k][picked], 1 - saved['q'] / 100)
      assert (tau is None) == (not picked.any())
      if tau is not None:
        assert tau == pytest.approx(want, rel=1e-4, abs=1e-4)

  distance = ev.run_eval(with_eval(config, thresholds=str(paths[0])), workdir)
  assert distance['thresholds']['rule'] == 'distance'
  for name, metrics in distance['evals'].items():  # the distance rule only rejects tokens
    assert metrics['fg_fraction'] <= distance['evals_without_thresholds'][name]['fg_fraction']
  # The reference's format ({"0": tau_0, ...}) names no rule: the config must.
  reference_format = workdir / 'reference_0.99.json'
  dots = read_json(workdir / 'thresholds' / 'final' / 'dot_product_q99.json')['thresholds']
  reference_format.write_text(json.dumps({str(k): v for k, v in enumerate(dots)}))
  with pytest.raises(ValueError, match='set eval.threshold_rule'):
    ev.run_eval(with_eval(config, thresholds=str(reference_format)), workdir)
  dot = ev.run_eval(with_eval(config, thresholds=str(reference_format),
                              threshold_rule='dot_product', splits=('val',)), workdir)
  assert dot['thresholds']['rule'] == 'dot_product' and list(dot['evals']) == ['val']


def test_run_leave_one_out(trained):
  config, workdir = trained
  report = ev.run_leave_one_out(config, workdir)
  assert read_json(workdir / 'eval' / 'final' / 'leave_one_out.json') == report
  assert report['part_removal'] == 'reference'
  plain = read_json(workdir / 'params' / 'final.json')['evals']  # = run_eval's (test_run_eval)
  # Parts known from our own forward pass: removing part i drops exactly its tokens.
  for name, rows in report['splits'].items():
    assert [r['removed_parts'] for r in rows] == [[], [0], [1]]
    assert {k: v for k, v in rows[0].items() if k != 'removed_parts'} == plain[name]
    assigned = stage1_outputs(config, workdir, config.data.evals[name])[1].argmax(-1)
    for row in rows[1:]:
      kept = (assigned < NUM_PARTS) & ~np.isin(assigned, row['removed_parts'])
      assert row['fg_fraction'] == pytest.approx(kept.mean(), abs=1e-6)
      assert row['stage1'] == rows[0]['stage1']  # the reference scores stage 1 before removal

  # 'renormalise' rescores stage 1 on the edited maps; the hard mask, hence stage 2, is the same.
  renormalised = ev.run_leave_one_out(with_eval(config, splits=('val',),
                                                part_removal='renormalise'), workdir)
  rows = report['splits']['val']
  for row, other in zip(rows, renormalised['splits']['val']):
    assert {k: v for k, v in row.items() if k != 'stage1'} == {
        k: v for k, v in other.items() if k != 'stage1'}
  assert any(row['stage1'] != rows[0]['stage1'] for row in renormalised['splits']['val'][1:])
  with pytest.raises(ValueError, match='eval.part_removal'):
    ev.run_leave_one_out(with_eval(config, part_removal='both'), workdir)

  fixed = ev.run_leave_one_out(with_eval(config, splits=('val',)), workdir, fixed_parts=(0,))
  assert (workdir / 'eval' / 'final' / 'leave_one_out_fixed_0.json').exists()
  assert [r['removed_parts'] for r in fixed['splits']['val']] == [[], [0], [0, 1]]
  with pytest.raises(ValueError, match='outside the parts'):
    ev.run_leave_one_out(config, workdir, fixed_parts=(2,))


def test_run_audit(trained):
  config, workdir = trained
  report = ev.run_audit(config, workdir, num_images=5)
  assert read_json(workdir / 'eval' / 'final' / 'audit.json') == report
  assert report['passed']
  for name, m in report['splits'].items():
    assert m['num_images'] == 5
    assert m['unchanged_noise'] == 1.0 and m['unchanged_other_image'] == 1.0
    assert 0.0 <= m['mean_kept_fraction'] <= 1.0
    assert m['forward_max_abs_diff'] < 1e-5, name


def test_eval_gumbel_noise_is_seeded(trained):
  config, workdir = trained
  noisy = with_eval(config, splits=('val',))
  noisy.model.eval_gumbel_noise = True  # the reference's stochastic eval, from config.seed
  assert ev.run_eval(noisy, workdir)['evals'] == ev.run_eval(noisy, workdir)['evals']


def test_load_model_from_a_train_checkpoint(trained):
  config, workdir = trained
  last = read_json(workdir / 'params' / 'final.json')['step']
  assert workdir_lib.read_params_info(workdir, f'step_{last}') == {'step': last, 'num_classes': 2,
                                                             'ema': False}
  # Without EMA, params/final is saved from the state of the last checkpoint.
  got = nnx.state(workdir_lib.load_model(config, workdir, f'step_{last}'))
  want = nnx.state(workdir_lib.load_model(config, workdir))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  report = ev.run_eval(with_eval(config, splits=('val',)), workdir, f'step_{last}')
  assert report['step'] == last
  assert report['evals']['val'] == read_json(workdir / 'params' / 'final.json')['evals']['val']
  with pytest.raises(FileNotFoundError, match=rf'step {last + 1} .*available steps: \[{last}\]'):
    workdir_lib.load_model(config, workdir, f'step_{last + 1}')


def _eight_device_worker(workdir: str) -> None:
  """run_eval and run_audit on 8 CPU devices, data=4 x fsdp=2 with sharded kernels."""
  config = with_eval(tiny_config(), splits=('val',))
  config.data.eval_batch_size = 8
  config.mesh = (('data', 4), ('fsdp', 2))
  config.sharding_rules = (('.*kernel', 'fsdp'), ('.*', 'replicate'))
  config.fsdp_min_size = 1
  result = {'evals': ev.run_eval(config, workdir)['evals'],
            'audit': ev.run_audit(config, workdir, num_images=8)['passed']}
  (pathlib.Path(workdir) / 'eight_devices.json').write_text(json.dumps(result))


def test_eight_devices_with_fsdp_match_one_device(trained):
  config, workdir = trained
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(pathlib.Path(__file__).parent),
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  subprocess.run([sys.executable, '-c', 'import test_evaluate; '
                  f'test_evaluate._eight_device_worker("{workdir}")'], env=env, check=True,
                 capture_output=True, timeout=300)
  eight = read_json(workdir / 'eight_devices.json')
  assert eight['audit']
  one = with_eval(config, splits=('val',))
  one.data.eval_batch_size = 8
  expected = ev.run_eval(one, workdir)['evals']['val']
  got = eight['evals']['val']
  assert got.keys() == expected.keys()
  for key in ('num_examples', 'accuracy', 'class_accuracy', 'group_accuracy'):
    assert got[key] == expected[key], key
  for key in ('fg_fraction', 'fg_iou', 'auroc'):
    assert got[key] == pytest.approx(expected[key], abs=1e-6), key
