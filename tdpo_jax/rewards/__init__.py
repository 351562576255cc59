"""Reward registry: `make_reward_fn(name, config.rewards) -> reward_fn(images, prompts) -> (B,)`.

Shape legend: B batch, H/W image height/width. Images are NHWC float in [0, 1] (NumPy or JAX
arrays), prompts a sequence of B strings; every reward returns (B,) float32.

Two kinds of rewards:
  * function rewards, registered by name (`get(name)`): the JPEG rewards (host-side, PIL) and any
    `register`ed / `host_callback.register_host_reward`ed Python reward;
  * model rewards, built from weights whose locations are config values
    (`make_reward_fn(name, config_rewards)`); their scores are jitted Flax functions on device:
      aesthetic   config.rewards.aesthetic.clip (CLIP ViT-L/14 dir), .mlp (converted .safetensors)
      pickscore   config.rewards.pickscore.model (CLIPModel dir), .processor ("" = model dir)
      hpsv2       config.rewards.hpsv2.checkpoint (converted .safetensors), .clip_config (dir)
      image_reward config.rewards.image_reward.checkpoint (converted .safetensors), .tokenizer
                  (bert-base-uncased dir), .architecture ("ImageReward-v1.0" or a dict), .dtype
      imagereward config.rewards.imagereward.model (name or path), .device (host PyTorch model;
                  the `image-reward` package; `image_reward` is the Flax port on the mesh)
      shapes_proxy config.rewards.shapes_proxy.weights (`python -m tdpo_jax.shapes.proxy` msgpack)
      shapes_aesthetic config.rewards.shapes_aesthetic.weights (`python -m tdpo_jax.shapes.aesthetic`)
Every CLIP directory entry (aesthetic.clip, pickscore.model/.processor, hpsv2.clip_config) and
image_reward.tokenizer may also be a hub id "org/name", downloaded on first use; the .safetensors
entries are local files.
`make_reward_fn` handles both kinds, so callers use it for every name.
"""
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import aesthetic
from tdpo_jax.rewards import host_callback
from tdpo_jax.rewards import hpsv2
from tdpo_jax.rewards import image_reward
from tdpo_jax.rewards import jpeg
from tdpo_jax.rewards import pickscore
from tdpo_jax.shapes import aesthetic as shapes_aesthetic
from tdpo_jax.shapes import gold as shapes_gold
from tdpo_jax.shapes import proxy as shapes_proxy

_REGISTRY = {
    "jpeg_compressibility": jpeg.jpeg_compressibility,
    "jpeg_incompressibility": jpeg.jpeg_incompressibility,
    # The shapes world's analytical reward (prompt fidelity + image quality; shapes/gold.py).
    "shapes_gold": shapes_gold.gold_reward,
    # Its two terms alone: the cross-reward curves of an aesthetic-proxy run.
    "shapes_gold_fidelity": shapes_gold.gold_fidelity,
    "shapes_gold_quality": shapes_gold.gold_quality,
}


def _imagereward(model, device, cache_dir=""):
  del cache_dir
  return host_callback.imagereward_fn(model, device)


# name -> (builder(**values, cache_dir) -> reward_fn, the keys read from config_rewards[name]).
_MODEL_REWARDS = {
    "aesthetic": (aesthetic.make_reward_fn, ("clip", "mlp")),
    "pickscore": (pickscore.make_reward_fn, ("model", "processor")),
    "hpsv2": (hpsv2.make_reward_fn, ("checkpoint", "clip_config")),
    "image_reward": (image_reward.make_reward_fn,
                     ("checkpoint", "tokenizer", "architecture", "dtype")),
    "imagereward": (_imagereward, ("model", "device")),
    "shapes_proxy": (shapes_proxy.make_reward_fn, ("weights",)),
    "shapes_aesthetic": (shapes_aesthetic.make_reward_fn, ("weights",)),
}
# The keys that name a transformers model directory: a local directory or a hub id "org/name"
# (downloaded into cache_dir, or the hub cache); "" stays "" (the builder's default).
_DIRECTORY_KEYS = {
    "aesthetic": ("clip",),
    "pickscore": ("model", "processor"),
    "hpsv2": ("clip_config",),
    "image_reward": ("tokenizer",),
}
# The files a hub id downloads, where not a CLIP model's (`pipeline.CLIP_HUB_PATTERNS`).
_HUB_PATTERNS = {"image_reward": image_reward.TOKENIZER_HUB_PATTERNS}


def available():
  """All reward names: registered functions and model rewards."""
  return sorted(set(_REGISTRY) | set(_MODEL_REWARDS))


def register(name, reward_fn):
  """Adds `reward_fn(images, prompts) -> (B,)` under `name` (e.g. a user's Python reward)."""
  _REGISTRY[name] = reward_fn


def check_name(name):
  """Raises a one-line ValueError for a name that is neither registered nor a model reward."""
  if name not in _REGISTRY and name not in _MODEL_REWARDS:
    raise ValueError(f"unknown reward {name!r}: expected one of {available()}")


def get(name):
  """The registered function reward `name` (model rewards: use `make_reward_fn`)."""
  if name in _REGISTRY:
    return _REGISTRY[name]
  if name in _MODEL_REWARDS:
    raise ValueError(f"reward {name!r} is a model reward; build it with "
                     f"make_reward_fn({name!r}, config.rewards), not get()")
  raise ValueError(f"unknown reward {name!r}: expected one of {available()}")


def make_reward_fn(name, config_rewards=None, cache_dir=""):
  """`reward_fn(images, prompts) -> (B,)` for any reward name.

  Args:
    name: a reward name (`available()`).
    config_rewards: the `config.rewards` ConfigDict (or dict); model rewards read their weight
      locations from `config_rewards[name]` (see the module docstring). Unused for registered
      function rewards, which take precedence (a registered name shadows a model reward).
    cache_dir: root for converted weights ("" = next to the originals).
  Returns:
    reward_fn(images (B, H, W, 3) in [0, 1], prompts) -> (B,) float32.
  """
  if name in _REGISTRY:
    return _REGISTRY[name]
  check_name(name)
  if config_rewards is None or name not in config_rewards:
    raise ValueError(f"reward {name!r} needs its weight locations in config.rewards.{name}; "
                     "got no such config section")
  builder, keys = _MODEL_REWARDS[name]
  section = config_rewards[name]
  missing = [key for key in keys if key not in section]
  if missing:
    raise ValueError(f"config.rewards.{name} has no {missing[0]!r}; expected the keys "
                     f"{', '.join(keys)}")
  values = {key: section[key] for key in keys}
  for key in _DIRECTORY_KEYS.get(name, ()):
    if values[key]:
      values[key] = pipeline_lib.resolve_model_spec(
          values[key], cache_dir=cache_dir,
          allow_patterns=_HUB_PATTERNS.get(name, pipeline_lib.CLIP_HUB_PATTERNS))
  return builder(**values, cache_dir=cache_dir)
