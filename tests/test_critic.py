"""Tests for tdpo_jax/critic.py: shapes, init statistics, linearity, dropout, sown activations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdpo_jax import critic as critic_lib

EMBED_DIM = 32
HIDDEN_SIZES = (1024, 128, 64, 16)


def _critic_and_params(embed_dim=EMBED_DIM, seed=0, **kwargs):
  critic = critic_lib.CriticMLP(init_std=critic_lib.critic_init_std(embed_dim), **kwargs)
  embeds = jnp.zeros((2, embed_dim))
  params = critic.init(jax.random.key(seed), embeds, deterministic=True)["params"]
  return critic, params


def test_output_shape():
  critic, params = _critic_and_params()
  embeds = jax.random.normal(jax.random.key(1), (5, EMBED_DIM))
  values = critic.apply({"params": params}, embeds, deterministic=True)
  assert values.shape == (5,)
  assert values.dtype == jnp.float32


def test_init_statistics():
  embed_dim = 768
  critic, params = _critic_and_params(embed_dim)
  expected_std = 1.0 / (embed_dim + 1)
  assert set(params) == {"hidden_0", "hidden_1", "hidden_2", "hidden_3", "output"}
  for name, layer in params.items():
    kernel = np.asarray(layer["kernel"])
    np.testing.assert_array_equal(layer["bias"], 0.0)
    # The sample std of n normal draws has relative standard error ~ 1/sqrt(2n); the
    # output kernel has only 16 entries, so its tolerance is wider.
    tolerance = max(0.05, 4.0 / np.sqrt(2 * kernel.size))
    assert abs(kernel.std() / expected_std - 1.0) < tolerance, (name, kernel.std())
    assert abs(kernel.mean()) < 4.0 * expected_std / np.sqrt(kernel.size), name


def test_make_critic_reads_config():
  config = ml_collections.ConfigDict(dict(
    hidden_sizes=(1024, 128, 64, 16), dropout_rates=(0.2, 0.2, 0.1, 0.0),
    activation="identity", init_std=0.0))
  critic = critic_lib.make_critic(config, 768)
  assert critic.init_std == pytest.approx(1.0 / 769)
  assert critic.hidden_sizes == HIDDEN_SIZES
  config.init_std = 0.5
  assert critic_lib.make_critic(config, 768).init_std == 0.5


def test_identity_activation_is_affine():
  critic, params = _critic_and_params()
  keys = jax.random.split(jax.random.key(2), 2)
  x = jax.random.normal(keys[0], (4, EMBED_DIM))
  y = jax.random.normal(keys[1], (4, EMBED_DIM))
  # Non-zero biases, so affinity (not just linearity) is what is checked.
  params = jax.tree.map(lambda leaf: leaf + 0.01, params)

  def apply(embeds):
    return critic.apply({"params": params}, embeds, deterministic=True)

  for weight in (0.3, 1.7, -0.5):
    np.testing.assert_allclose(
      apply(weight * x + (1 - weight) * y), weight * apply(x) + (1 - weight) * apply(y),
      rtol=1e-4, atol=1e-6)


def test_relu_activation_is_not_affine():
  critic, params = _critic_and_params(activation="relu")
  x = jax.random.normal(jax.random.key(3), (4, EMBED_DIM))

  def apply(embeds):
    return critic.apply({"params": params}, embeds, deterministic=True)

  assert not np.allclose(apply(-x), -apply(x) + 2 * apply(jnp.zeros_like(x)), atol=1e-6)


def test_unknown_activation_raises():
  critic = critic_lib.CriticMLP(activation="swish2", init_std=0.1)
  with pytest.raises(ValueError, match="swish2"):
    critic.init(jax.random.key(0), jnp.zeros((1, 4)), deterministic=True)


def test_dropout_only_when_not_deterministic():
  critic, params = _critic_and_params()
  embeds = jax.random.normal(jax.random.key(4), (8, EMBED_DIM))
  deterministic = [
    critic.apply({"params": params}, embeds, deterministic=True) for _ in range(2)]
  np.testing.assert_array_equal(deterministic[0], deterministic[1])
  dropped = [
    critic.apply({"params": params}, embeds, deterministic=False,
                 rngs={"dropout": jax.random.key(seed)})
    for seed in (5, 6)]
  assert not np.allclose(dropped[0], deterministic[0])
  assert not np.allclose(dropped[0], dropped[1])


def test_sown_preactivations():
  critic, params = _critic_and_params()
  embeds = jax.random.normal(jax.random.key(7), (3, EMBED_DIM))
  _, state = critic.apply(
    {"params": params}, embeds, deterministic=True, mutable=["intermediates"])
  for index, width in enumerate(HIDDEN_SIZES):
    (preacts,) = state["intermediates"][critic_lib.preactivation_name(index)]
    assert preacts.shape == (3, width)
  # The first sown value is exactly the first Dense layer's pre-activation.
  expected = embeds @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"]
  np.testing.assert_allclose(
    state["intermediates"][critic_lib.preactivation_name(0)][0], expected, rtol=1e-5, atol=1e-6)


def test_param_count_matches_official_tiny_critic():
  _, params = _critic_and_params(EMBED_DIM)
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert count == 174305


def test_embed_noisy_latents_unit_norm_and_frozen():
  latents = jax.random.normal(jax.random.key(8), (3, 4, 8, 8))  # NCHW
  projection = jax.random.normal(jax.random.key(9), (16 * 16 * 3, EMBED_DIM))

  def decode_fn(latents_nchw):  # -> NHWC images in [0, 1]
    images = jnp.transpose(latents_nchw[:, :3], (0, 2, 3, 1))
    images = jax.image.resize(images, (images.shape[0], 16, 16, 3), "nearest")
    return nn.sigmoid(images)

  def embed_fn(images):
    return images.reshape(images.shape[0], -1) @ projection

  embeds = critic_lib.embed_noisy_latents(decode_fn, embed_fn, latents)
  assert embeds.shape == (3, EMBED_DIM)
  np.testing.assert_allclose(jnp.linalg.norm(embeds, axis=-1), 1.0, rtol=1e-5)
  gradient = jax.grad(
    lambda x: jnp.sum(critic_lib.embed_noisy_latents(decode_fn, embed_fn, x)))(latents)
  np.testing.assert_array_equal(gradient, 0.0)
  zero_embeds = critic_lib.embed_noisy_latents(decode_fn, lambda images: 0.0 * embed_fn(images),
                                               latents)
  assert np.all(np.isfinite(zero_embeds))
