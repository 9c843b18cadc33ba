"""Shared pieces of the recipe configs in `configs/`: argument parsing and the base config.

Every knob the trainer reads is declared here with the reference's value, so a recipe only
states what differs and a typo in a command-line override (`--config.optim.lrr=...`) is an error
instead of a silently ignored setting; `parse_flags` names the key and says what the config has.
"""

from __future__ import annotations

import difflib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

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
      # Remedies against a mask whose geometry tells stage 2 the background (0 = off, the
      # reference). They edit the mask stage 2 reads and the forward returns, after any
      # test-time intervention; not with stage2_mask='soft' (ifam_jax/models/ifam.py, `IFAM`).
      # A patch's score is the mask draw's foreground minus background probability; N_p patches.
      # The floor, f in [0, 1): the hard mask plus the max(1, round(f N_p)) best-scoring patches.
      mask_min_fraction=0.0,
      # Rounds of erosion, before the floor: each drops every visible patch with a hidden
      # 4-neighbour (the edge patches, which hold background pixels).
      mask_erode=0,
      # f in [0, 1): exactly the max(1, round(f N_p)) best-scoring patches whatever the hard
      # mask holds, a count that tells nothing; excludes the floor and erosion.
      mask_fixed_fraction=0.0,
      # p in [0, 1), training only: each visible patch is hidden from stage 2 with probability
      # p; a non-empty mask keeps its best-scoring patch.
      stage2_patch_dropout=0.0,
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
      # or a HF save_pretrained folder (its config.json is checked against this config).
      # The backbones' position embedding: 'folded' (timm's: patches only, resampled once at
      # load) or 'hf' (HF Dinov2Model, RAD-DINO: CLS + patches at the grid of pos_embed_size,
      # 0 = image_size, interpolated exactly as HF in every forward pass). `use_rad_dino`.
      pos_embed_layout='folded',
      pos_embed_size=0,
      # Input normalisation per RGB channel, 3 numbers each; () = ImageNet's mean and std.
      pixel_mean=(),
      pixel_std=(),
      vit_overrides={},  # e.g. width/depth/num_heads/mlp_hidden/patch_size for tiny models
  )

  # Data: `train` and each entry of `evals` name a source (see ifam_jax/data/sources.py).
  c.data = dict(
      train=dict(source='', root='', split='train'),
      evals={},
      # Class names of the folder-like sources ('folder', 'metashift'), in label order; () takes
      # the training split's class folders. Every eval split is labelled by this list, so one
      # with other or fewer class folders keeps the model's labels. A Waterbirds-layout source
      # ('waterbirds') takes two, for y = 0, 1 of its metadata; () = 'landbird', 'waterbird'.
      classes=(),
      # The two places (place = 0, 1) of a Waterbirds-layout source; its groups are named
      # '<class>/<place>'. () = Waterbirds' 'land', 'water'.
      attribute_names=(),
      val_split='',  # the eval whose metric picks the "best" checkpoint; never a test split
      best_metric='accuracy',
      augment='cub_original',  # or 'imagenet', 'siim_acr', 'none' (factory.make_transforms)
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
  # JAX's persistent compilation cache (a local folder per host): a rerun, resume or evaluation
  # of the same step loads its executable instead of compiling it again (the ImageNet recipe's
  # train step: 100 s -> 21 s on an H200). '' keeps JAX's own setting (JAX_COMPILATION_CACHE_DIR);
  # the paper recipes use ~/.cache/ifam_jax/xla.
  c.compilation_cache_dir = ''

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
      # `--mode eval` also reports the paper's part metrics (evaluators/parts.py): keypoint
      # regression Kp, NMI and ARI on the eval sets whose 'cub' spec has part_annotations=True,
      # the regression fit on data.train (a 'cub' source); under eval.thresholds, also without.
      part_metrics=False,
      # True feeds them ImageNet-normalised pixels like every other eval; False (the reference,
      # its quirk 11) feeds [0, 1] pixels.
      part_metrics_normalise=False,
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

  # Where a training run shows up besides metrics.jsonl, on process 0 (ifam_jax/loggers.py).
  # TensorBoard event files in <workdir>/tensorboard/, with, at each evaluation, the part-map
  # picture (--mode visualize's example grid) of `part_map_images` examples of data.val_split
  # (else the first eval) for models with part maps; 0 = no picture. Weights & Biases (the
  # `wandb` extra) when wandb_project is set: wandb_entity '' = the account's default,
  # wandb_mode '' = W&B's own (WANDB_MODE, else 'online'), or 'online', 'offline', 'disabled'.
  c.log = dict(tensorboard=True, part_map_images=8, wandb_project='', wandb_entity='',
               wandb_mode='', wandb_tags=())

  # Loop.
  c.log_every_steps = 50
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  return c


def _like(value: Any, template: Any) -> Any:
  """A JSON value with the sequence types of `template`: JSON turned every tuple into a list."""
  if isinstance(value, Mapping):
    known = template if isinstance(template, Mapping) else {}
    restored = {k: _like(v, known.get(k)) for k, v in value.items()}
    if 'source' in value or value.keys() - known.keys():  # a data spec, or a replaced dict
      return restored
    # Keys the JSON lacks were added since: the run had their defaults.
    return {**restored, **{k: v for k, v in known.items() if k not in restored}}
  if isinstance(value, list):
    element = template[0] if isinstance(template, (list, tuple)) and template else None
    items = [_like(v, element) for v in value]
    return items if isinstance(template, list) else tuple(items)
  return value


def restore_config(tree: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict that `tree` (a config's JSON) was written from.

  Sequences are lists where `base_config` holds a list (of tuples, as optim.group_rules) and
  tuples elsewhere, as recipes write them. A key the JSON lacks was added to `base_config` since
  it was written and takes its default there, except in the dicts a recipe writes whole: data
  source specs (they name a 'source') and dicts with keys `base_config` lacks (the ERM's
  optim.groups).
  """
  return ml_collections.ConfigDict(_like(tree, base_config().to_dict()))


# ----------------------------------------------------------------------------
# Recipe pieces
# ----------------------------------------------------------------------------
def shrink_for_local_run(c: ml_collections.ConfigDict) -> None:
  """`runlocal`: a smoke test of the code path, not a model that learns.

  20 steps of a random 2-block ViT at batch 8, at the recipe's resolution and with its paper
  learning rates and factors (1e4 on the new heads), which suit a pretrained backbone only.
  `tiny_from_scratch` is the small recipe that trains.
  """
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


def tiny_from_scratch(c: ml_collections.ConfigDict) -> None:
  """The demo's model and optimisation: a 3-block ViT of width 64 at 64 px, trained from random
  weights for 8 epochs at batch 64, in float32 (a CPU's size).

  Nothing is pretrained, so no parameter is "new": every group, both backbones included, trains
  at one learning rate (5e-4, warmed up over the first epoch, then a cosine per step), the
  demo's. The data, augmentation, number of parts, EMA and loop stay the recipe's.
  """
  c.global_batch_size = 64
  c.total_epochs = 8
  c.model.variant = 'S/8'
  c.model.image_size = 64
  c.model.dtype = 'float32'
  c.model.init_weights = ''
  c.model.vit_overrides = dict(width=64, depth=3, num_heads=4, mlp_hidden=128)
  c.model.pos_embed_size = 0  # a position grid of the tiny image size
  c.optim.lr = 5e-4
  c.optim.warmup_epochs = 1.0
  c.optim.lr_schedule_unit = 'step'
  c.optim.groups = optim.ifam_groups(freeze_backbone=False, finer_lr_factor=1.0,
                                     modulation_lr_factor=1.0, scratch_lr_factor=1.0)
  c.loss.presence_group_size = 0


RAD_DINO_MEAN = (0.48865,) * 3  # microsoft/rad-dino's grey-level normalisation, over RGB
RAD_DINO_STD = (0.24621,) * 3


def use_rad_dino(c: ml_collections.ConfigDict) -> None:
  """RAD-DINO (`microsoft/rad-dino`, a HF Dinov2Model) as the backbones, as for SIIM-ACR.

  A ViT-B/14 without registers, HF's position embedding (CLS + the 37x37 grid of 518 px,
  interpolated as HF does at another size) and its grey-level normalisation replicated over RGB.
  The weights go in `model.init_weights`: the HF folder (config.json + model.safetensors or
  pytorch_model.bin) or its safetensors file.
  """
  c.model.variant = 'B/14'
  c.model.num_registers = 0
  c.model.pos_embed_layout = 'hf'
  c.model.pos_embed_size = 518
  c.model.pixel_mean = RAD_DINO_MEAN
  c.model.pixel_std = RAD_DINO_STD


def use_baseline(c: ml_collections.ConfigDict) -> None:
  """The ERM row: the same data and schedule, a plain fine-tuned ViT (no stage 1, no mask).

  Its rules put the ViT in iFAM's 'stage2_backbone' group and its head in 'head', which stay in
  `c` with every other iFAM group: it trains exactly as iFAM's stage 2 does (same learning-rate
  factors, same freezing), so the two rows differ only by stage 1 and the mask, and an override
  of any iFAM group applies to both runs.
  """
  c.model.kind = 'baseline'
  c.optim.group_rules = list(optim.BASELINE_GROUP_RULES)


def folder_data(c: ml_collections.ConfigDict, root: str) -> None:
  """Data from a folder of one's own, in the layout found there (the demo's `root=`).

  <root>/metadata.csv: the Waterbirds layout (columns img_filename, y, split, place; images
  under root), evaluated on its val and test splits, whose groups let the worst-group accuracy
  pick the best checkpoint. Otherwise image folders <root>/{train,val}/<class>/<image> and, if
  present, <root>/test/<class>/<image>: no groups, so the accuracy picks it. The folder is
  looked at now, so that a wrong one fails before anything starts.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise ValueError(f'root={root} does not exist or is not a folder')
  if os.path.isfile(os.path.join(root, 'metadata.csv')):
    waterbirds = dict(source='waterbirds', root=root)
    c.data.train = dict(waterbirds, split='train')
    c.data.evals = dict(val=dict(waterbirds, split='val'), test=dict(waterbirds, split='test'))
    c.data.best_metric = 'worst_group_accuracy'
  elif all(os.path.isdir(os.path.join(root, split)) for split in ('train', 'val')):
    c.data.train = dict(source='folder', root=os.path.join(root, 'train'))
    c.data.evals = {split: dict(source='folder', root=os.path.join(root, split))
                    for split in ('val', 'test') if os.path.isdir(os.path.join(root, split))}
    c.data.best_metric = 'accuracy'
  else:
    raise ValueError(f'root={root} holds neither metadata.csv (the Waterbirds layout: columns '
                     'img_filename, y, split, place) nor train/ and val/ folders (image folders: '
                     '<split>/<class>/<image>, test/ optional)')
  c.data.val_split = 'val'
  c.compare.split = 'test' if 'test' in c.data.evals else 'val'


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
  c.compilation_cache_dir = '~/.cache/ifam_jax/xla'  # their steps compile for minutes
  return c


# ----------------------------------------------------------------------------
# The arguments every paper recipe takes
# ----------------------------------------------------------------------------
RECIPE_ARGS = dict(root='', weights='', num_parts=1, runlocal=False, tiny=False, baseline=False)
RECIPE_HELP = """Arguments of every paper recipe (its docstring lists its own):
  root=<folder>  the dataset
  weights=<file> local DINOv2 weights, e.g. vit_base_patch14_reg4_dinov2.lvd142m.safetensors
  num_parts=K    the number of parts
  baseline       the ERM row: a plain ViT on the same data, trained as iFAM's stage 2
  tiny           without weights: the demo's small ViT trained from scratch on the dataset
                 (64 px, batch 64, lr 5e-4 for every parameter, 8 epochs; CPU-sized)
  runlocal       a smoke test of the code path, not a model that learns: 20 steps of a random
                 2-block ViT at the recipe's resolution and learning rates, batch 8"""
_REQUIRED_HELP = dict(
    root='root=<dataset folder>',
    weights='weights=<local DINOv2 file, e.g. vit_base_patch14_reg4_dinov2.lvd142m.safetensors>')


def parse_recipe_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`parse_arg` with the arguments every paper recipe takes; `defaults` adds or overrides."""
  try:
    return parse_arg(arg, **{**RECIPE_ARGS, **defaults})
  except ValueError as e:
    raise ValueError(f'{e}\n{RECIPE_HELP}') from None


def apply_common_args(c: ml_collections.ConfigDict, arg: ml_collections.ConfigDict,
                      required: tuple[str, ...] = ('root', 'weights')) -> ml_collections.ConfigDict:
  """Applies `weights`, `num_parts`, `runlocal`, `tiny` and `baseline` of `parse_recipe_arg`.

  A paper run without its dataset or DINOv2 weights is almost certainly a mistake, so the
  `required` arguments must be set unless `runlocal` asks for a smoke test, and `tiny`, which
  trains from scratch, needs no weights. Neither fits DINOv2 `weights`. The random ViT of
  `runlocal` has nothing worth freezing, so there the stage-1 backbone trains too.
  """
  if arg.runlocal and arg.tiny:
    raise ValueError('tiny and runlocal cannot be combined: tiny trains a small ViT from scratch '
                     "on the dataset, runlocal smoke-tests the recipe's code path; pass one")
  for name, what in (('runlocal', 'a random tiny ViT'), ('tiny', 'a small ViT from scratch')):
    if arg[name] and arg.weights:
      raise ValueError(f'weights= cannot be used with {name}, which trains {what}; drop one of '
                       'them')
  missing = [name for name in required if not arg[name] and not (arg.tiny and name == 'weights')]
  if missing and not arg.runlocal:
    raise ValueError(f'this recipe needs {", ".join(_REQUIRED_HELP[m] for m in missing)}'
                     f'\n{RECIPE_HELP}')
  c.model.num_parts = arg.num_parts
  c.model.init_weights = arg.weights
  if arg.runlocal:
    shrink_for_local_run(c)
    c.optim.groups = optim.ifam_groups(freeze_backbone=False)
  if arg.tiny:
    tiny_from_scratch(c)
  if arg.baseline:
    use_baseline(c)
  return c


# ----------------------------------------------------------------------------
# Command-line overrides
# ----------------------------------------------------------------------------
_DATA_SPEC_HINT = (
    "A data spec takes its source's keys only (ifam_jax/data/sources.py), so the command line "
    'cannot switch it to another source: give the recipe the data set instead, e.g. '
    '--config configs/demo.py:root=<folder> (a Waterbirds-layout folder with metadata.csv, or '
    'image folders train/ and val/) or configs/waterbirds.py:root=<folder>,tiny.')


def _flag_value(argv: Sequence[str], name: str) -> str | None:
  for i, item in enumerate(argv):
    if item in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      return argv[i + 1]
    for prefix in (f'--{name}=', f'-{name}='):
      if item.startswith(prefix):
        return item[len(prefix):]
  return None


def unknown_override(argv: Sequence[str], name: str = 'config') -> str | None:
  """What is wrong with the first `--<name>.<key>=...` override whose key the config lacks
  (None if every key exists, or the config cannot be loaded): the key, the keys there are."""
  value = _flag_value(argv, name)
  if value is None:
    return None
  plain = [argv[0], f'--{name}={value}']  # the config without its overrides
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(name, flag_values=values, sys_argv=plain)
  try:
    values(plain)
  except Exception:  # pylint: disable=broad-except  # the flag's own parse reports those
    return None
  config = values[name].value
  for item in argv:
    path = item.lstrip('-').split('=', 1)[0].removeprefix('no')
    if not path.startswith(f'{name}.'):
      continue
    keys = path.split('.')[1:]
    holder = config
    for depth, key in enumerate(keys):
      if not isinstance(holder, (ml_collections.ConfigDict, dict)):
        break
      if key not in holder:
        where = '.'.join(keys[:depth]) or 'the config'
        known = sorted(holder.keys())
        close = difflib.get_close_matches(key, known, n=1)
        message = (f'--{path}: {where} has no key {key!r}'
                   + (f' (did you mean {close[0]!r}?)' if close else '')
                   + f'; it has {", ".join(known) or "none"}.')
        if keys[0] == 'data' and depth >= 2 and keys[1] in ('train', 'evals'):
          message += ' ' + _DATA_SPEC_HINT
        return message
      holder = holder[key]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for `app.run(main, flags_parser=parse_flags)`: an override of a key the
  config lacks fails with `unknown_override`'s message instead of a bare AttributeError."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    message = unknown_override(argv)
    if message is None:
      raise
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n')
  sys.exit(1)
