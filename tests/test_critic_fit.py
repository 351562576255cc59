"""benchmarks/critic_fit.py's pure helpers against closed forms (the script itself samples a
pipeline; the README/docs report its runs)."""
import functools

import numpy as np

from tests import helpers


@functools.lru_cache(maxsize=None)  # once: the script defines absl flags at import
def _critic_fit():
  return helpers.load_script("benchmarks/critic_fit.py", "critic_fit")


def test_affine_fit_recovers_an_affine_map_and_ev_is_one():
  fit = _critic_fit()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((50, 3))
  y = x @ np.array([1.0, -2.0, 0.5]) + 3.0
  coef = fit.affine_fit(x, y, ridge=0.0)
  np.testing.assert_allclose(coef, [1.0, -2.0, 0.5, 3.0], atol=1e-9)
  assert fit.explained_variance(fit.affine_predict(coef, x), y) == 1.0
  assert fit.explained_variance(np.zeros(50), y - y.mean()) == 0.0
  assert np.isnan(fit.explained_variance(np.zeros(3), np.ones(3)))


def test_per_prompt_standardise_uses_each_prompts_statistics():
  fit = _critic_fit()
  rewards = np.array([1.0, 3.0, 10.0, 20.0, 30.0])
  index = np.array([0, 0, 1, 1, 1])
  out = fit.per_prompt_standardise(rewards, index, eps=0.0)
  np.testing.assert_allclose(out[:2], [-1.0, 1.0])
  np.testing.assert_allclose(out[2:], (rewards[2:] - 20.0) / np.std([10.0, 20.0, 30.0]))


def test_ev_row_per_state_and_late():
  fit = _critic_fit()
  returns = np.tile(np.array([[1.0], [-1.0], [2.0], [-2.0]]), (1, 3))
  values = np.concatenate([np.zeros((4, 1)), returns[:, 1:]], axis=1)
  row = fit.ev_row(values, returns, late_start=1)
  assert (row["ev_k00"], row["ev_k01"], row["ev_k02"], row["ev_late"]) == (0.0, 1.0, 1.0, 1.0)
  np.testing.assert_allclose(row["ev"], 2 / 3)
