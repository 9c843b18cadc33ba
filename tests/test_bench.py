"""Benchmark: every mode yields its JSON fields on a tiny CPU config; the FLOP accounting."""

import gc
import gzip
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ifam_jax import bench, config_lib, factory, optim, sharding
from ifam_jax.models import ifam
from fixtures.tiny_config import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = dict(warmup=1, windows=1, steps=1)
KEYS = {'device_kind', 'platform', 'mode', 'image_size', 'num_parts', 'batch', 'img_per_sec',
        'step_time_ms', 'attention', 'flops_per_image', 'mfu', 'peak_flops',
        'peak_flops_source', 'peak_memory_gib', 'compile_s'}


def test_vit_forward_flops_matches_hand_count():
  cfg = factory.vit_from_config(get_config().model)  # 32 px, patch 8, width 32, depth 1, mlp 64
  n, t, d, h = 16, 16 + 5, 32, 64
  expected = 2 * n * 8 * 8 * 3 * d + (2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d
                                      + 4 * t * d * h)
  assert bench.vit_forward_flops(cfg) == expected
  assert bench.vit_forward_flops(cfg, 8) < expected
  base = config_lib.base_config().model
  base.update(variant='B/14', image_size=224, num_registers=4, dtype='bfloat16', attention='xla')
  assert bench.vit_forward_flops(factory.vit_from_config(base)) == pytest.approx(47e9, rel=0.01)


def test_keep_count_rounds_up_to_multiple_of_8():
  assert bench.keep_count_for(0.25, 256) == 64
  assert bench.keep_count_for(0.3, 16) == 8
  assert bench.keep_count_for(1.0, 20) == 20


@pytest.mark.slow
def test_train_reports_the_reference_accounting():
  config = get_config()
  result = bench.bench_train(config, num_classes=4, **TIMING)
  assert KEYS <= result.keys() and result['mode'] == 'train' and result['batch'] == 8
  assert result['img_per_sec'] > 0 and result['compile_s'] > 0
  # Reference groups: stage-1 blocks and patch embedding frozen but its tokens train (2x blocks,
  # 1x embed), twice (the equivariance pass); stage 2 trains fully (3x blocks, 2x embed).
  # Stage 2's blocks count at the mean fraction of tokens the packed step computed.
  cfg = factory.vit_from_config(config.model)
  tokens = result['stage2_tokens'] * cfg.num_patches
  assert 0 < tokens < cfg.num_patches
  expected = (2 * bench.vit_forward_flops(cfg, None, 1, 2)
              + bench.vit_forward_flops(cfg, tokens, 2, 3))
  assert result['flops_per_image'] == pytest.approx(expected)
  assert result['dense_flops_per_image'] == pytest.approx(
      2 * bench.vit_forward_flops(cfg, None, 1, 2) + bench.vit_forward_flops(cfg, None, 2, 3))
  json.dumps(result)


def test_timed_windows_run_with_the_collector_frozen():
  """Full collections walk every object compilation left behind, long enough to starve the
  device; the timed steps run after those objects are frozen, as in the train loop."""
  frozen_at_call = []

  def run():
    frozen_at_call.append(gc.get_freeze_count())
    return jnp.zeros(())

  gc.unfreeze()
  try:
    times = bench.time_windows(run, warmup=2, windows=2, steps=3)
  finally:
    gc.unfreeze()
  assert len(times) == 2
  assert frozen_at_call[:2] == [0, 0]
  assert len(frozen_at_call) == 8 and all(n > 0 for n in frozen_at_call[2:])


@pytest.mark.slow
def test_infer_gather_costs_less_than_dense():
  dense, gathered = bench.bench_infer(get_config(), fg_fractions=[0.25], batch=4, num_classes=4,
                                      **TIMING)
  assert KEYS | {'stage2_img_per_sec'} <= dense.keys()
  assert not dense['gather'] and gathered['gather']
  assert (dense['keep_count'], gathered['keep_count']) == (16, 8)
  assert gathered['flops_per_image'] < dense['flops_per_image']


@pytest.mark.slow
@pytest.mark.parametrize('keep_count', [None, 8])
def test_stage2_alone_is_the_eval_forwards_stage2(keep_count):
  """The timed stage-2-only step computes the full eval step's stage-2 logits, without stage 1."""
  config = get_config()
  model = factory.build_model(config.model, 4, nnx.Rngs(0))
  graphdef, params, frozen, rest = optim.split_frozen(model, config.optim.group_rules,
                                                      config.optim.groups)
  size = config.model.image_size
  images = jax.random.uniform(jax.random.key(1), (2, size, size, 3))
  mask = (jax.random.uniform(jax.random.key(2), (2, 16)) < 0.4).astype(jnp.float32)
  full = bench.make_infer_step(graphdef, rest, keep_count)(params, frozen, images, mask)
  alone = bench.make_infer_step(graphdef, rest, keep_count, with_stage1=False)(
      params, frozen, images, mask)
  assert full[1] is not None and alone[1] is None
  assert jnp.array_equal(full[0], alone[0])


