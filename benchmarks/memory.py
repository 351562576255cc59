"""Per-device memory of the SD 1.5 train step and rollout, compiled AOT on abstract shapes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python benchmarks/memory.py --config=configs/sd15.py --mesh=data=1,fsdp=8 [--full]

No weights are loaded: the modules are built from the SD 1.5 (UNet, VAE, CLIP-L text encoder)
and CLIP-L/14 (critic image encoder) architectures below, parameters are `jax.eval_shape`
structures sharded by `config.sharding.rules`, and the kernels are lowered and compiled for the
mesh (on CPU, fake devices). Prints `compiled.memory_analysis()` per device: arguments, outputs,
temporaries, generated code, and whether their sum fits in `--budget_gib`.

`--config=configs/tiny.py` uses the tiny architecture of the config instead (fast; for tests).
The train step is compiled for ONE optimizer step (k micro-batches of `train.batch_size`), the
rollout for one batch of `--rollout_batch` prompts (default: the batch devices, 1 per device).
"""
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_MESH = flags.DEFINE_string("mesh", "data=1,fsdp=8", "Mesh axes sizes, e.g. data=1,fsdp=8.")
_FULL = flags.DEFINE_bool("full", False, "Full fine-tuning instead of LoRA.")
_MICRO = flags.DEFINE_integer("micro_batch_per_device", 1, "Train micro-batch per batch device.")
_ACCUM = flags.DEFINE_integer("accumulation", 1, "Micro-batches per optimizer step (k).")
_ROLLOUT_BATCH = flags.DEFINE_integer("rollout_batch", 0, "Prompts per rollout (0 = 1/device).")
_BUDGET = flags.DEFINE_float("budget_gib", 16.0, "Per-device memory budget to check against.")
# Rows of the per-prompt normaliser in the state (its size barely matters next to the models).
NUM_PROMPTS = 64
_SKIP_ROLLOUT = flags.DEFINE_bool("skip_rollout", False, "Compile only the train step.")
flags.mark_flags_as_required(["config"])
# This checkout's package first, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _report(name, compiled, budget_gib, seconds):
  stats = compiled.memory_analysis()
  gib = 2.0**30
  if stats is None:
    print(f"{name}: compiled in {seconds:.1f} s; no memory analysis on this backend")
    return
  parts = {
      "arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
      "aliased (donated)": -stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
      "generated code": stats.generated_code_size_in_bytes}
  total = sum(parts.values())
  print(f"{name}: compiled in {seconds:.1f} s; per device: " + ", ".join(
      f"{k} {v / gib:.2f}" for k, v in parts.items()) + f" GiB; total {total / gib:.2f} GiB -> "
        f"{'fits' if total <= budget_gib * gib else 'does NOT fit'} in {budget_gib:g} GiB")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tdpo_jax import epoch as epoch_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import rollout  # pylint: disable=g-import-not-at-top
  from tdpo_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax.configs import sd15  # pylint: disable=g-import-not-at-top
  from tdpo_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value.copy_and_resolve_references()
  # The config's random-model architecture, else SD 1.5's (a real pipeline's is not read).
  spec = config.pretrained.get("tiny") or sd15.sd15_architecture()
  axes = []
  for item in _MESH.value.split(","):
    name, _, size = item.partition("=")
    if name not in ("data", "fsdp") or not size.lstrip("-").isdigit():
      raise SystemExit(f"error: bad --mesh item {item!r}; expected data=N,fsdp=M")
    axes.append((name, int(size)))
  config.mesh = tuple(axes)
  config.num_devices = -1
  config.lora.enabled = not _FULL.value
  mesh = sharding_lib.make_mesh(config.mesh, config.num_devices)
  batch_devices = sharding_lib.num_batch_devices(mesh)
  config.train.batch_size = _MICRO.value * batch_devices
  config.train.gradient_accumulation_steps = _ACCUM.value
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{'full fine-tuning' if _FULL.value else f'LoRA rank {config.lora.rank}'}; "
        f"micro-batch {config.train.batch_size} x {_ACCUM.value}; remat {config.train.remat}; "
        f"precision policy={config.precision.policy} frozen={config.precision.frozen}")

  pipeline = pipeline_lib.abstract_pipeline(spec)
  text_width = spec["text_encoder"]["hidden_size"]
  length = spec["text_encoder"]["max_position_embeddings"]
  # The trainer's own kernels (kernels.py), declared on the abstract pipeline: the same
  # shardings, donation and train step as a real run.
  models = epoch_lib.make_epoch_models(config, pipeline)
  uncond_ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  kernels = kernels_lib.make_kernels(config, mesh, models, NUM_PROMPTS, uncond_ids)
  frozen = kernels_lib.frozen_tree(models, pipeline.text_encoder_params,
                                   jax.ShapeDtypeStruct((1, length, text_width), jnp.float32))
  key = jax.eval_shape(lambda: jax.random.key(0))
  state = jax.eval_shape(kernels.init_state, pipeline.unet_params,
                         jax.ShapeDtypeStruct((), jnp.int32))
  channels = spec["vae"]["latent_channels"]
  factor = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
  h, w = config.sample.height // factor, config.sample.width // factor
  k, m = _ACCUM.value, config.train.batch_size
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  embed_dim = models.embed_dim
  batch = train_step_lib.TransitionBatch(
      latents=f32(k, m, channels, h, w), next_latents=f32(k, m, channels, h, w),
      timesteps=jax.ShapeDtypeStruct((k, m), jnp.int32), old_log_probs=f32(k, m),
      advantages=f32(k, m), returns=f32(k, m), old_values=f32(k, m), embeds=f32(k, m, embed_dim),
      prompt_embeds=f32(k, m, length, text_width))
  tic = time.perf_counter()
  compiled = kernels.train_step.lower(state, frozen, batch, key).compile()
  _report("train step", compiled, _BUDGET.value, time.perf_counter() - tic)
  if _SKIP_ROLLOUT.value:
    return
  rollout_batch = _ROLLOUT_BATCH.value or batch_devices
  params = rollout.RolloutParams(unet=pipeline.unet_params, text_encoder=frozen.text_encoder,
                                 vae=frozen.vae)
  tic = time.perf_counter()
  compiled = kernels.rollout.lower(
      params, jax.ShapeDtypeStruct((rollout_batch, length), jnp.int32), uncond_ids,
      key).compile()
  _report(f"rollout ({rollout_batch} prompts, {config.sample.num_steps} steps)", compiled,
          _BUDGET.value, time.perf_counter() - tic)


if __name__ == "__main__":
  app.run(main)
