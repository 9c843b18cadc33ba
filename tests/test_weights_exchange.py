"""Export and import of trained weights: bit-exact round trips, the reference's key table, errors,
and the reference state dict as a torch zip that torch loads.

The tiny models (D=32, depth 2, 2 heads, K=2, C=3; iFAM at 56 px, baseline at 28 px, every
parameter N(0, 1)) come from tests/fixtures/check_reference_layout.py, whose `check` half proves
on a torch + timm machine that the same exports load into the reference's modules (strict=True)
and give our outputs.
"""

import collections
import importlib.util
import json
import pathlib
import pickletools
import re
import sys
import zipfile

import jax
import numpy as np
import pytest
from flax import nnx

from ifam_jax import factory, weights
from ifam_jax import workdir as workdir_lib
from ifam_jax.weights import exchange
from ifam_jax.models import ifam
from ifam_jax.sharding import path_name
from test_weights_formats import allocates_at_most, assert_bit_exact, write_tensor_pth

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
_spec = importlib.util.spec_from_file_location('check_reference_layout',
                                               FIXTURES / 'check_reference_layout.py')
layout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(layout)
IMAGE_SIZE = {'ifam': 56, 'baseline': 28}
# The globals torch.save writes for a state dict, and all that torch.load(weights_only) needs.
TORCH_GLOBALS = {'collections OrderedDict', 'torch._utils _rebuild_tensor_v2', 'torch FloatStorage'}


def _params(model: nnx.Module) -> dict[tuple, np.ndarray]:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@nnx.jit
def _outputs(model: nnx.Module, images: jax.Array) -> dict[str, jax.Array]:
  """What evaluation reads; one compiled program serves every model, original and imported."""
  if isinstance(model, ifam.IFAM):
    out = model(images, train=False)
    return {'logits': out.logits, 'stage1_logits': out.stage1_logits,
            'part_maps': out.part_maps, 'fg_mask': out.fg_mask}
  return {'logits': model(images)}


@pytest.fixture(scope='module', params=['ifam', 'baseline'])
def exported(request, tmp_path_factory):
  """(config, workdir, written paths) of a saved and exported tiny model."""
  config = layout.tiny_config(request.param, IMAGE_SIZE[request.param])
  workdir = tmp_path_factory.mktemp(request.param)
  layout.save_random_params(config, workdir)
  return config, workdir, exchange.export(config, workdir)


# ----------------------------------------------------------------------------
# Round trips and evaluation
# ----------------------------------------------------------------------------
def test_export_writes_every_format(exported):
  config, workdir, paths = exported
  out = workdir / 'export' / 'final'
  assert paths == {'model_json': out / 'model.json', 'orbax': out / 'params',
                   'safetensors': out / 'model.safetensors',
                   'reference': out / exchange.REFERENCE_FILE}
  description = json.loads(paths['model_json'].read_text())
  assert description['model'] == json.loads(json.dumps(config.model.to_dict()))  # tuples: lists
  assert description['num_classes'] == layout.NUM_CLASSES
  assert description['source']['which'] == 'final' and description['source']['step'] == 1
  names = set(weights.read_state_dict(paths['safetensors']))
  assert {path_name(p) for p in _params(factory.load_model(config, workdir))} == names


def test_every_format_round_trips_bit_exactly(exported):
  config, workdir, paths = exported
  original = _params(factory.load_model(config, workdir))
  assert_bit_exact(_params(exchange.load_exported(paths['orbax'])), original)
  assert_bit_exact(_params(exchange.load_exported(paths['safetensors'], config)), original)
  assert_bit_exact(_params(exchange.import_reference(paths['reference'], config)), original)


def test_imported_workdir_evaluates_like_the_original(exported, tmp_path):
  config, workdir, paths = exported
  images = np.random.default_rng(1).standard_normal(
      (4, config.model.image_size, config.model.image_size, 3), np.float32)
  expected = jax.device_get(_outputs(factory.load_model(config, workdir), images))
  for fmt in exchange.FORMATS:
    target = exchange.import_to_workdir(paths[fmt], config, tmp_path / fmt)
    assert target == tmp_path / fmt / 'params' / 'imported'
    info = workdir_lib.read_params_info(tmp_path / fmt, 'imported')
    assert info['num_classes'] == layout.NUM_CLASSES
    imported = factory.load_model(config, tmp_path / fmt, 'imported')
    assert_bit_exact(jax.device_get(_outputs(imported, images)), expected)


def test_reference_snapshot_wrapper_is_unwrapped(exported):
  config, _, paths = exported
  state_dict = weights.read_torch_checkpoint(paths['reference'])
  snapshot = {'model_state': state_dict, 'optimizer_state': {'state': {}, 'param_groups': []},
              'scaler_state': {}, 'finished_epoch': 3}
  assert_bit_exact(_params(exchange.import_reference(snapshot, config)),
                   _params(exchange.import_reference(state_dict, config)))


