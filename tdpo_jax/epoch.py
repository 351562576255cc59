"""The pure math of one epoch between the sampler and the optimizer (DESIGN §3).

Shapes: N samples per epoch, T DDIM steps, t_train = int(T * train.timestep_fraction) trained
steps per sample, M train micro-batch, k micro-batches per optimizer step, S = t_train N / (k M)
optimizer steps, d critic embedding width; latents NCHW. State index k = 0 is x_T, T - 1 is x_1.

Every function here is a function of its arguments: no module state, no keys in closures. The
jitted kernels that run them, with their shardings, are declared in `kernels.py`; the host loop
that calls those kernels is `train.py`.

Randomness. Every key is `fold_in` of the run's root key `TrainState.rng` (= key(config.seed),
never advanced) by a stream, then by the epoch (or the reset count), then by an index:
  sample  rng / STREAM_SAMPLE / epoch / sample batch                 the rollout's noise
  train   rng / STREAM_TRAIN / epoch / TRAIN_SAMPLE_ORDER            the order of the samples
          rng / STREAM_TRAIN / epoch / TRAIN_STEP_ORDER / sample     each sample's timestep order
          rng / STREAM_TRAIN / epoch / TRAIN_UPDATES / update        the train step (critic dropout)
  probe   rng / STREAM_PROBE / epoch                                 the reset's probe states
  reset   rng / STREAM_RESET / reset count                           re-initialised weights
  init    rng / STREAM_INIT / 0 (LoRA), 1 (critic)                   the initial state
so a run is a function of (config, seed), and a resumed run draws what an uninterrupted one does.
"""
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from tdpo_jax import config_checks
from tdpo_jax import critic as critic_lib
from tdpo_jax import critic_tower
from tdpo_jax import ddim
from tdpo_jax import objectives
from tdpo_jax import policy
from tdpo_jax import reset as reset_lib
from tdpo_jax import rollout
from tdpo_jax import stats
from tdpo_jax import train_step as train_step_lib
from tdpo_jax.models import pipeline as pipeline_lib

# Independent RNG streams folded into the root key (STYLE: keys depend on (seed, stream, ...)).
STREAM_INIT, STREAM_SAMPLE, STREAM_TRAIN, STREAM_RESET, STREAM_PROBE = range(5)
# Sub-streams of STREAM_TRAIN within one epoch.
TRAIN_SAMPLE_ORDER, TRAIN_STEP_ORDER, TRAIN_UPDATES = range(3)
# Sub-streams of STREAM_INIT.
INIT_POLICY, INIT_CRITIC = range(2)


@dataclasses.dataclass(frozen=True)
class EpochModels:
  """The modules one epoch runs, assembled once from the loaded pipeline (no parameters).

  Attributes:
    policy_pipeline: the pipeline at `precision.policy` (rollout, train step).
    frozen_pipeline: the pipeline at `precision.frozen` (reference UNet, VAE, towers).
    tower: the critic's frozen image tower (`critic_tower.Tower`), or None (no image encoder).
    critic: the `critic.CriticMLP` module.
    embed_dim: d, the tower's embedding width (1 without a tower).
  """
  policy_pipeline: Any
  frozen_pipeline: Any
  tower: Any
  critic: critic_lib.CriticMLP
  embed_dim: int


def make_epoch_models(config, pipeline):
  """`EpochModels` of `config` on a loaded (or abstract, `jax.ShapeDtypeStruct`) pipeline."""
  precision = config.precision
  policy_pipeline = pipeline_lib.with_precision(pipeline, unet=precision.policy,
                                                frozen=precision.frozen)
  frozen_pipeline = pipeline_lib.with_precision(pipeline, unet=precision.frozen,
                                                frozen=precision.frozen)
  tower = critic_tower.make_tower(config, frozen_pipeline)
  use_critic = config_checks.ALGORITHMS[config.algorithm][0]
  if use_critic and tower is None:
    raise ValueError(
        f"algorithm {config.algorithm!r} needs a critic image encoder: none found in "
        f"{config.pretrained.model!r} (set pretrained.image_encoder or critic.tower)")
  if tower is not None:
    probe_image = jax.ShapeDtypeStruct((1, config.sample.height, config.sample.width, 3),
                                       jnp.float32)
    embed_dim = int(jax.eval_shape(tower.embed_fn, tower.params, probe_image).shape[-1])
  else:
    embed_dim = 1
  return EpochModels(policy_pipeline=policy_pipeline, frozen_pipeline=frozen_pipeline,
                     tower=tower, critic=critic_lib.make_critic(config.critic, embed_dim),
                     embed_dim=embed_dim)


