"""benchmarks/accelerator.py without an accelerator: its commands (every config override names a
key of the config it overrides, and the epoch's shapes are the requested ones) and its up-front
errors. The measurement itself needs a GPU or TPU."""
import subprocess
import sys

from tdpo_jax import cli
from tdpo_jax import config_checks
from tests import helpers


def _run(*args):
  return subprocess.run([sys.executable, "benchmarks/accelerator.py", *args], capture_output=True,
                        text=True, cwd=helpers.REPO, timeout=120)


def _overrides(command):
  return dict(arg[len("--config."):].split("=", 1) for arg in command.split()
              if arg.startswith("--config."))


def test_dry_run_commands_override_real_keys_with_the_requested_shapes(monkeypatch):
  monkeypatch.chdir(helpers.REPO)  # the commands' paths are relative to the repo root
  result = _run("--dry_run", "--samples=8", "--steps=5", "--micro_batches=1,2")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 2 + 4  # lora, full epochs; 2 modes x 2 micro-batch memory analyses
  epoch_lora, epoch_full = lines[:2]
  assert epoch_lora.startswith("benchmarks/epoch.py ") and "--algorithm=tdpo_r" in epoch_lora
  lora, full = _overrides(epoch_lora), _overrides(epoch_full)
  assert (lora["lora.enabled"], full["lora.enabled"]) == ("True", "False")
  assert {k: v for k, v in lora.items() if k != "lora.enabled"} == {
      k: v for k, v in full.items() if k != "lora.enabled"}
  # The command's config flags through the project's own parser (what epoch.py's flags do): an
  # override of a key the preset does not declare, or of the wrong type, fails here.
  values, _ = cli.parse([arg for arg in epoch_lora.split()[1:] if arg.startswith("--config")],
                        cli.define_config)
  config = values["config"].value
  config_checks.validate_config(config)
  assert config_checks.samples_per_epoch(config) == 8 and config.sample.num_steps == 5
  memory = lines[2:]
  assert [("--full" in line, "--micro_batch_per_device=2" in line) for line in memory] == [
      (False, False), (False, True), (True, False), (True, True)]
  assert all(line.startswith("benchmarks/memory.py --config=tdpo_jax/configs/sd15.py:random")
             for line in memory)


def test_bad_flags_are_one_line_errors():
  for args, message in [
      (["--modes=lora,qlora"], "error: --modes=lora,qlora: expected a list of lora, full"),
      (["--samples=9"], "error: --samples=9: expected a multiple of 2 x 1 devices (two sample "
                        "batches that split over the devices)"),
      (["--micro_batches=1,0"], "error: --micro_batches=1,0: expected positive integers")]:
    result = _run("--dry_run", *args)
    assert result.returncode == 1
    assert result.stderr.strip() == message


def test_refuses_a_cpu():
  result = _run("--modes=lora")
  assert result.returncode == 1
  assert result.stderr.strip() == ("error: JAX sees only a CPU; this benchmark is for a GPU or "
                                   "TPU (--allow_cpu to run it anyway)")
