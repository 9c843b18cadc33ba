import pytest

from ifam_jax import progress as progress_lib


@pytest.mark.parametrize('seconds, text', [(0, '0:00:00'), (59.6, '0:01:00'), (3725, '1:02:05'),
                                           (30 * 3600, '30:00:00'), (-5, '0:00:00')])
def test_hms(seconds, text):
  assert progress_lib.hms(seconds) == text


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_prints_when_due_and_at_the_end(monkeypatch, capsys):
  clock = FakeClock()
  monkeypatch.setattr(progress_lib.time, 'monotonic', clock)
  p = progress_lib.Progress('train', 4, unit='tasks', rate_unit='images', every=30.0)
  clock.now += 10
  p.update(1, items=50)
  assert capsys.readouterr().out == ''  # not due yet
  clock.now += 30  # 40 s in, 2 of 4 tasks: 40 s to go
  p.update(1, items=150)
  assert capsys.readouterr().out == ('train: 2/4 tasks (50%), 200 images, 5.0 images/s, '
                                     'elapsed 0:00:40, ETA 0:00:40\n')
  clock.now += 1
  p.update(2, items=10)  # the last update always prints
  assert capsys.readouterr().out.startswith('train: 4/4 tasks (100%), 210 images, ')


def test_progress_counts_units_by_default_and_can_stay_silent(monkeypatch, capsys):
  clock = FakeClock()
  monkeypatch.setattr(progress_lib.time, 'monotonic', clock)
  shown = progress_lib.Progress('masks', 3)
  silent = progress_lib.Progress('masks', 3, show=False)
  clock.now += 3
  for p in (shown, silent):
    p.update(5)  # clamped to the total
  assert capsys.readouterr().out == 'masks: 3/3 (100%), 1.0 done/s, elapsed 0:00:03, ETA 0:00:00\n'
  assert silent.done == 3
