"""The jitted sampler: text encoding, T DDIM steps with classifier-free guidance, final decode.

Shapes: B images per call, T DDIM steps, L text tokens (77), D text width, latents NCHW
(C, h, w) as the Flax UNet takes them; images NHWC in [0, 1].

One `lax.scan` over the T steps; each step makes one UNet call on the batch
`[uncond; cond]` (2B) and one DDIM step with log-probability (DESIGN §3, `ddim.py`). The noise of
step k is `normal(fold_in(rng, k + 1))` and x_T is `normal(fold_in(rng, 0))`, so a trajectory
depends only on (params, prompts, rng).

`make_path_kl_rollout_fn` samples the same trajectory and also the KL of its path to a reference
UNet (the evaluation's `kl_to_pretrained`): each step adds the reference's guided UNet call on the
visited x_t and reuses the policy's own, 2 guided calls per step where sampling and then
recomputing both means took 3.
"""
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax import ddim
from tdpo_jax import objectives
from tdpo_jax.models import pipeline as pipeline_lib


class RolloutParams(flax.struct.PyTreeNode):
  """Parameters the sampler reads: the policy UNet (LoRA already merged) and frozen models."""
  unet: dict
  text_encoder: dict
  vae: dict


class Trajectory(flax.struct.PyTreeNode):
  """One batch of sampled trajectories.

  Attributes:
    latents: (B, T + 1, C, h, w) x_T, ..., x_0 (index k holds the input of step k).
    log_probs: (B, T) log pi(x_{k+1 index} | x_k, c) of each step, as sampled.
    timesteps: (B, T) int32 DDIM timestep of each step (981, ..., 1 for T = 50).
    prompt_embeds: (B, L, D) text-encoder states of the prompts.
    uncond_embeds: (1, L, D) states of the empty prompt (classifier-free guidance).
    images: (B, H, W, 3) decoded x_0 in [0, 1].
  """
  latents: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array
  prompt_embeds: jax.Array
  uncond_embeds: jax.Array
  images: jax.Array


def guided_eps(pipeline, unet_params, latents, timestep, prompt_embeds, uncond_embeds,
               guidance_scale):
  """eps_u + w (eps_c - eps_u) from ONE UNet call on [uncond; cond].

  Args:
    latents: (B, C, h, w); timestep: scalar or (B,) int; prompt_embeds: (B, L, D);
    uncond_embeds: (1, L, D) or (B, L, D).
  Returns:
    (B, C, h, w) guided noise prediction.
  """
  batch = latents.shape[0]
  timesteps = jnp.broadcast_to(jnp.asarray(timestep, jnp.int32), (batch,))
  uncond = jnp.broadcast_to(uncond_embeds, prompt_embeds.shape)
  eps = pipeline_lib.unet_eps(
      pipeline, unet_params,
      jnp.concatenate([latents, latents]),
      jnp.concatenate([timesteps, timesteps]),
      jnp.concatenate([uncond, prompt_embeds]))
  eps_uncond, eps_cond = jnp.split(eps, 2)
  return ddim.classifier_free_guidance(eps_uncond, eps_cond, guidance_scale)


