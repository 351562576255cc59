"""GroupNorm benchmark: the VAE decode of the critic's states with our GroupNorm against Flax's.

The critic decodes every trained state's x0 prediction through the VAE (80 latents per epoch on
configs/tiny.py), and GroupNorm was ~25 % of that decode with `flax.linen.GroupNorm`, which
broadcasts its (B, G) statistics back to (B, C) with a repeat before normalising.
`tdpo_jax.models.unet.GroupNorm` normalises in the grouped shape instead (same parameters, same
two-pass float32 statistics). Both decodes are compiled in this one process and timed in
alternation, so the printed ratio compares them on the same machine at the same moment:

  python benchmarks/group_norm.py --config=tdpo_jax/configs/tiny.py --latents=80 --repeats=8

prints the seconds of each (median of the repeats), the ratio ours / Flax's, and the largest
difference of the decoded images (float rounding).
"""
import sys

from absl import flags

import alternation


def define_flags(flag_values, argv):
  from tdpo_jax import cli  # noqa: PLC0415
  cli.define_config(flag_values, argv, default="tdpo_jax/configs/tiny.py")
  flags.DEFINE_integer("latents", 80, "Latents decoded per call (tiny: the critic's 80 states).",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("repeats", 8, "Timed calls of each decode (after one warm-up call).",
                       lower_bound=1, flag_values=flag_values)


def flax_group_norm(num_groups, epsilon, dtype, name):
  """Flax's GroupNorm with the settings our models used before `unet.GroupNorm`."""
  import flax.linen as nn  # noqa: PLC0415
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype,
                      use_fast_variance=False, name=name)


def main(argv=None):
  from tdpo_jax import cli  # noqa: PLC0415
  values = cli.parse_flags_only(argv, define_flags, "benchmarks/group_norm.py")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from tdpo_jax import rollout  # noqa: PLC0415
  from tdpo_jax.models import pipeline as pipeline_lib  # noqa: PLC0415
  from tdpo_jax.models import unet  # noqa: PLC0415
  config = values["config"].value
  pipeline = pipeline_lib.load_pipeline(config.pretrained.model,
                                        cache_dir=config.pretrained.cache_dir,
                                        tiny_spec=config.pretrained.get("tiny"))
  latents = jax.random.normal(
      jax.random.key(0),
      (values["latents"].value,) + rollout.latent_shape(pipeline, config.sample))
  ours = unet.group_norm
  compiled, images = {}, {}
  try:
    for name, norm in (("flax", flax_group_norm), ("ours", ours)):
      # The VAE (and UNet) call `unet.group_norm` at trace time: swapped only while tracing.
      unet.group_norm = norm
      compiled[name] = jax.jit(
          lambda params, z: pipeline_lib.decode_latents(pipeline, params, z)).lower(
              pipeline.vae_params, latents).compile()
      images[name] = np.asarray(compiled[name](pipeline.vae_params, latents))  # warm-up
  finally:
    unet.group_norm = ours
  median = alternation.median_seconds(
      {name: (lambda: (pipeline.vae_params, latents), fn) for name, fn in compiled.items()},
      values["repeats"].value)
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"VAE decode of {latents.shape[0]} latents {tuple(latents.shape[1:])}, "
        f"median of {values['repeats'].value}")
  print(f"flax.linen.GroupNorm  {median['flax']:.3f} s")
  print(f"unet.GroupNorm        {median['ours']:.3f} s")
  print(f"ratio ours / flax     {median['ours'] / median['flax']:.2f}")
  print(f"max |image difference| {np.abs(images['ours'] - images['flax']).max():.1e}")


if __name__ == "__main__":
  main(sys.argv[1:])
