"""PickScore: image-text preference score of a CLIP ViT-H/14 fine-tuned on Pick-a-Pic.

Shape legend: B batch, H/W image height/width, L token length (77), d projection width (1024).
Images are NHWC float in [0, 1]; prompts a sequence of B strings.

  r_i = exp(logit_scale) · <e_I(image_i), e_T(prompt_i)>

with e_I, e_T the L2-normalised projected CLIP features (`clip_model`), as the PickScore
reference code (`model.logit_scale.exp() * text_embs @ image_embs.T`, one prompt per image).
Weights: a transformers CLIPModel directory (yuvalkirstain/PickScore_v1; `model.safetensors`, or
`pytorch_model.bin` converted once with `python -m tdpo_jax.rewards.convert state_dict`); the
tokenizer and preprocessing come from the processor directory
(laion/CLIP-ViT-H-14-laion2B-s32B-b79K for the published model).
"""
import jax.numpy as jnp

from tdpo_jax.rewards import clip_model


def score(model, params, images, input_ids):
  """PickScore (B,) of images (B, H, W, 3) in [0, 1] and their prompts' ids (B, L) (jittable)."""
  image_features = clip_model.image_features(model, params, images)
  text_features = clip_model.text_features(model, params, input_ids)
  return jnp.exp(params["logit_scale"]) * jnp.sum(image_features * text_features, axis=-1)


def make_reward_fn(model, processor="", cache_dir=""):
  """`reward_fn` from a CLIPModel directory `model` and a `processor` directory ("" = model)."""
  clip, params = clip_model.load_clip_model(model, processor, cache_dir)
  return clip_model.clip_reward_fn(clip, params, score)
