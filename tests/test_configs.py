"""The paper's recipes in configs/: their settings, their arguments, and tiny end-to-end runs.

Every data-source type trains a few steps through `train.train_and_evaluate`, on layouts written
to tmp_path, with the config a recipe gives under `runlocal` shrunk further by `tiny`, so the
runs exercise the recipes' own data wiring. iFAM trains from Waterbirds and from the synthetic
source (and resumes); the other sources train the ERM baseline, whose step compiles in half the
time: what those cases vary is the source, not the model.
"""

import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
from absl import flags
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from ml_collections import config_flags

from ifam_jax import config_lib, factory, losses, optim, sharding, train
from test_data import make_cub, make_waterbirds, prepare_tiny_tfds, write_image

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / 'configs'

# name: (image size, global batch, epochs, augment, presence group, EMA decay, default K,
#        evals, val_split)
RECIPES = {
    'imagenet': (224, 1024, 120, 'imagenet', 128, 0.9999, 1, ['val'], ''),
    'in9': (224, 128, 30, 'cub_original', 16, 0.9999, 1,
            ['mixed_rand', 'mixed_same', 'original'], ''),
    'waterbirds': (518, 128, 90, 'cub_original', 16, 0.0, 1, ['test', 'val'], 'val'),
    'metashift': (224, 128, 90, 'cub_original', 32, 0.0, 1, ['test'], ''),
    'cub': (518, 128, 90, 'cub_original', 16, 0.0, 8, ['test'], ''),
    'siim_acr': (518, 128, 90, 'siim_acr', 16, 0.0, 8,
                 ['full_test', 'non_robust_test', 'robust_test'], ''),
}
PAPER_ARGS = 'root=/data,weights=/models/dinov2.safetensors'


def load_recipe(name: str):
  spec = importlib.util.spec_from_file_location(f'recipe_{name}', CONFIGS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg: str) -> ml_collections.ConfigDict:
  return load_recipe(name).get_config(arg)


# ----------------------------------------------------------------------------
# Settings and arguments
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_settings(name):
  size, batch, epochs, augment, group, ema, k, evals, val_split = RECIPES[name]
  assert f'python -m ifam_jax.main --config configs/{name}.py' in load_recipe(name).__doc__
  c = get_config(name, PAPER_ARGS)
  assert (c.model.image_size, c.global_batch_size, c.total_epochs, c.data.augment,
          c.loss.presence_group_size, c.optim.ema_decay, c.model.num_parts) == \
      (size, batch, epochs, augment, group, ema, k)
  assert c.optim.lr == pytest.approx(1e-6 * (batch / 16) ** 0.5)
  assert (c.optim.weight_decay, c.optim.normalized_weight_decay) == (0.05, True)
  assert c.optim.groups.to_dict() == optim.ifam_groups()  # paper factors, frozen backbone
  assert (c.model.kind, c.model.variant, c.model.init_weights) == \
      ('ifam', 'B/14', '/models/dinov2.safetensors')
  assert (sorted(c.data.evals), c.data.val_split) == (evals, val_split)
  assert c.data.train.root.startswith('/data') and c.data.train.source in factory.SOURCES
  assert get_config(name, PAPER_ARGS + ',num_parts=16').model.num_parts == 16


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_arguments(name):
  local = get_config(name, 'runlocal')
  assert (local.max_steps, local.model.dtype, local.model.init_weights) == (20, 'float32', '')
  assert not local.optim.groups['stage1_backbone']['frozen']  # random tiny ViT: trains
  erm = get_config(name, 'runlocal,baseline')
  assert erm.model.kind == 'baseline' and erm.optim.groups == local.optim.groups
  assert get_config(name, PAPER_ARGS + ',baseline').model.init_weights  # ERM from DINOv2 too
  with pytest.raises(ValueError, match="unknown config argument 'epochs'"):
    get_config(name, 'runlocal,epochs=3')
  with pytest.raises(ValueError, match='this recipe needs weights=<local DINOv2 file'):
    get_config(name, 'root=/data')
  with pytest.raises(ValueError, match='this recipe needs root=<dataset folder>, weights='):
    get_config(name, '')
  with pytest.raises(ValueError, match='weights= cannot be used with runlocal, which trains a '
                     'random tiny ViT'):
    get_config(name, 'runlocal,weights=x.safetensors')
  doc = ' '.join(load_recipe(name).__doc__.split())
  assert 'a smoke test of the code path, not a model that learns' in doc and '`tiny`' in doc
  with pytest.raises(ValueError, match=r'(?s)unknown config argument.*runlocal +a smoke test of '
                     'the code path'):  # the arguments' help
    get_config(name, 'runlocal,epochs=3')


