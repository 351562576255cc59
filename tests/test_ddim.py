"""tdpo_jax.ddim against diffusers' PyTorch DDIMScheduler (DESIGN §3).

Shapes: B batch, C, h, w latent channels / height / width (NCHW).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import ddim

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Stable Diffusion 1.x's scheduler config (scheduler/scheduler_config.json).
SD_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
LATENT_SHAPE = (3, 4, 8, 8)
ETA = 1.0
TOLERANCE = 1e-5


def _scheduler(num_steps, **overrides):
  scheduler = diffusers.DDIMScheduler.from_config({**SD_SCHEDULER_CONFIG, **overrides})
  scheduler.set_timesteps(num_steps)
  return scheduler


def _inputs(seed):
  rng = np.random.default_rng(seed)
  eps, latents, noise = (rng.standard_normal(LATENT_SHAPE).astype(np.float32) for _ in range(3))
  return eps, latents, noise


def _torch_step(scheduler, eps, timestep, latents, noise):
  output = scheduler.step(torch.from_numpy(eps), int(timestep), torch.from_numpy(latents), eta=ETA,
                          variance_noise=torch.from_numpy(noise))
  return output.prev_sample.numpy()


@pytest.mark.parametrize("num_steps", [10, 50])
def test_timesteps_match_diffusers(num_steps):
  timesteps = ddim.ddim_timesteps(num_steps, SD_SCHEDULER_CONFIG)
  assert timesteps.dtype == np.int32
  np.testing.assert_array_equal(timesteps, _scheduler(num_steps).timesteps.numpy())
  step_ratio = 1000 // num_steps
  np.testing.assert_array_equal(timesteps, np.arange(1000 - step_ratio + 1, 0, -step_ratio))


def test_alphas_cumprod_match_diffusers():
  expected = _scheduler(50).alphas_cumprod.numpy()
  actual = ddim.alphas_cumprod(SD_SCHEDULER_CONFIG)
  assert actual.dtype == np.float32 and actual.shape == (1000,)
  np.testing.assert_allclose(actual, expected, rtol=1e-5)
  linear = {**SD_SCHEDULER_CONFIG, "beta_schedule": "linear"}
  np.testing.assert_allclose(ddim.alphas_cumprod(linear),
                             _scheduler(50, beta_schedule="linear").alphas_cumprod.numpy(),
                             rtol=1e-5)


@pytest.mark.parametrize("num_steps", [10, 50])
def test_step_matches_diffusers(num_steps):
  scheduler = _scheduler(num_steps)
  alphas_cumprod = jnp.asarray(ddim.alphas_cumprod(SD_SCHEDULER_CONFIG))
  timesteps = ddim.ddim_timesteps(num_steps, SD_SCHEDULER_CONFIG)
  # First, a middle one, the second to last and the last step (t = 1, t_prev < 0 fallback).
  for index in (0, num_steps // 2, num_steps - 2, num_steps - 1):
    timestep = int(timesteps[index])
    eps, latents, noise = _inputs(seed=index)
    step = ddim.ddim_step(eps, timestep, latents, alphas_cumprod, num_steps, ETA, noise)

    expected_prev = _torch_step(scheduler, eps, timestep, latents, noise)
    expected_mean = _torch_step(scheduler, eps, timestep, latents, np.zeros_like(noise))
    prev_timestep = timestep - 1000 // num_steps
    expected_std = float(scheduler._get_variance(timestep, prev_timestep))**0.5 * ETA
    np.testing.assert_allclose(step.prev_sample, expected_prev, atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(step.mean, expected_mean, atol=TOLERANCE, rtol=TOLERANCE)
    assert step.std.shape == (LATENT_SHAPE[0], 1, 1, 1)
    np.testing.assert_allclose(step.std, np.full(step.std.shape, expected_std), rtol=TOLERANCE)

    expected_log_prob = torch.distributions.Normal(
        torch.from_numpy(expected_mean), expected_std).log_prob(
            torch.from_numpy(expected_prev)).mean(dim=(1, 2, 3)).numpy()
    assert step.log_prob.shape == (LATENT_SHAPE[0],)
    np.testing.assert_allclose(step.log_prob, expected_log_prob, atol=TOLERANCE, rtol=TOLERANCE)

    recomputed = ddim.log_prob(eps, timestep, latents, step.prev_sample, alphas_cumprod, num_steps,
                               ETA)
    np.testing.assert_array_equal(recomputed, step.log_prob)


def test_per_sample_timesteps_and_jit():
  """A (B,) timestep array gives each sample its own step; the step is jittable."""
  num_steps = 10
  alphas_cumprod = jnp.asarray(ddim.alphas_cumprod(SD_SCHEDULER_CONFIG))
  timesteps = ddim.ddim_timesteps(num_steps, SD_SCHEDULER_CONFIG)
  per_sample = jnp.asarray(timesteps[[0, 4, 9]])
  eps, latents, noise = _inputs(seed=7)
  jit_step = jax.jit(ddim.ddim_step, static_argnums=(4,))
  batched = jit_step(eps, per_sample, latents, alphas_cumprod, num_steps, ETA, noise)
  for sample_index, timestep in enumerate(per_sample):
    single = ddim.ddim_step(eps[sample_index:sample_index + 1], timestep,
                            latents[sample_index:sample_index + 1], alphas_cumprod, num_steps,
                            ETA, noise[sample_index:sample_index + 1])
    np.testing.assert_allclose(batched.prev_sample[sample_index], single.prev_sample[0],
                               atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(batched.log_prob[sample_index], single.log_prob[0], atol=1e-5,
                               rtol=1e-6)


def test_classifier_free_guidance():
  eps_uncond, eps_cond, _ = _inputs(seed=3)
  guided = ddim.classifier_free_guidance(eps_uncond, eps_cond, 5.0)
  np.testing.assert_allclose(guided, eps_uncond + 5.0 * (eps_cond - eps_uncond), rtol=1e-6)
  np.testing.assert_allclose(ddim.classifier_free_guidance(eps_uncond, eps_cond, 1.0), eps_cond,
                             rtol=1e-6, atol=1e-6)


def test_rejects_bad_configs():
  with pytest.raises(ValueError, match="steps_offset=0"):
    ddim.ddim_timesteps(50, {**SD_SCHEDULER_CONFIG, "steps_offset": 0})
  with pytest.raises(ValueError, match="num_steps=0"):
    ddim.ddim_timesteps(0, SD_SCHEDULER_CONFIG)
  with pytest.raises(ValueError, match="num_steps=1001"):
    ddim.ddim_timesteps(1001, SD_SCHEDULER_CONFIG)
  with pytest.raises(ValueError, match="first DDIM timestep 1000"):
    ddim.ddim_timesteps(1000, SD_SCHEDULER_CONFIG)
  with pytest.raises(ValueError, match="timestep_spacing='trailing'"):
    ddim.ddim_timesteps(50, {**SD_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
  with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
    ddim.alphas_cumprod({**SD_SCHEDULER_CONFIG, "beta_schedule": "squaredcos_cap_v2"})
  with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
    ddim.alphas_cumprod({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
