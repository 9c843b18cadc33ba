"""Pretrained DINOv2 import: format detection, architecture inference, conversion, loading.

`load_dinov2(model, source)` is the one loader: it reads a local file once, without torch, in
any of the formats the weights ship in (`names.NAMES`: timm and official hub files, HF
transformers 4 and 5 safetensors or pytorch_model.bin), and loads it into every backbone of a
`VisionTransformer`, a `ViTClassifier` or an `IFAM` (both stages, as the reference does).

A state dict is normalised to the tree of `models.vit.VisionTransformer`, which is timm's folded
layout: `cls_token` already carries the class position embedding and `pos_embed` covers the
patches only. Sizes S, B, L and g (SwiGLU) follow the same rules. The architecture is inferred
from the tensors and must equal the module's config (the head count cannot be inferred: it is not
in the weights). Unknown, missing or wrong-shaped tensors raise a ValueError that names them,
before anything is assigned.

In the folded layout (`ViTConfig.pos_embed_layout='folded'`, timm's) position embeddings are
resampled once, at load, to the configured grid with antialiased bicubic
(`models.vit.resample_pos_embed`): exactly what timm does at load time, and what the official and
HF code do at run time for the register models. For the non-register models the official code
uses non-antialiased bicubic with a +0.1 offset, and HF non-antialiased bicubic without it;
`jax.image` has neither kernel, so those features differ slightly and a warning is logged. The
'hf' layout (RAD-DINO) keeps the checkpoint's [1, 1 + h0*w0, D] as it is and interpolates it
exactly as HF does, in the forward pass (`models.vit.hf_resample_pos_embed`): no warning.

A source is a file or a HF `save_pretrained` folder (model.safetensors or pytorch_model.bin).
A HF config.json in the folder, or beside the file, is checked against the module's config,
the head count included (`check_hf_config`).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from ifam_jax.models.vit import LN_EPS, ViTConfig, VisionTransformer, resample_pos_embed
from ifam_jax.weights import assign
from ifam_jax.weights.formats import PathLike, StateDict, read_state_dict
from ifam_jax.weights.names import LAYOUTS, NAMES, vit_table

Format = Literal['timm', 'official', 'hf']


# ----------------------------------------------------------------------------
# What a state dict is
# ----------------------------------------------------------------------------
def detect_format(keys: Iterable[str]) -> Format:
  """'hf' (transformers), 'official' (DINOv2 hub .pth) or 'timm', from the key names alone."""
  keys = set(keys)
  if any(k.startswith(('embeddings.', 'encoder.layer.')) for k in keys):
    return 'hf'
  if {'register_tokens', 'mask_token'} & keys or any('.mlp.w12.' in k for k in keys):
    return 'official'
  if 'cls_token' in keys or any(k.startswith('blocks.') for k in keys):
    return 'timm'
  raise ValueError(f'not a DINOv2 state dict; first keys: {sorted(keys)[:10]}')


def _naming(state_dict: StateDict) -> str:
  """The key of `names.NAMES` that `state_dict` uses."""
  fmt = detect_format(state_dict)
  if fmt == 'hf':
    return 'hf5' if any('.attention.q_proj.' in k for k in state_dict) else 'hf4'
  return fmt


def architecture(sd: StateDict, naming: str) -> dict[str, Any]:
  """What the tensors say about the ViT; a field is absent when its tensors are missing."""
  n = NAMES[naming]
  arch: dict[str, Any] = {}
  block = re.compile(re.escape(n['block']) + r'(\d+)\.')
  depths = [int(m.group(1)) + 1 for k in sd if (m := block.match(k))]
  if depths:
    arch['depth'] = max(depths)
  if n['cls_token'] in sd:
    arch['width'] = sd[n['cls_token']].shape[-1]
  arch['num_registers'] = sd[n['reg_token']].shape[1] if n['reg_token'] in sd else 0
  if n['patch_embed'] + '.weight' in sd:
    arch['patch_size'] = sd[n['patch_embed'] + '.weight'].shape[-1]
  pre = f'{n["block"]}0.'
  for kind in ('gelu', 'swiglu'):  # timm names both alike; the fc1/fc2 shapes tell them apart
    fc1 = [pre + s + '.weight' for s in n[kind + '.fc1']]
    fc2 = pre + n[kind + '.fc2'][0] + '.weight'
    if all(k in sd for k in fc1 + [fc2]):
      arch['mlp_hidden'] = sd[fc2].shape[-1]
      rows = sum(sd[k].shape[0] for k in fc1)
      arch['mlp'] = 'swiglu' if rows == 2 * arch['mlp_hidden'] else 'gelu'
      break
  return arch


def _patch_pos_embed(sd: StateDict, naming: str,
                     width: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(patch position embeddings [1, h*w, D], the class position [1, 1, D] or None).

  Official and HF checkpoints include the class position; timm's include it only for the
  non-register models (`no_embed_class=False`): a square token count means patches only.
  """
  key = NAMES[naming]['pos_embed']
  pe = np.asarray(sd[key], np.float32)
  tokens = pe.shape[1] if pe.ndim == 3 else 0
  with_cls = naming != 'timm' or math.isqrt(tokens)**2 != tokens
  side = math.isqrt(max(tokens - with_cls, 0))
  if side == 0 or pe.shape != (1, side * side + with_cls, width):
    form = '1 + h*w' if naming != 'timm' else 'h*w or 1 + h*w'
    raise ValueError(f'{key} has shape {pe.shape}; expected (1, {form}, {width}) with h == w')
  return (pe[:, 1:], pe[:, :1]) if with_cls else (pe, None)


