"""Deterministic tiny random Stable-Diffusion-shaped pipeline, written in diffusers layout.

Shape legend: the tiny spec (configs/tiny.py `tiny_model_spec()`): 64x64x3 images, 4x8x8
latents (NCHW), text (B, 77, 32), a 32x32 CLIP image encoder with a 32-d projection.

Weights come from `jax.random` (a per-component `fold_in` of the seed key), scaled per leaf kind
(`_random_params`); biases and norm scales are random too (not 0 / 1), so parity tests exercise
them. The same
weights are written as Flax msgpack and as PyTorch-named safetensors
(`diffusers_weights.flax_to_pytorch` for the UNet/VAE, `convert.flax_to_pytorch` for CLIP).

CLI: `python -m tdpo_jax.models.tiny --out=DIR --seed=0 [--config=configs/tiny.py]
[--config.pretrained.tiny.unet.block_out_channels='(32, 64)' ...]`: the spec is the config's
`pretrained.tiny` (config flags, as `python -m tdpo_jax.main`).
"""
import json
import logging
import os
import shutil

import flax.traverse_util
import jax
import numpy as np
import transformers

from tdpo_jax.models import clip
from tdpo_jax.models import convert
from tdpo_jax.models import diffusers_weights
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import unet as unet_lib
from tdpo_jax.models import vae as vae_lib

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 512, 513  # ids in tiny_tokenizer/vocab.json
MAX_LENGTH = 77
# fold_in constants per component: distinct streams from one seed.
_COMPONENT_STREAMS = {"unet": 1, "vae": 2, "text_encoder": 3, "image_encoder": 4}
_BIAS_NOISE_STD = 0.05
_FORMATS = ("safetensors", "flax")
# Written as `_diffusers_version` in the configs: the diffusers release whose PyTorch classes read
# this layout (the parity tests' reference); the project itself imports no diffusers code.
DIFFUSERS_LAYOUT_VERSION = "0.42.1"


def _write_json(path, content):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as file:
    json.dump(content, file, indent=2, sort_keys=True)


def _to_dict(section):
  """A spec section (ConfigDict or dict) as a plain JSON-able dict (tuples -> lists)."""
  section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
  return json.loads(json.dumps(section, default=list))


def _random_params(init_fn, rng):
  """Deterministic random params with the shapes of `init_fn(rng)`, from one `jax.random` draw.

  Only shapes are traced (`jax.eval_shape`): running a Flax init executes (and compiles) the
  whole forward pass, ~20-30 s per model on a loaded CPU. One standard-normal vector is drawn
  and sliced per leaf in sorted path order, then scaled:
    kernel    N(0, 1/fan_in), fan_in = prod(shape[:-1]) (HWI of a conv, in of a dense)
    embedding N(0, 0.02^2)
    scale     1 + N(0, 0.05^2)
    others    N(0, 0.05^2) (biases, the CLIP class embedding)
  """
  shapes = sorted(convert.expected_param_shapes(init_fn, rng).items())
  sizes = [int(np.prod(struct.shape)) for _, struct in shapes]
  normal = np.asarray(jax.random.normal(rng, (sum(sizes),), jax.numpy.float32))
  result, offset = {}, 0
  for (path, struct), size in zip(shapes, sizes):
    values = normal[offset:offset + size].reshape(struct.shape)
    offset += size
    if path[-1] == "kernel":
      values = values / np.sqrt(np.prod(struct.shape[:-1]))
    elif path[-1] == "embedding":
      values = values * 0.02
    elif path[-1] == "scale":
      values = 1.0 + _BIAS_NOISE_STD * values
    else:
      values = _BIAS_NOISE_STD * values
    result[path] = values.astype(np.float32)
  return flax.traverse_util.unflatten_dict(result)


def _write_weights(directory, params, to_pytorch, file_names, formats):
  """Writes params as msgpack (Flax) and/or safetensors (PyTorch names and layouts).

  Args:
    to_pytorch: params -> flat PyTorch state dict (`diffusers_weights.flax_to_pytorch`, or
      `convert.flax_to_pytorch` with `convert.clip_pytorch_key`).
  """
  msgpack_name, safetensors_name = file_names
  if "flax" in formats:
    convert.save_msgpack(params, os.path.join(directory, msgpack_name))
  if "safetensors" in formats:
    convert.save_safetensors(to_pytorch(params), os.path.join(directory, safetensors_name))


def _clip_to_pytorch(params):
  return convert.flax_to_pytorch(params, convert.clip_pytorch_key)


def _write_tokenizer(directory):
  """CLIPTokenizer files: the byte-level 514-token vocab, no merges, bos/eos/pad tokens."""
  os.makedirs(directory, exist_ok=True)
  for name in ("vocab.json", "merges.txt"):
    shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(directory, name))
  special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
                    "unk_token": EOS_TOKEN}
  _write_json(os.path.join(directory, "special_tokens_map.json"), special_tokens)
  _write_json(os.path.join(directory, "tokenizer_config.json"), dict(
      special_tokens, model_max_length=MAX_LENGTH, tokenizer_class="CLIPTokenizer",
      do_lower_case=True, errors="replace", add_prefix_space=False))