def test_profile_summary_reads_device_streams_only(tmp_path):
  """A GPU-shaped Perfetto trace: stream kernels are summed per step, host and op lines are not."""
  meta = [
      {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'pid': 2, 'tid': 7, 'name': 'thread_name', 'args': {'name': 'Stream #13(Compute)'}},
      {'ph': 'M', 'pid': 2, 'tid': 8, 'name': 'thread_name', 'args': {'name': 'XLA Ops'}},
  ]
  kernels = [('nvjet_hsh_256x128_gemm', 3000.0), ('cudnn_generated_fort_native_sdpa', 1000.0),
             ('loop_add_fusion', 500.0), ('nvjet_hsh_256x128_gemm', 1000.0)]
  events = meta + [{'ph': 'X', 'pid': 2, 'tid': 7, 'ts': 0, 'dur': d, 'name': n}
                   for n, d in kernels]
  events += [{'ph': 'X', 'pid': 2, 'tid': 8, 'ts': 0, 'dur': 9e9, 'name': 'fusion.1'},
             {'ph': 'X', 'pid': 1, 'tid': 3, 'ts': 0, 'dur': 9e9, 'name': 'gemm on host'}]
  path = tmp_path / 'perfetto_trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  summary = bench.summarize_trace(path, steps=2)
  assert summary['device_ms_per_step'] == 2.75
  assert summary['device_ms_by_family'] == {'matmul': 2.0, 'attention': 0.5, 'fusion': 0.25}
  assert summary['top_kernels_ms'][0] == ['nvjet_hsh_256x128_gemm', 2.0]


@pytest.mark.slow
def test_train_with_a_forced_foreground_fraction():
  """Every patch, then half of them, in every image (no part dropout): stage 2 computes all
  tokens, then exactly the 0.5 tier; the model's mask is restored afterwards."""
  config = get_config()
  config.model.mask_part_dropout = 0.0
  original = ifam.IFAM.foreground_mask
  for fraction in (1.0, 0.5):
    result = bench.bench_train(config, num_classes=4, fg_fraction=fraction, **TIMING)
    assert result['forced_fg_fraction'] == fraction
    assert result['fg_fraction'] == pytest.approx(fraction)
    assert result['stage2_tokens'] == pytest.approx(fraction)  # tiers 0, 0.5, 1
  assert ifam.IFAM.foreground_mask is original
  with pytest.raises(ValueError, match='train_fg_fraction'):
    bench.bench_train(config, num_classes=4, fg_fraction=1.5, **TIMING)


@pytest.mark.slow
def test_train_profile_on_cpu(tmp_path):
  result = bench.bench_train(get_config(), num_classes=4, profile_dir=str(tmp_path), **TIMING)
  assert result['profile']['traced_wall_ms_per_step'] > 0
  assert list(tmp_path.glob('plugins/profile/*/perfetto_trace.json.gz'))


def test_data_mode_from_generated_jpegs(tmp_path):
  bench.write_random_jpegs(tmp_path, count=8, size=(50, 40))
  (result,) = bench.bench_data(get_config(), data_dir=str(tmp_path), num_workers=[0], batch=4,
                               batches=2)
  assert result['mode'] == 'data' and result['img_per_sec_per_core'] == result['img_per_sec'] > 0


@pytest.mark.slow
def test_command_line_prints_json_lines():
  out = subprocess.run(
      [sys.executable, '-m', 'ifam_jax.bench',
       f'--config={REPO / "tests" / "fixtures" / "tiny_config.py"}',
       '--mode=infer', '--fg_fraction=0.5', '--batch=2', '--num_classes=4', '--warmup=1',
       '--windows=1', '--steps=1', '--peak_flops=1e12'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'}).stdout
  lines = [json.loads(line) for line in out.splitlines()]
  assert [r['gather'] for r in lines] == [False, True]
  assert all(KEYS <= r.keys() and r['peak_flops_source'] == 'flag' and r['mfu'] > 0
             for r in lines)


def test_bytes_per_device_follows_the_rules():
  tree = {'a': {'kernel': jax.ShapeDtypeStruct((64, 48), jnp.float32),
                'bias': jax.ShapeDtypeStruct((48,), jnp.float32)},
          'b': {'kernel': jax.ShapeDtypeStruct((6, 5), jnp.bfloat16)}}
  rules = (('.*kernel', 'fsdp'), ('.*', 'replicate'))
  # a/kernel: 64 x 48 fp32 split 8 ways along its largest divisible dim; b/kernel: 6 x 5 has no
  # dimension divisible by 8, so it stays whole, as does the bias (no fsdp rule).
  assert sharding.bytes_per_device(tree, rules, 8, fsdp_min_size=1) == (
      64 * 48 * 4 // 8 + 48 * 4 + 6 * 5 * 2)
  assert sharding.bytes_per_device(tree, rules, 1, fsdp_min_size=1) == (
      64 * 48 * 4 + 48 * 4 + 6 * 5 * 2)
  assert sharding.bytes_per_device(tree, rules, 8, fsdp_min_size=10**6) == (
      64 * 48 * 4 + 48 * 4 + 6 * 5 * 2)


def test_memory_mode_sizes_the_state_per_mesh():
  config = get_config()
  config.optim.ema_decay = 0.9
  replicated, sharded = bench.state_memory(config, variants=['S/14'], devices=2, num_classes=4)
  assert (replicated['mesh'], sharded['mesh']) == ({'data': 2, 'fsdp': 1}, {'data': 1, 'fsdp': 2})
  # Adam keeps two moments per trainable parameter; the EMA one copy.
  assert replicated['opt_state_gib'] == pytest.approx(2 * replicated['params_gib'], rel=1e-3)
  assert replicated['ema_gib'] == replicated['params_gib']
  assert sharded['total_gib'] < replicated['total_gib']


@pytest.mark.slow
def test_losses_mode_is_reproducible_and_trains():
  first, again = (bench.train_losses(get_config(), steps=3, num_classes=4) for _ in range(2))
  assert first['losses'] == again['losses'] and len(first['losses']) == 3
  assert len(set(first['losses'])) == 3  # the batches and the model change from step to step