# ----------------------------------------------------------------------------
# The reference layout
# ----------------------------------------------------------------------------
def test_reference_pth_reads_back_exactly(exported):
  config, workdir, paths = exported
  expected = jax.device_get(exchange.to_reference(factory.load_model(config, workdir)))
  read = weights.read_torch_checkpoint(paths['reference'])
  assert isinstance(read, collections.OrderedDict)
  assert_bit_exact(dict(read), expected)
  assert all(v.dtype == np.float32 for v in read.values())
  if config.model.kind == 'ifam':
    assert all(k.startswith(('stage_1.', 'stage_2.')) for k in read)
  else:  # timm's ViT keys, re-headed like stage 2 (a bias-free head, no mask buffer)
    assert {'cls_token', 'reg_token', 'pos_embed', 'norm.weight', 'fc_norm.weight',
            'fc_norm.bias', 'head.weight', 'blocks.1.ls2.gamma'} <= read.keys()
    assert not any(k.startswith('stage_') or k in ('head.bias', 'prefix_attn_mask') for k in read)


def test_full_size_keys_are_timms_plus_ifams():
  """ViT-B/14-reg4 at 518 px, K=8, C=200: timm's real key table per stage plus iFAM's keys."""
  timm_keys = json.loads((FIXTURES / 'vit_base_patch14_reg4_dinov2_keys.json').read_text())
  k, c = layout.FULL_SIZE['num_parts'] + 1, layout.FULL_SIZE['num_classes']
  expected = {f'{stage}.{key}': shape for stage in ('stage_1', 'stage_2')
              for key, shape in timm_keys.items()}
  expected.update({
      'stage_1.fc_landmarks.weight': [k, 768, 1, 1],
      'stage_1.modulation.weight': [768, k],
      'stage_1.modulation.bias': [768, k],
      'stage_1.fc_class_landmarks.weight': [c, 768],
      'stage_2.fc_norm.weight': [768],
      'stage_2.fc_norm.bias': [768],
      'stage_2.head.weight': [c, 768],
      'stage_2.prefix_attn_mask': [1, 5],
  })
  assert layout.full_size_reference_shapes() == expected


@pytest.fixture(scope='module')
def ifam_reference(tmp_path_factory):
  """The reference state dict of a saved tiny iFAM."""
  config = layout.tiny_config('ifam', IMAGE_SIZE['ifam'])
  workdir = tmp_path_factory.mktemp('errors')
  layout.save_random_params(config, workdir)
  return config, jax.device_get(exchange.to_reference(factory.load_model(config, workdir)))


@pytest.mark.parametrize('replace, drop, config_change, message', [
    ({'stage_1.extra.weight': np.zeros(3, np.float32)}, (), {},
     "unexpected keys ['stage_1.extra.weight']"),
    ({}, ('stage_2.blocks.1.mlp.fc2.bias',), {}, "missing keys ['stage_2.blocks.1.mlp.fc2.bias']"),
    ({'stage_1.blocks.0.attn.proj.weight': np.zeros((32, 31), np.float32)}, (), {},
     'stage_1.blocks.0.attn.proj.weight: checkpoint (32, 31), expected (32, 32)'),
    ({}, (), {'num_parts': 3}, 'num_parts: checkpoint 2, config 3'),
    ({}, (), {'num_registers': 0}, 'stage_1.num_registers: checkpoint 4, config 0'),
    ({}, (), {'image_size': 28}, 'stage_2.image_size: checkpoint 56, config 28'),
    ({}, (), {'kind': 'baseline'},
     "is a two-stage iFAM (stage_1.* keys) but config.model.kind is 'baseline'"),
])
def test_reference_import_errors_name_the_problem(ifam_reference, replace, drop, config_change,
                                                  message):
  _, state_dict = ifam_reference
  config = layout.tiny_config('ifam', IMAGE_SIZE['ifam'])  # a fresh one to change
  config.model.update(config_change)
  edited = {k: v for k, v in state_dict.items() if k not in drop} | replace
  with pytest.raises(ValueError, match=re.escape(message)):
    exchange.import_reference(edited, config)


def test_num_classes_is_checked_against_the_head(ifam_reference):
  config, state_dict = ifam_reference
  with pytest.raises(ValueError, match=re.escape('num_classes: checkpoint 3, config 5')):
    exchange.import_reference(state_dict, config, num_classes=5)
  with pytest.raises(ValueError, match=re.escape('missing key stage_2.head.weight')):
    exchange.import_reference({k: v for k, v in state_dict.items() if k != 'stage_2.head.weight'},
                            config)


def test_own_export_with_another_architecture_is_refused(exported):
  config, _, paths = exported
  other = layout.tiny_config(config.model.kind, config.model.image_size)
  other.model.vit_overrides.mlp_hidden = 48
  with pytest.raises(ValueError, match=re.escape('mlp.fc1.kernel: converted (32, 64), model '
                                                 '(32, 48)')):
    exchange.load_exported(paths['safetensors'], other)


