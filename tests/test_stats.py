"""tdpo_jax.stats against a plain-Python reimplementation of DDPO's PerPromptStatTracker.

Shapes: B batch, P prompts, N buffer size.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import stats

BUFFER_SIZE = 32
MIN_COUNT = 16
EPS = 1e-6


class ReferenceTracker:
  """DDPO's PerPromptStatTracker, in float64, keyed by prompt index."""

  def __init__(self, buffer_size, min_count):
    self.buffer_size = buffer_size
    self.min_count = min_count
    self.stats = {}

  def update(self, prompts, rewards):
    prompts = np.asarray(prompts)
    rewards = np.asarray(rewards, np.float64)
    normalised = np.empty_like(rewards)
    for prompt in np.unique(prompts):
      prompt_rewards = rewards[prompts == prompt]
      self.stats.setdefault(int(prompt), collections.deque(maxlen=self.buffer_size))
      self.stats[int(prompt)].extend(prompt_rewards)
      if len(self.stats[int(prompt)]) < self.min_count:
        mean, std = np.mean(rewards), np.std(rewards) + EPS
      else:
        mean, std = np.mean(self.stats[int(prompt)]), np.std(self.stats[int(prompt)]) + EPS
      normalised[prompts == prompt] = (prompt_rewards - mean) / std
    return normalised


def _check_buffers(state, reference, num_prompts):
  """The ring buffers hold exactly the deques' contents, oldest first from `pos`."""
  buffer, count, pos = (np.asarray(x) for x in (state.buffer, state.count, state.pos))
  for prompt in range(num_prompts):
    expected = list(reference.stats.get(prompt, []))
    assert count[prompt] == len(expected)
    if len(expected) < BUFFER_SIZE:
      stored = buffer[prompt, :count[prompt]]
    else:
      stored = np.roll(buffer[prompt], -pos[prompt])
    np.testing.assert_allclose(stored, np.asarray(expected, np.float32), rtol=0, atol=0)


@pytest.mark.parametrize("num_prompts,batch_size", [(3, 8), (7, 40)])
def test_matches_reference_tracker(num_prompts, batch_size):
  rng = np.random.default_rng(num_prompts)
  reference = ReferenceTracker(BUFFER_SIZE, MIN_COUNT)
  state = stats.init_normaliser(num_prompts, BUFFER_SIZE)
  jit_normalise = jax.jit(stats.normalise, static_argnames=("min_count", "eps"))
  crossed_threshold = wrapped = mixed = False
  for batch in range(30):
    if batch % 10 == 3:
      # Every sample the same prompt: with B > N the buffer wraps within one batch.
      prompt_index = np.full(batch_size, rng.integers(num_prompts), np.int32)
    else:
      # Skewed: some prompts repeat many times in a batch, others rarely appear.
      weights = np.arange(1, num_prompts + 1) / np.sum(np.arange(1, num_prompts + 1))
      prompt_index = rng.choice(num_prompts, batch_size, p=weights).astype(np.int32)
    rewards = (rng.standard_normal(batch_size) * rng.uniform(0.5, 3.0)
               + rng.uniform(-2.0, 2.0)).astype(np.float32)
    counts_before = np.asarray(state.count)
    state, normalised = jit_normalise(state, prompt_index, rewards, min_count=MIN_COUNT, eps=EPS)
    expected = reference.update(prompt_index, rewards)
    np.testing.assert_allclose(normalised, expected, rtol=1e-4, atol=1e-5)
    _check_buffers(state, reference, num_prompts)
    counts_after = np.asarray(state.count)
    crossed_threshold |= bool(np.any((counts_before < MIN_COUNT) & (counts_after >= MIN_COUNT)))
    added = np.bincount(prompt_index, minlength=num_prompts)
    wrapped |= bool(np.any(counts_before + added > BUFFER_SIZE))  # Oldest rewards evicted.
    ready = counts_after[prompt_index] >= MIN_COUNT
    mixed |= bool(np.any(ready) and not np.all(ready))
  assert crossed_threshold and wrapped and mixed


