"""The critic's frozen image tower, chosen by `config.critic.tower` (DESIGN §3).

Shape legend: B batch, H/W image height/width, d the tower's embedding width.

The paper's critic reads the reward model's own image tower (CLIP-L/14 for the aesthetic
predictor). A tower is a pure `embed_fn(params, images (B, H, W, 3) in [0, 1]) -> (B, d)` and
its frozen params (they travel in `FrozenParams.image_encoder`); the critic L2-normalises the
embedding (`critic.embed_noisy_latents`).

  "image_encoder"     the pipeline's CLIP image tower (`pretrained.image_encoder`, or the
                      pipeline directory's image_encoder/): SD's CLIP-L/14, the tiny config's
                      random 32-d tower. The default.
  "shapes_aesthetic"  the trunk of the shapes world's aesthetic reward
                      (`config.rewards.shapes_aesthetic.weights`, tdpo_jax/shapes/aesthetic.py):
                      the embedding the reward's affine head reads; registered by
                      `tdpo_jax.shapes.rewards` (`config.reward_modules`).
"""
from typing import Callable, NamedTuple

from tdpo_jax import config_checks
from tdpo_jax.models import image_encoder as image_encoder_lib

TOWERS = config_checks.CRITIC_TOWERS  # declared there, so the config check needs no jax
DEFAULT_TOWER = "image_encoder"


class Tower(NamedTuple):
  """A frozen image tower: `embed_fn(params, images) -> (B, d)` (pure) and its params."""
  embed_fn: Callable
  params: dict


# name -> builder(config) -> Tower, added by the module that owns the tower (`register`): the
# shapes world registers "shapes_aesthetic" in tdpo_jax.shapes.rewards (config.reward_modules),
# so this core module imports no world of its own.
_BUILDERS = {}


def register(name, builder):
  """Adds the tower `name` (one of `TOWERS`): `builder(config) -> Tower`."""
  check_name(name)
  _BUILDERS[name] = builder


def check_name(name):
  """Raises a one-line ValueError for an unknown `critic.tower`."""
  if name not in TOWERS:
    raise ValueError(f"unknown critic.tower {name!r}: expected one of {list(TOWERS)}")


def make_tower(config, pipeline):
  """The tower of `config.critic.tower`, or None when the pipeline has no image encoder and the
  default tower is asked for (DDPO needs none).

  Args:
    config: the run config (`critic.tower`, and what a registered tower's builder reads).
    pipeline: the `Pipeline` whose image encoder the "image_encoder" tower uses (pass the one
      with the frozen models' precision).
  """
  name = config.critic.tower
  check_name(name)
  if name != DEFAULT_TOWER:
    if name not in _BUILDERS:
      raise ValueError(f"critic.tower={name!r} is registered by a module that was not imported: "
                       "list it in config.reward_modules (the shapes world's: "
                       "'tdpo_jax.shapes.rewards')")
    return _BUILDERS[name](config)
  if pipeline.image_encoder is None:
    return None
  return Tower(
      lambda params, images: image_encoder_lib.embed_images(pipeline, params, images),
      pipeline.image_encoder_params)
