"""The epoch loop of DDPO / TDPO / TDPO-R: orchestration only, the math lives elsewhere.

Shapes: N samples per epoch, T DDIM steps, M train micro-batch, k micro-batches per optimizer
step (gradient accumulation), d critic embedding width; latents NCHW.

Per epoch (DESIGN §3):
  sample (rollout.py) -> reward (rewards/) -> per-prompt normalisation (stats.py)
  -> critic values V_old(x_t) of every visited state (critic.py) -> advantages (objectives.py)
  -> timestep-outer PPO updates (train_step.py) -> active-neuron reset (reset.py) -> log.
Kernels: the rollout per sample batch; `prepare_fn` (normalisation .. transition gather) and
`train_epoch_fn` (a scan over the S optimizer steps, state donated) as one jitted call each;
the dormant fractions / reset; one metrics fetch. The only mid-epoch host sync is the images
leaving the device for the reward.

`config.algorithm` only switches flags of this one loop:
  ddpo   : no critic; every step gets the standardised normalised reward as advantage.
  tdpo   : critic on; A_k = G_k - V(x_k), standardised; no reset.
  tdpo_r : tdpo + reset of the critic's active neurons every `reset.period` epochs.
  grpo   : ddpo with group-relative rewards: the epoch samples `sample.group_size` images of
           each prompt it draws, and each reward is standardised within its group
           (`stats.group_normalise`) instead of by the per-prompt buffers.
"""
import contextlib
import math
import os
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from tdpo_jax import checkpoint as checkpoint_lib
from tdpo_jax import critic as critic_lib
from tdpo_jax import critic_tower
from tdpo_jax import ddim
from tdpo_jax import evaluation
from tdpo_jax import images as images_lib
from tdpo_jax import metrics_writer
from tdpo_jax import objectives
from tdpo_jax import policy
from tdpo_jax import prompts as prompts_lib
from tdpo_jax import reset as reset_lib
from tdpo_jax import rewards
from tdpo_jax import rollout
from tdpo_jax import sharding as sharding_lib
from tdpo_jax import stats
from tdpo_jax import train_step as train_step_lib
from tdpo_jax.models import pipeline as pipeline_lib

ALGORITHMS = {
    # name: (use_critic, use_reset)
    "ddpo": (False, False),
    "tdpo": (True, False),
    "tdpo_r": (True, True),
    "grpo": (False, False),  # plus group-relative rewards (module docstring)
}
KL_MODES = ("none", "return_penalty", "gaussian")
RESET_TARGETS = ("active", "dormant")

# Independent RNG streams folded into the root key (STYLE: keys depend on (seed, stream, ...)).
STREAM_INIT, STREAM_SAMPLE, STREAM_TRAIN, STREAM_RESET, STREAM_PROBE = range(5)


class NonFiniteError(FloatingPointError):
  """A reward or loss became NaN/inf; the run stops and keeps what it has written."""


def samples_per_epoch(config):
  return config.sample.batch_size * config.sample.num_batches_per_epoch


def num_train_timesteps(config):
  """Timesteps trained per sample per epoch: int(T * timestep_fraction), as the official code."""
  return int(config.sample.num_steps * config.train.timestep_fraction)


def validate_config(config):
  """Checks the config before anything is loaded or written; raises ValueError naming the key."""
  if config.algorithm not in ALGORITHMS:
    raise ValueError(
        f"unknown algorithm {config.algorithm!r}: expected one of {sorted(ALGORITHMS)}")
  rewards.check_name(config.reward)  # raises for an unknown reward name
  if config.train.kl_mode not in KL_MODES:
    raise ValueError(f"unknown train.kl_mode {config.train.kl_mode!r}: expected one of {KL_MODES}")
  if config.reset.target not in RESET_TARGETS:
    raise ValueError(
        f"unknown reset.target {config.reset.target!r}: expected one of {RESET_TARGETS}")
  if not 0 < config.train.timestep_fraction <= 1:
    raise ValueError(
        f"train.timestep_fraction={config.train.timestep_fraction} must be in (0, 1]")
  if num_train_timesteps(config) < 1:
    raise ValueError("sample.num_steps * train.timestep_fraction must be >= 1")
  total = samples_per_epoch(config)
  group_size = config.sample.group_size
  if group_size < 0 or (config.algorithm == "grpo" and group_size < 2):
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
  for key in ("policy", "frozen"):
    if config.precision[key] not in pipeline_lib.PRECISIONS:
      raise ValueError(f"unknown precision.{key} {config.precision[key]!r}: expected one of "
                       f"{sorted(pipeline_lib.PRECISIONS)}")
  if config.reset.period < 1:
    raise ValueError(f"reset.period={config.reset.period} must be >= 1")
  critic_tower.check_name(config.critic.tower)
  if config.train.remat not in train_step_lib.REMAT_MODES:
    raise ValueError(f"unknown train.remat {config.train.remat!r}: expected one of "
                     f"{train_step_lib.REMAT_MODES}")
  if not 0 < config.critic.late_fraction <= 1:
    raise ValueError(f"critic.late_fraction={config.critic.late_fraction} must be in (0, 1]")
  evaluation.validate_config(config)
  metrics_writer.check_config(config)  # W&B on but not installed


