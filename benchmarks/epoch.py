"""Epoch benchmark: seconds, compile seconds, FLOPs, MFU and peak memory per phase.

  python benchmarks/epoch.py --config=configs/tiny.py [--algorithm=both] [--epochs=3] [--json]

Per algorithm: AOT `lower().compile()` of every kernel of an epoch (timed apart from execution,
into a fresh persistent compilation cache so that the warm-up epoch then loads them), one
warm-up epoch (plus one more where it is the first reset epoch), then `--epochs` epochs with each
phase waited for (per-phase seconds) and `--epochs` fully asynchronous epochs (the epoch total a
run sees). Medians are reported.

Phases inside one kernel are timed by separately compiled sub-kernels, here only: the rollout's
text encoding and final VAE decode (denoising = rollout - both), and the critic's decode + embed
+ value of all N T states inside the prepare kernel.

FLOPs are XLA's cost analysis. XLA counts a while loop's body once, whatever its trip count, so
a looped kernel's FLOPs are taken from a loop-free sub-kernel times the trip count: one guided
UNet call x T for denoising, one optimizer step on the k M transitions evaluated as one batch x S
for training. MFU = FLOPs / seconds / peak: the bf16 dense peak of the accelerator from
`PEAK_FLOPS`, or on a CPU a float32 matmul peak measured in the same run.

The official PyTorch figures (`OFFICIAL`) are the CPU baseline of
../shared/reference/official_tiny_timings.md (2 cores, tiny shapes, fp32): compare them only with
a tiny-config run on such a machine (the table shows them only for a config of tiny's shapes,
`TINY_SHAPE_KEYS`).
"""
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_ALGORITHM = flags.DEFINE_enum("algorithm", "both", ["tdpo_r", "tdpo", "ddpo", "both"],
                               "Algorithm to time; both = tdpo_r and ddpo.")
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Timed epochs (each mode) after the warm-up.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
flags.mark_flags_as_required(["config"])
# This checkout's package first, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense bf16 peak FLOP/s per chip (vendor data sheets; GPUs without sparsity, SXM parts).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}

# Official PyTorch TDPO-R code, tiny shapes, 2-core CPU, seconds per epoch (median of epochs 1-2
# over 3 runs, +-5-10 %): ../shared/reference/official_tiny_timings.md.
OFFICIAL = {
    "tdpo_r": {"epoch": 3.78, "sampling": 0.66, "critic": 0.57, "reward": 0.003, "train": 2.51,
               "peak_rss_mib": 510},
    "ddpo": {"epoch": 3.13, "sampling": 0.66, "critic": 0.0, "reward": 0.003, "train": 2.45,
             "peak_rss_mib": 510},
}


def device_peak_flops(jax, jnp):
  """(peak FLOP/s, how it was obtained) for the first device."""
  device = jax.devices()[0]
  for name, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return peak, f"bf16 data-sheet peak of {name}"
  if device.platform != "cpu":
    return float("nan"), f"unknown device kind {device.device_kind!r}"
  size = 1024
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x).lower(a).compile()
  matmul(a).block_until_ready()
  best = min(_timed(lambda: matmul(a).block_until_ready())[1] for _ in range(10))
  return 2 * size**3 / best, f"measured fp32 {size}^3 matmul on {jax.local_device_count()} " \
      f"CPU device(s), {os.cpu_count()} cores"


def _timed(fn):
  tic = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - tic


def _flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _median_time(fn, repeats):
  fn()  # warm
  return statistics.median(_timed(fn)[1] for _ in range(repeats))


