"""Tests for tdpo_jax/lora.py: init, merge, gradients, and the tiny UNet's targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax import lora
from tdpo_jax.models import unet as unet_lib

UNET_TARGETS = (r".*attn[12]/to_(q|k|v|out_0)/kernel$",)
RANK = 4
ALPHA = 4.0


def _toy_params():
  keys = jax.random.split(jax.random.key(0), 4)
  return {
    "block": {
      "attn1": {
        "to_q": {"kernel": jax.random.normal(keys[0], (4, 6))},
        "to_out_0": {"kernel": jax.random.normal(keys[1], (6, 4)),
                     "bias": jax.random.normal(keys[2], (4,))},
      },
      "norm": {"scale": jax.random.normal(keys[3], (4,))},
    },
  }


def _toy_model(params, inputs):
  attention = params["block"]["attn1"]
  hidden = inputs @ attention["to_q"]["kernel"]
  outputs = hidden @ attention["to_out_0"]["kernel"] + attention["to_out_0"]["bias"]
  return outputs * params["block"]["norm"]["scale"]


def _randomise_b(lora_params, seed):
  leaves, treedef = jax.tree_util.tree_flatten_with_path(lora_params)
  new_leaves = []
  for index, (path, leaf) in enumerate(leaves):
    if path[-1].key == "b":
      leaf = jax.random.normal(jax.random.fold_in(jax.random.key(seed), index), leaf.shape)
    new_leaves.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, new_leaves)


def test_init_shapes_and_merge_is_identity_at_init():
  base = _toy_params()
  adapters = lora.init_lora(base, UNET_TARGETS, RANK, jax.random.key(1))
  kernels = adapters["block"]["attn1"]
  assert set(kernels) == {"to_q", "to_out_0"}
  assert kernels["to_q"]["kernel"]["a"].shape == (4, RANK)
  assert kernels["to_q"]["kernel"]["b"].shape == (RANK, 6)
  assert kernels["to_out_0"]["kernel"]["a"].shape == (6, RANK)
  np.testing.assert_array_equal(kernels["to_q"]["kernel"]["b"], 0.0)
  assert float(jnp.std(kernels["to_q"]["kernel"]["a"])) > 0.0

  merged = lora.merge_lora(base, adapters, ALPHA, RANK)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  for merged_leaf, base_leaf in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(
      np.asarray(merged_leaf).view(np.uint32), np.asarray(base_leaf).view(np.uint32))


def test_merge_equals_low_rank_update():
  base = _toy_params()
  adapters = _randomise_b(lora.init_lora(base, UNET_TARGETS, RANK, jax.random.key(1)), seed=2)
  alpha = 8.0
  merged = jax.jit(lora.merge_lora, static_argnums=(2, 3))(base, adapters, alpha, RANK)
  for name in ("to_q", "to_out_0"):
    weight = np.asarray(base["block"]["attn1"][name]["kernel"], np.float64)
    a = np.asarray(adapters["block"]["attn1"][name]["kernel"]["a"], np.float64)
    b = np.asarray(adapters["block"]["attn1"][name]["kernel"]["b"], np.float64)
    np.testing.assert_allclose(
      merged["block"]["attn1"][name]["kernel"], weight + alpha / RANK * a @ b,
      rtol=1e-5, atol=1e-5)
  # Untargeted leaves pass through unchanged.
  np.testing.assert_array_equal(
    merged["block"]["attn1"]["to_out_0"]["bias"], base["block"]["attn1"]["to_out_0"]["bias"])
  np.testing.assert_array_equal(merged["block"]["norm"]["scale"], base["block"]["norm"]["scale"])


def test_gradient_flows_to_lora_params_only():
  base = _toy_params()
  base_copy = jax.tree.map(np.array, base)
  adapters = lora.init_lora(base, UNET_TARGETS, RANK, jax.random.key(1))
  inputs = jax.random.normal(jax.random.key(3), (5, 4))

  def loss_fn(lora_params):
    return jnp.sum(_toy_model(lora.merge_lora(base, lora_params, ALPHA, RANK), inputs) ** 2)

  grads = jax.grad(loss_fn)(adapters)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  for name in ("to_q", "to_out_0"):
    grad = grads["block"]["attn1"][name]["kernel"]
    # dW'/dA = scale * g B^T = 0 at init (B = 0); B gets the gradient.
    np.testing.assert_array_equal(grad["a"], 0.0)
    assert np.any(np.asarray(grad["b"]) != 0.0)

  trained = _randomise_b(adapters, seed=4)
  grads = jax.grad(loss_fn)(trained)
  for name in ("to_q", "to_out_0"):
    assert np.any(np.asarray(grads["block"]["attn1"][name]["kernel"]["a"]) != 0.0)
  # The base tree is never modified.
  for leaf, leaf_copy in zip(jax.tree.leaves(base), jax.tree.leaves(base_copy)):
    np.testing.assert_array_equal(leaf, leaf_copy)


def test_errors():
  base = _toy_params()
  with pytest.raises(ValueError, match="nothing_here"):
    lora.init_lora(base, (r"nothing_here",), RANK, jax.random.key(0))
  with pytest.raises(ValueError, match="2-D"):
    lora.init_lora(base, (r"norm/scale$",), RANK, jax.random.key(0))
  with pytest.raises(ValueError, match="rank"):
    lora.init_lora(base, UNET_TARGETS, 0, jax.random.key(0))
  with pytest.raises(ValueError, match="string"):
    lora.init_lora(base, UNET_TARGETS[0], RANK, jax.random.key(0))
  stray = {"other": {"kernel": {"a": jnp.zeros((2, RANK)), "b": jnp.zeros((RANK, 2))}}}
  with pytest.raises(ValueError, match="other/kernel"):
    lora.merge_lora(base, stray, ALPHA, RANK)


def test_count_params():
  assert lora.count_params(_toy_params()) == 24 + 24 + 4 + 4
  assert lora.count_params({}) == 0


def test_tiny_unet_targets_and_count():
  unet = unet_lib.from_diffusers_config(dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, layers_per_block=1, sample_size=8))
  # init_weights under eval_shape: the same tree and shapes, without running the ~1 min CPU init.
  shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))
  rng = np.random.default_rng(0)
  base = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)

  paths = lora.matching_paths(base, UNET_TARGETS)
  # 4 transformer blocks (down 1, mid 1, up 2) x attn1/attn2 = 8 attentions x q, k, v, out.
  assert len(paths) == 32
  assert len({path.rsplit("/", 2)[0] for path in paths}) == 8
  assert {path.split("/")[-2] for path in paths} == {"to_q", "to_k", "to_v", "to_out_0"}

  adapters = lora.init_lora(base, UNET_TARGETS, RANK, jax.random.key(1))
  assert lora.count_params(adapters) == 9984  # the official tiny UNet's LoRA count

  merged = lora.merge_lora(base, adapters, ALPHA, RANK)
  for merged_leaf, base_leaf in zip(jax.tree.leaves(merged), jax.tree.leaves(base)):
    np.testing.assert_array_equal(merged_leaf, base_leaf)