# The demo's model and optimisation (configs/demo.py before `tiny_from_scratch` held them).
TINY = {'model.variant': 'S/8', 'model.image_size': 64, 'model.dtype': 'float32',
        'model.init_weights': '', 'global_batch_size': 64, 'total_epochs': 8, 'optim.lr': 5e-4,
        'optim.warmup_epochs': 1.0, 'optim.lr_schedule_unit': 'step',
        'loss.presence_group_size': 0}


def setting(c: ml_collections.ConfigDict, key: str):
  for part in key.split('.'):
    c = c[part]
  return c


@pytest.mark.parametrize('name', sorted(RECIPES) + ['demo'])
def test_tiny_trains_the_demos_vit_from_scratch_on_the_recipes_data(name):
  c = get_config(name, '' if name == 'demo' else 'tiny,root=/data')
  assert {key: setting(c, key) for key in TINY} == TINY
  assert c.model.vit_overrides.to_dict() == dict(width=64, depth=3, num_heads=4, mlp_hidden=128)
  assert {(g.lr_factor, g.frozen) for g in c.optim.groups.values()} == {(1.0, False)}
  if name == 'demo':
    return
  paper = get_config(name, PAPER_ARGS)
  assert c.data.to_dict() == paper.data.to_dict()  # the recipe's data set and augmentation
  assert c.model.num_parts == paper.model.num_parts
  assert get_config(name, 'tiny,root=/data,num_parts=4').model.num_parts == 4
  with pytest.raises(ValueError, match='weights= cannot be used with tiny, which trains a small '
                     'ViT from scratch'):
    get_config(name, 'tiny,root=/data,weights=x.safetensors')
  with pytest.raises(ValueError, match='tiny and runlocal cannot be combined'):
    get_config(name, 'tiny,runlocal,root=/data')
  with pytest.raises(ValueError, match=r'this recipe needs root=<dataset folder>\n'):
    get_config(name, 'tiny')


def vit_settings(c: ml_collections.ConfigDict) -> dict[str, tuple[float, bool, bool]]:
  """(peak learning rate, decayed, frozen) of each parameter of the ViT that classifies (iFAM's
  stage 2, the baseline's one ViT), by its name inside that ViT: what its optimizer does to it."""
  state = nnx.state(factory.abstract_model(c.model, 2), nnx.Param)
  named = jax.tree.leaves(sharding.map_named(lambda name, x: (name, len(x.shape)), state),
                          is_leaf=lambda x: isinstance(x, tuple))
  settings = {}
  for (name, ndim), label in zip(named, jax.tree.leaves(
      optim.label_params(state, c.optim.group_rules))):
    if c.model.kind == 'ifam' and not name.startswith('stage2/'):
      continue
    group = c.optim.groups[label]
    settings[name.removeprefix('stage2/')] = (c.optim.lr * group.lr_factor,
                                              group.weight_decay and ndim >= 2, group.frozen)
  return settings


