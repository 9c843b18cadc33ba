"""Export and import of trained weights: Orbax, safetensors, and the reference's PyTorch layout.

`export(config, workdir, which)` reads <workdir>/params/<which> (the EMA weights where EMA is on)
and writes <workdir>/export/<which>/:

  params/                    Orbax checkpoint of the parameters: one plain nested dict of arrays
  model.safetensors          the same arrays under '/'-joined names of our tree
                             ('stage1/backbone/blocks/0/attn/qkv/kernel')
  model.json                 what rebuilds the model: config.model, num_classes, provenance
  reference_state_dict.pth   a PyTorch state dict in the reference's key layout

The reference layout is that of `FullTwoStageModelDoubleClassify` on the timm path, or of
`FullTwoStageModelDoubleClassifyHF` for a backbone with `pos_embed_layout='hf'` (RAD-DINO),
described by `names.reference_table`, the single mapping: export and import both read it, and
every layout change is a transpose, a reshape or a split along torch's output axis, so round
trips are bit-exact. Importers check what the tensors say (architecture, K, C) against the
config, then every key and shape, and raise a ValueError that names what disagrees before
anything is assigned.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util

from ifam_jax import factory, optim
from ifam_jax import workdir as workdir_lib
from ifam_jax.models import ifam, vit
from ifam_jax.sharding import path_name
from ifam_jax.weights.assign import load_params
from ifam_jax.weights.dinov2 import architecture
from ifam_jax.weights.formats import TORCH_SUFFIXES, PathLike, read_state_dict
from ifam_jax.weights.formats import read_torch_checkpoint, write_state_dict
from ifam_jax.weights.names import LAYOUTS, NAMES, reference_table
from ifam_jax.workdir import absolute

FORMATS = ('orbax', 'safetensors', 'reference')
REFERENCE_FILE = 'reference_state_dict.pth'
_TRAINED = ('final', 'best')  # parameters that training reads and writes


# ----------------------------------------------------------------------------
# The reference layout, both ways
# ----------------------------------------------------------------------------
def to_reference(model: nnx.Module) -> dict[str, Any]:
  """The model's parameters as the reference's state dict (also traces under jax.eval_shape)."""
  table, buffers = reference_table(model)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  unmapped = sorted(path_name(p) for p in set(flat) - {p.path for p in table})
  if unmapped:
    raise ValueError(f'parameters without a reference key: {unmapped}')
  out = {}
  for p in table:  # a parameter of several sources (HF's query, key, value) splits along axis 0
    x = LAYOUTS[p.layout][1](flat[p.path][...])
    rows = p.shape[0]
    out.update({k: x[i * rows:(i + 1) * rows] if len(p.sources) > 1 else x
                for i, k in enumerate(p.sources)})
  return {**out, **buffers}


def from_reference(state_dict: Mapping[str, np.ndarray], model: nnx.Module) -> dict[str, Any]:
  """A reference state dict as a nested dict of `model`'s parameters, after key/shape checks."""
  table, buffers = reference_table(model)
  expected = {k: p.shape for p in table for k in p.sources}
  expected.update({k: v.shape for k, v in buffers.items()})
  unexpected = sorted(set(state_dict) - set(expected))
  missing = sorted(set(expected) - set(state_dict))
  if unexpected or missing:
    raise ValueError(f'the reference state dict does not match the model: unexpected keys '
                     f'{unexpected}; missing keys {missing}')
  wrong = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, expected {tuple(shape)}'
           for k, shape in expected.items() if tuple(state_dict[k].shape) != tuple(shape)]
  if wrong:
    raise ValueError(f'wrong shapes in the reference state dict: {"; ".join(wrong)}')
  flat = {p.path: LAYOUTS[p.layout][0](np.concatenate([np.asarray(state_dict[k])
                                                       for k in p.sources]))
          for p in table}
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------
def export(config: ml_collections.ConfigDict, workdir: PathLike, which: str = 'final',
           formats: Sequence[str] = FORMATS) -> dict[str, epath.Path]:
  """Writes <workdir>/params/<which> in `formats` to <workdir>/export/<which>/.

  Returns the written paths by format, plus 'model_json' (always written). Runs in one process:
  the parameters are gathered on one device anyway.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f'unknown export formats {unknown}; known: {list(FORMATS)}')
  if jax.process_count() > 1:
    raise RuntimeError('export runs in a single process; start it without IFAM_MULTIHOST')
  workdir = epath.Path(workdir)
  model = factory.load_model(config, workdir, which)
  info = workdir_lib.read_params_info(workdir, which)
  out = workdir / 'export' / which
  out.mkdir(parents=True, exist_ok=True)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  paths = {'model_json': out / 'model.json'}
  description = {'model': config.model.to_dict(), 'num_classes': info['num_classes'],
                 'source': {'workdir': str(absolute(workdir)), 'which': which,
                            'step': info.get('step')}}
  paths['model_json'].write_text(json.dumps(description, indent=2) + '\n')
  if 'orbax' in formats:
    paths['orbax'] = out / 'params'
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(absolute(paths['orbax']), params, force=True)
  if 'safetensors' in formats:
    paths['safetensors'] = out / 'model.safetensors'
    named = {path_name(p): v for p, v in traverse_util.flatten_dict(params).items()}
    write_state_dict(paths['safetensors'], named)
  if 'reference' in formats:
    paths['reference'] = out / REFERENCE_FILE
    write_state_dict(paths['reference'], jax.device_get(to_reference(model)))
  return paths


# ----------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------
def read_reference(source: PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state dict of a reference snapshot ({'model_state', 'optimizer_state', ...}) or of a
  bare state dict, from a .pth/.pt file (read without torch), a .safetensors file or a mapping."""
  if isinstance(source, Mapping):
    obj = source
  elif epath.Path(source).suffix in TORCH_SUFFIXES:
    obj = read_torch_checkpoint(source)
  else:
    obj = read_state_dict(source)
  if isinstance(obj, Mapping) and 'model_state' in obj:
    obj = obj['model_state']
  if not (isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values())):
    top = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f'{source} holds neither a state dict nor a snapshot with "model_state" '
                     f'(top level: {top})')
  return dict(obj)


