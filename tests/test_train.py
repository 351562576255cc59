"""The training loop end to end on the tiny config, and its invariants.

- On the first micro-batch after sampling: ratio == 1, clip fraction 0, approx KL 0.
- A run writes its metrics, image grids, TensorBoard events and config.
- A seeded JPEG-compressibility run raises the mean reward.
- Bad input (a bad config, a Trainer built for another config, a NaN reward) gives a clear
  error and leaves the workdir as it was.
(Gradient accumulation == the concatenated batch, and ddpo == tdpo with a zero critic: in
test_epoch_kernels.py, with the other tests that compute one update two ways.)
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tdpo_jax import config_checks
from tdpo_jax import metrics_writer
from tdpo_jax import rewards
from tdpo_jax import train
from tests import helpers

# The tiny TDPO-R config of this file's training tests, fine-tuning the full UNet with lr 1e-3
# and clip range 0.2: the tiny random UNet with rank-4 LoRA at the paper's lr/clip barely moves
# in a few epochs (nor does it at lr 1e-3 or 1e-2, clip 0.2), and `test_jpeg_reward_rises` needs
# it to move. The tests that use it share one Trainer (`helpers.shared_trainer`): its kernels,
# the full UNet's train step the costliest to compile, compile once.
FULL_UNET = {"algorithm": "tdpo_r", "lora.enabled": False, "train.learning_rate": 1e-3,
             "train.clip_range": 0.2}


def _full_unet_trainer(cache_dir):
  return helpers.shared_trainer(helpers.tiny_config(cache_dir, **FULL_UNET))


def test_first_microbatch_ratio_is_one(cache_dir):
  trainer = _full_unet_trainer(cache_dir)
  frozen, state = trainer.frozen_params(), trainer.init_state()
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  # The epoch's kernels called as `run_epoch` calls them: the executables the runs below use.
  _, (normaliser, batches, _, _) = helpers.prepare_epoch(trainer, state, frozen, trajectory,
                                                         prompt_index)
  _, metrics = trainer.kernels.train_epoch(state.replace(normaliser=normaliser), frozen, batches)
  ratio, clipfrac, approx_kl = (np.asarray(metrics[f"policy/{name}"])
                                for name in ("ratio", "clipfrac", "approx_kl"))
  assert ratio.shape == (batches.latents.shape[0],)  # one entry per optimizer step
  # Update 0 (its k micro-batches all see the policy that sampled them): ratio 1, nothing clipped.
  assert abs(float(ratio[0]) - 1.0) < 1e-5
  assert float(clipfrac[0]) == 0.0
  assert abs(float(approx_kl[0])) < 1e-10
  assert float(np.abs(ratio[1:] - 1.0).max()) > 1e-5  # ... and later ones see the moved policy


def test_run_writes_metrics_images_and_tensorboard(cache_dir, tmp_path):
  config = helpers.tiny_config(cache_dir, num_epochs=2, **FULL_UNET)
  history = train.run(config, str(tmp_path), trainer=_full_unet_trainer(cache_dir))
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


@pytest.mark.parametrize("key,value,built,wanted", [("seed", 1, "0", "1"),
                                                    ("algorithm", "tdpo", "'tdpo_r'", "'tdpo'")])
def test_run_refuses_a_trainer_built_for_another_config(cache_dir, tmp_path, key, value, built,
                                                       wanted):
  (tmp_path / "keep.txt").write_text("previous run")
  config = helpers.tiny_config(cache_dir, **{**FULL_UNET, key: value})
  with pytest.raises(ValueError, match=rf"^the trainer was built for another config "
                                       rf"\({key}: trainer {built}, run {wanted}\); ") as error:
    train.run(config, str(tmp_path), trainer=_full_unet_trainer(cache_dir))
  assert "\n" not in str(error.value)  # one line, naming only the key that differs
  assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
  assert (tmp_path / "keep.txt").read_text() == "previous run"


EPOCHS, KEYS = 4, 4  # test_jpeg_reward_rises: epochs trained; epochs whose samples are paired


def test_jpeg_reward_rises(cache_dir):
  """TDPO-R on JPEG compressibility raises the reward (a trend test on paired samples).

  The tiny random UNet with rank-4 LoRA at the paper's lr/clip barely moves in a few epochs, so
  this run fine-tunes the full UNet with lr 1e-3 and clip range 0.2 (`FULL_UNET`). After EPOCHS
  epochs the trained policy samples the first KEYS epochs' prompts with their noise again (both
  are functions of (seed, epoch)), as the initial policy did: the mean reward rise over these
  paired samples is the policy's doing only (exactly 0 without training), free of the ~0.035
  epoch-to-epoch noise of the training reward's mean (different prompts and noise each epoch)
  that the former test had to outrun (6 epochs, the mean training reward of the last two epochs
  vs the first two: -4.21 -> -4.07 here).
  Seen (keys 0-3) after 1, 2, 3, 4, 5 epochs: seed 0 (this test) 0.030, 0.045, 0.035, 0.117,
  0.127; seeds 1 and 2 (a proxy for another machine's rounding) 0.118/0.103, 0.123/0.113,
  0.139/0.155, 0.160/0.193, 0.168/0.191. Single keys scatter by ~0.03 around their mean; after 4
  epochs every one of 8 keys rose by >= 0.069 (seed 0). LoRA (the paper's lr/clip, or lr 1e-3 or
  1e-2 with clip 0.2) gave -0.001, -0.007, -0.028 after 4 epochs. Threshold 0.06: half the
  smallest rise seen at 4 epochs.
  """
  trainer = _full_unet_trainer(cache_dir)
  frozen = trainer.frozen_params()

  def mean_rewards(state):
    rows = []
    for epoch in range(KEYS):
      trajectory, prompt_index = trainer.sample(state, frozen, epoch)
      rows.append(trainer.score_reward(trajectory.images,
                                       [trainer.prompts[i] for i in prompt_index]))
    return np.mean(rows, axis=1)

  state = trainer.init_state()
  before = mean_rewards(state)
  history = []
  for _ in range(EPOCHS):
    state, metrics, *_ = trainer.run_epoch(state, frozen)
    history.append(metrics["reward/mean"])
  after = mean_rewards(state)
  assert history[0] == pytest.approx(before[0], abs=1e-6)  # epoch 0 sampled the initial policy
  rise = after - before
  assert rise.mean() > 0.06, (rise, history)


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
  # A Trainer of its own (the reward differs) on FULL_UNET: its kernels other than the reward
  # (initial state, rollout, evaluation before training) are those of the tests above, which the
  # persistent compilation cache then holds.
  config = helpers.tiny_config(cache_dir, reward="nan_reward", num_epochs=2, **FULL_UNET)
  (tmp_path / "keep.txt").write_text("previous run")
  with pytest.raises(train.NonFiniteError, match="epoch 0: reward 'nan_reward' is NaN/inf"):
    train.run(config, str(tmp_path), trainer=helpers.shared_trainer(config))
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
                  "eval/train_prompts/shapes_gold/mean": 0.75, "time/eval_s": 4.56})
  assert train.summary_line(metrics).endswith(
      " | eval shapes_gold 0.2500 shapes_proxy 0.5000 | 12.3 s + eval 4.6 s")
  metrics.update({"critic/value_loss": 0.25, "critic/explained_variance": 0.0625,
                  "critic/explained_variance/late": 0.5})
  assert " | value loss 0.2500 ev +0.062 late +0.500 | " in train.summary_line(metrics)


def test_grpo_samples_groups_and_standardises_within_them(cache_dir):
  config = helpers.tiny_config(cache_dir, algorithm="grpo", **{"sample.group_size": 2})
  trainer = helpers.shared_trainer(config)
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
