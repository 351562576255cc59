"""Entry point: `python -m tdpo_jax.main --config=configs/tiny.py --workdir=/tmp/run`.

Config values are overridable from the command line, e.g. `--config.sample.num_steps=20`
or `--config=configs/sd15.py:algorithm=ddpo`.
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, images and checkpoints.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/tdpo_jax/jax_cache",
    "JAX persistent compilation cache (reruns and resumes skip most compilation); '' disables "
    "it. $JAX_COMPILATION_CACHE_DIR, when set, takes precedence.")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-host: call jax.distributed.initialize() first. Without the three flags below it reads "
    "the environment (Cloud TPU pods, SLURM).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (GPU clusters).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0 .. num_processes-1.")


def initialize_distributed():
  """`jax.distributed.initialize` from --coordinator_address/--num_processes/--process_id, or
  from the environment where they are unset (TPU pods need no arguments)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=_COORDINATOR_ADDRESS.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d of %d: %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:  # before anything touches a JAX backend
    initialize_distributed()
  # Imported here so `--help` is fast and XLA flags from the environment apply first.
  import jax  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train  # pylint: disable=g-import-not-at-top
  if _COMPILATION_CACHE_DIR.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(_COMPILATION_CACHE_DIR.value))
  logging.set_verbosity(logging.INFO)
  try:
    history = train.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteError) as error:
    # Bad input or a diverged run: one clear line, not a traceback from deep inside JAX.
    raise SystemExit(f"error: {error}") from None
  if getattr(history, "preempted", False):
    print(f"preempted: stopped after epoch {int(history[-1]['epoch'])} and saved a checkpoint in "
          f"{_WORKDIR.value}/checkpoints; rerun the same command to resume")
    return
  last = history[-1] if history else {}
  print(f"done: {len(history)} epochs, final reward/mean={last.get('reward/mean', float('nan')):.4f}; "
        f"metrics in {_WORKDIR.value}/metrics.jsonl, images in {_WORKDIR.value}/images/")


if __name__ == "__main__":
  app.run(main)
