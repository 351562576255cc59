"""The epoch's fused kernels equal the step-by-step computation they replace, and other pairs of
computations of one update agree.

- the `prepare` kernel (epoch.prepare, one jit) == normalise, critic embed + values, advantages
  and a Python-loop gather of the documented order, done one by one (`helpers.epoch_batches`).
- the `train_epoch` kernel (one scan over the S updates) == S calls of the jitted train step
  with rng fold_in(epoch.train_updates_key(state.rng, epoch), u).
- Gradient accumulation over k micro-batches == one step on the concatenated batch.
- `train.fuse_micro_batches` gives the same update as the micro-batch scan (dropout off: masks
  depend on the split), and so does `train.remat` (recomputation, same math).
- `ddpo` == `tdpo` with a critic that outputs zero (same rewards, same policy updates).
- `critic.embed_train_timesteps_only` embeds exactly the trained pairs, and standardises the
  advantages over them.
Epoch 0 and the update comparisons use the `helpers.EXACT` Trainer, shared
(`helpers.shared_trainer`); the scan test tiny TDPO-R's (critic dropout on).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import epoch
from tdpo_jax import objectives
from tdpo_jax import train
from tests import helpers


class Epoch0(NamedTuple):
  """Epoch 0 of the shared `helpers.EXACT` Trainer: its samples and `prepare`'s outputs
  (the same `prepare` executable as test_ddpo_equals_tdpo_with_zero_critic's tdpo side,
  called by `helpers.prepare_epoch`)."""
  trainer: train.Trainer
  frozen: Any
  state: Any  # the initial state: never pass it to a kernel that donates it
  trajectory: Any
  prompt_index: np.ndarray
  normaliser: Any
  batches: Any
  probe: Any
  metrics: dict


@pytest.fixture(scope="module")
def epoch0(cache_dir):
  trainer = helpers.shared_trainer(helpers.tiny_config(cache_dir, **helpers.EXACT))
  frozen, state = trainer.frozen_params(), trainer.init_state()
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  _, prepared = helpers.prepare_epoch(trainer, state, frozen, trajectory, prompt_index)
  return Epoch0(trainer, frozen, state, trajectory, prompt_index, *prepared)


def _close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_prepare_kernel_equals_eager_phases(epoch0):
  expected = helpers.epoch_batches(epoch0.trainer, epoch0.state, epoch0.frozen, epoch0.trajectory,
                                   epoch0.prompt_index)
  assert epoch0.batches.latents.shape[:3] == (10, 4, 2)  # S updates, k micro-batches, M
  _close(epoch0.batches, expected)
  assert epoch0.probe.shape == (epoch0.trainer.config.reset.probe_size,
                                epoch0.trainer.models.embed_dim)
  assert np.isfinite(float(epoch0.metrics["critic/explained_variance"]))


def test_train_epoch_scan_equals_step_loop(cache_dir, epoch0):
  """On tiny TDPO-R, whose critic dropout is on: the scan must fold the update index into the
  key as the loop does. Epoch 0's batches serve as they are (they are data to both)."""
  trainer = helpers.shared_trainer(helpers.tiny_config(cache_dir, algorithm="tdpo_r"))
  assert any(trainer.config.critic.dropout_rates)
  frozen = trainer.frozen_params()
  batches = jax.tree.map(lambda x: x[:3], epoch0.batches)  # 3 updates are enough
  num_updates = batches.latents.shape[0]
  looped = trainer.init_state()  # fresh copies: both kernels donate their state
  key = epoch.train_updates_key(looped.rng, 0)
  looped_metrics = []
  for update in range(num_updates):
    looped, m = trainer.kernels.train_step(
        looped, frozen, jax.tree.map(lambda x, u=update: x[u], batches),
        jax.random.fold_in(key, update))
    looped_metrics.append(m)
  scanned, metrics = trainer.kernels.train_epoch(trainer.init_state(), frozen, batches)
  assert int(scanned.step) == int(looped.step) == num_updates
  _close(scanned.policy_params, looped.policy_params)
  _close(scanned.critic_params, looped.critic_params)
  for name in ("policy/loss", "critic/value_loss", "policy/grad_norm", "critic/grad_norm"):
    _close(metrics[name], np.stack([m[name] for m in looped_metrics]))


@pytest.fixture(scope="module")
def exact_update(epoch0):
  """The first (k, M) optimizer-step batch of epoch 0 (the tests below compare two computations
  of one update on it) and its update by the shared `helpers.EXACT` Trainer (critic dropout
  off: its masks depend on the micro-batch split)."""
  batch = jax.tree.map(lambda x: x[0], epoch0.batches)
  trainer = epoch0.trainer
  return batch, trainer.kernels.train_step(trainer.init_state(), epoch0.frozen, batch,
                                           jax.random.key(0))


def test_gradient_accumulation_equals_concatenated_batch(cache_dir, exact_update):
  batch, (state_a, metrics_a) = exact_update  # accumulated over the k micro-batches (k, M, ...)
  k, m = batch.latents.shape[:2]
  concatenated = jax.tree.map(lambda x: x.reshape((1, k * m) + x.shape[2:]), batch)
  trainer = helpers.shared_trainer(helpers.tiny_config(cache_dir, **helpers.EXACT))
  state_b, metrics_b = trainer.kernels.train_step(trainer.init_state(), trainer.frozen_params(),
                                                  concatenated, jax.random.key(0))
  assert k > 1
  # Adam's first update is lr g / (|g| + eps): with helpers.EXACT's eps the float rounding of
  # the two summation orders moves a parameter by < 1e-3 lr; compare at 1% of lr = 1e-6.
  _close(state_a.policy_params, state_b.policy_params, rtol=1e-4, atol=1e-6)
  _close(state_a.critic_params, state_b.critic_params, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics_a["policy/grad_norm"], metrics_b["policy/grad_norm"],
                             rtol=1e-4)