def validate_mesh(config, mesh):
  """Checks that the global batches split over the mesh's batch devices (data x fsdp)."""
  sharding_lib.check_batch_divides("sample.batch_size", config.sample.batch_size, mesh)
  sharding_lib.check_batch_divides("train.batch_size", config.train.batch_size, mesh)


class Trainer:
  """Loads the models once and holds the jitted kernels; `run_epoch` advances a `TrainState`."""

  def __init__(self, config):
    validate_config(config)
    self.config = config
    # The mesh first: a mesh/batch mismatch is reported before any model is loaded.
    self.mesh = sharding_lib.make_mesh(config.mesh, config.num_devices)
    validate_mesh(config, self.mesh)
    self.use_critic, self.use_reset = ALGORITHMS[config.algorithm]
    self.prompts = prompts_lib.load_prompts(config.prompts)
    self.reward_fn = rewards.make_reward_fn(config.reward, config.rewards,
                                            cache_dir=config.pretrained.cache_dir)
    self.pipeline = pipeline_lib.load_pipeline(
        config.pretrained.model, cache_dir=config.pretrained.cache_dir,
        image_encoder=config.pretrained.image_encoder,
        tiny_spec=config.pretrained.get("tiny"))
    self.root_key = jax.random.key(config.seed)
    self.num_steps = config.sample.num_steps
    self.input_uncond = rollout.tokenize_prompts(self.pipeline, [""])[1]
    # True: wait for each phase so `time/*_s` are run times (benchmarks); False: fully async.
    self.sync_phases = False
    self._build_kernels()

  # ---------------------------------------------------------------- setup
  def _build_kernels(self):
    config, base_pipeline, mesh = self.config, self.pipeline, self.mesh
    rules = config.sharding.rules
    # Compute dtypes (config.precision): the policy UNet's forward (rollout and train step) and
    # the frozen models'; parameters stay float32 (master weights), outputs are cast to float32.
    precision = config.precision
    pipeline = pipeline_lib.with_precision(base_pipeline, unet=precision.policy,
                                           frozen=precision.frozen)
    self.frozen_pipeline = pipeline_lib.with_precision(base_pipeline, unet=precision.frozen,
                                                       frozen=precision.frozen)
    # The critic's frozen image tower (critic_tower.py; None: no image encoder, DDPO only).
    self.tower = critic_tower.make_tower(config, self.frozen_pipeline)
    if self.use_critic and self.tower is None:
      raise ValueError(
          f"algorithm {config.algorithm!r} needs a critic image encoder: none found in "
          f"{config.pretrained.model!r} (set pretrained.image_encoder or critic.tower)")
    tower_params = self.tower.params if self.tower is not None else None
    replicated = sharding_lib.replicated(mesh)
    rows = sharding_lib.batch_sharding(mesh)  # leading dim over ("data", "fsdp")
    self.jit_encode_text = jax.jit(
        lambda params, ids: pipeline_lib.encode_text(pipeline, params, ids))
    # Frozen models by the config's partition rules (paths "unet/...", "vae/...", ...).
    self.frozen_shardings = sharding_lib.tree_shardings(mesh, rules, train_step_lib.FrozenParams(
        unet=pipeline.unet_params, text_encoder=pipeline.text_encoder_params,
        vae=pipeline.vae_params, image_encoder=tower_params,
        uncond_embeds=jax.eval_shape(self.jit_encode_text, pipeline.text_encoder_params,
                                     self.input_uncond)))
    frozen_shardings = self.frozen_shardings
    rollout_shardings = rollout.RolloutParams(
        unet=frozen_shardings.unet, text_encoder=frozen_shardings.text_encoder,
        vae=frozen_shardings.vae)
    trajectory_shardings = rollout.Trajectory(
        latents=rows, log_probs=rows, timesteps=rows, prompt_embeds=rows,
        uncond_embeds=replicated, images=rows)
    # rollout(params, input_ids (B, L) over the batch devices, uncond_ids (1, L), rng).
    self.rollout_fn = jax.jit(
        rollout.make_rollout_fn(pipeline, config.sample),
        in_shardings=(rollout_shardings, rows, replicated, replicated),
        out_shardings=trajectory_shardings)
    self.jit_merge = jax.jit(lambda base, p: policy.unet_params(config.lora, base, p),
                             out_shardings=frozen_shardings.unet)
    if self.tower is not None:
      frozen_pipeline, tower = self.frozen_pipeline, self.tower

      def embed_fn(vae_params, tower_params, latents):
        return critic_lib.embed_noisy_latents(
            lambda x: pipeline_lib.decode_latents(frozen_pipeline, vae_params, x),
            lambda images: tower.embed_fn(tower_params, images), latents)
      self.embed_fn = embed_fn
      self.jit_embed_states = jax.jit(self._embed_states)
      probe_image = jnp.zeros((1, config.sample.height, config.sample.width, 3), jnp.float32)
      embed_dim = jax.eval_shape(tower.embed_fn, tower.params, probe_image).shape[-1]
    else:
      self.embed_fn = self.jit_embed_states = None
      embed_dim = 1
    self.embed_dim = int(embed_dim)
    self.critic = critic_lib.make_critic(config.critic, self.embed_dim)
    self.critic_init_std = self.critic.init_std
    self.jit_values = jax.jit(
        lambda params, embeds: self.critic.apply({"params": params}, embeds, deterministic=True))
    self.jit_normalise = jax.jit(
        lambda state, index, r: stats.normalise(
            state, index, r, min_count=config.stats.min_count, eps=config.stats.eps,
            per_prompt=config.stats.per_prompt))
    # The state is born sharded: eval_shape -> rule shardings -> jit(init, out_shardings).
    init_fn = make_init_state_fn(config, self.critic, self.embed_dim, len(self.prompts),
                                 self.root_key)
    self.state_shardings = sharding_lib.tree_shardings(
        mesh, rules, jax.eval_shape(init_fn, pipeline.unet_params))
    self.jit_init_state = jax.jit(init_fn, in_shardings=(frozen_shardings.unet,),
                                  out_shardings=self.state_shardings)
    self.train_step_fn = train_step_lib.make_train_step(
        pipeline, self.critic, config, use_critic=self.use_critic)
    # train_step(state, frozen, batch with leaves (k, M, ...) split on M, rng); state donated.
    self.transition_sharding = sharding_lib.batch_sharding(mesh, axis=1)
    self.jit_train_step = jax.jit(
        self.train_step_fn,
        in_shardings=(self.state_shardings, frozen_shardings, self.transition_sharding,
                      replicated),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))
    # The whole train phase: S optimizer steps in one scan, state donated (train_epoch_fn).
    self.batches_sharding = sharding_lib.batch_sharding(mesh, axis=2)  # (S, k, M, ...) on M
    self.jit_train_epoch = jax.jit(
        self.train_epoch_fn,
        in_shardings=(self.state_shardings, frozen_shardings, self.batches_sharding, replicated),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))
    # Everything between the reward and the train phase (prepare_fn), one kernel.
    self.jit_prepare = jax.jit(
        self.prepare_fn,
        out_shardings=(self.state_shardings.normaliser, self.batches_sharding, replicated,
                       replicated))
    self.jit_transitions = jax.jit(self._transitions)
    critic_tx = train_step_lib.make_optimizers(config.train)[1]
    reset_root = jax.random.fold_in(self.root_key, STREAM_RESET)
    # The reset key folds the state's reset counter in the kernel: no host sync to read it.
    self.jit_reset = jax.jit(
        lambda params, opt_state, probe, reset_count: reset_lib.reset_critic(
            self.critic, params, opt_state, probe, jax.random.fold_in(reset_root, reset_count),
            tau=config.reset.tau, target=config.reset.target, init_std=self.critic_init_std,
            optimizer=critic_tx))
    self.jit_dormant = jax.jit(
        lambda params, probe: reset_lib.dormant_fractions(
            self.critic, params, probe, config.reset.tau))

  def frozen_params(self):
    """The frozen models placed on the mesh by `config.sharding.rules` (`FrozenParams`)."""
    pipeline = self.pipeline
    text_encoder = sharding_lib.put_tree(pipeline.text_encoder_params,
                                         self.frozen_shardings.text_encoder)
    uncond = self.jit_encode_text(text_encoder, self.input_uncond)
    return sharding_lib.put_tree(train_step_lib.FrozenParams(
        unet=pipeline.unet_params, text_encoder=text_encoder,
        vae=pipeline.vae_params,
        image_encoder=self.tower.params if self.tower is not None else None,
        uncond_embeds=uncond), self.frozen_shardings)

  def init_state(self):
    """A fresh `TrainState`, born sharded (`state_shardings`): LoRA at B = 0 (policy ==
    pre-trained), critic at its init."""
    unet = sharding_lib.put_tree(self.pipeline.unet_params, self.frozen_shardings.unet)
    return self.jit_init_state(unet)

  def abstract_epoch_inputs(self, state, frozen):
    """Abstract (shape, dtype, sharding) inputs of one epoch's kernels; nothing is computed.

    Returns:
      dict with "rollout" (the args of one sample batch's `rollout_fn`), "prepare" (of
      `prepare_fn`), "train_epoch" (of `train_epoch_fn`) and "probe" (the reset's probe).
    """
    config = self.config
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree)
    batch, num_batches = config.sample.batch_size, config.sample.num_batches_per_epoch
    ids = jax.ShapeDtypeStruct((batch, self.input_uncond.shape[1]), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    params = jax.eval_shape(
        lambda unet, policy_params: rollout.RolloutParams(
            unet=policy.unet_params(config.lora, unet, policy_params),
            text_encoder=frozen.text_encoder, vae=frozen.vae), frozen.unet, state.policy_params)
    uncond = jax.ShapeDtypeStruct(self.input_uncond.shape, jnp.int32)
    one = jax.eval_shape(self.rollout_fn, params, ids, uncond, key)
    trajectory = jax.eval_shape(lambda *t: jax.tree.map(lambda *x: jnp.concatenate(x), *t),
                                *[one] * num_batches)
    n = batch * num_batches
    host = (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32),
            jax.ShapeDtypeStruct((), jnp.int32))
    state, frozen = abstract(state), abstract(frozen)
    _, batches, probe, _ = jax.eval_shape(self.prepare_fn, state, frozen, trajectory, *host)
    return {"rollout": (params, ids, uncond, key),
            "prepare": (state, frozen, trajectory) + host,
            "train_epoch": (state, frozen, batches, key),
            "probe": probe}

  def lower_kernels(self, state, frozen):
    """AOT-lowers the jitted kernels of one epoch on abstract inputs of this config's shapes.

    For cost accounting (benchmarks/epoch.py): `.compile()` each, time it, read
    `cost_analysis()` / `memory_analysis()`. Nothing is executed.

    Returns:
      dict name -> `jax.stages.Lowered` for "rollout" (one sample batch), "prepare",
      "train_epoch", and with a critic "dormant" and "reset".
    """
    inputs = self.abstract_epoch_inputs(state, frozen)
    lowered = {"rollout": self.rollout_fn.lower(*inputs["rollout"]),
               "prepare": self.jit_prepare.lower(*inputs["prepare"]),
               "train_epoch": self.jit_train_epoch.lower(*inputs["train_epoch"])}
    if self.use_critic:
      state = inputs["prepare"][0]
      lowered["dormant"] = self.jit_dormant.lower(state.critic_params, inputs["probe"])
      lowered["reset"] = self.jit_reset.lower(state.critic_params, state.critic_opt_state,
                                              inputs["probe"], state.reset_count)
    return lowered

  # ---------------------------------------------------------------- phases
  def sample(self, state, frozen, epoch, progress=False):
    """Samples the epoch's N trajectories; returns (trajectory with leading dim N, prompt ids)."""
    config = self.config
    params = self.rollout_params(state, frozen)
    sample_key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_SAMPLE), epoch)
    host_rng = np.random.default_rng([config.seed, epoch])
    size = config.sample.batch_size
    if config.sample.group_size:  # the whole epoch's prompts first: a group may span batches
      grouped = prompts_lib.grouped_prompt_indices(
          host_rng, len(self.prompts), samples_per_epoch(config), config.sample.group_size)
    trajectories, prompt_index = [], []
    batches = range(config.sample.num_batches_per_epoch)
    for batch in tqdm.tqdm(batches, desc=f"epoch {epoch} sample", disable=not progress,
                           leave=False):
      index = (grouped[batch * size:(batch + 1) * size] if config.sample.group_size
               else prompts_lib.sample_prompt_indices(host_rng, len(self.prompts), size))
      trajectories.append(self.rollout_prompts(
          params, [self.prompts[i] for i in index], jax.random.fold_in(sample_key, batch)))
      prompt_index.append(index)
    trajectory = jax.tree.map(lambda *x: jnp.concatenate(x), *trajectories)
    return trajectory, np.concatenate(prompt_index)

  def rollout_params(self, state, frozen):
    """The current policy's `RolloutParams` (LoRA merged into the frozen UNet)."""
    unet_params = self.jit_merge(frozen.unet, state.policy_params)
    return rollout.RolloutParams(unet=unet_params, text_encoder=frozen.text_encoder,
                                 vae=frozen.vae)

  def rollout_prompts(self, params, prompts, rng):
    """One jitted rollout of a global batch of prompt strings (every process passes all of
    them, the same on each; each feeds only its own rows). Returns the `Trajectory`."""
    count = len(prompts)
    start, stop = sharding_lib.process_batch_slice(self.mesh, count)
    local_ids, uncond_ids = rollout.tokenize_prompts(self.pipeline, prompts[start:stop])
    input_ids = sharding_lib.host_batch_to_global(local_ids, self.mesh, count)
    uncond_ids, rng = sharding_lib.replicate_host((uncond_ids, rng), self.mesh)
    return self.rollout_fn(params, input_ids, uncond_ids, rng)

  def _embed(self, frozen, latents):
    """Frozen critic embeddings of a flat batch of latents (B, C, h, w) -> (B, d), pure.

    One VAE decode + image-encoder call per `critic.embed_chunk_size` latents (lax.map; 0 = the
    whole batch in one call, fastest where it fits in memory).
    """
    chunk = int(self.config.critic.embed_chunk_size)
    embed = lambda x: self.embed_fn(frozen.vae, frozen.image_encoder, x)
    if chunk <= 0 or chunk >= latents.shape[0]:
      return embed(latents)
    return jax.lax.map(lambda x: embed(x[None])[0], latents, batch_size=chunk)

  def embed_states(self, frozen, trajectory):
    """Frozen critic embeddings of x_T ... x_1 for every sample: (N, T, d), one jitted call."""
    return self.jit_embed_states(frozen, trajectory.latents[:, :self.num_steps])

  def _embed_states(self, frozen, latents):
    n, t = latents.shape[:2]
    return self._embed(frozen, latents.reshape((n * t,) + latents.shape[2:])).reshape(n, t, -1)

  def _ref_log_probs(self, frozen, trajectory):
    """log pi_ref of every sampled transition under the frozen pre-trained UNet: (N, T)."""
    config = self.config
    alphas = jnp.asarray(ddim.alphas_cumprod(self.pipeline.scheduler_config))

    def per_step(latents, next_latents, timesteps):
      eps = rollout.guided_eps(self.frozen_pipeline, frozen.unet, latents, timesteps,
                               trajectory.prompt_embeds, frozen.uncond_embeds,
                               config.sample.guidance_scale)
      return ddim.log_prob(eps, timesteps, latents, next_latents, alphas, self.num_steps,
                           config.sample.eta)

    return jax.vmap(per_step, in_axes=(1, 1, 1), out_axes=1)(
        trajectory.latents[:, :-1], trajectory.latents[:, 1:], trajectory.timesteps)

  def train_indices(self, num_samples, epoch):
    """The (sample, timestep) pairs the train phase visits, pass-major: two (t_train, N) int32.

    Each sample's timestep order is shuffled independently, and samples are shuffled; pass j
    trains every sample at its j-th shuffled timestep. Keys fold (STREAM_TRAIN, epoch, 0 | 1);
    `epoch` may be traced.
    """
    key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_TRAIN), epoch)
    sample_perm = jax.random.permutation(jax.random.fold_in(key, 0), num_samples)
    step_perm = jax.vmap(lambda k: jax.random.permutation(k, self.num_steps))(
        jax.random.split(jax.random.fold_in(key, 1), num_samples))
    t_train = num_train_timesteps(self.config)
    sample_index = jnp.broadcast_to(sample_perm[None], (t_train, num_samples))  # pass j, slot i
    step_index = step_perm[sample_perm][:, :t_train].T                          # (t_train, N)
    return sample_index, step_index

  def _to_updates(self, x):
    """(t_train, N, ...) pass-major pairs -> (S, k, M, ...) optimizer-step batches."""
    micro, accum = self.config.train.batch_size, self.config.train.gradient_accumulation_steps
    return x.reshape((-1, accum, micro) + x.shape[2:])

  def transitions(self, trajectory, embeds, advantages, returns, values, epoch):
    """Gathers the epoch's training transitions, timestep-outer, into optimizer-step batches.

    Args:
      embeds, advantages, returns, values: per (sample, timestep): (N, T, d) and (N, T).
    Returns:
      a `TransitionBatch` with leading dims (S, k, M): S optimizer steps of k micro-batches.
    """
    return self.jit_transitions(trajectory, embeds, advantages, returns, values, epoch)

  def _transitions(self, trajectory, embeds, advantages, returns, values, epoch):
    sample_index, step_index = self.train_indices(trajectory.latents.shape[0], epoch)
    take = lambda x: self._to_updates(x[sample_index, step_index])
    return train_step_lib.TransitionBatch(
        latents=take(trajectory.latents[:, :-1]),
        next_latents=take(trajectory.latents[:, 1:]),
        timesteps=take(trajectory.timesteps),
        old_log_probs=take(trajectory.log_probs),
        advantages=take(advantages),
        returns=take(returns),
        old_values=take(values),
        embeds=take(embeds),
        prompt_embeds=self._to_updates(trajectory.prompt_embeds[sample_index]))

  def prepare_fn(self, state, frozen, trajectory, prompt_index, reward, epoch):
    """Everything between the reward and the train phase, pure (one jitted kernel).

    Per-prompt normalisation (stats.py), returns (with the optional KL return penalty), the
    critic's frozen embeddings and values V_old(x_t) of the visited states, the advantages
    A = standardise(G - V) (objectives.py) and the gather of the training transitions.

    With `critic.embed_train_timesteps_only` (and train.timestep_fraction < 1) only the
    (sample, timestep) pairs the train phase uses are embedded, and the advantages are
    standardised over those pairs (the official code standardises over all N T pairs).

    Args:
      state: `TrainState` (normaliser and critic params are read).
      trajectory: the epoch's `Trajectory`, leading dim N.
      prompt_index: (N,) int32; reward: (N,) float32; epoch: int32 scalar.
    Returns:
      (normaliser, `TransitionBatch` (S, k, M, ...), probe embeddings (P, d) for the reset,
      metrics dict of scalars).
    """
    config = self.config
    normaliser, normalised = stats.normalise(
        state.normaliser, prompt_index, reward, min_count=config.stats.min_count,
        eps=config.stats.eps, per_prompt=config.stats.per_prompt)
    if config.algorithm == "grpo":  # the buffers still fill: the state is the same either way
      normalised = stats.group_normalise(reward, config.sample.group_size, config.stats.eps)
    returns = jnp.broadcast_to(normalised[:, None], trajectory.log_probs.shape)
    metrics = {}
    if config.train.kl_mode == "return_penalty" and config.train.kl_coef > 0:
      penalty = objectives.return_kl_penalty(trajectory.log_probs,
                                             self._ref_log_probs(frozen, trajectory))
      returns = objectives.returns_from_rewards(normalised, self.num_steps, penalty,
                                                config.train.kl_coef)
      metrics["policy/kl_penalty"] = jnp.mean(penalty)
    n = trajectory.latents.shape[0]
    sample_index, step_index = self.train_indices(n, epoch)
    pairs = lambda x: x[sample_index, step_index]  # (N, T, ...) -> (t_train, N, ...)
    train_only = (config.critic.embed_train_timesteps_only
                  and num_train_timesteps(config) < self.num_steps)
    probe = jnp.zeros((1, self.embed_dim), jnp.float32)
    if self.use_critic:
      if train_only:
        embeds = self._embed(frozen, pairs(trajectory.latents[:, :-1]).reshape(
            (-1,) + trajectory.latents.shape[2:]))
        returns_used, steps_used = pairs(returns), step_index
      else:
        embeds = self._embed_states(frozen, trajectory.latents[:, :self.num_steps])
        returns_used = returns
        steps_used = jnp.broadcast_to(jnp.arange(self.num_steps), returns.shape)
      values = self.critic.apply({"params": state.critic_params},
                                 embeds.reshape(-1, self.embed_dim), deterministic=True)
      values = values.reshape(returns_used.shape)
      embeds = embeds.reshape(returns_used.shape + (self.embed_dim,))
      metrics.update(explained_variance_metrics(values, returns_used, steps_used,
                                                self.num_steps, config.critic.late_fraction))
      metrics["critic/value_mean"] = jnp.mean(values)
      advantages = objectives.advantages(returns_used, values, config.train.adv_eps)
      probe = self._probe(embeds, epoch)
      if not train_only:
        embeds, values, advantages = pairs(embeds), pairs(values), pairs(advantages)
    else:
      advantages = pairs(objectives.advantages(returns, None, config.train.adv_eps))
      values = jnp.zeros(advantages.shape, jnp.float32)
      embeds = jnp.zeros(advantages.shape + (self.embed_dim,), jnp.float32)
    take = lambda x: self._to_updates(pairs(x))
    batches = train_step_lib.TransitionBatch(
        latents=take(trajectory.latents[:, :-1]),
        next_latents=take(trajectory.latents[:, 1:]),
        timesteps=take(trajectory.timesteps),
        old_log_probs=take(trajectory.log_probs),
        advantages=self._to_updates(advantages),
        returns=take(returns),
        old_values=self._to_updates(values),
        embeds=self._to_updates(embeds),
        prompt_embeds=self._to_updates(trajectory.prompt_embeds[sample_index]))
    return normaliser, batches, probe, metrics

  def train_epoch_fn(self, state, frozen, batches, train_key):
    """The whole train phase, pure: `lax.scan` of the train step over the S updates.

    Update u uses rng fold_in(train_key, u). Returns (state, metrics with leading dim S).
    """
    def update(state, inputs):
      index, batch = inputs
      return self.train_step_fn(state, frozen, batch, jax.random.fold_in(train_key, index))

    num_updates = batches.latents.shape[0]
    return jax.lax.scan(update, state, (jnp.arange(num_updates), batches))

  def run_epoch(self, state, frozen, progress=False):
    """One epoch. Returns (new state, metrics dict of Python floats, host images, prompts, rewards).

    Kernels: the rollout (per sample batch), the reward (host or jitted), `prepare_fn`,
    `train_epoch_fn`, then the dormant fractions / reset. The only host syncs are the images
    for the reward and one metrics fetch at the end, unless `self.sync_phases` is set (then each
    phase is waited for, so that its `time/*_s` is its run time, not its dispatch time).
    """
    config = self.config
    sync = self.sync_phases
    epoch = int(state.epoch)
    times = {}
    tic = time.perf_counter()
    trajectory, prompt_index = self.sample(state, frozen, epoch, progress)
    images = sharding_lib.to_host(trajectory.images)  # all of them, on every process
    times["sample"] = time.perf_counter() - tic

    tic = time.perf_counter()
    prompts = [self.prompts[i] for i in prompt_index]
    reward = np.asarray(self.reward_fn(images, prompts), np.float32)
    times["reward"] = time.perf_counter() - tic
    if reward.shape != (len(prompts),):
      raise ValueError(f"reward {config.reward!r} returned shape {reward.shape}, expected "
                       f"({len(prompts)},)")
    if not np.all(np.isfinite(reward)):
      bad = np.flatnonzero(~np.isfinite(reward))
      raise NonFiniteError(
          f"epoch {epoch}: reward {config.reward!r} is NaN/inf for {len(bad)} of {len(reward)} "
          f"samples (first prompt: {prompts[bad[0]]!r}); stopping, earlier outputs kept")

    tic = time.perf_counter()
    host_inputs = sharding_lib.replicate_host(
        (np.asarray(prompt_index, np.int32), reward, np.int32(epoch)), self.mesh)
    normaliser, batches, probe, metrics = self.jit_prepare(state, frozen, trajectory,
                                                           *host_inputs)
    del trajectory  # the batches hold what training needs
    if sync:
      jax.block_until_ready(batches)
    times["prepare"] = time.perf_counter() - tic

    tic = time.perf_counter()
    num_updates = batches.latents.shape[0]
    train_key = sharding_lib.replicate_host(jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_TRAIN), epoch), 2), self.mesh)
    state, step_metrics = self.jit_train_epoch(state.replace(normaliser=normaliser), frozen,
                                               batches, train_key)
    del batches
    if sync:
      jax.block_until_ready(state)
    times["train"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if self.use_critic:
      metrics.update(self.jit_dormant(state.critic_params, probe))
      if self.use_reset and (epoch + 1) % config.reset.period == 0:
        critic_params, critic_opt_state, reset_stats = self.jit_reset(
            state.critic_params, state.critic_opt_state, probe, state.reset_count)
        state = state.replace(critic_params=critic_params, critic_opt_state=critic_opt_state,
                              reset_count=state.reset_count + 1)
        metrics.update(reset_stats)
    state = state.replace(epoch=state.epoch + 1)
    if sync:
      jax.block_until_ready(state)
    times["reset"] = time.perf_counter() - tic

    tic = time.perf_counter()
    step_metrics, metrics, step = jax.device_get((step_metrics, metrics, state.step))  # once
    times["fetch"] = time.perf_counter() - tic
    metrics.update({k: np.mean(v) for k, v in step_metrics.items()})
    for key in ("policy/loss", "critic/value_loss"):
      if key in metrics and not np.isfinite(metrics[key]):
        raise NonFiniteError(f"epoch {epoch}: {key} is {metrics[key]}; stopping, earlier "
                             "outputs kept")
    metrics.update({
        "epoch": epoch,
        "reward/mean": float(reward.mean()),
        "reward/std": float(reward.std()),
        "reward/min": float(reward.min()),
        "reward/max": float(reward.max()),
        "train/num_updates": num_updates,
        "train/optimizer_steps_total": int(step),
    })
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    metrics = {k: float(v) for k, v in metrics.items()}
    return state, metrics, images, prompts, reward

  def _probe(self, embeds, epoch):
    """`reset.probe_size` embeddings of this epoch's states at random (sample, timestep); pure."""
    flat = embeds.reshape(-1, self.embed_dim)
    key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_PROBE), epoch)
    size = min(self.config.reset.probe_size, flat.shape[0])
    return flat[jax.random.choice(key, flat.shape[0], (size,), replace=False)]


