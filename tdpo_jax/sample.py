"""Sample a captioned image grid from the configured (pre-trained) pipeline.

  python -m tdpo_jax.sample --config=configs/tiny.py --out=grid.png --num_images=8

Prompts are drawn from `config.prompts` (or given with `--prompt`, repeatable); the images use
the same jitted sampler (`rollout.py`) as training.
"""
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", "samples.png", "Output PNG path.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 8, "Number of images (prompts cycle).")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompt(s); default: config.prompts.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["config"])


def sample_images(config, prompts, seed):
  """Returns (images (B, H, W, 3) in [0, 1], seconds) for the given prompts."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tdpo_jax import rollout  # pylint: disable=g-import-not-at-top
  from tdpo_jax.models import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top

  pipeline = pipeline_lib.load_pipeline(
      config.pretrained.model, cache_dir=config.pretrained.cache_dir,
      image_encoder=config.pretrained.image_encoder, tiny_spec=config.pretrained.tiny)
  rollout_fn = jax.jit(rollout.make_rollout_fn(pipeline, config.sample))
  params = rollout.RolloutParams(unet=pipeline.unet_params,
                                 text_encoder=pipeline.text_encoder_params,
                                 vae=pipeline.vae_params)
  input_ids, uncond_ids = rollout.tokenize_prompts(pipeline, prompts)
  tic = time.perf_counter()
  trajectory = rollout_fn(params, input_ids, uncond_ids, jax.random.key(seed))
  images = np.asarray(jax.device_get(trajectory.images))
  return images, time.perf_counter() - tic


def main(argv):
  del argv
  from tdpo_jax import images as images_lib  # pylint: disable=g-import-not-at-top
  from tdpo_jax import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    pool = _PROMPTS.value or prompts_lib.load_prompts(config.prompts)
    prompts = [pool[i % len(pool)] for i in range(_NUM_IMAGES.value)]
    images, seconds = sample_images(config, prompts, _SEED.value)
  except (ValueError, FileNotFoundError) as error:
    raise SystemExit(f"error: {error}") from None
  images_lib.save_grid(_OUT.value, images, prompts)
  logging.info("sampled %d images in %.1f s (incl. compilation)", len(images), seconds)
  print(f"wrote {_OUT.value}: {len(images)} images, {config.sample.num_steps} DDIM steps")


if __name__ == "__main__":
  app.run(main)
