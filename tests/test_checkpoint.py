"""Checkpoints and exact resume (DESIGN §5).

- Restore == saved state, bitwise, for every leaf (rng key data, normaliser, both opt states).
- Kill and resume: SIGTERM during epoch 3 (index 2) of `python -m tdpo_jax.main`, then the same
  command again, gives the same metrics, bitwise, as an uninterrupted 4-epoch run (run in the
  test's process with the same config).
- SIGKILL in the middle of a save leaves the previous checkpoint restorable.
- An incompatible config on resume is a one-line error naming the keys; num_epochs may change.
- A second run on a workdir another run holds is a one-line error and writes nothing.
- A NaN reward in epoch 2 (index 1) stops the run and keeps the epoch-1 checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdpo_jax import checkpoint
from tdpo_jax import metrics_writer
from tdpo_jax import stats
from tdpo_jax import train
from tdpo_jax import train_step
from tests import helpers

# tiny.py with 4 DDIM steps: 4 steps x 8 samples / micro-batch 2 = 16 micro-batches = 4 updates.
SHRINK = {"sample.num_steps": 4, "log.image_grid_every": 0}


@pytest.fixture(scope="module")
def trainer(cache_dir):
  return helpers.shared_trainer(helpers.tiny_config(cache_dir, **SHRINK))


def _storable_leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(checkpoint.to_storable(state))]


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(checkpoint.to_storable(a)) == jax.tree.structure(
      checkpoint.to_storable(b))
  for x, y in zip(_storable_leaves(a), _storable_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _randomised(state, seed=0):
  """`state` with every leaf set to random values (so no leaf equals its init by chance)."""
  leaves, treedef = jax.tree.flatten(checkpoint.to_storable(state))
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      new.append(jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype))
    else:
      new.append(jnp.asarray(rng.integers(0, 2**31 - 1, leaf.shape), leaf.dtype))
  key_impl = str(jax.random.key_impl(state.rng))
  return checkpoint.from_storable(jax.tree.unflatten(treedef, new), key_impl)


def test_restore_equals_saved_state_bitwise(trainer, tmp_path):
  state = _randomised(trainer.init_state())
  state = state.replace(epoch=jnp.asarray(3, jnp.int32))
  manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=True)
  checkpoint.save(manager, state, trainer.config)
  manager.wait_until_finished()
  assert manager.latest_step() == 3
  # Into a concrete template (as `run` does) and into an abstract one (no arrays allocated).
  for template in (trainer.init_state(), jax.eval_shape(trainer.init_state)):
    restored, meta = checkpoint.restore(manager, 3, template)
    _assert_bitwise_equal(restored, state)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    assert isinstance(restored.normaliser, stats.NormaliserState)
    assert meta["epoch"] == 3 and meta["config"]["sample"]["num_steps"] == 4
  # The restored key draws what the saved one draws.
  np.testing.assert_array_equal(jax.random.normal(restored.rng, (4,)),
                                jax.random.normal(state.rng, (4,)))
  manager.close()


def test_max_to_keep(trainer, tmp_path):
  state = trainer.init_state()
  manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2, async_save=True)
  for epoch in range(1, 5):
    checkpoint.save(manager, state.replace(epoch=jnp.asarray(epoch, jnp.int32)), trainer.config)
  manager.wait_until_finished()
  assert list(manager.all_steps()) == [3, 4]
  manager.close()


def test_incompatible_config_is_a_one_line_error(trainer, cache_dir, tmp_path):
  manager = checkpoint.make_manager(str(tmp_path), async_save=False)
  checkpoint.save(manager, trainer.init_state().replace(epoch=jnp.asarray(2, jnp.int32)),
                  trainer.config)
  manager.close()
  before = sorted(os.listdir(tmp_path))
  config = helpers.tiny_config(cache_dir, **SHRINK)
  config.seed = 1
  config.train.learning_rate = 1e-3
  config.num_epochs, config.log.progress, config.checkpoint.max_to_keep = 9, True, 7  # allowed
  with pytest.raises(ValueError) as error:
    train.run(config, str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert "incompatible config" in message
  assert "seed: saved 0, now 1" in message
  assert "train.learning_rate: saved 0.0001, now 0.001" in message
  assert "num_epochs" not in message.split("(only")[0]
  assert "max_to_keep" not in message and "progress" not in message
  assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_second_run_on_a_busy_workdir_is_a_clear_error(cache_dir, tmp_path):
  config = helpers.tiny_config(cache_dir, **SHRINK)
  with checkpoint.workdir_lock(str(tmp_path)):  # a run in progress
    with pytest.raises(ValueError, match=r"workdir .* is in use by another run"):
      train.run(config, str(tmp_path))
  assert os.listdir(tmp_path) == [checkpoint.LOCK_NAME]  # nothing of the second run written
  # The refused run left the lock free: the next one takes it.
  with checkpoint.workdir_lock(str(tmp_path)):
    pass


def test_config_differences_ignores_resumable_keys():
  saved = {"num_epochs": 4, "seed": 0, "log": {"progress": True}, "checkpoint": {"every": 1},
           "pretrained": {"cache_dir": "/a", "model": "tiny:0"}, "mesh": [["data", -1]]}
  current = {"num_epochs": 8, "seed": 0, "log": {"progress": False}, "checkpoint": {"every": 2},
             "pretrained": {"cache_dir": "/b", "model": "tiny:1"}, "mesh": [["data", 2]],
             "extra": 1}
  assert checkpoint.config_differences(saved, current) == [
      ("extra", "<missing>", 1), ("pretrained.model", "tiny:0", "tiny:1")]


def test_config_differences_reads_added_keys_as_their_old_behaviour():
  saved = {"seed": 0, "sample": {"batch_size": 4}}  # written before sample.group_size existed
  current = {"seed": 0, "sample": {"batch_size": 4, "group_size": 0}}
  assert checkpoint.config_differences(saved, current) == []
  current["sample"]["group_size"] = 4
  assert checkpoint.config_differences(saved, current) == [("sample.group_size", 0, 4)]


def test_config_differences_skips_removed_keys():
  # A checkpoint written while the config held pretrained.revision (read by nothing) and lacked
  # pretrained.tiny (added as None) resumes under today's sd15 / shapes configs.
  saved = {"seed": 0, "pretrained": {"model": "m", "revision": "", "cache_dir": ""}}
  current = {"seed": 0, "pretrained": {"model": "m", "cache_dir": "", "tiny": None}}
  assert checkpoint.config_differences(saved, current) == []
  current["pretrained"]["tiny"] = {"unet": {"sample_size": 8}}
  assert checkpoint.config_differences(saved, current) == [
      ("pretrained.tiny.unet.sample_size", "<missing>", 8)]


def test_truncate_metrics(tmp_path):
  lines = [json.dumps({"epoch": e, "x": e}) for e in range(4)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"epoch": 4, "x"')
  metrics_writer.truncate_metrics(str(tmp_path), 2)
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0, 1]


def test_nan_reward_keeps_last_good_checkpoint(trainer, cache_dir, tmp_path, monkeypatch):
  calls = []
  score = trainer.score_reward

  def nan_in_second_epoch(images, prompts):
    calls.append(len(prompts))
    reward = score(images, prompts)
    return np.full_like(reward, np.nan) if len(calls) == 2 else reward

  # The shared trainer's reward, NaN in epoch 1 (the trainer is restored after the test).
  monkeypatch.setattr(trainer, "score_reward", nan_in_second_epoch)
  # eval off: the reward is called once per epoch, by the epoch alone
  config = helpers.tiny_config(cache_dir, num_epochs=3, **{"eval.every": 0}, **SHRINK)
  with pytest.raises(train.NonFiniteError, match=f"epoch 1: reward '{config.reward}' is NaN"):
    train.run(config, str(tmp_path), trainer=trainer)
  assert calls == [8, 8]
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0]
  step, meta = checkpoint.latest(str(tmp_path))
  assert step == 1 and meta["epoch"] == 1 and meta["step"] == 4
  manager = checkpoint.make_manager(str(tmp_path))
  restored, _ = checkpoint.restore(manager, 1, trainer.init_state())
  manager.close()
  assert int(restored.epoch) == 1 and int(restored.step) == 4
  assert all(np.all(np.isfinite(x)) for x in _storable_leaves(restored)
             if np.issubdtype(x.dtype, np.floating))
  assert int(restored.normaliser.count.sum()) == 8  # epoch 0's 8 rewards, not epoch 1's NaNs
  # A compatible change (num_epochs) resumes: here nothing is left to run.
  config.num_epochs = 1
  history = train.run(config, str(tmp_path), trainer=trainer)
  assert history == [] and history.resumed_from == 1 and not history.preempted
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0]


# ------------------------------------------------------------------- processes

def _environment():
  environment = dict(os.environ)
  # Reruns load the compiled kernels from conftest's persistent cache: ~75 s -> ~30 s per process.
  environment["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return environment


def _command(workdir, cache_dir):
  return [sys.executable, "-m", "tdpo_jax.main", f"--config={helpers.REPO}/configs/tiny.py",
          f"--workdir={workdir}", f"--config.pretrained.cache_dir={cache_dir}",
          "--config.num_devices=1", "--config.num_epochs=4", "--config.log.progress=false",
          *(f"--config.{key}={value}" for key, value in SHRINK.items())]


def _without_times(history):
  return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]


def test_sigterm_and_resume_equals_uninterrupted_run(trainer, cache_dir, tmp_path):
  environment = _environment()
  # Uninterrupted, in this process (the config the command line below builds; the same XLA
  # flags, so the same compiled kernels: a subprocess loads them from the persistent cache).
  reference = tmp_path / "reference"
  config = helpers.tiny_config(cache_dir, num_epochs=4, **SHRINK)
  train.run(config, str(reference), trainer=trainer)
  expected = metrics_writer.read_metrics(str(reference))
  assert [m["epoch"] for m in expected] == [0, 1, 2, 3]

  # SIGTERM once checkpoint 2 (after epoch index 1) is final: the run is in epoch index 2.
  workdir = tmp_path / "preempted"
  command = _command(workdir, cache_dir)
  # Output to files, not pipes: nothing reads a pipe while the loop below waits, and a run that
  # logs more than a pipe holds (64 KiB; e.g. with JAX_LOG_COMPILES=1) would block on it.
  stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
  with open(stdout_path, "w") as stdout_file, open(stderr_path, "w") as stderr_file:
    process = subprocess.Popen(command, stdout=stdout_file, stderr=stderr_file, text=True,
                               cwd=helpers.REPO, env=environment)
  deadline = time.monotonic() + 600
  while not (workdir / "checkpoints" / "2").is_dir():
    assert process.poll() is None and time.monotonic() < deadline, (
        f"run ended before epoch 2:\n{stderr_path.read_text()[-3000:]}")
    time.sleep(0.1)
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=600)
  stdout, stderr = stdout_path.read_text(), stderr_path.read_text()
  assert process.returncode == 75, stderr[-3000:]  # EX_TEMPFAIL: requeue me (main.py)
  assert "preempted: stopped after epoch 2" in stdout
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(workdir))] == [0, 1, 2]
  assert checkpoint.latest(str(workdir))[0] == 3
  # The command line built the reference's config.
  assert (json.loads((workdir / "config.json").read_text())
          == json.loads((reference / "config.json").read_text()))

  # The same command again resumes and finishes.
  result = subprocess.run(command, capture_output=True, text=True, cwd=helpers.REPO,
                          env=environment, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint after epoch 2" in result.stderr
  assert "done: 1 epochs" in result.stdout
  resumed = metrics_writer.read_metrics(str(workdir))
  assert [m["epoch"] for m in resumed] == [0, 1, 2, 3]
  # Bitwise: JSON floats are exact reprs of the float64 values.
  assert _without_times(resumed) == _without_times(expected)


_SAVE_AND_DIE = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import jax.numpy as jnp
from tdpo_jax import checkpoint
from tests import test_checkpoint
manager = checkpoint.make_manager(sys.argv[1], async_save=True)
checkpoint.save(manager, test_checkpoint.dummy_state(1), test_checkpoint.dummy_config())
manager.wait_until_finished()
checkpoint.save(manager, test_checkpoint.dummy_state(2), test_checkpoint.dummy_config())
os.kill(os.getpid(), signal.SIGKILL)  # while the background thread writes step 2
"""


