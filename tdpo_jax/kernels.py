"""Every jitted kernel of training, declared in one place with its shardings and donation.

The math is in `epoch.py`, `rollout.py`, `train_step.py`, `reset.py`; this module only binds it
to the mesh. Shapes: B sample batch, L prompt tokens, D text width, N samples per epoch, T DDIM
steps, S optimizer steps of k micro-batches of M transitions, d critic embedding width, P probe
states. "rows" shards the leading dim over the batch devices (data x fsdp); "rules" places a
parameter tree by `config.sharding.rules` (sharding.py); "repl" is replicated.

  kernel        arguments -> outputs                                   shardings (in -> out)
  encode_text   text_encoder, ids (B, L) -> (B, L, D)                  inferred
  sample_key    rng, epoch, batch -> key                               -> repl
  rollout       RolloutParams, ids (B, L), uncond ids (1, L), key      rules, rows, repl, repl
                -> Trajectory (leading dim B)                          -> rows (uncond: repl)
  rollout_kl    the rollout's arguments, reference UNet                rules, rows, repl, repl,
                -> Trajectory, path KL to the reference (B,)           rules -> rows, rows
                (the evaluation's `kl_to_pretrained`)
  merge         base UNet, policy params -> UNet (LoRA merged)         -> rules (frozen UNet)
  init_state    base UNet, seed -> TrainState                          rules, repl -> rules
  prepare       state, frozen, Trajectory (N), prompt ids (N),         inferred
                reward (N) -> normaliser, TransitionBatch (S, k, M),   -> rules, M over batch
                probe (P, d), metrics                                     devices, repl, repl
  train_step    state, frozen, TransitionBatch (k, M), key             rules, rules, M, repl
                -> state, metrics                                      -> rules, repl; donates state
  train_epoch   state, frozen, TransitionBatch (S, k, M)               rules, rules, M
                -> state, metrics (S,)                                 -> rules, repl; donates state
  embed_states  frozen, latents (N, T, C, h, w) -> (N, T, d)           inferred
  dormant       critic params, probe (P, d) -> metrics                 inferred
  reset         state, probe -> state, metrics                         rules, repl -> rules, repl;
                                                                       donates state
  reward        reward params, images (B, H, W, 3), prompt inputs      rules, rows, rows -> rows
                (B, ...) -> (B,)   (`reward_scorer`, one per model reward: rewards.DeviceReward)
The trainer (train.py), the evaluation (evaluation.py, through the trainer's sampler),
`benchmarks/epoch.py` (AOT lowering: `lower_epoch`) and `benchmarks/memory.py` all use these.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax import config_checks
from tdpo_jax import epoch as epoch_lib
from tdpo_jax import policy
from tdpo_jax import rewards
from tdpo_jax import rollout
from tdpo_jax import sharding as sharding_lib
from tdpo_jax import train_step as train_step_lib
from tdpo_jax.models import pipeline as pipeline_lib


@dataclasses.dataclass(frozen=True)
class Shardings:
  """The shardings the kernels are declared with.

  Attributes:
    replicated: the whole mesh, no split.
    rows: the leading dim over the batch devices (data x fsdp).
    frozen: `FrozenParams` by the sharding rules.
    state: `TrainState` by the sharding rules.
    transition: a `TransitionBatch` (k, M, ...) with M over the batch devices.
    batches: a `TransitionBatch` (S, k, M, ...) with M over the batch devices.
  """
  replicated: Any
  rows: Any
  frozen: Any
  state: Any
  transition: Any
  batches: Any


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The jitted kernels (module docstring) and the pure train step they are built from."""
  shardings: Shardings
  train_step_fn: Callable  # pure: train_step(state, frozen, batch, rng) -> (state, metrics)
  encode_text: Callable
  sample_key: Callable
  rollout: Callable
  rollout_kl: Callable
  merge: Callable
  init_state: Callable
  prepare: Callable
  train_step: Callable
  train_epoch: Callable
  embed_states: Callable | None  # None without a critic tower
  dormant: Callable
  reset: Callable


def frozen_tree(models, text_encoder_params, uncond_embeds):
  """`FrozenParams` of the models' pipeline (arrays or `jax.ShapeDtypeStruct`s)."""
  pipeline = models.policy_pipeline
  return train_step_lib.FrozenParams(
      unet=pipeline.unet_params, text_encoder=text_encoder_params, vae=pipeline.vae_params,
      image_encoder=models.tower.params if models.tower is not None else None,
      uncond_embeds=uncond_embeds)


