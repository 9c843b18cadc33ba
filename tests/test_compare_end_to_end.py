"""The comparison command end to end: the demo's methods on its synthetic data, and the peers on a
Waterbirds-layout folder with a tiny DINOv2-format weights file standing in for real weights."""

import json
import pathlib

import numpy as np
import pytest
from etils import epath
from PIL import Image

from ifam_jax import compare
from fixtures import tiny_config
from test_configs import get_config

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TINY_DINOV2 = FIXTURES / 'timm_dinov2_reg_tiny.safetensors'  # D=64, depth 2, 4 heads, 4 registers


def demo_compare_config():
  demo = tiny_config.load_demo_module()
  c = tiny_config.get_config('steps=2')
  c.compare.methods = demo.COMPARE_METHODS
  c.model.stage2_token_tiers = ()
  c.peers.a2.crop_sizes = (8,)
  c.peers.dfr.n_retrain = 2
  c.peers.dar.epochs = 2
  return c


@pytest.mark.slow
def test_demo_compare_runs_every_method_once(tmp_path, capsys):
  c = demo_compare_config()
  workdir = epath.Path(tmp_path)
  report = compare.run_compare(c, workdir, list(c.compare.methods))
  assert list(report['methods']) == list(c.compare.methods)
  printed = capsys.readouterr().out
  for name, row in report['methods'].items():
    assert 0.0 <= row['mean']['accuracy'] <= 1.0, name
    assert row['label'] in printed
  assert 'stand-in' in report['methods']['a2']['label']
  assert 'fg_fraction' in report['methods']['late_mask_gt']['mean']
  for name in ('ifam', 'late_mask'):  # trained with a mask: its geometry audit on the split
    leak = report['results'][name]['0']['mask_leak']
    assert leak['split'] == 'test' and leak['num_images'] == 16
    assert report['methods'][name]['mean']['empty_mask_rate'] == leak['empty_rate']
  assert 'mask_leak' not in report['results']['erm']['0']
  assert 'mask_leak' not in report['results']['early_mask_gt']['0']  # given, not decided
  assert 'minority_accuracy_pooled' in report['methods']['dfr']['mean']
  assert (tmp_path / 'compare.png').exists()
  assert json.loads((tmp_path / 'compare.json').read_text())['split'] == 'test'
  stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob('*/seed_0/result.json')}
  assert len(stamps) == len(c.compare.methods)
  again = compare.run_compare(c, workdir, list(c.compare.methods))  # nothing reruns
  assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
  assert again['methods'] == report['methods']


def write_waterbirds(root: pathlib.Path, rng: np.random.Generator) -> None:
  """A square bird (yellow: landbird, red: waterbird) on a land (green) or water (blue) scene;
  95 % of training birds sit on their own scene, val and test hold 4 of each group."""
  rows = ['img_id,img_filename,y,split,place']
  splits = [(0, y, y if rng.random() < 0.95 else 1 - y) for y in (0, 1) for _ in range(20)]
  splits += [(s, y, p) for s in (1, 2) for y in (0, 1) for p in (0, 1) for _ in range(4)]
  for i, (split, y, place) in enumerate(splits):
    image = np.zeros((32, 32, 3), np.uint8)
    image[:] = (40, 160, 40) if place == 0 else (40, 60, 200)
    top, left = rng.integers(4, 16, size=2)
    image[top:top + 12, left:left + 12] = (230, 210, 30) if y == 0 else (210, 30, 30)
    name = f'{y:03d}.Bird/{i}.jpg'
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / name)
    rows.append(f'{i},{name},{y},{split},{place}')
  (root / 'metadata.csv').write_text('\n'.join(rows) + '\n')


@pytest.mark.slow
def test_waterbirds_folder_with_dinov2_weights(tmp_path):
  root = tmp_path / 'waterbirds'
  write_waterbirds(root, np.random.default_rng(0))
  c = get_config('waterbirds', f'root={root},weights={TINY_DINOV2}')
  c.model.image_size = 56
  c.model.dtype = 'float32'
  c.model.vit_overrides = dict(width=64, depth=2, num_heads=4, mlp_hidden=256)
  c.global_batch_size = 8
  c.max_steps = 2
  c.data.num_workers = 0
  c.data.eval_batch_size = 8
  c.loss.presence_group_size = 0
  c.peers.extractor = 'dinov2'
  c.peers.dfr.n_retrain = 2
  c.peers.dar.epochs = 2
  c.peers.a2.update(attention_weights=str(TINY_DINOV2), attention_variant='S/14',
                    attention_overrides=dict(width=64, depth=2, num_heads=4, mlp_hidden=256),
                    crop_sizes=(16,))
  methods = ['erm', 'ifam', 'late_mask', 'dfr', 'dar', 'a2', 'ifam_no_stage2']
  workdir = epath.Path(tmp_path / 'compare')
  report = compare.run_compare(c, workdir, methods)
  rows = report['methods']
  assert list(rows) == methods
  assert rows['a2']['backbone'].startswith('DINOv2 S/14 x DINOv2 B/14')
  assert 'stand-in' not in rows['a2']['label']
  assert 'DINOv2' in rows['dfr']['backbone']
  for row in rows.values():  # Waterbirds: both worst-group variants and the train-weighted mean
    assert {'worst_group_accuracy', 'worst_group_accuracy_minority',
            'accuracy_train_weighted'} <= set(row['mean'])
  assert not (workdir / 'erm').exists() or 'erm' in methods  # no stand-in run was needed
  with pytest.raises(ValueError, match='ground-truth'):  # before anything trains
    compare.check_methods(['dfr', 'early_mask_gt'], c)
