"""JPEG (in)compressibility rewards of DDPO: minus / plus the JPEG file size in kB.

Host-side (PIL), so it needs the images on the host. Images: (B, H, W, 3) float in [0, 1],
quantised as `round(x * 255)` clipped to uint8, saved at PIL quality 95 (as ddpo-pytorch).
"""
import io

import numpy as np
from PIL import Image

JPEG_QUALITY = 95


def to_uint8(images):
  """(B, H, W, 3) float in [0, 1] -> uint8, rounding (not truncating) like the official code."""
  return np.clip(np.round(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def jpeg_sizes_kb(images, quality=JPEG_QUALITY):
  """JPEG size in kB of each image: (B,) float32."""
  sizes = []
  for image in to_uint8(images):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    sizes.append(buffer.tell() / 1000.0)
  return np.asarray(sizes, dtype=np.float32)


def jpeg_compressibility(images, prompts=None):
  """r = -size_kB: smaller files (smoother, simpler images) score higher."""
  del prompts
  return -jpeg_sizes_kb(images)


def jpeg_incompressibility(images, prompts=None):
  """r = +size_kB: more detailed images score higher."""
  del prompts
  return jpeg_sizes_kb(images)
