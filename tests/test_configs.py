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
import pathlib

import jax
import ml_collections
import pytest
from jax.experimental.compilation_cache import compilation_cache

from ifam_jax import factory, optim, train
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
  assert erm.model.kind == 'baseline' and set(erm.optim.groups) == {'backbone', 'head'}
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


def test_baseline_trains_like_stage2():
  """The ERM row's ViT and head get iFAM stage 2's learning-rate factors and freezing."""
  paper = get_config('waterbirds', PAPER_ARGS + ',baseline').optim.groups
  assert (paper.head.lr_factor, paper.backbone.lr_factor, paper.backbone.frozen) == \
      (1e4, 1.0, False)
  ifam_groups = get_config('demo', 'ifam_only').optim.groups
  erm = get_config('demo', 'baseline').optim.groups  # also what the demo's comparison trains
  assert (erm.head.lr_factor, erm.backbone.lr_factor) == \
      (ifam_groups.head.lr_factor, ifam_groups.stage2_backbone.lr_factor) == (1.0, 1.0)


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
