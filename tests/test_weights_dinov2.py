"""DINOv2 weight import: every format against timm's own features, the real key tables, errors.

The fixtures come from tests/fixtures/make_timm_fixture.py (torch + timm); a missing fixture is a
failure, not a skip.
"""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from ifam_jax import config_lib, factory, weights
from ifam_jax.models.ifam import IFAM
from ifam_jax.models.vit import ViTClassifier, ViTConfig, VisionTransformer, vit_config

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REG = FIXTURES / 'timm_dinov2_reg_tiny'
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
TOL = 1e-5
# transformers 5 renames the hub's transformers-4 names on load (its conversion_mapping).
HF5_RENAMES = {
    'attention.attention.query.': 'attention.q_proj.',
    'attention.attention.key.': 'attention.k_proj.',
    'attention.attention.value.': 'attention.v_proj.',
    'attention.output.dense.': 'attention.o_proj.',
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _cfg(image_size: int = 70, **kw) -> ViTConfig:
  base = dict(width=64, depth=2, num_heads=4, mlp_hidden=256, num_registers=4)
  return ViTConfig(**{**base, **kw}, image_size=image_size)


def _images(size: int) -> jax.Array:
  """The fixture's uint8 images, cropped and normalised exactly as the generator does."""
  u8 = np.load(f'{REG}.npz')['images'][:, :size, :size]
  return jnp.asarray((u8.astype(np.float32) / np.float32(255) - MEAN) / STD)


def _hf5(state_dict):
  out = {}
  for k, v in state_dict.items():
    for old, new in HF5_RENAMES.items():
      k = k.replace(old, new)
    out[k] = v
  return out


def _state_dict(fmt: str) -> dict[str, np.ndarray]:
  if fmt == 'hf5':
    return _hf5(weights.read_state_dict(f'{REG}_hf.safetensors'))
  path = {'timm': f'{REG}.safetensors', 'hf4': f'{REG}_hf.safetensors',
          'official': f'{REG}_official.pth'}[fmt]
  return weights.read_state_dict(path)


def _abstract(cfg: ViTConfig) -> VisionTransformer:
  return nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))


