"""tdpo_jax: TDPO-R reinforcement-learning fine-tuning of diffusion models in JAX/Flax."""