# ------------------------------------------------------------------------------------ keys
def stream_key(rng, stream, index):
  """fold_in(fold_in(rng, stream), index): the key of one stream at one epoch (or reset)."""
  return jax.random.fold_in(jax.random.fold_in(rng, stream), index)


def sample_key(rng, epoch, batch):
  """The rollout key of sample batch `batch` of epoch `epoch` (its noise is a function of it)."""
  return jax.random.fold_in(stream_key(rng, STREAM_SAMPLE, epoch), batch)


def train_updates_key(rng, epoch):
  """The key the epoch's optimizer step u folds u into (`train_epoch`)."""
  return jax.random.fold_in(stream_key(rng, STREAM_TRAIN, epoch), TRAIN_UPDATES)


# ------------------------------------------------------------------------------- the state
def init_state(config, critic, embed_dim, num_prompts, base_unet_params, seed):
  """A fresh `TrainState` (pure; jit it with the state's out_shardings).

  LoRA at B = 0 (policy == pre-trained) or a copy of the full UNet; the critic at its init; zero
  counters; the normaliser's (num_prompts, stats.buffer_size) buffers; the root key
  rng = key(seed), which every later key folds from.

  Args:
    config: the run config (lora, train, stats).
    critic: the `critic.CriticMLP` module; embed_dim: its input width d.
    num_prompts: P, the rows of the per-prompt normaliser.
    base_unet_params: the pre-trained UNet's parameters.
    seed: int32 scalar, config.seed.
  """
  rng = jax.random.key(seed)
  key = jax.random.fold_in(rng, STREAM_INIT)
  policy_params = policy.init_policy_params(
      config.lora, base_unet_params, jax.random.fold_in(key, INIT_POLICY))
  critic_params = critic.init(
      jax.random.fold_in(key, INIT_CRITIC), jnp.zeros((1, embed_dim)),
      deterministic=True)["params"]
  policy_tx, critic_tx = train_step_lib.make_optimizers(config.train)
  return train_step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), epoch=jnp.zeros((), jnp.int32),
      policy_params=policy_params, policy_opt_state=policy_tx.init(policy_params),
      critic_params=critic_params, critic_opt_state=critic_tx.init(critic_params),
      normaliser=stats.init_normaliser(num_prompts, config.stats.buffer_size),
      reset_count=jnp.zeros((), jnp.int32), rng=rng)


# ------------------------------------------------------------------- the transition order
def train_indices(rng, epoch, num_samples, num_steps, num_train_steps):
  """The (sample, timestep) pairs the train phase visits, pass-major (timestep-outer).

  Each sample's timestep order is shuffled independently (key TRAIN_STEP_ORDER, one per sample)
  and the samples are shuffled (key TRAIN_SAMPLE_ORDER); pass j trains every sample, in the
  shuffled sample order, at its j-th shuffled timestep, for j < t_train.

  Args:
    rng: the root key; epoch: int or traced int32.
    num_samples: N; num_steps: T; num_train_steps: t_train <= T.
  Returns:
    (sample_index, step_index): two (t_train, N) int32; entry [j, i] is the i-th pair of pass j.
  """
  key = stream_key(rng, STREAM_TRAIN, epoch)
  sample_perm = jax.random.permutation(jax.random.fold_in(key, TRAIN_SAMPLE_ORDER), num_samples)
  step_perm = jax.vmap(lambda k: jax.random.permutation(k, num_steps))(
      jax.random.split(jax.random.fold_in(key, TRAIN_STEP_ORDER), num_samples))
  sample_index = jnp.broadcast_to(sample_perm[None], (num_train_steps, num_samples))
  step_index = step_perm[sample_perm][:, :num_train_steps].T
  return sample_index, step_index


