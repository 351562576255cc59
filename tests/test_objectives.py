"""tdpo_jax.objectives against float64 NumPy references and hand-computed values.

Shapes: B batch, T steps, C, h, w latent dims.
"""
import jax
import numpy as np
import pytest

from tdpo_jax import objectives

RTOL = 1e-5
ATOL = 1e-6
BATCH, STEPS, LATENT = 16, 10, (4, 3, 3)


def _rng(seed):
  return np.random.default_rng(seed)


def _float32(*arrays):
  return tuple(np.asarray(array, np.float32) for array in arrays)


def test_standardise_matches_numpy():
  x = _rng(0).standard_normal((BATCH, STEPS)) * 3.0 + 1.5
  expected = (x - x.mean()) / (x.std() + 1e-8)
  np.testing.assert_allclose(objectives.standardise(*_float32(x)), expected, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("with_values", [False, True])
def test_advantages(with_values):
  rng = _rng(1)
  returns = rng.standard_normal((BATCH, STEPS)) + 2.0
  values = rng.standard_normal((BATCH, STEPS)) * 0.5 if with_values else None
  raw = returns - values if with_values else returns
  expected = (raw - raw.mean()) / (raw.std() + 1e-8)
  actual = objectives.standardise_advantages(
      *_float32(returns), None if values is None else _float32(values)[0])
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-5)
  np.testing.assert_allclose(np.mean(actual), 0.0, atol=1e-6)
  np.testing.assert_allclose(np.std(actual), 1.0, rtol=1e-5)
  assert objectives.advantages is objectives.standardise_advantages


def test_returns_without_penalty_are_the_reward_at_every_step():
  rewards = _rng(2).standard_normal(BATCH).astype(np.float32)
  returns = objectives.returns_from_rewards(rewards, STEPS)
  assert returns.shape == (BATCH, STEPS)
  np.testing.assert_array_equal(returns, np.repeat(rewards[:, None], STEPS, axis=1))


def test_returns_with_kl_penalty_match_official_recursion():
  """The official code's backward recursion: returns[:, t] += gamma * returns[:, t + 1]."""
  rng = _rng(3)
  rewards = rng.standard_normal(BATCH)
  penalty = rng.uniform(0.0, 0.1, (BATCH, STEPS))
  coef = 0.3
  expected = np.zeros((BATCH, STEPS))
  expected[:, -1] += rewards
  expected += -coef * penalty
  for step in reversed(range(STEPS - 1)):
    expected[:, step] += expected[:, step + 1]
  actual = objectives.returns_from_rewards(*_float32(rewards), STEPS, *_float32(penalty), coef)
  np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-5)
  # Hand-made: r = 1, p = (1, 2, 3), coef 1 -> G = (1 - 6, 1 - 5, 1 - 3).
  hand = objectives.returns_from_rewards(np.ones(1, np.float32), 3,
                                         np.array([[1.0, 2.0, 3.0]], np.float32), 1.0)
  np.testing.assert_allclose(hand, [[-5.0, -4.0, -2.0]])
  with pytest.raises(ValueError, match=r"kl_penalty has shape \(16, 9\)"):
    objectives.returns_from_rewards(*_float32(rewards), STEPS, np.zeros((BATCH, STEPS - 1)), coef)


def _numpy_policy_loss(log_prob, old_log_prob, advantages, clip_range):
  ratio = np.exp(log_prob - old_log_prob)
  loss = np.mean(np.maximum(-advantages * ratio,
                            -advantages * np.clip(ratio, 1 - clip_range, 1 + clip_range)))
  return loss, {
      "approx_kl": 0.5 * np.mean((log_prob - old_log_prob)**2),
      "clipfrac": np.mean(np.abs(ratio - 1) > clip_range),
      "ratio": np.mean(ratio),
  }


def test_policy_loss_matches_numpy():
  rng = _rng(4)
  old_log_prob = rng.standard_normal(BATCH) - 1.0
  log_prob = old_log_prob + rng.standard_normal(BATCH) * 0.1
  advantages = rng.standard_normal(BATCH)
  for clip_range in (1e-4, 0.05, 0.2):
    loss, metrics = objectives.ppo_policy_loss(
        *_float32(log_prob, old_log_prob, advantages), clip_range)
    expected_loss, expected_metrics = _numpy_policy_loss(log_prob, old_log_prob, advantages,
                                                         clip_range)
    np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
    for name, expected in expected_metrics.items():
      np.testing.assert_allclose(metrics[name], expected, rtol=RTOL, atol=ATOL, err_msg=name)


