"""The DDIM step as a Gaussian policy with a log-probability (DESIGN §3).

Shape legend: B batch, T DDIM steps, N training timesteps (`len(alphas_cumprod)`, 1000 for SD),
C, h, w latent channels / height / width. Latents are NCHW, as the Flax UNet takes them.

Each DDIM step x_t -> x_{t-1} is a Gaussian transition pi(x_{t-1} | x_t, c) = N(mu, std^2 I)
(DDPO, Black et al. 2023; TDPO-R, Zhang et al. 2024), with, for `set_alpha_to_one=False` and no
sample clipping:

  t_prev  = t - N // T
  a_prev  = alphas_cumprod[t_prev] if t_prev >= 0 else alphas_cumprod[0]
  x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
  sigma^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev);   std = eta sigma
  mu      = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps
  x_{t-1} = mu + std z,   z ~ N(0, I)
  log pi  = mean over (C, h, w) of  -(x_{t-1} - mu)^2 / (2 std^2) - log std - 1/2 log 2 pi

The log-probability is a *mean* over latent dimensions (as DDPO and the official TDPO code), not
a sum. It is undefined for std = 0, i.e. for eta = 0 or a step with t = 0.
"""
import math

import flax
import jax.numpy as jnp
import numpy as np

_SUPPORTED_BETA_SCHEDULES = ("scaled_linear", "linear")
_SUPPORTED_TIMESTEP_SPACING = "leading"
_SUPPORTED_PREDICTION_TYPE = "epsilon"


class DDIMStep(flax.struct.PyTreeNode):
  """One stochastic DDIM step.

  Attributes:
    prev_sample: (B, C, h, w) x_{t-1} = mean + std * noise.
    mean: (B, C, h, w) mu, the mean of pi(x_{t-1} | x_t, c).
    std: (B, 1, 1, 1) eta * sigma_t, broadcastable against the latents.
    log_prob: (B,) log pi(x_{t-1} | x_t, c), a mean over (C, h, w).
  """
  prev_sample: jnp.ndarray
  mean: jnp.ndarray
  std: jnp.ndarray
  log_prob: jnp.ndarray


def _config_value(scheduler_config, key, default):
  value = scheduler_config.get(key, default)
  return default if value is None else value


def alphas_cumprod(scheduler_config):
  """The cumulative products of (1 - beta) of the training noise schedule.

  Equation: beta = linspace(beta_start, beta_end, N) ("linear") or
  linspace(sqrt(beta_start), sqrt(beta_end), N)^2 ("scaled_linear", SD's), or the config's
  `trained_betas`; alphas_cumprod[t] = prod_{s <= t} (1 - beta_s). Computed in float64, then cast.

  Args:
    scheduler_config: a diffusers scheduler config dict (`num_train_timesteps`, `beta_start`,
      `beta_end`, `beta_schedule`, optionally `trained_betas`, `prediction_type`).

  Returns:
    np.float32 array (N,).
  """
  prediction_type = _config_value(scheduler_config, "prediction_type", _SUPPORTED_PREDICTION_TYPE)
  if prediction_type != _SUPPORTED_PREDICTION_TYPE:
    raise ValueError(f"scheduler prediction_type={prediction_type!r} is not supported; expected "
                     f"{_SUPPORTED_PREDICTION_TYPE!r} (the DDIM step takes a noise prediction)")
  trained_betas = scheduler_config.get("trained_betas")
  if trained_betas is not None:
    betas = np.asarray(trained_betas, dtype=np.float64)
  else:
    num_train_timesteps = int(scheduler_config["num_train_timesteps"])
    if num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps={num_train_timesteps}; expected a positive integer")
    beta_start = float(scheduler_config["beta_start"])
    beta_end = float(scheduler_config["beta_end"])
    beta_schedule = scheduler_config.get("beta_schedule")
    if beta_schedule == "scaled_linear":
      betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)**2
    elif beta_schedule == "linear":
      betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    else:
      raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; expected one of "
                       f"{_SUPPORTED_BETA_SCHEDULES}")
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError(f"betas must be a 1-D array with entries in (0, 1); got shape {betas.shape}, "
                     f"range [{betas.min()}, {betas.max()}]")
  return np.cumprod(1.0 - betas).astype(np.float32)


