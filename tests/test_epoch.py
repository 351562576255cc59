"""The pure epoch math (tdpo_jax/epoch.py) on tiny hand-built pytrees; no pipeline is loaded.

- `train_indices`: the timestep-outer order against indices built by hand from the documented
  keys, and its invariants (each pass visits every sample once, a sample's timesteps differ).
- `gather_transitions`: every (S, k, M) slot holds the transition of its pass-major pair
  (latents encode (sample, state) so a wrong gather shows).
- keys: every stream folds from `TrainState.rng` as the module docstring says; `train_epoch`
  hands update u the key fold_in(train_updates_key(rng, epoch), u).
- explained variance per state and over the late states.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import epoch
from tdpo_jax import rollout
from tdpo_jax import stats
from tdpo_jax import train_step as train_step_lib


def _hand_built_indices(rng, ep, num_samples, num_steps, num_train_steps):
  """The documented order, built with Python loops from the documented keys."""
  key = jax.random.fold_in(jax.random.fold_in(rng, epoch.STREAM_TRAIN), ep)
  sample_perm = np.asarray(jax.random.permutation(
      jax.random.fold_in(key, epoch.TRAIN_SAMPLE_ORDER), num_samples))
  sample_keys = jax.random.split(jax.random.fold_in(key, epoch.TRAIN_STEP_ORDER), num_samples)
  step_perm = [np.asarray(jax.random.permutation(sample_keys[i], num_steps))
               for i in range(num_samples)]
  sample_index = np.zeros((num_train_steps, num_samples), np.int64)
  step_index = np.zeros((num_train_steps, num_samples), np.int64)
  for j in range(num_train_steps):      # pass j ...
    for i in range(num_samples):        # ... visits the samples in the shuffled order
      sample = sample_perm[i]
      sample_index[j, i] = sample
      step_index[j, i] = step_perm[sample][j]  # at the sample's j-th shuffled timestep
  return sample_index, step_index


@pytest.mark.parametrize("num_samples, num_steps, num_train_steps, ep",
                         [(6, 5, 5, 0), (6, 5, 2, 3), (1, 4, 3, 1)])
def test_train_indices_are_the_hand_built_timestep_outer_order(num_samples, num_steps,
                                                              num_train_steps, ep):
  rng = jax.random.key(11)
  sample_index, step_index = epoch.train_indices(rng, ep, num_samples, num_steps,
                                                 num_train_steps)
  expected_samples, expected_steps = _hand_built_indices(rng, ep, num_samples, num_steps,
                                                         num_train_steps)
  np.testing.assert_array_equal(sample_index, expected_samples)
  np.testing.assert_array_equal(step_index, expected_steps)
  for j in range(num_train_steps):  # every pass trains every sample exactly once
    assert sorted(np.asarray(sample_index[j])) == list(range(num_samples))
  for i in range(num_samples):  # a sample's trained timesteps are distinct
    steps = np.asarray(step_index[:, i])
    assert len(set(steps.tolist())) == num_train_steps and steps.max() < num_steps
  # Another epoch, another order (6! x 5!^6 orders: equal only by a bug).
  if num_samples > 1:
    other = epoch.train_indices(rng, ep + 1, num_samples, num_steps, num_train_steps)
    assert not (np.array_equal(other[0], sample_index) and np.array_equal(other[1], step_index))


def _coded_trajectory(num_samples, num_steps):
  """latents[s, k] = 100 s + k everywhere: a gathered entry names its (sample, state)."""
  codes = 100.0 * np.arange(num_samples)[:, None] + np.arange(num_steps + 1)[None]
  latents = np.broadcast_to(codes[:, :, None, None, None], (num_samples, num_steps + 1, 1, 2, 2))
  return rollout.Trajectory(
      latents=jnp.asarray(latents, jnp.float32),
      log_probs=jnp.asarray(codes[:, :-1] + 0.5, jnp.float32),
      timesteps=jnp.asarray(1000 - 10 * np.arange(num_steps)[None].repeat(num_samples, 0),
                            jnp.int32),
      prompt_embeds=jnp.asarray(np.arange(num_samples)[:, None, None] * np.ones((1, 3, 2)),
                                jnp.float32),
      uncond_embeds=jnp.zeros((1, 3, 2), jnp.float32),
      images=jnp.zeros((num_samples, 4, 4, 3), jnp.float32))


def test_gather_transitions_puts_each_pair_in_its_slot():
  num_samples, num_steps, num_train_steps, micro, accum = 4, 3, 3, 2, 2
  trajectory = _coded_trajectory(num_samples, num_steps)
  returns = jnp.asarray(np.arange(num_samples)[:, None] * np.ones((1, num_steps)) * 7.0)
  sample_index, step_index = epoch.train_indices(jax.random.key(0), 0, num_samples, num_steps,
                                                 num_train_steps)
  pair_code = np.asarray(sample_index) * 100.0 + np.asarray(step_index)  # (t_train, N)
  batches = epoch.gather_transitions(
      trajectory, returns, sample_index, step_index, advantages=jnp.asarray(pair_code + 0.25),
      values=jnp.asarray(pair_code + 0.75), embeds=jnp.asarray(pair_code[..., None] * np.ones(5)),
      micro_batch=micro, accumulation=accum)
  num_updates = num_train_steps * num_samples // (micro * accum)
  assert batches.latents.shape == (num_updates, accum, micro, 1, 2, 2)
  pairs = [(int(s), int(t)) for s, t in zip(np.asarray(sample_index).ravel(),
                                            np.asarray(step_index).ravel())]  # pass-major
  for u in range(num_updates):
    for a in range(accum):
      for m in range(micro):
        s, t = pairs[(u * accum + a) * micro + m]
        slot = jax.tree.map(lambda x, u=u, a=a, m=m: np.asarray(x[u, a, m]), batches)
        assert slot.latents.flat[0] == 100 * s + t
        assert slot.next_latents.flat[0] == 100 * s + t + 1
        assert slot.old_log_probs == 100 * s + t + 0.5
        assert slot.timesteps == 1000 - 10 * t
        assert slot.returns == 7.0 * s
        assert slot.advantages == 100 * s + t + 0.25
        assert slot.old_values == 100 * s + t + 0.75
        np.testing.assert_array_equal(slot.embeds, np.full(5, 100 * s + t))
        np.testing.assert_array_equal(slot.prompt_embeds, np.full((3, 2), s))


def test_to_updates_keeps_pass_major_order():
  x = jnp.arange(2 * 6).reshape(2, 6)  # 2 passes x 6 samples = 12 pairs
  np.testing.assert_array_equal(epoch.to_updates(x, 3, 2), np.arange(12).reshape(2, 2, 3))


def test_keys_fold_from_the_state_rng_as_documented():
  rng = jax.random.key(5)
  fold = lambda key, *indices: [key := jax.random.fold_in(key, i) for i in indices][-1]
  data = jax.random.key_data
  np.testing.assert_array_equal(data(epoch.sample_key(rng, 3, 2)),
                                data(fold(rng, epoch.STREAM_SAMPLE, 3, 2)))
  np.testing.assert_array_equal(data(epoch.train_updates_key(rng, 4)),
                                data(fold(rng, epoch.STREAM_TRAIN, 4, epoch.TRAIN_UPDATES)))
  np.testing.assert_array_equal(data(epoch.stream_key(rng, epoch.STREAM_RESET, 1)),
                                data(fold(rng, epoch.STREAM_RESET, 1)))
  streams = {tuple(np.asarray(data(epoch.stream_key(rng, s, 0)))) for s in range(5)}
  assert len(streams) == 5  # independent streams


def _tiny_state(rng, ep):
  zero = jnp.zeros((), jnp.int32)
  return train_step_lib.TrainState(
      step=zero, epoch=jnp.asarray(ep, jnp.int32), policy_params={}, policy_opt_state=(),
      critic_params={}, critic_opt_state=(), normaliser=stats.init_normaliser(1, 2),
      reset_count=zero, rng=rng)


def test_train_epoch_keys_each_update_from_the_state():
  rng, ep, num_updates = jax.random.key(9), 2, 3
  batches = train_step_lib.TransitionBatch(*[jnp.zeros((num_updates, 1, 1))] * 9)

  def record_step(state, frozen, batch, key):  # a train step that only reports its key
    del frozen, batch
    return state.replace(step=state.step + 1), {"key": jax.random.key_data(key)}

  state, metrics = jax.jit(lambda s, b: epoch.train_epoch(record_step, s, None, b))(
      _tiny_state(rng, ep), batches)
  assert int(state.step) == num_updates
  expected = [jax.random.key_data(jax.random.fold_in(epoch.train_updates_key(rng, ep), u))
              for u in range(num_updates)]
  np.testing.assert_array_equal(metrics["key"], np.stack(expected))


def test_probe_embeddings_are_distinct_states_of_the_epoch():
  embeds = jnp.arange(6 * 4 * 2, dtype=jnp.float32).reshape(6, 4, 2)  # (N, T, d), rows unique
  probe = np.asarray(epoch.probe_embeddings(embeds, jax.random.key(1), 0, 10))
  rows = {tuple(r) for r in np.asarray(embeds).reshape(-1, 2)}
  assert probe.shape == (10, 2) and len({tuple(r) for r in probe}) == 10
  assert all(tuple(r) in rows for r in probe)
  assert epoch.probe_embeddings(embeds, jax.random.key(1), 0, 100).shape == (24, 2)


def test_explained_variance_metrics_per_state_and_late():
  # T = 4 states; the critic is exact at the last two states only and 0 before.
  returns = np.tile(np.array([[1.0], [-1.0], [3.0], [-3.0]], np.float32), (1, 4))
  values = np.concatenate([np.zeros((4, 2), np.float32), returns[:, 2:]], axis=1)
  steps = np.broadcast_to(np.arange(4), (4, 4))
  metrics = jax.device_get(epoch.explained_variance_metrics(values, returns, steps, 4, 0.5))
  np.testing.assert_allclose([metrics[f"critic/explained_variance/k{k:02d}"] for k in range(4)],
                             [0.0, 0.0, 1.0, 1.0], atol=1e-6)
  np.testing.assert_allclose(metrics["critic/explained_variance/late"], 1.0, atol=1e-6)
  np.testing.assert_allclose(metrics["critic/explained_variance"], 0.5, atol=1e-6)
  assert epoch.late_states(10, 0.3) == 7 and epoch.late_states(10, 0.01) == 9
  assert epoch.late_states(4, 1.0) == 0


@pytest.mark.parametrize("rows, branches", [(7, 3), (8, 4), (3, 5), (5, 1)])
def test_in_branches_is_the_function_on_the_whole_batch(rows, branches):
  """Independent slices (uneven ones too; more branches than rows) give fn(x), rows in order;
  in a jitted kernel each slice is its own chain of ops: `branches` (at most `rows`) dots."""
  x = jnp.arange(rows * 4, dtype=jnp.float32).reshape(rows, 4)
  weight = jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(4, 3)
  fn = lambda part: jnp.tanh(part @ weight) * jnp.sum(part, axis=1, keepdims=True)
  np.testing.assert_allclose(epoch.in_branches(fn, x, branches), fn(x), rtol=1e-6)
  hlo = jax.jit(lambda x: epoch.in_branches(fn, x, branches)).lower(x).as_text()
  assert hlo.count("dot_general") == min(branches, rows)
