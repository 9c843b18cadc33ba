"""Class and group names from the config: a Waterbirds-layout source named by data.classes and
data.attribute_names, the same in every place that builds sources; the class names a run
saves with its parameters, for evaluating without its training folder."""

import json

import pytest
from etils import epath

from ifam_jax import compare, evaluate, factory, train
from ifam_jax import workdir as workdir_lib
from ifam_jax.data import sources
from test_configs import (WATERBIRDS_CSV, get_config, make_waterbirds, tiny, write_images,
                          xla_cache)  # pylint: disable=unused-import  # xla_cache: a fixture

NAMED_GROUPS = ['cat/indoor', 'cat/outdoor', 'dog/indoor', 'dog/outdoor']


def named_waterbirds_config(tmp_path, arg='runlocal'):
  root = tmp_path / 'pets'
  make_waterbirds(root, WATERBIRDS_CSV)
  c = get_config('waterbirds', f'{arg},root={root}')
  c.data.classes, c.data.attribute_names = ('cat', 'dog'), ('indoor', 'outdoor')
  return c


# ----------------------------------------------------------------------------
# The source
# ----------------------------------------------------------------------------
def test_a_waterbirds_layout_named_by_its_own_classes_and_places(tmp_path):
  make_waterbirds(tmp_path, WATERBIRDS_CSV)
  default = sources.WaterbirdsSource(tmp_path, 'train')
  named = sources.WaterbirdsSource(tmp_path, 'train', classes=['cat', 'dog'],
                                   attribute_names=['indoor', 'outdoor'])
  assert named.class_names == ['cat', 'dog'] and named.group_names == NAMED_GROUPS
  assert default.group_names == ['landbird/land', 'landbird/water', 'waterbird/land',
                                 'waterbird/water']
  # The same records: names change, labels and groups do not (CSV rows 1-4: y, place).
  records = [(named[i]['label'], named[i]['group']) for i in range(len(named))]
  assert records == [(default[i]['label'], default[i]['group']) for i in range(len(default))]
  assert records == [(0, 0), (0, 1), (1, 3), (1, 2)]
  assert repr(default) == f"WaterbirdsSource(root='{tmp_path}', split='train')"  # as before
  assert "attribute_names=['indoor', 'outdoor']" in repr(named)


@pytest.mark.parametrize('kwargs, message', [
    (dict(classes=['cat', 'dog', 'bird']), r"data.classes must name its 2 classes \(y = 0, 1 "
     r"in .*metadata.csv\), got \['cat', 'dog', 'bird'\]"),
    (dict(attribute_names=['indoor']), r"data.attribute_names must name its 2 places "
     r"\(place = 0, 1 in .*metadata.csv\), got \['indoor'\]"),
    (dict(attribute_names=['in/door', 'out']), r"data.attribute_names: 'in/door' holds a '/'"),
])
def test_names_that_do_not_fit_the_layout_are_refused(tmp_path, kwargs, message):
  make_waterbirds(tmp_path, WATERBIRDS_CSV)
  with pytest.raises(ValueError, match=message):
    sources.WaterbirdsSource(tmp_path, 'train', **kwargs)


# ----------------------------------------------------------------------------
# Every builder of sources passes the names
# ----------------------------------------------------------------------------
def test_train_and_eval_sources_carry_the_same_names(tmp_path):
  c = named_waterbirds_config(tmp_path)
  built = {'train': factory.make_train_source(c), **factory.make_eval_sources(c)}
  splits = compare._Splits(c)  # pylint: disable=protected-access
  built.update({f'compare {k}': v for k, v in {'train': splits.train, **splits.evals}.items()})
  built['eval spec'] = factory.make_eval_source(c, c.data.evals.val)
  assert len(built) == 7
  for name, source in built.items():
    assert source.class_names == ['cat', 'dog'] and source.group_names == NAMED_GROUPS, name
  assert compare.train_group_counts(c) == {'cat/indoor': 1, 'cat/outdoor': 1, 'dog/indoor': 1,
                                           'dog/outdoor': 1}