def test_unknown_format_and_missing_params(tmp_path):
  config = layout.tiny_config()
  with pytest.raises(ValueError, match="unknown export formats \\['onnx'\\]"):
    exchange.export(config, tmp_path, formats=('onnx',))
  with pytest.raises(FileNotFoundError, match='no saved parameters'):
    exchange.export(config, tmp_path)


def test_import_refuses_oversized_tensors_before_allocating(tmp_path):
  """The reader of weights= also reads --mode import's source: the same check, the key named."""
  config = layout.tiny_config()
  for keys in (('stage_2.head.weight',), ('model_state', 'stage_2.head.weight')):
    path = write_tensor_pth(tmp_path / 'crafted.pth', 0, (2048, 2048), (0, 0), keys=keys)
    message = f"tensor '{'/'.join(keys)}' has 4194304 elements, more than its storage holds"
    with allocates_at_most(2**20), pytest.raises(ValueError, match=message):
      exchange.read_reference(path)
    with allocates_at_most(2**20), pytest.raises(ValueError, match=message):
      exchange.import_to_workdir(path, config, tmp_path / 'workdir')
  assert not (tmp_path / 'workdir' / 'params').exists()


def test_import_names_what_it_accepts(tmp_path):
  config = layout.tiny_config()
  foreign = tmp_path / 'foreign.safetensors'
  weights.write_state_dict(foreign, {'w': np.zeros(2, np.float32)})
  accepted = ('is neither a reference PyTorch snapshot (.pth, .pt, .bin) nor an export of this '
              'project (model.safetensors or its params directory, with model.json beside it)')
  for source in (foreign, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f'{source} {accepted}')):
      exchange.import_to_workdir(source, config, tmp_path / 'workdir')
  with pytest.raises(FileNotFoundError, match=re.escape(f'{tmp_path / "absent.pth"} does not')):
    exchange.import_to_workdir(tmp_path / 'absent.pth', config, tmp_path / 'workdir')


def test_import_never_overwrites_unless_asked(ifam_reference, tmp_path):
  config, state_dict = ifam_reference
  source = tmp_path / 'snapshot.pth'
  weights.write_state_dict(source, state_dict)
  workdir = tmp_path / 'workdir'
  layout.save_random_params(config, workdir)  # a trained run's params/final
  trained = (workdir / 'params' / 'final.json').read_text()
  for which in ('final', 'best'):  # training reads and writes these; refused even when absent
    with pytest.raises(ValueError, match=re.escape(
        f'--which {which}: {workdir / "params" / which} belongs to training; import into another '
        '--which (default: imported), or pass --overwrite')):
      exchange.import_to_workdir(tmp_path / 'absent.pth', config, workdir, which)  # before reading
  assert (workdir / 'params' / 'final.json').read_text() == trained
  assert not (workdir / 'params' / 'best').exists()

  exchange.import_to_workdir(source, config, workdir)
  with pytest.raises(FileExistsError, match=re.escape(
      f'{workdir / "params" / "imported"} already holds parameters; pass --overwrite')):
    exchange.import_to_workdir(tmp_path / 'absent.pth', config, workdir)
  exchange.import_to_workdir(source, config, workdir, overwrite=True)

  # Allowed, the parameters carry what training reads of them: the step of params/final (so a
  # later train command does not take the run as done) and the score of params/best (so any
  # validation score replaces parameters that this workdir never scored).
  for which in ('final', 'best'):
    exchange.import_to_workdir(source, config, workdir, which, overwrite=True)
  final, best = (workdir_lib.read_params_info(workdir, w) for w in ('final', 'best'))
  assert final['step'] is None and final['num_classes'] == layout.NUM_CLASSES
  assert best['step'] is None and best['value'] == -float('inf')
  assert_bit_exact(_params(factory.load_model(config, workdir, 'best')),
                   _params(exchange.import_reference(state_dict, config)))


# ----------------------------------------------------------------------------
# The reference state dict as a torch zip
# ----------------------------------------------------------------------------
def test_torch_zip_of_a_state_dict(exported, tmp_path):
  """Globals are the three torch.load(weights_only=True) allows; no stand-in module lingers."""
  config, workdir, _ = exported
  state_dict = jax.device_get(exchange.to_reference(factory.load_model(config, workdir)))
  path = tmp_path / 'model.pth'
  weights.write_state_dict(path, state_dict)
  with zipfile.ZipFile(path) as archive:
    names = {arg for op, arg, _ in pickletools.genops(archive.read('archive/data.pkl'))
             if op.name == 'GLOBAL'}
  assert names == TORCH_GLOBALS
  assert_bit_exact(dict(weights.read_torch_checkpoint(path)), state_dict)
  if importlib.util.find_spec('torch') is None:
    assert 'torch' not in sys.modules
  else:  # the device machines have torch
    import torch  # pylint: disable=import-outside-toplevel
    loaded = torch.load(path, weights_only=True)
    assert_bit_exact({k: v.numpy() for k, v in loaded.items()}, state_dict)
