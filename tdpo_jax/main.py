"""Entry point: `python -m tdpo_jax.main --config=configs/tiny.py --workdir=/tmp/run`.

Config values are overridable from the command line, e.g. `--config.sample.num_steps=20`
or `--config=configs/sd15.py:algorithm=ddpo`.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, images and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so `--help` is fast and XLA flags from the environment apply first.
  import diffusers  # pylint: disable=g-import-not-at-top
  from tdpo_jax import train  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()  # ~650 "Flax classes are deprecated" lines
  logging.set_verbosity(logging.INFO)
  try:
    history = train.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteError) as error:
    # Bad input or a diverged run: one clear line, not a traceback from deep inside JAX.
    raise SystemExit(f"error: {error}") from None
  last = history[-1] if history else {}
  print(f"done: {len(history)} epochs, final reward/mean={last.get('reward/mean', float('nan')):.4f}; "
        f"metrics in {_WORKDIR.value}/metrics.jsonl, images in {_WORKDIR.value}/images/")


if __name__ == "__main__":
  app.run(main)
