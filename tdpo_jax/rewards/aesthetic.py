"""LAION aesthetic score (as DDPO and TDPO-R use it): CLIP ViT-L/14 image embedding + linear MLP.

Shape legend: B batch, H/W image height/width, S the CLIP input size (224), d the CLIP
projection width (768 for ViT-L/14). Images are NHWC float in [0, 1]; CLIP pixel_values NCHW.

  e = normalise(CLIP.get_image_features(preprocess(uint8(images))))          (B, d)
  r = W_7 (W_6 (W_4 (W_2 (W_0 e + b_0) + b_2) + b_4) + b_6) + b_7            (B,)

The MLP of `sac+logos+ava1-l14-linearMSE.pth` is `nn.Sequential(Linear(d,1024), Dropout(0.2),
Linear(1024,128), Dropout(0.2), Linear(128,64), Dropout(0.1), Linear(64,16), Linear(16,1))`:
no nonlinearity, dropout inactive at scoring time; its keys are `layers.{0,2,4,6,7}.{weight,bias}`.
The published file is a pickle: convert it once with
`python -m tdpo_jax.rewards.convert aesthetic --src=...pth --out=...safetensors`; this module
only reads safetensors. The CLIP tower is loaded by the same loader as the critic's encoder.
"""
import dataclasses
import functools
import os

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import clip_model
from tdpo_jax.rewards import registry
from tdpo_jax.rewards import state_dicts

# (PyTorch nn.Sequential index, output width) of the Linear layers.
MLP_LAYERS = ((0, 1024), (2, 128), (4, 64), (6, 16), (7, 1))
ARCHITECTURE = "the LAION aesthetic MLP"


class AestheticMLP(nn.Module):
  """The aesthetic predictor's affine MLP: (B, d) -> (B, 1); Dense layers `layers_{i}`."""

  @nn.compact
  def __call__(self, embeds):
    hidden = embeds
    for index, width in MLP_LAYERS:
      hidden = nn.Dense(width, name=f"layers_{index}")(hidden)
    return hidden


def mlp_pytorch_shapes(input_dim):
  """Ordered {pytorch key: shape} of the MLP for a d = `input_dim` embedding."""
  shapes, width_in = {}, input_dim
  for index, width in MLP_LAYERS:
    shapes[f"layers.{index}.weight"] = (width, width_in)
    shapes[f"layers.{index}.bias"] = (width,)
    width_in = width
  return shapes


def mlp_pytorch_to_flax(state_dict, input_dim, source):
  """{"layers.i.weight": (out, in), ...} -> AestheticMLP params; names the first bad key."""
  state_dicts.check_state_dict(state_dict, mlp_pytorch_shapes(input_dim), source, ARCHITECTURE)
  params = {}
  for index, _ in MLP_LAYERS:
    params[(f"layers_{index}", "kernel")] = np.asarray(
        state_dict[f"layers.{index}.weight"], np.float32).T
    params[(f"layers_{index}", "bias")] = np.asarray(state_dict[f"layers.{index}.bias"], np.float32)
  return flax.traverse_util.unflatten_dict(params)


def load_mlp(path, input_dim):
  """AestheticMLP params (jnp float32) from the converted safetensors file."""
  state_dict = state_dicts.load_converted(path, "aesthetic", "aesthetic MLP")
  params = mlp_pytorch_to_flax(state_dict, input_dim, path)
  return jax.tree.map(jnp.asarray, params)


@dataclasses.dataclass(frozen=True, eq=False)
class AestheticModel:
  """Static module handles; params are {"encoder": ..., "mlp": ...}."""
  encoder: image_encoder_lib.ImageEncoder
  mlp: AestheticMLP


def load_encoder(directory, cache_dir=""):
  """(ImageEncoder, params) of a CLIPModel or CLIPVisionModelWithProjection directory.

  Like `models.pipeline.load_image_encoder`, but a CLIPModel config's top-level `projection_dim`
  is used (transformers' `CLIPVisionConfig.from_pretrained` would give the default 512).
  """
  if not os.path.isdir(directory):
    raise pipeline_lib.ModelLoadError(f"aesthetic CLIP directory not found: {directory!r}; "
                                      "expected a CLIP ViT-L/14 (CLIPModel) directory")
  config = clip_model.read_vision_config(directory)
  resize_size, crop_size, mean, std = image_encoder_lib.read_preprocessor_config(
      directory, config.image_size)
  module = image_encoder_lib.ImageEncoder(config=config, resize_size=resize_size,
                                          crop_size=crop_size, image_mean=mean, image_std=std)
  params = pipeline_lib._load_clip_component(  # pylint: disable=protected-access  (shared loader)
      directory, module, module.init_weights, cache_dir)
  return module, params


def load(clip_dir, mlp_path, cache_dir=""):
  """(AestheticModel, params) from a CLIP directory and the converted MLP safetensors."""
  encoder, encoder_params = load_encoder(clip_dir, cache_dir)
  mlp_params = load_mlp(mlp_path, encoder.config.projection_dim)
  return AestheticModel(encoder=encoder, mlp=AestheticMLP()), {"encoder": encoder_params,
                                                               "mlp": mlp_params}


def score(model, params, images):
  """Aesthetic scores (B,) of images (B, H, W, 3) in [0, 1] (jittable)."""
  encoder = model.encoder
  pixel_values = image_encoder_lib.preprocess_images(
      images, encoder.resize_size, encoder.image_mean, encoder.image_std,
      crop_size=encoder.crop_size)
  embeds = clip_model.normalise(encoder.apply({"params": params["encoder"]}, pixel_values))
  return model.mlp.apply({"params": params["mlp"]}, embeds)[:, 0]


def reward_fn_from_model(model, params):
  """The `registry.DeviceReward` of `score` (image-only: the prompts are unused)."""
  return registry.DeviceReward(functools.partial(score, model), params)


def make_reward_fn(clip, mlp, cache_dir=""):
  """`reward_fn` from a CLIP ViT-L/14 directory `clip` and the converted MLP file `mlp`."""
  model, params = load(clip, mlp, cache_dir)
  return reward_fn_from_model(model, params)
