"""The demo's comparison on the tiny config: both models train, the table and picture appear."""

from etils import epath

from fixtures.tiny_config import get_config
from ifam_jax import demo


def test_both_models_train_and_the_table_reports_their_test_metrics(tmp_path, capsys):
  config = get_config('steps=2')
  config.compare_with_baseline, config.demo_test_split = True, 'test'
  config.model.stage2_token_tiers = ()  # the plain step: one compile less
  results = demo.train_and_compare(config, epath.Path(tmp_path))
  out = capsys.readouterr().out
  assert set(results) == {'iFAM', 'ERM baseline'}
  for name, result in results.items():
    test = result['evals']['test']
    assert result['step'] == 2 and test['num_examples'] == 16
    [row] = [line for line in out.splitlines() if line.startswith(f'| {name} ')]
    assert row.split('|')[2:4] == [f' {100 * test["accuracy"]:>8.1f} ',
                                   f' {100 * test["worst_group_accuracy"]:>14.1f} ']
  assert (tmp_path / 'baseline' / 'params' / 'final.json').exists()
  assert (tmp_path / 'ifam' / 'part_maps.png').stat().st_size > 0
