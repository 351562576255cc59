"""Shared test helpers: the tiny config, shrunk further where a test needs speed."""
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name="tiny", arg=None):
  """`configs/<name>.py`'s get_config(arg), loaded by path as `main.py` does."""
  return load_script(os.path.join("configs", f"{name}.py"), f"config_{name}").get_config(arg)


def load_script(relative_path, name):
  """A script of the repo (e.g. "benchmarks/critic_fit.py") imported as module `name`."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
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


def epoch_batches(trainer, state, frozen, trajectory, prompt_index, epoch=0):
  """The pre-training phases of `Trainer.run_epoch` (reward, normalise, critic values,
  advantages), returning the epoch's `TransitionBatch` with leading dims (S, k, M)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tdpo_jax import objectives  # pylint: disable=import-outside-toplevel
  prompts = [trainer.prompts[i] for i in prompt_index]
  reward = trainer.reward_fn(np.asarray(trajectory.images), prompts)
  _, normalised = trainer.jit_normalise(state.normaliser, prompt_index, reward)
  returns = jnp.broadcast_to(normalised[:, None], trajectory.log_probs.shape)
  embeds = trainer.embed_states(frozen, trajectory)
  values = trainer.jit_values(state.critic_params, embeds.reshape(-1, trainer.embed_dim))
  values = values.reshape(returns.shape)
  advantages = objectives.advantages(returns, values)
  return trainer.transitions(trajectory, embeds, advantages, returns, values, epoch)
