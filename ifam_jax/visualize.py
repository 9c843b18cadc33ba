"""Pictures of what the model sees: part assignments, the stage-2 mask, predictions (PIL only)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

# Distinct colours for up to 16 parts (background is left transparent).
PART_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195)], np.uint8)


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest upsampling of a [h, w] patch grid to [height, width] pixels."""
  rows = np.arange(height) * grid.shape[0] // height
  cols = np.arange(width) * grid.shape[1] // width
  return grid[rows][:, cols]


def part_overlay(image: np.ndarray, maps: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """Colours each patch by its most likely foreground part; background patches stay as they are.

  Args:
    image: uint8 [H, W, 3].
    maps: part maps [h, w, K+1], background last.
  """
  num_parts = maps.shape[-1] - 1
  assigned = _upsample(np.argmax(maps, axis=-1), *image.shape[:2])
  colours = PART_COLOURS[np.minimum(assigned, len(PART_COLOURS) - 1)].astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
  return np.where((assigned < num_parts)[..., None], blended, image).astype(np.uint8)


def mask_overlay(image: np.ndarray, fg_mask: np.ndarray) -> np.ndarray:
  """The stage-2 view: patches outside the mask are blacked out (stage 2 cannot attend to them)."""
  keep = _upsample(np.asarray(fg_mask) > 0.5, *image.shape[:2])
  return np.where(keep[..., None], image, 0).astype(np.uint8)


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str | pathlib.Path,
              captions: Sequence[str] | None = None, scale: int = 2) -> pathlib.Path:
  """Writes a PNG of equally sized uint8 images, one list per row, with an optional caption each."""
  h, w = rows[0][0].shape[:2]
  h, w = h * scale, w * scale
  caption_h = 14 if captions else 0
  ncols = max(len(r) for r in rows)
  canvas = Image.new('RGB', (ncols * (w + 4) + 4, len(rows) * (h + caption_h + 4) + 4),
                     (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  for i, row in enumerate(rows):
    top = 4 + i * (h + caption_h + 4)
    if captions:
      draw.text((4, top), captions[i], fill=(0, 0, 0))
    for j, tile in enumerate(row):
      picture = Image.fromarray(tile).resize((w, h), Image.NEAREST)
      canvas.paste(picture, (4 + j * (w + 4), top + caption_h))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path
