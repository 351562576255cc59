"""Mesh, partition rules and sharded kernels on conftest's 8 fake CPU devices.

- `make_mesh`: -1 fills the rest; a shape that does not match the devices is a clear error.
- Partition rules: the first match wins, the fallback replicates, "fsdp_largest" picks the largest
  divisible dim, an unmatched path is an error.
- A batch that does not split over data x fsdp is an error naming both numbers.
- `put_tree` places one-device leaves on a 2 x 4 mesh without compiling a slice per leaf.
- The rollout and the train step on meshes (2, 4) and (1, 8) equal one device within 1e-5. (8, 1)
  was dropped for CI time (~150 s): (2, 4) splits the batch over "data" already, and an 8-way
  data mesh runs in the multi-process test (one process of 8 devices vs two of 4).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import sharding
from tdpo_jax import train
from tests import helpers

P = jax.sharding.PartitionSpec


def _mesh_config(data, fsdp):
  return (("data", data), ("fsdp", fsdp))


@pytest.mark.parametrize("mesh_config,num_devices,expected", [
    (_mesh_config(-1, 1), -1, {"data": 8, "fsdp": 1}),
    (_mesh_config(2, -1), -1, {"data": 2, "fsdp": 4}),
    (_mesh_config(1, 8), -1, {"data": 1, "fsdp": 8}),
    (_mesh_config(-1, 1), 1, {"data": 1, "fsdp": 1}),
    (_mesh_config(1, -1), 4, {"data": 1, "fsdp": 4}),
])
def test_make_mesh(mesh_config, num_devices, expected):
  mesh = sharding.make_mesh(mesh_config, num_devices)
  assert dict(mesh.shape) == expected
  assert mesh.axis_names == ("data", "fsdp")


@pytest.mark.parametrize("mesh_config,num_devices,message", [
    (_mesh_config(3, 1), -1, r"mesh \{'data': 3, 'fsdp': 1\} has 3 devices but 8 devices"),
    (_mesh_config(2, 2), -1, r"has 4 devices but 8 devices"),
    (_mesh_config(-1, 3), -1, r"does not fit 8 devices: 8 is not a multiple of 3"),
    (_mesh_config(-1, -1), -1, r"at most one -1"),
    ((("batch", -1), ("fsdp", 1)), -1, r"mesh axes \('batch', 'fsdp'\) are not supported"),
    (_mesh_config(-1, 1), 9, r"num_devices=9 is invalid"),
])
def test_make_mesh_errors(mesh_config, num_devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_config, num_devices)


def test_partition_rules():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  rules = (
      (r"special/kernel$", (None, "data")),          # first match wins over the next rule
      (r"(^|/)kernel$", "fsdp_largest"),
      (r"^pinned$", (("data", "fsdp"),)),
      (r".*", ()),
  )
  tree = {
      "special": {"kernel": np.zeros((3, 8))},
      "conv": {"kernel": np.zeros((3, 3, 8, 12)), "bias": np.zeros((12,))},
      "tie": {"kernel": np.zeros((16, 16))},
      "odd": {"kernel": np.zeros((3, 5))},
      "pinned": np.zeros((16, 2)),
      "step": jnp.zeros((), jnp.int32),
  }
  specs = sharding.tree_specs(mesh, rules, tree)
  assert specs["special"]["kernel"] == P(None, "data")
  assert specs["conv"]["kernel"] == P(None, None, None, "fsdp")  # 12 > 8, both divide by 4
  assert specs["conv"]["bias"] == P()                              # fallback: replicated
  assert specs["tie"]["kernel"] == P(None, "fsdp")                 # ties: the later dim
  assert specs["odd"]["kernel"] == P()                             # nothing divides by 4
  assert specs["pinned"] == P(("data", "fsdp"))
  assert specs["step"] == P()
  shardings = sharding.tree_shardings(mesh, rules, tree, prefix="frozen")
  assert shardings["conv"]["kernel"].spec == P(None, None, None, "fsdp")
  # fsdp = 1: nothing to split.
  assert sharding.fsdp_largest_spec((8, 16), 1) == P()
  assert sharding.fsdp_largest_spec((24, 16), 8) == P("fsdp")


def test_partition_rule_errors():
  mesh = sharding.make_mesh(_mesh_config(2, 4))
  with pytest.raises(ValueError, match=r"param 'a/bias' matches no sharding rule"):
    sharding.tree_specs(mesh, ((r"kernel$", ()),), {"a": {"bias": np.zeros(3)}})
  with pytest.raises(ValueError, match=r"param 'a/kernel' of shape \(6, 3\): dim 0 is not "
                                       r"divisible by the 4 devices"):
    sharding.tree_specs(mesh, ((r".*", ("fsdp",)),), {"a": {"kernel": np.zeros((6, 3))}})
  with pytest.raises(ValueError, match=r"names mesh axis 'model'"):
    sharding.tree_specs(mesh, ((r".*", ("model",)),), {"a": np.zeros(8)})


def test_sd15_rules_shard_large_kernels():
  config = helpers.load_config("sd15")
  mesh = sharding.make_mesh(_mesh_config(1, 8))
  tree = {"unet": {"conv_in": {"kernel": np.zeros((3, 3, 4, 320)), "bias": np.zeros(320)}},
          "text_encoder": {"token_embedding": {"embedding": np.zeros((49408, 768))}},
          "policy_params": {"to_q": {"kernel": {"a": np.zeros((320, 4)),
                                                "b": np.zeros((4, 320))}}},
          "rng": jax.random.key(0)}
  specs = sharding.tree_specs(mesh, config.sharding.rules, tree)
  assert specs["unet"]["conv_in"]["kernel"] == P(None, None, None, "fsdp")
  assert specs["unet"]["conv_in"]["bias"] == P()
  assert specs["text_encoder"]["token_embedding"]["embedding"] == P("fsdp")
  assert specs["policy_params"]["to_q"]["kernel"]["a"] == P("fsdp")
  assert specs["policy_params"]["to_q"]["kernel"]["b"] == P(None, "fsdp")
  assert specs["rng"] == P()


def test_put_tree_splits_one_device_leaves_without_compiling(caplog):
  """Parameters loaded on one device, placed over fsdp: the same values, the asked shardings,
  and no jitted slice compiled per leaf shape (shapes used by no other test, so no jit cache
  of this process can hide one)."""
  mesh = sharding.make_mesh(_mesh_config(2, 4), -1)
  host = {"kernel": np.arange(24 * 44, dtype=np.float32).reshape(24, 44),
          "bias": np.arange(44, dtype=np.float32) - 7.0,
          "embedding": (np.arange(12 * 3, dtype=np.float32) / 5).reshape(12, 3)}
  specs = {"kernel": P(None, "fsdp"), "bias": P(), "embedding": P("fsdp")}
  shardings = {name: jax.sharding.NamedSharding(mesh, spec) for name, spec in specs.items()}
  on_one_device = jax.device_put(host, jax.devices()[0])
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    placed = sharding.put_tree(on_one_device, shardings)
    jax.block_until_ready(placed)
  assert not [r.getMessage() for r in caplog.records if "jit(" in r.getMessage()]
  for name in host:
    assert placed[name].sharding == shardings[name], name
    np.testing.assert_array_equal(placed[name], host[name])
  assert placed["kernel"].addressable_shards[0].data.shape == (24, 11)


@pytest.mark.parametrize("key,value,message", [
    ("sample.batch_size", 4, "sample.batch_size=4 is not divisible by the 8 batch devices"),
    ("train.batch_size", 4, "train.batch_size=4 is not divisible by the 8 batch devices"),
])
def test_batch_not_divisible_is_a_clear_error(tmp_path, key, value, message):
  config = helpers.tiny_config(tmp_path, num_devices=-1, mesh=_mesh_config(2, 4),
                               **{"sample.batch_size": 8, "train.batch_size": 8,
                                  "train.gradient_accumulation_steps": 1})
  node, leaf = key.split(".")
  config[node][leaf] = value
  with pytest.raises(ValueError, match=message):
    train.Trainer(config)


# ------------------------------------------------------------------ sharded == one device
def _equivalence_config(cache_dir, mesh_config, num_devices):
  """One rollout batch of 8 samples, 4 DDIM steps, one optimizer step of 2 micro-batches of 8,
  with `helpers.EXACT` (critic dropout off, Adam eps 1e-6: a gradient entry that is float
  rounding noise around 0 cannot flip its parameter's first Adam step)."""
  config = helpers.tiny_config(cache_dir, mesh=mesh_config, num_devices=num_devices,
                               **helpers.EXACT)
  config.sample.num_steps = 4
  config.sample.batch_size = 8
  config.sample.num_batches_per_epoch = 1
  config.train.batch_size = 8
  config.train.gradient_accumulation_steps = 2
  return config


def _first_train_batch(trainer, state, frozen, trajectory, prompt_index):
  """The epoch's first optimizer-step batch (k, M, ...) as host arrays, made by the trainer's
  own `prepare` kernel (reward, normalisation, critic values, advantages, gather), as
  `run_epoch` makes it."""
  _, (_, batches, _, _) = helpers.prepare_epoch(trainer, state, frozen, trajectory, prompt_index)
  return jax.tree.map(lambda x: np.asarray(x[0]), batches)


def _sharded_run(config, batch=None):
  trainer = helpers.shared_trainer(config)
  frozen, state = trainer.frozen_params(), trainer.init_state()
  trajectory, prompt_index = trainer.sample(state, frozen, 0)
  if batch is None:
    batch = _first_train_batch(trainer, state, frozen, trajectory, prompt_index)
  trajectory = jax.tree.map(np.asarray, trajectory)
  placed = jax.device_put(batch, trainer.kernels.shardings.transition)
  rng = jax.device_put(jax.random.key(3), sharding.replicated(trainer.mesh))
  state, metrics = trainer.kernels.train_step(state, frozen, placed, rng)
  return trainer, trajectory, batch, jax.device_get(state), jax.device_get(metrics)


@pytest.fixture(scope="module")
def one_device(cache_dir):
  return _sharded_run(_equivalence_config(cache_dir, _mesh_config(1, 1), 1))


def _assert_close(actual, expected, what, rtol=1e-5, atol=0.0):
  """Every leaf within `rtol` relative (Frobenius norm), or `atol` absolute for leaves that are
  rounding noise around 0.

  Elementwise relative error is meaningless here: per-device batch sizes change XLA's CPU
  summation order (~1e-7 relative per op), and entries near zero then differ by large ratios.
  """
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0],
                          jax.tree.leaves(expected)):
    error = helpers.relative_error(x, y)
    absolute = float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
    assert error <= rtol or absolute <= atol, (
        f"{what}{jax.tree_util.keystr(path)}: relative {error:.2e} > {rtol}, absolute "
        f"{absolute:.2e} > {atol}")


