"""diffusers PyTorch state dicts <-> the Flax params of `models.unet` / `models.vae`, NumPy only.

No torch and no diffusers Flax code: a state dict is the flat `{"a.b.weight": np.ndarray}` that
`safetensors.numpy.load_file` reads, and the Flax tree is the module's own (`jax.eval_shape` of
its `init_weights`), which drives the conversion.

Names (Flax path -> PyTorch key):
  * a module name ending in `_<i>` is the list entry `.<i>`: `down_blocks_0` -> `down_blocks.0`,
    `to_out_0` -> `to_out.0`, `net_2` -> `net.2`; except names underscored in PyTorch too
    (`linear_1`, `linear_2` of the time embeddings);
  * the VAE attention's `query/key/value/proj_attn` are `to_q/to_k/to_v/to_out.0` (diffusers >=
    0.14); the legacy PyTorch names `query/key/value/proj_attn` of older VAE files are read too;
  * leaves: `kernel` -> `weight`, `scale` -> `weight`, `bias` -> `bias`.
Layouts: conv kernels HWIO (Flax) <-> OIHW (PyTorch); dense kernels (in, out) <-> (out, in). A
(out, in, 1, 1) PyTorch weight for a Flax dense kernel (a 1x1 conv stored for a linear map, as in
LDM-converted VAE attention) is read as the (out, in) matrix it is.

The functions mirror `models.convert` (`diffusers_pytorch_key`, `flax_to_pytorch`,
`diffusers_pytorch_to_flax` there before), for this module's UNet/VAE.
"""
import re

import flax.traverse_util
import jax
import numpy as np

# A diffusers component's weight files (unet/, vae/), in the order a loader tries them.
DIFFUSERS_WEIGHTS = ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors")
# Flax leaf name -> PyTorch leaf name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# PyTorch module names that really end in `_<digit>` (not a list index).
_UNDERSCORED_NAMES = frozenset({"linear_1", "linear_2"})
# The Flax VAE attention's projections -> their PyTorch names (diffusers >= 0.14).
_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_CONV_KERNEL_NDIM, _DENSE_KERNEL_NDIM = 4, 2
_HWIO_TO_OIHW, _OIHW_TO_HWIO = (3, 2, 0, 1), (2, 3, 1, 0)


def _module_names(flax_path, legacy_vae_attention=False):
  """PyTorch module names of a Flax path's modules (all but the leaf)."""
  names = []
  for index, name in enumerate(flax_path[:-1]):
    is_parent_of_leaf = index == len(flax_path) - 2
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if is_parent_of_leaf and name in _VAE_ATTENTION_NAMES:
      names.append(name if legacy_vae_attention else _VAE_ATTENTION_NAMES[name])
    elif match and name not in _UNDERSCORED_NAMES:
      names.append(f"{match[1]}.{match[2]}")
    else:
      names.append(name)
  return names


def diffusers_pytorch_key(flax_path, legacy_vae_attention=False):
  """PyTorch state-dict key of a UNet/VAE Flax param path (a tuple of names).

  Args:
    flax_path: e.g. ("down_blocks_0", "attentions_0", "proj_in", "kernel").
    legacy_vae_attention: name the VAE attention's projections `query/key/value/proj_attn`
      (diffusers < 0.14 files) instead of `to_q/to_k/to_v/to_out.0`.
  Returns:
    e.g. "down_blocks.0.attentions.0.proj_in.weight".
  """
  leaf = flax_path[-1]
  if leaf not in _LEAF_NAMES:
    raise ValueError(f"Flax param {'/'.join(flax_path)}: leaf {leaf!r} is not one of "
                     f"{sorted(_LEAF_NAMES)}")
  return ".".join(_module_names(flax_path, legacy_vae_attention) + [_LEAF_NAMES[leaf]])


def _to_pytorch_layout(flax_path, value):
  """A Flax leaf in PyTorch layout (float32, contiguous)."""
  value = np.asarray(value, dtype=np.float32)
  if flax_path[-1] == "kernel" and value.ndim == _CONV_KERNEL_NDIM:
    value = value.transpose(_HWIO_TO_OIHW)
  elif flax_path[-1] == "kernel" and value.ndim == _DENSE_KERNEL_NDIM:
    value = value.T
  return np.ascontiguousarray(value)


