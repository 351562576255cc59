"""`sd15.py` with the tiny shapes of the official code's CPU timing run: `tdpo_jax/configs/tiny.py`.

  python -m tdpo_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""
from tdpo_jax.configs.tiny import get_config, tiny_model_spec  # noqa: F401
