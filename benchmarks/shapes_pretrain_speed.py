"""Steps/s of the shapes-world pre-training kernels (VAE, UNet + text encoder) per batch size.

  python benchmarks/shapes_pretrain_speed.py --stage=unet --batches=32,64,128 [--repeats=10]
      [--config=configs/shapes_pretrain.py] [--config.unet.learning_rate=...]

Random weights and data (speed only); each batch size is compiled once, then timed over
`--repeats` steps, with the optimizers of the pre-training config (`--config`). Run with XLA_FLAGS / taskset to compare thread settings.
"""
import os
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tdpo_jax import cli  # noqa: E402
from tdpo_jax import ddim  # noqa: E402
from tdpo_jax.configs import shapes as shapes_config  # noqa: E402
from tdpo_jax.models import pipeline as pipeline_lib  # noqa: E402
from tdpo_jax.shapes import model as model_lib  # noqa: E402
from tdpo_jax.shapes import pretrain  # noqa: E402
from tdpo_jax.shapes import world  # noqa: E402


def define_flags(flag_values, argv):
  cli.define_config(flag_values, argv, pretrain.CONFIG_PATH,
                    "The pre-training config (default: configs/shapes_pretrain.py).")
  flags.DEFINE_enum("stage", "unet", ("vae", "unet"), "Which stage's kernel to time.",
                    flag_values=flag_values)
  flags.DEFINE_list("batches", "32,64,128", "Batch sizes.", flag_values=flag_values)
  flags.DEFINE_integer("repeats", 10, "Timed steps per batch size.", lower_bound=1,
                       flag_values=flag_values)


def main(argv=None):
  values, _ = cli.parse(argv, define_flags, "benchmarks/shapes_pretrain_speed.py")
  config, spec = values["config"].value, shapes_config.shapes_model_spec()
  params = model_lib.init_params(spec, 0)
  stage, repeats = values["stage"].value, values["repeats"].value
  for batch in (int(b) for b in values["batches"].value):
    images, prompts = world.batch(0, 0, batch)
    if stage == "vae":
      optimizer = pretrain._optimizer(config.vae)
      step = jax.jit(pretrain.make_vae_step(model_lib.modules(spec)["vae"], optimizer, 1e-6))
      state = (params["vae"], optimizer.init(params["vae"]))
      run = lambda state, i: step(*state, images, jax.random.key(i))[:2]  # noqa: E731
    else:
      import tempfile  # noqa: PLC0415
      tokenizer_dir = tempfile.mkdtemp()
      model_lib.write_tokenizer(tokenizer_dir, spec.text_encoder.max_position_embeddings)
      pipeline = model_lib.make_pipeline(spec, params, tokenizer_dir, 1.0)
      optimizer = pretrain._optimizer(config.unet)
      trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
      step = jax.jit(pretrain.make_unet_step(pipeline, optimizer,
                                             ddim.alphas_cumprod(spec.scheduler), config.unet))
      posterior = (jnp.zeros((batch, 4, 8, 8)), jnp.ones((batch, 4, 8, 8)))
      ids = pipeline_lib.tokenize(pipeline.tokenizer, prompts)
      uncond = pipeline_lib.tokenize(pipeline.tokenizer, [""])
      state = {"params": trainable, "opt_state": optimizer.init(trainable), "ema": trainable}
      run = lambda state, i: step(state, posterior, ids, uncond, jax.random.key(i))[0]  # noqa: E731
    start = time.time()
    state = jax.block_until_ready(run(state, 0))
    compile_s = time.time() - start
    start = time.time()
    for i in range(repeats):
      state = run(state, i + 1)
    jax.block_until_ready(state)
    per_step = (time.time() - start) / repeats
    print(f"{stage} batch {batch}: {1 / per_step:.3f} steps/s, {batch / per_step:.1f} "
          f"samples/s (compile + first step {compile_s:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