def test_min_count_threshold_boundary():
  """Below min_count the batch statistics are used; at min_count the prompt's own."""
  min_count = 4
  state = stats.init_normaliser(2, 8)
  # Prompt 0 gets 3 rewards (< 4): batch stats. Prompt 1 gets 4 (= 4): its own stats.
  prompt_index = np.array([0, 0, 0, 1, 1, 1, 1], np.int32)
  rewards = np.array([1.0, 2.0, 3.0, 10.0, 12.0, 14.0, 16.0], np.float32)
  state, normalised = stats.normalise(state, prompt_index, rewards, min_count=min_count, eps=EPS)
  batch_normalised = (rewards[:3] - rewards.mean()) / (rewards.std() + EPS)
  own = rewards[3:]
  own_normalised = (own - own.mean()) / (own.std() + EPS)
  np.testing.assert_allclose(normalised[:3], batch_normalised, rtol=1e-5)
  np.testing.assert_allclose(normalised[3:], own_normalised, rtol=1e-5)
  logged = stats.prompt_stats(state, min_count=min_count)
  assert int(logged["stats/num_prompts_seen"]) == 2
  assert int(logged["stats/num_prompts_ready"]) == 1
  np.testing.assert_allclose(logged["stats/mean_buffer_count"], 3.5)
  # per_prompt=False: the batch's statistics for every sample; the buffers fill the same way.
  batch_state, batch_only = stats.normalise(stats.init_normaliser(2, 8), prompt_index, rewards,
                                            min_count=min_count, eps=EPS, per_prompt=False)
  np.testing.assert_allclose(batch_only, (rewards - rewards.mean()) / (rewards.std() + EPS),
                             rtol=1e-5)
  np.testing.assert_array_equal(batch_state.buffer, state.buffer)


def test_state_is_a_pytree_with_fixed_shapes():
  state = stats.init_normaliser(5, BUFFER_SIZE)
  leaves = jax.tree.leaves(state)
  assert [leaf.shape for leaf in leaves] == [(5, BUFFER_SIZE), (5,), (5,)]
  assert [leaf.dtype for leaf in leaves] == [jnp.float32, jnp.int32, jnp.int32]
  new_state, _ = stats.normalise(state, np.array([0, 4]), np.array([1.0, 2.0]),
                                 min_count=MIN_COUNT, eps=EPS)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert [leaf.dtype for leaf in jax.tree.leaves(new_state)] == [jnp.float32, jnp.int32, jnp.int32]


def test_rejects_bad_arguments():
  with pytest.raises(ValueError, match="num_prompts=0"):
    stats.init_normaliser(0, BUFFER_SIZE)
  with pytest.raises(ValueError, match="buffer_size=-1"):
    stats.init_normaliser(3, -1)
  state = stats.init_normaliser(3, BUFFER_SIZE)
  with pytest.raises(ValueError, match="min_count=33"):
    stats.normalise(state, np.array([0]), np.array([1.0]), min_count=33, eps=EPS)
  with pytest.raises(ValueError, match="equal"):
    stats.normalise(state, np.array([0, 1]), np.array([1.0]), min_count=MIN_COUNT, eps=EPS)


def test_group_normalise_hand_computed():
  rewards = np.array([1.0, 3.0, 10.0, 10.0, 0.0, 4.0], np.float32)
  # Groups of 2: (1, 3) -> mean 2, std 1; (10, 10) -> std 0; (0, 4) -> mean 2, std 2.
  np.testing.assert_allclose(stats.group_normalise(rewards, 2, eps=0.5),
                             [-1 / 1.5, 1 / 1.5, 0.0, 0.0, -2 / 2.5, 2 / 2.5], rtol=1e-6)
  with pytest.raises(ValueError, match="multiple of group_size=4"):
    stats.group_normalise(rewards, 4, eps=EPS)


def test_one_group_equals_the_batch_normalisation():
  """GRPO with the whole batch as one group is DDPO's batch-statistics normalisation."""
  rewards = np.random.default_rng(0).standard_normal(8).astype(np.float32)
  _, batch = stats.normalise(stats.init_normaliser(3, 8), np.arange(8) % 3, rewards,
                             min_count=4, eps=EPS, per_prompt=False)
  np.testing.assert_allclose(stats.group_normalise(rewards, 8, eps=EPS), batch, rtol=1e-6)
