"""Rollout invariants: recomputed log-probs equal the sampled ones (PPO ratio == 1 before any
update); the same key gives the same images and another key different ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import ddim
from tdpo_jax import prompts as prompts_lib
from tdpo_jax import rollout
from tests import helpers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config, pipeline, params, input_ids, uncond_ids = helpers.tiny_rollout_inputs(
      tmp_path_factory.mktemp("models"))
  rollout_fn = jax.jit(rollout.make_rollout_fn(pipeline, config.sample))
  return config, pipeline, params, input_ids, uncond_ids, rollout_fn


def test_shapes(setup):
  config, _, params, input_ids, uncond_ids, rollout_fn = setup
  traj = rollout_fn(params, input_ids, uncond_ids, jax.random.key(0))
  t = config.sample.num_steps
  assert traj.latents.shape == (4, t + 1, 4, 8, 8)
  assert traj.log_probs.shape == (4, t)
  assert traj.images.shape == (4, 64, 64, 3)
  np.testing.assert_array_equal(traj.timesteps[0], np.arange(901, 0, -100))
  assert float(traj.images.min()) >= 0 and float(traj.images.max()) <= 1
  assert np.all(np.isfinite(np.asarray(traj.log_probs)))


def test_recomputed_log_probs_equal_sampled(setup):
  config, pipeline, params, input_ids, uncond_ids, rollout_fn = setup
  traj = rollout_fn(params, input_ids, uncond_ids, jax.random.key(1))
  alphas = jnp.asarray(ddim.alphas_cumprod(pipeline.scheduler_config))

  @jax.jit
  def recompute(latents, next_latents, timesteps):
    eps = rollout.guided_eps(pipeline, params.unet, latents, timesteps, traj.prompt_embeds,
                             traj.uncond_embeds, config.sample.guidance_scale)
    return ddim.log_prob(eps, timesteps, latents, next_latents, alphas, config.sample.num_steps,
                         config.sample.eta)

  for k in (0, 4, config.sample.num_steps - 1):
    log_prob = recompute(traj.latents[:, k], traj.latents[:, k + 1], traj.timesteps[:, k])
    ratio = np.exp(np.asarray(log_prob) - np.asarray(traj.log_probs[:, k]))
    np.testing.assert_allclose(ratio, 1.0, atol=1e-5)


def test_same_key_same_images_other_key_different(setup):
  _, _, params, input_ids, uncond_ids, rollout_fn = setup
  a = rollout_fn(params, input_ids, uncond_ids, jax.random.key(7))
  b = rollout_fn(params, input_ids, uncond_ids, jax.random.key(7))
  c = rollout_fn(params, input_ids, uncond_ids, jax.random.key(8))
  np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
  assert np.abs(np.asarray(a.latents) - np.asarray(c.latents)).max() > 1e-2


def test_prompt_sets():
  animals = prompts_lib.load_prompts("simple_animals")
  assert len(animals) == 45 and animals[0] == "cat"
  assert "simple_animals" in prompts_lib.available_prompt_sets()


def test_unknown_prompt_set_and_empty_file(tmp_path):
  with pytest.raises(ValueError, match="unknown prompt set 'no_such_set'"):
    prompts_lib.load_prompts("no_such_set")
  empty = tmp_path / "empty.txt"
  empty.write_text("\n# only a comment\n\n")
  with pytest.raises(ValueError, match="empty.txt.*is empty"):
    prompts_lib.load_prompts(str(empty))


def test_sample_command_writes_captioned_grid(tmp_path):
  """`python -m tdpo_jax.sample` writes a PNG grid of non-blank, distinct images."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = tmp_path / "grid.png"
  result = subprocess.run(
      [sys.executable, "-m", "tdpo_jax.sample", f"--config={helpers.REPO}/configs/tiny.py",
       f"--config.pretrained.cache_dir={tmp_path / 'models'}", f"--out={out}",
       "--num_images=4"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"wrote {out}: 4 images, 10 DDIM steps" in result.stdout
  grid = np.asarray(Image.open(out).convert("RGB"), np.float32)
  # 2x2 cells of 128 px, each over a caption band of 12 px per line + 4 (the band fits the
  # longest caption: these short prompts take one line).
  assert grid.shape == (2 * (128 + 12 + 4), 2 * 128, 3)
  first, second = grid[:128, :128], grid[:128, 128:]
  assert first.std() > 10 and np.abs(first - second).mean() > 1  # not blank, not identical
