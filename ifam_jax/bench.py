"""Speed and scale: `python -m ifam_jax.bench --config configs/<recipe>.py[:args] --mode MODE`.

Prints one JSON line per measurement. `train` and `infer` run on synthetic device-resident
batches (no data loading), so they measure the model, the optimizer and XLA only; `data` measures
the grain pipeline alone; `memory` sizes the training state per device for ViT variants and
meshes without touching a device; `losses` records the first train losses on fixed random
batches, to compare device counts. Parameters are always randomly initialised (`model.init_weights` is
ignored: speed does not depend on the values), so a recipe's weights argument may name anything.

  python -m ifam_jax.bench --config configs/imagenet.py:root=none,weights=none \\
      --config.global_batch_size=128 --mode train

FLOP accounting (`flops_per_image`, analytic, matmuls only; 2 FLOPs per multiply-add): one ViT
forward over T = prefix + M tokens costs the patch embedding over all N_p patches (2 N_p p^2 3 D)
plus, per block, qkv (2 T D 3D), attention scores and values (2 x 2 T^2 D), the output projection
(2 T D^2) and the MLP (2 T D H x 2; SwiGLU's fc1 is 2H wide). LayerNorms, softmax, heads and the
part layers are left out (< 1 %). A backward pass costs one forward for the activation gradients
and one for the weight gradients, and only what is needed is counted: blocks whose weights train
cost 3 forwards; frozen blocks with something trainable before them (the reference's groups train
stage 1's tokens and position embedding, so gradients flow back through every frozen stage-1
block) cost 2; frozen blocks with nothing trainable before them cost 1. The patch embedding never
needs an input gradient: 2 forwards if its kernel trains, else 1. A train step is stage 1 on the
batch + stage 1 on the warped batch (if the equivariance loss is on) + stage 2, each so counted;
at 224 px with the reference's groups that is ~7 ViT-B/14 forwards, ~330 GFLOP per image.
Training stage 2 on its visible tokens only (`model.stage2_token_tiers`) computes fewer: the train
line counts stage 2's blocks at the mean token count the step computed (`stage2_tokens`, a
fraction of the patches, averaged over the timed steps) in `flops_per_image` and the MFU, and
gives the all-token count as `dense_flops_per_image`, the work the reference does.
Inference is one stage-1 forward plus one stage-2 forward over all patches (dense, masked keys) or
over the gathered `keep_count` tokens; the infer line also gives `stage2_img_per_sec`, stage 2
alone, the part of the forward that the gather shrinks. (XLA's own `cost_analysis()` is not
used: on GPUs it leaves out the cuBLAS and cuDNN calls, i.e. nearly all of the work.)
MFU = img/s x flops_per_image / (peak x devices); the peak defaults to the dense bf16 spec of the
device (`--peak_flops` overrides; the reference quotes ~800 TFLOP/s as attainable on an H100).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from PIL import Image

from ifam_jax import data as data_lib
from ifam_jax import config_lib, factory, methods, optim, sharding, train
from ifam_jax.apply import apply
from ifam_jax.models import fast_attention, ifam, vit

# Dense bf16 tensor-core peaks (spec sheets, without sparsity), matched on device_kind.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Recipe file, optionally with :args.',
                                          lock_config=True)
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'infer', 'data', 'memory', 'losses'],
                          'What to measure.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'train/infer: untimed steps after compilation.')
_WINDOWS = flags.DEFINE_integer('windows', 5, 'train/infer: timed windows; the median is reported.')
_STEPS = flags.DEFINE_integer('steps', 10, 'train/infer: steps per window (data: batches; '
                              'losses: train steps).')
_BATCH = flags.DEFINE_integer('batch', 0, 'infer/data batch (default: data.eval_batch_size for '
                              'infer, global_batch_size for data).')
_FG = flags.DEFINE_list('fg_fraction', ['1.0', '0.25'], 'infer: foreground fractions of the '
                        'synthetic stage-2 mask; each is measured dense and token-gathered.')
_TRAIN_FG = flags.DEFINE_list('train_fg_fraction', [], 'train: replace stage 1\'s foreground '
                              'mask by this fraction of random patches (one measurement each; '
                              'see `ForcedForeground`); empty: stage 1\'s own mask.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'train/infer: classifier width.')
_PEAK = flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s per device for MFU (0: the spec of '
                           'the device kind if known, else no MFU).')
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'data: a folder of class folders of JPEGs '
                                '(default: 256 random 500x375 JPEGs in a temp dir).')
_PROFILE = flags.DEFINE_string('profile_dir', '', 'train/infer: also trace `steps` steps into '
                               'this folder (TensorBoard/Perfetto) and add a device-time summary.')
_VARIANTS = flags.DEFINE_list('variants', ['B/14', 'L/14', 'g/14'], 'memory: ViT variants.')
_DEVICES = flags.DEFINE_integer('devices', 8, 'memory: N, for the meshes (N, 1) and (1, N).')
_WORKERS = flags.DEFINE_list('num_workers', ['0', '4', '8'], 'data: grain worker counts.')


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------
def vit_forward_flops(cfg: vit.ViTConfig, num_tokens: int | None = None,
                      embed_factor: int = 1, block_factor: int = 1) -> float:
  """Matmul FLOPs of one image through a ViT with `num_tokens` patch tokens in the blocks.

  `num_tokens` defaults to all patches (the patch embedding always runs on all of them);
  `embed_factor` / `block_factor` scale the two parts for backward passes (module docstring).
  """
  n_p, d, h = cfg.num_patches, cfg.width, cfg.mlp_hidden
  t = cfg.num_prefix + (n_p if num_tokens is None else num_tokens)
  fc1 = 2 * h if cfg.mlp == 'swiglu' else h
  embed = 2 * n_p * cfg.patch_size**2 * 3 * d
  block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * t * d * (fc1 + h)
  return embed_factor * embed + block_factor * cfg.depth * block


def _backward_factors(trainable: Sequence[str], prefix: str) -> tuple[int, int]:
  """(embed, block) factors of the ViT under `prefix` given the trainable parameter names."""
  own = [n for n in trainable if n.startswith(prefix)]
  embed = 2 if any('/patch_embed/' in n for n in own) else 1
  if any('/blocks/' in n for n in own):
    return embed, 3
  upstream = any(not ('/blocks/' in n or '/norm/' in n) for n in own)
  return embed, 2 if upstream else 1


def train_flops_per_image(config: ml_collections.ConfigDict, trainable: Sequence[str],
                          stage2_tokens: float = 1.0) -> float:
  """Analytic FLOPs of one training image (module docstring); `trainable`: parameter names;
  `stage2_tokens`: the fraction of patch tokens stage 2's blocks compute."""
  cfg = factory.vit_from_config(config.model)
  if not methods.get(config.model.kind).has_mask:  # one ViT
    return vit_forward_flops(cfg, None, *_backward_factors(trainable, 'backbone/'))
  stage1 = vit_forward_flops(cfg, None, *_backward_factors(trainable, 'stage1/backbone/'))
  stage2 = vit_forward_flops(cfg, stage2_tokens * cfg.num_patches,
                             *_backward_factors(trainable, 'stage2/backbone/'))
  passes = 2 if config.loss.weights.equivariance else 1
  return passes * stage1 + stage2


