"""Speed of the reference PyTorch iFAM (github.com/ananthu-aniraj/ifam) on synthetic input.

The peer code is not part of this project: `--reference_dir` is a checkout of that repository
(or the files this script imports, at their relative paths), put on `sys.path` here. This script
only builds the reference's own model, loss functions and parameter groups and times them, for
the side-by-side figures of docs/performance.md:

  python tools/reference_speed.py --reference_dir ~/src/ifam --mode train \\
      --image_size 224 --num_parts 1 --batch 128 [--compile] [--warmup 3 --windows 5 --steps 10]
  python tools/reference_speed.py --reference_dir ~/src/ifam --mode infer \\
      --image_size 518 --num_parts 8 --batch 64

  # code-path check without a GPU (2-block width-64 ViT at 56 px):
  python tools/reference_speed.py --reference_dir ~/src/ifam --mode train \\
      --device cpu --tiny --batch 2 --warmup 1 --windows 2 --steps 1  # (--mode infer likewise)

Model: `FullTwoStageModelDoubleClassify` from two timm `vit_base_patch14_reg4_dinov2` backbones
built as the reference's `load_model_arch_2_stage` builds them (img_size=--image_size,
drop_path_rate=0) but with pretrained=False (random initialisation: no downloads; speed does not
depend on the values) and the plain timm name (the `hf_hub:` name would fetch a config), with the
constructor arguments of its `load_model_2_stage` (Gumbel softmax, tau 1, part dropout 0.3 in both
stages, hard masks, no thresholds).

Train: the reference's `layer_group_matcher_pdisco_2_stage` with the flags of its default command
(--freeze_backbone; stage-1 tokens and part layers trained, stage 2 fully trained) and its
`build_optimizer` (AdamW, fused on CUDA, normalised weight decay 0.05); one step is the train
branch of its `PDiscoTrainerTwoStage._run_batch`, re-stated here because that module needs
wandb/torchmetrics/fsspec and a data loader: bf16 autocast; the model on the batch; one random
affine per batch (its `generate_affine_trans_params`, degrees 90, translate 0.11, scale 0.8-1.4)
applied with its `rigid_transform`; the model (both stages) on the warped batch; CE on stage 2 and
on the part-mean of stage 1, its presence ('original'), enforced-presence (x2), total-variation,
orthogonality (on the [B, K+1, D] permute, as its trainer does), equivariance and pixel-wise
entropy losses (concentration weight 0: not computed, as in its trainer); backward; global-norm
clip 2.0; optimizer step; zero_grad; and, unless --no-loss_items, the `.item()` of every loss term
that the trainer's losses_dict does each step. Not timed: torchmetrics accuracy updates, logging,
EMA, LR schedule (per-epoch in the reference).

Infer: eval mode under `torch.inference_mode()` and bf16 autocast (as its `test_only`), with every
patch foreground: the background prototype (row K of `stage_1.fc_landmarks`) is scaled to norm
1e3, so its distance logit is ~-1e6 and the Gumbel samples never pick background; stage 2's
eval-time pruning then keeps all patches (its worst case). The fraction actually selected is
measured once and reported as `fg_fraction`.

`--compile` wraps the model (both stages; used for both forwards of a train step) in
`torch.compile`; the affine sampling and warps, the losses, backward and the optimizer stay eager
(the affine parameters are host floats drawn each step, which a compiled step would specialise
on). For infer it sets `torch._dynamo.config.capture_scalar_outputs = True` as the reference's
`inference_benchmark_models.py` does (stage-2 pruning calls `.item()`).

Prints one JSON line per run (keys as `python -m ifam_jax.bench`), with 'implementation':
'reference'; img_per_sec is the median over the timed windows (CUDA synchronised at each window
end), peak_memory_gib is `torch.cuda.max_memory_allocated` since the model was built.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import statistics
import sys
import time
import types
from typing import Any

import torch

ARCH = 'vit_base_patch14_reg4_dinov2'

# Reference packages and the submodules this script needs, in import order. A package whose own
# __init__ imports files that are not fetched (HF/transformers variants, data sets, wandb, ...) is
# registered as a bare package holding only these submodules, with their public names re-exported
# as its __init__ would (`from .x import *`), so that `from layers import MaskedBlock` works.
REFERENCE_MODULES = (
    ('utils', ('misc_utils', 'get_landmark_coordinates')),
    ('utils.data_utils', ('reversible_affine_transform',)),
    ('utils.training_utils', ('ddp_utils', 'optimizer_params')),
    ('layers', ('transformer_layers', 'independent_mlp', 'patch_pruning',
                'attention_masking_layers', 'selfpatch_transformer_layers')),
    ('losses', ('concentration_loss', 'enforced_presence_loss', 'equivarance_loss',
                'orthogonality_loss', 'pixel_wise_entropy_loss', 'presence_loss',
                'total_variation')),
    ('models', ('attn_mask_vit_2_stage', 'individual_landmark_vit_2_stage_mod',
                'two_stage_double_classification')),
)

# Flags of the reference's default training command (training_instructions.md, section 6.6 of
# ifam_reference.md) that its builders read.
REFERENCE_ARGS = dict(
    use_hf_transformers=False, freeze_backbone=True, freeze_params_stage_1=False,
    freeze_params_stage_2=False, freeze_second_stage=False, stage_two_lr_factor=1.0,
    finer_lr_factor=1e3, modulation_lr_factor=1e4, scratch_lr_factor=1e4,
    optimizer_type='adamw', betas1=0.9, betas2=0.999, weight_decay=0.05,
    turn_off_grad_averaging=False, epochs=90, grad_norm_clip=2.0)
LOSS_WEIGHTS = dict(l_class_att=1.0, l_class_stage_2=1.0, l_presence=1.0, l_presence_beta=0.1,
                    l_presence_type='original', l_conc=0.0, l_equiv=1.0, l_tv=1.0,
                    l_enforced_presence=2.0, l_enforced_presence_loss_type='enforced_presence',
                    l_pixel_wise_entropy=1.0, l_orth=1.0)
AFFINE = dict(degrees=[-90.0, 90.0], translate=[0.11, 0.11], scale_ranges=[0.8, 1.4],
              shears=None)


# ----------------------------------------------------------------------------
# Reference code
# ----------------------------------------------------------------------------
def load_reference(root: str) -> dict[str, str]:
  """Puts `root` first on sys.path and imports the needed reference modules.

  Returns, per package, 'full' (its own __init__ ran) or 'partial: <why>' (bare package).
  """
  root = os.path.abspath(root)
  if not os.path.isfile(os.path.join(root, 'models', 'two_stage_double_classification.py')):
    raise SystemExit(f'{root} does not hold the reference '
                     '(models/two_stage_double_classification.py)')
  for name, _ in REFERENCE_MODULES:
    top = sys.modules.get(name.split('.')[0])
    if top is not None:
      places = [getattr(top, '__file__', None) or '']
      places += [str(p) for p in getattr(top, '__path__', [])]
      if not any(place.startswith(root) for place in places):
        raise SystemExit(f'a module named {name!r} is already imported from elsewhere: {top!r}')
  sys.path.insert(0, root)
  status = {}
  for name, submodules in REFERENCE_MODULES:
    try:
      importlib.import_module(name)
      status[name] = 'full'
      continue
    except ImportError as e:
      status[name] = f'partial: {e}'
    package = types.ModuleType(name)
    package.__path__ = [os.path.join(root, *name.split('.'))]
    package.__package__ = name
    sys.modules[name] = package
    if '.' in name:
      parent, child = name.rsplit('.', 1)
      setattr(sys.modules[parent], child, package)
    for sub in submodules:
      module = importlib.import_module(f'{name}.{sub}')
      setattr(package, sub, module)
      public = getattr(module, '__all__', [n for n in vars(module) if not n.startswith('_')])
      for attr in public:
        setattr(package, attr, getattr(module, attr))
  return status


def build_model(args: argparse.Namespace) -> torch.nn.Module:
  """The reference's two-stage model, as its load_model_2_stage builds it (random weights)."""
  import timm
  from models.two_stage_double_classification import FullTwoStageModelDoubleClassify
  kwargs: dict[str, Any] = dict(pretrained=False, img_size=args.image_size)
  if args.mode == 'train':
    kwargs['drop_path_rate'] = 0.0  # --drop_path_stage_1/2 default 0
  if args.tiny:
    kwargs.update(embed_dim=64, depth=2, num_heads=2)
  stage_1 = timm.create_model(ARCH, **kwargs)
  stage_2 = timm.create_model(ARCH, **kwargs)
  return FullTwoStageModelDoubleClassify(
      stage_1, stage_2, num_classes=args.num_classes, return_transformer_qkv=False,
      num_landmarks=args.num_parts, gumbel_softmax=True, softmax_temperature=1.0,
      part_dropout=0.3, part_dropout_stage_2=0.3, part_logits_threshold=None,
      use_soft_masks=False)