def _check_config(state_dict: Mapping[str, np.ndarray], model_cfg: ml_collections.ConfigDict,
                  num_classes: int | None) -> int:
  """The model's number of classes, once what the tensors say agrees with the config.

  Per stage: the ViT architecture (`dinov2.architecture`), its position-embedding layout and the
  image size its position grid implies (`image_size`, or `pos_embed_size` for HF's layout); then
  K (fc_landmarks) and C (head), C also against `num_classes`.
  """
  two_stage = any(k.startswith('stage_1.') for k in state_dict)
  if two_stage != (model_cfg.kind == 'ifam'):
    found = 'a two-stage iFAM (stage_1.* keys)' if two_stage else 'a single ViT (no stage_1.*)'
    raise ValueError(f'the checkpoint is {found} but config.model.kind is {model_cfg.kind!r}')
  prefixes = ('stage_1.', 'stage_2.') if two_stage else ('',)
  cfg = factory.vit_from_config(model_cfg)
  configured = {'width': cfg.width, 'depth': cfg.depth, 'num_registers': cfg.num_registers,
                'patch_size': cfg.patch_size, 'mlp': cfg.mlp, 'mlp_hidden': cfg.mlp_hidden,
                'image_size': cfg.image_size, 'num_parts': model_cfg.num_parts,
                'pos_embed_layout': cfg.pos_embed_layout,
                'pos_embed_size': cfg.pos_grid * cfg.patch_size}
  inferred = {}
  for prefix in prefixes:
    stage = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    naming = 'hf4' if any(k.startswith('embeddings.') for k in stage) else 'timm'
    arch = architecture(stage, naming)
    arch['pos_embed_layout'] = 'hf' if naming == 'hf4' else 'folded'
    pos = stage.get(NAMES[naming]['pos_embed'])
    tokens = pos.shape[1] - (naming == 'hf4') if pos is not None and pos.ndim == 3 else 0
    side = math.isqrt(max(tokens, 0))
    if 'patch_size' in arch and side and side * side == tokens:  # the size the grid implies
      arch['pos_embed_size' if naming == 'hf4' else 'image_size'] = side * arch['patch_size']
    inferred.update({(prefix, k): v for k, v in arch.items()})
  if 'stage_1.fc_landmarks.weight' in state_dict:
    inferred[('', 'num_parts')] = state_dict['stage_1.fc_landmarks.weight'].shape[0] - 1
  head = prefixes[-1] + 'head.weight'
  if head in state_dict:
    inferred[('', 'num_classes')] = state_dict[head].shape[0]
    num_classes = inferred[('', 'num_classes')] if num_classes is None else num_classes
  elif num_classes is None:
    raise ValueError(f'missing key {head}: cannot infer num_classes')
  configured['num_classes'] = num_classes
  disagree = [f'{prefix}{name}: checkpoint {value!r}, config {configured[name]!r}'
              for (prefix, name), value in inferred.items() if value != configured[name]]
  if disagree:
    raise ValueError('the reference checkpoint does not match the config (inferred from its '
                     f'tensors vs configured): {"; ".join(disagree)}')
  return num_classes