def _to_flax_layout(flax_path, tensor, expected_ndim):
  """A PyTorch tensor in the Flax layout of a leaf whose Flax rank is `expected_ndim`."""
  tensor = np.asarray(tensor)
  if flax_path[-1] != "kernel":
    return tensor
  if expected_ndim == _DENSE_KERNEL_NDIM and tensor.ndim == _CONV_KERNEL_NDIM and (
      tensor.shape[2:] == (1, 1)):
    tensor = tensor[:, :, 0, 0]  # a 1x1 conv weight stored for a linear map
  if tensor.ndim == _CONV_KERNEL_NDIM:
    return tensor.transpose(_OIHW_TO_HWIO)
  if tensor.ndim == _DENSE_KERNEL_NDIM:
    return tensor.T
  return tensor


def flax_to_pytorch(params, key_fn=diffusers_pytorch_key):
  """Flax UNet/VAE params -> flat PyTorch state dict (float32 NumPy, PyTorch layouts).

  Args:
    params: nested dict of arrays (the module's tree).
    key_fn: Flax path -> PyTorch key (`diffusers_pytorch_key`).
  Returns:
    {pytorch_key: np.ndarray}, loadable by diffusers' `UNet2DConditionModel` / `AutoencoderKL`.
  """
  state_dict = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    key = key_fn(path)
    if key in state_dict:
      raise ValueError(f"two Flax params map to the PyTorch key {key!r}; expected unique names")
    state_dict[key] = _to_pytorch_layout(path, value)
  return state_dict


def expected_param_shapes(module):
  """{flax_path: ShapeDtypeStruct} of `module.init_weights` (shapes only, nothing computed)."""
  return flax.traverse_util.flatten_dict(
      jax.eval_shape(module.init_weights, jax.random.key(0)))


def _state_dict_key(flax_path, state_dict):
  """The key of `flax_path` in `state_dict`: the current name, else the legacy VAE one if present.

  Returns the current name when neither is present (the caller reports it missing).
  """
  key = diffusers_pytorch_key(flax_path)
  if key not in state_dict and len(flax_path) > 1 and flax_path[-2] in _VAE_ATTENTION_NAMES:
    legacy_key = diffusers_pytorch_key(flax_path, legacy_vae_attention=True)
    if legacy_key in state_dict:
      return legacy_key
  return key


def diffusers_pytorch_to_flax(state_dict, module, source):
  """A diffusers PyTorch UNet/VAE state dict -> the module's Flax params, in NumPy.

  Args:
    state_dict: {pytorch_key: np.ndarray} (e.g. `safetensors.numpy.load_file`).
    module: a `unet.UNet2DConditionModel` or `vae.AutoencoderKL` (anything with `init_weights`).
    source: a name for error messages (the file path).
  Returns:
    nested dict of float32 NumPy arrays in Flax layout, with exactly the module's tree.
  Raises:
    ValueError (one line): the first missing key, unexpected key, or wrong shape.
  """
  expected = expected_param_shapes(module)
  keys = {path: _state_dict_key(path, state_dict) for path in expected}
  missing = sorted(path for path, key in keys.items() if key not in state_dict)
  if missing:
    raise ValueError(f"{source}: missing {keys[missing[0]]!r} (for Flax "
                     f"{'/'.join(missing[0])}; {len(missing)} of {len(expected)} parameters "
                     f"missing); expected a diffusers {type(module).__name__} state dict of this "
                     "config")
  unexpected = sorted(set(state_dict) - set(keys.values()))
  if unexpected:
    raise ValueError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} keys not in "
                     f"the {type(module).__name__} of this config)")
  flat = {}
  for path, struct in sorted(expected.items()):
    key = keys[path]
    value = _to_flax_layout(path, state_dict[key], len(struct.shape))
    if tuple(value.shape) != tuple(struct.shape):
      raise ValueError(f"{source}: {key!r} has shape {tuple(np.shape(state_dict[key]))}, which is "
                       f"{tuple(value.shape)} in Flax layout; expected {tuple(struct.shape)} for "
                       f"Flax {'/'.join(path)} (does the config match the weights?)")
    flat[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)
