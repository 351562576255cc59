"""PyTorch-safetensors <-> Flax parameter conversion in NumPy (no torch import).

Shape legend: conv kernels are OIHW (out, in, height, width) in PyTorch and HWIO in Flax; dense
kernels are (out, in) in PyTorch and (in, out) in Flax. Norm weights are `weight` in PyTorch and
`scale` in Flax; embedding tables are `weight` in PyTorch and `embedding` in Flax.

Here: transformers CLIP (text and vision towers), whose Flax and PyTorch names are the same
dotted path (layer lists are `layers/0` in Flax), only the leaf names and layouts differ; and
the msgpack / safetensors file IO. The diffusers UNet/VAE naming is `diffusers_weights`.

A flat state dict is `{"a.b.weight": np.ndarray}`; Flax params are nested dicts of arrays.
"""
import os
import tempfile

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import safetensors.numpy

# A transformers model directory's weight files (text_encoder/, image_encoder/, a CLIP model), in
# the order a loader tries them.
TRANSFORMERS_WEIGHTS = ("flax_model.msgpack", "model.safetensors")
# Flax leaf name -> PyTorch leaf name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
# The top-level Flax scopes of the CLIP towers, which PyTorch keys may omit (see
# `clip_pytorch_to_flax`).
_TOWER_PREFIXES = ("text_model", "vision_model")


def _flax_leaf_to_pytorch(flax_path, value):
  """Returns (PyTorch leaf name, tensor in PyTorch layout) for one Flax leaf."""
  leaf = flax_path[-1]
  value = np.asarray(value)
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T  # (in, out) -> (out, in)
  return _LEAF_NAMES.get(leaf, leaf), value


def clip_pytorch_key(flax_path):
  """PyTorch state-dict key of a transformers CLIP Flax param path (a tuple of names)."""
  leaf, _ = _flax_leaf_to_pytorch(flax_path, np.zeros(()))
  return ".".join(list(flax_path[:-1]) + [leaf])


def flax_to_pytorch(params, key_fn):
  """Flax params -> flat PyTorch state dict (NumPy float32, contiguous).

  Args:
    params: nested dict of arrays (Flax layout).
    key_fn: Flax path -> PyTorch key (`clip_pytorch_key`).
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


def clip_pytorch_to_flax(state_dict, expected_shapes, source):
  """PyTorch CLIP (text or vision) state dict -> Flax params, driven by the Flax param names.

  A tower's keys are read with their `text_model.` / `vision_model.` prefix (the hub's files,
  transformers < 5) or without it (transformers 5 saves `CLIPTextModel` / `CLIPVisionModel`
  without the wrapper's prefix).

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
    if key not in state_dict and path[0] in _TOWER_PREFIXES:
      key = clip_pytorch_key(path[1:])
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
