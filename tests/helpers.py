"""Shared test helpers: the tiny config, shrunk further where a test needs speed."""
import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny_config overrides for tests that compare two computations of the same update (accumulated
# vs concatenated micro-batches, fused vs scanned, remat vs not, TDPO with a zero critic vs
# DDPO): critic dropout off (its masks depend on the split) and Adam's eps 1e-6 instead of 1e-8
# (the first Adam step is lr g / (|g| + eps): float rounding in a gradient entry of size ~1e-8
# flipped that entry's update by ~0.15 lr on one machine; with eps 1e-6 such noise moves a
# parameter by < 1e-3 lr). Shared, so these tests share one Trainer (`shared_trainer`).
EXACT = {"algorithm": "tdpo", "critic.dropout_rates": (0.0, 0.0, 0.0, 0.0),
         "train.adam_epsilon": 1e-6}


def load_config(name="tiny", arg=None):
  """`tdpo_jax/configs/<name>.py`'s get_config(arg): what `--config=configs/<name>.py:arg` loads."""
  return importlib.import_module(f"tdpo_jax.configs.{name}").get_config(arg)


def load_script(relative_path, name):
  """A script of the repo (e.g. "benchmarks/critic_fit.py") imported as module `name`, with its
  folder on sys.path while it loads, as `python benchmarks/x.py` has it (for
  benchmarks/alternation.py)."""
  path = os.path.join(REPO, relative_path)
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.dirname(path))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(os.path.dirname(path))
  return module


def tiny_config(cache_dir, **overrides):
  """configs/tiny.py with the model cached under `cache_dir`, progress bars off.

  Runs on ONE of conftest's 8 fake CPU devices (`num_devices=1`) unless the test overrides
  `num_devices`/`mesh`: tiny's batch sizes (4 images, micro-batch 2) do not split over 8.
  """
  config = load_config("tiny")
  config.pretrained.cache_dir = str(cache_dir)
  config.log.progress = False
  config.num_devices = 1
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def tiny_rollout_inputs(cache_dir, num_prompts=4):
  """The tiny pipeline and the inputs of one rollout of the first `num_prompts` simple_animals.

  Returns:
    (config, pipeline, `RolloutParams` of the pre-trained model, input_ids, uncond_ids)
  """
  from tdpo_jax import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from tdpo_jax import rollout  # pylint: disable=import-outside-toplevel
  from tdpo_jax.models import pipeline as pipeline_lib  # pylint: disable=import-outside-toplevel
  config = tiny_config(cache_dir)
  pipeline = pipeline_lib.load_pipeline(config.pretrained.model,
                                        cache_dir=config.pretrained.cache_dir,
                                        tiny_spec=config.pretrained.tiny)
  params = rollout.RolloutParams(unet=pipeline.unet_params,
                                 text_encoder=pipeline.text_encoder_params,
                                 vae=pipeline.vae_params)
  prompts = list(prompts_lib.load_prompts("simple_animals")[:num_prompts])
  input_ids, uncond_ids = rollout.tokenize_prompts(pipeline, prompts)
  return config, pipeline, params, input_ids, uncond_ids


