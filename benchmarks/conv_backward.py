"""Convolution backward benchmark: the train-epoch kernel with `unet.stride1_conv` against
JAX's own convolution gradient.

JAX's transpose rule hands XLA the input gradient of a stride-1 convolution as a convolution
whose kernel has its in/out dims swapped (dimension labels `01oi`); inside the train epoch's
loops XLA:CPU runs those on its generic Eigen convolution, while `01io` convolutions go to its
YNNPACK fusions. `unet.stride1_conv` writes the flipped, transposed kernel out as an array, so
the backward convolutions are `01io` too (same values). This script builds the config's
Trainer twice, with `unet.conv` swapped for a plain `nn.Conv` while the first one's train epoch
is traced, samples and prepares one real epoch, then times both compiled train-epoch kernels on
it in alternation (fresh states each call: the kernel donates its state):

  python benchmarks/conv_backward.py --config=tdpo_jax/configs/shapes.py --repeats=3

prints the compiled kernels' convolution dimension labels, the seconds of each (median; and the
seconds of its trace + compile, JAX's first, without a persistent cache unless
$JAX_COMPILATION_CACHE_DIR sets one), the ratio ours / JAX's, and the relative difference of the two epochs' policy updates (Frobenius
norm over the whole tree: Adam's steps are ~lr sign(g), so single entries that are rounding noise
around 0 can flip).
"""
import sys
import time

from absl import flags

import alternation


def define_flags(flag_values, argv):
  from tdpo_jax import cli  # noqa: PLC0415
  cli.define_config(flag_values, argv, default="tdpo_jax/configs/shapes.py")
  flags.DEFINE_integer("repeats", 3, "Timed train epochs of each kernel (after one warm-up).",
                       lower_bound=1, flag_values=flag_values)


def jax_conv(features, kernel_size, dtype, name):
  """`unet.conv` with Flax's default `lax.conv_general_dilated` (JAX's own gradient)."""
  import flax.linen as nn  # noqa: PLC0415
  half = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), padding=((half, half), (half, half)),
                 dtype=dtype, name=name)


def conv_labels(compiled):
  """{dimension labels: count} of the convolutions in a compiled kernel's HLO."""
  import collections  # noqa: PLC0415
  import re  # noqa: PLC0415
  return dict(collections.Counter(re.findall(r"convolution\(.*?dim_labels=([\w>-]+)",
                                             compiled.as_text())))


def main(argv=None):
  from tdpo_jax import cli  # noqa: PLC0415
  values = cli.parse_flags_only(argv, define_flags, "benchmarks/conv_backward.py")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from tdpo_jax import sharding  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  from tdpo_jax.models import unet  # noqa: PLC0415
  config = values["config"].value
  config.log.progress = False
  ours = unet.conv
  trainers, compiled, compile_seconds = {}, {}, {}
  batches = frozen = None
  try:
    for name, factory in (("jax", jax_conv), ("ours", ours)):
      # The UNet calls `unet.conv` at trace time: swapped only while this kernel is traced.
      unet.conv = factory
      trainer = trainers[name] = train.Trainer(config)
      if batches is None:
        frozen, state = trainer.frozen_params(), trainer.init_state()
        trajectory, prompt_index = trainer.sample(state, frozen, 0)
        reward = np.asarray(trainer.score_reward(
            trajectory.images, [trainer.prompts[i] for i in prompt_index]), np.float32)
        host = sharding.replicate_host((np.asarray(prompt_index, np.int32), reward),
                                       trainer.mesh)
        _, batches, _, _ = trainer.kernels.prepare(state, frozen, trajectory, *host)
      start = time.perf_counter()
      compiled[name] = trainer.kernels.train_epoch.lower(
          trainer.init_state(), frozen, batches).compile()
      compile_seconds[name] = time.perf_counter() - start
  finally:
    unet.conv = ours
  policy = {name: jax.device_get(fn(trainers[name].init_state(), frozen, batches)[0].policy_params)
            for name, fn in compiled.items()}  # warm-up
  median = alternation.median_seconds(
      {name: (lambda name=name: (trainers[name].init_state(), frozen, batches), fn)
       for name, fn in compiled.items()}, values["repeats"].value)
  start = jax.device_get(trainers["ours"].init_state().policy_params)
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree.leaves(tree)])
  update = {name: flat(params) - flat(start) for name, params in policy.items()}
  difference = float(np.linalg.norm(update["ours"] - update["jax"])
                     / np.linalg.norm(update["jax"]))
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); train epoch of "
        f"{config.sample.batch_size * config.sample.num_batches_per_epoch} samples x "
        f"{config.sample.num_steps} steps, median of {values['repeats'].value}")
  for name, label in (("jax", "JAX's conv gradient "), ("ours", "unet.stride1_conv   ")):
    print(f"{label} {median[name]:.3f} s  (compile {compile_seconds[name]:.1f} s)  convolutions "
          f"{conv_labels(compiled[name])}")
  print(f"ratio ours / JAX's   {median['ours'] / median['jax']:.2f}")
  print(f"relative difference of the epoch's policy updates (whole tree) {difference:.1e}")


if __name__ == "__main__":
  main(sys.argv[1:])
