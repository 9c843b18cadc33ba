"""Name tables: which checkpoint tensor becomes which of our parameters, and how.

DINOv2 checkpoints name the same ViT in four ways, `NAMES[naming]`:

  'timm'      timm's `vit_*_patch14{_reg4,}_dinov2.lvd142m` (the weights iFAM starts from)
  'official'  the DINOv2 hub's `dinov2_vit*14{_reg4,}_pretrain.pth`: timm's names but
              register_tokens, mask_token, and mlp.w12 / mlp.w3 for SwiGLU
  'hf4'       transformers 4 (`Dinov2Model`, `Dinov2WithRegistersModel`, names as on the hub):
              encoder.layer.<i>., query / key / value apart
  'hf5'       transformers 5's renames of hf4: q_proj, k_proj, v_proj, o_proj, and the SwiGLU
              input split into gate_proj and up_proj

A table maps each of our roles to the checkpoint's name. 'block' is the prefix of block i
('blocks.' + '3' + '.'); block entries follow it. A tuple lists the tensors stacked along torch's
output axis into one of ours (HF's query, key, value -> our qkv); None means the naming has no
such tensor. 'gelu.*' and 'swiglu.*' are the MLP's names for each MLP kind.

`vit_table(cfg, naming)` spells a table out as one `Param` per parameter of
`VisionTransformer(cfg)`; `reference_table(model)` does so for the reference iFAM's own layout
(timm's or, for RAD-DINO, HF's backbone names), the one `export` writes and `import` reads.
`LAYOUTS` turns each torch tensor into ours and back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from flax import nnx

from ifam_jax.models import ifam, vit

TIMM = {
    'block': 'blocks.', 'patch_embed': 'patch_embed.proj', 'cls_token': 'cls_token',
    'reg_token': 'reg_token', 'pos_embed': 'pos_embed', 'mask_token': None, 'norm': 'norm',
    'norm1': 'norm1', 'norm2': 'norm2', 'ls1': 'ls1.gamma', 'ls2': 'ls2.gamma',
    'qkv': ('attn.qkv',), 'proj': ('attn.proj',),
    'gelu.fc1': ('mlp.fc1',), 'gelu.fc2': ('mlp.fc2',),
    'swiglu.fc1': ('mlp.fc1',), 'swiglu.fc2': ('mlp.fc2',),
}
OFFICIAL = {**TIMM, 'reg_token': 'register_tokens', 'mask_token': 'mask_token',
            'swiglu.fc1': ('mlp.w12',), 'swiglu.fc2': ('mlp.w3',)}
HF4 = {
    **TIMM, 'block': 'encoder.layer.',
    'patch_embed': 'embeddings.patch_embeddings.projection', 'cls_token': 'embeddings.cls_token',
    'reg_token': 'embeddings.register_tokens', 'pos_embed': 'embeddings.position_embeddings',
    'mask_token': 'embeddings.mask_token', 'norm': 'layernorm',
    'ls1': 'layer_scale1.lambda1', 'ls2': 'layer_scale2.lambda1',
    'qkv': ('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
    'proj': ('attention.output.dense',),
    'swiglu.fc1': ('mlp.weights_in',), 'swiglu.fc2': ('mlp.weights_out',),
}
HF5 = {**HF4, 'qkv': ('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
       'proj': ('attention.o_proj',), 'swiglu.fc1': ('mlp.gate_proj', 'mlp.up_proj'),
       'swiglu.fc2': ('mlp.down_proj',)}
NAMES = {'timm': TIMM, 'official': OFFICIAL, 'hf4': HF4, 'hf5': HF5}

Layout = Literal['copy', 'linear', 'conv', 'conv1x1']
# How a torch tensor becomes ours and back: (torch -> ours, ours -> torch). Only transposes and
# reshapes: exact, and they trace (jax.eval_shape) as well as run on numpy.
LAYOUTS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    'copy': (lambda x: x, lambda x: x),
    'linear': (lambda x: x.T, lambda x: x.T),  # Linear (out, in) <-> (in, out); any 2-D transpose
    'conv': (lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1)),  # OIHW, HWIO
    'conv1x1': (lambda x: x[:, :, 0, 0], lambda x: x[:, :, None, None]),  # (O, I, 1, 1), (O, I)
}


@dataclasses.dataclass(frozen=True)
class Param:
  """One of our parameters: its checkpoint tensors, their torch shape, and the layout change."""

  path: tuple[str | int, ...]
  sources: tuple[str, ...]
  shape: tuple[int, ...]
  layout: Layout = 'copy'


# ----------------------------------------------------------------------------
# DINOv2 ViT
# ----------------------------------------------------------------------------
def _dense(path: tuple[str | int, ...], names: tuple[str, ...], dout: int,
           din: int) -> list[Param]:
  rows = dout // len(names)
  return [Param(path + ('kernel',), tuple(n + '.weight' for n in names), (rows, din), 'linear'),
          Param(path + ('bias',), tuple(n + '.bias' for n in names), (rows,))]


def _layer_norm(path: tuple[str | int, ...], name: str, d: int) -> list[Param]:
  return [Param(path + ('scale',), (name + '.weight',), (d,)),
          Param(path + ('bias',), (name + '.bias',), (d,))]


def vit_table(cfg: vit.ViTConfig, naming: str) -> list[Param]:
  """Every parameter of `VisionTransformer(cfg)` but pos_embed, with its `NAMES[naming]` source.

  pos_embed is left out: its checkpoint grid and class position vary by naming (`dinov2`).
  """
  n = NAMES[naming]
  d, p, hidden = cfg.width, cfg.patch_size, cfg.mlp_hidden
  table = [Param(('cls_token',), (n['cls_token'],), (1, 1, d)),
           Param(('patch_embed', 'kernel'), (n['patch_embed'] + '.weight',), (d, 3, p, p), 'conv'),
           Param(('patch_embed', 'bias'), (n['patch_embed'] + '.bias',), (d,)),
           *_layer_norm(('norm',), n['norm'], d)]
  if cfg.num_registers:
    table.append(Param(('reg_token',), (n['reg_token'],), (1, cfg.num_registers, d)))
  fc1_rows = 2 * hidden if cfg.mlp == 'swiglu' else hidden
  for i in range(cfg.depth):
    pre, blk = f'{n["block"]}{i}.', ('blocks', i)

    def names(key: str, pre=pre) -> tuple[str, ...]:
      return tuple(pre + s for s in n[key])

    table += [*_layer_norm(blk + ('norm1',), pre + n['norm1'], d),
              *_dense(blk + ('attn', 'qkv'), names('qkv'), 3 * d, d),
              *_dense(blk + ('attn', 'proj'), names('proj'), d, d),
              Param(blk + ('ls1', 'gamma'), (pre + n['ls1'],), (d,)),
              *_layer_norm(blk + ('norm2',), pre + n['norm2'], d),
              *_dense(blk + ('mlp', 'fc1'), names(f'{cfg.mlp}.fc1'), fc1_rows, d),
              *_dense(blk + ('mlp', 'fc2'), names(f'{cfg.mlp}.fc2'), d, hidden),
              Param(blk + ('ls2', 'gamma'), (pre + n['ls2'],), (d,))]
  return table


# ----------------------------------------------------------------------------
# The reference iFAM (reference section 13)
# ----------------------------------------------------------------------------
# `FullTwoStageModelDoubleClassify` on the timm path: each stage's timm keys under stage_1. /
# stage_2., the new stage_1.{fc_landmarks, modulation, fc_class_landmarks} and
# stage_2.{fc_norm, head}, and the buffer stage_2.prefix_attn_mask (ones [1, P]). A baseline (a
# bare `ViTClassifier`) maps to the stage-2 keys without prefix or buffer: timm's ViT keys plus a
# LayerNorm `fc_norm` and a bias-free `head`, the way the reference re-heads timm. `pos_embed`
# covers the patches only, the `no_embed_class` layout the reference's stage modules assume.
# With `pos_embed_layout='hf'` (RAD-DINO) the stages are `FullTwoStageModelDoubleClassifyHF`'s:
# transformers-4 names (embeddings.*, encoder.layer.<i>.*, layernorm; no mask_token) and
# embeddings.position_embeddings [1, 1 + h0*w0, D]; the heads and the buffer are as above.
def _backbone_table(path: tuple[str, ...], prefix: str, cfg: vit.ViTConfig) -> list[Param]:
  """The reference's names for `VisionTransformer(cfg)`, at `path` in our tree and `prefix` in
  theirs: timm's, or HF's for the 'hf' position-embedding layout."""
  if cfg.pos_embed_layout == 'hf':
    naming, positions = 'hf4', 1 + cfg.pos_grid**2
  else:
    naming, positions = 'timm', cfg.num_patches
  pos_embed = Param(('pos_embed',), (NAMES[naming]['pos_embed'],), (1, positions, cfg.width))
  return [dataclasses.replace(p, path=path + p.path, sources=tuple(prefix + s for s in p.sources))
          for p in [*vit_table(cfg, naming), pos_embed]]


def _classifier_table(path: tuple[str, ...], prefix: str,
                      model: vit.ViTClassifier) -> list[Param]:
  d, c = model.head.in_features, model.head.out_features
  return [*_backbone_table(path + ('backbone',), prefix, model.backbone.cfg),
          *_layer_norm(path + ('fc_norm',), prefix + 'fc_norm', d),
          Param(path + ('head', 'kernel'), (prefix + 'head.weight',), (c, d), 'linear')]


def reference_table(model: nnx.Module) -> tuple[list[Param], dict[str, np.ndarray]]:
  """Each parameter of `model` (IFAM or ViTClassifier) with its reference key, torch shape and
  layout (`LAYOUTS`), and the reference's buffers with their values."""
  if isinstance(model, vit.ViTClassifier):
    return _classifier_table((), '', model), {}
  if not isinstance(model, ifam.IFAM):
    raise TypeError(f'expected an IFAM or a ViTClassifier, got {type(model).__name__}')
  s1 = model.stage1
  k, d, c = s1.num_parts + 1, s1.backbone.cfg.width, s1.part_classifier.out_features
  table = [
      *_backbone_table(('stage1', 'backbone'), 'stage_1.', s1.backbone.cfg),
      # The prototypes are a 1x1 conv; the modulation LayerNorm's affine is [D, K+1] there.
      Param(('stage1', 'prototypes'), ('stage_1.fc_landmarks.weight',), (k, d, 1, 1), 'conv1x1'),
      Param(('stage1', 'modulation', 'scale'), ('stage_1.modulation.weight',), (d, k), 'linear'),
      Param(('stage1', 'modulation', 'bias'), ('stage_1.modulation.bias',), (d, k), 'linear'),
      Param(('stage1', 'part_classifier', 'kernel'), ('stage_1.fc_class_landmarks.weight',),
            (c, d), 'linear'),
      *_classifier_table(('stage2',), 'stage_2.', model.stage2),
  ]
  prefix_mask = np.ones((1, model.stage2.backbone.cfg.num_prefix), np.float32)
  return table, {'stage_2.prefix_attn_mask': prefix_mask}
