"""The configs of the jobs: `get_config(arg)` of each module (ml_collections config files).

`sd15` is the base and declares every key with its default; `tiny` and `shapes` change values of
it. The files `configs/<name>.py` of the repository re-export these, so the documented commands
(`--config=configs/shapes.py:reward=proxy`) and `--config=tdpo_jax/configs/shapes.py` load the
same config.
"""