def ddim_timesteps(num_steps, scheduler_config):
  """The DDIM sampling timesteps, diffusers' "leading" spacing.

  Equation: t_k = (T - 1 - k) * (N // T) + steps_offset for k = 0 .. T-1; e.g. for N = 1000,
  steps_offset = 1: T = 50 gives 981, 961, ..., 1 and T = 10 gives 901, 801, ..., 1 (DESIGN §3).

  Args:
    num_steps: T, the number of DDIM steps, 1 <= T <= N.
    scheduler_config: a diffusers scheduler config dict (`num_train_timesteps`, `steps_offset`,
      optionally `timestep_spacing`).

  Returns:
    np.int32 array (T,), decreasing.

  Raises:
    ValueError: for T outside [1, N], a spacing other than "leading", a first timestep >= N, or a
      last timestep of 0 (`steps_offset=0`): there a_prev falls back to a_0 = a_t, so sigma = 0 and
      the log-probability is undefined (DESIGN §3).
  """
  num_train_timesteps = int(scheduler_config["num_train_timesteps"])
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps!r}; expected an integer in [1, num_train_timesteps="
                     f"{num_train_timesteps}]")
  spacing = _config_value(scheduler_config, "timestep_spacing", _SUPPORTED_TIMESTEP_SPACING)
  if spacing != _SUPPORTED_TIMESTEP_SPACING:
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; expected "
                     f"{_SUPPORTED_TIMESTEP_SPACING!r} (Stable Diffusion's)")
  steps_offset = int(_config_value(scheduler_config, "steps_offset", 0))
  step_ratio = num_train_timesteps // num_steps
  timesteps = np.arange(num_steps - 1, -1, -1, dtype=np.int64) * step_ratio + steps_offset
  if timesteps[-1] <= 0:
    raise ValueError(f"steps_offset={steps_offset} makes the last DDIM timestep {timesteps[-1]}; "
                     "expected a last timestep >= 1 (with t = 0 the step's std is 0 and its "
                     "log-probability undefined). Use steps_offset=1, as Stable Diffusion does.")
  if timesteps[0] >= num_train_timesteps:
    raise ValueError(f"num_steps={num_steps} with steps_offset={steps_offset} makes the first DDIM "
                     f"timestep {timesteps[0]}; expected < num_train_timesteps="
                     f"{num_train_timesteps}. Use fewer steps.")
  return timesteps.astype(np.int32)


def _per_sample_timestep(timestep, batch_size):
  """Broadcasts a scalar or (B,) timestep to (B,) int32."""
  timestep = jnp.asarray(timestep, dtype=jnp.int32)
  if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] != batch_size):
    raise ValueError(f"timestep has shape {timestep.shape}; expected () or ({batch_size},)")
  return jnp.broadcast_to(timestep, (batch_size,))


def ddim_mean_std(eps, timestep, latents, alphas_cumprod, num_steps, eta):
  """The mean and std of the DDIM transition pi(x_{t-1} | x_t, c) (DESIGN §3).

  Equations (module docstring): t_prev = t - N // T; a_prev = alphas_cumprod[t_prev] or
  alphas_cumprod[0] when t_prev < 0; x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);
  std = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev));
  mu = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - std^2) eps. No clipping of x0_hat. The radicand
  1 - a_prev - std^2 is >= 0 analytically for eta <= 1; it is clamped at 0 to avoid a NaN from
  float rounding (or from eta > 1, where diffusers would return NaN).

  Args:
    eps: (B, C, h, w) the (guided) noise prediction.
    timestep: () or (B,) int, the current training timestep t.
    latents: (B, C, h, w) x_t.
    alphas_cumprod: (N,) float32, from `alphas_cumprod`.
    num_steps: T, a Python int (static).
    eta: DDIM's eta (1.0 for DDPO/TDPO); a scalar.

  Returns:
    (mean (B, C, h, w), std (B, 1, ..., 1)).
  """
  alphas_cumprod = jnp.asarray(alphas_cumprod)
  num_train_timesteps = alphas_cumprod.shape[0]
  step_ratio = num_train_timesteps // num_steps
  batch_size = latents.shape[0]
  broadcast_shape = (batch_size,) + (1,) * (latents.ndim - 1)
  timestep = _per_sample_timestep(timestep, batch_size)
  prev_timestep = timestep - step_ratio
  alpha = alphas_cumprod[timestep].reshape(broadcast_shape)
  alpha_prev = jnp.where(prev_timestep >= 0, alphas_cumprod[jnp.maximum(prev_timestep, 0)],
                         alphas_cumprod[0]).reshape(broadcast_shape)
  predicted_original = (latents - jnp.sqrt(1 - alpha) * eps) / jnp.sqrt(alpha)
  variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - std**2, 0.0)) * eps
  mean = jnp.sqrt(alpha_prev) * predicted_original + direction
  return mean, std


