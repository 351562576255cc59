"""The shapes world's RL fine-tuning: `tdpo_jax/configs/shapes.py` (presets documented there).

  python -m tdpo_jax.main --config=configs/shapes.py --workdir=/tmp/tdpo_shapes
  python -m tdpo_jax.main --config=configs/shapes.py:algorithm=ddpo,reward=proxy --workdir=...
"""
from tdpo_jax.configs.shapes import get_config, pretrain_config, shapes_model_spec  # noqa: F401
