"""Reward checkpoints as flat state dicts: the PyTorch shapes a model expects, the one-line
check of a state dict against them, and reading the converted `.safetensors` files.

Shape legend: PyTorch dense weights are (out, in), conv weights OIHW; Flax dense kernels are
(in, out), conv kernels HWIO. A flat state dict is `{"a.b.weight": np.ndarray}`.

The reward models (`aesthetic`, `clip_model`, `hpsv2`, `image_reward`) validate and read their
weights with these functions; the one-off pickle -> safetensors command that writes the files is
`convert` (which imports the reward models, never the other way round).
"""
import os

import numpy as np

from tdpo_jax.models import convert as model_convert


def pytorch_shape(flax_path, shape):
  """PyTorch shape of one Flax leaf: dense kernels transposed, conv kernels HWIO -> OIHW."""
  shape = tuple(shape)
  if flax_path[-1] == "kernel" and len(shape) == 2:
    return shape[::-1]
  if flax_path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return shape


def pytorch_shapes(flax_shapes):
  """{pytorch_key: shape} of a CLIP Flax module's params, in the Flax param order.

  Args:
    flax_shapes: {flax_path: ShapeDtypeStruct} (`models.convert.expected_param_shapes`).
  """
  return {model_convert.clip_pytorch_key(path): pytorch_shape(path, struct.shape)
          for path, struct in flax_shapes.items()}


def check_state_dict(state_dict, expected, source, architecture):
  """Raises a one-line ValueError naming the first expected key missing or of another shape.

  Args:
    state_dict: {key: array} as read from the checkpoint.
    expected: ordered {key: shape}; extra checkpoint keys are allowed (buffers, unused heads).
    source: the checkpoint's file name, for the message.
    architecture: what the checkpoint should be, e.g. "the LAION aesthetic MLP".
  """
  for key, shape in expected.items():
    if key not in state_dict:
      raise ValueError(f"{source}: missing key {key!r} (shape {tuple(shape)}); expected "
                       f"{architecture} checkpoint")
    actual = tuple(np.shape(state_dict[key]))
    if actual != tuple(shape):
      raise ValueError(f"{source}: key {key!r} has shape {actual}, expected {tuple(shape)} for "
                       f"{architecture}")


def load_converted(path, kind, what):
  """The state dict of a converted `.safetensors` file; refuses pickles with the command to run.

  Args:
    path: the file given in the config.
    kind: the converter name (`aesthetic`, `hpsv2`) for the printed command.
    what: how the error names the file ("aesthetic MLP", "hpsv2 checkpoint").
  """
  if not path.endswith(".safetensors"):
    raise ValueError(f"{what} {path!r} is not a .safetensors file; convert the published pickle "
                     f"once with: python -m tdpo_jax.rewards.convert {kind} --src={path} "
                     f"--out={kind}.safetensors")
  if not os.path.isfile(path):
    raise ValueError(f"{what} not found: {path!r}; expected the safetensors written by "
                     f"python -m tdpo_jax.rewards.convert {kind}")
  return model_convert.load_safetensors(path)


def unwrap_state_dict(checkpoint, source):
  """The flat state dict inside a loaded checkpoint: `{"state_dict": ...}` and `module.` prefixes
  (HPSv2 saves `{"state_dict": ..., "epoch": ...}` from DDP training) are removed."""
  if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
    checkpoint = checkpoint["state_dict"]
  if not isinstance(checkpoint, dict) or not checkpoint:
    raise ValueError(f"{source}: expected a (non-empty) state dict of tensors, got "
                     f"{type(checkpoint).__name__}")
  if all(key.startswith("module.") for key in checkpoint):
    checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
  return checkpoint
