"""Shared pieces of the recipe configs in `configs/`: argument parsing and the base config.

Every knob the trainer reads is declared here with the reference's value, so a recipe only
states what differs and a typo in a command-line override (`--config.optim.lrr=...`) is an error
instead of a silently ignored setting.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from ifam_jax import losses, optim


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'k1=v1,k2' -> ConfigDict, typed like `defaults`; a bare key means True (big_vision style)."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, has_value, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}')
    default = defaults[key]
    if not has_value:
      parsed[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config argument {key} expects a boolean, got {value!r}')
      parsed[key] = value.lower() in ('true', '1')
    elif default is None:
      parsed[key] = value
    else:
      parsed[key] = type(default)(value)
  return parsed


def sqrt_scaled_lr(global_batch: int, base: float = 1e-6, reference_batch: int = 16) -> float:
  """The reference's learning-rate rule: base * sqrt(global_batch / 16)."""
  return base * math.sqrt(global_batch / reference_batch)


def base_config() -> ml_collections.ConfigDict:
  """Every setting with the reference's default; recipes override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_epochs = 90
  c.global_batch_size = 128
  c.max_steps = 0  # > 0 stops early (smoke runs); the schedule still spans total_epochs

  # Model. kind 'baseline' is the plain fine-tuned ViT (no stage 1, no mask): the ERM row;
  # the other kinds are in ifam_jax/methods (ifam_jax/presets.py names the paper's variants).
  c.model = dict(
      kind='ifam',
      variant='B/14',
      image_size=224,
      num_registers=4,
      dtype='bfloat16',
      # 'flash': visible tokens first, masks as lengths, cuDNN's fused kernel on GPUs (bf16);
      # 'xla': the dense -inf bias, bit-faithful to the reference (ifam_jax/models/vit.py).
      attention='flash',
      num_parts=1,
      gumbel_tau=1.0,
      part_dropout=0.3,
      mask_part_dropout=0.3,
      # How the foreground mask reaches stage 2: 'hard' (the reference: no gradient to stage 1),
      # 'straight_through' (same forward; the stage-2 loss trains stage 1), 'soft' (the
      # paper's ablation) or 'late' (the late-masking baseline: stage 2 sees the whole image and
      # averages its final patch tokens under the hard mask, over all patches; no gradient to
      # stage 1). ifam_jax/models/ifam.py, `stage2_mask_facts`.
      stage2_mask='hard',
      eval_gumbel_noise=False,
      # Stage 2 trains on the tokens it can see only, exactly (packed_stage2.packed_stage2): each
      # device's batch is sorted by visible-patch count and cut into `stage2_token_groups`
      # groups, each computed at the smallest of these capacities (fractions of the patches;
      # all patches is always one) that holds its visible patches. () computes every token.
      # Applies with stage2_mask='hard' (a hard mask that passes stage 1 no gradient).
      # It pays with large per-device batches and sparse masks (docs/performance.md), so only
      # the ImageNet recipe turns it on.
      stage2_token_tiers=(),
      stage2_token_groups=4,
      init_weights='',  # local DINOv2 file (timm/HF safetensors or official .pth); '' = random
      vit_overrides={},  # e.g. width/depth/num_heads/mlp_hidden/patch_size for tiny models
  )

  # Data: `train` and each entry of `evals` name a source (see ifam_jax/data/sources.py).
  c.data = dict(
      train=dict(source='', root='', split='train'),
      evals={},
      # Class names of the folder-like sources ('folder', 'metashift'), in label order; () takes
      # the training split's class folders. Every eval split is labelled by this list, so one
      # with other or fewer class folders keeps the model's labels.
      classes=(),
      val_split='',  # the eval whose metric picks the "best" checkpoint; never a test split
      best_metric='accuracy',
      augment='cub_original',
      num_workers=4,
      eval_batch_size=256,
  )

  # Losses: weights and variants of reference section 5.
  c.loss = dict(
      weights=dict(losses.DEFAULT_WEIGHTS),
      presence='original',
      enforced_presence='enforced_presence',
      orthogonality='ifam',
      # The reference takes the presence max over each GPU's batch; 0 = the whole global batch.
      presence_group_size=16,
      degrees=90.0,
      translate=0.11,
      scale=(0.8, 1.4),
  )

  # Optimisation: AdamW with the reference's parameter groups (ifam_jax/optim.py).
  c.optim = optim.default_config()

  # Devices: mesh axes and regex parameter-sharding rules (first match wins). Tuples, so the
  # command line can set them: --config.mesh="(('data', -1), ('fsdp', 8))"
  # --config.sharding_rules="(('.*kernel', 'fsdp'), ('.*', 'replicate'))"
  c.mesh = (('data', -1), ('fsdp', 1))
  c.sharding_rules = (('.*', 'replicate'),)
  c.fsdp_min_size = 2**18  # 'fsdp' rules leave tensors with fewer elements replicated
  # XLA options of the jitted train and eval steps, on GPUs only (docs/performance.md):
  # Triton GEMMs for every dot, so XLA can fuse neighbouring elementwise work into them; no
  # merging of dots that share an operand, which concatenates activations (e.g. of the two
  # stage-1 passes, which share weights) only to slice the product apart again; CUDA graphs
  # (command buffers) also inside loops and conditionals, where the packed stage 2 runs and
  # would otherwise launch every kernel from the host (XLA's default list plus the last two).
  c.gpu_compiler_options = dict(
      xla_gpu_triton_gemm_any=True, xla_gpu_dot_merger_threshold_mb=0,
      xla_gpu_enable_command_buffer=('FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,'
                                     'DYNAMIC_SLICE_FUSION,CONDITIONAL,WHILE'))

  # Evaluation entry points (ifam_jax/evaluate.py: eval, calibrate, leave-one-out, audit).
  c.eval = dict(
      splits=(),  # evals to run: names in data.evals, 'in9_<variant>', 'bg_challenge'; () = all
      thresholds='',  # part-threshold JSON (from calibrate, or the reference's); applied to evals
      threshold_rule='',  # '' = the file's rule; the reference's files carry none: 'dot_product'
      # Leave-one-out: 'reference' scores stage 1 before the removal and soft-masks with the kept
      # parts' original probabilities; 'renormalise' rescores the edited, renormalised maps.
      part_removal='reference',
      in9_root='',  # IN-9 release folder: evaluates its variants' val sets (and the challenge)
      in9_variants=('original', 'mixed_same', 'mixed_rand'),
      in9_mapping='',  # in_to_in9.json, for models that were not trained on the 9 classes
      calibration_sample=2**20,  # tokens kept per part (a uniform sample) for the percentiles
      # The mask-geometry audit (audit and compare modes, evaluators/leak.py): the first images
      # of each eval set it reads, and the AUROC of predicting the spurious attribute from the
      # binary mask alone (within class) from which it reports a leak.
      leak_num_images=2048,
      leak_auroc_threshold=0.75,
  )

  # The comparison (`--mode compare`, ifam_jax/compare.py): each method (a training preset of
  # ifam_jax/presets.py, or a post-hoc peer: 'dfr', 'dar', 'a2') and seed in
  # <workdir>/<method>/seed_<s>, one table on `split` ('' = 'test' if an eval, else the last).
  c.compare = dict(methods=(), seeds=(0,), split='', which='final')

  # The post-hoc peers (ifam_jax/peers/, specified in docs/peers.md). `extractor`: the frozen
  # features DFR and DAR fit on: 'erm' (the comparison's ERM run of the same seed, the original
  # DFR), 'ifam' (its iFAM run's stage 2 under the mask) or 'dinov2' (model.init_weights, as A²
  # ran DFR).
  c.peers = dict(
      extractor='erm',
      # DFR(Val) on data.val_split, or DFR(Train) (a 20 % holdout of train tunes C) without one.
      dfr=dict(c_grid=(1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01), n_retrain=20, tune_fraction=0.5,
               train_holdout=0.2, scaler_fit_on='val', backend='jax'),
      # Trained on a group-balanced half of the validation split, selected on the other half.
      dar=dict(num_queries=4, num_heads=4, head_dim=0, depth=2, lr=1e-3,
               weight_decay_grid=(1e-4, 1e-3, 1e-2), batch_size=64, epochs=100),
      # attention_weights: a small DINOv2 file (the paper's ViT-S/14) for the CLS attention;
      # embedding_weights: the larger one for the crops ('' = model.init_weights). Without
      # files, the comparison's ERM run stands in for both (labelled so in the table).
      a2=dict(attention_weights='', attention_variant='S/14', attention_registers=4,
              attention_overrides={}, block=-1,
              renormalise=False, crop_sizes=(64,), tie_break='first', resize_method='bilinear',
              embedding_weights='', C=1.0, max_iter=1000, backend='jax'),
  )

  # Loop.
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  return c


def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """`runlocal`: a few small steps on a laptop CPU with the same code path."""
  c.global_batch_size = 8
  c.total_epochs = 1
  c.model.dtype = 'float32'
  c.model.vit_overrides = dict(width=64, depth=2, num_heads=2, mlp_hidden=128)
  c.model.init_weights = ''
  c.data.num_workers = 0
  c.data.eval_batch_size = 8
  c.loss.presence_group_size = 0
  c.max_steps = 20
  c.log_every_steps = 1
  c.checkpoint_every_steps = 10


def use_baseline(c: ml_collections.ConfigDict) -> None:
  """The ERM row: the same data and schedule, a plain fine-tuned ViT (no stage 1, no mask).

  The ViT and its head train exactly as iFAM's stage 2 does in `c` (same learning-rate factors,
  same freezing), so the two rows differ only by stage 1 and the mask.
  """
  stage2_backbone, head = c.optim.groups.stage2_backbone, c.optim.groups.head
  c.model.kind = 'baseline'
  c.optim.group_rules = list(optim.BASELINE_GROUP_RULES)
  c.optim.groups = optim.baseline_groups(freeze_backbone=stage2_backbone.frozen,
                                         backbone_lr_factor=stage2_backbone.lr_factor,
                                         scratch_lr_factor=head.lr_factor)


def paper_recipe(*, image_size: int, global_batch_size: int, total_epochs: int, augment: str,
                 presence_group_size: int) -> ml_collections.ConfigDict:
  """`base_config` with the settings the paper's recipe table (reference 6.6) varies.

  The learning rate follows the reference's sqrt rule. `presence_group_size` is the per-GPU
  batch of the reference's run, over which its presence loss takes the max.
  """
  c = base_config()
  c.model.image_size = image_size
  c.global_batch_size = global_batch_size
  c.optim.lr = sqrt_scaled_lr(global_batch_size)
  c.total_epochs = total_epochs
  c.data.augment = augment
  c.loss.presence_group_size = presence_group_size
  return c


RECIPE_ARGS = dict(root='', weights='', num_parts=1, runlocal=False, baseline=False)
_REQUIRED_HELP = dict(
    root='root=<dataset folder>',
    weights='weights=<local DINOv2 file, e.g. vit_base_patch14_reg4_dinov2.lvd142m.safetensors>')


def parse_recipe_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`parse_arg` with the arguments every paper recipe takes; `defaults` adds or overrides."""
  return parse_arg(arg, **{**RECIPE_ARGS, **defaults})


def apply_common_args(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict,
                      required: tuple[str, ...] = ('root', 'weights')) -> ml_collections.ConfigDict:
  """Applies `weights`, `num_parts`, `runlocal` and `baseline` of `parse_recipe_arg`.

  A paper run without its dataset or DINOv2 weights is almost certainly a mistake, so the
  `required` arguments must be set unless `runlocal` asks for a random tiny ViT, which DINOv2
  `weights` do not fit. That tiny ViT has nothing worth freezing, so under `runlocal` the
  stage-1 backbone trains too.
  """
  if arg.runlocal and arg.weights:
    raise ValueError('weights= cannot be used with runlocal, which trains a random tiny ViT; '
                     'drop one of them')
  missing = [name for name in required if not arg[name]]
  if missing and not arg.runlocal:
    raise ValueError(f'this recipe needs {", ".join(_REQUIRED_HELP[m] for m in missing)}; '
                     'pass runlocal instead for a smoke run of a random tiny ViT')
  c.model.num_parts = arg.num_parts
  c.model.init_weights = arg.weights
  if arg.runlocal:
    shrink_for_local_run(c)
    c.optim.groups = optim.ifam_groups(freeze_backbone=False)
  if arg.baseline:
    use_baseline(c)
  return c
