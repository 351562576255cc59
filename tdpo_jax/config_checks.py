"""The one up-front check of a run's config: every key's type, range and choice, named in one line.

`validate_config(config)` runs once per run (`train.run`, or `main` before the heavy imports and
then `train.run(..., validated=True)`), before any model is loaded or anything is written. It
raises a one-line ValueError naming the key, its value and what is expected.

This module imports nothing heavy (no jax, flax, transformers) at module level, so the command
line reports a bad config in well under a second instead of after 13-53 s of imports. The choice
lists the heavy modules need live here and those modules import them from here:
`train_step.REMAT_MODES`, `critic_tower.TOWERS`. Two checks import lazily, because their answer
lives only in a heavy module:
  * reward names (`config.reward`, `eval.rewards`): `tdpo_jax.rewards.check_name`, after
    importing `config.reward_modules`, because the registry grows at run time (those modules,
    `rewards.register`, a user's Python reward);
  * `log.wandb.enabled`: `import wandb` (only when enabled; not a dependency).
`PRECISIONS` mirrors the keys of `models.pipeline.PRECISIONS` (which maps them to dtypes and
needs jax.numpy); tests/test_config_checks.py checks that the two agree.
"""
import importlib
import math
import numbers
import os

from tdpo_jax import paths

ALGORITHMS = {
    # name: (use_critic, use_reset)
    "ddpo": (False, False),
    "tdpo": (True, False),
    "tdpo_r": (True, True),
    "grpo": (False, False),  # plus group-relative rewards (train.py's module docstring)
}
KL_MODES = ("none", "return_penalty", "gaussian")
RESET_TARGETS = ("active", "dormant")
# `precision.policy` / `precision.frozen` (models/pipeline.py maps each name to a dtype).
PRECISIONS = ("bfloat16", "float32")
# `train.remat` (train_step.py): "none", "unet" (one jax.checkpoint around the UNet call) or
# "blocks" (each down/mid/up block rematerialised).
REMAT_MODES = ("none", "unet", "blocks")
# `critic.tower` (critic_tower.py).
CRITIC_TOWERS = ("image_encoder", "shapes_aesthetic")


def samples_per_epoch(config):
  return config.sample.batch_size * config.sample.num_batches_per_epoch


def num_train_timesteps(config):
  """Timesteps trained per sample per epoch: int(T * timestep_fraction), as the official code."""
  return int(config.sample.num_steps * config.train.timestep_fraction)


def _get(config, key):
  node = config
  for name in key.split("."):
    if not hasattr(node, "keys") or name not in node:
      raise ValueError(f"the config has no key {key!r} (every key is declared in "
                       "configs/sd15.py)")
    node = node[name]
  return node


def _number(config, key, integer=False):
  """The value of dotted `key`, checked to be a finite real number (an int if `integer`)."""
  value = _get(config, key)
  kind = numbers.Integral if integer else numbers.Real
  if isinstance(value, bool) or not isinstance(value, kind):
    raise ValueError(f"{key}={value!r} must be {'an integer' if integer else 'a number'}")
  if not math.isfinite(value):
    raise ValueError(f"{key}={value!r} must be finite")
  return value


def _at_least(config, key, minimum, note="", integer=True):
  value = _number(config, key, integer=integer)
  if value < minimum:
    raise ValueError(f"{key}={value} must be >= {minimum}{note}")
  return value


def _positive(config, key, note=""):
  value = _number(config, key)
  if not value > 0:
    raise ValueError(f"{key}={value} must be > 0{note}")
  return value


def _in_range(config, key, low, high, *, low_open=False, high_open=False, note=""):
  value = _number(config, key)
  above = value > low if low_open else value >= low
  below = value < high if high_open else value <= high
  if not (above and below):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{key}={value} must be in {interval}{note}")
  return value


def _choice(config, key, choices):
  value = _get(config, key)
  if value not in choices:
    raise ValueError(f"unknown {key} {value!r}: expected one of {sorted(choices)}")
  return value