@pytest.mark.parametrize("data,fsdp", [(2, 4), (1, 8)])
def test_sharded_rollout_and_train_step_equal_one_device(cache_dir, one_device, data, fsdp):
  _, trajectory_1, batch, state_1, metrics_1 = one_device
  config = _equivalence_config(cache_dir, _mesh_config(data, fsdp), -1)
  trainer, trajectory, _, state, metrics = _sharded_run(config, batch)
  assert dict(trainer.mesh.shape) == {"data": data, "fsdp": fsdp}
  # The kernels really ran sharded: batches over the 8 batch devices, kernels over fsdp.
  assert trainer.kernels.shardings.transition.num_devices == 8
  specs = [s.spec for s in jax.tree.leaves(trainer.kernels.shardings.frozen.unet)]
  assert any("fsdp" in spec for spec in specs) == (fsdp > 1)
  _assert_close(trajectory, trajectory_1, "trajectory")
  assert metrics.keys() == metrics_1.keys()
  # At the first step ratio == 1: approx KL, the PPO loss (-mean of standardised advantages,
  # terms of size ~1) and the explained variance are 0 up to float32 rounding of O(1) sums
  # (~1e-7), so they are compared absolutely, at 1e-6.
  _assert_close(metrics, metrics_1, "metrics", atol=1e-6)
  # Adam's first step is ~lr sign(g): whole trees, not per leaf (see test_train).
  assert helpers.relative_error(helpers.flat(state.policy_params),
                                helpers.flat(state_1.policy_params)) <= 1e-5
  assert helpers.relative_error(helpers.flat(state.critic_params),
                                helpers.flat(state_1.critic_params)) <= 1e-5
  assert int(state.step) == int(state_1.step) == 1
