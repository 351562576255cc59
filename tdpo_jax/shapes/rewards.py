"""The shapes world's rewards, registered in the reward registry when this module is imported.

Shape legend: B batch, S image side (32). Every reward takes images (B, S, S, 3) in [0, 1] and B
prompts and returns (B,) float32.

  shapes_gold           the analytical gold reward (`gold.gold_reward`: fidelity + quality)
  shapes_gold_fidelity  its prompt-fidelity term alone (the cross-reward curves of an
                        aesthetic-proxy run)
  shapes_gold_quality   its image-quality term alone
  shapes_proxy          the learned prompt-conditioned proxy (`proxy.make_reward_fn`), weights in
                        config.rewards.shapes_proxy.weights (`python -m tdpo_jax.shapes.proxy`)
  shapes_aesthetic      the learned image-only "aesthetic" reward (`aesthetic.make_reward_fn`),
                        weights in config.rewards.shapes_aesthetic.weights
                        (`python -m tdpo_jax.shapes.aesthetic`)

The core registry (`tdpo_jax.rewards`) does not import the shapes world: configs/shapes.py lists
this module in `config.reward_modules`, and the entry points import those modules
(`rewards.import_reward_modules`) before they check or build a reward name. Other code imports
this module itself before `rewards.make_reward_fn("shapes_...", ...)`. It also registers the
critic tower `critic.tower="shapes_aesthetic"` (the aesthetic reward's trunk, critic_tower.py).
"""
from tdpo_jax import critic_tower
from tdpo_jax import rewards
from tdpo_jax.shapes import aesthetic
from tdpo_jax.shapes import gold
from tdpo_jax.shapes import proxy

FUNCTION_REWARDS = {
    "shapes_gold": gold.gold_reward,
    "shapes_gold_fidelity": gold.gold_fidelity,
    "shapes_gold_quality": gold.gold_quality,
}
MODEL_REWARDS = {
    "shapes_proxy": proxy.make_reward_fn,
    "shapes_aesthetic": aesthetic.make_reward_fn,
}

for _name, _reward_fn in FUNCTION_REWARDS.items():
  rewards.register(_name, _reward_fn)
for _name, _builder in MODEL_REWARDS.items():
  rewards.register_model_reward(_name, _builder, ("weights",))


def _aesthetic_tower(config):
  """The critic tower "shapes_aesthetic": the aesthetic reward's trunk (`aesthetic.make_tower`)."""
  if "shapes_aesthetic" not in config.rewards:
    raise ValueError("critic.tower='shapes_aesthetic' needs config.rewards.shapes_aesthetic."
                     "weights (the msgpack of `python -m tdpo_jax.shapes.aesthetic`)")
  return critic_tower.Tower(*aesthetic.make_tower(config.rewards.shapes_aesthetic.weights))


critic_tower.register("shapes_aesthetic", _aesthetic_tower)