def bench_algorithm(config, algorithm, epochs):
  """Runs one algorithm's benchmark; returns a dict of results."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tdpo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import epoch as epoch_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import config_checks  # pylint: disable=g-import-not-at-top
  from tdpo_jax import policy  # pylint: disable=g-import-not-at-top
  from tdpo_jax import rollout  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train  # pylint: disable=g-import-not-at-top
  from tdpo_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.algorithm = algorithm
  config.log.progress = False
  config_checks.validate_config(config)  # the Trainer does not validate (train.run does)
  trainer = train.Trainer(config)
  pipeline, models = trainer.pipeline, trainer.models
  frozen, state = trainer.frozen_params(), trainer.init_state()
  result = {"algorithm": algorithm, "compile_s": {}, "flops": {}, "seconds": {}}

  # AOT compile of the epoch's kernels.
  for name, lowered in trainer.lower_kernels(state, frozen).items():
    compiled, seconds = _timed(lowered.compile)
    result["compile_s"][name] = seconds
    if name in ("prepare", "dormant", "reset"):  # loop-free kernels (tiny: embed_chunk_size 0)
      result["flops"][name] = _flops(compiled)

  # Sub-kernels, this benchmark only: timing and FLOPs of phases inside one kernel.
  batch = config.sample.batch_size
  ids = jnp.zeros((batch, trainer.input_uncond.shape[1]), jnp.int32)
  sub = {}
  sub["text"] = (jax.jit(lambda p, i, u: (pipeline_lib.encode_text(pipeline, p, i),
                                          pipeline_lib.encode_text(pipeline, p, u))),
                 (frozen.text_encoder, ids, jnp.asarray(trainer.input_uncond)))
  channels, height, width = rollout.latent_shape(pipeline, config.sample)
  latents = jnp.zeros((batch, channels, height, width), jnp.float32)
  unet = jax.jit(lambda b, p: policy.unet_params(config.lora, b, p))(frozen.unet,
                                                                      state.policy_params)
  text_states = jnp.zeros((batch,) + frozen.uncond_embeds.shape[1:], jnp.float32)
  sub["unet_step"] = (jax.jit(lambda p, x, c, u: rollout.guided_eps(
      pipeline, p, x, 981, c, u, config.sample.guidance_scale)),
                      (unet, latents, text_states, frozen.uncond_embeds))
  sub["decode"] = (jax.jit(lambda p, x: pipeline_lib.decode_latents(pipeline, p, x)),
                   (frozen.vae, latents))
  n = config_checks.samples_per_epoch(config)
  num_steps = config.sample.num_steps
  if trainer.use_critic:
    all_latents = jnp.zeros((n, num_steps, channels, height, width), jnp.float32)
    chunk, branches = int(config.critic.embed_chunk_size), int(config.critic.embed_branches)
    sub["critic"] = (jax.jit(lambda f, c, x: models.critic.apply(
        {"params": c},
        epoch_lib.embed_states(models, f, x, chunk, branches).reshape(-1, models.embed_dim),
        deterministic=True)), (frozen, state.critic_params, all_latents))
  micro, accum = config.train.batch_size, config.train.gradient_accumulation_steps
  fused = jax.tree.map(
      lambda x: jnp.zeros((1, micro * accum) + x.shape[3:], x.dtype),
      kernels_lib.abstract_epoch_inputs(trainer.kernels, config, state, frozen,
                                        trainer.input_uncond)["train_epoch"][2])
  sub["train_step"] = (jax.jit(trainer.kernels.train_step_fn), (state, frozen, fused,
                                                        jax.random.key(0)))
  sub_compiled = {}
  for name, (fn, args) in sub.items():
    sub_compiled[name] = fn.lower(*args).compile()
    result["flops"][name] = _flops(sub_compiled[name])
  num_updates = n * config_checks.num_train_timesteps(config) // (micro * accum)
  result["flops"]["text_encoding"] = result["flops"]["text"] * (n // batch)
  result["flops"]["denoising"] = result["flops"]["unet_step"] * num_steps * (n // batch)
  result["flops"]["final_decode"] = result["flops"]["decode"] * (n // batch)
  result["flops"]["train"] = result["flops"]["train_step"] * num_updates
  repeats = max(epochs, 3)
  seconds = result["seconds"]
  seconds["text_encoding"] = _median_time(
      lambda: jax.block_until_ready(sub_compiled["text"](*sub["text"][1])), repeats) * (n // batch)
  seconds["final_decode"] = _median_time(
      lambda: jax.block_until_ready(sub_compiled["decode"](*sub["decode"][1])),
      repeats) * (n // batch)
  if trainer.use_critic:
    seconds["critic"] = _median_time(
        lambda: jax.block_until_ready(sub_compiled["critic"](*sub["critic"][1])), repeats)
    result["flops"]["critic_sub"] = result["flops"]["critic"]

  # Warm-up: the first epoch, and the first reset epoch where that comes later.
  warm_epochs = 1
  if trainer.use_reset:
    warm_epochs = max(warm_epochs, config.reset.period - int(state.epoch))
  tic = time.perf_counter()
  for _ in range(warm_epochs):
    state, *_ = trainer.run_epoch(state, frozen)
  jax.block_until_ready(state)
  result["warmup_s"] = time.perf_counter() - tic
  result["warmup_epochs"] = warm_epochs

  phases = []
  trainer.sync_phases = True
  for _ in range(epochs):
    state, metrics, *_ = trainer.run_epoch(state, frozen)
    phases.append({k[5:-2]: v for k, v in metrics.items() if k.startswith("time/")})
  trainer.sync_phases = False
  totals = []
  for _ in range(epochs):
    tic = time.perf_counter()
    state, metrics, *_ = trainer.run_epoch(state, frozen)
    jax.block_until_ready(state)
    totals.append(time.perf_counter() - tic)
  for key in phases[0]:
    seconds[key] = statistics.median(p[key] for p in phases)
  seconds["epoch_synced"] = statistics.median(sum(p.values()) for p in phases)
  seconds["epoch"] = statistics.median(totals)
  seconds["denoising"] = max(seconds["sample"] - seconds["text_encoding"]
                             - seconds["final_decode"], 0.0)
  seconds["train_and_reset"] = seconds["train"] + seconds["reset"]

  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint_lib.make_manager(workdir, max_to_keep=1, async_save=False)
    checkpoint_lib.save(manager, state, config)  # warm (orbax's first save sets things up)
    manager.wait_until_finished()
    state = state.replace(epoch=state.epoch + 1)
    tic = time.perf_counter()
    checkpoint_lib.save(manager, state, config)
    manager.wait_until_finished()
    seconds["checkpoint_save"] = time.perf_counter() - tic
    manager.close()
  result["flops"]["sample"] = (result["flops"]["text_encoding"] + result["flops"]["denoising"]
                               + result["flops"]["final_decode"])
  return result


# The keys that make a config "tiny-shaped": the official figures apply only to such a run.
TINY_SHAPE_KEYS = ("pretrained.tiny", "sample.batch_size", "sample.num_batches_per_epoch",
                   "sample.num_steps", "train.batch_size", "train.gradient_accumulation_steps")


def official_baseline(config):
  """`OFFICIAL` when `config` has configs/tiny.py's shapes (the baseline's), else {}."""
  from tdpo_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from tdpo_jax.configs import tiny  # pylint: disable=g-import-not-at-top
  ours = checkpoint.flatten(checkpoint.config_to_dict(config))
  reference = checkpoint.flatten(checkpoint.config_to_dict(tiny.get_config()))
  return OFFICIAL if all(ours.get(k) == reference.get(k) for k in TINY_SHAPE_KEYS) else {}


def format_table(results, peak, peak_note, device, memory, official_figures):
  """The human-readable table; `official_figures`: `OFFICIAL` or {} (no official columns)."""
  lines = [f"device: {device}; peak {peak:.3g} FLOP/s ({peak_note})", memory, ""]
  rows = [  # (label, seconds key, flops key, official key)
      ("text encoding", "text_encoding", "text_encoding", None),
      ("denoising", "denoising", "denoising", None),
      ("final decode", "final_decode", "final_decode", None),
      ("sampling (all three)", "sample", "sample", "sampling"),
      ("reward", "reward", None, "reward"),
      ("prepare (normalise..gather)", "prepare", "prepare", None),
      ("  of it: critic decode+embed+value", "critic", "critic_sub", "critic"),
      ("train", "train", "train", "train"),
      ("reset (dormant + reset)", "reset", None, None),
      ("metrics fetch", "fetch", None, None),
      ("epoch (phases waited for)", "epoch_synced", None, None),
      ("epoch (async, as run() sees)", "epoch", None, "epoch"),
      ("checkpoint save (not in epoch)", "checkpoint_save", None, None),
  ]
  for result in results:
    algorithm = result["algorithm"]
    official = official_figures.get(algorithm, {})
    lines.append(f"== {algorithm}: warm-up {result['warmup_s']:.1f} s "
                 f"({result['warmup_epochs']} epoch(s), with the jit's own compilation where the "
                 "AOT cache entry is not reused)")
    lines.append(f"{'phase':36s} {'ours s':>8s} {'official s':>10s} {'ratio':>6s} "
                 f"{'GFLOP':>9s} {'GFLOP/s':>8s} {'MFU':>6s}")
    for label, key, flops_key, official_key in rows:
      ours = result["seconds"].get(key)
      if ours is None:
        continue
      ref = official.get(official_key) if official_key else None
      flops = result["flops"].get(flops_key, float("nan")) if flops_key else float("nan")
      rate = flops / ours if ours > 0 else float("nan")
      ref_text = f"{ref:10.3f}" if ref is not None else f"{'':10s}"
      ratio = f"{ours / ref:6.2f}" if ref else f"{'':6s}"
      lines.append(f"{label:36s} {ours:8.3f} {ref_text} {ratio} {flops / 1e9:9.3f} "
                   f"{rate / 1e9:8.2f} {rate / peak:6.1%}")
    compile_total = sum(result["compile_s"].values())
    lines.append("compile s (AOT): " + ", ".join(
        f"{k} {v:.1f}" for k, v in result["compile_s"].items()) + f"; total {compile_total:.1f}")
    lines.append("")
  by_name = {r["algorithm"]: r["seconds"]["epoch"] for r in results}
  if "tdpo_r" in by_name and "ddpo" in by_name:
    overhead = (by_name["tdpo_r"] - by_name["ddpo"]) / by_name["tdpo_r"]
    line = f"critic overhead over DDPO: {overhead:.1%} of the TDPO-R epoch"
    if official_figures:
      reference = official_figures["tdpo_r"]["epoch"]
      line += f" (official {(reference - official_figures['ddpo']['epoch']) / reference:.1%})"
    lines.append(line)
  return "\n".join(lines)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # A fresh persistent cache: AOT compile times are cold, and the warm-up epoch loads them.
  cache = tempfile.mkdtemp(prefix="tdpo_jax_bench_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  algorithms = ["tdpo_r", "ddpo"] if _ALGORITHM.value == "both" else [_ALGORITHM.value]
  try:
    peak, peak_note = device_peak_flops(jax, jnp)
    results = [bench_algorithm(_CONFIG.value, a, _EPOCHS.value) for a in algorithms]
  finally:
    shutil.rmtree(cache, ignore_errors=True)  # a cold cache is of use to this run only
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.devices()[0].platform})"
  stats = jax.devices()[0].memory_stats()
  rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
  if stats and "peak_bytes_in_use" in stats:
    memory = (f"peak device memory {stats['peak_bytes_in_use'] / 2**20:.0f} MiB; "
              f"process peak RSS {rss_mib:.0f} MiB")
  else:
    memory = f"process peak RSS {rss_mib:.0f} MiB (whole benchmark process; official 510 MiB)"
  if _JSON.value:
    print(json.dumps({"device": device, "peak_flops": peak, "peak_note": peak_note,
                      "peak_rss_mib": rss_mib, "device_memory": stats or None,
                      "official": official_baseline(_CONFIG.value) or None,
                      "results": results}, indent=1, default=float))
  else:
    print(format_table(results, peak, peak_note, device, memory,
                       official_baseline(_CONFIG.value)))


if __name__ == "__main__":
  app.run(main)
