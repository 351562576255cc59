"""The one-off pickle -> safetensors command for reward checkpoints.

A flat state dict is `{"a.b.weight": np.ndarray}`; the shape checks and the reading of the
converted files are `state_dicts` (which the reward models import; this command imports them).

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
import importlib
import logging
import os

import numpy as np

from tdpo_jax.models import convert as model_convert
from tdpo_jax.rewards import aesthetic
from tdpo_jax.rewards import clip_model
from tdpo_jax.rewards import image_reward
from tdpo_jax.rewards import open_clip_keys
from tdpo_jax.rewards import state_dicts


def _load_pickle_state_dict(path):
  """{key: float32/int np.ndarray} of a torch pickle, loaded with `weights_only=True`."""
  if not os.path.isfile(path):
    raise ValueError(f"checkpoint not found: {path!r}; expected a .pt/.pth/.bin file")
  torch = importlib.import_module("torch")  # conversion-only dependency, never at run time
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  state_dict = state_dicts.unwrap_state_dict(checkpoint, path)
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
    return image_reward.checkpoint_subset(state_dict, source)
  if kind == "aesthetic":
    first = state_dict.get("layers.0.weight")  # d from the file; CLIP-L/14's 768 if absent
    input_dim = np.shape(first)[1] if first is not None and np.ndim(first) == 2 else 768
    state_dicts.check_state_dict(state_dict, aesthetic.mlp_pytorch_shapes(input_dim), source,
                                 "the LAION aesthetic MLP")
  elif kind == "hpsv2" and clip_config:
    config = clip_model.read_clip_config(clip_config)
    state_dicts.check_state_dict(state_dict, open_clip_keys.expected_open_clip_shapes(config),
                                 source, "an open_clip CLIP (HPSv2)")
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


def define_flags(flag_values, argv):
  del argv
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string("src", None, "Published .pt/.pth/.bin checkpoint.", flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output .safetensors file.", flag_values=flag_values)
  flags.DEFINE_string("clip_config", "", "hpsv2: CLIPModel directory whose config.json gives the "
                      "architecture.", flag_values=flag_values)


def main(argv=None):
  """`argv`: KIND and the flags, without the program name (None: sys.argv[1:])."""
  from tdpo_jax import cli  # noqa: PLC0415
  values, positional = cli.parse(argv, define_flags, "python -m tdpo_jax.rewards.convert")
  if len(positional) != 1 or positional[0] not in KINDS:
    raise SystemExit(f"error: got arguments {positional}; expected one KIND of {list(KINDS)} "
                     "before the flags")
  for name in ("src", "out"):
    if not values[name].value:
      raise SystemExit(f"error: --{name} is required")
  convert_pickle(positional[0], values["src"].value, values["out"].value,
                 values["clip_config"].value)
  logging.info("wrote %s", values["out"].value)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  main()
