"""The training loop end to end on the tiny config, and its invariants.

- On the first micro-batch after sampling: ratio == 1, clip fraction 0, approx KL 0.
- Gradient accumulation over k micro-batches == one step on the concatenated batch.
- `ddpo` == `tdpo` with a critic that outputs zero (same policy updates).
- A seeded JPEG-compressibility run raises the mean reward.
- Bad input gives a clear error and leaves the workdir as it was.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import config_checks
from tdpo_jax import metrics_writer
from tdpo_jax import rewards
from tdpo_jax import train
from tests import helpers


def _prepare(trainer, state, frozen):
  """Samples epoch 0 and returns its TransitionBatch."""
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  return helpers.epoch_batches(trainer, state, frozen, trajectory, prompt_index)


def _params_close(a, b, rtol, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_first_microbatch_ratio_is_one(cache_dir):
  trainer = train.Trainer(helpers.tiny_config(cache_dir, algorithm="tdpo_r"))
  frozen, state = trainer.frozen_params(), trainer.init_state()
  batches = _prepare(trainer, state, frozen)
  first = jax.tree.map(lambda x: x[0], batches)
  _, metrics = jax.jit(trainer.kernels.train_step_fn)(state, frozen, first, jax.random.key(0))
  assert abs(float(metrics["policy/ratio"]) - 1.0) < 1e-5
  assert float(metrics["policy/clipfrac"]) == 0.0
  assert abs(float(metrics["policy/approx_kl"])) < 1e-10


def test_gradient_accumulation_equals_concatenated_batch(cache_dir):
  config = helpers.tiny_config(cache_dir, algorithm="tdpo")
  config.critic.dropout_rates = (0.0, 0.0, 0.0, 0.0)  # dropout masks depend on the split
  trainer = train.Trainer(config)
  frozen, state = trainer.frozen_params(), trainer.init_state()
  batches = _prepare(trainer, state, frozen)
  accumulated = jax.tree.map(lambda x: x[0], batches)            # (k, M, ...)
  k, m = accumulated.latents.shape[:2]
  concatenated = jax.tree.map(lambda x: x.reshape((1, k * m) + x.shape[2:]), accumulated)
  step = jax.jit(trainer.kernels.train_step_fn)
  state_a, metrics_a = step(state, frozen, accumulated, jax.random.key(0))
  state_b, metrics_b = step(state, frozen, concatenated, jax.random.key(0))
  assert k > 1
  # Adam's first update is lr g / (|g| + eps): entries whose gradient is near eps = 1e-8 amplify
  # float-rounding differences of the two summation orders, so compare at 1% of lr = 1e-4.
  _params_close(state_a.policy_params, state_b.policy_params, rtol=1e-4, atol=1e-6)
  _params_close(state_a.critic_params, state_b.critic_params, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics_a["policy/grad_norm"], metrics_b["policy/grad_norm"],
                             rtol=1e-4)


def test_ddpo_equals_tdpo_with_zero_critic(cache_dir):
  config = helpers.tiny_config(cache_dir, algorithm="ddpo")
  ddpo = train.Trainer(config)
  tdpo = train.Trainer(helpers.tiny_config(cache_dir, algorithm="tdpo"))
  frozen = ddpo.frozen_params()
  state_ddpo = ddpo.init_state()
  state_tdpo = tdpo.init_state()
  state_tdpo = state_tdpo.replace(
      critic_params=jax.tree.map(jnp.zeros_like, state_tdpo.critic_params))
  state_ddpo, metrics_ddpo, *_ = ddpo.run_epoch(state_ddpo, frozen)
  state_tdpo, metrics_tdpo, *_ = tdpo.run_epoch(state_tdpo, frozen)
  assert metrics_ddpo["reward/mean"] == metrics_tdpo["reward/mean"]
  _params_close(state_ddpo.policy_params, state_tdpo.policy_params, rtol=1e-5, atol=1e-8)
  # ... and the policy did move.
  moved = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(state_ddpo.policy_params))
  assert moved > 0


def test_run_writes_metrics_images_and_tensorboard(cache_dir, tmp_path):
  config = helpers.tiny_config(cache_dir, algorithm="tdpo_r", num_epochs=2)
  history = train.run(config, str(tmp_path))
  assert len(history) == 2
  logged = metrics_writer.read_metrics(str(tmp_path))
  assert [m["epoch"] for m in logged] == [0, 1]
  for key in ("reward/mean", "reward/std", "policy/loss", "critic/value_loss",
              "policy/approx_kl", "policy/clipfrac", "critic/explained_variance",
              "reset/dormant_frac/l0", "reset/dormant_frac/l3", "time/sample_s",
              "time/train_s"):
    assert key in logged[0], key
  assert all(np.isfinite(v) for v in logged[1].values())
  # tiny.py resets every 2 epochs: after epoch 1.
  assert "reset/num_reset/l0" in logged[1] and "reset/num_reset/l0" not in logged[0]
  assert logged[0]["train/num_updates"] == 10  # the official schedule: 10 optimizer steps
  assert os.path.exists(tmp_path / "images" / "epoch_0000.png")
  assert os.listdir(tmp_path / "tensorboard")
  assert json.loads((tmp_path / "config.json").read_text())["algorithm"] == "tdpo_r"


def test_jpeg_reward_rises(cache_dir, tmp_path):
  """A seeded TDPO-R run on JPEG compressibility raises the mean reward (loose trend test).

  The tiny random UNet with rank-4 LoRA at the paper's lr/clip barely moves in a few epochs, so
  this short run fine-tunes the full UNet with lr 1e-3 and clip range 0.2 (seen: -4.22 -> -4.00
  over 6 epochs, epoch-to-epoch noise ~0.05).
  """
  config = helpers.tiny_config(cache_dir, algorithm="tdpo_r", num_epochs=6)
  config.lora.enabled = False
  config.train.learning_rate = 1e-3
  config.train.clip_range = 0.2
  config.log.image_grid_every = 0
  history = train.run(config, str(tmp_path))
  rewards_per_epoch = [m["reward/mean"] for m in history]
  assert np.mean(rewards_per_epoch[-2:]) > np.mean(rewards_per_epoch[:2]) + 0.05, rewards_per_epoch


@pytest.mark.parametrize("key,value,message", [
    ("algorithm", "ppo", "unknown algorithm 'ppo'"),
    ("reward", "no_such_reward", "unknown reward 'no_such_reward'"),
    ("train.batch_size", 3, "train.batch_size=3 does not divide the 8 samples"),
    ("train.gradient_accumulation_steps", 3, "gradient_accumulation_steps=3 does not divide"),
])
def test_bad_config_is_a_clear_error_and_workdir_untouched(cache_dir, tmp_path, key, value,
                                                          message):
  (tmp_path / "keep.txt").write_text("previous run")
  config = helpers.tiny_config(cache_dir, **{key: value})
  with pytest.raises(ValueError, match=message):
    train.run(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_nan_reward_stops_with_clear_error(cache_dir, tmp_path):
  rewards.register("nan_reward", lambda images, prompts: np.full(len(images), np.nan))
  config = helpers.tiny_config(cache_dir, reward="nan_reward", num_epochs=2)
  (tmp_path / "keep.txt").write_text("previous run")
  with pytest.raises(train.NonFiniteError, match="epoch 0: reward 'nan_reward' is NaN/inf"):
    train.run(config, str(tmp_path))
  assert (tmp_path / "keep.txt").read_text() == "previous run"
  assert not (tmp_path / "metrics.jsonl").exists()


def test_main_cli_reports_bad_config_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tdpo_jax.main", f"--config={helpers.REPO}/configs/tiny.py",
       f"--workdir={tmp_path}", "--config.algorithm=ppo"],
      capture_output=True, text=True, cwd=helpers.REPO, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown algorithm 'ppo'")
  assert "Traceback" not in result.stderr


def test_summary_line_shows_eval_means_on_eval_epochs():
  metrics = {"epoch": 3, "reward/mean": 0.875, "reward/std": 0.125, "policy/loss": -1e-3,
             "policy/approx_kl": 2e-3, "policy/clipfrac": 0.5, "time/epoch_s": 12.34}
  line = train.summary_line(metrics)
  assert line == ("epoch 3 | reward 0.8750 ± 0.1250 | policy loss -1.00e-03 kl 2.0e-03 clip 0.50"
                  " | 12.3 s")
  metrics.update({"eval/heldout/shapes_proxy/mean": 0.5, "eval/heldout/shapes_proxy/std": 0.1,
                  "eval/heldout/shapes_gold/mean": 0.25, "eval/heldout/kl_to_pretrained": 3.0,
                  "eval/train_prompts/shapes_gold/mean": 0.75})
  assert train.summary_line(metrics).endswith(
      " | eval shapes_gold 0.2500 shapes_proxy 0.5000 | 12.3 s")
  metrics.update({"critic/value_loss": 0.25, "critic/explained_variance": 0.0625,
                  "critic/explained_variance/late": 0.5})
  assert " | value loss 0.2500 ev +0.062 late +0.500 | " in train.summary_line(metrics)


def test_grpo_samples_groups_and_standardises_within_them(cache_dir):
  config = helpers.tiny_config(cache_dir, algorithm="grpo", **{"sample.group_size": 2})
  trainer = train.Trainer(config)
  frozen, state = trainer.frozen_params(), trainer.init_state()
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  groups = prompt_index.reshape(-1, 2)
  assert (groups[:, 0] == groups[:, 1]).all()  # consecutive pairs share a prompt
  reward = rewards.make_reward_fn(config.reward)(
      np.asarray(trajectory.images), [trainer.prompts[i] for i in prompt_index])
  _, batches, _, _ = trainer.kernels.prepare(state, frozen, trajectory, prompt_index,
                                             np.asarray(reward, np.float32))
  # Each pair's rewards become -+1 (group std of two values is half their gap), then every
  # (sample, step) entry is standardised: the advantages are -+1 / std(-+1) = -+1 up to eps.
  pair = np.asarray(reward).reshape(-1, 2)
  expected = np.where(pair[:, :1] < pair[:, 1:], [[-1.0, 1.0]], [[1.0, -1.0]]).reshape(-1)
  expected = np.repeat(expected, config.sample.num_steps)
  np.testing.assert_allclose(np.sort(np.asarray(batches.advantages).reshape(-1)),
                             np.sort(expected), atol=1e-4)
  with pytest.raises(ValueError, match="sample.group_size=0 must be >= 2"):
    config_checks.validate_config(helpers.tiny_config(cache_dir, algorithm="grpo"))
  with pytest.raises(ValueError, match="sample.group_size=3 does not divide the 8 samples"):
    config_checks.validate_config(helpers.tiny_config(cache_dir, algorithm="grpo",
                                                      **{"sample.group_size": 3}))
