"""Config -> data sources, transforms and models: the builders every entry point shares.

  make_train_source / make_eval_source(s)
                                    a data source per config entry (checked: `check_spec`), eval
                                    splits labelled by the training classes, all named by
                                    data.classes and data.attribute_names
  use_saved_classes                 the class names saved with a run's parameters, for
                                    evaluating without its training folder
  make_transforms                   (train, eval) worker transforms of the configured recipe
  build_model / abstract_model      the configured method's model, with DINOv2 weights if set
  load_model                        that model with the parameters a run saved in its workdir
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from ifam_jax import data as data_lib
from ifam_jax import methods, optim, weights
from ifam_jax import workdir as workdir_lib
from ifam_jax.models import vit

SOURCES = {
    'folder': data_lib.ImageFolderSource,
    'tfds': data_lib.TfdsSource,
    'waterbirds': data_lib.WaterbirdsSource,
    'metashift': data_lib.MetaShiftSource,
    'in9': data_lib.ImageNet9Source,
    'cub': data_lib.CubSource,
    'siim_acr': data_lib.SiimAcrSource,
    'synthetic': data_lib.SyntheticSpuriousSource,
}

# Sources labelled by their class folders, and the folder that holds those of a spec.
FOLDER_SOURCES = {'folder': lambda spec: spec['root'],
                  'metashift': lambda spec: os.path.join(spec['root'], spec['split'])}
# Sources of the Waterbirds layout, whose classes and places the config may name.
NAMED_SOURCES = ('waterbirds',)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------
def check_spec(spec: Mapping[str, Any], name: str = 'data spec') -> None:
  """A spec names a known source and exactly the keys it takes: one left over from another
  source (synthetic's num_examples on a waterbirds spec) fails here, naming `name` (e.g.
  'data.train', 'data.evals.val') and the keys, instead of as a TypeError of the source."""
  kind = spec.get('source')
  if kind not in SOURCES:
    raise ValueError(f'{name}: unknown data source {kind!r}; known: {sorted(SOURCES)}')
  params = inspect.signature(SOURCES[kind]).parameters
  keys = set(spec) - {'source'}
  unknown = sorted(keys - set(params))
  missing = sorted(k for k, p in params.items() if p.default is p.empty and k not in keys)
  if unknown or missing:
    problems = ([f'takes no key(s) {unknown}'] if unknown else []) + (
        [f'needs key(s) {missing}'] if missing else [])
    raise ValueError(f'{name}: the {kind!r} source {" and ".join(problems)}; its keys are '
                     f'{sorted(params)} (to train on a data set of your own, give the recipe '
                     'its folder, e.g. configs/demo.py:root=<folder>)')


def check_data_specs(config: ml_collections.ConfigDict) -> None:
  """`check_spec` of data.train and every data.evals entry, reading nothing from disk."""
  check_spec(config.data.train, 'data.train')
  for name, spec in config.data.evals.items():
    check_spec(spec, f'data.evals.{name}')


def make_source(spec: Mapping[str, Any], classes: Sequence[str] | None = None,
                attribute_names: Sequence[str] = (),
                name: str = 'data spec') -> data_lib.sources.Source:
  """A data source from a config entry such as dict(source='waterbirds', root=..., split=...).

  `classes` labels a folder-like source (`FOLDER_SOURCES`) by these names instead of its own
  sorted class folders, and names the classes of a Waterbirds-layout source (`NAMED_SOURCES`),
  whose places `attribute_names` names; other sources take their names from their metadata and
  ignore both. `make_train_source` and `make_eval_source` pass the config's. `name` is where the
  spec sits in the config, for errors (`check_spec`).
  """
  check_spec(spec, name)
  spec = dict(spec)
  kind = spec.pop('source')
  if classes is not None and (kind in FOLDER_SOURCES or kind in NAMED_SOURCES):
    if spec.get('classes') is not None and list(spec['classes']) != list(classes):
      raise ValueError(f'{kind} source {spec.get("root")} sets classes {list(spec["classes"])}, '
                       f'but the training classes are {list(classes)}')
    spec['classes'] = list(classes)
  if attribute_names and kind in NAMED_SOURCES:
    spec['attribute_names'] = list(attribute_names)
  return SOURCES[kind](**spec)


def make_train_source(config: ml_collections.ConfigDict) -> data_lib.sources.Source:
  """The source of data.train, named by data.classes and data.attribute_names."""
  kind = config.data.train.source
  if config.data.attribute_names and kind not in NAMED_SOURCES:
    raise ValueError(f'data.attribute_names names the places of a '
                     f'{" or ".join(map(repr, NAMED_SOURCES))} source; data.train is a {kind!r} '
                     'source')
  return make_source(config.data.train, config.data.classes or None, config.data.attribute_names,
                     'data.train')


def training_classes(config: ml_collections.ConfigDict) -> list[str] | None:
  """The class names that label the eval splits: data.classes, else the class folders of a
  folder-like training split (listed, not scanned); None when the training labels come from
  metadata."""
  if config.data.classes:
    return list(config.data.classes)
  spec = dict(config.data.train)
  if spec['source'] not in FOLDER_SOURCES:
    return None
  if spec.get('classes') is not None:
    return list(spec['classes'])
  try:
    return data_lib.sources.class_folders(FOLDER_SOURCES[spec['source']](spec))
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{e}; its class folders label the eval splits: set data.classes '
                            'to evaluate without the training data') from None


def make_eval_source(config: ml_collections.ConfigDict, spec: Mapping[str, Any],
                     name: str = 'data spec') -> data_lib.sources.Source:
  """The source of an eval `spec`, labelled by the training classes (`training_classes`) and
  named by data.attribute_names, as the training split is; `name` as in `make_source`."""
  return make_source(spec, training_classes(config), config.data.attribute_names, name)


def make_eval_sources(config: ml_collections.ConfigDict) -> dict[str, data_lib.sources.Source]:
  """The sources of data.evals (`make_eval_source`)."""
  return {name: make_eval_source(config, spec, f'data.evals.{name}')
          for name, spec in config.data.evals.items()}


def use_saved_classes(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                      which: str) -> None:
  """Sets data.classes to the class names saved with <workdir>/params/<which> when the config
  names none and the class folders of its training split are gone: a model trained on an image
  folder is then evaluated without that folder. Raises `training_classes`' error when the
  parameters carry no names."""
  if config.data.classes or config.data.train.source not in FOLDER_SOURCES:
    return
  try:
    training_classes(config)
  except FileNotFoundError:
    saved = (workdir_lib.read_params_info(workdir, which) or {}).get('class_names')
    if not saved:
      raise
    config.data.classes = tuple(saved)


def make_transforms(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(train transform, eval transform) for the configured augmentation and image size."""
  size, augment = config.model.image_size, config.data.augment
  t = data_lib.transforms
  if augment == 'imagenet':
    return t.imagenet_train(size), t.imagenet_eval(size)
  if augment == 'cub_original':
    return t.cub_original_train(size), t.resize_center_crop(size)
  if augment == 'siim_acr':
    return t.siim_acr(size, train=True), t.siim_acr(size, train=False)
  if augment == 'none':
    return t.resize_center_crop(size), t.resize_center_crop(size)
  raise ValueError(f"unknown augment {augment!r}; use 'imagenet', 'cub_original', 'siim_acr' "
                   "or 'none'")