@pytest.mark.parametrize("switch, off, on", [("train.fuse_micro_batches", False, True),
                                             ("train.remat", "none", "unet"),
                                             ("train.remat", "none", "blocks")])
def test_fused_micro_batches_and_remat_same_update(cache_dir, exact_update, switch, off, on):
  batch, (scan_state, scan_metrics) = exact_update
  section, name = switch.split(".")
  assert helpers.tiny_config(cache_dir, **helpers.EXACT)[section][name] == off  # the "off" side
  trainer = helpers.shared_trainer(helpers.tiny_config(cache_dir, **helpers.EXACT, **{switch: on}))
  fused_state, fused_metrics = trainer.kernels.train_step(trainer.init_state(),
                                                          trainer.frozen_params(), batch,
                                                          jax.random.key(0))
  # helpers.EXACT's Adam eps keeps the rounding of near-zero gradients from being amplified
  # (test_gradient_accumulation_equals_concatenated_batch): the gradient norms are compared
  # tightly, parameters at 1% of lr.
  np.testing.assert_allclose(fused_metrics["policy/grad_norm"], scan_metrics["policy/grad_norm"],
                             rtol=1e-4)
  np.testing.assert_allclose(fused_metrics["critic/grad_norm"], scan_metrics["critic/grad_norm"],
                             rtol=1e-4)
  _close(fused_state.policy_params, scan_state.policy_params, rtol=1e-4, atol=1e-6)
  _close(fused_state.critic_params, scan_state.critic_params, rtol=1e-4, atol=1e-6)


def _epoch_update(trainer, state, frozen):
  """One epoch's sample, reward, `prepare` and S optimizer steps, as S calls of the `train_step`
  kernel with the `train_epoch` kernel's keys (the two are equal: above). Donates `state`.

  Returns:
    (host rewards (N,), the state after the S updates).
  """
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  reward, (normaliser, batches, _, _) = helpers.prepare_epoch(trainer, state, frozen, trajectory,
                                                              prompt_index)
  key = epoch.train_updates_key(state.rng, 0)
  state = state.replace(normaliser=normaliser)
  for update in range(batches.latents.shape[0]):
    state, _ = trainer.kernels.train_step(state, frozen,
                                          jax.tree.map(lambda x, u=update: x[u], batches),
                                          jax.random.fold_in(key, update))
  return reward, state


def test_ddpo_equals_tdpo_with_zero_critic(cache_dir):
  ddpo = helpers.shared_trainer(helpers.tiny_config(cache_dir, **{**helpers.EXACT,
                                                                  "algorithm": "ddpo"}))
  tdpo = helpers.shared_trainer(helpers.tiny_config(cache_dir, **helpers.EXACT))
  frozen = ddpo.frozen_params()
  initial = ddpo.init_state().policy_params
  state_tdpo = tdpo.init_state()
  state_tdpo = state_tdpo.replace(
      critic_params=jax.tree.map(jnp.zeros_like, state_tdpo.critic_params))
  reward_ddpo, state_ddpo = _epoch_update(ddpo, ddpo.init_state(), frozen)
  reward_tdpo, state_tdpo = _epoch_update(tdpo, state_tdpo, frozen)
  assert int(state_ddpo.step) == int(state_tdpo.step) == 10  # the whole epoch's updates
  np.testing.assert_array_equal(reward_ddpo, reward_tdpo)
  _close(state_ddpo.policy_params, state_tdpo.policy_params, rtol=1e-5, atol=1e-8)
  # ... and the policy did move (LoRA's B starts at 0; the lr is 1e-4 per step).
  moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
              for a, b in zip(jax.tree.leaves(state_ddpo.policy_params),
                              jax.tree.leaves(initial)))
  assert moved > 1e-5


def test_embed_train_timesteps_only(cache_dir, epoch0):
  full, frozen, state = epoch0.trainer, epoch0.frozen, epoch0.state
  config = helpers.tiny_config(cache_dir, algorithm="tdpo")
  config.train.timestep_fraction = 0.5
  config.critic.embed_train_timesteps_only = True
  trainer = helpers.shared_trainer(config)
  _, (_, batches, _, _) = helpers.prepare_epoch(trainer, state, frozen, epoch0.trajectory,
                                                epoch0.prompt_index)
  embeds = full.embed_states(frozen, epoch0.trajectory)  # all N T states
  sample_index, step_index = epoch.train_indices(state.rng, 0, len(epoch0.prompt_index),
                                                 config.sample.num_steps, 5)
  dim = full.models.embed_dim
  # Per row (one state's embedding): the two kernels embed different batches (40 vs 80 states,
  # split in `critic.embed_branches` chains), whose float32 rounding the VAE decode amplifies:
  # rows differed by up to 7.0e-5 relative on an AVX2 AMD EPYC (within 1e-5 elementwise on
  # earlier machines); a state one step off differs by >= 3.4e-3.
  want = np.asarray(embeds[sample_index, step_index]).reshape(-1, dim)
  row_error = helpers.row_relative_errors(np.asarray(batches.embeds).reshape(-1, dim), want)
  assert row_error.max() <= 5e-4, row_error
  values = np.asarray(batches.old_values).ravel()
  returns = np.asarray(batches.returns).ravel()
  np.testing.assert_allclose(np.asarray(batches.advantages).ravel(),
                             np.asarray(objectives.standardise(jnp.asarray(returns - values),
                                                               config.train.adv_eps)),
                             rtol=1e-4, atol=1e-5)
  assert batches.latents.shape[0] * batches.latents.shape[1] * batches.latents.shape[2] == 40
