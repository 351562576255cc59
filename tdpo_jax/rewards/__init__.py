"""Reward registry: `get(name) -> reward_fn(images, prompts) -> (B,) float32`.

Images are NHWC float in [0, 1] (NumPy or JAX arrays), prompts a sequence of B strings.
Host-side rewards (JPEG) run in NumPy/PIL; model rewards (issue: reward models in Flax) will
register jitted functions on the same interface.
"""
from tdpo_jax.rewards import jpeg

_REGISTRY = {
    "jpeg_compressibility": jpeg.jpeg_compressibility,
    "jpeg_incompressibility": jpeg.jpeg_incompressibility,
}


def available():
  return sorted(_REGISTRY)


def register(name, reward_fn):
  """Adds `reward_fn(images, prompts) -> (B,)` under `name` (e.g. a user's Python reward)."""
  _REGISTRY[name] = reward_fn


def get(name):
  if name not in _REGISTRY:
    raise ValueError(f"unknown reward {name!r}: expected one of {available()}")
  return _REGISTRY[name]
