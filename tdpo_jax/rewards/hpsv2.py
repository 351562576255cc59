"""HPS v2: human preference score of an open_clip ViT-H/14 fine-tuned on HPD v2.

Shape legend: B batch, H/W image height/width, L token length (77), d projection width (1024).
Images are NHWC float in [0, 1]; prompts a sequence of B strings.

  r_i = <e_I(image_i), e_T(prompt_i)>

the cosine similarity of the normalised features, with NO logit scale (HPSv2's `score`:
`diagonal(image_features @ text_features.T)` of open_clip's normalised outputs).

The checkpoint (`HPS_v2_compressed.pt`, `{"state_dict": open_clip CLIP}`) is a pickle: convert
it once with `python -m tdpo_jax.rewards.convert hpsv2 --src=... --out=hpsv2.safetensors`. The
architecture, tokenizer and preprocessing come from a transformers CLIP directory of the same
architecture (`clip_config`: laion/CLIP-ViT-H-14-laion2B-s32B-b79K's config.json, tokenizer,
preprocessor_config.json); the open_clip keys are renamed by `open_clip_keys` and converted to
the `models.clip.ClipModel` of `clip_model`. Conversion is NumPy only (a split and transposes), so
it is not cached.
"""

import jax
import jax.numpy as jnp

from tdpo_jax.rewards import clip_model
from tdpo_jax.rewards import open_clip_keys
from tdpo_jax.rewards import state_dicts

ARCHITECTURE = "an open_clip CLIP (HPSv2)"


def open_clip_to_flax(state_dict, module, source):
  """open_clip state dict -> `clip.ClipModel` params (NumPy float32); names the first bad key."""
  config = module.config
  state_dicts.check_state_dict(state_dict, open_clip_keys.expected_open_clip_shapes(config),
                                  source, ARCHITECTURE)
  transformers_state_dict = open_clip_keys.open_clip_to_transformers(state_dict, config)
  return clip_model.pytorch_to_flax(transformers_state_dict, module, source)


def load(checkpoint, clip_config):
  """(ClipModel, params) from the converted HPSv2 safetensors and a CLIP config directory."""
  state_dict = state_dicts.load_converted(checkpoint, "hpsv2", "hpsv2 checkpoint")
  model = clip_model.make_clip_model(clip_model.read_clip_config(clip_config), clip_config)
  params = open_clip_to_flax(state_dict, model.module, checkpoint)
  return model, jax.tree.map(jnp.asarray, params)


def score(model, params, images, input_ids):
  """HPSv2 score (B,) of images (B, H, W, 3) in [0, 1] and prompt ids (B, L) (jittable)."""
  image_features = clip_model.image_features(model, params, images)
  text_features = clip_model.text_features(model, params, input_ids)
  return jnp.sum(image_features * text_features, axis=-1)


def make_reward_fn(checkpoint, clip_config, cache_dir=""):
  """`reward_fn` from the converted `checkpoint` (.safetensors) and a `clip_config` directory."""
  del cache_dir  # NumPy renaming only, nothing worth caching
  model, params = load(checkpoint, clip_config)
  return clip_model.clip_reward_fn(model, params, score)