def _gaussian_log_prob(sample, mean, std):
  """Mean over non-batch dims of the log density of N(mean, std^2) at sample -> (B,).

  Equation: mean_{C,h,w} [ -(x - mu)^2 / (2 std^2) - log std - 1/2 log 2 pi ].
  """
  log_density = (-((sample - mean)**2) / (2 * std**2) - jnp.log(std)
                 - 0.5 * math.log(2 * math.pi))
  return jnp.mean(log_density, axis=tuple(range(1, sample.ndim)))


def ddim_step(eps, timestep, latents, alphas_cumprod, num_steps, eta, noise):
  """One stochastic DDIM step with its log-probability (DESIGN §3).

  Equation: x_{t-1} = mu + std z with (mu, std) from `ddim_mean_std`, and
  log pi = mean_{C,h,w} log N(x_{t-1}; mu, std^2).

  Args:
    eps: (B, C, h, w) the (guided) noise prediction.
    timestep: () or (B,) int, the current training timestep t.
    latents: (B, C, h, w) x_t.
    alphas_cumprod: (N,) float32.
    num_steps: T, a Python int.
    eta: DDIM's eta; must be > 0 for the log-probability to be defined.
    noise: (B, C, h, w) z ~ N(0, I).

  Returns:
    DDIMStep(prev_sample (B, C, h, w), mean (B, C, h, w), std (B, 1, 1, 1), log_prob (B,)).
  """
  mean, std = ddim_mean_std(eps, timestep, latents, alphas_cumprod, num_steps, eta)
  prev_sample = mean + std * noise
  return DDIMStep(prev_sample=prev_sample, mean=mean, std=std,
                  log_prob=_gaussian_log_prob(prev_sample, mean, std))


def log_prob(eps, timestep, latents, next_latents, alphas_cumprod, num_steps, eta):
  """Recomputes log pi(x_{t-1} | x_t, c) of a stored transition (used by the train step).

  Equation: mean_{C,h,w} log N(x_{t-1}; mu, std^2), (mu, std) from `ddim_mean_std` (DESIGN §3).

  Args:
    eps: (B, C, h, w) the (guided) noise prediction of the current policy.
    timestep: () or (B,) int, t.
    latents: (B, C, h, w) x_t.
    next_latents: (B, C, h, w) the sampled x_{t-1}.
    alphas_cumprod: (N,) float32.
    num_steps: T, a Python int.
    eta: DDIM's eta, > 0.

  Returns:
    (B,) log-probabilities.
  """
  mean, std = ddim_mean_std(eps, timestep, latents, alphas_cumprod, num_steps, eta)
  return _gaussian_log_prob(next_latents, mean, std)


def classifier_free_guidance(eps_uncond, eps_cond, guidance_scale):
  """Classifier-free guidance: eps = eps_u + w (eps_c - eps_u) (DESIGN §3).

  Args:
    eps_uncond: (B, C, h, w) noise prediction with the empty prompt.
    eps_cond: (B, C, h, w) noise prediction with the prompt.
    guidance_scale: w (5.0 in the paper).

  Returns:
    (B, C, h, w) the guided noise prediction.
  """
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