def check_ranges(config):
  """Every numeric key's type and range (no imports, no files)."""
  _at_least(config, "num_epochs", 1)
  _number(config, "seed", integer=True)
  num_devices = _number(config, "num_devices", integer=True)
  if num_devices != -1 and num_devices < 1:
    raise ValueError(f"num_devices={num_devices} must be -1 (every device) or >= 1")
  # sample
  _at_least(config, "sample.num_steps", 1)
  _in_range(config, "sample.eta", 0.0, 1.0, low_open=True,
            note=" (the DDIM step's std is eta sigma_t: its log-probability, which the policy "
                 "gradient needs, is undefined at eta = 0)")
  _number(config, "sample.guidance_scale")
  _at_least(config, "sample.height", 1)
  _at_least(config, "sample.width", 1)
  _at_least(config, "sample.batch_size", 1, " (global images per rollout call)")
  _at_least(config, "sample.num_batches_per_epoch", 1)
  _at_least(config, "sample.group_size", 0, " (0 = prompts drawn independently)")
  # train
  _at_least(config, "train.batch_size", 1, " (global transitions per micro-batch)")
  _at_least(config, "train.gradient_accumulation_steps", 1)
  _in_range(config, "train.timestep_fraction", 0, 1, low_open=True)
  _positive(config, "train.learning_rate")
  _positive(config, "train.critic_learning_rate")
  _in_range(config, "train.adam_beta1", 0, 1, high_open=True)
  _in_range(config, "train.adam_beta2", 0, 1, high_open=True)
  _at_least(config, "train.adam_weight_decay", 0, integer=False)
  _at_least(config, "train.adam_epsilon", 0, integer=False)
  _positive(config, "train.max_grad_norm", " (gradients are clipped to this global norm)")
  _positive(config, "train.clip_range", " (the PPO ratio is clipped to [1 - c, 1 + c])")
  _positive(config, "train.value_clip_range",
            " (values move at most this far from V_old per epoch)")
  _at_least(config, "train.value_coef", 0, integer=False)
  _at_least(config, "train.adv_eps", 0, integer=False)
  _at_least(config, "train.kl_coef", 0, integer=False)
  # lora
  if _get(config, "lora.enabled"):
    _at_least(config, "lora.rank", 1)
    _number(config, "lora.alpha")
  # critic
  hidden_sizes = tuple(_get(config, "critic.hidden_sizes"))
  dropout_rates = tuple(_get(config, "critic.dropout_rates"))
  if not hidden_sizes or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1
                             for w in hidden_sizes):
    raise ValueError(f"critic.hidden_sizes={hidden_sizes} must be a non-empty tuple of "
                     "integers >= 1")
  if len(dropout_rates) != len(hidden_sizes) or any(
      isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 <= r < 1
      for r in dropout_rates):
    raise ValueError(f"critic.dropout_rates={dropout_rates} must hold one rate in [0, 1) per "
                     f"hidden layer (critic.hidden_sizes={hidden_sizes})")
  _at_least(config, "critic.init_std", 0, " (0 = 1/(d+1))", integer=False)
  _at_least(config, "critic.embed_chunk_size", 0, " (0 = every state in one call)")
  _at_least(config, "critic.embed_branches", 1)
  _in_range(config, "critic.late_fraction", 0, 1, low_open=True)
  # stats
  buffer_size = _at_least(config, "stats.buffer_size", 1)
  min_count = _at_least(config, "stats.min_count", 0)
  if min_count > buffer_size:
    raise ValueError(f"stats.min_count={min_count} must be <= stats.buffer_size={buffer_size} "
                     "(a prompt's buffer never holds more)")
  _at_least(config, "stats.eps", 0, integer=False)
  # reset
  _at_least(config, "reset.period", 1)
  _at_least(config, "reset.tau", 0, " (neurons with score <= tau are dormant)", integer=False)
  _at_least(config, "reset.probe_size", 1)
  # checkpoint, log, eval
  _at_least(config, "checkpoint.every_epochs", 0, " (0 = only at the end and on SIGTERM)")
  _at_least(config, "checkpoint.max_to_keep", 0, " (0 = keep all)")
  if _at_least(config, "log.image_grid_every", 0, " (0 = no image grids)"):
    _at_least(config, "log.num_grid_images", 1, " when log.image_grid_every > 0")
  _at_least(config, "eval.every", 0, " (0 = no evaluation)")
  _at_least(config, "eval.num_prompts", 0, " (0 = the whole held-out set)")
  _number(config, "eval.seed", integer=True)


def check_choices(config):
  """The keys that name one of a fixed set of choices (reward names: `check_reward_names`)."""
  _choice(config, "algorithm", ALGORITHMS)
  _choice(config, "train.kl_mode", KL_MODES)
  _choice(config, "reset.target", RESET_TARGETS)
  _choice(config, "precision.policy", PRECISIONS)
  _choice(config, "precision.frozen", PRECISIONS)
  _choice(config, "train.remat", REMAT_MODES)
  _choice(config, "critic.tower", CRITIC_TOWERS)


def check_batches(config):
  """How the epoch's samples split into groups, micro-batches and optimizer steps."""
  if num_train_timesteps(config) < 1:
    raise ValueError(
        f"sample.num_steps * train.timestep_fraction = {config.sample.num_steps} * "
        f"{config.train.timestep_fraction} must be >= 1 (int() of it is the timesteps trained)")
  total = samples_per_epoch(config)
  group_size = config.sample.group_size
  if config.algorithm == "grpo" and group_size < 2:
    raise ValueError(f"sample.group_size={group_size} must be >= 2 for algorithm 'grpo' (the "
                     "samples of one prompt that its rewards are standardised among) and >= 0 "
                     "otherwise (0 = prompts drawn independently)")
  if group_size and total % group_size:
    raise ValueError(f"sample.group_size={group_size} does not divide the {total} samples per "
                     f"epoch (sample.batch_size={config.sample.batch_size} x "
                     f"sample.num_batches_per_epoch={config.sample.num_batches_per_epoch})")
  if total % config.train.batch_size:
    raise ValueError(
        f"train.batch_size={config.train.batch_size} does not divide the {total} samples per "
        f"epoch (sample.batch_size={config.sample.batch_size} x "
        f"sample.num_batches_per_epoch={config.sample.num_batches_per_epoch})")
  micro_batches = num_train_timesteps(config) * total // config.train.batch_size
  if micro_batches % config.train.gradient_accumulation_steps:
    raise ValueError(
        f"train.gradient_accumulation_steps={config.train.gradient_accumulation_steps} does not "
        f"divide the {micro_batches} micro-batches per epoch (train timesteps x samples / "
        f"train.batch_size)")