# ----------------------------------------------------------------------------
# DINOv2 -> VisionTransformer
# ----------------------------------------------------------------------------
def dinov2_to_vit_params(state_dict: StateDict, cfg: ViTConfig) -> dict[str, Any]:
  """Converts a DINOv2 state dict of any supported format to `VisionTransformer(cfg)` params.

  Returns a nested dict of float32 numpy arrays shaped like `nnx.state(vit, nnx.Param)`, with
  integer block indices (so `nnx.replace_by_pure_dict` accepts it). Position embeddings are
  resampled to `cfg.grid` (see the module docstring).
  """
  naming = _naming(state_dict)
  arch = architecture(state_dict, naming)
  config = {'width': cfg.width, 'depth': cfg.depth, 'num_registers': cfg.num_registers,
            'patch_size': cfg.patch_size, 'mlp': cfg.mlp, 'mlp_hidden': cfg.mlp_hidden}
  disagree = [f'{k}: checkpoint {v!r}, config {config[k]!r}' for k, v in arch.items()
              if v != config[k]]
  if disagree:
    raise ValueError(f'{naming} checkpoint does not match the ViT config: {"; ".join(disagree)}')

  n = NAMES[naming]
  table = vit_table(cfg, naming)
  expected = {k for prm in table for k in prm.sources} | {n['pos_embed']}
  unexpected = sorted(set(state_dict) - expected - {n['mask_token']})
  missing = sorted(expected - set(state_dict))
  if unexpected or missing:
    raise ValueError(f'unexpected keys in {naming} checkpoint: {unexpected}; missing: {missing}')
  wrong = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, expected {prm.shape}'
           for prm in table for k in prm.sources if tuple(state_dict[k].shape) != prm.shape]
  if wrong:
    raise ValueError(f'wrong shapes in {naming} checkpoint: {"; ".join(wrong)}')
  pos_embed, cls_pos = _patch_pos_embed(state_dict, naming, cfg.width)

  flat = {}
  for prm in table:
    parts = [np.asarray(state_dict[k], np.float32) for k in prm.sources]
    x = parts[0] if len(parts) == 1 else np.concatenate(parts)
    flat[prm.path] = LAYOUTS[prm.layout][0](x)
  source = math.isqrt(pos_embed.shape[1])
  if cfg.pos_embed_layout == 'hf':
    if source != cfg.pos_grid:
      raise ValueError(
          f'{n["pos_embed"]} covers a {source}x{source} patch grid but the config\'s is '
          f'{cfg.pos_grid}x{cfg.pos_grid}; set pos_embed_size to {source * cfg.patch_size}')
    cls_pos = np.zeros((1, 1, cfg.width), np.float32) if cls_pos is None else cls_pos
    flat[('pos_embed',)] = np.concatenate([cls_pos, pos_embed], axis=1)
    return traverse_util.unflatten_dict(flat)
  if cls_pos is not None:
    flat[('cls_token',)] = flat[('cls_token',)] + cls_pos
  if source != cfg.grid:
    if not cfg.num_registers:
      logging.warning(
          'Resampling the position embeddings of a non-register DINOv2 checkpoint from %dx%d '
          'to %dx%d with antialiased bicubic (timm). The official and HF code resample these '
          'models with non-antialiased bicubic, which jax.image cannot reproduce, so features '
          "will differ slightly from theirs; HF's is exact with model.pos_embed_layout='hf'.",
          source, source, cfg.grid, cfg.grid)
    pos_embed = np.asarray(resample_pos_embed(jnp.asarray(pos_embed), (cfg.grid, cfg.grid)))
  flat[('pos_embed',)] = pos_embed
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------
# HF folders and their config.json
# ----------------------------------------------------------------------------
HF_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
HF_MODEL_TYPES = ('dinov2', 'dinov2_with_registers')


