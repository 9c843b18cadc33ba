"""RAD-DINO (HF transformers Dinov2Model): import, HF's position-embedding interpolation, config.

The fixture comes from tests/fixtures/make_hf_dinov2_fixture.py (transformers 5.17, fp32, CPU):
a random-weight Dinov2Model shaped like RAD-DINO at D=32, depth 2, 2 heads, native grid 5x5 at
70 px, and what transformers computes at 70, 98 and 42 px. A missing fixture is a failure.
"""

import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ifam_jax import apply, config_lib, factory, weights
from ifam_jax.models import vit
from ifam_jax.models.vit import ViTConfig, VisionTransformer

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
FOLDER = FIXTURES / 'hf_dinov2_tiny'
MEAN = np.float32(0.48865)
STD = np.float32(0.24621)
SIZES = (70, 98, 42)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def expected():
  return dict(np.load(FIXTURES / 'hf_dinov2_tiny.npz'))


def _cfg(image_size: int = 70, **kw) -> ViTConfig:
  base = dict(width=32, depth=2, num_heads=2, mlp_hidden=128, num_registers=0, patch_size=14,
              pos_embed_layout='hf', pos_embed_size=70)
  return ViTConfig(**{**base, **kw}, image_size=image_size)


def _loaded(cfg: ViTConfig, source=FOLDER) -> VisionTransformer:
  model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
  weights.load_dinov2(model, source)
  return model


def _tokens(model: VisionTransformer, images_u8: np.ndarray) -> np.ndarray:
  x = jnp.asarray((images_u8.astype(np.float32) / np.float32(255) - MEAN) / STD)
  out = nnx.jit(lambda m, images: m(images))(model, x)
  return np.asarray(jnp.concatenate([out['cls'][:, None], out['patches']], axis=1))


# ----------------------------------------------------------------------------
# torch's non-antialiased bicubic, by hand
# ----------------------------------------------------------------------------
def _cubic(x: float, a: float = -0.75) -> float:
  """Keys' cubic convolution kernel W(x)."""
  x = abs(x)
  if x <= 1:
    return (a + 2) * x**3 - (a + 3) * x**2 + 1
  if x < 2:
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
  return 0.0