def check_eval(config):
  """`config.eval` (cross-reward evaluation) beyond its ranges; reward names are checked by
  `check_reward_names`. Reads the held-out prompt file (prompts.py imports only numpy)."""
  from tdpo_jax import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  c = config.eval
  if not c.every:
    return
  if isinstance(c.rewards, str) or not c.rewards:
    raise ValueError(f"eval.rewards={c.rewards!r} must be a non-empty tuple of reward names")
  if len(set(c.rewards)) != len(c.rewards):
    raise ValueError(f"eval.rewards={tuple(c.rewards)} names a reward twice")
  minimum = 2 if c.diversity else 1
  if c.samples_per_prompt < minimum:
    raise ValueError(f"eval.samples_per_prompt={c.samples_per_prompt} must be >= {minimum}"
                     + (" (diversity compares pairs of samples)" if c.diversity else ""))
  available = len(prompts_lib.load_prompts(c.prompts))  # raises for an unknown set
  if not 0 <= c.num_prompts <= available:
    raise ValueError(f"eval.num_prompts={c.num_prompts} must be in [0, {available}], the size "
                     f"of the held-out set {c.prompts!r} (0 = all of it)")


def import_wandb():
  """The `wandb` module, or a one-line ValueError with the install command."""
  try:
    return importlib.import_module("wandb")
  except ImportError as error:
    raise ValueError("config.log.wandb.enabled is True but the wandb package is not "
                     "installed; run `pip install wandb` or set "
                     "--config.log.wandb.enabled=False") from error


def check_wandb(config):
  """W&B on but not installed: a one-line error at startup."""
  if config.log.wandb.enabled:
    import_wandb()


def check_reward_names(config):
  """`config.reward` and `eval.rewards` name known rewards.

  Lazy import (the one heavy import of the validation): the reward registry lives in
  `tdpo_jax.rewards`, which imports jax and the reward models' code, and can grow at run time
  (`rewards.register`), so the names cannot be listed here.
  """
  from tdpo_jax import rewards  # pylint: disable=import-outside-toplevel
  rewards.import_reward_modules(config.reward_modules)  # they register their rewards
  rewards.check_name(config.reward)
  if config.eval.every:
    for name in config.eval.rewards:
      try:
        rewards.check_name(name)
      except ValueError as error:
        raise ValueError(f"eval.rewards: {error}") from None


def check_workdir(workdir):
  """Raises a one-line ValueError when `workdir` cannot hold a run: it is a file, or it (or the
  nearest existing folder above it) is not a writable folder (a read-only filesystem, no
  permission). Creates nothing.

  A non-local workdir (`gs://bucket/run`, any scheme of `paths.REMOTE_PREFIXES`) is checked by
  its form only (a scheme epath serves and a bucket name), without touching the local filesystem
  or the network: the first write reports a missing bucket or permission. Another `scheme://` is
  an error (it would become a local folder named `scheme:`).
  """
  if not workdir:
    raise ValueError("--workdir is empty; expected a folder for metrics, images and checkpoints")
  if "://" in workdir:
    _check_remote_workdir(workdir)
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"workdir {workdir!r} is a file, not a folder; use a new --workdir")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"workdir {workdir!r} cannot be created: {existing!r} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    reason = "a read-only filesystem" if _read_only(existing) else "no write permission"
    raise ValueError(f"workdir {workdir!r} is not writable: {existing!r} is on {reason}")


def _check_remote_workdir(workdir):
  scheme = workdir.split("://", 1)[0]
  if not workdir.startswith(paths.REMOTE_PREFIXES):
    raise ValueError(f"workdir {workdir!r}: scheme {scheme!r}:// is not supported; expected a "
                     f"local folder or one of {', '.join(paths.REMOTE_PREFIXES)}")
  if not workdir.split("://", 1)[1].strip("/"):
    raise ValueError(f"workdir {workdir!r} names no bucket; expected {scheme}://BUCKET/FOLDER")


def _read_only(path):
  try:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    return False


def validate_config(config):
  """Checks the whole config before anything is loaded or written; raises a one-line ValueError
  naming the key. The checks that need no import come first, so they answer at once."""
  check_ranges(config)
  check_choices(config)
  check_batches(config)
  check_eval(config)
  check_wandb(config)
  check_reward_names(config)
