"""Progress lines for long jobs: done/total, rate, elapsed time and ETA on stdout.

One place for the format the data preparation scripts, `--mode predict` and the train loop print,
so a user reads every long job the same way.
"""

from __future__ import annotations

import time


def hms(seconds: float) -> str:
  """h:mm:ss, hours unbounded (a 30-hour ETA reads 30:00:00, not '1 day, 6:00:00')."""
  seconds = int(round(max(seconds, 0.0)))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class Progress:
  """Prints `<what>: done/total <unit> (pct%), rate, elapsed, ETA` every `every` seconds and at
  the end.

  `update(count, items)` adds `count` units of work (the ETA's measure) and `items` things done
  with them (the rate's measure, `rate_unit`); by default the rate counts the units themselves.
  `show=False` (hosts other than the first) keeps the counts and prints nothing.
  """

  def __init__(self, what: str, total: int, *, unit: str = '', rate_unit: str = '',
               every: float = 30.0, show: bool = True):
    self.what, self.total, self.every, self.show = what, total, every, show
    self.unit, self.rate_unit = unit, rate_unit
    self.done = self.items = 0
    self.start = self.last = time.monotonic()

  def update(self, count: int = 1, items: int | None = None) -> None:
    added = min(count, self.total - self.done)  # a padded last batch counts no further
    self.done += added
    self.items += added if items is None else items
    now = time.monotonic()
    if now - self.last < self.every and self.done < self.total:
      return
    self.last, elapsed = now, now - self.start
    eta = elapsed / max(self.done, 1) * (self.total - self.done)
    unit = f' {self.unit}' if self.unit else ''
    counted = f', {self.items:,} {self.rate_unit}' if self.rate_unit else ''
    rate_unit = self.rate_unit or self.unit or 'done'
    if self.show:
      print(f'{self.what}: {self.done:,}/{self.total:,}{unit} '
            f'({100 * self.done / max(self.total, 1):.0f}%){counted}, '
            f'{self.items / max(elapsed, 1e-6):.1f} {rate_unit}/s, elapsed {hms(elapsed)}, '
            f'ETA {hms(eta)}', flush=True)