def make_init_state_fn(config, critic, embed_dim, num_prompts, root_key):
  """`init_fn(base_unet_params) -> TrainState` (pure; jit it with the state's out_shardings).

  LoRA at B = 0 (policy == pre-trained) or a copy of the full UNet; the critic at its init;
  zero counters; the normaliser's (num_prompts, stats.buffer_size) buffers; rng = key(seed).
  """
  def init_fn(base_unet_params):
    key = jax.random.fold_in(root_key, STREAM_INIT)
    policy_params = policy.init_policy_params(
        config.lora, base_unet_params, jax.random.fold_in(key, 0))
    critic_params = critic.init(
        jax.random.fold_in(key, 1), jnp.zeros((1, embed_dim)), deterministic=True)["params"]
    policy_tx, critic_tx = train_step_lib.make_optimizers(config.train)
    return train_step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
        policy_params=policy_params, policy_opt_state=policy_tx.init(policy_params),
        critic_params=critic_params, critic_opt_state=critic_tx.init(critic_params),
        normaliser=stats.init_normaliser(num_prompts, config.stats.buffer_size),
        reset_count=jnp.zeros((), jnp.int32),
        rng=jax.random.key(config.seed))

  return init_fn


def late_states(num_steps, late_fraction):
  """The first state index of the "late" states: the last ceil(late_fraction T) of x_T .. x_1."""
  return num_steps - max(1, math.ceil(late_fraction * num_steps))