def test_policy_loss_on_policy():
  """new == old: ratio 1, nothing clipped, approx_kl 0, loss -mean(A), gradient -A/B."""
  rng = _rng(5)
  log_prob, advantages = _float32(rng.standard_normal(BATCH), rng.standard_normal(BATCH))
  loss, metrics = objectives.ppo_policy_loss(log_prob, log_prob, advantages, 1e-4)
  assert float(metrics["ratio"]) == 1.0
  assert float(metrics["clipfrac"]) == 0.0
  assert float(metrics["approx_kl"]) == 0.0
  np.testing.assert_allclose(loss, -np.mean(advantages), rtol=RTOL)
  gradient = jax.grad(lambda lp: objectives.ppo_policy_loss(lp, log_prob, advantages, 1e-4)[0])(
      log_prob)
  np.testing.assert_allclose(gradient, -advantages / BATCH, rtol=RTOL)


def test_policy_clip_binds_on_hand_example():
  """clip 0.1. Sample 0: A = 1, rho = 1.5 -> max(-1.5, -1.1) = -1.1 (clipped, no gradient).
  Sample 1: A = -1, rho = 0.5 -> max(0.5, 0.9) = 0.9 (clipped). Sample 2: A = 2, rho = 0.5 ->
  max(-1, -1.8) = -1 (pessimistic: unclipped). Loss = (-1.1 + 0.9 - 1) / 3 = -0.4."""
  old_log_prob = np.zeros(3, np.float32)
  log_prob = np.log(np.array([1.5, 0.5, 0.5], np.float32))
  advantages = np.array([1.0, -1.0, 2.0], np.float32)
  loss, metrics = objectives.ppo_policy_loss(log_prob, old_log_prob, advantages, 0.1)
  np.testing.assert_allclose(loss, -0.4, rtol=RTOL)
  np.testing.assert_allclose(metrics["clipfrac"], 1.0)
  np.testing.assert_allclose(metrics["ratio"], 2.5 / 3, rtol=RTOL)
  gradient = jax.grad(lambda lp: objectives.ppo_policy_loss(lp, old_log_prob, advantages, 0.1)[0])(
      log_prob)
  # d/dlp of -A exp(lp) / 3 for sample 2 only: -2 * 0.5 / 3.
  np.testing.assert_allclose(gradient, [0.0, 0.0, -1.0 / 3], rtol=RTOL, atol=ATOL)


def test_clipped_value_loss_matches_numpy():
  rng = _rng(6)
  returns = rng.standard_normal(BATCH)
  old_values = returns + rng.standard_normal(BATCH) * 0.5
  values = old_values + rng.standard_normal(BATCH) * 0.3
  for clip_range in (0.05, 0.2, 1e6):
    loss, metrics = objectives.clipped_value_loss(*_float32(values, old_values, returns),
                                                  clip_range)
    clipped = old_values + np.clip(values - old_values, -clip_range, clip_range)
    expected = 0.5 * np.mean(np.maximum((values - returns)**2, (clipped - returns)**2))
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["value_clipfrac"],
                               np.mean(np.abs(values - old_values) > clip_range))
    np.testing.assert_allclose(metrics["explained_variance"],
                               1 - np.var(returns - values) / np.var(returns), rtol=1e-4)
  # With clipping effectively off the loss is the plain 1/2 MSE and the clip fraction 0.
  np.testing.assert_allclose(loss, 0.5 * np.mean((values - returns)**2), rtol=RTOL)
  assert float(metrics["value_clipfrac"]) == 0.0


def test_clipped_value_loss_hand_example():
  """c = 0.2, V_old = 0, G = 1. V = 0.5 -> V_clip = 0.2: max(0.25, 0.64) = 0.64 (clipped)."""
  loss, metrics = objectives.clipped_value_loss(np.array([0.5], np.float32),
                                                np.zeros(1, np.float32),
                                                np.ones(1, np.float32), 0.2)
  np.testing.assert_allclose(loss, 0.32, rtol=RTOL)
  assert float(metrics["value_clipfrac"]) == 1.0


