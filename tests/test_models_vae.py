"""Tests for tdpo_jax.models.vae and its converter (tdpo_jax.models.diffusers_weights).

Shape legend: B batch, images (B, H, W, 3) NHWC in [-1, 1], latents (B, h, w, 4) NHWC (the
PyTorch reference is NCHW: the tests transpose at that crossing). The tiny VAE downsamples 4x and
runs at 16 x 24 images (non-square). References:
  * diffusers' PyTorch `AutoencoderKL` (float32, CPU) on perturbed random weights;
  * golden files made by tests/golden/make_diffusers_golden.py while diffusers still had its
    Flax VAE: the tiny parameter tree, and the shipped shapes-world VAE's decode and encode;
  * the published parameter count of the SD 1.5 VAE.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax.models import diffusers_weights
from tdpo_jax.models import vae
from tests import diffusers_parity

GOLDEN = diffusers_parity.load_golden_script()
TINY_IMAGES, TINY_LATENTS = (2, 16, 24, 3), (2, 4, 6, 4)  # NHWC
# huggingface.co/runwayml/stable-diffusion-v1-5/vae/config.json (keys besides the defaults).
SD15_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
    layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
    up_block_types=["UpDecoderBlock2D"] * 4)
SD15_VAE_PARAMETERS = 83_653_863
# Shipped VAE vs diffusers' Flax VAE as the project ran it: the same math (GroupNorm epsilon 1e-6
# in both), so only summation order differs; measured <= 0.93e-6 (PyTorch golden: <= 1.6e-6).
SHIPPED_VS_DIFFUSERS_FLAX_TOLERANCE = diffusers_parity.FLOAT32_TOLERANCE
# bfloat16 compute vs float32 decode (8 mantissa bits); measured 1.6e-2.
BFLOAT16_TOLERANCE = 5e-2
_LEGACY_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                 ".to_out.0.": ".proj_attn."}


def _tiny_inputs():
  """(images (B, H, W, 3) in [-1, 1], latents (B, h, w, 4)), NHWC float32."""
  rng = np.random.default_rng(0)
  images = np.tanh(rng.standard_normal(TINY_IMAGES)).astype(np.float32)
  return images, rng.standard_normal(TINY_LATENTS).astype(np.float32)


def _nhwc(array):
  return np.asarray(array).transpose(0, 2, 3, 1)


def _nchw(array):
  return np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def torch_reference():
  """(PyTorch state dict, {mean, logvar, decode} NHWC) of diffusers' PyTorch AutoencoderKL."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  model, state_dict = diffusers_parity.perturbed_torch_model(
      diffusers.AutoencoderKL, GOLDEN.TINY_VAE, seed=0)
  images, latents = _tiny_inputs()
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(_nchw(images))).latent_dist
    decoded = model.decode(torch.from_numpy(_nchw(latents))).sample
  return state_dict, {"mean": _nhwc(posterior.mean), "logvar": _nhwc(posterior.logvar),
                      "decode": _nhwc(decoded)}


def _run(module, params, images, latents):
  """{mean, logvar, decode} NHWC NumPy of `module` (jitted)."""
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method=module.encode))
  decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))
  mean, logvar = encode(params, images)
  return {"mean": np.asarray(mean), "logvar": np.asarray(logvar),
          "decode": np.asarray(decode(params, latents))}


def test_matches_pytorch_and_round_trips(torch_reference):
  state_dict, reference = torch_reference
  module = vae.from_diffusers_config(GOLDEN.TINY_VAE)
  params = diffusers_weights.diffusers_pytorch_to_flax(state_dict, module, "tiny vae")
  outputs = _run(module, params, *_tiny_inputs())
  for name, expected in reference.items():
    error = diffusers_parity.relative_error(outputs[name], expected)
    print(f"PARITY VAE {name}: max rel {error:.2e}")  # `pytest -s` collects the table
    assert error <= diffusers_parity.FLOAT32_TOLERANCE, (name, error)
  exported = diffusers_weights.flax_to_pytorch(params)
  assert sorted(exported) == sorted(state_dict)
  assert all(np.array_equal(exported[key], state_dict[key]) for key in state_dict)
  assert diffusers_parity.trees_equal(
      diffusers_weights.diffusers_pytorch_to_flax(exported, module, "tiny vae"), params)


def test_legacy_attention_names_and_1x1_conv_weights(torch_reference):
  """Old VAE files: `query/key/value/proj_attn` names, attention weights as (C, C, 1, 1)."""
  state_dict, _ = torch_reference
  module = vae.from_diffusers_config(GOLDEN.TINY_VAE)
  params = diffusers_weights.diffusers_pytorch_to_flax(state_dict, module, "tiny vae")
  legacy = {}
  for key, value in state_dict.items():
    for new, old in _LEGACY_NAMES.items():
      if new in key:
        key = key.replace(new, old)
        value = value[:, :, None, None] if value.ndim == 2 else value
    legacy[key] = value
  assert any(".query." in key for key in legacy)
  converted = diffusers_weights.diffusers_pytorch_to_flax(legacy, module, "legacy vae")
  assert diffusers_parity.trees_equal(converted, params)


