"""The four CLI evaluation modes end to end on a tiny synthetic workdir trained for two steps
(with an IN-9 layout and mapping file). The evaluators' own tests: test_evaluators_*.py."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from ifam_jax import config_lib, factory, optim, train
from ifam_jax import workdir as workdir_lib
from ifam_jax import data as data_lib
from ifam_jax import evaluate as ev
from test_configs import xla_cache  # noqa: F401  (a fixture)
from test_data import write_image
from test_evaluators_in9 import make_challenge

NUM_PARTS = 2


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
  model = factory.load_model(config, workdir)
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
  session = ev.Session(c, workdir, 'final')
  source = session.splits()['val'].source
  assert source.class_names == ['n01', 'n02'] and source[0]['label'] == 1
  write_image(tmp_path / 'val' / 'n03' / 'x.jpg', size=(56, 56))
  with pytest.raises(ValueError, match=f'class folder {tmp_path / "val" / "n03"} is not in'):
    session.splits()


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_run_audit_measures_the_mask_geometry(trained, capsys):
  """The geometry audit against our own forward over the first images of a larger test split;
  a split without (class, background) groups is skipped; a leak leaves the audit passed."""
  config, workdir = trained
  in9 = workdir / 'in9'
  c = with_eval(config, splits=('test', 'in9_mixed_same'), leak_num_images=36,
                leak_auroc_threshold=0.5, in9_root=str(in9), in9_variants=('mixed_same',),
                in9_mapping=str(in9 / 'in_to_in9.json'))
  c.data.evals.test.num_examples = 40
  report = ev.run_audit(c, workdir, num_images=5)
  assert report['passed'] and report['splits']['test']['num_images'] == 5
  assert 'skipped' in report['splits']['in9_mixed_same']['mask_geometry']
  geometry = report['splits']['test']['mask_geometry']

  model = factory.load_model(config, workdir)
  source = factory.make_source(c.data.evals.test)
  rng = np.random.default_rng(0)
  records = [data_lib.transforms.process(source[i], rng, factory.make_transforms(c)[1])
             for i in range(36)]
  images = np.stack([r['image'] for r in records])
  fg_mask = np.asarray(jax.jit(lambda x: model(data_lib.normalize(x), train=False).fg_mask)(
      images))
  visible = fg_mask.reshape(36, -1) > 0.5
  labels = np.array([r['label'] for r in records])
  place = np.array([r['group'] for r in records]) % 2
  names = source.group_names
  assert geometry['num_images'] == 36 and geometry['attribute'] == 'background'
  for g, name in enumerate(names):
    members = (2 * labels + place) == g
    assert geometry['empty_rate_by_group'][name] == (~visible[members].any(1)).mean()
    assert geometry['visible_fraction_by_group'][name] == pytest.approx(visible[members].mean())
  count = visible.sum(1)
  count_auroc = []
  for y in (0, 1):
    auc = roc_auc_score(place[labels == y], count[labels == y])
    count_auroc.append(max(auc, 1 - auc))
  assert geometry['count_auroc'] == pytest.approx(np.mean(count_auroc))
  assert geometry['leak'] and geometry['auroc'] >= geometry['count_auroc']  # threshold 0.5
  p = images.shape[1] // fg_mask.shape[1]
  truth = np.stack([r['fg_mask'] for r in records]).reshape(36, fg_mask.shape[1], p, -1, p)
  truth = truth.mean((2, 4)).reshape(36, -1)
  if visible.any():
    edge = visible & (truth > 0) & (truth < 1)
    assert geometry['edge_share'] == pytest.approx(edge.sum() / visible.sum())
    assert geometry['background_share'] == pytest.approx((visible & (truth == 0)).sum()
                                                         / visible.sum())
  printed = capsys.readouterr().out
  assert 'mask→attribute AUROC' in printed and f'test: {geometry["verdict"]}' in printed
  assert 'in9_mixed_same: mask-geometry audit skipped' in printed


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
  got = nnx.state(factory.load_model(config, workdir, f'step_{last}'))
  want = nnx.state(factory.load_model(config, workdir))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  report = ev.run_eval(with_eval(config, splits=('val',)), workdir, f'step_{last}')
  assert report['step'] == last
  assert report['evals']['val'] == read_json(workdir / 'params' / 'final.json')['evals']['val']
  with pytest.raises(FileNotFoundError, match=rf'step {last + 1} .*available steps: \[{last}\]'):
    factory.load_model(config, workdir, f'step_{last + 1}')


def _eight_device_worker(workdir: str) -> None:
  """run_eval and run_audit on 8 CPU devices, data=4 x fsdp=2 with sharded kernels."""
  config = with_eval(tiny_config(), splits=('val',))
  config.data.eval_batch_size = 8
  config.mesh = (('data', 4), ('fsdp', 2))
  config.sharding_rules = (('.*kernel', 'fsdp'), ('.*', 'replicate'))
  config.fsdp_min_size = 1
  audited = ev.run_audit(config, workdir, num_images=8)
  result = {'evals': ev.run_eval(config, workdir)['evals'], 'audit': audited['passed'],
            'geometry': audited['splits']['val']['mask_geometry']}
  (pathlib.Path(workdir) / 'eight_devices.json').write_text(json.dumps(result))


@pytest.mark.slow
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
  geometry = ev.run_audit(one, workdir, num_images=8)['splits']['val']['mask_geometry']
  assert eight['geometry'] == geometry  # the same masks, gathered in order
  expected = ev.run_eval(one, workdir)['evals']['val']
  got = eight['evals']['val']
  assert got.keys() == expected.keys()
  for key in ('num_examples', 'accuracy', 'class_accuracy', 'group_accuracy'):
    assert got[key] == expected[key], key
  for key in ('fg_fraction', 'fg_iou', 'auroc'):
    assert got[key] == pytest.approx(expected[key], abs=1e-6), key