def dummy_config():
  return ml_collections.ConfigDict({"seed": 0, "num_epochs": 2})


def dummy_state(epoch, size=2**24):
  """A `TrainState` with a 64 MiB policy leaf (a save of it takes a while to write)."""
  values = np.random.default_rng(epoch).standard_normal(size, np.float32)
  params = {"w": jnp.asarray(values)}
  return train_step.TrainState(
      step=jnp.asarray(10 * epoch, jnp.int32), epoch=jnp.asarray(epoch, jnp.int32),
      policy_params=params, policy_opt_state={"mu": params["w"][:8] + 1},
      critic_params={"b": jnp.full((3,), epoch, jnp.float32)}, critic_opt_state={},
      normaliser=stats.init_normaliser(2, 4), reset_count=jnp.asarray(epoch, jnp.int32),
      rng=jax.random.fold_in(jax.random.key(0), epoch))


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
  result = subprocess.run([sys.executable, "-c", _SAVE_AND_DIE.format(repo=helpers.REPO),
                           str(tmp_path)], capture_output=True, text=True, cwd=helpers.REPO,
                          timeout=300)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  listing = sorted(os.listdir(tmp_path / "checkpoints"))
  assert "1" in listing and "2" not in listing, listing  # step 2 never finalized ...
  assert any(name.startswith("2.orbax-checkpoint-tmp") for name in listing), listing  # ... begun
  assert checkpoint.latest(str(tmp_path))[0] == 1
  manager = checkpoint.make_manager(str(tmp_path))  # also removes the partial step-2 directory
  restored, meta = checkpoint.restore(manager, 1, dummy_state(0))
  _assert_bitwise_equal(restored, dummy_state(1))
  assert meta["epoch"] == 1
  # The directory stays usable: step 2 can be saved again.
  checkpoint.save(manager, dummy_state(2), dummy_config())
  manager.wait_until_finished()
  assert manager.latest_step() == 2
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"], listing
