"""Flax CLIP dual encoder (image and text towers with projections) for the CLIP-based rewards.

Shape legend: B batch, H/W image height/width, S the vision tower's input size, L token length
(text max_position_embeddings, 77), d the projection width. Images are NHWC float in [0, 1];
CLIP `pixel_values` are NCHW (what `image_encoder.preprocess_images` returns and what the vision
tower takes).

The module is `models.clip.ClipModel` (params `text_model/...`, `vision_model/...`,
`visual_projection/kernel`, `text_projection/kernel`, `logit_scale`, the tree of transformers'
former `FlaxCLIPModule`), so a PyTorch `CLIPModel` state dict converts one to one with
`models.convert.clip_pytorch_to_flax`; open_clip state dicts (HPSv2) are first renamed by
`rewards.open_clip_keys`.

Features, as `CLIPModel.get_image_features` / `get_text_features` and open_clip's
`encode_image` / `encode_text`:
  image: e_I = normalise(P_v · post_layernorm(ViT(pixel_values))[CLS])
  text:  e_T = normalise(P_t · final_layer_norm(Transformer(ids))[EOT])
with normalise(x) = x / ||x||_2. The EOT position is the first `eos_token_id` (transformers) or,
for legacy configs with `eos_token_id == 2`, the argmax token id (open_clip's rule); both pick
the same token for CLIP's BPE vocabulary, whose EOT has the largest id.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from tdpo_jax.models import clip
from tdpo_jax.models import convert as model_convert
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import registry
from tdpo_jax.rewards import state_dicts


@dataclasses.dataclass(frozen=True, eq=False)
class ClipModel:
  """Static handles of a CLIP dual encoder (params are passed separately, as a pytree).

  `eq=False` keeps identity hashing, so a `ClipModel` can be closed over by `jax.jit`.

  Attributes:
    module: `models.clip.ClipModel` (float32) with a `clip.ClipConfig`.
    tokenizer: `transformers.CLIPTokenizer` (host-side).
    resize_size: shortest edge the image is resized to before the center crop.
    crop_size: side of the center crop, S.
    image_mean, image_std: per-channel normalisation constants (RGB).
  """
  module: clip.ClipModel
  tokenizer: transformers.CLIPTokenizer
  resize_size: int
  crop_size: int
  image_mean: tuple = image_encoder_lib.CLIP_MEAN
  image_std: tuple = image_encoder_lib.CLIP_STD

  @property
  def max_length(self):
    """L, the text tower's number of positions."""
    return self.module.config.text_config.max_position_embeddings


def clip_module(config):
  """`clip.ClipModel` (float32) for a `CLIPConfig`, a config.json dict or a `clip.ClipConfig`."""
  return clip.ClipModel(clip.clip_config(config))


def expected_shapes(module):
  """{flax_path: ShapeDtypeStruct} of a `clip.ClipModel`'s params (shapes only, no compute)."""
  return model_convert.expected_param_shapes(
      lambda rng: clip.init_clip_params(module, rng), jax.random.key(0))


