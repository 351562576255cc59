"""PyTorch-safetensors <-> Flax parameter conversion in NumPy (no torch import).

Shape legend: conv kernels are OIHW (out, in, height, width) in PyTorch and HWIO in Flax; dense
kernels are (out, in) in PyTorch and (in, out) in Flax. Norm weights are `weight` in PyTorch and
`scale` in Flax; embedding tables are `weight` in PyTorch and `embedding` in Flax.

Two naming families:
  * diffusers (UNet, VAE): Flax module lists are `down_blocks_0`, PyTorch `down_blocks.0`, except
    names that are genuinely underscored in PyTorch (`linear_1`, `linear_2`). The Flax VAE
    attention uses `query/key/value/proj_attn` where PyTorch has `to_q/to_k/to_v/to_out.0`.
    PyTorch -> Flax uses diffusers' own `convert_pytorch_state_dict_to_flax`.
  * transformers CLIP (text and vision towers): the same dotted path on both sides (layer lists
    are `layers/0` in Flax), only the leaf names and layouts differ.

A flat state dict is `{"a.b.weight": np.ndarray}`; Flax params are nested dicts of arrays.
"""
import os
import re
import tempfile

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import safetensors.numpy
from diffusers.models import modeling_flax_pytorch_utils

# Flax leaf name -> PyTorch leaf name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# PyTorch module names that really end in `_<digit>` (not a list index).
_UNDERSCORED_NAMES = frozenset({"linear_1", "linear_2"})
# The Flax VAE attention block's projections (diffusers >= 0.19 PyTorch names).
_VAE_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class _NumpyTensor:
  """Wraps an array so diffusers' converter can call `.numpy()` on it as on a torch tensor."""

  def __init__(self, array):
    self.array = array

  def numpy(self):
    return self.array


class _ShapeOnlyModel:
  """Stands in for a Flax model in diffusers' converter: `init_weights` returns only shapes.

  The converter only reads `.shape` and the key set of the random init, so `jax.eval_shape`
  avoids materialising (and computing) a full random initialisation.
  """

  def __init__(self, module):
    self.module = module

  def init_weights(self, rng):
    return jax.eval_shape(self.module.init_weights, rng)


def _flax_leaf_to_pytorch(flax_path, value):
  """Returns (PyTorch leaf name, tensor in PyTorch layout) for one Flax leaf."""
  leaf = flax_path[-1]
  value = np.asarray(value)
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T  # (in, out) -> (out, in)
  return _LEAF_NAMES.get(leaf, leaf), value


def diffusers_pytorch_key(flax_path):
  """PyTorch state-dict key of a diffusers UNet/VAE Flax param path (a tuple of names)."""
  modules = []
  for index, name in enumerate(flax_path[:-1]):
    is_parent_of_leaf = index == len(flax_path) - 2
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if is_parent_of_leaf and name in _VAE_ATTENTION_NAMES:
      modules.append(_VAE_ATTENTION_NAMES[name])
    elif match and name not in _UNDERSCORED_NAMES:
      modules.append(f"{match[1]}.{match[2]}")
    else:
      modules.append(name)
  leaf, _ = _flax_leaf_to_pytorch(flax_path, np.zeros(()))
  return ".".join(modules + [leaf])


def clip_pytorch_key(flax_path):
  """PyTorch state-dict key of a transformers CLIP Flax param path (a tuple of names)."""
  leaf, _ = _flax_leaf_to_pytorch(flax_path, np.zeros(()))
  return ".".join(list(flax_path[:-1]) + [leaf])


def flax_to_pytorch(params, key_fn):
  """Flax params -> flat PyTorch state dict (NumPy float32, contiguous).

  Args:
    params: nested dict of arrays (Flax layout).
    key_fn: `diffusers_pytorch_key` or `clip_pytorch_key`.
  Returns:
    {pytorch_key: np.ndarray in PyTorch layout}.
  """
  state_dict = {}
  for path, value in flax.traverse_util.flatten_dict(params).items():
    _, tensor = _flax_leaf_to_pytorch(path, value)
    key = key_fn(path)
    if key in state_dict:
      raise ValueError(f"two Flax params map to the PyTorch key {key!r}; expected unique names")
    state_dict[key] = np.ascontiguousarray(tensor, dtype=np.float32)
  return state_dict


