"""The reward registry: reward name -> `reward_fn(images, prompts) -> (B,)`.

Shape legend: B batch, H/W image height/width. Images are NHWC float in [0, 1] (NumPy or JAX
arrays), prompts a sequence of B strings; every reward returns (B,) float32.

Two kinds of entries:
  * function rewards (`register(name, reward_fn)`): a ready Python reward (the JPEG rewards, a
    host reward, a user's function);
  * model rewards (`register_model_reward(name, builder, keys)`): built from weights whose
    locations are config values, `builder(**{key: config_rewards[name][key]}, cache_dir)`.
A registered function reward shadows a model reward of the same name.

This module imports no reward: the package (`tdpo_jax/rewards/__init__.py`) registers the
built-in ones, and any other module registers its own when it is imported (the shapes world:
`tdpo_jax.shapes.rewards`). Entry points import the modules a config names in
`config.reward_modules` (`import_reward_modules`) before they check or build a reward.
"""
import dataclasses
import functools
import importlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax.models import pipeline as pipeline_lib


@dataclasses.dataclass(frozen=True)
class ModelReward:
  """How `make_reward_fn` builds a model reward from `config_rewards[name]`.

  builder: `builder(**values, cache_dir=...) -> reward_fn`, `values` = the section's `keys`.
  keys: the keys read from `config_rewards[name]` (all required).
  directory_keys: those naming a transformers model directory or a hub id "org/name"
    (downloaded into cache_dir, or the hub cache; "" stays "", the builder's default).
  hub_patterns: the files a hub id downloads (None: a CLIP model's,
    `pipeline.CLIP_HUB_PATTERNS`).
  """
  builder: Callable
  keys: tuple
  directory_keys: tuple = ()
  hub_patterns: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceReward:
  """A model reward as pure, jittable math and its parameters.

  The trainer and the evaluation score it in a jitted kernel whose images are split over the
  mesh's batch devices and whose parameters are placed by the sharding rules
  (`kernels.reward_scorer`); calling the object scores on the default device (scripts, tests).
  Only rewards that must run in Python (JPEG, the shapes gold detector, the PyTorch ImageReward)
  are plain functions.

  Attributes:
    score_fn: `score_fn(params, images (B, H, W, 3) float32 in [0, 1], *prompt_inputs) -> (B,)`,
      pure; each prompt input has leading dim B.
    params: its parameter pytree.
    encode_prompts: `encode_prompts(prompts (B strings)) -> tuple of (B, ...) host arrays` (token
      ids, masks), or None for an image-only reward.
  """
  score_fn: Callable
  params: Any
  encode_prompts: Callable | None = None

  def prompt_inputs(self, prompts, count):
    """The host prompt inputs of `count` images: () for an image-only reward."""
    if self.encode_prompts is None:
      return ()
    prompts = list(prompts)
    if len(prompts) != count:
      raise ValueError(f"got {len(prompts)} prompts for {count} images; expected one prompt "
                       "per image")
    return tuple(self.encode_prompts(prompts))

  @functools.cached_property
  def jit_score(self):
    return jax.jit(self.score_fn)

  def __call__(self, images, prompts=None):
    """(B,) float32 scores on the default device."""
    inputs = self.prompt_inputs(prompts, images.shape[0])
    return np.asarray(self.jit_score(self.params, jnp.asarray(images, jnp.float32), *inputs),
                      np.float32)


_FUNCTION_REWARDS = {}
_MODEL_REWARDS = {}


def register(name, reward_fn):
  """Adds `reward_fn(images, prompts) -> (B,)` under `name` (e.g. a user's Python reward)."""
  _FUNCTION_REWARDS[name] = reward_fn