def to_updates(x, micro_batch, accumulation):
  """(t_train, N, ...) pass-major pairs -> (S, k, M, ...) optimizer-step batches, order kept."""
  return x.reshape((-1, accumulation, micro_batch) + x.shape[2:])


def gather_transitions(trajectory, returns, sample_index, step_index, advantages, values, embeds,
                       micro_batch, accumulation):
  """The epoch's training transitions in the order of (sample_index, step_index).

  Args:
    trajectory: the epoch's `rollout.Trajectory` (latents (N, T+1, ...), leading dim N).
    returns: (N, T) G of every state.
    sample_index, step_index: (t_train, N) from `train_indices`.
    advantages, values: (t_train, N) and embeds (t_train, N, d), already in pair order.
    micro_batch, accumulation: M and k.
  Returns:
    a `TransitionBatch` with leading dims (S, k, M).
  """
  take = lambda x: to_updates(x[sample_index, step_index], micro_batch, accumulation)
  updates = lambda x: to_updates(x, micro_batch, accumulation)
  return train_step_lib.TransitionBatch(
      latents=take(trajectory.latents[:, :-1]),
      next_latents=take(trajectory.latents[:, 1:]),
      timesteps=take(trajectory.timesteps),
      old_log_probs=take(trajectory.log_probs),
      advantages=updates(advantages),
      returns=take(returns),
      old_values=updates(values),
      embeds=updates(embeds),
      prompt_embeds=updates(trajectory.prompt_embeds[sample_index]))


# ------------------------------------------------------------------------- critic inputs
def in_branches(fn, x, branches):
  """fn over `branches` independent slices of x's leading axis, concatenated: fn(x) (B, ...).

  Each slice is its own chain of ops, with no data dependence between them, so XLA:CPU's
  executor runs them concurrently on its threads; one batched chain of small convolutions keeps
  about one core busy (measured: the tiny VAE decode of 80 latents 1.44 s in one chain, 1.18 s in
  2 and 0.97 s in 4, on 2 cores; the UNet's calls, measured the same way, gained nothing). On an
  accelerator or a mesh, 1 (one chain) is the right value.
  """
  if branches <= 1 or x.shape[0] < 2:
    return fn(x)
  return jnp.concatenate([fn(part) for part in jnp.array_split(x, min(branches, x.shape[0]))])


def embed_latents(models, frozen, latents, chunk_size, branches=1):
  """Frozen critic embeddings of a flat batch of latents (B, C, h, w) -> (B, d).

  One VAE decode + tower call per `chunk_size` latents (lax.map; 0 = the whole batch in one
  call, fastest where it fits in memory). A whole-batch call is split into `branches`
  independent chains (`in_branches`); lax.map's chunks are one vmapped chain each.
  """
  def embed(x):
    return in_branches(lambda part: critic_lib.embed_noisy_latents(
        lambda z: pipeline_lib.decode_latents(models.frozen_pipeline, frozen.vae, z),
        lambda images: models.tower.embed_fn(frozen.image_encoder, images), part), x, branches)
  if chunk_size <= 0 or chunk_size >= latents.shape[0]:
    return embed(latents)
  return jax.lax.map(lambda x: embed(x[None])[0], latents, batch_size=chunk_size)


def embed_states(models, frozen, latents, chunk_size, branches=1):
  """Critic embeddings of x_T .. x_1 of every sample: latents (N, T, C, h, w) -> (N, T, d)."""
  n, t = latents.shape[:2]
  flat = latents.reshape((n * t,) + latents.shape[2:])
  return embed_latents(models, frozen, flat, chunk_size, branches).reshape(n, t, -1)


