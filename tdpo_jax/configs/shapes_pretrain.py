"""Pre-training of the shapes-world model (`python -m tdpo_jax.shapes.pretrain`, its default
config): `shapes.pretrain_config()`; the architecture is `shapes.shapes_model_spec()`.

  python -m tdpo_jax.shapes.pretrain --workdir=DIR [--config=configs/shapes_pretrain.py]
      [--config.unet.dataset_size=256 --config.eval_every=500 ...]
"""
from tdpo_jax.configs import shapes


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/shapes_pretrain.py takes no argument; got {arg!r} (override "
                     "entries with --config.KEY=VALUE)")
  return shapes.pretrain_config()