def explained_variance_metrics(values, returns, steps, num_steps, late_fraction):
  """The critic's explained variance of the epoch's states, before the update (pure).

  Args:
    values, returns, steps: (...) V_old, G and the state index k (0 = x_T) of each entry.
    num_steps: T.
    late_fraction: the share of the last states pooled into the "late" figure.

  Returns:
    {"critic/explained_variance": all states, "critic/explained_variance/late": the states
    k >= `late_states`, "critic/explained_variance/kNN": state k alone}.
  """
  metrics = {
      "critic/explained_variance": objectives.explained_variance(values, returns),
      "critic/explained_variance/late": objectives.masked_explained_variance(
          values, returns, steps >= late_states(num_steps, late_fraction))}
  by_step = objectives.explained_variance_by_step(values, returns, steps, num_steps)
  metrics.update({f"critic/explained_variance/k{k:02d}": by_step[k] for k in range(num_steps)})
  return metrics


def summary_line(metrics):
  """One human-readable line per epoch (the full set goes to metrics.jsonl / TensorBoard)."""
  parts = [f"epoch {int(metrics['epoch'])}",
           f"reward {metrics['reward/mean']:.4f} ± {metrics['reward/std']:.4f}",
           f"policy loss {metrics['policy/loss']:+.2e} kl {metrics['policy/approx_kl']:.1e} "
           f"clip {metrics['policy/clipfrac']:.2f}"]
  if "critic/value_loss" in metrics:
    part = (f"value loss {metrics['critic/value_loss']:.4f} "
            f"ev {metrics['critic/explained_variance']:+.3f}")
    if "critic/explained_variance/late" in metrics:
      part += f" late {metrics['critic/explained_variance/late']:+.3f}"
    parts.append(part)
  dormant = [metrics[k] for k in sorted(metrics) if k.startswith("reset/dormant_frac/l")]
  if dormant:
    parts.append("dormant " + "/".join(f"{d:.2f}" for d in dormant))
  if "reset/num_reset" in metrics:
    parts.append(f"reset {int(metrics['reset/num_reset'])} neurons")
  evaluated = eval_summary(metrics)
  if evaluated:
    parts.append(evaluated)
  parts.append(f"{metrics['time/epoch_s']:.1f} s")
  return " | ".join(parts)