def make_kernels(config, mesh, models, num_prompts, uncond_ids):
  """Declares every kernel of `config` on `mesh` (nothing is compiled until first called).

  Args:
    config: the run config.
    mesh: the device mesh (sharding.make_mesh).
    models: `epoch.EpochModels` (their pipeline's params may be abstract).
    num_prompts: the rows of the per-prompt normaliser.
    uncond_ids: (1, L) int32 token ids of the empty prompt (or their ShapeDtypeStruct).
  """
  rules = config.sharding.rules
  pipeline = models.policy_pipeline
  replicated = sharding_lib.replicated(mesh)
  rows = sharding_lib.batch_sharding(mesh)
  encode_text = jax.jit(lambda params, ids: pipeline_lib.encode_text(pipeline, params, ids))
  uncond_embeds = jax.eval_shape(encode_text, pipeline.text_encoder_params,
                                 jax.ShapeDtypeStruct(uncond_ids.shape, jnp.int32))
  frozen_shardings = sharding_lib.tree_shardings(
      mesh, rules, frozen_tree(models, pipeline.text_encoder_params, uncond_embeds))
  init_fn = functools.partial(epoch_lib.init_state, config, models.critic, models.embed_dim,
                              num_prompts)
  seed = jax.ShapeDtypeStruct((), jnp.int32)
  state_shardings = sharding_lib.tree_shardings(
      mesh, rules, jax.eval_shape(init_fn, pipeline.unet_params, seed))
  shardings = Shardings(
      replicated=replicated, rows=rows, frozen=frozen_shardings, state=state_shardings,
      transition=sharding_lib.batch_sharding(mesh, axis=1),
      batches=sharding_lib.batch_sharding(mesh, axis=2))

  rollout_shardings = rollout.RolloutParams(
      unet=frozen_shardings.unet, text_encoder=frozen_shardings.text_encoder,
      vae=frozen_shardings.vae)
  trajectory_shardings = rollout.Trajectory(
      latents=rows, log_probs=rows, timesteps=rows, prompt_embeds=rows,
      uncond_embeds=replicated, images=rows)
  use_critic = config_checks.ALGORITHMS[config.algorithm][0]
  train_step_fn = train_step_lib.make_train_step(pipeline, models.critic, config,
                                                 use_critic=use_critic)
  chunk, branches = int(config.critic.embed_chunk_size), int(config.critic.embed_branches)
  embed_states = None
  if models.tower is not None:
    embed_states = jax.jit(
        lambda frozen, latents: epoch_lib.embed_states(models, frozen, latents, chunk, branches))
  return Kernels(
      shardings=shardings,
      train_step_fn=train_step_fn,
      encode_text=encode_text,
      sample_key=jax.jit(epoch_lib.sample_key, out_shardings=replicated),
      rollout=jax.jit(rollout.make_rollout_fn(pipeline, config.sample),
                      in_shardings=(rollout_shardings, rows, replicated, replicated),
                      out_shardings=trajectory_shardings),
      rollout_kl=jax.jit(rollout.make_path_kl_rollout_fn(pipeline, config.sample),
                         in_shardings=(rollout_shardings, rows, replicated, replicated,
                                       frozen_shardings.unet),
                         out_shardings=(trajectory_shardings, rows)),
      merge=jax.jit(lambda base, params: policy.unet_params(config.lora, base, params),
                    out_shardings=frozen_shardings.unet),
      init_state=jax.jit(init_fn, in_shardings=(frozen_shardings.unet, replicated),
                         out_shardings=state_shardings),
      prepare=jax.jit(functools.partial(epoch_lib.prepare, config, models),
                      out_shardings=(state_shardings.normaliser, shardings.batches, replicated,
                                     replicated)),
      train_step=jax.jit(train_step_fn,
                         in_shardings=(state_shardings, frozen_shardings, shardings.transition,
                                       replicated),
                         out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      train_epoch=jax.jit(functools.partial(epoch_lib.train_epoch, train_step_fn),
                          in_shardings=(state_shardings, frozen_shardings, shardings.batches),
                          out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
      embed_states=embed_states,
      dormant=jax.jit(functools.partial(epoch_lib.dormant_fractions, config, models)),
      reset=jax.jit(functools.partial(epoch_lib.reset_critic, config, models),
                    in_shardings=(state_shardings, replicated),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,)),
  )


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def abstract_epoch_inputs(kernels, config, state, frozen, uncond_ids):
  """Abstract (shape, dtype, sharding) inputs of one epoch's kernels; nothing is computed.

  Returns:
    dict with "rollout" (the args of one sample batch's rollout), "prepare", "train_epoch",
    "probe" (the reset's probe) and "state" (the abstract state).
  """
  batch, num_batches = config.sample.batch_size, config.sample.num_batches_per_epoch
  ids = jax.ShapeDtypeStruct((batch, uncond_ids.shape[1]), jnp.int32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  params = jax.eval_shape(
      lambda unet, policy_params: rollout.RolloutParams(
          unet=policy.unet_params(config.lora, unet, policy_params),
          text_encoder=frozen.text_encoder, vae=frozen.vae), frozen.unet, state.policy_params)
  uncond = jax.ShapeDtypeStruct(uncond_ids.shape, jnp.int32)
  one = jax.eval_shape(kernels.rollout, params, ids, uncond, key)
  trajectory = jax.eval_shape(lambda *t: jax.tree.map(lambda *x: jnp.concatenate(x), *t),
                              *[one] * num_batches)
  n = batch * num_batches
  host = (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  state, frozen = _abstract(state), _abstract(frozen)
  _, batches, probe, _ = jax.eval_shape(kernels.prepare, state, frozen, trajectory, *host)
  return {"rollout": (params, ids, uncond, key),
          "prepare": (state, frozen, trajectory) + host,
          "train_epoch": (state, frozen, batches),
          "probe": probe,
          "state": state}


def lower_epoch(kernels, config, state, frozen, uncond_ids):
  """AOT-lowers the kernels of one epoch on abstract inputs of this config's shapes.

  For cost accounting (benchmarks/epoch.py): `.compile()` each, time it, read
  `cost_analysis()` / `memory_analysis()`. Nothing is executed.

  Returns:
    dict name -> `jax.stages.Lowered` for "rollout" (one sample batch), "prepare",
    "train_epoch", and with a critic "dormant" and "reset".
  """
  inputs = abstract_epoch_inputs(kernels, config, state, frozen, uncond_ids)
  lowered = {"rollout": kernels.rollout.lower(*inputs["rollout"]),
             "prepare": kernels.prepare.lower(*inputs["prepare"]),
             "train_epoch": kernels.train_epoch.lower(*inputs["train_epoch"])}
  if config_checks.ALGORITHMS[config.algorithm][0]:
    state = inputs["state"]
    lowered["dormant"] = kernels.dormant.lower(state.critic_params, inputs["probe"])
    lowered["reset"] = kernels.reset.lower(state, inputs["probe"])
  return lowered


def reward_scorer(config, mesh, reward_fn):
  """`reward_fn` scored on the mesh: `score(images, prompts) -> (B,)` float32 on the host.

  A model reward (`rewards.DeviceReward`) becomes a jitted kernel: its parameters placed once by
  `config.sharding.rules`, the images and prompt inputs split over the batch devices (rows; a
  batch that does not split is padded with copies of its last row, dropped afterwards). Images
  may be host arrays (every process passes all of them) or a global array already on the mesh
  (the rollout's, used in place). Any other reward (JPEG, the shapes gold detector, a Python
  reward) runs on the host as it is.
  """
  if not isinstance(reward_fn, rewards.DeviceReward):
    return lambda images, prompts: reward_fn(sharding_lib.to_host(images), prompts)
  rows = sharding_lib.batch_sharding(mesh)
  param_shardings = sharding_lib.tree_shardings(mesh, config.sharding.rules, reward_fn.params)
  params = sharding_lib.put_tree(reward_fn.params, param_shardings)
  num_inputs = len(reward_fn.prompt_inputs([""], 1))
  kernel = jax.jit(reward_fn.score_fn,
                   in_shardings=(param_shardings,) + (rows,) * (1 + num_inputs),
                   out_shardings=rows)
  devices = sharding_lib.num_batch_devices(mesh)

  def to_mesh(x, count):
    """Host rows (count, ...) padded to a multiple of the batch devices, as a global array."""
    x = np.asarray(x)
    padded = count + (-count) % devices
    x = np.concatenate([x, np.repeat(x[-1:], padded - count, axis=0)]) if padded > count else x
    start, stop = sharding_lib.process_batch_slice(mesh, padded)
    return sharding_lib.host_batch_to_global(x[start:stop], mesh, padded)

  def score(images, prompts):
    count = images.shape[0]
    inputs = [to_mesh(x, count) for x in reward_fn.prompt_inputs(prompts, count)]
    on_mesh = (isinstance(images, jax.Array) and images.dtype == jnp.float32
               and count % devices == 0 and images.sharding.is_equivalent_to(rows, images.ndim))
    if not on_mesh:
      images = to_mesh(sharding_lib.to_host(images).astype(np.float32), count)
    return sharding_lib.to_host(kernel(params, images, *inputs))[:count].astype(np.float32)

  return score