def read_source(source: PathLike) -> tuple[StateDict, pathlib.Path | None]:
  """(state dict, its HF config.json or None) of a weights file or a HF folder.

  A config.json counts only when it describes a HF DINOv2 (`model_type`); timm's hub folders
  carry a config.json of their own, which says nothing checkable here.
  """
  path = pathlib.Path(source)
  if path.is_dir():
    found = [path / name for name in HF_WEIGHTS if (path / name).exists()]
    if not found:
      raise ValueError(f'{path} is a folder without {" or ".join(HF_WEIGHTS)}')
    path = found[0]
  config = path.parent / 'config.json'
  if config.exists():
    model_type = json.loads(config.read_text()).get('model_type')
    if model_type not in HF_MODEL_TYPES:
      config = None
  else:
    config = None
  return read_state_dict(path), config


def check_hf_config(path: PathLike, cfg: ViTConfig) -> None:
  """Raises a ValueError naming `path` and each field of a HF Dinov2Config that `cfg` disagrees
  with. The head count is in no tensor, so this is the only check of it."""
  hf = json.loads(pathlib.Path(path).read_text())
  # HF field: (HF's default, ours). A field the file leaves out takes HF's default.
  fields = {
      'hidden_size': (768, cfg.width),
      'num_hidden_layers': (12, cfg.depth),
      'num_attention_heads': (12, cfg.num_heads),
      'patch_size': (14, cfg.patch_size),
      'layer_norm_eps': (1e-6, LN_EPS),
      'num_register_tokens': (0, cfg.num_registers),
      'use_swiglu_ffn': (False, cfg.mlp == 'swiglu'),
  }
  if cfg.pos_embed_layout == 'hf':
    fields['image_size'] = (224, cfg.pos_grid * cfg.patch_size)
  disagree = [f'{k}: file {hf.get(k, default)!r}, config {ours!r}'
              for k, (default, ours) in fields.items() if hf.get(k, default) != ours]
  if disagree:
    raise ValueError(f'{path} does not match the ViT config: {"; ".join(disagree)}')


# ----------------------------------------------------------------------------
# The loader
# ----------------------------------------------------------------------------
def backbones(model: nnx.Module) -> list[VisionTransformer]:
  """Every DINOv2 ViT inside `model` (itself, a classifier's, both of iFAM's stages), in order."""
  found = [node for _, node in nnx.iter_graph(model) if isinstance(node, VisionTransformer)]
  if not found:
    raise TypeError(f'{type(model).__name__} holds no VisionTransformer to load DINOv2 into')
  return found


def load_dinov2(model: nnx.Module, source: PathLike | StateDict) -> None:
  """Loads DINOv2 weights (a file, a HF folder or a state dict) into every backbone of `model`,
  in place.

  The file is read once; each backbone gets its own copy, resampled to its own grid. Every
  backbone is checked (against a HF config.json too, `read_source`) and converted before any is
  assigned, so an error leaves `model` as it was.
  """
  targets = backbones(model)
  state_dict, config = (source, None) if isinstance(source, Mapping) else read_source(source)
  if config is not None:
    for b in targets:
      check_hf_config(config, b.cfg)
  pending = [assign.checked_pairs(b, dinov2_to_vit_params(state_dict, b.cfg)) for b in targets]
  for pairs in pending:
    assign.assign(pairs)