def build_tiny_pipeline(out_dir, spec, seed=0, formats=_FORMATS):
  """Writes a full diffusers-format tiny pipeline directory with deterministic random weights.

  Args:
    out_dir: directory to write (created; existing files are overwritten).
    spec: ConfigDict/dict with sections vae, unet, text_encoder, image_encoder, scheduler
      (configs/tiny.py `tiny_model_spec()`).
    seed: int; the same seed gives bitwise-identical weights.
    formats: subset of ("safetensors", "flax").
  Returns:
    out_dir.
  """
  unknown = set(formats) - set(_FORMATS)
  if unknown or not formats:
    raise ValueError(f"unknown weight formats {sorted(unknown) or list(formats)}; expected a "
                     f"non-empty subset of {_FORMATS}")
  os.makedirs(out_dir, exist_ok=True)
  root_rng = jax.random.key(seed)
  version = DIFFUSERS_LAYOUT_VERSION

  def component_rng(name):
    return jax.random.fold_in(root_rng, _COMPONENT_STREAMS[name])

  # UNet and VAE (diffusers).
  for name, from_config, torch_class in (
      ("unet", unet_lib.from_diffusers_config, "UNet2DConditionModel"),
      ("vae", vae_lib.from_diffusers_config, "AutoencoderKL")):
    config = _to_dict(spec[name])
    module = from_config(config)
    params = _random_params(module.init_weights, component_rng(name))
    directory = os.path.join(out_dir, name)
    _write_json(os.path.join(directory, "config.json"),
                dict(config, _class_name=torch_class, _diffusers_version=version))
    _write_weights(directory, params, diffusers_weights.flax_to_pytorch,
                   diffusers_weights.DIFFUSERS_WEIGHTS, formats)

  # Text encoder (transformers CLIPTextModel).
  text_config = transformers.CLIPTextConfig(
      **_to_dict(spec["text_encoder"]), bos_token_id=BOS_ID, eos_token_id=EOS_ID,
      pad_token_id=EOS_ID)
  text_config.architectures = ["CLIPTextModel"]
  directory = os.path.join(out_dir, "text_encoder")
  os.makedirs(directory, exist_ok=True)
  text_config.to_json_file(os.path.join(directory, "config.json"))
  text_module = clip.ClipTextModel(clip.text_config(text_config))
  text_params = _random_params(lambda rng: clip.init_text_params(text_module, rng),
                               component_rng("text_encoder"))
  _write_weights(directory, text_params, _clip_to_pytorch, convert.TRANSFORMERS_WEIGHTS,
                 formats)

  # Image encoder (transformers CLIPVisionModelWithProjection) + CLIPImageProcessor config.
  vision_config = transformers.CLIPVisionConfig(**_to_dict(spec["image_encoder"]))
  vision_config.architectures = ["CLIPVisionModelWithProjection"]
  directory = os.path.join(out_dir, "image_encoder")
  os.makedirs(directory, exist_ok=True)
  vision_config.to_json_file(os.path.join(directory, "config.json"))
  size = vision_config.image_size
  encoder = image_encoder_lib.ImageEncoder(config=vision_config, resize_size=size, crop_size=size)
  encoder_params = _random_params(encoder.init_weights, component_rng("image_encoder"))
  _write_weights(directory, encoder_params, _clip_to_pytorch, convert.TRANSFORMERS_WEIGHTS,
                 formats)
  write_image_processor_config(directory, size)

  _write_tokenizer(os.path.join(out_dir, "tokenizer"))
  write_scheduler_and_index(out_dir, spec["scheduler"], version)
  return out_dir


def write_image_processor_config(directory, size):
  """`<directory>/preprocessor_config.json`: CLIP preprocessing (resize + crop to `size`)."""
  _write_json(os.path.join(directory, "preprocessor_config.json"), dict(
      image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": size},
      resample=3, do_center_crop=True, crop_size={"height": size, "width": size},
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=list(image_encoder_lib.CLIP_MEAN), image_std=list(image_encoder_lib.CLIP_STD),
      do_convert_rgb=True))


def write_scheduler_and_index(out_dir, scheduler_spec, version):
  """The DDIM `scheduler/scheduler_config.json` and the pipeline's `model_index.json`."""
  _write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"), dict(
      _to_dict(scheduler_spec), _class_name="DDIMScheduler", _diffusers_version=version))
  _write_json(os.path.join(out_dir, "model_index.json"), {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
      "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
      "safety_checker": [None, None], "feature_extractor": [None, None],
      "requires_safety_checker": False})


# The default --config of the CLI (what configs/tiny.py re-exports).
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "tiny.py")


def define_flags(flag_values, argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tdpo_jax import cli  # pylint: disable=g-import-not-at-top
  cli.define_config(flag_values, argv, CONFIG_PATH,
                    "A config whose pretrained.tiny is the spec (default: configs/tiny.py).")
  flags.DEFINE_string("out", None, "Output directory.", flag_values=flag_values)
  flags.DEFINE_integer("seed", 0, "Weights seed.", flag_values=flag_values)
  flags.DEFINE_list("formats", list(_FORMATS), "Comma-separated subset of safetensors,flax.",
                    flag_values=flag_values)


def main(argv=None):
  """`argv`: the arguments without the program name (None: sys.argv[1:])."""
  from tdpo_jax import cli  # pylint: disable=g-import-not-at-top
  values, positional = cli.parse(argv, define_flags, "python -m tdpo_jax.models.tiny")
  if positional or not values["out"].value:
    raise SystemExit("error: expected --out=DIR (and optionally --seed, --config, --formats)")
  spec = values["config"].value.pretrained.tiny
  if spec is None:
    raise SystemExit(f"error: {values['config'].config_filename}: pretrained.tiny is None; "
                     "expected a config with a tiny spec (configs/tiny.py)")
  build_tiny_pipeline(values["out"].value, spec, seed=values["seed"].value,
                      formats=tuple(name for name in values["formats"].value if name))
  logging.info("wrote tiny pipeline (seed %d) to %s", values["seed"].value, values["out"].value)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  main()