def _bicubic_by_hand(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """torch.nn.functional.interpolate(bicubic, align_corners=False), one output pixel at a time:
  the 4x4 taps around the half-pixel source coordinate, clamped to the edge."""
  in_h, in_w = image.shape
  out = np.zeros((out_h, out_w))
  for i in range(out_h):
    for j in range(out_w):
      sy = (i + 0.5) * in_h / out_h - 0.5
      sx = (j + 0.5) * in_w / out_w - 0.5
      y0, x0 = math.floor(sy), math.floor(sx)
      for m in range(y0 - 1, y0 + 3):
        for n in range(x0 - 1, x0 + 3):
          value = image[min(max(m, 0), in_h - 1), min(max(n, 0), in_w - 1)]
          out[i, j] += _cubic(sy - m) * _cubic(sx - n) * value
  return out


@pytest.mark.parametrize('in_shape,out_shape', [((3, 4), (5, 2)), ((5, 5), (7, 3)),
                                                ((4, 2), (4, 9))])
def test_bicubic_matrices_match_a_per_pixel_loop(in_shape, out_shape):
  image = np.random.default_rng(0).normal(size=in_shape)
  rows = vit.hf_bicubic_matrix(in_shape[0], out_shape[0]).astype(np.float64)
  cols = vit.hf_bicubic_matrix(in_shape[1], out_shape[1]).astype(np.float64)
  np.testing.assert_allclose(rows @ image @ cols.T, _bicubic_by_hand(image, *out_shape),
                             atol=1e-6)


def test_bicubic_matrix_at_the_same_size_is_the_identity():
  np.testing.assert_array_equal(vit.hf_bicubic_matrix(6, 6), np.eye(6, dtype=np.float32))


# ----------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('size', SIZES)
def test_position_embedding_matches_hf(size, expected):
  pe = weights.read_state_dict(FOLDER / 'model.safetensors')['embeddings.position_embeddings']
  g = size // 14
  patches = vit.hf_resample_pos_embed(jnp.asarray(pe[:, 1:]), (g, g), (5, 5))
  ours = np.concatenate([pe[:, :1], np.asarray(patches)], axis=1)
  assert ours.shape == expected[f'pos_embed_{size}'].shape
  np.testing.assert_allclose(ours, expected[f'pos_embed_{size}'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('size', SIZES)
def test_tokens_match_hf_on_the_fly(size, expected):
  """One model at the native 70 px, fed each size: the position embedding follows the input."""
  model = _loaded(_cfg(70))
  ours = _tokens(model, expected[f'images_{size}'])
  np.testing.assert_allclose(ours, expected[f'hidden_{size}'], rtol=0, atol=1e-5)


def test_tokens_match_hf_at_a_configured_size(expected):
  """A model configured at 98 px keeps the parameter at the checkpoint's 5x5 grid."""
  model = _loaded(_cfg(98))
  assert model.pos_embed[...].shape == (1, 26, 32)
  np.testing.assert_allclose(_tokens(model, expected['images_98']), expected['hidden_98'],
                             rtol=0, atol=1e-5)


def test_parameters_keep_the_checkpoint_values():
  sd = weights.read_state_dict(FOLDER / 'model.safetensors')
  model = _loaded(_cfg(42))
  np.testing.assert_array_equal(model.pos_embed[...], sd['embeddings.position_embeddings'])
  np.testing.assert_array_equal(model.cls_token[...], sd['embeddings.cls_token'])


def test_no_resampling_warning(caplog):
  with caplog.at_level('WARNING'):
    _loaded(_cfg(98))
  assert not [r for r in caplog.records if 'Resampling' in r.getMessage()]


def test_gradient_reaches_the_native_parameter():
  """d(sum of interpolated embeddings)/d(parameter) is the column sums of the two matrices."""
  model = _loaded(_cfg(98))

  def loss(pos_embed):
    return jnp.sum(vit.hf_resample_pos_embed(pos_embed[:, 1:], (7, 7), (5, 5)))

  grad = jax.grad(loss)(model.pos_embed[...])
  m = vit.hf_bicubic_matrix(5, 7).astype(np.float64).sum(0)
  np.testing.assert_allclose(grad[0, 1:, 0], np.outer(m, m).ravel(), atol=1e-5)
  np.testing.assert_array_equal(grad[0, 0], 0)


# ----------------------------------------------------------------------------
# Sources: a folder, pytorch_model.bin, a bare file
# ----------------------------------------------------------------------------
def _assert_same_params(a: VisionTransformer, b: VisionTransformer) -> None:
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(a, nnx.Param)),
               nnx.to_pure_dict(nnx.state(b, nnx.Param)))


def test_pytorch_bin_folder_and_bare_file_load_the_same(tmp_path):
  sd = weights.read_state_dict(FOLDER / 'model.safetensors')
  binary = tmp_path / 'bin'
  binary.mkdir()
  weights.write_state_dict(binary / 'pytorch_model.bin', sd)
  shutil.copy(FOLDER / 'config.json', binary / 'config.json')
  bare = tmp_path / 'bare' / 'rad_dino.safetensors'
  bare.parent.mkdir()
  shutil.copy(FOLDER / 'model.safetensors', bare)
  reference = _loaded(_cfg(70))
  for source in (binary, bare):
    _assert_same_params(_loaded(_cfg(70), source), reference)


def test_folder_without_weights_is_an_error(tmp_path):
  with pytest.raises(ValueError, match='model.safetensors or pytorch_model.bin'):
    _loaded(_cfg(70), tmp_path)


# ----------------------------------------------------------------------------
# config.json against the config
# ----------------------------------------------------------------------------
def _edited_folder(tmp_path: pathlib.Path, **fields) -> pathlib.Path:
  folder = tmp_path / 'edited'
  shutil.copytree(FOLDER, folder)
  config = json.loads((folder / 'config.json').read_text())
  config.update(fields)
  (folder / 'config.json').write_text(json.dumps(config))
  return folder


@pytest.mark.parametrize('fields,cfg_kw,name', [
    ({}, dict(num_heads=4), 'num_attention_heads'),
    ({'num_attention_heads': 4}, {}, 'num_attention_heads'),
    ({'layer_norm_eps': 1e-5}, {}, 'layer_norm_eps'),
    ({'num_register_tokens': 4}, {}, 'num_register_tokens'),
    ({'use_swiglu_ffn': True}, {}, 'use_swiglu_ffn'),
    ({'image_size': 98}, {}, 'image_size'),
    ({'hidden_size': 64}, {}, 'hidden_size'),
])
def test_config_json_mismatch_names_the_file_and_field(tmp_path, fields, cfg_kw, name):
  folder = _edited_folder(tmp_path, **fields) if fields else FOLDER
  model = VisionTransformer(_cfg(70, **cfg_kw), rngs=nnx.Rngs(0))
  before = np.asarray(model.cls_token[...])
  with pytest.raises(ValueError, match=rf'config\.json.*{name}: file'):
    weights.load_dinov2(model, folder)
  np.testing.assert_array_equal(model.cls_token[...], before)


def test_config_json_beside_a_file_is_checked(tmp_path):
  folder = _edited_folder(tmp_path, num_attention_heads=4)
  with pytest.raises(ValueError, match='num_attention_heads'):
    _loaded(_cfg(70), folder / 'model.safetensors')


def test_a_non_hf_config_json_is_ignored(tmp_path):
  folder = tmp_path / 'timm_like'
  folder.mkdir()
  shutil.copy(FOLDER / 'model.safetensors', folder)
  (folder / 'config.json').write_text(json.dumps({'architecture': 'vit', 'num_classes': 0}))
  _assert_same_params(_loaded(_cfg(70), folder), _loaded(_cfg(70)))


def test_position_grid_mismatch_says_what_to_set():
  with pytest.raises(ValueError, match='5x5 patch grid.*set pos_embed_size to 70'):
    _loaded(_cfg(98, pos_embed_size=98), weights.read_state_dict(FOLDER / 'model.safetensors'))


# ----------------------------------------------------------------------------
# The config switch
# ----------------------------------------------------------------------------
def test_use_rad_dino_builds_the_hf_backbone():
  c = config_lib.base_config()
  config_lib.use_rad_dino(c)
  c.model.image_size = 518
  cfg = factory.vit_from_config(c.model)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.num_registers) == (
      768, 12, 12, 14, 0)
  assert (cfg.pos_embed_layout, cfg.pos_grid, cfg.grid) == ('hf', 37, 37)
  assert cfg.pixel_mean == (0.48865,) * 3 and cfg.pixel_std == (0.24621,) * 3
  abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
  assert abstract.pos_embed.shape == (1, 1 + 37 * 37, 768)


