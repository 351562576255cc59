"""Pre-training of the shapes-world model: `tdpo_jax/configs/shapes_pretrain.py`.

  python -m tdpo_jax.shapes.pretrain --workdir=DIR --config=configs/shapes_pretrain.py \
      --config.unet.dataset_size=256
"""
from tdpo_jax.configs.shapes_pretrain import get_config  # noqa: F401