class _FakeTrainSet:
  """Only its length is read (normalised weight decay); the value does not affect speed."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self) -> int:
    return self.n


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
  from utils.training_utils.optimizer_params import (build_optimizer as ref_build_optimizer,
                                                     layer_group_matcher_pdisco_2_stage)
  ref_args = argparse.Namespace(**REFERENCE_ARGS, lr=args.lr, batch_size=args.batch)
  groups = layer_group_matcher_pdisco_2_stage(ref_args, model)
  with contextlib.redirect_stdout(sys.stderr):  # it prints the effective batch size
    return ref_build_optimizer(ref_args, groups, _FakeTrainSet(1_281_167))


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def make_train_step(model, forward, optimizer, device, args):
  """One step of the reference trainer's train branch (module docstring)."""
  from losses import (ConcentrationLoss, EnforcedPresenceLoss, PresenceLoss, TotalVariationLoss,
                      equivariance_loss, orthogonality_loss, pixel_wise_entropy_loss)
  from utils.data_utils.reversible_affine_transform import (generate_affine_trans_params,
                                                            rigid_transform)
  w = LOSS_WEIGHTS
  ce = torch.nn.CrossEntropyLoss().to(device)
  conc_loss = ConcentrationLoss().to(device)
  enforced_presence = EnforcedPresenceLoss(loss_type=w['l_enforced_presence_loss_type']).to(device)
  total_variation = TotalVariationLoss(reduction='mean').to(device)
  presence = PresenceLoss(beta=w['l_presence_beta'], loss_type=w['l_presence_type']).to(device)
  num_landmarks = model.num_landmarks
  params = list(model.parameters())

  def step(source, targets):
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
      outputs, maps, _, all_features, outputs_stage_1, _ = forward(source, None)
      outputs_stage_1 = outputs_stage_1.mean(dim=-1)
      all_features = all_features.permute(0, 2, 1).contiguous()
      angle, translate, scale, _ = generate_affine_trans_params(
          img_size=[source.shape[2], source.shape[3]], **AFFINE)
      source_transformed = rigid_transform(img=source, angle=angle, translate=translate,
                                           scale=scale, shear=0.0, invert=False)
      equiv_maps = forward(source_transformed)[1]
      terms = {
          'loss_classification_train': ce(outputs, targets) * w['l_class_stage_2'],
          'loss_classification_stage_1': ce(outputs_stage_1, targets) * w['l_class_att'],
          'loss_conc_train': (conc_loss(maps) * w['l_conc'] if w['l_conc'] > 0
                              else torch.tensor(0.0, device=device)),
          'loss_tv': total_variation(maps) * w['l_tv'],
          'loss_presence_train': presence(maps=maps[:, :-1, :, :]) * w['l_presence'],
          'loss_orth_train': orthogonality_loss(all_features) * w['l_orth'],
          'loss_equiv_train': equivariance_loss(maps, equiv_maps, source, num_landmarks,
                                                translate, angle, scale,
                                                shear=0.0) * w['l_equiv'],
          'loss_enforced_presence': enforced_presence(maps) * w['l_enforced_presence'],
          'loss_pixel_wise_entropy': pixel_wise_entropy_loss(maps) * w['l_pixel_wise_entropy'],
      }
      loss = sum(terms.values())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, REFERENCE_ARGS['grad_norm_clip'])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.loss_items:
      return {'loss_total_train': loss.item(), **{k: v.item() for k, v in terms.items()}}
    return loss

  return step


