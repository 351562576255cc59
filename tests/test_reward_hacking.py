"""benchmarks/reward_hacking.py: the normalised ascent step against its closed form, and both
probes on a reduced shapes config (ascent raises the reward it climbs, by exactly one step
length per step; backprop's gradient through the sampler against central differences of its
loss, and with a zero learning rate it leaves the fixed-key images unchanged)."""
import functools

import jax
import numpy as np
import pytest

from tests import helpers


@functools.lru_cache(maxsize=None)
def _probe():
  return helpers.load_script("benchmarks/reward_hacking.py", "reward_hacking")


def test_normalised_step_moves_each_sample_by_the_learning_rate():
  probe = _probe()
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
  grads = rng.standard_normal((3, 4, 2, 2)).astype(np.float32) * np.array([1.0, 10.0, 0.0])[
      :, None, None, None]
  moved = np.asarray(probe.normalised_step(latents, grads, 0.5))
  rms = np.sqrt(np.mean((moved - latents) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(rms, [0.5, 0.5, 0.0], atol=1e-6)  # a zero gradient: no move
  g = grads[0].astype(np.float64)
  np.testing.assert_allclose(moved[0], latents[0] + 0.5 * g / np.sqrt(np.mean(g ** 2)),
                             atol=1e-6)  # along g itself
  assert probe.rms_distance(moved, latents) == pytest.approx(1.0 / 3.0, rel=1e-5)


@pytest.fixture(scope="module")
def reduced(cache_dir):
  config = helpers.load_config("shapes", "algorithm=ddpo")
  config.num_devices = 1
  config.log.progress = False
  config.pretrained.cache_dir = str(cache_dir)
  config.sample.num_steps = 2
  config.sample.batch_size = 8
  config.sample.num_batches_per_epoch = 1
  config.eval.samples_per_prompt = 2
  config.train.gradient_accumulation_steps = 1
  return helpers.shared_trainer(config), _probe().differentiable_reward(config)


def test_ascent_climbs_the_reward_one_step_length_at_a_time(reduced):
  trainer, reward_apply = reduced
  saved = []
  rows = _probe().ascent_rows(trainer, reward_apply, steps=3, learning_rate=0.05, every=1,
                              save=lambda step, images, prompts: saved.append(step))
  assert [r["step"] for r in rows] == saved == [0, 1, 2, 3]
  assert rows[0]["rms_from_start"] == 0.0
  assert rows[1]["rms_from_start"] == pytest.approx(0.05, rel=1e-4)
  assert rows[3]["rms_from_start"] <= 3 * 0.05 + 1e-6  # the triangle inequality
  assert rows[3]["reward"] > rows[0]["reward"]
  for row in rows:
    assert 0.0 <= row["gold_fidelity"] <= 1.0 and 0.0 <= row["gold_quality"] <= 1.0


def _tree_dot(a, b):
  return float(sum(np.vdot(np.asarray(x, np.float64), np.asarray(y, np.float64))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_backprop_gradient_matches_finite_differences_and_zero_lr_keeps_the_policy(reduced):
  """The gradient through the whole sampler is the loss's: central differences of the loss
  (fixed noise key) along g / |g| give |g|, along a random unit direction v give <g, v>
  (measured: 3e-4 relative and 2e-5 |g| at eps 1e-2). Then the probe's rows with Adam at lr 0:
  the fixed-key images, hence every score, stay those of step 0."""
  trainer, reward_apply = reduced
  functions = _probe().backprop_functions(trainer, reward_apply)
  key = jax.random.key(7)
  grad = functions.grad(functions.params, key)
  norm = np.sqrt(_tree_dot(grad, grad))
  assert norm > 0.0

  def loss(params):
    return -float(np.mean(np.asarray(reward_apply(functions.images(params, key),
                                                  functions.prompts), np.float64)))

  def central_difference(direction, eps=1e-2):
    step = lambda sign: jax.tree.map(lambda p, d: p + sign * eps * d, functions.params, direction)
    return (loss(step(1.0)) - loss(step(-1.0))) / (2 * eps)

  rng = np.random.default_rng(0)
  random = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), grad)
  random = jax.tree.map(lambda x: x / np.sqrt(_tree_dot(random, random)), random)
  assert central_difference(jax.tree.map(lambda g: g / norm, grad)) == pytest.approx(
      norm, rel=1e-2)
  assert central_difference(random) == pytest.approx(_tree_dot(grad, random), abs=1e-3 * norm)

  rows = _probe().backprop_rows(trainer, reward_apply, steps=1, learning_rate=0.0, every=1,
                                functions=functions)
  assert [r["step"] for r in rows] == [0, 1]
  assert rows[0] == {**rows[1], "step": 0}  # the same fixed-key images, the same scores
  assert np.isfinite(rows[0]["reward"])
