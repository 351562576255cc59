"""Fault injection (issue 17 item 8): corrupted checkpoints, failed saves and writes, restarts
without a checkpoint, finished workdirs, SIGTERM, and the command line's one-line errors.

- A truncated data file, garbage JSON metadata, or zeros written into a data file: the restore
  names the checkpoint and file in one line and falls back to the previous checkpoint (moving the
  bad one aside), or stops with one line when there is none; config.json is not rewritten.
- A failed async checkpoint save stops the run with a one-line `CheckpointError`.
- A TensorBoard write failure (ENOSPC) raises at once instead of blocking forever.
- A restart without a committed checkpoint clears what the lost run logged.
- A finished workdir is reported as finished; nothing is loaded.
- The first SIGTERM asks for a stop; a second one ends the process whatever it is doing.
- `main`: bad inputs are one `error: ...` line, exit status 1, before the heavy imports.
"""
import glob
import json
import logging as python_logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import orbax.checkpoint as ocp
import pytest

from tdpo_jax import checkpoint
from tdpo_jax import config_checks
from tdpo_jax import metrics_writer
from tdpo_jax import train
from tests import helpers
from tests import test_checkpoint

# 4 DDIM steps (4 optimizer steps per epoch), no image grids, no evaluation: the cheapest run.
FAST = {"sample.num_steps": 4, "log.image_grid_every": 0, "eval.every": 0}
SIZE = 2**14  # the dummy state's random policy leaf (incompressible, as trained weights are)


def _save_dummy_steps(workdir, epochs, max_to_keep=0):
  manager = checkpoint.make_manager(str(workdir), max_to_keep=max_to_keep, async_save=False)
  for epoch in epochs:
    checkpoint.save(manager, test_checkpoint.dummy_state(epoch, SIZE),
                    test_checkpoint.dummy_config())
  manager.wait_until_finished()
  manager.close()


def _largest_data_file(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                    recursive=True)
  return max(files, key=os.path.getsize)