def _random(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
  """A concrete model with random params, without compiling its initialisers (CI time)."""
  vit = _abstract(cfg)
  rng = np.random.default_rng(seed)
  for _, v in nnx.to_flat_state(nnx.state(vit, nnx.Param)):
    v.set_value(jnp.asarray(rng.normal(size=v.shape).astype(np.float32)))
  return vit


def _load(cfg: ViTConfig, source) -> VisionTransformer:
  """Loads into an abstract model: the import needs no random init (and tests run faster)."""
  vit = _abstract(cfg)
  weights.load_dinov2(vit, source)
  return vit


@nnx.jit
def _forward(vit, images):
  return vit(images)


def _params(module) -> dict:
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _assert_features(vit, want, size, keys=('cls', 'registers', 'patches')):
  out = _forward(vit, _images(size))
  for k in keys:
    err = np.abs(np.asarray(out[k]) - want[f'{k}_{size}']).max()
    assert err <= TOL, f'{k} at {size} px: max abs diff {err}'


# ----------------------------------------------------------------------------
# Features against timm
# ----------------------------------------------------------------------------
def test_detect_format():
  assert weights.detect_format(_state_dict('timm')) == 'timm'
  assert weights.detect_format(_state_dict('official')) == 'official'
  assert weights.detect_format(_state_dict('hf4')) == 'hf'
  assert weights.detect_format(_state_dict('hf5')) == 'hf'


@pytest.mark.parametrize('fmt', ['timm', 'hf4', 'hf5', 'official'])
def test_every_format_matches_timm(fmt):
  """Loaded at the native 5x5 grid; at 98 and 42 px the model resamples on the fly like timm."""
  want = np.load(f'{REG}.npz')
  vit = _load(_cfg(), _state_dict(fmt))
  for size in (70, 98, 42):
    _assert_features(vit, want, size)


@pytest.mark.parametrize('fmt', ['timm', 'official'])
@pytest.mark.parametrize('size', [98, 42])
def test_pos_embed_resampled_at_load(fmt, size):
  """Up- and downsampled (where antialiasing matters) to the configured grid, like timm."""
  vit = _load(_cfg(image_size=size), _state_dict(fmt))
  assert vit.pos_embed.shape == (1, (size // 14)**2, 64)
  _assert_features(vit, np.load(f'{REG}.npz'), size)


def test_load_from_path():
  vit = _load(_cfg(), f'{REG}_official.pth')
  _assert_features(vit, np.load(f'{REG}.npz'), 70)


def test_plain_dinov2_without_registers():
  """timm keeps the class position inside pos_embed for the plain models; it must be folded."""
  cfg = ViTConfig(width=32, depth=1, num_heads=2, mlp_hidden=128, num_registers=0, image_size=70)
  vit = _load(cfg, FIXTURES / 'timm_dinov2_tiny.safetensors')
  _assert_features(vit, np.load(FIXTURES / 'timm_dinov2_tiny.npz'), 70,
                   keys=('cls', 'patches'))


def test_plain_dinov2_resampling_warns(caplog):
  cfg = ViTConfig(width=32, depth=1, num_heads=2, mlp_hidden=128, num_registers=0, image_size=98)
  _load(cfg, FIXTURES / 'timm_dinov2_tiny.safetensors')
  assert any('non-register' in r.getMessage() and r.levelname == 'WARNING' for r in caplog.records)


def test_load_into_both_ifam_backbones():
  model = nnx.eval_shape(lambda: IFAM(num_classes=3, num_parts=2, stage1=_cfg(70),
                                       stage2=_cfg(98), rngs=nnx.Rngs(0)))
  weights.load_dinov2(model, f'{REG}.safetensors')
  want = np.load(f'{REG}.npz')
  _assert_features(model.stage1.backbone, want, 70)
  _assert_features(model.stage2.backbone, want, 98)


def test_load_into_a_classifier_and_refuse_other_modules(tmp_path):
  """The one loader serves the baseline too; a module without a DINOv2 backbone is refused before
  the file is read."""
  model = nnx.eval_shape(lambda: ViTClassifier(_cfg(), num_classes=3, rngs=nnx.Rngs(0)))
  weights.load_dinov2(model, f'{REG}.safetensors')
  _assert_features(model.backbone, np.load(f'{REG}.npz'), 70)
  with pytest.raises(TypeError, match='Linear holds no VisionTransformer'):
    weights.load_dinov2(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), tmp_path / 'absent.safetensors')


@pytest.mark.parametrize('kind', ['ifam', 'baseline'])
def test_model_builder_loads_init_weights_into_every_backbone(kind):
  """config.model.init_weights reaches every backbone of either model kind, read once."""
  c = config_lib.base_config()
  if kind == 'baseline':
    config_lib.use_baseline(c)
  c.model.update(image_size=70, dtype='float32', num_registers=4, attention='xla',
                 init_weights=f'{REG}.safetensors',
                 vit_overrides=dict(width=64, depth=2, num_heads=4, mlp_hidden=256))
  model = factory.build_model(c.model, 3, nnx.Rngs(0))
  want = np.load(f'{REG}.npz')
  for backbone in weights.dinov2.backbones(model):
    _assert_features(backbone, want, 70)
  assert len(weights.dinov2.backbones(model)) == (2 if kind == 'ifam' else 1)


# ----------------------------------------------------------------------------
# The real timm key tables
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name, variant, registers', [
    ('vit_base_patch14_reg4_dinov2', 'B/14', 4),
    ('vit_base_patch14_dinov2', 'B/14', 0),
    ('vit_giant_patch14_reg4_dinov2', 'g/14', 4),
])
def test_real_key_table_maps_one_to_one(name, variant, registers):
  """Each timm tensor becomes exactly one of our params, with the converted shape, and back.

  Tensor i is the constant i (a free broadcast view), so each converted param names its source.
  """
  table = json.loads((FIXTURES / f'{name}_keys.json').read_text())
  keys = sorted(table)
  state_dict = {k: np.broadcast_to(np.float32(i), table[k]) for i, k in enumerate(keys)}
  cfg = vit_config(variant, image_size=518, num_registers=registers)
  params = traverse_util.flatten_dict(weights.dinov2_to_vit_params(state_dict, cfg))

  shapes = {p: v.shape for p, v in nnx.to_flat_state(nnx.state(_abstract(cfg), nnx.Param))}
  assert {p: v.shape for p, v in params.items()} == shapes
  sources = {p: float(v.flat[0]) for p, v in params.items()}
  if not registers:  # the class position is folded into cls_token
    sources[('cls_token',)] -= keys.index('pos_embed')
  assert sorted(sources.values()) == list(range(len(keys)))


