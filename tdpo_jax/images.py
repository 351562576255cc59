"""Captioned image grids (PNG) for sampled images: the first thing a user looks at.

Images are (B, H, W, 3) float in [0, 1].
"""
import math
import textwrap

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from tdpo_jax import paths

MIN_CELL = 128  # upscale small (tiny-model) images so captions stay legible
MAX_CAPTION_LINES = 8  # the caption band grows to the longest caption, up to this many lines


def make_grid(images, captions=None, columns=None):
  """Tiles images into a grid, each with its caption (prompt, reward, ...) below it.

  Args:
    images: (B, H, W, 3) float in [0, 1].
    captions: optional sequence of B strings.
    columns: images per row (default: ceil(sqrt(B))).
  Returns:
    a PIL RGB image.
  """
  images = np.clip(np.round(np.asarray(images, np.float32) * 255), 0, 255).astype(np.uint8)
  count, height, width, _ = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  scale = max(1, math.ceil(MIN_CELL / max(height, width)))
  cell_w, cell_h = width * scale, height * scale
  font = ImageFont.load_default()
  chars_per_line = max(8, cell_w // 6)
  wrapped = [textwrap.wrap(str(caption), chars_per_line)[:MAX_CAPTION_LINES]
             for caption in captions] if captions else []
  line_h = 12 if captions else 0
  caption_h = line_h * max(map(len, wrapped), default=0) + 4 if captions else 0
  grid = Image.new("RGB", (columns * cell_w, rows * (cell_h + caption_h)), "white")
  draw = ImageDraw.Draw(grid)
  for index, image in enumerate(images):
    x = (index % columns) * cell_w
    y = (index // columns) * (cell_h + caption_h)
    grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
    if captions:
      for line_index, line in enumerate(wrapped[index]):
        draw.text((x + 2, y + cell_h + 2 + line_index * line_h), line, fill="black", font=font)
  return grid


def save_grid(path, images, captions=None, columns=None):
  """Writes the grid to `path` on process 0 only (multi-host runs call it on every host).

  `path` may be non-local (`gs://...`): the PNG is then written to a local temporary file and
  uploaded (`paths.local_target`).
  """
  if jax.process_index() == 0:
    grid = make_grid(images, captions, columns)
    with paths.local_target(path) as target:
      grid.save(target)
  return path
