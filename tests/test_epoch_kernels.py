"""The epoch's fused kernels equal the step-by-step computation they replace.

- the `prepare` kernel (epoch.prepare, one jit) == normalise, critic embed + values, advantages
  and a Python-loop gather of the documented order, done one by one (`helpers.epoch_batches`).
- the `train_epoch` kernel (one scan over the S updates) == S calls of the jitted train step
  with rng fold_in(epoch.train_updates_key(state.rng, epoch), u).
- `train.fuse_micro_batches` gives the same update as the micro-batch scan (dropout off: masks
  depend on the split), and so does `train.remat` (recomputation, same math).
- `critic.embed_train_timesteps_only` embeds exactly the trained pairs, and standardises the
  advantages over them.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import epoch
from tdpo_jax import objectives
from tdpo_jax import train
from tests import helpers

NO_DROPOUT = (0.0, 0.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def epoch0(cache_dir):
  trainer = train.Trainer(helpers.tiny_config(cache_dir, algorithm="tdpo_r"))
  frozen, state = trainer.frozen_params(), trainer.init_state()
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  reward = np.asarray(trainer.reward_fn(np.asarray(trajectory.images),
                                        [trainer.prompts[i] for i in prompt_index]), np.float32)
  return trainer, frozen, state, trajectory, prompt_index, reward


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_prepare_kernel_equals_eager_phases(epoch0):
  trainer, frozen, state, trajectory, prompt_index, reward = epoch0
  _, batches, probe, metrics = trainer.kernels.prepare(state, frozen, trajectory,
                                                       np.asarray(prompt_index, np.int32), reward)
  expected = helpers.epoch_batches(trainer, state, frozen, trajectory, prompt_index)
  assert batches.latents.shape[:3] == (10, 4, 2)  # S updates, k micro-batches, M
  _close(batches, expected)
  assert probe.shape == (trainer.config.reset.probe_size, trainer.models.embed_dim)
  assert np.isfinite(float(metrics["critic/explained_variance"]))


def test_train_epoch_scan_equals_step_loop(epoch0):
  trainer, frozen, state, trajectory, prompt_index, reward = epoch0
  batches = helpers.epoch_batches(trainer, state, frozen, trajectory, prompt_index)
  batches = jax.tree.map(lambda x: x[:3], batches)  # 3 updates are enough
  key = epoch.train_updates_key(state.rng, 0)
  looped = trainer.init_state()  # fresh copies: both kernels donate their state
  looped_metrics = []
  for update in range(3):
    looped, m = trainer.kernels.train_step(
        looped, frozen, jax.tree.map(lambda x, u=update: x[u], batches),
        jax.random.fold_in(key, update))
    looped_metrics.append(m)
  scanned, metrics = trainer.kernels.train_epoch(trainer.init_state(), frozen, batches)
  assert int(scanned.step) == int(looped.step) == 3
  _close(scanned.policy_params, looped.policy_params)
  _close(scanned.critic_params, looped.critic_params)
  for name in ("policy/loss", "critic/value_loss", "policy/grad_norm"):
    _close(metrics[name], np.stack([m[name] for m in looped_metrics]))


@pytest.mark.parametrize("switch, off, on", [("train.fuse_micro_batches", False, True),
                                             ("train.remat", "none", "unet"),
                                             ("train.remat", "none", "blocks")])
def test_fused_micro_batches_and_remat_same_update(cache_dir, switch, off, on):
  updates = {}
  for value in (off, on):
    config = helpers.tiny_config(cache_dir, algorithm="tdpo", **{switch: value})
    config.critic.dropout_rates = NO_DROPOUT
    trainer = train.Trainer(config)
    frozen, state = trainer.frozen_params(), trainer.init_state()
    if not updates:
      trajectory, prompt_index = trainer.sample(state, frozen, 0)
      batch = jax.tree.map(lambda x: x[0], helpers.epoch_batches(trainer, state, frozen,
                                                                 trajectory, prompt_index))
    updates[value] = jax.jit(trainer.kernels.train_step_fn)(state, frozen, batch,
                                                             jax.random.key(0))
  (scan_state, scan_metrics), (fused_state, fused_metrics) = updates[off], updates[on]
  # Adam's first step amplifies rounding of near-zero gradients (see test_train): the gradient
  # norm is compared tightly, parameters at 1% of lr.
  np.testing.assert_allclose(fused_metrics["policy/grad_norm"], scan_metrics["policy/grad_norm"],
                             rtol=1e-4)
  np.testing.assert_allclose(fused_metrics["critic/grad_norm"], scan_metrics["critic/grad_norm"],
                             rtol=1e-4)
  _close(fused_state.policy_params, scan_state.policy_params, rtol=1e-4, atol=1e-6)
  _close(fused_state.critic_params, scan_state.critic_params, rtol=1e-4, atol=1e-6)


def test_embed_train_timesteps_only(cache_dir, epoch0):
  full, frozen, state, trajectory, prompt_index, reward = epoch0
  config = helpers.tiny_config(cache_dir, algorithm="tdpo")
  config.train.timestep_fraction = 0.5
  config.critic.embed_train_timesteps_only = True
  trainer = train.Trainer(config)
  args = (state, frozen, trajectory, np.asarray(prompt_index, np.int32), reward)
  _, batches, _, _ = trainer.kernels.prepare(*args)
  embeds = full.embed_states(frozen, trajectory)  # all N T states
  sample_index, step_index = epoch.train_indices(state.rng, 0, len(prompt_index),
                                                 config.sample.num_steps, 5)
  dim = full.models.embed_dim
  np.testing.assert_allclose(np.asarray(batches.embeds).reshape(-1, dim),
                             np.asarray(embeds[sample_index, step_index]).reshape(-1, dim),
                             rtol=1e-5, atol=1e-6)
  values = np.asarray(batches.old_values).ravel()
  returns = np.asarray(batches.returns).ravel()
  np.testing.assert_allclose(np.asarray(batches.advantages).ravel(),
                             np.asarray(objectives.standardise(jnp.asarray(returns - values),
                                                               config.train.adv_eps)),
                             rtol=1e-4, atol=1e-5)
  assert batches.latents.shape[0] * batches.latents.shape[1] * batches.latents.shape[2] == 40