def register_model_reward(name, builder, keys, *, directory_keys=(), hub_patterns=None):
  """Adds the model reward `name`, built by `make_reward_fn(name, config.rewards)`.

  Args:
    name: the reward name (`config.reward`, `config.eval.rewards`).
    builder: `builder(**{key: config_rewards[name][key] for key in keys}, cache_dir) ->
      reward_fn(images, prompts) -> (B,)`.
    keys: the keys of the config section `config.rewards.<name>` passed to `builder`.
    directory_keys: the subset of `keys` that names a transformers model directory or hub id.
    hub_patterns: the files such a hub id downloads (None: `pipeline.CLIP_HUB_PATTERNS`).
  """
  unknown = [key for key in directory_keys if key not in keys]
  if unknown:
    raise ValueError(f"reward {name!r}: directory key {unknown[0]!r} is not one of its keys "
                     f"{tuple(keys)}")
  _MODEL_REWARDS[name] = ModelReward(builder, tuple(keys), tuple(directory_keys),
                                     None if hub_patterns is None else tuple(hub_patterns))


def import_reward_modules(module_names):
  """Imports each module of `module_names` (`config.reward_modules`), which registers its rewards.

  Args:
    module_names: a sequence of dotted module names, e.g. ("tdpo_jax.shapes.rewards",).
  Raises:
    ValueError (one line): a module that does not exist.
  """
  if isinstance(module_names, str):
    raise ValueError(f"reward_modules={module_names!r} must be a tuple of module names, e.g. "
                     "('tdpo_jax.shapes.rewards',)")
  for module_name in module_names:
    try:
      importlib.import_module(module_name)
    except ModuleNotFoundError as error:
      if error.name is None or not (module_name == error.name
                                    or module_name.startswith(error.name + ".")):
        raise  # the module exists but one of its own imports is missing
      raise ValueError(f"reward_modules: no module named {module_name!r}; expected an importable "
                       "module that registers rewards, e.g. 'tdpo_jax.shapes.rewards'") from None


def available():
  """All registered reward names: function and model rewards."""
  return sorted(set(_FUNCTION_REWARDS) | set(_MODEL_REWARDS))


def _unknown(name):
  return ValueError(f"unknown reward {name!r}: expected one of {available()} (a module's own "
                    "rewards are registered when it is imported: list it in config.reward_modules)")


def check_name(name):
  """Raises a one-line ValueError for a name that is neither registered nor a model reward.

  Names registered by other modules (`config.reward_modules`) are known only after
  `import_reward_modules`.
  """
  if name not in _FUNCTION_REWARDS and name not in _MODEL_REWARDS:
    raise _unknown(name)


def get(name):
  """The registered function reward `name` (model rewards: use `make_reward_fn`)."""
  if name in _FUNCTION_REWARDS:
    return _FUNCTION_REWARDS[name]
  if name in _MODEL_REWARDS:
    raise ValueError(f"reward {name!r} is a model reward; build it with "
                     f"make_reward_fn({name!r}, config.rewards), not get()")
  raise _unknown(name)


def make_reward_fn(name, config_rewards=None, cache_dir=""):
  """`reward_fn(images, prompts) -> (B,)` for any registered reward name.

  Args:
    name: a reward name (`available()`).
    config_rewards: the `config.rewards` ConfigDict (or dict); model rewards read their weight
      locations from `config_rewards[name]` (the `keys` they were registered with). Unused for
      function rewards, which take precedence (a function reward shadows a model reward).
    cache_dir: root for converted weights ("" = next to the originals).
  Returns:
    reward_fn(images (B, H, W, 3) in [0, 1], prompts) -> (B,) float32.
  """
  if name in _FUNCTION_REWARDS:
    return _FUNCTION_REWARDS[name]
  check_name(name)
  if config_rewards is None or name not in config_rewards:
    raise ValueError(f"reward {name!r} needs its weight locations in config.rewards.{name}; "
                     "got no such config section")
  entry = _MODEL_REWARDS[name]
  section = config_rewards[name]
  missing = [key for key in entry.keys if key not in section]
  if missing:
    raise ValueError(f"config.rewards.{name} has no {missing[0]!r}; expected the keys "
                     f"{', '.join(entry.keys)}")
  values = {key: section[key] for key in entry.keys}
  patterns = (pipeline_lib.CLIP_HUB_PATTERNS if entry.hub_patterns is None
              else list(entry.hub_patterns))
  for key in entry.directory_keys:
    if values[key]:
      values[key] = pipeline_lib.resolve_model_spec(values[key], cache_dir=cache_dir,
                                                    allow_patterns=patterns)
  return entry.builder(**values, cache_dir=cache_dir)