def import_reference(source: PathLike | Mapping[str, Any], config: ml_collections.ConfigDict,
                     num_classes: int | None = None) -> nnx.Module:
  """The model of `config.model` with the weights of a reference checkpoint.

  `num_classes` defaults to the checkpoint's (its head); given, it is checked against it.
  """
  state_dict = read_reference(source)
  num_classes = _check_config(state_dict, config.model, num_classes)
  model = factory.abstract_model(config.model, num_classes)
  load_params(model, from_reference(state_dict, model))
  return model


def load_exported(path: PathLike, config: ml_collections.ConfigDict | None = None) -> nnx.Module:
  """A model from our own export: its Orbax `params` directory or its `model.safetensors`.

  The model.json beside it describes the saved model; `config` (if given) builds the returned
  one instead, e.g. to evaluate in another compute dtype, and must have the same parameters.
  """
  path = epath.Path(path)
  description = json.loads((path.parent / 'model.json').read_text())
  num_classes = description['num_classes']
  saved_cfg = ml_collections.ConfigDict(description['model'])
  saved = factory.abstract_model(saved_cfg, num_classes)
  if path.is_dir():
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(nnx.state(saved, nnx.Param)))
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(absolute(path), target)
  elif path.suffix == '.safetensors':
    paths = {path_name(p): p for p, _ in nnx.to_flat_state(nnx.state(saved, nnx.Param))}
    named = read_state_dict(path)
    params = traverse_util.unflatten_dict({paths.get(k, (k,)): v for k, v in named.items()})
  else:
    raise ValueError(f'{path} is neither an exported Orbax params directory nor a .safetensors')
  model = saved
  if config is not None:
    model = factory.abstract_model(config.model, num_classes)
  load_params(model, params)
  return model


def _classifier(model: nnx.Module) -> vit.ViTClassifier:
  """The module that produces the class logits: stage 2 of iFAM, or the baseline itself."""
  return model.stage2 if isinstance(model, ifam.IFAM) else model


def import_to_workdir(source: PathLike, config: ml_collections.ConfigDict, workdir: PathLike,
                      which: str = 'imported', overwrite: bool = False) -> epath.Path:
  """Imports weights into <workdir>/params/<which>, read by `factory.load_model`.

  `source` is a reference checkpoint (.pth/.pt/.bin) or our export (Orbax `params` directory or
  `model.safetensors`, with model.json beside it). Returns the parameters' directory.

  Saved parameters are replaced only with `overwrite`, and so are 'final' and 'best', which
  training reads and writes: imported there, they record no step (a later train command then
  trains rather than taking the run as done) and a best score of -inf (any validation score
  replaces them).
  """
  workdir, source = epath.Path(workdir), epath.Path(source)
  target = workdir / 'params' / which
  if not overwrite and which in _TRAINED:
    raise ValueError(f'--which {which}: {target} belongs to training; import into another '
                     '--which (default: imported), or pass --overwrite')
  if not overwrite and (workdir / 'params' / f'{which}.json').exists():
    raise FileExistsError(f'{target} already holds parameters; pass --overwrite to replace them')
  if not source.exists():
    raise FileNotFoundError(f'{source} does not exist')
  if source.suffix in TORCH_SUFFIXES:
    model = import_reference(source, config)
  elif (source.is_dir() or source.suffix == '.safetensors') and (
      source.parent / 'model.json').exists():
    model = load_exported(source, config)
  else:
    raise ValueError(f'{source} is neither a reference PyTorch snapshot (.pth, .pt, .bin) nor an '
                     'export of this project (model.safetensors or its params directory, with '
                     'model.json beside it)')
  _, params, frozen, _ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  info = {'num_classes': _classifier(model).head.out_features,
          'imported_from': str(absolute(source))}
  if which in _TRAINED:
    info['step'] = None
  if which == 'best':
    info['value'] = -math.inf
  workdir_lib.save_params(workdir, which, params, frozen, info)
  return target