def test_explained_variance_edge_cases():
  returns = np.array([1.0, 2.0, 3.0], np.float32)
  np.testing.assert_allclose(objectives.explained_variance(returns, returns), 1.0)
  np.testing.assert_allclose(objectives.explained_variance(np.full(3, 2.0, np.float32), returns),
                             0.0, atol=1e-6)
  assert np.isnan(objectives.explained_variance(returns, np.ones(3, np.float32)))


def test_gaussian_kl_matches_closed_form_per_dimension():
  """Per-dim KL(N(m1, s^2) || N(m2, s^2)) = log(s2/s1) + (s1^2 + (m1-m2)^2)/(2 s2^2) - 1/2."""
  rng = _rng(7)
  mean = rng.standard_normal((BATCH, *LATENT))
  ref_mean = mean + rng.standard_normal((BATCH, *LATENT)) * 0.1
  std = rng.uniform(0.05, 0.5, (BATCH, 1, 1, 1))
  general = (np.log(std / std) + (std**2 + (mean - ref_mean)**2) / (2 * std**2) - 0.5)
  expected = general.mean(axis=(1, 2, 3))
  actual = objectives.gaussian_kl(*_float32(mean, ref_mean, std))
  assert actual.shape == (BATCH,)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=ATOL)


def test_gaussian_kl_monte_carlo():
  """KL = E_{x ~ pi}[log pi(x) - log pi_ref(x)], with log-densities averaged over latent dims."""
  rng = _rng(8)
  mean = rng.standard_normal((2, *LATENT))
  ref_mean = mean + 0.3
  std = np.full((2, 1, 1, 1), 0.5)
  samples = mean[None] + std[None] * rng.standard_normal((20_000, 2, *LATENT))
  log_ratio = ((samples - ref_mean[None])**2 - (samples - mean[None])**2) / (2 * std[None]**2)
  monte_carlo = log_ratio.mean(axis=(0, 2, 3, 4))
  actual = objectives.gaussian_kl(*_float32(mean, ref_mean, std))
  np.testing.assert_allclose(actual, monte_carlo, rtol=0.02)
  np.testing.assert_allclose(actual, 0.3**2 / (2 * 0.25), rtol=1e-5)


def test_return_kl_penalty():
  rng = _rng(9)
  log_prob, ref_log_prob = rng.standard_normal((2, BATCH, STEPS))
  np.testing.assert_allclose(objectives.return_kl_penalty(*_float32(log_prob, ref_log_prob)),
                             0.5 * (log_prob - ref_log_prob)**2, rtol=RTOL, atol=ATOL)


def test_masked_explained_variance_is_the_subset_ev():
  rng = _rng(10)
  values, returns = rng.standard_normal((2, 6, 5))
  mask = rng.random((6, 5)) < 0.5
  v, g = values[mask], returns[mask]
  expected = 1.0 - np.var(g - v) / np.var(g)  # population variances over the subset
  np.testing.assert_allclose(
      objectives.masked_explained_variance(*_float32(values, returns), mask), expected,
      rtol=1e-5)
  assert np.isnan(objectives.masked_explained_variance(
      *_float32(values, returns), np.zeros((6, 5), bool)))


def test_explained_variance_by_step_hand_computed():
  # Two states, four samples. State 0: V = 0, so EV 0. State 1: G = (1, -1, 1, -1),
  # V = (1, -1, 0, 0): residuals (0, 0, 1, -1), var 0.5 against var(G) = 1, so EV 0.5.
  returns = np.array([[2.0, 1.0], [-2.0, -1.0], [2.0, 1.0], [-2.0, -1.0]], np.float32)
  values = np.array([[0.0, 1.0], [0.0, -1.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
  steps = np.broadcast_to(np.arange(2), (4, 2))
  by_step = objectives.explained_variance_by_step(values, returns, steps, 2)
  np.testing.assert_allclose(by_step, [0.0, 0.5], atol=1e-6)
  # The pooled figure mixes both: var(G) = 2.5, var(G - V) = 2.125 + ... computed directly.
  np.testing.assert_allclose(objectives.explained_variance(values, returns),
                             1.0 - np.var(returns - values) / np.var(returns), rtol=1e-6)
