"""bf16 compute (config.precision) against float32 on the tiny model.

The bf16 path is bf16 compute over float32 master weights: every network's output is cast back
to float32 and the DDIM step, log-probabilities and losses stay float32. Tolerances, set at ~3x
the worst deviation measured on the tiny random model (4 samples, 10 steps, seed 0):

- log-probs of the SAME float32 trajectory re-evaluated with the bf16 policy UNet: within
  LOG_PROB_ATOL = 0.06 (measured max 0.021; the log-probs are ~2.5 in magnitude);
- JPEG-compressibility reward of the SAME final latents decoded by the bf16 VAE: within
  REWARD_ATOL = 0.04 kB (measured max 0.013 kB on rewards of ~ -4.2 kB);
- a whole bf16 rollout with the same key: rewards within REWARD_ROLLOUT_ATOL = 0.06 kB
  (measured max 0.020 kB).

Consequence worth knowing: a log-prob error of ~0.02 is a PPO ratio error of ~2 %, far above
the paper's clip range 1e-4, so the rollout and the train step must use the SAME precision (one
`precision.policy` switch drives both) for the first-step ratio to stay ~1.
"""
import jax
import numpy as np
import pytest

from tdpo_jax import ddim
from tdpo_jax import rollout
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import jpeg
from tests import helpers

LOG_PROB_ATOL = 0.06
REWARD_ATOL = 0.04
REWARD_ROLLOUT_ATOL = 0.06


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config, pipeline, params, input_ids, uncond_ids = helpers.tiny_rollout_inputs(
      tmp_path_factory.mktemp("models"))
  bf16 = pipeline_lib.with_precision(pipeline, unet="bfloat16", frozen="bfloat16")
  key = jax.random.key(0)
  fp32_traj = jax.jit(rollout.make_rollout_fn(pipeline, config.sample))(
      params, input_ids, uncond_ids, key)
  bf16_traj = jax.jit(rollout.make_rollout_fn(bf16, config.sample))(
      params, input_ids, uncond_ids, key)
  return config, pipeline, bf16, params, fp32_traj, bf16_traj


def test_bf16_modules_compute_in_bf16(setup):
  _, pipeline, bf16, _, _, _ = setup
  assert pipeline.unet.dtype == np.float32
  for module in (bf16.unet, bf16.vae, bf16.text_encoder, bf16.image_encoder):
    assert module is None or module.dtype == jax.numpy.bfloat16


def test_bf16_log_probs_close_to_fp32(setup):
  config, pipeline, bf16, params, traj, _ = setup
  alphas = np.asarray(ddim.alphas_cumprod(pipeline.scheduler_config))

  def log_probs(pipe):
    def per_step(latents, next_latents, timesteps):
      eps = rollout.guided_eps(pipe, params.unet, latents, timesteps, traj.prompt_embeds,
                               traj.uncond_embeds, config.sample.guidance_scale)
      return ddim.log_prob(eps, timesteps, latents, next_latents, alphas,
                           config.sample.num_steps, config.sample.eta)
    return jax.jit(jax.vmap(per_step, in_axes=(1, 1, 1), out_axes=1))(
        traj.latents[:, :-1], traj.latents[:, 1:], traj.timesteps)

  fp32, low = np.asarray(log_probs(pipeline)), np.asarray(log_probs(bf16))
  assert fp32.dtype == low.dtype == np.float32
  np.testing.assert_allclose(fp32, np.asarray(traj.log_probs), atol=1e-3)  # the fp32 reference
  print("max |log_prob bf16 - fp32|", np.abs(low - fp32).max(), "scale", np.abs(fp32).max())
  np.testing.assert_allclose(low, fp32, atol=LOG_PROB_ATOL, rtol=0)


def test_bf16_rewards_close_to_fp32(setup):
  _, pipeline, bf16, params, traj, bf16_traj = setup
  x_0 = traj.latents[:, -1]
  decode = lambda pipe: np.asarray(jax.jit(
      lambda p, x: pipeline_lib.decode_latents(pipe, p, x))(params.vae, x_0))
  fp32_reward = jpeg.jpeg_compressibility(decode(pipeline))
  bf16_reward = jpeg.jpeg_compressibility(decode(bf16))
  np.testing.assert_allclose(fp32_reward, jpeg.jpeg_compressibility(np.asarray(traj.images)))
  rollout_reward = jpeg.jpeg_compressibility(np.asarray(bf16_traj.images))
  print("rewards fp32", fp32_reward, "bf16 decode", bf16_reward, "bf16 rollout", rollout_reward)
  np.testing.assert_allclose(bf16_reward, fp32_reward, atol=REWARD_ATOL, rtol=0)
  np.testing.assert_allclose(rollout_reward, fp32_reward, atol=REWARD_ROLLOUT_ATOL, rtol=0)
