"""The pure train step: one optimizer step of the policy and of the critic over k micro-batches.

Shapes: k micro-batches of M transitions each (one optimizer step accumulates k micro-batches);
latents NCHW (C, h, w); L text tokens, D text width; d critic embedding width.

For every transition (x_t, x_{t-1}, c) sampled by the rollout the step

1. recomputes log pi_theta(x_{t-1} | x_t, c) with the current policy (guided eps, DDIM mean and
   std, `ddim.log_prob`),
2. takes the PPO-clip loss with the stored advantage (`objectives.ppo_policy_loss`),
   optionally plus the closed-form Gaussian KL to the reference (frozen) UNet,
3. evaluates the critic on the frozen embedding of x_t with dropout on and takes the clipped
   value loss (`objectives.clipped_value_loss`),

accumulates the gradients of the k micro-batches with `lax.scan` (mean over micro-batches, so
k micro-batches equal one batch of k M transitions; `train.fuse_micro_batches` evaluates them as
that one batch instead, trading memory for speed), then applies one AdamW step with global-norm
clipping to each model (two optimizers). With `use_critic=False` (DDPO) the critic is untouched.
"""
import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax

from tdpo_jax import config_checks
from tdpo_jax import ddim
from tdpo_jax import objectives
from tdpo_jax import policy
from tdpo_jax import rollout
from tdpo_jax import stats
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.models import unet as unet_lib

