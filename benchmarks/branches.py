"""Concurrent-chains benchmark: the critic's embedding of an epoch's states in one chain of ops
against `critic.embed_branches` independent chains (`epoch.in_branches`).

XLA:CPU runs one batched chain of small convolutions on about one core; independent chains in
the same kernel run concurrently on its threads. Both versions of the prepare phase's critic
embedding (VAE decode + image tower of every state x_T .. x_1 of the config's N samples) are
compiled in this one process and timed in alternation on the same random latents:

  python benchmarks/branches.py --config=tdpo_jax/configs/tiny.py --branches=4 --repeats=5

prints the seconds of each (median), the ratio, and the largest relative difference of the
embeddings (float rounding).
"""
import sys

from absl import flags

import alternation


def define_flags(flag_values, argv):
  from tdpo_jax import cli  # noqa: PLC0415
  cli.define_config(flag_values, argv, default="tdpo_jax/configs/tiny.py")
  flags.DEFINE_integer("branches", 4, "Independent chains of the compared version.",
                       lower_bound=2, flag_values=flag_values)
  flags.DEFINE_integer("repeats", 5, "Timed calls of each version (after one warm-up call).",
                       lower_bound=1, flag_values=flag_values)


def main(argv=None):
  from tdpo_jax import cli  # noqa: PLC0415
  values = cli.parse_flags_only(argv, define_flags, "benchmarks/branches.py")
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from tdpo_jax import config_checks  # noqa: PLC0415
  from tdpo_jax import epoch as epoch_lib  # noqa: PLC0415
  from tdpo_jax import rollout  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  config = values["config"].value
  config.log.progress = False
  trainer = train.Trainer(config)
  if trainer.models.tower is None:
    raise SystemExit(f"error: --config's algorithm {config.algorithm!r} has no critic tower")
  frozen = trainer.frozen_params()
  latents = jax.random.normal(jax.random.key(0), (
      config_checks.samples_per_epoch(config), config.sample.num_steps) +
      rollout.latent_shape(trainer.models.frozen_pipeline, config.sample))
  chunk = int(config.critic.embed_chunk_size)
  versions = {1: None, values["branches"].value: None}
  embeds = {}
  for branches in versions:
    versions[branches] = jax.jit(
        lambda f, x, b=branches: epoch_lib.embed_states(trainer.models, f, x, chunk, b)).lower(
            frozen, latents).compile()
    embeds[branches] = np.asarray(versions[branches](frozen, latents))  # warm-up
  median = alternation.median_seconds(
      {branches: (lambda: (frozen, latents), fn) for branches, fn in versions.items()},
      values["repeats"].value)
  one, many = sorted(versions)
  difference = float(np.max(np.abs(embeds[many] - embeds[one])) / np.max(np.abs(embeds[one])))
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); critic embedding "
        f"of {latents.shape[0]} x {latents.shape[1]} states, chunk {chunk}, median of "
        f"{values['repeats'].value}")
  print(f"1 chain              {median[one]:.3f} s")
  print(f"{many} chains             {median[many]:.3f} s")
  print(f"ratio {many} / 1          {median[many] / median[one]:.2f}")
  print(f"max |difference| / max |embedding| {difference:.1e}")


if __name__ == "__main__":
  main(sys.argv[1:])
