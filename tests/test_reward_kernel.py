"""Model rewards scored on the mesh (`kernels.reward_scorer`) equal the same reward on one device.

- A hand-built `rewards.DeviceReward` with a prompt input, on meshes (2, 4) and (1, 8) of
  conftest's 8 fake CPU devices: a batch that splits, one that needs padding (5 rows), and
  images already on the mesh (used in place); its parameters are placed by the sharding rules.
- The shipped shapes rewards (aesthetic, image-only; proxy, prompt-conditioned): sharded ==
  unsharded within float32 reassociation, and equal to the pre-change host path bitwise on a
  one-device mesh.
- A host reward (JPEG) passes through unchanged.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import kernels
from tdpo_jax import rewards
from tdpo_jax import sharding
from tests import helpers

ASSETS = os.path.join(helpers.REPO, "tdpo_jax", "shapes", "assets")


def _config(data, fsdp):
  config = helpers.load_config("tiny")
  config.mesh = (("data", data), ("fsdp", fsdp))
  return config


def _toy_reward():
  """score = mean(image) * sum(kernel) + sum(word ids) * bias: every input matters."""
  params = {"head": {"kernel": jnp.arange(16.0).reshape(8, 2) / 10, "bias": jnp.float32(0.5)}}

  def score_fn(p, images, ids):
    return (jnp.mean(images, axis=(1, 2, 3)) * jnp.sum(p["head"]["kernel"])
            + jnp.sum(ids, axis=-1) * p["head"]["bias"])

  encode = lambda prompts: (np.asarray([[len(w) for w in p.split()][:3] + [0] * (3 - len(
      p.split()[:3])) for p in prompts], np.int32),)
  return rewards.DeviceReward(score_fn, params, encode_prompts=encode)


@pytest.mark.parametrize("data,fsdp", [(2, 4), (1, 8)])
@pytest.mark.parametrize("count", [8, 5])
def test_toy_reward_on_the_mesh_equals_one_device(data, fsdp, count):
  reward = _toy_reward()
  images = np.random.default_rng(count).uniform(size=(count, 4, 4, 3)).astype(np.float32)
  prompts = [f"a {'big ' * (i % 3)}red cube number {i}" for i in range(count)]
  expected = reward(images, prompts)
  mesh = sharding.make_mesh(_config(data, fsdp).mesh)
  score = kernels.reward_scorer(_config(data, fsdp), mesh, reward)
  np.testing.assert_allclose(score(images, prompts), expected, rtol=1e-6)
  if count % 8 == 0:  # images already on the mesh (the rollout's) are used in place
    placed = jax.device_put(images, sharding.batch_sharding(mesh))
    np.testing.assert_allclose(score(placed, prompts), expected, rtol=1e-6)
  with pytest.raises(ValueError, match=f"got {count - 1} prompts for {count} images"):
    score(images, prompts[:-1])


@pytest.mark.parametrize("name,weights", [("shapes_aesthetic", "aesthetic.msgpack"),
                                          ("shapes_proxy", "proxy.msgpack")])
def test_shapes_rewards_on_the_mesh(name, weights):
  rewards.import_reward_modules(("tdpo_jax.shapes.rewards",))
  reward = rewards.make_reward_fn(name, {name: {"weights": os.path.join(ASSETS, weights)}})
  assert isinstance(reward, rewards.DeviceReward)
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(8, 32, 32, 3)).astype(np.float32)
  prompts = ["one red circle", "two green squares", "a blue triangle", "three red squares"] * 2
  expected = reward(images, prompts)
  assert expected.shape == (8,) and expected.dtype == np.float32 and np.ptp(expected) > 0
  one = _config(1, 1)
  one.num_devices = 1
  single = kernels.reward_scorer(one, sharding.make_mesh(one.mesh, 1), reward)
  np.testing.assert_array_equal(single(images, prompts), expected)
  config = _config(2, 4)
  sharded = kernels.reward_scorer(config, sharding.make_mesh(config.mesh), reward)
  np.testing.assert_allclose(sharded(images, prompts), expected, rtol=1e-5, atol=1e-6)


def test_host_rewards_pass_through():
  config = _config(2, 4)
  reward = rewards.make_reward_fn("jpeg_compressibility")
  score = kernels.reward_scorer(config, sharding.make_mesh(config.mesh), reward)
  images = np.random.default_rng(1).uniform(size=(3, 16, 16, 3)).astype(np.float32)
  np.testing.assert_array_equal(score(images, ["a"] * 3), reward(images, ["a"] * 3))
