"""Line and bar charts as inline SVG text, for the HTML report (no plotting library).

Every label is XML-escaped; values that are not finite are left out (a line breaks there).
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

# Tableau's ten colours: distinct, and readable for the common colour-vision deficiencies.
COLOURS = ('#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1',
           '#ff9da7', '#9c755f', '#bab0ac')
FONT = 'font-family="sans-serif" font-size="11"'


def _e(text: object) -> str:
  return html.escape(str(text), quote=True)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
  if high <= low:
    low, high = low - (abs(low) or 1) / 2, high + (abs(high) or 1) / 2
  raw = (high - low) / count
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.floor(low / step) * step
  ticks = []
  for i in range(count * 3):
    ticks.append(round(first + i * step, 12))
    if ticks[-1] >= high:
      break
  return ticks


def _label(value: float, percent: bool) -> str:
  return f'{100 * value:.0f}' if percent else f'{value:.3g}'


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], *, title: str,
               x_label: str = 'step', percent: bool = False, width: int = 560,
               height: int = 260) -> str:
  """One line per series of (x, y) points, with round axis ticks and a legend below.

  Series with few points also get a dot per point (evaluations); `percent` labels the y axis
  in percent of 1.
  """
  clean = {name: [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
           for name, points in series.items()}
  clean = {name: points for name, points in clean.items() if points}
  left, right, top, plot_h = 52, 14, 24, height - 60
  rows = -(-len(clean) // 3)
  total_h = height + 16 * max(rows - 1, 0)
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" '
           f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="15" {FONT} font-weight="bold">{_e(title)}</text>']
  if not clean:
    parts.append(f'<text x="{left}" y="{top + plot_h / 2}" {FONT}>no finite values</text>')
    return ''.join(parts) + '</svg>'
  xs = [x for points in clean.values() for x, _ in points]
  ys = [y for points in clean.values() for _, y in points]
  x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
  x_ticks = [t for t in nice_ticks(x0, x1) if x0 <= t <= x1]
  y_ticks = nice_ticks(min(ys), max(ys))
  y0, y1 = y_ticks[0], y_ticks[-1]
  plot_w = width - left - right
  px = lambda x: left + plot_w * (x - x0) / ((x1 - x0) or 1)
  py = lambda y: top + plot_h * (1 - (y - y0) / ((y1 - y0) or 1))
  for t in y_ticks:
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
                 f'stroke="#e4e4e4"/><text x="{left - 4}" y="{py(t) + 4:.1f}" {FONT} '
                 f'text-anchor="end">{_e(_label(t, percent))}</text>')
  for t in x_ticks:
    parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" '
                 f'y2="{top + plot_h + 4}" stroke="#555"/><text x="{px(t):.1f}" '
                 f'y="{top + plot_h + 16}" {FONT} text-anchor="middle">{_e(f"{t:g}")}</text>')
  parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
               f'stroke="#999"/><text x="{left + plot_w}" y="{top + plot_h + 30}" {FONT} '
               f'text-anchor="end">{_e(x_label)}</text>')
  for i, (name, points) in enumerate(clean.items()):
    colour = COLOURS[i % len(COLOURS)]
    path = ' '.join(f'{px(x):.1f},{py(y):.1f}' for x, y in points)
    parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.6">'
                 f'<title>{_e(name)}</title></polyline>')
    if len(points) <= 40:
      parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}">'
                f'<title>{_e(name)} @ {x:g}: {_e(_label(y, percent) if percent else f"{y:.4g}")}'
                f'</title></circle>' for x, y in points]
    lx, ly = left + (i % 3) * (plot_w / 3), height - 8 + 16 * (i // 3)
    parts.append(f'<rect x="{lx:.1f}" y="{ly - 9}" width="10" height="10" fill="{colour}"/>'
                 f'<text x="{lx + 14:.1f}" y="{ly}" {FONT}>{_e(name)}</text>')
  return ''.join(parts) + '</svg>'


def bar_chart(rows: Mapping[str, Mapping[str, float]], *, title: str, width: int = 560) -> str:
  """Horizontal bars in [0, 1] (accuracies, labelled in percent): a group of bars per row label,
  one bar per series, the value beside each; the series' colours in a legend on top."""
  names = list(dict.fromkeys(name for values in rows.values() for name in values))
  label_w = min(7 * max((len(label) for label in rows), default=1) + 12, width // 3)
  bar, gap, top = 14, 10, 40
  plot_w = width - label_w - 56
  height = top + len(rows) * (len(names) * bar + gap) + 4
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
           f'<text x="4" y="15" {FONT} font-weight="bold">{_e(title)}</text>']
  for j, name in enumerate(names):
    lx = label_w + j * 150
    parts.append(f'<rect x="{lx}" y="22" width="10" height="10" '
                 f'fill="{COLOURS[j % len(COLOURS)]}"/>'
                 f'<text x="{lx + 14}" y="31" {FONT}>{_e(name)}</text>')
  y = top
  for label, values in rows.items():
    group_h = len(names) * bar
    parts.append(f'<text x="{label_w - 6}" y="{y + group_h / 2 + 4}" {FONT} '
                 f'text-anchor="end">{_e(label)}</text>')
    for j, name in enumerate(names):
      value = values.get(name)
      if value is not None and math.isfinite(value):
        length = plot_w * min(max(value, 0.0), 1.0)
        parts.append(f'<rect x="{label_w}" y="{y + j * bar}" width="{length:.1f}" '
                     f'height="{bar - 2}" fill="{COLOURS[j % len(COLOURS)]}"><title>'
                     f'{_e(name)}: {100 * value:.1f}%</title></rect><text '
                     f'x="{label_w + length + 4:.1f}" y="{y + j * bar + bar - 4}" {FONT}>'
                     f'{100 * value:.1f}</text>')
    y += group_h + gap
  parts.append(f'<line x1="{label_w}" x2="{label_w}" y1="{top - 2}" y2="{y - gap + 2}" '
               'stroke="#555"/>')
  return ''.join(parts) + '</svg>'
