"""Rollout benchmark: compile seconds and steady-state seconds per image for a config.

  python benchmarks/rollout.py --config=configs/tiny.py [--repeats=5]

Prints one comparable figure per line; compilation (AOT `lower().compile()`) is timed
separately from execution, and execution is the median over `--repeats` calls after a warm-up.
"""
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls after the warm-up.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from tdpo_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import rollout  # pylint: disable=g-import-not-at-top
  from tdpo_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  pipeline = pipeline_lib.load_pipeline(
      config.pretrained.model, cache_dir=config.pretrained.cache_dir,
      image_encoder=config.pretrained.image_encoder, tiny_spec=config.pretrained.tiny)
  params = rollout.RolloutParams(unet=pipeline.unet_params,
                                 text_encoder=pipeline.text_encoder_params,
                                 vae=pipeline.vae_params)
  pool = prompts_lib.load_prompts(config.prompts)
  batch = config.sample.batch_size
  input_ids, uncond_ids = rollout.tokenize_prompts(
      pipeline, [pool[i % len(pool)] for i in range(batch)])
  rollout_fn = jax.jit(rollout.make_rollout_fn(pipeline, config.sample))

  tic = time.perf_counter()
  compiled = rollout_fn.lower(params, input_ids, uncond_ids, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - tic
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")

  jax.block_until_ready(compiled(params, input_ids, uncond_ids, jax.random.key(1)))  # warm-up
  seconds = []
  for repeat in range(_REPEATS.value):
    tic = time.perf_counter()
    jax.block_until_ready(compiled(params, input_ids, uncond_ids, jax.random.key(2 + repeat)))
    seconds.append(time.perf_counter() - tic)
  median = statistics.median(seconds)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
  print(f"config: {config.sample.num_steps} steps, batch {batch}, "
        f"{config.sample.height}x{config.sample.width}, guidance {config.sample.guidance_scale}")
  print(f"compile_s: {compile_s:.2f}")
  print(f"rollout_s (median of {len(seconds)}): {median:.4f}")
  print(f"seconds_per_image: {median / batch:.5f}")
  print(f"xla_flops_per_call: {flops:.4g}  achieved_flops_per_s: {flops / median:.4g}")


if __name__ == "__main__":
  app.run(main)
