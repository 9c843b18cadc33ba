"""The demo's comparison on the tiny config: both models train, the table and picture appear."""

from etils import epath

from fixtures.tiny_config import get_config
from ifam_jax import compare


def test_both_models_train_and_the_table_reports_their_test_metrics(tmp_path, capsys):
  config = get_config('steps=2')
  config.compare.methods, config.compare.split = ('ifam', 'erm'), 'test'
  config.model.stage2_token_tiers = ()  # the plain step: one compile less
  report = compare.run_compare(config, epath.Path(tmp_path), config.compare.methods)
  out = capsys.readouterr().out
  assert list(report['methods']) == ['ifam', 'erm']
  for name, row in report['methods'].items():
    result = report['results'][name]['0']
    test = result['evals']['test']
    assert result['step'] == 2 and test['num_examples'] == 16
    [line] = [line for line in out.splitlines() if line.startswith(f'| {row["label"]} ')]
    cells = [cell.strip() for cell in line.split('|')]
    assert cells[4:6] == [f'{100 * test["accuracy"]:.1f}',
                          f'{100 * test["worst_group_accuracy"]:.1f}']
  assert (tmp_path / 'erm' / 'seed_0' / 'params' / 'final.json').exists()
  assert (tmp_path / 'ifam' / 'seed_0' / 'part_maps.png').stat().st_size > 0
