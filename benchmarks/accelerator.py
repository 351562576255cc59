"""The SD 1.5-shaped epoch on a GPU or TPU: seconds and MFU per phase, peak device memory, and the
memory analysis of the full-size train step, in one command (meant to fit in 8 minutes; not yet
run on an accelerator).

  python benchmarks/accelerator.py [--modes=lora,full] [--samples=16] [--steps=50] \\
      [--micro_batches=1,2] [--workdir=/tmp/tdpo_accelerator] [--dry_run]

Random weights of the SD 1.5 architectures (`configs/sd15.py:random`: UNet, VAE, CLIP-L text
encoder, the critic's CLIP-L/14 tower; built once into `--workdir`: 1.37 B parameters in two
weight formats, ~11 GB), 512 x 512, the JPEG reward. Per mode (LoRA rank 4, full
fine-tuning), one subprocess of `benchmarks/epoch.py --json` times a reduced TDPO-R epoch of
`--samples` samples x `--steps` DDIM steps (two sample batches; micro-batch 1 per device; the
critic embeds in chunks of 16 per device) after one warm-up epoch, with XLA's FLOP counts, the
chip's bf16 data-sheet peak (MFU) and the device's peak memory. Then `benchmarks/memory.py`
compiles the full-size train step (one optimizer step of one micro-batch per device) for each of
`--micro_batches` per device and prints XLA's `memory_analysis()`. The subprocesses each own the
accelerator in turn (no JAX in this process).

On a CPU it refuses to run (the shapes would take hours) unless `--allow_cpu`; `--dry_run`
prints the commands only.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_MODES = flags.DEFINE_list("modes", ["lora", "full"], "Fine-tuning modes: lora, full.")
_SAMPLES = flags.DEFINE_integer("samples", 16, "Samples per epoch (two sample batches).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_MICRO = flags.DEFINE_list("micro_batches", ["1", "2"],
                           "Train micro-batches per device for the memory analysis.")
_CONFIG = flags.DEFINE_string("config", "tdpo_jax/configs/sd15.py:random",
                              "Config (and preset) of the model; a random-weight one runs offline.")
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "tdpo_accelerator"),
                               "Where the random model is built and the logs go.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 600, "Limit per subprocess, seconds.")
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False, "Run even when JAX sees only a CPU.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands and exit.")

# Commands run from the repo root (paths in them are relative to it).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = [("sampling (text + denoise + final decode)", "sample"),
          ("critic decode + embed + value", "critic_sub"),
          ("train (+ reset)", "train"),
          ("epoch (async)", "epoch")]
_MEMORY_LINE = re.compile(r"^train step: compiled in ([\d.]+) s; per device: (.*) GiB; total "
                          r"([\d.]+) GiB")


def _fail(message):
  sys.exit(f"error: {message}")


def probe_devices():
  """(platform, device kind, device count) as a JAX subprocess sees them."""
  done = subprocess.run(
      [sys.executable, "-c", "import jax; d = jax.devices(); "
       "print(d[0].platform, len(d), d[0].device_kind, sep='\\t')"],
      capture_output=True, text=True, check=False, timeout=300)
  if done.returncode != 0:
    _fail(f"JAX could not list its devices: {done.stderr.strip().splitlines()[-1:]}")
  platform, count, kind = done.stdout.strip().splitlines()[-1].split("\t")
  return platform, kind, int(count)


def epoch_command(config, mode, samples, steps, devices, workdir):
  """benchmarks/epoch.py for one mode: two sample batches, micro-batch 1 per device."""
  if samples % (2 * devices):
    _fail(f"--samples={samples}: expected a multiple of 2 x {devices} devices (two sample "
          "batches that split over the devices)")
  micro = devices
  return [sys.executable, "benchmarks/epoch.py", f"--config={config}",
          "--algorithm=tdpo_r", "--epochs=1", "--json",
          f"--config.pretrained.cache_dir={workdir}",
          f"--config.lora.enabled={mode == 'lora'}",
          f"--config.sample.num_steps={steps}",
          f"--config.sample.batch_size={samples // 2}",
          "--config.sample.num_batches_per_epoch=2",
          f"--config.train.batch_size={micro}",
          f"--config.train.gradient_accumulation_steps={samples // micro}",
          f"--config.critic.embed_chunk_size={16 * devices}",
          "--config.reset.period=1"]  # the warm-up epoch is also the first reset epoch


def memory_command(config, mode, micro, devices):
  """benchmarks/memory.py: the full-size train step, `micro` transitions per device."""
  command = [sys.executable, "benchmarks/memory.py", f"--config={config}",
             f"--mesh=data={devices},fsdp=1", f"--micro_batch_per_device={micro}",
             "--skip_rollout"]
  return command + (["--full"] if mode == "full" else [])


def _run(command, log_path):
  print("+ " + " ".join(command[1:]), flush=True)
  tic = time.perf_counter()
  with open(log_path, "w") as log:
    try:
      done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, check=False,
                            timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
      _fail(f"{os.path.basename(command[1])} ran past --timeout_s={_TIMEOUT.value} (log: "
            f"{log_path})")
  with open(log_path) as log:
    text = log.read()
  if done.returncode != 0:
    _fail(f"{os.path.basename(command[1])} exited {done.returncode} (log: {log_path}): "
          f"{text.strip().splitlines()[-1] if text.strip() else ''}")
  print(f"  done in {time.perf_counter() - tic:.0f} s", flush=True)
  return text


def epoch_rows(mode, result, peak):
  """Table rows (mode, phase, seconds, TFLOP, MFU) of one epoch.py result."""
  rows = []
  for label, key in PHASES:
    seconds_key = "critic" if key == "critic_sub" else key
    seconds = result["seconds"].get(seconds_key)
    if seconds is None:
      continue
    flops = result["flops"].get(key, float("nan"))
    rows.append((mode, label, seconds, flops / 1e12, flops / seconds / peak if seconds else 0))
  return rows


def parse_memory(text):
  """(compile seconds, per-device parts, total GiB) of memory.py's train-step line."""
  for line in text.splitlines():
    match = _MEMORY_LINE.match(line)
    if match:
      return float(match.group(1)), match.group(2), float(match.group(3))
  _fail("memory.py printed no train-step memory line")


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags are --name=value")
  unknown = sorted(set(_MODES.value) - {"lora", "full"})
  if unknown or not _MODES.value:
    _fail(f"--modes={','.join(_MODES.value)}: expected a list of lora, full")
  if not all(m.isdigit() and int(m) > 0 for m in _MICRO.value):
    _fail(f"--micro_batches={','.join(_MICRO.value)}: expected positive integers")
  if _STEPS.value < 1:
    _fail(f"--steps={_STEPS.value}: expected >= 1")
  if _DRY_RUN.value:
    platform, kind, devices = "unknown", "unknown", 1
  else:
    platform, kind, devices = probe_devices()
    if platform == "cpu" and not _ALLOW_CPU.value:
      _fail("JAX sees only a CPU; this benchmark is for a GPU or TPU (--allow_cpu to run it "
            "anyway)")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  epochs = {mode: epoch_command(_CONFIG.value, mode, _SAMPLES.value, _STEPS.value, devices,
                                _WORKDIR.value) for mode in _MODES.value}
  memories = {(mode, int(micro)): memory_command(_CONFIG.value, mode, int(micro), devices)
              for mode in _MODES.value for micro in _MICRO.value}
  if _DRY_RUN.value:
    for command in list(epochs.values()) + list(memories.values()):
      print(" ".join(command[1:]))
    return
  print(f"{devices} x {kind} ({platform})", flush=True)
  tic = time.perf_counter()
  rows, memory_stats, compile_s = [], {}, {}
  peak, peak_note = float("nan"), ""
  for mode, command in epochs.items():
    text = _run(command, os.path.join(_WORKDIR.value, f"epoch_{mode}.log"))
    report = json.loads(text[text.index("{\n"):])
    peak, peak_note = report["peak_flops"] * devices, report["peak_note"]
    result = report["results"][0]
    rows += epoch_rows(mode, result, peak)
    memory_stats[mode] = (report.get("device_memory") or {}).get("peak_bytes_in_use")
    compile_s[mode] = sum(result["compile_s"].values())
  analysis = {key: parse_memory(_run(command, os.path.join(
      _WORKDIR.value, f"memory_{key[0]}_micro{key[1]}.log"))) for key, command in memories.items()}

  print(f"\n{devices} x {kind}; reduced TDPO-R epoch of {_CONFIG.value}: {_SAMPLES.value} "
        f"samples x {_STEPS.value} steps; peak {peak / 1e12:.3g} TFLOP/s ({peak_note}, x "
        f"{devices} devices)")
  print(f"{'mode':5s} {'phase':42s} {'s':>8s} {'TFLOP':>8s} {'MFU':>6s}")
  for mode, label, seconds, tflop, mfu in rows:
    print(f"{mode:5s} {label:42s} {seconds:8.2f} {tflop:8.2f} {mfu:6.1%}")
  for mode in epochs:
    peak_bytes = memory_stats[mode]
    print(f"{mode}: AOT compile {compile_s[mode]:.0f} s; peak device memory "
          + (f"{peak_bytes / 2**30:.1f} GiB" if peak_bytes else "not reported"))
  print("\nfull-size train step, memory_analysis() per device (one optimizer step):")
  for (mode, micro), (seconds, parts, total) in analysis.items():
    print(f"{mode:5s} micro-batch {micro}/device: {total:.2f} GiB ({parts} GiB; compiled in "
          f"{seconds:.0f} s)")
  print(f"\nwall {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
  app.run(main)
