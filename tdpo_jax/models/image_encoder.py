"""CLIP image tower with projection (CLIPVisionModelWithProjection) plus its preprocessing.

Shape legend: B batch, H/W image height/width, S the encoder's input size (config.image_size),
d the projection width. Images are NHWC float32 in [0, 1]; CLIP `pixel_values` are NCHW.

`ImageEncoder` is `clip.ClipVisionModelWithProjection` (the vision transformer plus a bias-free
`visual_projection`, params `vision_model/...`, `visual_projection/kernel`, so PyTorch
`vision_model.*` and `visual_projection.weight` keys map one to one) together with the
preprocessing constants of its directory's `preprocessor_config.json`.
"""
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdpo_jax.models import clip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(nn.Module):
  """CLIP vision tower + projection: pixel_values (B,3,S,S) NCHW -> image_embeds (B,d).

  Attributes:
    config: `clip.VisionConfig` (with `projection_dim`); a `CLIPVisionConfig` or a dict is
      read into one (`clip.vision_config`).
    resize_size: shortest edge the image is resized to before cropping.
    crop_size: side of the center crop (the encoder's input size).
    image_mean, image_std: per-channel normalisation constants (RGB).
    dtype: compute dtype (params stay float32).
    remat: rematerialise each encoder layer in the backward pass.
  """
  config: Any
  resize_size: int
  crop_size: int
  image_mean: tuple = CLIP_MEAN
  image_std: tuple = CLIP_STD
  dtype: Any = jnp.float32
  remat: bool = False

  def __post_init__(self):
    object.__setattr__(self, "config", clip.vision_config(self.config))
    super().__post_init__()

  @nn.compact
  def __call__(self, pixel_values):
    """pixel_values (B,3,S,S) NCHW, CLIP-normalised -> image_embeds (B,d), not L2-normalised."""
    # Built inline, not as a `clip.ClipVisionModelWithProjection` submodule (which would add a
    # scope level): the tree stays `vision_model/...`, `visual_projection/kernel`.
    outputs = clip.ClipVisionTransformer(self.config, self.dtype, self.remat,
                                         name="vision_model")(pixel_values)
    return nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                    name="visual_projection")(outputs.pooler_output)

  def init_weights(self, rng):
    """Random params (used for shapes via `jax.eval_shape` and by the tiny builder)."""
    return clip.init_vision_params(self, rng)


def read_preprocessor_config(directory, image_size):
  """(resize_size, crop_size, mean, std) from `preprocessor_config.json`, else CLIP defaults.

  Args:
    directory: the image encoder directory.
    image_size: the encoder's input size, the default for both sizes.
  """
  path = os.path.join(directory, "preprocessor_config.json")
  if not os.path.isfile(path):
    return image_size, image_size, CLIP_MEAN, CLIP_STD
  with open(path) as file:
    config = json.load(file)
  size = config.get("size", image_size)
  resize_size = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
  crop = config.get("crop_size", image_size)
  crop_size = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
  mean = tuple(float(value) for value in config.get("image_mean", CLIP_MEAN))
  std = tuple(float(value) for value in config.get("image_std", CLIP_STD))
  return int(resize_size), int(crop_size), mean, std


def preprocess_images(images, image_size, mean=CLIP_MEAN, std=CLIP_STD, crop_size=None):
  """CLIP preprocessing of decoded images, as CLIPImageProcessor does on uint8 images.

  uint8 quantisation `round(255 x)` clipped to [0,255]; bicubic resize of the shortest edge to
  `image_size` (antialiased, `jax.image.resize`, rounded back to uint8 values like PIL); center
  crop to `crop_size` (default `image_size`); `/255`; `(x - mean) / std`; NHWC -> NCHW.

  Args:
    images: (B,H,W,3) float in [0,1].
    image_size: shortest-edge target size.
    mean, std: 3-tuples of per-channel normalisation constants.
    crop_size: side of the center crop, default `image_size`.
  Returns:
    pixel_values (B,3,crop,crop) float32, NCHW.
  """
  crop_size = image_size if crop_size is None else crop_size
  batch, height, width, channels = images.shape
  images = jnp.clip(jnp.round(images.astype(jnp.float32) * 255.0), 0.0, 255.0)
  if height <= width:
    new_height, new_width = image_size, int(image_size * width / height)
  else:
    new_height, new_width = int(image_size * height / width), image_size
  if (new_height, new_width) != (height, width):
    images = jax.image.resize(images, (batch, new_height, new_width, channels), "bicubic")
    images = jnp.clip(jnp.round(images), 0.0, 255.0)
  top = (new_height - crop_size) // 2
  left = (new_width - crop_size) // 2
  images = images[:, top:top + crop_size, left:left + crop_size, :]
  images = images / 255.0
  images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return jnp.transpose(images, (0, 3, 1, 2))


def embed_images(pipeline, image_encoder_params, images):
  """Projected CLIP image embeddings of decoded images (jittable).

  Args:
    pipeline: a `Pipeline` with an image encoder.
    image_encoder_params: the encoder's params.
    images: (B,H,W,3) float in [0,1].
  Returns:
    (B,d) image_embeds, not L2-normalised (the critic normalises).
  """
  encoder = pipeline.image_encoder
  if encoder is None:
    raise ValueError("embed_images: the pipeline has no image encoder; expected one loaded "
                     "from an image_encoder/ folder or the image_encoder argument")
  pixel_values = preprocess_images(images, encoder.resize_size, encoder.image_mean,
                                   encoder.image_std, crop_size=encoder.crop_size)
  return encoder.apply({"params": image_encoder_params}, pixel_values).astype(jnp.float32)
