"""Scaling benchmark: steady-state epoch seconds of a config on 1, 2, 4, 8 devices, and
checkpoint save/restore seconds.

  python benchmarks/scaling.py --config=configs/tiny.py --devices=1,2,4,8 [--epochs=3]

Each device count runs in a fresh subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=n` (XLA reads it when JAX initialises), builds a
`train.Trainer` on a mesh of n devices (`config.num_devices=n`), runs one warm-up epoch
(compilation) and `--epochs` timed epochs, then times one orbax save and one restore of the
`TrainState` (`checkpoint.make_manager/save/restore`, each until `wait_until_finished`).
The batch sizes must split over every n: the defaults below (8 / 8) fit 1, 2, 4 and 8.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts to measure.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs after the warm-up epoch.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch_size", 8, "config.sample.batch_size.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch_size", 8, "config.train.batch_size.")
_ACCUM = flags.DEFINE_integer("gradient_accumulation_steps", 4,
                              "config.train.gradient_accumulation_steps.")
_CHILD = flags.DEFINE_integer("child", 0, "Internal: measure in this process on n devices.")
_TIMEOUT = flags.DEFINE_integer("timeout", 1800, "Seconds per device count before giving up.")
flags.mark_flags_as_required(["config"])

RESULT_PREFIX = "SCALING_RESULT "


def configure(config, num_devices):
  """The benchmark's overrides of `config` for a mesh over `num_devices` devices."""
  config.num_devices = num_devices
  config.sample.batch_size = _SAMPLE_BATCH.value
  config.train.batch_size = _TRAIN_BATCH.value
  config.train.gradient_accumulation_steps = _ACCUM.value
  config.log.progress = False
  return config


def measure(num_devices):
  """Runs in the child: returns a dict of the measurements on `num_devices` devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from tdpo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import config_checks  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train  # pylint: disable=g-import-not-at-top
  if jax.device_count() < num_devices:
    raise SystemExit(f"expected >= {num_devices} devices, got {jax.device_count()}")
  config = configure(_CONFIG.value, num_devices)
  config_checks.validate_config(config)  # the Trainer does not validate (train.run does)
  trainer = train.Trainer(config)
  frozen = trainer.frozen_params()
  state = trainer.init_state()
  tic = time.perf_counter()
  state, _, _, _, _ = trainer.run_epoch(state, frozen)  # warm-up: compiles every kernel
  jax.block_until_ready(state)
  warmup_s = time.perf_counter() - tic
  epoch_s = []
  for _ in range(_EPOCHS.value):
    tic = time.perf_counter()
    state, _, _, _, _ = trainer.run_epoch(state, frozen)
    jax.block_until_ready(state)
    epoch_s.append(time.perf_counter() - tic)
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint_lib.make_manager(workdir, async_save=config.checkpoint.async_save)
    tic = time.perf_counter()
    checkpoint_lib.save(manager, state, config)
    manager.wait_until_finished()
    save_s = time.perf_counter() - tic
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    tic = time.perf_counter()
    restored, _ = checkpoint_lib.restore(manager, manager.latest_step(), template)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - tic
    manager.close()
  return {"devices": num_devices, "mesh": dict(trainer.mesh.shape), "warmup_s": warmup_s,
          "epoch_s": statistics.median(epoch_s), "epoch_s_all": epoch_s, "save_s": save_s,
          "restore_s": restore_s}


def run_child(num_devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")]
      + [f"--xla_force_host_platform_device_count={num_devices}"])
  env.setdefault("JAX_PLATFORMS", "cpu")
  command = [sys.executable, os.path.abspath(__file__), f"--child={num_devices}"]
  command += [arg for arg in sys.argv[1:] if not arg.startswith("--devices")]
  result = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=_TIMEOUT.value, check=False)
  for line in result.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  raise RuntimeError(f"devices={num_devices}: child exited {result.returncode}\n"
                     f"{result.stderr[-4000:]}")


def main(argv):
  del argv
  if _CHILD.value:
    print(RESULT_PREFIX + json.dumps(measure(_CHILD.value)), flush=True)
    return
  config = configure(_CONFIG.value, -1)
  print(f"config: sample.batch_size={config.sample.batch_size} x "
        f"{config.sample.num_batches_per_epoch} batches, {config.sample.num_steps} steps, "
        f"{config.sample.height}x{config.sample.width}; train.batch_size="
        f"{config.train.batch_size}, gradient_accumulation_steps="
        f"{config.train.gradient_accumulation_steps}, timestep_fraction="
        f"{config.train.timestep_fraction}; algorithm={config.algorithm}, mesh={config.mesh}, "
        f"async_save={config.checkpoint.async_save}; {_EPOCHS.value} timed epochs after 1 "
        "warm-up", flush=True)
  rows = []
  for n in (int(d) for d in _DEVICES.value):
    row = run_child(n)
    print(f"  devices={n}: mesh {row['mesh']}, warm-up {row['warmup_s']:.2f} s, epochs "
          + ", ".join(f"{s:.2f}" for s in row["epoch_s_all"]), flush=True)
    rows.append(row)
  base = rows[0]["epoch_s"]
  print("\n| devices | epoch_s | speedup vs 1 | save_s | restore_s |")
  print("|---:|---:|---:|---:|---:|")
  for row in rows:
    print(f"| {row['devices']} | {row['epoch_s']:.3f} | {base / row['epoch_s']:.2f}x | "
          f"{row['save_s']:.3f} | {row['restore_s']:.3f} |")


if __name__ == "__main__":
  app.run(main)