def keep_count_for(fraction: float, num_patches: int) -> int:
  """ceil(fraction x N_p) rounded up to a multiple of 8 (friendlier tiles), at most N_p."""
  return min(num_patches, 8 * math.ceil(math.ceil(fraction * num_patches) / 8))


# ----------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------
def device_info() -> dict[str, Any]:
  device = jax.devices()[0]
  return {'device_kind': device.device_kind, 'platform': device.platform,
          'num_devices': jax.device_count()}


def peak_flops(flag_value: float = 0.0) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where it comes from)."""
  if flag_value:
    return flag_value, 'flag'
  kind = jax.devices()[0].device_kind
  for name, value in PEAK_FLOPS.items():
    if name in kind:
      return value, f'{name} dense bf16 spec'
  return None, 'unknown device: pass --peak_flops'


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def time_windows(run: Callable[[], Any], *, warmup: int, windows: int, steps: int) -> list[float]:
  """Seconds per step of each window; `run()` enqueues one step and returns something to wait
  on. Nothing is fetched to the host inside a window."""
  out = None
  for _ in range(warmup):
    out = run()
  jax.block_until_ready(out)
  train.freeze_garbage_collector()  # as the train loop does after its first step
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / steps)
  return times


def _report(config: ml_collections.ConfigDict, mode: str, batch: int, step_s: float,
            flops: float | None, compile_s: float | None,
            peak: float | None = None, peak_source: str = '', **extra: Any) -> dict[str, Any]:
  img_per_sec = batch / step_s
  mfu = (img_per_sec * flops / (peak * jax.device_count())
         if flops is not None and peak else None)
  return {**device_info(), 'mode': mode, 'image_size': config.model.image_size,
          'num_parts': config.model.num_parts, 'batch': batch, **extra,
          'img_per_sec': img_per_sec, 'step_time_ms': 1e3 * step_s,
          'attention': config.model.attention, 'flops_per_image': flops, 'mfu': mfu,
          'peak_flops': peak, 'peak_flops_source': peak_source,
          'peak_memory_gib': peak_memory_gib(), 'compile_s': compile_s}


def random_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` without pretrained weights."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.init_weights = ''
  return config


# Kernel families, matched in order on lower-cased device kernel names.
KERNEL_FAMILIES = (
    ('attention', ('sdpa', 'fmha', 'flash', 'attention')),
    ('matmul', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas', 'dot')),
    ('fusion', ('fusion', 'loop_', 'input_', 'triton', 'reduce', 'transpose', 'copy')),
    ('convolution', ('fprop', 'dgrad', 'wgrad', 'conv2d', 'convolution')),
)


def kernel_family(name: str) -> str:
  lower = name.lower()
  for family, needles in KERNEL_FAMILIES:
    if any(n in lower for n in needles):
      return family
  return 'other'


def summarize_trace(trace_file: str | pathlib.Path, steps: int, top: int = 12) -> dict[str, Any]:
  """Device time per step by kernel family and the `top` kernels, from a Perfetto trace.

  Only the device's stream lines are read (the 'XLA Ops' line repeats their time by HLO op).
  """
  with gzip.open(trace_file, 'rt') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') in ('process_name', 'thread_name'):
      names[(e['pid'], e.get('tid') if e['name'] == 'thread_name' else None)] = e['args']['name']
  device_pids = {pid for (pid, tid), n in names.items() if tid is None and 'device' in n.lower()
                 and 'cpu' not in n.lower()}
  by_kernel: dict[str, float] = {}
  for e in events:
    if e.get('ph') != 'X' or e.get('pid') not in device_pids:
      continue
    thread = names.get((e['pid'], e.get('tid')), '')
    if not thread.lower().startswith('stream'):
      continue
    by_kernel[e['name']] = by_kernel.get(e['name'], 0.0) + e.get('dur', 0.0)
  by_family: dict[str, float] = {}
  for name, us in by_kernel.items():
    by_family[kernel_family(name)] = by_family.get(kernel_family(name), 0.0) + us
  ms = lambda us: round(us / 1e3 / steps, 3)
  ranked = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:top]
  return {'device_ms_per_step': ms(sum(by_kernel.values())),
          'device_ms_by_family': {k: ms(v) for k, v in sorted(by_family.items(),
                                                             key=lambda kv: -kv[1])},
          'top_kernels_ms': [[name[:120], ms(us)] for name, us in ranked]}


def profile_steps(run: Callable[[], Any], log_dir: str, steps: int) -> dict[str, Any]:
  """Traces `steps` calls of `run` and summarises the device time (`summarize_trace`)."""
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    out = None
    for _ in range(steps):
      out = run()
    jax.block_until_ready(out)
    wall_ms = 1e3 * (time.perf_counter() - start) / steps
  traces = sorted(pathlib.Path(log_dir).glob('plugins/profile/*/perfetto_trace.json.gz'))
  summary = summarize_trace(traces[-1], steps) if traces else {}
  return {'profile': {'dir': log_dir, 'traced_wall_ms_per_step': round(wall_ms, 3), **summary}}


def _random_images(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
  return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def random_train_batch(seed: int, batch: int, size: int, num_classes: int,
                       fg_mask: bool = False) -> dict[str, Any]:
  """A training batch of random uint8 images and labels, fixed by `seed`; `fg_mask` adds a
  random pixel mask (each pixel foreground with probability 1/2), for the methods that read
  one."""
  rng = np.random.default_rng(seed)
  out = {'image': _random_images(rng, batch, size),
         'label': rng.integers(0, num_classes, (batch,), dtype=np.int32),
         'valid': np.ones((batch,), np.int32), 'first_pass': np.ones((batch,), np.int32)}
  if fg_mask:
    out['fg_mask'] = rng.integers(0, 2, (batch, size, size), dtype=np.uint8)
  return out


def _reads_fg_mask(config: ml_collections.ConfigDict) -> bool:
  return 'fg_mask' in methods.get(config.model.kind).batch_inputs


class ForcedForeground(ifam.IFAM):
  """iFAM whose training forward hands stage 2 `round(fraction N_p)` random patches per image as
  its `fg_mask`, and an empty mask with the probability that the mask's part dropout drops every
  part (`mask_part_dropout ** K`): stage 2's sparsity under control, as real masks would give it,
  where a randomly initialised model trained on random images drifts to nearly empty masks.
  Stage 1 still computes its own mask, so its cost is unchanged. Built around `model`, whose
  attributes it takes: the parameter tree, and so the train state, stay the same."""

  def __init__(self, model: ifam.IFAM, fraction: float):
    for name, value in vars(model).items():
      if not name.startswith('_'):
        setattr(self, name, value)
    self.fraction = fraction

  def __call__(self, images: jax.Array, *, train: bool, rng: jax.Array | None = None,
               **kwargs: Any) -> ifam.IFAMOutput:
    if train:
      b, hh, ww, _ = images.shape
      p = self.stage1.backbone.cfg.patch_size
      n = (hh // p) * (ww // p)
      noise = jax.random.uniform(jax.random.fold_in(rng, ifam.RNG_MASK_NOISE), (b, n))
      rank = jnp.argsort(noise, axis=-1).argsort(axis=-1)
      empty = jax.random.bernoulli(jax.random.fold_in(rng, ifam.RNG_MASK_DROPOUT),
                                   self.mask_part_dropout**self.num_parts, (b, 1))
      forced = (rank < round(self.fraction * n)) & ~empty
      kwargs['fg_mask'] = forced.reshape(b, hh // p, ww // p).astype(jnp.float32)
    return super().__call__(images, train=train, rng=rng, **kwargs)


def forced_train_step(config: ml_collections.ConfigDict, t: train.Training,
                      mesh: jax.sharding.Mesh, fraction: float, num_classes: int) -> Callable:
  """`t.train_step` with `ForcedForeground` in place of the model: jitted alike, same state."""
  model = nnx.eval_shape(lambda: ForcedForeground(
      factory.build_model(config.model, num_classes, nnx.Rngs(0)), fraction))
  graphdef, *_ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  return train.jit_train_step(config, t, mesh, graphdef)


# ----------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------
def bench_train(config: ml_collections.ConfigDict, *, num_classes: int = 1000, warmup: int = 3,
                windows: int = 5, steps: int = 10, peak: float = 0.0,
                profile_dir: str = '', fg_fraction: float | None = None) -> dict[str, Any]:
  """The real jitted train step (`train.build_training`) on one resident random batch;
  `fg_fraction` forces stage 2's mask (`ForcedForeground`)."""
  if fg_fraction is not None and not 0.0 <= fg_fraction <= 1.0:
    raise ValueError(f'train_fg_fraction must be in [0, 1], got {fg_fraction}')
  config = random_init(config)
  batch_size = config.global_batch_size
  mesh = sharding.make_mesh(config.mesh)
  t = train.build_training(config, num_classes, steps_per_epoch=1000, mesh=mesh)
  train_step = (t.train_step if fg_fraction is None
                else forced_train_step(config, t, mesh, fg_fraction, num_classes))
  batch = jax.device_put(random_train_batch(0, batch_size, config.model.image_size, num_classes,
                                            _reads_fg_mask(config)), t.batch_sharding)
  trainable = jax.tree.leaves(sharding.map_named(lambda name, _: name, t.state['params']))
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    step = train_step.lower(t.state, t.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    state = t.state
    fg_fractions, token_fractions = [], []

    def run():
      nonlocal state
      state, metrics = step(state, t.frozen, batch)
      fg_fractions.append(metrics.get('fg_fraction', 1.0))
      token_fractions.append(metrics.get('stage2_tokens', 1.0))
      return metrics['loss']

    times = time_windows(run, warmup=warmup, windows=windows, steps=steps)
    fg, stage2_tokens = (float(np.mean(jax.device_get(f[warmup:])))
                         for f in (fg_fractions, token_fractions))
    profile = profile_steps(run, profile_dir, steps) if profile_dir else {}
  return _report(config, 'train', batch_size, statistics.median(times),
                 train_flops_per_image(config, trainable, stage2_tokens), compile_s,
                 *peak_flops(peak), forced_fg_fraction=fg_fraction, fg_fraction=fg,
                 stage2_tokens=stage2_tokens,
                 dense_flops_per_image=train_flops_per_image(config, trainable), **profile)


def train_losses(config: ml_collections.ConfigDict, *, steps: int = 20,
                 num_classes: int = 1000) -> dict[str, Any]:
  """The losses of `steps` real train steps on fixed random batches (step i's batch depends on
  i only), so runs on different device counts with the same global batch can be compared."""
  config = random_init(config)
  batch_size = config.global_batch_size
  mesh = sharding.make_mesh(config.mesh)
  t = train.build_training(config, num_classes, steps_per_epoch=1000, mesh=mesh)
  state, losses = t.state, []
  with jax.set_mesh(mesh):
    for i in range(steps):
      batch = jax.device_put(
          random_train_batch(i, batch_size, config.model.image_size, num_classes,
                             _reads_fg_mask(config)),
          t.batch_sharding)
      state, metrics = t.train_step(state, t.frozen, batch)
      losses.append(float(metrics['loss']))
  return {**device_info(), 'mode': 'losses', 'image_size': config.model.image_size,
          'num_parts': config.model.num_parts, 'batch': batch_size, 'losses': losses}


def make_infer_step(graphdef: nnx.GraphDef, rest: nnx.State, keep_count: int | None,
                    with_stage1: bool = True) -> Callable:
  """(params, frozen, images, patch_mask [B, h*w]) -> (stage-2 logits, stage-1 logits or None).

  The eval forward (`IFAM.__call__`) with the foreground mask given as its `fg_mask`, so the
  foreground fraction (and with it the token-gather saving) is controlled. Without stage 1 it
  is the part of the forward that the gather shrinks.
  """

  def forward(model, images, patch_mask):
    if with_stage1:
      grid = (images.shape[1] // model.stage1.backbone.cfg.patch_size, -1)
      out = model(images, train=False, rng=jax.random.key(0), keep_count=keep_count,
                  fg_mask=patch_mask.reshape(patch_mask.shape[:1] + grid))
      return out.logits, out.stage1_logits
    keep_index = (None if keep_count is None
                  else fast_attention.gather_patches(patch_mask, keep_count))
    return model.stage2(images, patch_mask, mask_mode=model.stage2_mask,
                        keep_index=keep_index), None

  def step(params, frozen, images, patch_mask):
    return apply(graphdef, rest, params, frozen, images, forward, patch_mask=patch_mask)

  return step


def bench_infer(config: ml_collections.ConfigDict, *, fg_fractions: Sequence[float],
                batch: int = 0, num_classes: int = 1000, warmup: int = 3, windows: int = 5,
                steps: int = 10, peak: float = 0.0,
                profile_dir: str = '') -> list[dict[str, Any]]:
  """Eval forward at each foreground fraction, dense (masked keys) and token-gathered."""
  if not methods.get(config.model.kind).has_mask:
    raise ValueError('--mode infer measures the masked eval forward; model.kind must be ifam')
  if not ifam.stage2_mask_facts(config.model.stage2_mask).hides_masked:
    raise ValueError(f'--mode infer measures the token gather, which model.stage2_mask='
                     f'{config.model.stage2_mask!r} does not allow (stage 2 sees every patch)')
  config = random_init(config)
  batch = batch or config.data.eval_batch_size
  cfg = factory.vit_from_config(config.model)
  mesh = sharding.make_mesh(config.mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  model = factory.build_model(config.model, num_classes, nnx.Rngs(config.seed))
  graphdef, params, frozen, rest = optim.split_frozen(model, config.optim.group_rules,
                                                      config.optim.groups)
  del model
  rng = np.random.default_rng(0)
  images = jax.device_put(_random_images(rng, batch, config.model.image_size), batch_sharding)
  n_p = cfg.num_patches
  results = []
  with jax.set_mesh(mesh):
    for fraction in fg_fractions:
      if not 0 < fraction <= 1:
        raise ValueError(f'fg_fraction must be in (0, 1], got {fraction}')
      fg = math.ceil(fraction * n_p)
      mask = np.zeros((batch, n_p), np.float32)  # exactly `fg` foreground patches, random places
      mask[np.arange(batch)[:, None], rng.permuted(np.tile(np.arange(n_p), (batch, 1)),
                                                   axis=1)[:, :fg]] = 1.0
      mask = jax.device_put(mask, batch_sharding)
      for keep_count in (None, keep_count_for(fraction, n_p)):
        # The whole eval forward, then stage 2 alone: the part that the gather shrinks.
        runs, compile_s = [], []
        for with_stage1 in (True, False):
          fn = jax.jit(make_infer_step(graphdef, rest, keep_count, with_stage1),
                       compiler_options=factory.compiler_options(config))
          start = time.perf_counter()
          runs.append(functools.partial(fn.lower(params, frozen, images, mask).compile(),
                                        params, frozen, images, mask))
          compile_s.append(time.perf_counter() - start)
        forward_s, stage2_s = (
            statistics.median(time_windows(run, warmup=warmup, windows=windows, steps=steps))
            for run in runs)
        tag = f'fg{fraction}_{"gather" if keep_count else "dense"}'
        profile = profile_steps(runs[0], f'{profile_dir}/{tag}', steps) if profile_dir else {}
        flops = vit_forward_flops(cfg) + vit_forward_flops(cfg, keep_count)
        results.append(_report(
            config, 'infer', batch, forward_s, flops, compile_s[0], *peak_flops(peak),
            fg_fraction=fraction, gather=keep_count is not None,
            keep_count=n_p if keep_count is None else keep_count,
            stage2_img_per_sec=batch / stage2_s, **profile))
  return results


def write_random_jpegs(root: pathlib.Path, count: int = 256, size: tuple[int, int] = (500, 375),
                       num_classes: int = 4) -> None:
  """`count` noise JPEGs (worst case for the decoder) in `num_classes` class folders."""
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = root / f'class_{i % num_classes}'
    folder.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f'{i:05d}.jpg', quality=90)


def bench_data(config: ml_collections.ConfigDict, *, data_dir: str = '',
               num_workers: Sequence[int] = (0, 4, 8), batch: int = 0,
               batches: int = 10) -> list[dict[str, Any]]:
  """Images/s of the grain pipeline with the config's train transform, per worker count.

  The first batch (worker start-up) is not timed; the data set repeats, so any size works.
  """
  batch = batch or config.global_batch_size
  transform, _ = factory.make_transforms(config)
  with tempfile.TemporaryDirectory() as tmp:
    if not data_dir:
      data_dir = tmp
      write_random_jpegs(pathlib.Path(tmp))
    source = data_lib.ImageFolderSource(data_dir)
    results = []
    for workers in num_workers:
      it = iter(data_lib.make_dataset(source, transform=transform, global_batch_size=batch,
                                      seed=config.seed, train=True, num_workers=workers))
      next(it)
      start = time.perf_counter()
      for _ in range(batches):
        next(it)
      step_s = (time.perf_counter() - start) / batches
      img_per_sec = batch / step_s
      results.append({**device_info(), 'mode': 'data', 'image_size': config.model.image_size,
                      'num_parts': config.model.num_parts, 'batch': batch,
                      'augment': config.data.augment, 'num_workers': workers,
                      'img_per_sec': img_per_sec, 'step_time_ms': 1e3 * step_s,
                      'img_per_sec_per_core': img_per_sec / max(workers, 1)})
      del it
  return results


def state_memory(config: ml_collections.ConfigDict, *, variants: Sequence[str],
                 devices: int, num_classes: int = 1000) -> list[dict[str, Any]]:
  """Per-device GiB of the training state (trainable params, Adam moments, EMA, frozen params)
  per ViT variant under the meshes (N, 1) and (1, N) with the config's sharding rules.

  Abstract shapes only: no device memory is used, so a laptop can size a TPU pod. Activations
  are not included (they depend on batch and remat; `--mode train` measures the peak).
  """
  results = []
  for variant in variants:
    c = random_init(config)
    c.model.variant = variant
    model = nnx.eval_shape(lambda c=c: factory.build_model(c.model, num_classes, nnx.Rngs(0)))
    _, params, frozen, _ = optim.split_frozen(model, c.optim.group_rules, c.optim.groups)
    labels = optim.label_params(params, c.optim.group_rules)
    tx = optim.build_optimizer(c.optim, labels, 1000, c.total_epochs)
    parts = {'params': params, 'opt_state': jax.eval_shape(tx.init, params), 'frozen': frozen}
    if c.optim.ema_decay:
      parts['ema'] = params
    for mesh in ((devices, 1), (1, devices)):
      gib = {name: sharding.bytes_per_device(tree, c.sharding_rules, mesh[1], c.fsdp_min_size)
             / 2**30 for name, tree in parts.items()}
      results.append({'mode': 'memory', 'variant': variant, 'mesh': {'data': mesh[0],
                                                                    'fsdp': mesh[1]},
                      'sharding_rules': [list(r) for r in c.sharding_rules],
                      **{f'{name}_gib': v for name, v in gib.items()},
                      'total_gib': sum(gib.values())})
  return results


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  config, mode = _CONFIG.value, _MODE.value
  timing = dict(warmup=_WARMUP.value, windows=_WINDOWS.value, steps=_STEPS.value)
  if mode == 'train':
    results = [bench_train(config, num_classes=_NUM_CLASSES.value, peak=_PEAK.value,
                           profile_dir=_PROFILE.value, fg_fraction=fraction, **timing)
               for fraction in [float(f) for f in _TRAIN_FG.value] or [None]]
  elif mode == 'infer':
    results = bench_infer(config, fg_fractions=[float(f) for f in _FG.value], batch=_BATCH.value,
                          num_classes=_NUM_CLASSES.value, peak=_PEAK.value,
                          profile_dir=_PROFILE.value, **timing)
  elif mode == 'losses':
    results = [train_losses(config, steps=_STEPS.value, num_classes=_NUM_CLASSES.value)]
  elif mode == 'memory':
    results = state_memory(config, variants=_VARIANTS.value, devices=_DEVICES.value,
                           num_classes=_NUM_CLASSES.value)
  else:
    results = bench_data(config, data_dir=_DATA_DIR.value, batch=_BATCH.value,
                         num_workers=[int(w) for w in _WORKERS.value], batches=_STEPS.value)
  for result in results:
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=config_lib.parse_flags)