def test_attribute_names_for_a_source_without_places_are_refused(tmp_path):
  write_images(tmp_path, ['train/a/0.jpg', 'train/b/1.jpg'])
  c = get_config('imagenet', f'runlocal,root={tmp_path}')
  c.data.attribute_names = ('indoor', 'outdoor')
  with pytest.raises(ValueError, match="data.attribute_names names the places of a "
                     "'waterbirds' source; data.train is a 'folder' source"):
    factory.make_train_source(c)


# ----------------------------------------------------------------------------
# The class names saved with the parameters
# ----------------------------------------------------------------------------
def test_saved_class_names_label_the_evals_once_the_training_folder_is_gone(tmp_path):
  write_images(tmp_path / 'data', ['train/a/0.jpg', 'train/b/1.jpg', 'train/c/2.jpg',
                                   'val/c/3.jpg', 'val/a/4.jpg'])
  c = get_config('imagenet', f'runlocal,root={tmp_path / "data"}')
  workdir = epath.Path(tmp_path / 'run')
  (workdir / 'params').mkdir(parents=True)
  (workdir / 'params' / 'final.json').write_text(json.dumps(
      {'num_classes': 3, 'class_names': ['a', 'b', 'c']}))
  (tmp_path / 'data' / 'train').rename(tmp_path / 'gone')
  with pytest.raises(FileNotFoundError, match='set data.classes'):
    factory.make_eval_sources(c)
  factory.use_saved_classes(c, workdir, 'final')
  assert c.data.classes == ('a', 'b', 'c')
  val = factory.make_eval_sources(c)['val']
  assert [val[i]['label'] for i in range(len(val))] == [0, 2]  # a, c by the training order
  # Without saved names (parameters saved before they were recorded) the error stands.
  c.data.classes = ()
  (workdir / 'params' / 'final.json').write_text(json.dumps({'num_classes': 3}))
  with pytest.raises(FileNotFoundError, match='set data.classes'):
    factory.use_saved_classes(c, workdir, 'final')


def test_a_config_that_names_its_classes_or_has_its_folder_is_left_as_it_is(tmp_path):
  write_images(tmp_path / 'data', ['train/a/0.jpg', 'train/b/1.jpg', 'val/a/4.jpg'])
  c = get_config('imagenet', f'runlocal,root={tmp_path / "data"}')
  workdir = epath.Path(tmp_path / 'run')
  (workdir / 'params').mkdir(parents=True)
  (workdir / 'params' / 'final.json').write_text(json.dumps(
      {'num_classes': 2, 'class_names': ['x', 'y']}))
  factory.use_saved_classes(c, workdir, 'final')
  assert c.data.classes == ()
  c.data.classes = ('b', 'a')
  factory.use_saved_classes(c, workdir, 'final')
  assert c.data.classes == ('b', 'a')


# ----------------------------------------------------------------------------
# End to end: trained and evaluated under the configured names
# ----------------------------------------------------------------------------
@pytest.mark.slow
def test_named_groups_from_training_to_the_evaluation_of_its_saved_config(tmp_path, xla_cache):
  c = tiny(named_waterbirds_config(tmp_path, 'runlocal,baseline'))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir_lib.record_config(epath.Path(workdir), c, {})  # as the entry point does
  train.train_and_evaluate(c, workdir)
  logged = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  [val] = [m for m in logged if m['split'] == 'val']
  assert set(val['group_accuracy']) == {'cat/indoor', 'dog/outdoor'}  # CSV rows 5, 6
  saved = workdir_lib.read_config(epath.Path(workdir))
  assert saved.data.attribute_names == ('indoor', 'outdoor')
  evaluate.run_eval(saved, workdir)
  report = json.loads((workdir / 'eval' / 'final' / 'eval.json').read_text())
  assert set(report['evals']['test']['group_accuracy']) == {'cat/outdoor', 'dog/indoor'}
  assert report['evals']['val']['group_accuracy'] == val['group_accuracy']
