"""Markdown tables of metrics, as the CLI modes print them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

_COLUMNS = (('acc', ('accuracy',)), ('top-5', ('top5_accuracy',)),
            ('macro', ('macro_accuracy',)), ('mean grp', ('mean_group_accuracy',)),
            ('worst grp', ('worst_group_accuracy',)),
            ('worst minority', ('worst_group_accuracy_minority',)), ('AUROC', ('auroc',)),
            ('WG AUROC', ('worst_group_auroc',)),
            ('stage 1', ('stage1', 'accuracy')), ('fg', ('fg_fraction',)),
            ('fg IoU', ('fg_iou',)), ('fg IoU/img', ('fg_iou_image_mean',)), ('Kp', ('kp',)),
            ('NMI', ('nmi',)), ('ARI', ('ari',)))


def format_cell(value: Any) -> str:
  """A table cell: floats as percentages with one decimal."""
  return f'{100 * value:.1f}' if isinstance(value, float) else str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A Markdown table; floats as percentages with one decimal."""
  cells = [[format_cell(v) for v in row] for row in rows]
  widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

  def line(values):  # the row name left-aligned, numbers right-aligned
    return '| ' + ' | '.join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                             for i, (v, w) in enumerate(zip(values, widths))) + ' |'

  return '\n'.join([line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, cells)])


def metrics_cells(rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
  """The header and rows of `metrics_table`: a column per metric that any row has."""

  def get(metrics, path):
    for key in path:
      metrics = metrics.get(key, {}) if isinstance(metrics, Mapping) else {}
    return metrics if isinstance(metrics, float) else '-'

  columns = [(h, p) for h, p in _COLUMNS if any(get(m, p) != '-' for m in rows.values())]
  return (['', 'n'] + [h for h, _ in columns],
          [[name, m['num_examples']] + [get(m, p) for _, p in columns]
           for name, m in rows.items()])


def metrics_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
  """`format_table` of metrics dicts by row name, with the columns that any row has."""
  return format_table(*metrics_cells(rows))