def test_use_rad_dino_with_tiny_keeps_a_valid_grid():
  c = config_lib.base_config()
  config_lib.use_rad_dino(c)
  config_lib.tiny_from_scratch(c)
  cfg = factory.vit_from_config(c.model)
  assert cfg.pos_grid == cfg.grid == 8


def test_apply_normalises_with_the_backbone_stats():
  """`apply` feeds the model (x / 255 - mean) / std with the configured grey statistics."""
  cfg = _cfg(70, pixel_mean=(0.48865,) * 3, pixel_std=(0.24621,) * 3)

  class Echo(nnx.Module):

    def __init__(self):
      self.backbone = VisionTransformer(cfg, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return x

  graphdef, params, rest = nnx.split(Echo(), nnx.Param, ...)
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  out = apply.apply(graphdef, rest, params, nnx.State({}), images)
  np.testing.assert_allclose(out[0, 0, 0], (np.array([0, 128, 255]) / 255 - 0.48865) / 0.24621,
                             rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Export and import in the reference's HF layout (FullTwoStageModelDoubleClassifyHF)
# ----------------------------------------------------------------------------
# transformers 5 renames the hub's (and the reference's) transformers-4 attention names.
HF5_TO_HF4 = {'attention.q_proj.': 'attention.attention.query.',
              'attention.k_proj.': 'attention.attention.key.',
              'attention.v_proj.': 'attention.attention.value.',
              'attention.o_proj.': 'attention.output.dense.'}


def _hf_ifam_config(**model):
  c = config_lib.base_config()
  c.model.update(dict(image_size=42, dtype='float32', num_parts=2, num_registers=0,
                      vit_overrides=dict(width=32, depth=2, num_heads=2, mlp_hidden=128),
                      pos_embed_layout='hf', pos_embed_size=70, init_weights=str(FOLDER)))
  c.model.update(model)
  return c


@pytest.fixture(scope='module')
def hf_ifam(tmp_path_factory):
  """(config, workdir, model): a tiny iFAM with the fixture in both stages, saved as 'final'."""
  from ifam_jax import optim  # pylint: disable=import-outside-toplevel
  from ifam_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel

  config = _hf_ifam_config()
  model = factory.build_model(config.model, 3, nnx.Rngs(0))
  workdir = tmp_path_factory.mktemp('hf_ifam')
  _, params, frozen, _ = optim.split_frozen(model, config.optim.group_rules, config.optim.groups)
  workdir_lib.save_params(workdir, 'final', params, frozen, {'num_classes': 3, 'step': 1})
  return config, workdir, model


def test_reference_export_uses_transformers_names(hf_ifam):
  """Each stage's backbone keys are the checkpoint's own (transformers-4 names, no mask_token)
  under stage_1. / stage_2., with the same values."""
  from ifam_jax.weights import exchange  # pylint: disable=import-outside-toplevel

  _, _, model = hf_ifam
  exported = jax.device_get(exchange.to_reference(model))
  checkpoint = {}
  for k, v in weights.read_state_dict(FOLDER / 'model.safetensors').items():
    for new, old in HF5_TO_HF4.items():
      k = k.replace(new, old)
    checkpoint[k] = v
  del checkpoint['embeddings.mask_token']
  for stage in ('stage_1.', 'stage_2.'):
    ours = {k[len(stage):]: v for k, v in exported.items() if k.startswith(stage)}
    heads = {'fc_landmarks.weight', 'modulation.weight', 'modulation.bias',
             'fc_class_landmarks.weight'} if stage == 'stage_1.' else {
                 'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'prefix_attn_mask'}
    assert set(ours) == set(checkpoint) | heads
    for k, v in checkpoint.items():
      np.testing.assert_array_equal(ours[k], v, err_msg=stage + k)
  np.testing.assert_array_equal(exported['stage_2.prefix_attn_mask'], np.ones((1, 1)))


def test_reference_round_trip_is_bit_exact(hf_ifam):
  from ifam_jax.weights import exchange  # pylint: disable=import-outside-toplevel

  config, workdir, model = hf_ifam
  paths = exchange.export(config, workdir, formats=('reference',))
  imported = exchange.import_reference(paths['reference'], config)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(imported, nnx.Param)),
               nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize('change,message', [
    (dict(pos_embed_layout='folded', pos_embed_size=0),
     "stage_1.pos_embed_layout: checkpoint 'hf', config 'folded'"),
    (dict(pos_embed_size=98), 'stage_2.pos_embed_size: checkpoint 70, config 98'),
])
def test_reference_import_checks_the_hf_layout(hf_ifam, change, message):
  from ifam_jax.weights import exchange  # pylint: disable=import-outside-toplevel

  _, _, model = hf_ifam
  state_dict = jax.device_get(exchange.to_reference(model))
  with pytest.raises(ValueError, match=re.escape(message)):
    exchange.import_reference(state_dict, _hf_ifam_config(**change))
