"""The config a run records in <workdir>/config.json, read back as the ConfigDict it was.

The evaluation modes run without --config from it, so it must come back with the recipe's
types (tuples, lists of tuples, nested dicts, ints vs floats), for every recipe and for the
configs of a comparison's sub-runs.
"""

import json

import ml_collections
import pytest
from absl import flags
from etils import epath
from ml_collections import config_flags

from fixtures import tiny_config
from ifam_jax import compare, config_lib, presets
from ifam_jax import workdir as workdir_lib
from test_configs import CONFIGS, PAPER_ARGS, get_config, load_recipe

RECIPE_CASES = [('demo', ''), ('demo', 'baseline'), ('demo', 'compare,seeds=2'),
                ('waterbirds', PAPER_ARGS), ('waterbirds', 'runlocal,baseline'),
                ('imagenet', PAPER_ARGS), ('in9', PAPER_ARGS), ('metashift', PAPER_ARGS),
                ('cub', PAPER_ARGS + ',num_parts=4')]


def assert_same(restored, original, path='config'):
  """Equal values of identical types, all the way down (1 == 1.0 == True and [] == () do not
  count as the same)."""
  assert type(restored) is type(original), (path, type(restored), type(original))
  if isinstance(original, (dict, ml_collections.ConfigDict)):
    assert list(restored.keys()) == list(original.keys()), path
    for key in original.keys():
      assert_same(restored[key], original[key], f'{path}.{key}')
  elif isinstance(original, (list, tuple)):
    assert len(restored) == len(original), path
    for i, (a, b) in enumerate(zip(restored, original)):
      assert_same(a, b, f'{path}[{i}]')
  else:
    assert restored == original, path


def round_trip(config, tmp_path):
  """Written and read back; written again, it is the same file (keys in the same order)."""
  workdir = epath.Path(tmp_path)
  workdir.mkdir(parents=True, exist_ok=True)
  workdir_lib.record_config(workdir, config, {})
  restored = workdir_lib.read_config(workdir)
  assert workdir_lib.config_as_json(restored) == (workdir / 'config.json').read_text()
  return restored


@pytest.mark.parametrize('name, arg', RECIPE_CASES)
def test_every_recipe_comes_back_as_it_was(name, arg, tmp_path):
  original = get_config(name, arg)
  assert_same(round_trip(original, tmp_path), original)


def test_the_tiny_test_config_and_every_comparison_sub_run_come_back(tmp_path):
  assert_same(round_trip(tiny_config.get_config(), tmp_path), tiny_config.get_config())
  demo = get_config('demo', 'compare')
  for name in presets.PRESETS:
    # What run_method records as <workdir>/<name>/seed_1/config.json.
    original = compare.preset_config(demo, name, seed=1)
    assert_same(round_trip(original, tmp_path / name), original)
  erm = round_trip(compare.preset_config(demo, 'erm', seed=1), tmp_path / 'erm_again')
  assert erm.optim.group_rules == [tuple(r) for r in erm.optim.group_rules]  # list of tuples
  assert erm.optim.group_rules[0] == ('(head|fc_norm)/.*', 'head')


def test_keys_added_since_a_run_take_their_defaults(tmp_path):
  """A config.json written before a setting existed: the setting held its default then."""
  config = get_config('demo', '')
  tree = json.loads(workdir_lib.config_as_json(config))
  del tree['data']['classes'], tree['model']['stage2_token_tiers']
  (tmp_path / 'config.json').write_text(json.dumps(tree))
  restored = workdir_lib.read_config(epath.Path(tmp_path))
  assert_same(restored, config)
  # Resuming that run with today's config changes nothing.
  (tmp_path / 'checkpoints').mkdir()
  assert workdir_lib.check_config_change(epath.Path(tmp_path), config) == {}
  config.data.classes = ('a', 'b')
  with pytest.raises(ValueError, match=r"data.classes: \[\] -> \['a', 'b'\]"):
    workdir_lib.check_config_change(epath.Path(tmp_path), config)


def test_a_missing_or_broken_config_json_is_named(tmp_path):
  workdir = epath.Path(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'config.json')):
    workdir_lib.read_config(workdir)
  (tmp_path / 'config.json').write_text('{"seed": ')
  with pytest.raises(ValueError, match=f'{tmp_path / "config.json"} is not valid JSON'):
    workdir_lib.read_config(workdir)


def test_the_from_workdir_recipe_takes_command_line_overrides(tmp_path):
  original = get_config('demo', 'baseline')
  workdir_lib.record_config(epath.Path(tmp_path), original, {})
  assert_same(load_recipe('from_workdir').get_config(str(tmp_path)), original)
  with pytest.raises(ValueError, match='configs/from_workdir.py:<workdir>'):
    load_recipe('from_workdir').get_config('')

  argv = ['prog', f'--config={CONFIGS / "from_workdir.py"}:{tmp_path}',
          "--config.eval.splits=('test',)", '--config.data.eval_batch_size=16']
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'test', flag_values=flag_values,
                                           lock_config=True, sys_argv=argv)
  flag_values(argv)
  assert holder.value.eval.splits == ('test',) and holder.value.data.eval_batch_size == 16
  holder.value.eval.splits, holder.value.data.eval_batch_size = (), 256
  assert_same(holder.value, original)


def test_restore_follows_base_config_types_for_unknown_keys_too():
  """Lists become tuples where base_config holds tuples or nothing, lists where it holds lists;
  dicts become ConfigDicts; scalars keep their JSON types."""
  restored = config_lib.restore_config({
      'mesh': [['data', -1], ['fsdp', 2]], 'optim': {'group_rules': [['.*', 'head']]},
      'data': {'evals': {'x': {'size': [1, 2.5], 'nested': {'n': [[1]]}}}}})
  assert restored.mesh == (('data', -1), ('fsdp', 2))
  assert restored.optim.group_rules == [('.*', 'head')]
  assert isinstance(restored.data.evals.x.nested, ml_collections.ConfigDict)
  assert restored.data.evals.x.size == (1, 2.5) and restored.data.evals.x.nested.n == ((1,),)
  assert restored.total_epochs == config_lib.base_config().total_epochs  # absent: the default
  # A recipe's data spec and a dict it replaced hold only what the recipe wrote.
  restored = config_lib.restore_config({'data': {'train': {'source': 'folder', 'root': '/x'}},
                                        'optim': {'groups': {'backbone': {'lr_factor': 1.0}}}})
  assert restored.data.train.to_dict() == {'source': 'folder', 'root': '/x'}
  assert list(restored.optim.groups) == ['backbone']
  assert restored.optim.groups.backbone.to_dict() == {'lr_factor': 1.0}