def eval_summary(metrics):
  """`eval <reward> <mean> ...` of the fixed-key samples' rewards in `metrics` ("" if none)."""
  evaluated = sorted(k for k in metrics if k.startswith("eval/heldout/") and k.endswith("/mean"))
  return ("eval " + " ".join(f"{k[len('eval/heldout/'):-len('/mean')]} {metrics[k]:.4f}"
                             for k in evaluated)) if evaluated else ""


class RunHistory(list):
  """The per-epoch metric dicts of one `run` call (epochs before a resume are not included).

  Attributes:
    preempted: True when SIGTERM (or a JAX preemption notice) stopped the run early, after it
      saved a checkpoint; rerunning the same command resumes.
    resumed_from: the number of completed epochs restored from the workdir, or None.
  """
  preempted = False
  resumed_from = None


def install_stop_handler():
  """Makes SIGTERM set the returned event instead of killing the process (main thread only).

  Returns:
    (event, restore): `restore()` puts the previous handler back.
  """
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    return stop, lambda: None
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
  return stop, lambda: signal.signal(signal.SIGTERM, previous)


def stop_requested(stop, manager, epoch):
  """Whether any process got SIGTERM or JAX's preemption notice; every process gets the same
  answer (all of them must take part in the save)."""
  requested = stop.is_set()
  if jax.process_count() > 1:
    requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
  return requested or manager.reached_preemption(epoch)