def _truncate(workdir, step):
  path = _largest_data_file(workdir, step)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _zeros(workdir, step):
  path = _largest_data_file(workdir, step)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 4)
    f.write(b"\0" * (size // 2))
  return path


def _garbage_meta(workdir, step):
  path = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
  with open(path, "w") as f:
    f.write("\x00garbage{")
  return path


def _stale_data(workdir, step):
  """Step `step - 1`'s array data in step `step`'s place: every file decodes, the values are
  wrong (what a silent corruption looks like to the reader); only the saved checksums tell."""
  state_dir = os.path.join(workdir, "checkpoints", str(step), "state")
  previous = os.path.join(workdir, "checkpoints", str(step - 1), "state")
  shutil.rmtree(state_dir)
  shutil.copytree(previous, state_dir)
  return state_dir


CORRUPTIONS = {"truncated": _truncate, "zeros": _zeros, "garbage_meta": _garbage_meta,
               "stale_data": _stale_data}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_restored(tmp_path, kind, caplog):
  _save_dummy_steps(tmp_path, (1, 2))
  CORRUPTIONS[kind](str(tmp_path), 2)
  manager = checkpoint.make_manager(str(tmp_path))
  with pytest.raises(checkpoint.CheckpointError) as raised:
    checkpoint.restore(manager, 2, test_checkpoint.dummy_state(0, SIZE))
  message = str(raised.value)
  assert "\n" not in message and len(message) < 700, message
  step_dir = os.path.join(str(tmp_path), "checkpoints", "2")
  assert message.startswith("checkpoint 2 is "), message
  assert step_dir in message, message
  if kind == "garbage_meta":
    assert f"file {step_dir}/meta/metadata" in message, message
  elif kind == "stale_data":
    assert f"is corrupt (directory {step_dir}/state): the checksum of" in message, message
    assert "7 of 10 arrays" in message and ".epoch" in message, message
  else:  # tensorstore names the array and the state directory
    assert 'Error reading "policy_params.w/0"' in message, message
  # The run's restore: a warning naming it, then the previous checkpoint, bitwise.
  with caplog.at_level(python_logging.WARNING):
    state, epoch = train.restore_or_keep(manager, test_checkpoint.dummy_state(0, SIZE))
  assert epoch == 1
  test_checkpoint._assert_bitwise_equal(state, test_checkpoint.dummy_state(1, SIZE))  # pylint: disable=protected-access
  assert any("checkpoint 2 is" in r.getMessage() and "falling back to the previous checkpoint"
             in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Moved aside, so step 2 can be saved again; the manager only sees step 1.
  assert manager.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2.corrupt"]
  checkpoint.save(manager, test_checkpoint.dummy_state(2, SIZE), test_checkpoint.dummy_config())
  manager.wait_until_finished()
  restored, _ = checkpoint.restore(manager, 2, test_checkpoint.dummy_state(0, SIZE))
  test_checkpoint._assert_bitwise_equal(restored, test_checkpoint.dummy_state(2, SIZE))  # pylint: disable=protected-access
  manager.close()


def test_latest_skips_a_checkpoint_whose_meta_is_garbage(tmp_path):
  _save_dummy_steps(tmp_path, (1, 2))
  _garbage_meta(str(tmp_path), 2)
  step, meta = checkpoint.latest(str(tmp_path))
  assert step == 1 and meta["epoch"] == 1


def test_only_checkpoint_unreadable_is_one_line_error_and_config_json_kept(cache_dir, tmp_path):
  config = helpers.tiny_config(cache_dir, num_epochs=2, **FAST)
  # A run's checkpoint 1 (the dummy state has another layout: the restore itself must fail).
  _save_dummy_steps(tmp_path, (1,))
  manager = checkpoint.make_manager(str(tmp_path))
  meta_path = os.path.join(str(tmp_path), "checkpoints", "1", "meta", "metadata")
  with open(meta_path) as f:
    meta = json.load(f)
  manager.close()
  meta["config"] = checkpoint.config_to_dict(config)
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  _truncate(str(tmp_path), 1)
  (tmp_path / "config.json").write_text("the previous run's")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"^checkpoint 1 is unreadable .*no earlier checkpoint to fall back to: "
                           r"move .*checkpoints away to start from scratch$"):
    train.run(config, str(tmp_path), trainer=helpers.shared_trainer(config))
  assert (tmp_path / "config.json").read_text() == "the previous run's"
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # nothing deleted


class _FailingFuture:
  """A background write that fails as a full disk does."""

  def result(self, timeout=None):
    del timeout
    raise OSError(28, "No space left on device")

  def cancel(self):
    pass


def test_failed_async_save_stops_the_run_and_restart_clears_its_logs(cache_dir, tmp_path,
                                                                     monkeypatch):
  original = ocp.StandardCheckpointHandler.async_save

  async def failing_async_save(self, *args, **kwargs):
    futures = await original(self, *args, **kwargs)
    return [*(futures or []), _FailingFuture()]

  calls = []
  validate = config_checks.validate_config
  monkeypatch.setattr(config_checks, "validate_config",
                      lambda config: (calls.append(1), validate(config))[1])
  config = helpers.tiny_config(cache_dir, num_epochs=3, **FAST)
  trainer = helpers.shared_trainer(config)
  with monkeypatch.context() as patch:
    patch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_async_save)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"^saving a checkpoint in .*checkpoints failed: \[Errno 28\] No space "
                             r"left on device$"):
      train.run(config, str(tmp_path), trainer=trainer)
  assert len(calls) == 1  # one validation per run: not again in the Trainer or the Evaluator
  # Stopped at the next save (after epoch 1), not after all 3 epochs; nothing committed.
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0, 1]
  assert checkpoint.latest(str(tmp_path)) == (None, None)
  lost_events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert lost_events
  # Stale outputs of an earlier lost run, too.
  (tmp_path / "images" / "epoch_0005.png").write_bytes(b"old")
  os.makedirs(tmp_path / "eval", exist_ok=True)
  (tmp_path / "eval" / "epoch_0004.csv").write_text("old")
  # The restart finds no committed checkpoint: it starts from scratch and logs epochs once.
  config.num_epochs = 1
  config.checkpoint.every_epochs = 0
  history = train.run(config, str(tmp_path), trainer=trainer)
  assert history.resumed_from is None and len(history) == 1
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0]
  events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert events and not set(events) & set(lost_events)
  assert not (tmp_path / "images" / "epoch_0005.png").exists()
  assert not (tmp_path / "eval" / "epoch_0004.csv").exists()
  assert checkpoint.latest(str(tmp_path))[0] == 1  # the final save (every_epochs=0)
  # Rerunning the finished workdir loads nothing and says so.
  def no_trainer(config):
    raise AssertionError("a finished workdir built a Trainer")

  monkeypatch.setattr(train, "Trainer", no_trainer)
  again = train.run(config, str(tmp_path))
  assert again.already_finished and again.resumed_from == 1 and again == []
  assert [m["epoch"] for m in metrics_writer.read_metrics(str(tmp_path))] == [0]


