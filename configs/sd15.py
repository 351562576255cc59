"""TDPO-R on Stable Diffusion 1.5 with the paper's hyper-parameters: `tdpo_jax/configs/sd15.py`.

  python -m tdpo_jax.main --config=configs/sd15.py --workdir=/tmp/run
  python -m tdpo_jax.main --config=configs/sd15.py:algorithm=ddpo --config.sample.num_steps=20
  python -m tdpo_jax.main --config=configs/sd15.py:reward=hpsv2,sd14 --workdir=/tmp/hps14

The config (its presets and every key with its default) lives in the package; this file is the
path the commands name.
"""
from tdpo_jax.configs.sd15 import PAPER_PROMPTS, get_config, parse_arg  # noqa: F401