def latent_shape(pipeline, sample_config):
  """(C, h, w) of the latents for the configured image size (VAE downsamples 2^(n-1) times)."""
  factor = 2 ** pipeline.vae.config.num_downsamplers
  if sample_config.height % factor or sample_config.width % factor:
    raise ValueError(
        f"image size {sample_config.height}x{sample_config.width} must be a multiple of the "
        f"VAE's downsampling factor {factor}")
  return (pipeline.vae.config.latent_channels, sample_config.height // factor,
          sample_config.width // factor)


def make_rollout_fn(pipeline, sample_config):
  """Builds `rollout_fn(params, input_ids, uncond_ids, rng) -> Trajectory` (pure, jittable).

  Args:
    pipeline: a `models.pipeline.Pipeline` (module handles; its params are passed per call).
    sample_config: `config.sample` (num_steps, eta, guidance_scale, height, width).
  """
  sample = _make_sampler(pipeline, sample_config)

  def rollout_fn(params, input_ids, uncond_ids, rng):
    """Samples B images.

    Args:
      params: `RolloutParams`.
      input_ids: (B, L) int32 prompt tokens; uncond_ids: (1, L) tokens of "".
      rng: a PRNG key.
    """
    trajectory, _ = sample(params, input_ids, uncond_ids, rng, None)
    return trajectory

  return rollout_fn


def make_path_kl_rollout_fn(pipeline, sample_config):
  """Builds `rollout_fn(params, input_ids, uncond_ids, rng, reference_unet) -> (Trajectory,
  path_kl (B,))` (pure, jittable): `make_rollout_fn`'s trajectory (the same for the same
  arguments) and the KL of its sampling path to the policy with UNet `reference_unet`:

      KL_path = sum_t mean_{C,h,w} (mu_theta(x_t, t) - mu_ref(x_t, t))^2 / (2 std_t^2)

  (`objectives.gaussian_kl` per step: both transitions are N(mu, std_t^2 I) with the same std).
  mu_theta is the mean the step sampled from; mu_ref comes from the reference's guided UNet call
  on the same x_t, through the same `pipeline` (one precision for both, so a precision
  difference never shows up as KL; a reference equal to the policy gives exactly 0).
  """
  sample = _make_sampler(pipeline, sample_config)

  def rollout_fn(params, input_ids, uncond_ids, rng, reference_unet):
    return sample(params, input_ids, uncond_ids, rng, reference_unet)

  return rollout_fn


def _make_sampler(pipeline, sample_config):
  """`sample(params, input_ids, uncond_ids, rng, reference_unet or None) -> (Trajectory,
  path KL (B,) or None)`: the scan both builders above wrap."""
  alphas_cumprod = jnp.asarray(ddim.alphas_cumprod(pipeline.scheduler_config))
  timesteps = ddim.ddim_timesteps(sample_config.num_steps, pipeline.scheduler_config)
  num_steps = int(sample_config.num_steps)
  eta = float(sample_config.eta)
  guidance_scale = float(sample_config.guidance_scale)
  channels, height, width = latent_shape(pipeline, sample_config)

  def sample(params, input_ids, uncond_ids, rng, reference_unet):
    batch = input_ids.shape[0]
    prompt_embeds = pipeline_lib.encode_text(pipeline, params.text_encoder, input_ids)
    uncond_embeds = pipeline_lib.encode_text(pipeline, params.text_encoder, uncond_ids)
    x_T = jax.random.normal(jax.random.fold_in(rng, 0), (batch, channels, height, width),
                            prompt_embeds.dtype)

    def step(latents, inputs):
      index, timestep = inputs
      eps = guided_eps(pipeline, params.unet, latents, timestep, prompt_embeds, uncond_embeds,
                       guidance_scale)
      noise = jax.random.normal(jax.random.fold_in(rng, index + 1), latents.shape, latents.dtype)
      out = ddim.ddim_step(eps, timestep, latents, alphas_cumprod, num_steps, eta, noise)
      if reference_unet is None:
        return out.prev_sample, (out.prev_sample, out.log_prob)
      ref_eps = guided_eps(pipeline, reference_unet, latents, timestep, prompt_embeds,
                           uncond_embeds, guidance_scale)
      ref_mean, _ = ddim.ddim_mean_std(ref_eps, timestep, latents, alphas_cumprod, num_steps,
                                       eta)
      return out.prev_sample, (out.prev_sample, out.log_prob,
                               objectives.gaussian_kl(out.mean, ref_mean, out.std))

    x_0, outputs = jax.lax.scan(step, x_T, (jnp.arange(num_steps), jnp.asarray(timesteps)))
    next_latents, log_probs = outputs[:2]
    latents = jnp.concatenate([x_T[None], next_latents], axis=0)  # (T+1, B, C, h, w)
    images = pipeline_lib.decode_latents(pipeline, params.vae, x_0)
    trajectory = Trajectory(
        latents=jnp.swapaxes(latents, 0, 1),
        log_probs=jnp.swapaxes(log_probs, 0, 1),
        timesteps=jnp.broadcast_to(jnp.asarray(timesteps)[None], (batch, num_steps)),
        prompt_embeds=prompt_embeds,
        uncond_embeds=uncond_embeds,
        images=images)
    path_kl = None if reference_unet is None else jnp.sum(outputs[2], axis=0)  # (T, B) -> (B,)
    return trajectory, path_kl

  return sample


def tokenize_prompts(pipeline, prompts):
  """(input_ids (B, L), uncond_ids (1, L)) as int32 NumPy arrays."""
  return (np.asarray(pipeline_lib.tokenize(pipeline.tokenizer, list(prompts)), np.int32),
          np.asarray(pipeline_lib.tokenize(pipeline.tokenizer, [""]), np.int32))
