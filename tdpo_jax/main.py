"""Entry point: `python -m tdpo_jax.main --config=configs/tiny.py --workdir=/tmp/run`.

Config values are overridable from the command line, e.g. `--config.sample.num_steps=20`
or `--config=configs/sd15.py:algorithm=ddpo`.

Exit status:
  0   the run trained to `num_epochs` (or the workdir's run had already finished: nothing to do);
  1   an error, reported as one line `error: ...` on stderr (a bad flag, config file, config value
      or workdir; an unreadable checkpoint; a failed checkpoint save or metrics write; a NaN/inf
      reward or loss);
  75  preempted (EX_TEMPFAIL): SIGTERM or a JAX preemption notice stopped the run after it saved a
      checkpoint; rerun the same command to resume (a scheduler may requeue on 75). A second
      SIGTERM ends the process at once (the last complete checkpoint stays the latest).
The config is checked (`config_checks.validate_config`) before JAX and the models are imported.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tdpo_jax import cli

EXIT_PREEMPTED = 75  # os.EX_TEMPFAIL: "try again later"

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


def parse_flags(argv):
  """absl's flag parsing, with every error a one-line `error: ...` (exit status 1)."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except  (anything here is bad user input)
    raise SystemExit(f"error: {cli.error_line(error, argv)}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from tdpo_jax import config_checks  # pylint: disable=g-import-not-at-top  (no jax)
  try:  # ml_collections defers some loading errors (a missing file) to the first access
    config, workdir = _CONFIG.value, _WORKDIR.value
    config.keys()  # raises the deferred error, if any
  except Exception as error:  # pylint: disable=broad-except  (bad user input)
    raise SystemExit(f"error: {cli.error_line(error, sys.argv)}") from None
  if _DISTRIBUTED.value:  # before anything touches a JAX backend (a reward module might)
    initialize_distributed()
  try:  # the one check of the config, before the 13-53 s of heavy imports
    config_checks.check_workdir(workdir)
    config_checks.validate_config(config)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  # Imported here so `--help` is fast and XLA flags from the environment apply first.
  import jax  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train  # pylint: disable=g-import-not-at-top
  if _COMPILATION_CACHE_DIR.value and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(_COMPILATION_CACHE_DIR.value))
  logging.set_verbosity(logging.INFO)
  try:
    history = train.run(config, workdir, validated=True)
  except (ValueError, OSError, train.NonFiniteError) as error:
    # Bad input, an unreadable checkpoint, a failed save or write (disk full, read-only), or a
    # diverged run: one clear line, not a traceback from deep inside JAX.
    raise SystemExit(f"error: {cli.one_line(error)}") from None
  if history.preempted:
    print(f"preempted: stopped after epoch {int(history[-1]['epoch'])} and saved a checkpoint in "
          f"{workdir}/checkpoints; rerun the same command to resume (exit status "
          f"{EXIT_PREEMPTED})")
    sys.exit(EXIT_PREEMPTED)
  if history.already_finished:
    print(f"already finished: {history.resumed_from} of {config.num_epochs} epochs in {workdir}; "
          "nothing to do (raise --config.num_epochs to train further)")
    return
  last = history[-1] if history else {}
  print(f"done: {len(history)} epochs, final reward/mean={last.get('reward/mean', float('nan')):.4f}; "
        f"metrics in {workdir}/metrics.jsonl, images in {workdir}/images/")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