def probe_embeddings(embeds, rng, epoch, size):
  """`size` of the epoch's state embeddings (..., d) at random, without replacement: (P, d)."""
  flat = embeds.reshape(-1, embeds.shape[-1])
  key = stream_key(rng, STREAM_PROBE, epoch)
  size = min(size, flat.shape[0])
  return flat[jax.random.choice(key, flat.shape[0], (size,), replace=False)]


def ref_log_probs(frozen_pipeline, sample_config, frozen, trajectory):
  """log pi_ref of every sampled transition under the frozen pre-trained UNet: (N, T)."""
  alphas = jnp.asarray(ddim.alphas_cumprod(frozen_pipeline.scheduler_config))
  num_steps = sample_config.num_steps

  def per_step(latents, next_latents, timesteps):
    eps = rollout.guided_eps(frozen_pipeline, frozen.unet, latents, timesteps,
                             trajectory.prompt_embeds, frozen.uncond_embeds,
                             sample_config.guidance_scale)
    return ddim.log_prob(eps, timesteps, latents, next_latents, alphas, num_steps,
                         sample_config.eta)

  return jax.vmap(per_step, in_axes=(1, 1, 1), out_axes=1)(
      trajectory.latents[:, :-1], trajectory.latents[:, 1:], trajectory.timesteps)


# -------------------------------------------------------------------- explained variance
def late_states(num_steps, late_fraction):
  """The first state index of the "late" states: the last ceil(late_fraction T) of x_T .. x_1."""
  return num_steps - max(1, math.ceil(late_fraction * num_steps))