def _tree_lines(module):
  return GOLDEN.tree_lines(jax.eval_shape(module.init_weights, jax.random.key(0)))


def test_tree_matches_golden():
  with open(os.path.join(GOLDEN.HERE, GOLDEN.VAE_TREE_NAME)) as file:
    golden = json.load(file)
  assert golden["config"] == GOLDEN.TINY_VAE
  assert _tree_lines(vae.from_diffusers_config(GOLDEN.TINY_VAE)) == golden["tree"]


@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_tree_matches_diffusers_flax(name):
  """While diffusers has its Flax VAE (<= 0.39)."""
  diffusers = pytest.importorskip("diffusers")
  if not hasattr(diffusers, "FlaxAutoencoderKL"):
    pytest.skip("diffusers has no Flax VAE any more; test_tree_matches_golden covers it")
  config = GOLDEN.TINY_VAE if name == "tiny" else SD15_VAE
  diffusers.utils.logging.set_verbosity_error()
  reference = diffusers.FlaxAutoencoderKL.from_config(config)
  assert _tree_lines(vae.from_diffusers_config(config)) == _tree_lines(reference)


def test_sd15_parameter_count():
  shapes = jax.eval_shape(vae.from_diffusers_config(SD15_VAE).init_weights, jax.random.key(0))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == SD15_VAE_PARAMETERS


@pytest.fixture(scope="module")
def shipped():
  """(module, float32 params) of the shipped shapes-world VAE."""
  config, params = GOLDEN.read_shipped("vae")
  return vae.from_diffusers_config(config), params


def _shipped_outputs(module, params):
  inputs = GOLDEN.golden_inputs()
  return _run(module, params, inputs["vae_images"], inputs["vae_latents"])


def test_shipped_model_loads_and_matches_golden(shipped):
  module, params = shipped
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      lambda struct: struct.shape, jax.eval_shape(module.init_weights, jax.random.key(0)))
  golden = np.load(os.path.join(GOLDEN.HERE, GOLDEN.OUTPUTS_NAME))
  outputs = _shipped_outputs(module, params)
  for name in ("decode", "mean", "logvar"):
    torch_error = diffusers_parity.relative_error(outputs[name], golden[f"vae_{name}_torch"])
    assert torch_error <= diffusers_parity.FLOAT32_TOLERANCE, (name, torch_error)
    flax_error = diffusers_parity.relative_error(outputs[name],
                                                 golden[f"vae_{name}_diffusers_flax"])
    assert flax_error <= SHIPPED_VS_DIFFUSERS_FLAX_TOLERANCE, (name, flax_error)


def test_bfloat16_compute_close_and_params_float32(shipped):
  module, params = shipped
  bf16_module = module.clone(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16_module.init_weights, jax.random.key(0))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  latents = GOLDEN.golden_inputs()["vae_latents"]
  decoded = np.asarray(bf16_module.apply({"params": params}, latents, method=bf16_module.decode))
  assert decoded.dtype == jnp.bfloat16
  error = diffusers_parity.relative_error(decoded.astype(np.float32),
                                          _shipped_outputs(module, params)["decode"])
  assert error <= BFLOAT16_TOLERANCE, error


@pytest.mark.parametrize("key, value", [("use_quant_conv", False), ("act_fn", "relu"),
                                        ("mid_block_add_attention", False)])
def test_unsupported_config_value_named(key, value):
  with pytest.raises(ValueError, match=key):
    vae.VAEConfig.from_diffusers(dict(GOLDEN.TINY_VAE, **{key: value}))


def test_config_errors():
  with pytest.raises(ValueError, match="down_block_types"):
    vae.VAEConfig.from_diffusers(dict(GOLDEN.TINY_VAE,
                                      down_block_types=["DownEncoderBlock2D"] * 2))
  with pytest.raises(ValueError, match="norm_num_groups=32"):
    vae.VAEConfig.from_diffusers(dict(GOLDEN.TINY_VAE, norm_num_groups=32))
  config = vae.VAEConfig.from_diffusers(dict(GOLDEN.TINY_VAE, scaling_factor=0.5,
                                             _class_name="AutoencoderKL", force_upcast=True))
  assert config.scaling_factor == 0.5


def test_image_size_error(shipped):
  module, params = shipped
  with pytest.raises(ValueError, match="divisible by 4"):
    jax.eval_shape(lambda x: module.apply({"params": params}, x, method=module.encode),
                   jnp.zeros((1, 18, 16, 3)))