# ----------------------------------------------------------------------------
# SwiGLU (ViT-g) names, by round trip through each format
# ----------------------------------------------------------------------------
def _timm_state_dict(vit: VisionTransformer) -> dict[str, np.ndarray]:
  """Our params back in timm's names and torch layouts."""
  out = {}
  for path, v in nnx.to_flat_state(nnx.state(vit, nnx.Param)):
    name, x = '.'.join(map(str, path)), np.asarray(v[...])
    if path[-1] in ('kernel', 'scale'):
      x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
      name = name.rsplit('.', 1)[0] + '.weight'
    out[name.replace('patch_embed.', 'patch_embed.proj.')] = x
  return out


def _from_timm(sd: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
  """A SwiGLU timm state dict in official, HF-4 or HF-5 names (class position split off)."""
  cls_pos = np.full_like(sd['cls_token'], 0.25)
  official = {'cls_token': sd['cls_token'] - cls_pos, 'register_tokens': sd['reg_token'],
              'pos_embed': np.concatenate([cls_pos, sd['pos_embed']], axis=1),
              'mask_token': np.zeros(sd['cls_token'].shape[1:], np.float32)}
  for k, v in sd.items():
    if k not in ('cls_token', 'reg_token', 'pos_embed'):
      official[k.replace('mlp.fc1', 'mlp.w12').replace('mlp.fc2', 'mlp.w3')] = v
  if fmt == 'official':
    return official
  top = {'cls_token': 'embeddings.cls_token', 'register_tokens': 'embeddings.register_tokens',
         'pos_embed': 'embeddings.position_embeddings', 'mask_token': 'embeddings.mask_token',
         'patch_embed.proj.weight': 'embeddings.patch_embeddings.projection.weight',
         'patch_embed.proj.bias': 'embeddings.patch_embeddings.projection.bias',
         'norm.weight': 'layernorm.weight', 'norm.bias': 'layernorm.bias'}
  block = {'attn.proj': 'attention.output.dense', 'ls1.gamma': 'layer_scale1.lambda1',
           'ls2.gamma': 'layer_scale2.lambda1', 'mlp.w12': 'mlp.weights_in',
           'mlp.w3': 'mlp.weights_out'}
  hf = {}
  for k, v in official.items():
    if k in top:
      hf[top[k]] = v
      continue
    _, i, rest = k.split('.', 2)
    pre = f'encoder.layer.{i}.'
    if rest.startswith('attn.qkv.'):
      for part, x in zip(('query', 'key', 'value'), np.split(v, 3)):
        hf[f'{pre}attention.attention.{part}.{rest.split(".")[-1]}'] = x
      continue
    for old, new in block.items():
      rest = rest.replace(old, new)
    if fmt == 'hf5' and rest.startswith('mlp.weights_in.'):
      gate, up = np.split(v, 2)
      hf[f'{pre}mlp.gate_proj.{rest.split(".")[-1]}'] = gate
      hf[f'{pre}mlp.up_proj.{rest.split(".")[-1]}'] = up
      continue
    hf[pre + rest] = v
  if fmt == 'hf5':
    hf = {k.replace('mlp.weights_out.', 'mlp.down_proj.'): v for k, v in _hf5(hf).items()}
  return hf


@pytest.mark.parametrize('fmt', ['timm', 'official', 'hf4', 'hf5'])
def test_swiglu_round_trip(fmt):
  cfg = ViTConfig(width=32, depth=2, num_heads=2, mlp_hidden=48, mlp='swiglu', image_size=28)
  vit = _random(cfg)
  sd = _timm_state_dict(vit)
  if fmt != 'timm':
    sd = _from_timm(sd, fmt)
  params = weights.dinov2_to_vit_params(sd, cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), params, _params(vit))


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------
def test_unexpected_missing_and_misshaped_keys_are_named():
  sd = _state_dict('timm')
  with pytest.raises(ValueError, match=re.escape(
      "unexpected keys in timm checkpoint: ['head.weight']; missing: []")):
    weights.dinov2_to_vit_params({**sd, 'head.weight': np.zeros((3, 64))}, _cfg())
  short = {k: v for k, v in sd.items() if k != 'blocks.1.mlp.fc2.bias'}
  with pytest.raises(ValueError, match=re.escape(
      "unexpected keys in timm checkpoint: []; missing: ['blocks.1.mlp.fc2.bias']")):
    weights.dinov2_to_vit_params(short, _cfg())
  bad = {**sd, 'blocks.0.attn.proj.weight': np.zeros((64, 65), np.float32)}
  with pytest.raises(ValueError, match=re.escape(
      'blocks.0.attn.proj.weight: checkpoint (64, 65), expected (64, 64)')):
    weights.dinov2_to_vit_params(bad, _cfg())
  hf = _state_dict('hf4')
  hf.pop('encoder.layer.0.attention.attention.key.bias')
  with pytest.raises(ValueError, match=re.escape(
      "missing: ['encoder.layer.0.attention.attention.key.bias']")):
    weights.dinov2_to_vit_params(hf, _cfg())
  with pytest.raises(ValueError, match=re.escape(
      'pos_embed has shape (1, 24, 64); expected (1, h*w or 1 + h*w, 64)')):
    weights.dinov2_to_vit_params({**sd, 'pos_embed': sd['pos_embed'][:, 1:]}, _cfg())