def test_tensorboard_write_failure_raises_instead_of_blocking(tmp_path, monkeypatch):
  writer = metrics_writer.MetricWriter(str(tmp_path))
  writer.write(0, {"reward/mean": 1.0})
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

  def full_disk(self, data):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(record_writer.RecordWriter, "write", full_disk)
  outcome = []

  def write_many():
    try:
      for epoch in range(1, 40):  # more events than tensorboardX's queue (10) holds
        writer.write(epoch, {f"m{i}": float(i) for i in range(20)})
      outcome.append("no error")
    except OSError as error:
      outcome.append(error)

  thread = threading.Thread(target=write_many, daemon=True)
  thread.start()
  thread.join(timeout=60)
  assert not thread.is_alive(), "the metrics write blocked"
  assert isinstance(outcome[0], OSError) and outcome[0].errno == 28, outcome
  monkeypatch.undo()
  writer.close()


def test_max_to_keep_enforced_on_restart(tmp_path):
  # A run killed between orbax's final rename and its clean-up keeps one step too many.
  _save_dummy_steps(tmp_path, (1, 2, 3, 4))
  manager = checkpoint.make_manager(str(tmp_path), max_to_keep=2)
  checkpoint.enforce_max_to_keep(manager, 2)
  assert manager.all_steps() == [3, 4]
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]


_SIGTERM_TWICE = """
import sys, time
sys.path.insert(0, {repo!r})
from tdpo_jax import train
stop, restore = train.install_stop_handler()
print("ready", flush=True)
while not stop.is_set():
  time.sleep(0.05)
print("stop requested", flush=True)
while True:  # a run stuck in a blocking call
  time.sleep(0.05)
"""


def test_second_sigterm_ends_the_process(tmp_path):
  process = subprocess.Popen([sys.executable, "-c", _SIGTERM_TWICE.format(repo=helpers.REPO)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=helpers.REPO)
  assert process.stdout.readline().strip() == "ready"
  process.send_signal(signal.SIGTERM)
  assert process.stdout.readline().strip() == "stop requested"
  time.sleep(0.5)
  assert process.poll() is None  # the first one only asks for a stop
  process.send_signal(signal.SIGTERM)
  process.wait(timeout=30)
  assert process.returncode == -signal.SIGTERM


def _main(workdir, *flags, config="configs/tiny.py", fake_modules=None):
  """`python -m tdpo_jax.main` with `fake_modules` (a folder) first on the import path."""
  environment = dict(os.environ)
  if fake_modules:
    environment["PYTHONPATH"] = os.pathsep.join([str(fake_modules), helpers.REPO])
  return subprocess.run(
      [sys.executable, "-m", "tdpo_jax.main", f"--config={config}", f"--workdir={workdir}",
       *flags], capture_output=True, text=True, cwd=helpers.REPO, timeout=120, env=environment)


def test_main_bad_inputs_are_one_line_errors_before_heavy_imports(tmp_path):
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  (tmp_path / "afile").write_text("x")
  cases = [
      ((tmp_path / "w",), {"config": str(tmp_path / "missing.py")},
       "error: cannot load the config file: [Errno 2] No such file or directory"),
      ((tmp_path / "w",), {"config": str(tmp_path / "bad.py")},
       f"error: syntax error in the config file {tmp_path / 'bad.py'}, line 1"),
      ((tmp_path / "w", "--config.foo.bar=1"), {},
       "error: unknown config key in --config.foo.bar: the config has no entry 'foo'"),
      ((tmp_path / "afile",), {}, "error: workdir"),
      ((tmp_path / "w", "--config.sample.batch_size=0"), {},
       "error: sample.batch_size=0 must be >= 1"),
      ((tmp_path / "w", "--config.num_epochs=0"), {}, "error: num_epochs=0 must be >= 1"),
      ((tmp_path / "w", "--config.train.learning_rate=nan"), {},
       "error: train.learning_rate=nan must be finite"),
  ]
  # Before jax and the models are imported: here importing jax (or flax) fails loudly.
  fake = tmp_path / "fake_modules"
  for name in ("jax", "flax"):
    os.makedirs(fake / name)
    (fake / name / "__init__.py").write_text(f"raise ImportError('{name} was imported')\n")
  for (workdir, *flags), kwargs, expected in cases:
    result = _main(workdir, *flags, fake_modules=fake, **kwargs)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (expected, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(expected), (expected, result.stderr[-2000:])
  # ... and the fake is in effect: a valid command gets as far as importing jax.
  result = _main(tmp_path / "w", fake_modules=fake)
  assert result.returncode != 0 and "was imported" in result.stderr, result.stderr[-2000:]
  shutil.rmtree(fake)
  assert sorted(os.listdir(tmp_path)) == ["afile", "bad.py"]  # nothing written
