"""Reward checkpoints: state-dict validation, and the one-off pickle -> safetensors command.

Shape legend: PyTorch dense weights are (out, in), conv weights OIHW; Flax dense kernels are
(in, out), conv kernels HWIO. A flat state dict is `{"a.b.weight": np.ndarray}`.

Published reward weights that exist only as pickles are converted ONCE, explicitly, with torch
(imported only inside the command) and `torch.load(weights_only=True)`; the training run reads
the safetensors output and never unpickles (DESIGN §5):

  python -m tdpo_jax.rewards.convert aesthetic --src=sac+logos+ava1-l14-linearMSE.pth \
      --out=aesthetic_mlp.safetensors
  python -m tdpo_jax.rewards.convert hpsv2 --src=HPS_v2_compressed.pt --out=hpsv2.safetensors \
      [--clip_config=DIR]   # DIR: a CLIPModel config.json (laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
  python -m tdpo_jax.rewards.convert image_reward --src=ImageReward.pt \
      --out=image_reward.safetensors
  python -m tdpo_jax.rewards.convert state_dict --src=pytorch_model.bin --out=model.safetensors

`aesthetic`, `hpsv2` and `image_reward` validate the keys and shapes they will need (naming the
first bad key); `state_dict` only unwraps and rewrites (e.g. a CLIPModel `pytorch_model.bin` for
PickScore). Keys are kept as they are (open_clip names for HPSv2), so the file stays usable by
PyTorch; `image_reward` writes only the keys its model reads (not `blip.vision_proj`, buffers).
"""
import argparse
import importlib
import logging
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


def _load_pickle_state_dict(path):
  """{key: float32/int np.ndarray} of a torch pickle, loaded with `weights_only=True`."""
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint not found: {path!r}; expected a .pt/.pth/.bin file")
  torch = importlib.import_module("torch")  # conversion-only dependency, never at run time
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  state_dict = unwrap_state_dict(checkpoint, path)
  arrays = {}
  for key, value in state_dict.items():
    if not hasattr(value, "detach"):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}; expected tensors only")
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    arrays[key] = np.array(value.numpy())  # a C-contiguous copy; keeps 0-d (logit_scale) 0-d
  return arrays


KINDS = ("aesthetic", "hpsv2", "image_reward", "state_dict")


def _validate(kind, state_dict, source, clip_config):
  """Checks a state dict for `kind` before writing it (aesthetic and image_reward always, hpsv2
  with a config); returns what to write (image_reward: only the keys its model reads)."""
  if kind == "image_reward":
    from tdpo_jax.rewards import image_reward  # noqa: PLC0415  (image_reward imports this module)
    return image_reward.checkpoint_subset(state_dict, source)
  if kind == "aesthetic":
    from tdpo_jax.rewards import aesthetic  # noqa: PLC0415  (aesthetic imports this module)
    first = state_dict.get("layers.0.weight")  # d from the file; CLIP-L/14's 768 if absent
    input_dim = np.shape(first)[1] if first is not None and np.ndim(first) == 2 else 768
    check_state_dict(state_dict, aesthetic.mlp_pytorch_shapes(input_dim), source,
                     "the LAION aesthetic MLP")
  elif kind == "hpsv2" and clip_config:
    from tdpo_jax.rewards import clip_model, open_clip_keys  # noqa: PLC0415
    config = clip_model.read_clip_config(clip_config)
    check_state_dict(state_dict, open_clip_keys.expected_open_clip_shapes(config), source,
                     "an open_clip CLIP (HPSv2)")
  return state_dict


def convert_pickle(kind, src, out, clip_config=""):
  """Unpickles `src` (weights only), validates it for `kind`, writes safetensors to `out`.

  Args:
    kind: one of `KINDS`.
    src: the published .pt/.pth/.bin file.
    out: the .safetensors file to write.
    clip_config: for hpsv2, an optional CLIPModel directory to validate the shapes against.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; expected one of {', '.join(KINDS)}")
  if not out.endswith(".safetensors"):
    raise ValueError(f"--out={out!r}; expected a path ending in .safetensors")
  state_dict = _validate(kind, _load_pickle_state_dict(src), src, clip_config)
  folder = os.path.dirname(os.path.abspath(out))
  os.makedirs(folder, exist_ok=True)
  temp_path = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(out)}")
  try:
    model_convert.save_safetensors(state_dict, temp_path)
    os.replace(temp_path, out)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("kind", choices=KINDS)
  parser.add_argument("--src", required=True, help="published .pt/.pth/.bin checkpoint")
  parser.add_argument("--out", required=True, help="output .safetensors file")
  parser.add_argument("--clip_config", default="",
                      help="hpsv2: CLIPModel directory whose config.json gives the architecture")
  args = parser.parse_args(argv)
  convert_pickle(args.kind, args.src, args.out, args.clip_config)
  logging.info("wrote %s", args.out)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  main()