# `train.remat`: "none", "unet" (jax.checkpoint around the whole UNet call) or "blocks" (each
# down/mid/up block rematerialised inside the UNet); declared in config_checks (no jax there).
REMAT_MODES = config_checks.REMAT_MODES
# What remat keeps: dots without batch dims (weights x activations), cheap to keep, costly to redo.
REMAT_POLICY = "dots_with_no_batch_dims_saveable"


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training (all of it is checkpointed).

  Attributes:
    step: number of optimizer steps taken.
    epoch: number of epochs completed.
    policy_params: LoRA adapters or full UNet parameters.
    policy_opt_state / critic_opt_state: the two AdamW states.
    critic_params: the critic MLP's parameters.
    normaliser: the per-prompt reward normaliser (`stats.NormaliserState`).
    reset_count: number of neuron resets done (folds the reset key).
    rng: the root key; every random draw folds (stream, epoch, step) into it.
  """
  step: jax.Array
  epoch: jax.Array
  policy_params: dict
  policy_opt_state: optax.OptState
  critic_params: dict
  critic_opt_state: optax.OptState
  normaliser: stats.NormaliserState
  reset_count: jax.Array
  rng: jax.Array


class FrozenParams(flax.struct.PyTreeNode):
  """Parameters that never change: the pre-trained (reference) UNet and the frozen models."""
  unet: dict
  text_encoder: dict
  vae: dict
  image_encoder: dict | None
  uncond_embeds: jax.Array  # (1, L, D) text states of the empty prompt


class TransitionBatch(flax.struct.PyTreeNode):
  """k micro-batches of M transitions: every leaf has leading dims (k, M).

  Attributes:
    latents: (k, M, C, h, w) x_t.       next_latents: (k, M, C, h, w) x_{t-1}.
    timesteps: (k, M) int32.             old_log_probs: (k, M) log pi_old from the rollout.
    advantages: (k, M).                  returns: (k, M) G.
    old_values: (k, M) V_old(x_t).       embeds: (k, M, d) frozen critic embedding of x_t.
    prompt_embeds: (k, M, L, D).
  """
  latents: jax.Array
  next_latents: jax.Array
  timesteps: jax.Array
  old_log_probs: jax.Array
  advantages: jax.Array
  returns: jax.Array
  old_values: jax.Array
  embeds: jax.Array
  prompt_embeds: jax.Array


def make_optimizer(train_config, learning_rate):
  """AdamW with global-norm clipping (DESIGN §3: lr 1e-4, betas (0.9, 0.999), wd 1e-4, eps 1e-8)."""
  return optax.chain(
      optax.clip_by_global_norm(train_config.max_grad_norm),
      optax.adamw(learning_rate, b1=train_config.adam_beta1, b2=train_config.adam_beta2,
                  eps=train_config.adam_epsilon, weight_decay=train_config.adam_weight_decay))


def make_optimizers(train_config):
  """(policy optimizer, critic optimizer)."""
  return (make_optimizer(train_config, train_config.learning_rate),
          make_optimizer(train_config, train_config.critic_learning_rate))


def make_train_step(pipeline, critic, config, *, use_critic):
  """Builds `train_step(state, frozen, batch, rng) -> (state, metrics)` (pure; jit it).

  Args:
    pipeline: `models.pipeline.Pipeline` (module handles).
    critic: the `critic.CriticMLP` module.
    config: the full config (sample, train, lora sections are read).
    use_critic: False for DDPO (no value loss, critic not updated).
  """
  train_config = config.train
  alphas_cumprod = jnp.asarray(ddim.alphas_cumprod(pipeline.scheduler_config))
  num_steps = int(config.sample.num_steps)
  eta = float(config.sample.eta)
  guidance_scale = float(config.sample.guidance_scale) if train_config.cfg else None
  policy_tx, critic_tx = make_optimizers(train_config)
  gaussian_kl = train_config.kl_mode == "gaussian" and train_config.kl_coef > 0

  if train_config.remat == "blocks":
    # The same per down/mid/up block (`nn.remat` inside the UNet): the backward pass holds one
    # block's activations at a time instead of the whole UNet's.
    pipeline = dataclasses.replace(pipeline, unet=pipeline.unet.clone(
        remat_blocks=True, remat_policy=REMAT_POLICY))

  def eps_fn(unet_params, latents, timesteps, prompt_embeds, uncond_embeds):
    if guidance_scale is None:  # train on the conditional prediction only
      return pipeline_lib.unet_eps(pipeline, unet_params, latents, timesteps, prompt_embeds)
    return rollout.guided_eps(pipeline, unet_params, latents, timesteps, prompt_embeds,
                              uncond_embeds, guidance_scale)

  if train_config.remat == "unet":
    # Keep only the UNet's inputs for the backward pass and recompute its activations there.
    eps_fn = jax.checkpoint(eps_fn, policy=unet_lib.remat_policy_from_name(REMAT_POLICY))
  fuse = train_config.fuse_micro_batches

  def loss_fn(params, frozen, micro, rng):
    policy_params, critic_params = params
    unet_params = policy.unet_params(config.lora, frozen.unet, policy_params)
    eps = eps_fn(unet_params, micro.latents, micro.timesteps, micro.prompt_embeds,
                 frozen.uncond_embeds)
    log_prob = ddim.log_prob(eps, micro.timesteps, micro.latents, micro.next_latents,
                             alphas_cumprod, num_steps, eta)
    policy_loss, metrics = objectives.ppo_policy_loss(
        log_prob, micro.old_log_probs, micro.advantages, train_config.clip_range)
    metrics = {f"policy/{k}": v for k, v in metrics.items()}
    metrics["policy/loss"] = policy_loss
    loss = policy_loss
    if gaussian_kl:
      mean, std = ddim.ddim_mean_std(eps, micro.timesteps, micro.latents, alphas_cumprod,
                                     num_steps, eta)
      ref_eps = eps_fn(frozen.unet, micro.latents, micro.timesteps, micro.prompt_embeds,
                       frozen.uncond_embeds)
      ref_mean, _ = ddim.ddim_mean_std(jax.lax.stop_gradient(ref_eps), micro.timesteps,
                                       micro.latents, alphas_cumprod, num_steps, eta)
      kl = jnp.mean(objectives.gaussian_kl(mean, ref_mean, std))
      metrics["policy/kl_to_ref"] = kl
      loss = loss + train_config.kl_coef * kl
    if use_critic:
      values = critic.apply({"params": critic_params}, micro.embeds, deterministic=False,
                            rngs={"dropout": rng})
      value_loss, value_metrics = objectives.clipped_value_loss(
          values, micro.old_values, micro.returns, train_config.value_clip_range)
      metrics.update({f"critic/{k}": v for k, v in value_metrics.items()})
      metrics["critic/value_loss"] = value_loss
      loss = loss + train_config.value_coef * value_loss
    return loss, metrics

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state, frozen, batch, rng):
    """One optimizer step over the k micro-batches of `batch` (a `TransitionBatch`).

    Returns:
      (new state, metrics): metrics are means over the micro-batches plus gradient and update
      norms, as scalars.
    """
    params = (state.policy_params, state.critic_params)
    if fuse:  # (k, M, ...) -> (1, k M, ...): one gradient of the mean over all k M transitions
      batch = jax.tree.map(lambda x: x.reshape((1, -1) + x.shape[2:]), batch)
    num_micro = batch.latents.shape[0]

    def accumulate(grads_sum, inputs):
      index, micro = inputs
      grads, metrics = grad_fn(params, frozen, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, grads_sum, grads), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads_sum, metrics = jax.lax.scan(accumulate, zeros, (jnp.arange(num_micro), batch))
    policy_grads, critic_grads = jax.tree.map(lambda g: g / num_micro, grads_sum)
    metrics = jax.tree.map(jnp.mean, metrics)

    updates, policy_opt_state = policy_tx.update(policy_grads, state.policy_opt_state,
                                                 state.policy_params)
    policy_params = optax.apply_updates(state.policy_params, updates)
    metrics["policy/grad_norm"] = optax.tree.norm(policy_grads)
    metrics["policy/update_norm"] = optax.tree.norm(updates)
    metrics["policy/param_norm"] = optax.tree.norm(policy_params)
    critic_params, critic_opt_state = state.critic_params, state.critic_opt_state
    if use_critic:
      updates, critic_opt_state = critic_tx.update(critic_grads, critic_opt_state, critic_params)
      critic_params = optax.apply_updates(critic_params, updates)
      metrics["critic/grad_norm"] = optax.tree.norm(critic_grads)
      metrics["critic/update_norm"] = optax.tree.norm(updates)
    new_state = state.replace(
        step=state.step + 1, policy_params=policy_params, policy_opt_state=policy_opt_state,
        critic_params=critic_params, critic_opt_state=critic_opt_state)
    return new_state, metrics

  return train_step