def explained_variance_metrics(values, returns, steps, num_steps, late_fraction):
  """The critic's explained variance of the epoch's states, before the update.

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


# ------------------------------------------------------------------------------ the phases
def prepare(config, models, state, frozen, trajectory, prompt_index, reward):
  """Everything between the reward and the train phase (one jitted kernel).

  Per-prompt normalisation (stats.py; group-relative for grpo), returns (with the optional KL
  return penalty, objectives.return_kl_penalty), the critic's frozen embeddings and values
  V_old(x_t) of the visited states, the advantages A = standardise(G - V) (objectives.py), the
  critic's explained variance before the update, the reset's probe and the timestep-outer gather
  of the training transitions (`train_indices`, `gather_transitions`). The epoch is
  `state.epoch`.

  With `critic.embed_train_timesteps_only` (and train.timestep_fraction < 1) only the
  (sample, timestep) pairs the train phase uses are embedded, and the advantages are
  standardised over those pairs (the official code standardises over all N T pairs).

  Args:
    config: the run config; models: `EpochModels`.
    state: `TrainState` (normaliser, critic params, epoch and rng are read).
    frozen: `FrozenParams`.
    trajectory: the epoch's `Trajectory`, leading dim N.
    prompt_index: (N,) int32; reward: (N,) float32.
  Returns:
    (normaliser, `TransitionBatch` (S, k, M, ...), probe embeddings (P, d) for the reset,
    metrics dict of scalars).
  """
  num_steps = config.sample.num_steps
  num_train_steps = config_checks.num_train_timesteps(config)
  micro, accum = config.train.batch_size, config.train.gradient_accumulation_steps
  use_critic = config_checks.ALGORITHMS[config.algorithm][0]
  epoch = state.epoch
  normaliser, normalised = stats.normalise(
      state.normaliser, prompt_index, reward, min_count=config.stats.min_count,
      eps=config.stats.eps, per_prompt=config.stats.per_prompt)
  if config.algorithm == "grpo":  # the buffers still fill: the state is the same either way
    normalised = stats.group_normalise(reward, config.sample.group_size, config.stats.eps)
  returns = jnp.broadcast_to(normalised[:, None], trajectory.log_probs.shape)
  metrics = {}
  if config.train.kl_mode == "return_penalty" and config.train.kl_coef > 0:
    penalty = objectives.return_kl_penalty(
        trajectory.log_probs, ref_log_probs(models.frozen_pipeline, config.sample, frozen,
                                            trajectory))
    returns = objectives.returns_from_rewards(normalised, num_steps, penalty,
                                              config.train.kl_coef)
    metrics["policy/kl_penalty"] = jnp.mean(penalty)
  n = trajectory.latents.shape[0]
  sample_index, step_index = train_indices(state.rng, epoch, n, num_steps, num_train_steps)
  pairs = lambda x: x[sample_index, step_index]  # (N, T, ...) -> (t_train, N, ...)
  train_only = config.critic.embed_train_timesteps_only and num_train_steps < num_steps
  chunk, branches = int(config.critic.embed_chunk_size), int(config.critic.embed_branches)
  probe = jnp.zeros((1, models.embed_dim), jnp.float32)
  if use_critic:
    if train_only:
      embeds = embed_latents(models, frozen, pairs(trajectory.latents[:, :-1]).reshape(
          (-1,) + trajectory.latents.shape[2:]), chunk, branches)
      returns_used, steps_used = pairs(returns), step_index
    else:
      embeds = embed_states(models, frozen, trajectory.latents[:, :num_steps], chunk, branches)
      returns_used = returns
      steps_used = jnp.broadcast_to(jnp.arange(num_steps), returns.shape)
    values = models.critic.apply({"params": state.critic_params},
                                 embeds.reshape(-1, models.embed_dim), deterministic=True)
    values = values.reshape(returns_used.shape)
    embeds = embeds.reshape(returns_used.shape + (models.embed_dim,))
    metrics.update(explained_variance_metrics(values, returns_used, steps_used, num_steps,
                                              config.critic.late_fraction))
    metrics["critic/value_mean"] = jnp.mean(values)
    advantages = objectives.advantages(returns_used, values, config.train.adv_eps)
    probe = probe_embeddings(embeds, state.rng, epoch, config.reset.probe_size)
    if not train_only:
      embeds, values, advantages = pairs(embeds), pairs(values), pairs(advantages)
  else:
    advantages = pairs(objectives.advantages(returns, None, config.train.adv_eps))
    values = jnp.zeros(advantages.shape, jnp.float32)
    embeds = jnp.zeros(advantages.shape + (models.embed_dim,), jnp.float32)
  batches = gather_transitions(trajectory, returns, sample_index, step_index, advantages,
                               values, embeds, micro, accum)
  return normaliser, batches, probe, metrics


def train_epoch(train_step_fn, state, frozen, batches):
  """The whole train phase: `lax.scan` of the train step over the S optimizer steps.

  Update u uses the key fold_in(`train_updates_key`(state.rng, state.epoch), u).

  Args:
    train_step_fn: `train_step(state, frozen, batch (k, M, ...), rng) -> (state, metrics)`.
    batches: `TransitionBatch` with leading dims (S, k, M).
  Returns:
    (state, metrics with leading dim S).
  """
  key = train_updates_key(state.rng, state.epoch)

  def update(state, inputs):
    index, batch = inputs
    return train_step_fn(state, frozen, batch, jax.random.fold_in(key, index))

  num_updates = batches.latents.shape[0]
  return jax.lax.scan(update, state, (jnp.arange(num_updates), batches))


def dormant_fractions(config, models, critic_params, probe):
  """Per-layer dormant fractions of the critic on the probe (`reset.dormant_fractions`)."""
  return reset_lib.dormant_fractions(models.critic, critic_params, probe, config.reset.tau)


def reset_critic(config, models, state, probe):
  """The active-neuron reset of the critic in `state` (reset.py), keyed by the reset count.

  Returns:
    (state with the reset critic, its optimizer moments zeroed and reset_count + 1, metrics).
  """
  critic_tx = train_step_lib.make_optimizers(config.train)[1]
  params, opt_state, metrics = reset_lib.reset_critic(
      models.critic, state.critic_params, state.critic_opt_state, probe,
      stream_key(state.rng, STREAM_RESET, state.reset_count), tau=config.reset.tau,
      target=config.reset.target, init_std=models.critic.init_std, optimizer=critic_tx)
  return state.replace(critic_params=params, critic_opt_state=opt_state,
                       reset_count=state.reset_count + 1), metrics