def _check_and_cast(flat_params, expected_shapes, source):
  """Checks converted params against the model's expected shapes; casts to float32.

  Extra keys (e.g. a full CLIP checkpoint's text tower under an image encoder) are dropped.
  """
  missing = [path for path in expected_shapes if path not in flat_params]
  if missing:
    names = ", ".join("/".join(path) for path in missing[:3])
    raise ValueError(
        f"{source}: {len(missing)} parameters missing (e.g. {names}); expected the model's full "
        "parameter set")
  result = {}
  for path, struct in expected_shapes.items():
    value = np.asarray(flat_params[path])
    if tuple(value.shape) != tuple(struct.shape):
      raise ValueError(
          f"{source}: parameter {'/'.join(path)} has shape {value.shape}, expected {struct.shape}")
    result[path] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return flax.traverse_util.unflatten_dict(result)


def expected_param_shapes(init_fn, *args):
  """{flax_path: ShapeDtypeStruct} of `init_fn(*args)` (e.g. `module.init_weights, rng`)."""
  return flax.traverse_util.flatten_dict(jax.eval_shape(init_fn, *args))


def diffusers_pytorch_to_flax(state_dict, module, source):
  """PyTorch UNet/VAE state dict -> Flax params, via diffusers' converter, in NumPy.

  Args:
    state_dict: {pytorch_key: np.ndarray}.
    module: the diffusers Flax module (`FlaxUNet2DConditionModel`, `FlaxAutoencoderKL`).
    source: file name used in error messages.
  Returns:
    nested dict of float32 NumPy arrays in Flax layout.
  """
  wrapped = {key: _NumpyTensor(np.asarray(value)) for key, value in state_dict.items()}
  converted = modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax(
      wrapped, _ShapeOnlyModel(module))
  flat = {path: np.asarray(value) for path, value in
          flax.traverse_util.flatten_dict(converted).items()}
  expected = expected_param_shapes(module.init_weights, jax.random.key(0))
  return _check_and_cast(flat, expected, source)


def clip_pytorch_to_flax(state_dict, expected_shapes, source):
  """PyTorch CLIP (text or vision) state dict -> Flax params, driven by the Flax param names.

  Args:
    state_dict: {pytorch_key: np.ndarray}.
    expected_shapes: {flax_path: ShapeDtypeStruct} of the Flax module's params.
    source: file name used in error messages.
  Returns:
    nested dict of float32 NumPy arrays in Flax layout.
  """
  flat = {}
  for path in expected_shapes:
    key = clip_pytorch_key(path)
    if key not in state_dict:
      continue  # reported by _check_and_cast
    value = np.asarray(state_dict[key])
    if path[-1] == "kernel" and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif path[-1] == "kernel" and value.ndim == 2:
      value = value.T
    flat[path] = value
  return _check_and_cast(flat, expected_shapes, source)


def check_params(params, expected_shapes, source):
  """Validates loaded (e.g. msgpack) params against expected shapes; float32 NumPy out."""
  return _check_and_cast(flax.traverse_util.flatten_dict(params), expected_shapes, source)


def load_safetensors(path):
  """{key: np.ndarray} from a safetensors file (NumPy only)."""
  return safetensors.numpy.load_file(path)


def save_safetensors(state_dict, path):
  """Writes a PyTorch-style safetensors file (metadata format=pt, as `save_pretrained` does)."""
  safetensors.numpy.save_file(state_dict, path, metadata={"format": "pt"})


def load_msgpack(path):
  """Nested dict of NumPy arrays from a Flax msgpack file (`flax.serialization.to_bytes`)."""
  with open(path, "rb") as file:
    return flax.serialization.msgpack_restore(file.read())


def save_msgpack(params, path):
  """Writes params as Flax msgpack, atomically (temp file in the same folder + rename)."""
  params = jax.tree.map(np.asarray, params)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(flax.serialization.msgpack_serialize(params))
    os.chmod(temp_path, 0o644)  # mkstemp creates 0600
    os.replace(temp_path, path)
  except BaseException:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    raise
