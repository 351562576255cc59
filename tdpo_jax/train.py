"""The epoch loop of DDPO / TDPO / TDPO-R: orchestration only, the math lives elsewhere.

Shapes: N samples per epoch, T DDIM steps, M train micro-batch, k micro-batches per optimizer
step (gradient accumulation), d critic embedding width; latents NCHW.

Per epoch (DESIGN §3):
  sample (rollout.py) -> reward (rewards/) -> per-prompt normalisation (stats.py)
  -> critic values V_old(x_t) of every visited state (critic.py) -> advantages (objectives.py)
  -> timestep-outer PPO updates (train_step.py) -> active-neuron reset (reset.py) -> log.

`config.algorithm` only switches flags of this one loop:
  ddpo   : no critic; every step gets the standardised normalised reward as advantage.
  tdpo   : critic on; A_k = G_k - V(x_k), standardised; no reset.
  tdpo_r : tdpo + reset of the critic's active neurons every `reset.period` epochs.
"""
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
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib

ALGORITHMS = {
    # name: (use_critic, use_reset)
    "ddpo": (False, False),
    "tdpo": (True, False),
    "tdpo_r": (True, True),
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
  if config.reset.period < 1:
    raise ValueError(f"reset.period={config.reset.period} must be >= 1")
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
    if self.use_critic and self.pipeline.image_encoder is None:
      raise ValueError(
          f"algorithm {config.algorithm!r} needs a critic image encoder: none found in "
          f"{config.pretrained.model!r} (set pretrained.image_encoder)")
    self.root_key = jax.random.key(config.seed)
    self.num_steps = config.sample.num_steps
    self.input_uncond = rollout.tokenize_prompts(self.pipeline, [""])[1]
    self._build_kernels()

  # ---------------------------------------------------------------- setup
  def _build_kernels(self):
    config, pipeline, mesh = self.config, self.pipeline, self.mesh
    rules = config.sharding.rules
    replicated = sharding_lib.replicated(mesh)
    rows = sharding_lib.batch_sharding(mesh)  # leading dim over ("data", "fsdp")
    self.jit_encode_text = jax.jit(
        lambda params, ids: pipeline_lib.encode_text(pipeline, params, ids))
    # Frozen models by the config's partition rules (paths "unet/...", "vae/...", ...).
    self.frozen_shardings = sharding_lib.tree_shardings(mesh, rules, train_step_lib.FrozenParams(
        unet=pipeline.unet_params, text_encoder=pipeline.text_encoder_params,
        vae=pipeline.vae_params, image_encoder=pipeline.image_encoder_params,
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
    if pipeline.image_encoder is not None:
      def embed_fn(vae_params, encoder_params, latents):
        return critic_lib.embed_noisy_latents(
            lambda x: pipeline_lib.decode_latents(pipeline, vae_params, x),
            lambda images: image_encoder_lib.embed_images(pipeline, encoder_params, images),
            latents)
      self.jit_embed = jax.jit(embed_fn)
      probe_image = jnp.zeros((1, config.sample.height, config.sample.width, 3), jnp.float32)
      embed_dim = jax.eval_shape(
          lambda p, x: image_encoder_lib.embed_images(pipeline, p, x),
          pipeline.image_encoder_params, probe_image).shape[-1]
    else:
      self.jit_embed, embed_dim = None, 1
    self.embed_dim = int(embed_dim)
    self.critic = critic_lib.make_critic(config.critic, self.embed_dim)
    self.critic_init_std = self.critic.init_std
    self.jit_values = jax.jit(
        lambda params, embeds: self.critic.apply({"params": params}, embeds, deterministic=True))
    self.jit_normalise = jax.jit(
        lambda state, index, r: stats.normalise(
            state, index, r, min_count=config.stats.min_count, eps=config.stats.eps))
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
    critic_tx = train_step_lib.make_optimizers(config.train)[1]
    self.jit_reset = jax.jit(
        lambda params, opt_state, probe, rng: reset_lib.reset_critic(
            self.critic, params, opt_state, probe, rng, tau=config.reset.tau,
            target=config.reset.target, init_std=self.critic_init_std, optimizer=critic_tx))
    self.jit_dormant = jax.jit(
        lambda params, probe: reset_lib.dormant_fractions(
            self.critic, params, probe, config.reset.tau))
    if config.train.kl_mode == "return_penalty" and config.train.kl_coef > 0:
      self.jit_ref_log_probs = jax.jit(self._ref_log_probs)
    else:
      self.jit_ref_log_probs = None

  def frozen_params(self):
    """The frozen models placed on the mesh by `config.sharding.rules` (`FrozenParams`)."""
    pipeline = self.pipeline
    text_encoder = sharding_lib.put_tree(pipeline.text_encoder_params,
                                         self.frozen_shardings.text_encoder)
    uncond = self.jit_encode_text(text_encoder, self.input_uncond)
    return sharding_lib.put_tree(train_step_lib.FrozenParams(
        unet=pipeline.unet_params, text_encoder=text_encoder,
        vae=pipeline.vae_params, image_encoder=pipeline.image_encoder_params,
        uncond_embeds=uncond), self.frozen_shardings)

  def init_state(self):
    """A fresh `TrainState`, born sharded (`state_shardings`): LoRA at B = 0 (policy ==
    pre-trained), critic at its init."""
    unet = sharding_lib.put_tree(self.pipeline.unet_params, self.frozen_shardings.unet)
    return self.jit_init_state(unet)

  # ---------------------------------------------------------------- phases
  def sample(self, state, frozen, epoch, progress=False):
    """Samples the epoch's N trajectories; returns (trajectory with leading dim N, prompt ids)."""
    config = self.config
    params = self.rollout_params(state, frozen)
    sample_key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_SAMPLE), epoch)
    host_rng = np.random.default_rng([config.seed, epoch])
    trajectories, prompt_index = [], []
    batches = range(config.sample.num_batches_per_epoch)
    for batch in tqdm.tqdm(batches, desc=f"epoch {epoch} sample", disable=not progress,
                           leave=False):
      index = prompts_lib.sample_prompt_indices(host_rng, len(self.prompts),
                                                config.sample.batch_size)
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

  def embed_states(self, frozen, trajectory):
    """Frozen critic embeddings of x_T ... x_1 for every sample: (N, T, d)."""
    latents = trajectory.latents[:, :self.num_steps]
    n, t = latents.shape[:2]
    batch = self.config.sample.batch_size
    chunks = [self.jit_embed(frozen.vae, frozen.image_encoder,
                             latents[i:i + batch].reshape((-1,) + latents.shape[2:]))
              for i in range(0, n, batch)]
    return jnp.concatenate(chunks).reshape(n, t, -1)

  def _ref_log_probs(self, frozen, trajectory):
    """log pi_ref of every sampled transition under the frozen pre-trained UNet: (N, T)."""
    config = self.config
    alphas = jnp.asarray(ddim.alphas_cumprod(self.pipeline.scheduler_config))

    def per_step(latents, next_latents, timesteps):
      eps = rollout.guided_eps(self.pipeline, frozen.unet, latents, timesteps,
                               trajectory.prompt_embeds, frozen.uncond_embeds,
                               config.sample.guidance_scale)
      return ddim.log_prob(eps, timesteps, latents, next_latents, alphas, self.num_steps,
                           config.sample.eta)

    return jax.vmap(per_step, in_axes=(1, 1, 1), out_axes=1)(
        trajectory.latents[:, :-1], trajectory.latents[:, 1:], trajectory.timesteps)

  def transitions(self, trajectory, embeds, advantages, returns, values, epoch):
    """Gathers the epoch's training transitions, timestep-outer, into optimizer-step batches.

    Each sample's timestep order is shuffled independently, and samples are shuffled; pass j
    trains every sample at its j-th shuffled timestep, in micro-batches of M.

    Returns:
      a `TransitionBatch` with leading dims (S, k, M): S optimizer steps of k micro-batches.
    """
    config = self.config
    n = trajectory.latents.shape[0]
    t_train = num_train_timesteps(config)
    micro, accum = config.train.batch_size, config.train.gradient_accumulation_steps
    key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_TRAIN), epoch)
    sample_perm = jax.random.permutation(jax.random.fold_in(key, 0), n)
    step_perm = jax.vmap(lambda k: jax.random.permutation(k, self.num_steps))(
        jax.random.split(jax.random.fold_in(key, 1), n))
    sample_index = jnp.broadcast_to(sample_perm[None], (t_train, n))   # pass j, slot i
    step_index = step_perm[sample_perm][:, :t_train].T                  # (t_train, n)
    shape = (-1, accum, micro)
    # Host indices: process-local arrays cannot index arrays that span processes.
    sample_index = np.asarray(sample_index).reshape(shape)
    step_index = np.asarray(step_index).reshape(shape)
    take = lambda x: x[sample_index, step_index]
    return train_step_lib.TransitionBatch(
        latents=take(trajectory.latents[:, :-1]),
        next_latents=take(trajectory.latents[:, 1:]),
        timesteps=take(trajectory.timesteps),
        old_log_probs=take(trajectory.log_probs),
        advantages=take(advantages),
        returns=take(returns),
        old_values=take(values),
        embeds=take(embeds),
        prompt_embeds=trajectory.prompt_embeds[sample_index])

  def run_epoch(self, state, frozen, progress=False):
    """One epoch. Returns (new state, metrics dict of Python floats, host images, prompts, rewards)."""
    config = self.config
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
    normaliser, normalised = self.jit_normalise(state.normaliser, prompt_index, reward)
    returns = jnp.broadcast_to(normalised[:, None], trajectory.log_probs.shape)
    metrics = {}
    if self.jit_ref_log_probs is not None:
      ref_log_probs = self.jit_ref_log_probs(frozen, trajectory)
      penalty = objectives.return_kl_penalty(trajectory.log_probs, ref_log_probs)
      returns = objectives.returns_from_rewards(
          normalised, self.num_steps, penalty, config.train.kl_coef)
      metrics["policy/kl_penalty"] = jnp.mean(penalty)
    times["normalise"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if self.use_critic:
      embeds = self.embed_states(frozen, trajectory)
      values = self.jit_values(state.critic_params, embeds.reshape(-1, self.embed_dim)).reshape(
          returns.shape)
      metrics["critic/explained_variance"] = objectives.explained_variance(values, returns)
      metrics["critic/value_mean"] = jnp.mean(values)
    else:
      embeds = jnp.zeros(returns.shape + (self.embed_dim,), jnp.float32)
      values = None
    advantages = objectives.advantages(returns, values, config.train.adv_eps)
    values = jnp.zeros_like(returns) if values is None else values
    jax.block_until_ready(advantages)
    times["critic"] = time.perf_counter() - tic

    tic = time.perf_counter()
    # The train step's in_shardings: state by the rules, transitions split on M.
    state = jax.device_put(state.replace(normaliser=normaliser), self.state_shardings)
    batches = self.transitions(trajectory, embeds, advantages, returns, values, epoch)
    batches = jax.device_put(batches, sharding_lib.batch_sharding(self.mesh, axis=2))
    num_updates = batches.latents.shape[0]
    train_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_TRAIN), epoch), 2)
    step_metrics = []
    for update in tqdm.trange(num_updates, desc=f"epoch {epoch} train", disable=not progress,
                              leave=False):
      batch = jax.device_put(jax.tree.map(lambda x, u=update: x[u], batches),
                             self.transition_sharding)
      rng = sharding_lib.replicate_host(jax.random.fold_in(train_key, update), self.mesh)
      state, step_out = self.jit_train_step(state, frozen, batch, rng)
      step_metrics.append(step_out)
    step_metrics = jax.device_get(step_metrics)  # one transfer per epoch
    times["train"] = time.perf_counter() - tic
    metrics.update({k: np.mean([m[k] for m in step_metrics]) for k in step_metrics[0]})
    for key in ("policy/loss", "critic/value_loss"):
      if key in metrics and not np.isfinite(metrics[key]):
        raise NonFiniteError(f"epoch {epoch}: {key} is {metrics[key]}; stopping, earlier "
                             "outputs kept")

    tic = time.perf_counter()
    if self.use_critic:
      probe = self._probe(embeds, epoch)
      metrics.update(self.jit_dormant(state.critic_params, probe))
      if self.use_reset and (epoch + 1) % config.reset.period == 0:
        reset_key = sharding_lib.replicate_host(jax.random.fold_in(
            jax.random.fold_in(self.root_key, STREAM_RESET), int(state.reset_count)), self.mesh)
        critic_params, critic_opt_state, reset_stats = self.jit_reset(
            state.critic_params, state.critic_opt_state, probe, reset_key)
        state = state.replace(critic_params=critic_params, critic_opt_state=critic_opt_state,
                              reset_count=state.reset_count + 1)
        metrics.update(reset_stats)
    times["reset"] = time.perf_counter() - tic

    state = state.replace(epoch=state.epoch + 1)
    metrics.update({
        "epoch": epoch,
        "reward/mean": float(reward.mean()),
        "reward/std": float(reward.std()),
        "reward/min": float(reward.min()),
        "reward/max": float(reward.max()),
        "train/num_updates": num_updates,
        "train/optimizer_steps_total": int(state.step),
    })
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return state, metrics, images, prompts, reward

  def _probe(self, embeds, epoch):
    """`reset.probe_size` embeddings of this epoch's states at random (sample, timestep)."""
    flat = embeds.reshape(-1, self.embed_dim)
    key = jax.random.fold_in(jax.random.fold_in(self.root_key, STREAM_PROBE), epoch)
    size = min(self.config.reset.probe_size, flat.shape[0])
    return flat[np.asarray(jax.random.choice(key, flat.shape[0], (size,), replace=False))]


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


def summary_line(metrics):
  """One human-readable line per epoch (the full set goes to metrics.jsonl / TensorBoard)."""
  parts = [f"epoch {int(metrics['epoch'])}",
           f"reward {metrics['reward/mean']:.4f} ± {metrics['reward/std']:.4f}",
           f"policy loss {metrics['policy/loss']:+.2e} kl {metrics['policy/approx_kl']:.1e} "
           f"clip {metrics['policy/clipfrac']:.2f}"]
  if "critic/value_loss" in metrics:
    parts.append(f"value loss {metrics['critic/value_loss']:.4f} "
                 f"ev {metrics['critic/explained_variance']:+.3f}")
  dormant = [metrics[k] for k in sorted(metrics) if k.startswith("reset/dormant_frac/l")]
  if dormant:
    parts.append("dormant " + "/".join(f"{d:.2f}" for d in dormant))
  if "reset/num_reset" in metrics:
    parts.append(f"reset {int(metrics['reset/num_reset'])} neurons")
  parts.append(f"{metrics['time/epoch_s']:.1f} s")
  return " | ".join(parts)


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