def read_clip_config(directory):
  """`clip.ClipConfig` from `directory/config.json` (read by transformers' `CLIPConfig`, which
  fills the defaults a saved config omits), or a one-line `ModelLoadError`."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise pipeline_lib.ModelLoadError(f"missing CLIP config {path!r}; expected a transformers "
                                      "CLIPModel config.json")
  with open(path) as file:
    model_type = json.load(file).get("model_type")
  if model_type != "clip":
    raise pipeline_lib.ModelLoadError(f"{path!r} has model_type={model_type!r}; expected 'clip' "
                                      "(a full CLIPModel config with text and vision towers)")
  return clip.clip_config(transformers.CLIPConfig.from_pretrained(directory))


read_vision_config = pipeline_lib.read_vision_config


def load_tokenizer(directory):
  """`CLIPTokenizer` of a directory holding vocab.json and merges.txt."""
  for name in ("vocab.json", "merges.txt"):
    if not os.path.isfile(os.path.join(directory, name)):
      raise pipeline_lib.ModelLoadError(
          f"missing {os.path.join(directory, name)!r}; expected a CLIP tokenizer directory with "
          "vocab.json and merges.txt")
  return transformers.CLIPTokenizer.from_pretrained(directory)


def make_clip_model(config, processor_dir):
  """`ClipModel` for `config`, tokenizer and preprocessing read from `processor_dir`."""
  resize_size, crop_size, mean, std = image_encoder_lib.read_preprocessor_config(
      processor_dir, config.vision_config.image_size)
  return ClipModel(module=clip_module(config), tokenizer=load_tokenizer(processor_dir),
                   resize_size=resize_size, crop_size=crop_size, image_mean=mean, image_std=std)


def pytorch_to_flax(state_dict, module, source):
  """PyTorch `CLIPModel` state dict -> `clip.ClipModel` params (NumPy, float32).

  Checks every expected PyTorch key first (in the Flax param order) and names the first one that
  is missing or has another shape; extra keys (e.g. `position_ids` buffers) are ignored.
  """
  shapes = expected_shapes(module)
  state_dicts.check_state_dict(
      state_dict, state_dicts.pytorch_shapes(shapes), source, "a transformers CLIPModel")
  return model_convert.clip_pytorch_to_flax(state_dict, shapes, source)


def load_clip_model(directory, processor_dir="", cache_dir=""):
  """(ClipModel, params) from a transformers CLIPModel directory (PickScore's layout).

  Weights: `flax_model.msgpack`, else `model.safetensors` converted in NumPy (no torch) and
  cached as msgpack (next to it, or under `cache_dir/converted`).

  Args:
    directory: CLIPModel directory (config.json + weights).
    processor_dir: directory with the tokenizer files and preprocessor_config.json; "" = the
      model directory (PickScore's processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).
    cache_dir: root for converted weights, "" = next to the safetensors.
  Returns:
    (ClipModel, params) with float32 jnp params.
  """
  if not os.path.isdir(directory):
    raise pipeline_lib.ModelLoadError(f"CLIP model directory not found: {directory!r}; expected "
                                      "a transformers CLIPModel directory")
  config = read_clip_config(directory)
  model = make_clip_model(config, processor_dir or directory)

  def convert_fn(state_dict, source):
    return pytorch_to_flax(state_dict, model.module, source)

  params = pipeline_lib._load_weights(  # pylint: disable=protected-access  (shared loader + cache)
      directory, pipeline_lib.TRANSFORMERS_WEIGHTS, convert_fn, expected_shapes(model.module),
      cache_dir)
  return model, params


def image_encoder_of(model, params):
  """(ImageEncoder, params) sharing this model's image tower (e.g. for the critic, DESIGN §3).

  `ImageEncoder`'s params are named like `ClipModel`'s vision half, so this is a subtree.
  """
  config = model.module.config
  vision_config = dataclasses.replace(config.vision_config, projection_dim=config.projection_dim)
  encoder = image_encoder_lib.ImageEncoder(
      config=vision_config, resize_size=model.resize_size, crop_size=model.crop_size,
      image_mean=model.image_mean, image_std=model.image_std)
  return encoder, {name: params[name] for name in ("vision_model", "visual_projection")}


def tokenize(model, prompts):
  """Token ids (B, L) np.int32, padded to L and truncated (the EOT token is kept)."""
  encoded = model.tokenizer(list(prompts), padding="max_length", max_length=model.max_length,
                            truncation=True, return_tensors="np")
  return np.asarray(encoded.input_ids, dtype=np.int32)


normalise = clip.normalise


def image_embeds(model, params, pixel_values):
  """Projected image embeddings (B, d), not normalised, of CLIP pixel_values (B, 3, S, S) NCHW."""
  return model.module.apply({"params": params}, pixel_values,
                            method=clip.ClipModel.get_image_features)


def text_embeds(model, params, input_ids):
  """Projected text embeddings (B, d), not normalised, of token ids (B, L)."""
  return model.module.apply({"params": params}, jnp.asarray(input_ids, jnp.int32),
                            method=clip.ClipModel.get_text_features)


def image_features(model, params, images):
  """e_I (B, d), L2-normalised, of images (B, H, W, 3) in [0, 1].

  The images are uint8-quantised and CLIP-preprocessed (`image_encoder.preprocess_images`).
  """
  pixel_values = image_encoder_lib.preprocess_images(
      images, model.resize_size, model.image_mean, model.image_std, crop_size=model.crop_size)
  return normalise(image_embeds(model, params, pixel_values))


def text_features(model, params, input_ids):
  """e_T (B, d), L2-normalised, of token ids (B, L)."""
  return normalise(text_embeds(model, params, input_ids))


def clip_reward_fn(model, params, score_fn):
  """The `registry.DeviceReward` of `score_fn(model, params, images, input_ids)`: host
  tokenisation (`tokenize`), then the jitted score."""
  return registry.DeviceReward(functools.partial(score_fn, model), params,
                               encode_prompts=lambda prompts: (tokenize(model, prompts),))