def from_command_line(config: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """The config `--config <config> --config.<key>=<value> ...` gives (ml_collections' parser)."""
  values = flags.FlagValues()
  argv = ['main', f'--config={config}', *(f'--config.{k}={v}' for k, v in overrides.items())]
  config_flags.DEFINE_config_file('config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# The from-scratch recipes: the demo, and every paper recipe's `tiny`.
FROM_SCRATCH = [('demo', ''), *((name, 'tiny,root=/data') for name in sorted(RECIPES))]


@pytest.mark.parametrize('name, arg', FROM_SCRATCH)
def test_from_scratch_baseline_trains_its_head_as_ifam_does(name, arg):
  """Nothing is pretrained, so no parameter is "new": iFAM's stage 2 and the ERM ViT train every
  parameter, head included, at the recipe's one learning rate."""
  ifam = get_config(name, arg)
  erm = get_config(name, ','.join(filter(None, (arg, 'baseline'))))
  lrs = lambda c: {name: lr for name, (lr, _, frozen) in vit_settings(c).items() if not frozen}
  assert lrs(erm) == lrs(ifam) == dict.fromkeys(vit_settings(erm), ifam.optim.lr)
  assert ifam.model.init_weights == erm.model.init_weights == ''


def test_siim_acr_recipe():
  """Reference 6.6 and 6.7: no enforced-presence loss, RAD-DINO and its normalisation, the tube
  splits."""
  c = get_config('siim_acr', PAPER_ARGS)
  want = dict(losses.DEFAULT_WEIGHTS, enforced_presence=0.0)
  assert c.loss.weights.to_dict() == want
  assert (c.model.pixel_mean, c.model.pixel_std) == ((0.48865,) * 3, (0.24621,) * 3)
  assert (c.model.variant, c.model.num_registers, c.model.pos_embed_layout,
          c.model.pos_embed_size) == ('B/14', 0, 'hf', 518)
  assert {name: dict(spec) for name, spec in c.data.evals.items()} == {
      name: dict(source='siim_acr', root='/data', split=name)
      for name in ('full_test', 'robust_test', 'non_robust_test')}
  assert dict(c.data.train) == dict(source='siim_acr', root='/data', split='train')
  assert c.compare.split == 'full_test'
  factory.check_data_specs(c)
  assert config_lib.restore_config(json.loads(c.to_json())).model.pixel_mean == c.model.pixel_mean
  erm = get_config('siim_acr', PAPER_ARGS + ',baseline')
  assert erm.model.pixel_mean == c.model.pixel_mean and erm.loss.weights == c.loss.weights


def test_one_override_list_trains_ifam_and_erm():
  """The iFAM group names hold under `baseline` too: an override list for iFAM (stage-1 groups
  included) applies to the ERM run unchanged, and sets the ERM ViT's head and backbone as it sets
  iFAM's stage 2 (whose tokens have a group of their own; the ERM ViT's train with its backbone,
  as in the reference)."""
  overrides = {'optim.groups.head.lr_factor': '3.0',
               'optim.groups.stage2_backbone.lr_factor': '0.5',
               'optim.groups.stage1_backbone.lr_factor': '2.0',
               'optim.groups.modulation.lr_factor': '7.0', 'optim.lr': '1e-4'}
  recipe = f'{CONFIGS / "waterbirds.py"}:runlocal'
  ifam = from_command_line(recipe, overrides)
  erm = from_command_line(recipe + ',baseline', overrides)
  lr = lambda c: {name: rate for name, (rate, _, _) in vit_settings(c).items()}
  expected = {name: 1e-4 * (3.0 if name.startswith(('head/', 'fc_norm/')) else 0.5)
              for name in lr(erm)}
  assert lr(erm) == expected
  tokens = ('backbone/cls_token', 'backbone/reg_token', 'backbone/pos_embed')
  assert lr(ifam) == {**expected, **dict.fromkeys(tokens, 1e-4)}  # in 'stage2_tokens' there


BASELINES = [(name, arg) for name in sorted(RECIPES) for arg in (PAPER_ARGS, 'runlocal')]


@pytest.mark.parametrize('name, arg', BASELINES + [('demo', '')])
def test_baseline_learning_rates_per_parameter(name, arg):
  """The reference's baseline matcher: head and fc_norm at the scratch factor (1e4 in the paper
  recipes, 1 in the demo), every other parameter, tokens included, at the base rate; matrices
  and tokens decay, vectors do not; nothing frozen."""
  c = get_config(name, ','.join(filter(None, (arg, 'baseline'))))
  scratch = 1.0 if name == 'demo' else 1e4
  base = 5e-4 if name == 'demo' else 1e-6 * (c.global_batch_size / 16) ** 0.5
  if arg == 'runlocal':
    base = 1e-6 * ({'imagenet': 1024}.get(name, 128) / 16) ** 0.5  # the paper's, at batch 8
  settings = vit_settings(c)
  assert settings == {
      name: (base * (scratch if name.startswith(('head/', 'fc_norm/')) else 1.0),
             not name.endswith(('bias', 'scale', 'gamma')), False) for name in settings}
  assert {'backbone/cls_token', 'backbone/pos_embed', 'head/kernel'} <= settings.keys()


# ----------------------------------------------------------------------------
# The demo on a folder of one's own
# ----------------------------------------------------------------------------
def test_demo_root_with_waterbirds_metadata(tmp_path):
  (tmp_path / 'metadata.csv').write_text('img_id,img_filename,y,split,place\n')
  c = get_config('demo', f'root={tmp_path}')
  assert c.data.train.to_dict() == dict(source='waterbirds', root=str(tmp_path), split='train')
  assert {k: v.to_dict() for k, v in c.data.evals.items()} == {
      split: dict(source='waterbirds', root=str(tmp_path), split=split)
      for split in ('val', 'test')}
  assert (c.data.val_split, c.data.best_metric, c.compare.split) == \
      ('val', 'worst_group_accuracy', 'test')
  assert c.compare.methods == ('ifam', 'erm') and c.model.image_size == 64
  erm = get_config('demo', f'root={tmp_path},baseline')
  assert erm.model.kind == 'baseline' and erm.data.to_dict() == c.data.to_dict()
  compare = get_config('demo', f'root={tmp_path},compare').compare.methods
  assert 'dfr' in compare and not {'early_mask_gt', 'late_mask_gt'} & set(compare)  # no masks


@pytest.mark.parametrize('test_split', [True, False])
def test_demo_root_with_image_folders(tmp_path, test_split, monkeypatch):
  for split in ('train', 'val') + (('test',) if test_split else ()):
    (tmp_path / 'data' / split / 'cat').mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  c = get_config('demo', 'root=data')  # relative to the working directory, recorded absolute
  root = tmp_path / 'data'
  assert c.data.train.to_dict() == dict(source='folder', root=str(root / 'train'))
  evals = ['val', 'test'] if test_split else ['val']
  assert {k: v.to_dict() for k, v in c.data.evals.items()} == {
      split: dict(source='folder', root=str(root / split)) for split in evals}
  assert (c.data.val_split, c.data.best_metric, c.compare.split) == \
      ('val', 'accuracy', evals[-1])


def test_demo_root_without_either_layout(tmp_path):
  (tmp_path / 'train').mkdir()
  with pytest.raises(ValueError, match=f'root={tmp_path} holds neither metadata.csv .* nor '
                     'train/ and val/ folders'):
    get_config('demo', f'root={tmp_path}')
  with pytest.raises(ValueError, match=f'root={tmp_path / "gone"} does not exist'):
    get_config('demo', f'root={tmp_path / "gone"}')


# ----------------------------------------------------------------------------
# Command-line overrides
# ----------------------------------------------------------------------------
DEMO = str(CONFIGS / 'demo.py')


def test_an_override_of_a_missing_key_says_what_there_is_and_what_to_do():
  message = config_lib.unknown_override(
      ['main', '--config', DEMO, '--config.data.train.source=waterbirds',
       '--config.data.train.root=/x', '--workdir=/w'])
  synthetic = sorted(get_config('demo', '').data.train)
  assert message.startswith(f"--config.data.train.root: data.train has no key 'root'; it has "
                            f'{", ".join(synthetic)}. A data spec takes its source')
  assert 'configs/demo.py:root=<folder>' in message
  message = config_lib.unknown_override(['main', f'--config={DEMO}:baseline',
                                         '--config.optim.lrr=1', '--config.optim.lr=1'])
  assert message.startswith("--config.optim.lrr: optim has no key 'lrr' (did you mean 'lr'?)")
  assert 'data spec' not in message
  assert config_lib.unknown_override(['main', f'--config={DEMO}', '--config.optim.lr=1']) is None
  assert config_lib.unknown_override(['main', '--config.optim.lrr=1']) is None  # no config


@pytest.mark.slow
def test_the_entry_point_explains_an_override_of_a_missing_key(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ifam_jax.main', '--config', 'configs/demo.py',
       '--config.data.train.source=waterbirds', '--config.data.train.root=/x',
       f'--workdir={tmp_path / "w"}'], cwd=CONFIGS.parent, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert "FATAL Flags parsing error: --config.data.train.root: data.train has no key 'root'" \
      in result.stderr
  assert not (tmp_path / 'w').exists()


def test_gpu_compiler_options_apply_on_gpus_only(monkeypatch):
  """The recipes' XLA options reach the jitted steps on GPUs; other backends get none (an
  option XLA does not know fails the compile, so a typo cannot pass silently)."""
  config = get_config('imagenet', PAPER_ARGS)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert factory.compiler_options(config) == {}
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  options = factory.compiler_options(config)
  assert options['xla_gpu_triton_gemm_any'] is True
  assert options['xla_gpu_dot_merger_threshold_mb'] == 0
  assert {'CONDITIONAL', 'WHILE'} <= set(options['xla_gpu_enable_command_buffer'].split(','))
  for name in ('cub', 'waterbirds'):  # 518 px: XLA's own dot merging is faster there
    assert get_config(name, PAPER_ARGS).gpu_compiler_options.xla_gpu_dot_merger_threshold_mb == 32
  config.gpu_compiler_options = {'xla_gpu_no_such_option': True}
  with pytest.raises(Exception, match='xla_gpu_no_such_option'):
    jax.jit(lambda x: x + 1, compiler_options=factory.compiler_options(config))(1.0)


def test_imagenet_data_choices():
  tfds = get_config('imagenet', 'data=tfds,tfds_dir=/tfds,weights=/w')  # needs no root
  assert dict(tfds.data.train) == dict(source='tfds', name='imagenet2012', data_dir='/tfds',
                                       split='train')
  assert tfds.data.evals.val.split == 'validation'
  assert get_config('imagenet', 'data=tfds,weights=/w').data.train.data_dir is None
  folder = get_config('imagenet', PAPER_ARGS)
  assert (folder.data.train.root, folder.data.evals.val.root) == ('/data/train', '/data/val')
  with pytest.raises(ValueError, match="data must be 'folder' or 'tfds'"):
    get_config('imagenet', PAPER_ARGS + ',data=csv')


def test_cub_waterbird200_eval():
  c = get_config('cub', PAPER_ARGS + ',waterbird200_root=waterbird_complete95_forest2water2')
  assert dict(c.data.evals.waterbird200) == dict(
      source='cub', root='/data', split='test', image_subdir='waterbird_complete95_forest2water2')


def test_cub_segmentations_arg():
  assert 'segmentation_dir' not in get_config('cub', PAPER_ARGS).data.evals.test
  c = get_config('cub', PAPER_ARGS + ',segmentations=segmentations,waterbird200_root=wb')
  assert dict(c.data.evals.test) == dict(source='cub', root='/data', split='test',
                                         segmentation_dir='segmentations')
  assert dict(c.data.evals.waterbird200) == dict(c.data.evals.test, image_subdir='wb')
  assert 'segmentation_dir' not in c.data.train


def test_paper_recipes_keep_their_executables_in_the_compilation_cache():
  """The paper recipes point JAX's persistent cache at ~/.cache/ifam_jax/xla; the base config
  leaves JAX's own setting alone."""
  before = jax.config.jax_compilation_cache_dir
  try:
    factory.use_compilation_cache(config_lib.base_config())
    assert jax.config.jax_compilation_cache_dir == before
    for name in RECIPES:
      c = get_config(name, PAPER_ARGS)
      factory.use_compilation_cache(c)
      assert jax.config.jax_compilation_cache_dir == os.path.expanduser('~/.cache/ifam_jax/xla')
      jax.config.update('jax_compilation_cache_dir', before)
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


# ----------------------------------------------------------------------------
# End to end, from every source type
# ----------------------------------------------------------------------------
@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  """XLA compilation dominates these runs: a resumed run reuses its first run's executables."""
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  before = {name: getattr(jax.config, name) for name in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp('xla_cache')))
  jax.config.update(names[1], 0.0)
  compilation_cache.reset_cache()  # the cache settles its state at the first compilation
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A few steps of a one-block ViT at batch 2 on 56 px images.

  56 px gives a 4x4 patch grid, the smallest the presence losses (3x3 pooling, then a border
  map of at least 2x2) accept. Evaluation runs once, at the end.
  """
  c.global_batch_size = 2
  c.total_epochs = 100  # max_steps ends the run, not the data
  c.max_steps = 3
  c.model.image_size = 56
  c.model.vit_overrides = dict(width=16, depth=1, num_heads=2, mlp_hidden=32)
  c.data.num_workers = 0
  c.data.eval_batch_size = 4
  c.eval_every_epochs = 100.0
  c.checkpoint_every_steps = 2
  c.log_every_steps = 1
  return c


def write_images(root: pathlib.Path, names: list[str]) -> None:
  for i, name in enumerate(names):
    write_image(root / name, value=60 * i % 256)


def folder_case(tmp_path):
  root = tmp_path / 'imagenet'
  write_images(root, [f'{split}/{wnid}/{i}.JPEG' for split, n in (('train', 2), ('val', 1))
                      for wnid in ('n01440764', 'n01443537') for i in range(n)])
  return get_config('imagenet', f'runlocal,baseline,root={root}')


def tfds_case(tmp_path):
  data_dir = prepare_tiny_tfds(tmp_path)
  c = get_config('imagenet', f'runlocal,baseline,data=tfds,tfds_dir={data_dir}')
  for spec in (c.data.train, c.data.evals.val):
    spec.name, spec.group_key = 'ifam_tiny_test', 'place'
  c.data.evals.val.split = 'train[:40%]'
  return c


WATERBIRDS_CSV = """img_id,img_filename,y,split,place
1,001.A/a.jpg,0,0,0
2,001.A/b.jpg,0,0,1
3,002.B/c.jpg,1,0,1
4,002.B/d.jpg,1,0,0
5,001.A/e.jpg,0,1,0
6,002.B/c.jpg,1,1,1
7,001.A/b.jpg,0,2,1
8,002.B/d.jpg,1,2,0
"""


def waterbirds_case(tmp_path):
  root = tmp_path / 'waterbird_complete95_forest2water2'
  make_waterbirds(root, WATERBIRDS_CSV)
  return get_config('waterbirds', f'runlocal,root={root}')


def metashift_case(tmp_path):
  root = tmp_path / 'MetaDatasetCatDog'
  write_images(root, ['train/cat/cat(sofa)/0.jpg', 'train/cat/cat(bed)/1.jpg',
                      'train/dog/dog(bench)/2.jpg', 'train/dog/dog(bed)/3.jpg',
                      'test/cat/cat(shelf)/4.jpg', 'test/dog/dog(shelf)/5.jpg'])
  return get_config('metashift', f'runlocal,baseline,root={root}')


def in9_case(tmp_path):
  root = tmp_path / 'bg_challenge'
  write_images(root, [f'original/train/{c}/{i}.JPEG' for c in ('00_dog', '08_fish')
                      for i in range(2)])
  write_images(root, [f'{v}/val/{c}/0.JPEG' for v in ('original', 'mixed_same', 'mixed_rand')
                      for c in ('00_dog', '08_fish')])
  return get_config('in9', f'runlocal,baseline,root={root}')


def cub_case(tmp_path):
  root = tmp_path / 'CUB_200_2011'
  make_cub(root)
  return get_config('cub', f'runlocal,baseline,root={root},'
                    'waterbird200_root=waterbird_complete95_forest2water2')


CASES = {'folder': folder_case, 'tfds': tfds_case, 'waterbirds': waterbirds_case,
         'metashift': metashift_case, 'in9': in9_case, 'cub': cub_case}
GROUPED = {'tfds', 'waterbirds', 'metashift', 'synthetic'}


def check_run(c: ml_collections.ConfigDict, workdir: pathlib.Path, result: dict,
              steps: int) -> None:
  """The run's summary, metrics.jsonl, checkpoints and saved parameters after `steps` steps."""
  assert result['step'] == steps and sorted(result['evals']) == sorted(c.data.evals)
  wanted = {'accuracy'} | ({'worst_group_accuracy'} if c.data.train.source in GROUPED else set())
  for metrics in result['evals'].values():
    assert wanted <= metrics.keys()
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = [line for line in lines if line['split'] == 'train']
  assert [line['step'] for line in logged] == list(range(1, steps + 1))  # continued, once
  terms = ({'cls2'} if c.model.kind == 'baseline' else
           {k for k, weight in c.loss.weights.items() if weight})
  assert all(terms | {'loss', 'lr'} <= line.keys() for line in logged)
  assert str(steps) in [p.name for p in (workdir / 'checkpoints').iterdir()]
  assert (workdir / 'params' / 'final').is_dir()
  assert (workdir / 'params' / 'best').is_dir() == bool(c.data.val_split)


@pytest.mark.slow
@pytest.mark.usefixtures('xla_cache')
@pytest.mark.parametrize('source', sorted(CASES))
def test_trains_end_to_end(source, tmp_path):
  c = tiny(CASES[source](tmp_path))
  assert c.data.train.source == source
  workdir = tmp_path / 'workdir'
  check_run(c, workdir, train.train_and_evaluate(c, str(workdir)), 3)


def synthetic_config() -> ml_collections.ConfigDict:
  """The Waterbirds recipe on 4 synthetic training images.

  Two steps an epoch with two classes, as in the Waterbirds case: both compile the same steps.
  """
  c = get_config('waterbirds', 'runlocal')
  synthetic = dict(source='synthetic', image_size=56, num_examples=4)
  c.data.train = dict(synthetic, split='train')
  c.data.evals = dict(val=dict(synthetic, split='val'), test=dict(synthetic, split='test'))
  return c


@pytest.mark.slow
@pytest.mark.usefixtures('xla_cache')
def test_synthetic_trains_and_resumes(tmp_path, caplog):
  c = tiny(synthetic_config())
  workdir = tmp_path / 'workdir'
  check_run(c, workdir, train.train_and_evaluate(c, str(workdir)), 3)
  c.max_steps = 5
  with caplog.at_level(logging.INFO, logger='absl'):
    check_run(c, workdir, train.train_and_evaluate(c, str(workdir)), 5)
  assert 'resumed from step 3' in caplog.messages  # not a restart (metrics.jsonl reads the same)
