"""Rewards: `make_reward_fn(name, config.rewards) -> reward_fn(images, prompts) -> (B,)`.

Shape legend: B batch, H/W image height/width. Images are NHWC float in [0, 1] (NumPy or JAX
arrays), prompts a sequence of B strings; every reward returns (B,) float32.

The registry is `registry.py` (re-exported here); this package registers the built-in rewards.
Two kinds of rewards:
  * function rewards, registered by name (`get(name)`): the JPEG rewards (host-side, PIL) and any
    `register`ed / `host_callback.register_host_reward`ed Python reward;
  * model rewards (`register_model_reward`), built from weights whose locations are config values
    (`make_reward_fn(name, config_rewards)`); their scores are jitted Flax functions on device:
      aesthetic   config.rewards.aesthetic.clip (CLIP ViT-L/14 dir), .mlp (converted .safetensors)
      pickscore   config.rewards.pickscore.model (CLIPModel dir), .processor ("" = model dir)
      hpsv2       config.rewards.hpsv2.checkpoint (converted .safetensors), .clip_config (dir)
      image_reward config.rewards.image_reward.checkpoint (converted .safetensors), .tokenizer
                  (bert-base-uncased dir), .architecture ("ImageReward-v1.0" or a dict), .dtype
      imagereward config.rewards.imagereward.model (name or path), .device (host PyTorch model;
                  the `image-reward` package; `image_reward` is the Flax port on the mesh)
Every CLIP directory entry (aesthetic.clip, pickscore.model/.processor, hpsv2.clip_config) and
image_reward.tokenizer may also be a hub id "org/name", downloaded on first use; the .safetensors
entries are local files.
`make_reward_fn` handles both kinds, so callers use it for every name.

Other modules register their own rewards when imported; a config lists them in
`config.reward_modules`, which entry points import with `import_reward_modules` before checking or
building a reward name. The shapes world's (`tdpo_jax.shapes.rewards`, configs/shapes.py):
shapes_gold, shapes_gold_fidelity, shapes_gold_quality (function rewards), shapes_proxy and
shapes_aesthetic (model rewards, config.rewards.<name>.weights).
"""
from tdpo_jax.rewards import aesthetic
from tdpo_jax.rewards import host_callback
from tdpo_jax.rewards import hpsv2
from tdpo_jax.rewards import image_reward
from tdpo_jax.rewards import jpeg
from tdpo_jax.rewards import pickscore
from tdpo_jax.rewards import registry
from tdpo_jax.rewards.registry import (DeviceReward, ModelReward, available, check_name, get,
                                       import_reward_modules, make_reward_fn, register,
                                       register_model_reward)

__all__ = ["DeviceReward", "ModelReward", "available", "check_name", "get", "import_reward_modules",
           "make_reward_fn", "register", "register_model_reward"]


def _imagereward(model, device, cache_dir=""):
  del cache_dir
  return host_callback.imagereward_fn(model, device)


registry.register("jpeg_compressibility", jpeg.jpeg_compressibility)
registry.register("jpeg_incompressibility", jpeg.jpeg_incompressibility)
registry.register_model_reward("aesthetic", aesthetic.make_reward_fn, ("clip", "mlp"),
                               directory_keys=("clip",))
registry.register_model_reward("pickscore", pickscore.make_reward_fn, ("model", "processor"),
                               directory_keys=("model", "processor"))
registry.register_model_reward("hpsv2", hpsv2.make_reward_fn, ("checkpoint", "clip_config"),
                               directory_keys=("clip_config",))
registry.register_model_reward(
    "image_reward", image_reward.make_reward_fn,
    ("checkpoint", "tokenizer", "architecture", "dtype"), directory_keys=("tokenizer",),
    hub_patterns=image_reward.TOKENIZER_HUB_PATTERNS)
registry.register_model_reward("imagereward", _imagereward, ("model", "device"))