def test_architecture_mismatch_is_named():
  sd = _state_dict('official')
  with pytest.raises(ValueError, match=r'depth: checkpoint 2, config 3'):
    weights.dinov2_to_vit_params(sd, _cfg(depth=3))
  with pytest.raises(ValueError, match=r'num_registers: checkpoint 4, config 0'):
    weights.dinov2_to_vit_params(sd, _cfg(num_registers=0))
  with pytest.raises(ValueError, match=r'width: checkpoint 64, config 128'):
    weights.dinov2_to_vit_params(sd, _cfg(width=128))


def test_concrete_model_untouched_on_error_then_loaded():
  vit = _random(_cfg())
  before = _params(vit)
  sd = {**_state_dict('timm'), 'blocks.1.ls2.gamma': np.zeros(65, np.float32)}
  with pytest.raises(ValueError, match='blocks.1.ls2.gamma'):
    weights.load_dinov2(vit, sd)
  jax.tree.map(np.testing.assert_array_equal, _params(vit), before)
  weights.load_dinov2(vit, _state_dict('timm'))
  _assert_features(vit, np.load(f'{REG}.npz'), 70)


def test_ifam_untouched_when_one_stage_fails():
  model = nnx.eval_shape(lambda: IFAM(num_classes=3, num_parts=2, stage1=_cfg(),
                                       stage2=_cfg(depth=3), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='depth: checkpoint 2, config 3'):
    weights.load_dinov2(model, _state_dict('timm'))
  stage1 = jax.tree.leaves(_params(model.stage1.backbone))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in stage1)  # still unassigned