def force_all_foreground(model: torch.nn.Module) -> None:
  """Background prototype of norm 1e3: its -dist logit is ~-1e6, so no token samples bg."""
  with torch.no_grad():
    weight = model.stage_1.fc_landmarks.weight  # [K+1, D, 1, 1]
    bg = weight[-1]
    bg.mul_(1e3 / bg.norm())


def measured_fg_fraction(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> float:
  with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
    _, _, (hard, _), _, _ = model.stage_1(x)
  return float((hard[:, 0] != 0).float().mean())


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def time_windows(run, device, *, warmup: int, windows: int, steps: int):
  """(seconds of the first call, seconds per step of each timed window)."""
  start = time.perf_counter()
  run()
  synchronize(device)
  first_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    run()
  synchronize(device)
  times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps):
      run()
    synchronize(device)
    times.append((time.perf_counter() - start) / steps)
  return first_s, times


def device_info(device: torch.device) -> dict[str, Any]:
  if device.type == 'cuda':
    return {'device_kind': torch.cuda.get_device_name(device), 'platform': 'gpu',
            'num_devices': 1}
  return {'device_kind': 'cpu', 'platform': 'cpu', 'num_devices': 1}


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--reference_dir', required=True, help='Folder with the fetched reference files.')
  p.add_argument('--mode', choices=['train', 'infer'], required=True)
  p.add_argument('--image_size', type=int, default=None, help='Default 224 (56 with --tiny).')
  p.add_argument('--num_parts', type=int, default=1, help='K (foreground parts).')
  p.add_argument('--batch', type=int, required=True)
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--compile', action='store_true', help='torch.compile the model.')
  p.add_argument('--compile_mode', default=None,
                 help="torch.compile mode (default: torch's default; the reference's inference "
                 "benchmark uses 'max-autotune-no-cudagraphs').")
  p.add_argument('--warmup', type=int, default=3, help='Untimed steps (the first compiles).')
  p.add_argument('--windows', type=int, default=5, help='Timed windows; the median is reported.')
  p.add_argument('--steps', type=int, default=10, help='Steps per window.')
  p.add_argument('--lr', type=float, default=2.828e-6, help='Base LR (value does not matter).')
  p.add_argument('--loss_items', action=argparse.BooleanOptionalAction, default=True,
                 help='train: fetch every loss term with .item() each step, as the trainer does.')
  p.add_argument('--device', default='cuda', help="'cuda' (default) or 'cpu'.")
  p.add_argument('--tiny', action='store_true',
                 help='Smoke test: 2 blocks of width 64 (2 heads) instead of ViT-B/14.')
  p.add_argument('--seed', type=int, default=42)
  args = p.parse_args(argv)
  if args.image_size is None:
    args.image_size = 56 if args.tiny else 224
  if args.image_size % 14:
    p.error('--image_size must be a multiple of the patch size 14')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  device = torch.device(args.device)
  if device.type == 'cuda':
    if device.index is None:
      device = torch.device('cuda', torch.cuda.current_device())
    torch.cuda.set_device(device)
  status = load_reference(args.reference_dir)
  from utils.training_utils.ddp_utils import set_seeds
  set_seeds(args.seed)  # the reference seeds torch, cuda and numpy with 42 at launch
  torch.backends.cudnn.benchmark = True  # as the reference's train_net.py

  model = build_model(args).to(device)
  if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(device)
  x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
  fg_fraction = None
  if args.mode == 'train':
    model.train()
    optimizer = build_optimizer(model, args)
    forward = torch.compile(model, mode=args.compile_mode) if args.compile else model
    y = torch.randint(0, args.num_classes, (args.batch,), device=device)
    step = make_train_step(model, forward, optimizer, device, args)
    run = lambda: step(x, y)
  else:
    model.eval()
    force_all_foreground(model)
    fg_fraction = measured_fg_fraction(model, x, device)
    if args.compile:
      torch._dynamo.config.capture_scalar_outputs = True
    forward = torch.compile(model, mode=args.compile_mode) if args.compile else model

    def run():
      with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        return forward(x)

  first_s, times = time_windows(run, device, warmup=args.warmup, windows=args.windows,
                                steps=args.steps)
  step_s = statistics.median(times)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  result = {
      **device_info(device), 'implementation': 'reference', 'mode': args.mode,
      'image_size': args.image_size, 'num_parts': args.num_parts, 'batch': args.batch,
      'img_per_sec': args.batch / step_s, 'step_time_ms': 1e3 * step_s,
      'window_step_ms': [1e3 * t for t in times],
      'peak_memory_gib': (torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == 'cuda' else None),
      'compile': args.compile, 'compile_mode': args.compile_mode if args.compile else None,
      'first_step_s': first_s, 'dtype': 'bfloat16 autocast',
      'trainable_params': trainable if args.mode == 'train' else None,
      'fg_fraction': fg_fraction, 'loss_items': args.loss_items if args.mode == 'train' else None,
      'tiny': args.tiny, 'torch': torch.__version__,
      'timm': importlib.import_module('timm').__version__,
      'reference_packages': status,
  }
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