def prepare_epoch(trainer, state, frozen, trajectory, prompt_index):
  """The sampled epoch's rewards and the trainer's `prepare` kernel on them, called as
  `Trainer.run_epoch` calls it (the same compiled executable).

  Returns:
    (host rewards (N,) float32, `prepare`'s (normaliser, batches, probe, metrics)).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tdpo_jax import sharding  # pylint: disable=import-outside-toplevel
  reward = np.asarray(trainer.score_reward(trajectory.images,
                                           [trainer.prompts[i] for i in prompt_index]),
                      np.float32)
  host_inputs = sharding.replicate_host((np.asarray(prompt_index, np.int32), reward),
                                        trainer.mesh)
  return reward, trainer.kernels.prepare(state, frozen, trajectory, *host_inputs)


def epoch_batches(trainer, state, frozen, trajectory, prompt_index):
  """The phases of `epoch.prepare` done one by one, eagerly, with the transitions gathered by
  Python loops over the documented timestep-outer order (an independent reference for the
  `prepare` kernel). Returns the epoch's `TransitionBatch` with leading dims (S, k, M)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tdpo_jax import config_checks  # pylint: disable=import-outside-toplevel
  from tdpo_jax import epoch  # pylint: disable=import-outside-toplevel
  from tdpo_jax import objectives  # pylint: disable=import-outside-toplevel
  from tdpo_jax import stats  # pylint: disable=import-outside-toplevel
  from tdpo_jax import train_step as train_step_lib  # pylint: disable=import-outside-toplevel
  config, models = trainer.config, trainer.models
  prompts = [trainer.prompts[i] for i in prompt_index]
  reward = trainer.reward_fn(np.asarray(trajectory.images), prompts)
  _, normalised = stats.normalise(state.normaliser, jnp.asarray(prompt_index), jnp.asarray(reward),
                                  min_count=config.stats.min_count, eps=config.stats.eps,
                                  per_prompt=config.stats.per_prompt)
  returns = np.broadcast_to(np.asarray(normalised)[:, None], trajectory.log_probs.shape)
  embeds = np.asarray(trainer.embed_states(frozen, trajectory))  # (N, T, d)
  values = np.asarray(models.critic.apply({"params": state.critic_params},
                                          embeds.reshape(-1, models.embed_dim),
                                          deterministic=True)).reshape(returns.shape)
  advantages = np.asarray(objectives.advantages(jnp.asarray(returns), jnp.asarray(values)))
  num_steps = config.sample.num_steps
  sample_index, step_index = (np.asarray(x) for x in epoch.train_indices(
      state.rng, int(state.epoch), len(prompt_index), num_steps,
      config_checks.num_train_timesteps(config)))
  host = jax.tree.map(np.asarray, trajectory)
  rows = {name: [] for name in train_step_lib.TransitionBatch.__dataclass_fields__}
  for j in range(sample_index.shape[0]):  # pass-major: pass j, then the samples in order
    for i in range(sample_index.shape[1]):
      s, t = sample_index[j, i], step_index[j, i]
      rows["latents"].append(host.latents[s, t])
      rows["next_latents"].append(host.latents[s, t + 1])
      rows["timesteps"].append(host.timesteps[s, t])
      rows["old_log_probs"].append(host.log_probs[s, t])
      rows["advantages"].append(advantages[s, t])
      rows["returns"].append(returns[s, t])
      rows["old_values"].append(values[s, t])
      rows["embeds"].append(embeds[s, t])
      rows["prompt_embeds"].append(host.prompt_embeds[s])
  micro, accum = config.train.batch_size, config.train.gradient_accumulation_steps
  stack = lambda x: np.stack(x).reshape((-1, accum, micro) + np.shape(x[0]))
  return train_step_lib.TransitionBatch(**{name: stack(x) for name, x in rows.items()})


_TRAINERS = {}


def shared_trainer(config):
  """A `train.Trainer` for `config`, built once per test process and shared by every test (and
  test file) that asks for the same config: its pipeline and compiled kernels then serve them
  all (building and compiling is most of a tiny test's time). Configs that differ only in
  `train.RUN_ONLY_KEY_PATTERNS` share one (`trainer.config` is the first caller's: a test that
  runs a workdir passes its own config to `train.run`). Callers take fresh states from
  `init_state()` (the kernels donate theirs) and never mutate the trainer; `train.run(...,
  trainer=shared_trainer(config))` runs a workdir with it.
  """
  import fnmatch  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  from tdpo_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from tdpo_jax import train  # pylint: disable=import-outside-toplevel
  # Keyed by what a Trainer reads: configs that differ only in run-only keys (num_epochs, log,
  # eval, checkpoint) share one; its `config` is the first caller's.
  key = json.dumps({k: v for k, v in checkpoint.flatten(checkpoint.config_to_dict(config)).items()
                    if not any(fnmatch.fnmatchcase(k, p) for p in train.RUN_ONLY_KEY_PATTERNS)},
                   sort_keys=True, default=repr)
  if key not in _TRAINERS:
    _TRAINERS[key] = train.Trainer(config)
  return _TRAINERS[key]


def flat(tree):
  """Every leaf of `tree`, raveled and concatenated, as one float64 vector."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def relative_error(actual, expected):
  """|x - y| / |y| in Frobenius norm, with float64 sums."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  x, y = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert x.shape == y.shape, (x.shape, y.shape)
  return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def row_relative_errors(actual, expected):
  """|x_i - y_i| / |y_i| for every row i of two (N, D) arrays, with float64 sums: the bound for
  per-sample embeddings of deep random-weight networks, whose float32 rounding differs with
  the batch split and the CPU."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  x, y = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert x.shape == y.shape and x.ndim == 2, (x.shape, y.shape)
  return np.linalg.norm(x - y, axis=1) / np.maximum(np.linalg.norm(y, axis=1), 1e-30)