def restore_or_keep(manager, state):
  """`state` restored from the manager's latest checkpoint into the layout (shapes, dtypes,
  shardings) of `state`, or `state` itself when there is none. Returns (state, resumed epoch)."""
  epoch = manager.latest_step()
  if epoch is None:
    return state, None
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  del state  # free the fresh state before the restored one is allocated
  tic = time.perf_counter()
  state, _ = checkpoint_lib.restore(manager, epoch, template)
  logging.info("resumed from the checkpoint after epoch %d in %s (%.1f s)", epoch - 1,
               manager.directory, time.perf_counter() - tic)
  return state, epoch


def run(config, workdir):
  """Trains until `config.num_epochs` epochs are done; writes metrics (JSONL + TensorBoard),
  image grids and checkpoints to `workdir`, resuming from its latest checkpoint if any.

  Saves the whole `TrainState` every `checkpoint.every_epochs` epochs, after the last epoch, and
  on SIGTERM (after finishing the current epoch; the run then returns early with
  `preempted=True`). A NaN/inf epoch raises `NonFiniteError` and saves nothing of that epoch.

  Returns:
    a `RunHistory` (a list) of the per-epoch metric dicts of the epochs run by this call.
  """
  validate_config(config)  # before anything is written to the workdir
  resume_epoch, meta = checkpoint_lib.latest(workdir)
  if jax.process_count() > 1:  # nobody creates checkpoints/ before every process has looked
    multihost_utils.sync_global_devices("tdpo_jax.run: read latest checkpoint")
  if meta is not None:  # also before anything is written
    checkpoint_lib.check_compatible(meta["config"], config, workdir)
  # Process 0 writes the logs and coordinates the checkpoints: its lock stands for the run.
  lock = (checkpoint_lib.workdir_lock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_in_workdir(config, workdir)


def _train_in_workdir(config, workdir):
  """`run`'s body once the config is checked and the workdir is this run's."""
  trainer = Trainer(config)
  evaluator = evaluation.Evaluator(config, trainer)  # loads the eval rewards once (or nothing)
  if jax.process_index() == 0:  # only process 0 writes logs and images
    os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  frozen = trainer.frozen_params()
  manager = checkpoint_lib.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                        async_save=config.checkpoint.async_save)
  state, resume_epoch = restore_or_keep(manager, trainer.init_state())
  history = RunHistory()
  history.resumed_from = resume_epoch
  writer = metrics_writer.MetricWriter(workdir, resume_epoch=resume_epoch, config=config)
  stop, restore_handler = install_stop_handler()
  every = config.checkpoint.every_epochs
  try:
    if evaluator.enabled and config.eval.before_training and int(state.epoch) == 0:
      # Every curve's common origin: the initial policy (a rerun before the first checkpoint
      # recomputes the same numbers: the held-out key is fixed).
      origin = evaluator.evaluate_before_training(state, frozen, writer, workdir)
      logging.info("before training | %s | %.1f s", eval_summary(origin), origin["time/eval_s"])
    epochs = tqdm.trange(int(state.epoch), config.num_epochs, desc="epochs",
                         disable=not config.log.progress)
    for _ in epochs:
      tic = time.perf_counter()
      state, metrics, images, prompts, reward = trainer.run_epoch(
          state, frozen, progress=config.log.progress)
      metrics["time/epoch_s"] = time.perf_counter() - tic
      epoch = int(metrics["epoch"])
      if evaluator.due(epoch):  # before writing: one metrics.jsonl line per epoch
        metrics.update(evaluator.evaluate(state, frozen, epoch, images, prompts, writer,
                                          workdir)[0])
      writer.write(epoch, metrics)
      if (jax.process_index() == 0 and config.log.image_grid_every
          and epoch % config.log.image_grid_every == 0):  # images only from process 0
        count = min(config.log.num_grid_images, len(images))
        captions = [f"{p} | {r:.3g}" for p, r in zip(prompts[:count], reward[:count])]
        path = images_lib.save_grid(
            os.path.join(workdir, "images", f"epoch_{epoch:04d}.png"), images[:count], captions)
        writer.write_image(epoch, "samples", path)
      epochs.set_postfix(reward=f"{metrics['reward/mean']:.4g}")
      logging.info("%s", summary_line(metrics))
      history.append(metrics)
      done = epoch + 1
      history.preempted = done < config.num_epochs and stop_requested(stop, manager, done)
      if (history.preempted or done == config.num_epochs
          or (every > 0 and done % every == 0)):
        checkpoint_lib.save(manager, state, config)
      if history.preempted:
        logging.warning("stopping after epoch %d on SIGTERM/preemption; checkpoint in %s",
                        epoch, manager.directory)
        break
  finally:
    manager.wait_until_finished()  # the last good checkpoint is complete before we exit
    manager.close()
    restore_handler()
    writer.close()
  return history