# ----------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------
def vit_from_config(model_cfg: ml_collections.ConfigDict) -> vit.ViTConfig:
  return vit.vit_config(model_cfg.variant, image_size=model_cfg.image_size,
                        num_registers=model_cfg.num_registers, dtype=model_cfg.dtype,
                        attention=model_cfg.attention,
                        pos_embed_layout=model_cfg.pos_embed_layout,
                        pos_embed_size=model_cfg.pos_embed_size,
                        pixel_mean=tuple(model_cfg.pixel_mean) or None,
                        pixel_std=tuple(model_cfg.pixel_std) or None,
                        **dict(model_cfg.vit_overrides))


def use_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """Points JAX's persistent compilation cache at `compilation_cache_dir`, if set."""
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(config.compilation_cache_dir))


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The XLA options for this backend's jitted steps (`gpu_compiler_options` on GPUs)."""
  return dict(config.gpu_compiler_options) if jax.default_backend() == 'gpu' else {}


def build_model(model_cfg: ml_collections.ConfigDict, num_classes: int,
                rngs: nnx.Rngs) -> nnx.Module:
  """The model of the configured method (`methods`), with DINOv2 weights if configured."""
  model = methods.get(model_cfg.kind).build(model_cfg, vit_from_config(model_cfg), num_classes,
                                            rngs)
  if model_cfg.init_weights:
    weights.load_dinov2(model, model_cfg.init_weights)
  return model


def abstract_model(model_cfg: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """The model of `model_cfg` without materialised weights, for restoring saved ones into."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.init_weights = ''
  return nnx.eval_shape(lambda: build_model(model_cfg, num_classes, nnx.Rngs(0)))


def load_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               which: str = 'final') -> nnx.Module:
  """The model of `config` with the parameters saved under <workdir>/params/<which>.

  which='step_<N>' reads train checkpoint N instead: its EMA where the run had one, else its
  params, plus frozen; a partial restore that reads no optimizer state.
  """
  workdir = epath.Path(workdir)
  info = workdir_lib.read_params_info(workdir, which)
  if info is None:
    raise FileNotFoundError(f'no saved parameters at {workdir / "params" / which}; train first')
  abstract = abstract_model(config.model, info['num_classes'])
  graphdef, params, frozen, rest = optim.split_frozen(abstract, config.optim.group_rules,
                                                      config.optim.groups)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        {'params': params, 'frozen': frozen})
  if (state := workdir_lib.train_checkpoint(workdir, which)) is None:
    path = workdir_lib.absolute(workdir / 'params' / which)
    restored = ocp.StandardCheckpointer().restore(path, target)
  else:
    key = 'ema' if info['ema'] else 'params'
    item = {'train': {key: target['params']}, 'frozen': target['frozen']}
    restored = ocp.PyTreeCheckpointHandler().restore(state, args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
    restored = {'params': restored['train'][key], 'frozen': restored['frozen']}
  return nnx.merge(graphdef, restored['params'], restored['frozen'], rest)
