"""The trainable policy: LoRA adapters over the frozen UNet, or the full UNet.

`config.lora.enabled` picks one. Either way the *reference* policy (for the optional KL terms)
is the frozen pre-trained UNet, `frozen.unet`.
"""
from tdpo_jax import lora


def init_policy_params(lora_config, base_unet_params, rng):
  """Trainable parameters: LoRA adapters (B = 0, so the policy starts at the base) or a copy
  of the full UNet parameters."""
  if lora_config.enabled:
    return lora.init_lora(base_unet_params, lora_config.targets, lora_config.rank, rng)
  return base_unet_params


def unet_params(lora_config, base_unet_params, policy_params):
  """The UNet parameters the policy samples with: W + (alpha / r) A B, or the full params."""
  if lora_config.enabled:
    return lora.merge_lora(base_unet_params, policy_params, lora_config.alpha, lora_config.rank)
  return policy_params
