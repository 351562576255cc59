"""Loading a Stable-Diffusion-shaped pipeline (diffusers directory layout) into Flax modules.

Shape legend: B batch, L text length (77), D text hidden width, C/h/w latent channels/height/
width, H/W image height/width. Latents are NCHW at this API (the UNet transposes to NHWC inside);
the VAE is NHWC in and out (`decode_latents` transposes the latents once); images are NHWC
float32 in [0,1].

The networks are the project's own Flax modules (`unet`, `vae`, `clip`); diffusers and
transformers provide only the directory layout, the configs and the CLIP tokenizer.

A model spec is one of
  * a local diffusers-format directory: model_index.json, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/ and optionally image_encoder/;
  * "tiny:<seed>": a tiny random pipeline built once (`tiny.build_tiny_pipeline`) into a cache dir;
  * a hub id ("org/name"): downloaded with `huggingface_hub.snapshot_download`.
Each component dir holds Flax msgpack weights, or PyTorch safetensors that are converted in
NumPy (no torch, `diffusers_weights` for the UNet/VAE, `convert` for CLIP) and cached as msgpack
for the next load.
"""
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from tdpo_jax.models import clip
from tdpo_jax.models import convert
from tdpo_jax.models import diffusers_weights
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import unet as unet_lib
from tdpo_jax.models import vae as vae_lib

DIFFUSERS_WEIGHTS = diffusers_weights.DIFFUSERS_WEIGHTS
TRANSFORMERS_WEIGHTS = convert.TRANSFORMERS_WEIGHTS
CONVERTED_NAME = "flax_converted.msgpack"
REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_SCALING_FACTOR = 0.18215
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.msgpack", "*/*.safetensors",
                 "tokenizer/*", "scheduler/*", "*/preprocessor_config.json"]
# A single transformers model repo (a CLIP image encoder or reward model): files at its root.
CLIP_HUB_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors",
                     "flax_model.msgpack", "vocab.json", "merges.txt", "tokenizer.json",
                     "tokenizer_config.json", "special_tokens_map.json"]


class ModelLoadError(ValueError):
  """A model spec, directory or weight file that cannot be loaded (one-line message)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
  """Static Flax module handles + frozen param pytrees of a text-to-image pipeline.

  `eq=False` keeps identity hashing (params are dicts), so a pipeline can be closed over or
  passed as a static argument to `jax.jit`.
  """
  unet: unet_lib.UNet2DConditionModel
  unet_params: dict
  vae: vae_lib.AutoencoderKL
  vae_params: dict
  text_encoder: clip.ClipTextModel
  text_encoder_params: dict
  tokenizer: transformers.CLIPTokenizer
  scheduler_config: dict
  image_encoder: image_encoder_lib.ImageEncoder | None
  image_encoder_params: dict | None
  vae_scaling_factor: float


# ---------------------------------------------------------------------------------------------
# Spec resolution.


def _spec_hash(tiny_spec):
  """Short stable hash of a tiny spec (ConfigDict or dict)."""
  as_dict = tiny_spec.to_dict() if hasattr(tiny_spec, "to_dict") else dict(tiny_spec)
  text = json.dumps(as_dict, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def _resolve_tiny(spec, cache_dir, tiny_spec):
  """Builds (once, atomically) and returns the directory of a "tiny:<seed>" spec."""
  match = re.fullmatch(r"tiny:(\d+)", spec)
  if match is None:
    raise ModelLoadError(f"malformed tiny model spec {spec!r}; expected 'tiny:<seed>' with an "
                         "integer seed, e.g. 'tiny:0'")
  if tiny_spec is None:
    raise ModelLoadError(f"model spec {spec!r} needs tiny_spec (the architecture, e.g. "
                         "configs/tiny.py tiny_model_spec()); got None")
  seed = int(match[1])
  root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tdpo_jax")
  directory = os.path.join(root, f"tiny-seed{seed}-{_spec_hash(tiny_spec)}")
  if os.path.isfile(os.path.join(directory, "model_index.json")):
    return directory
  # Imported here, not at the top: `models/__init__` imports this module, and a tiny imported
  # with the package would already be in sys.modules when run as `python -m tdpo_jax.models.tiny`.
  from tdpo_jax.models import tiny  # noqa: PLC0415
  os.makedirs(root, exist_ok=True)
  temp_dir = tempfile.mkdtemp(dir=root, prefix=".tmp-tiny-")
  try:
    tiny.build_tiny_pipeline(temp_dir, tiny_spec, seed=seed)
    try:
      os.rename(temp_dir, directory)
    except OSError:
      if not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise  # not a lost race with another builder
  finally:
    if os.path.exists(temp_dir):
      shutil.rmtree(temp_dir, ignore_errors=True)
  logging.info("built tiny pipeline %s", directory)
  return directory


def resolve_model_spec(spec, *, cache_dir="", tiny_spec=None, allow_patterns=None):
  """Local directory of a model spec: a directory, "tiny:<seed>" or a hub id.

  Args:
    allow_patterns: the files a hub id downloads; None = a diffusers pipeline's
      (`CLIP_HUB_PATTERNS` for a single transformers model).

  Raises:
    ModelLoadError: a missing directory, a malformed "tiny:" spec, or a failed download.
  """
  spec = str(spec)
  if spec.startswith("tiny:") or spec == "tiny":
    return _resolve_tiny(spec, cache_dir, tiny_spec)
  if os.path.isdir(spec):
    return spec
  looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None
  if not looks_like_hub_id or os.path.isabs(spec):
    raise ModelLoadError(f"model directory not found: {spec!r}; expected a diffusers-format "
                         "directory, 'tiny:<seed>' or a hub id 'org/name'")
  import huggingface_hub  # noqa: PLC0415  (only the hub path needs it)
  try:
    return huggingface_hub.snapshot_download(
        spec, allow_patterns=allow_patterns or _HUB_PATTERNS, cache_dir=cache_dir or None)
  except Exception as error:  # network, auth, not found: one line for the user.
    raise ModelLoadError(f"model spec {spec!r} is neither a local directory nor a downloadable "
                         f"hub id ({type(error).__name__})") from error


# ---------------------------------------------------------------------------------------------
# Weights.


def _subfolder(directory, name):
  """Path of a required component subfolder, or a one-line error."""
  path = os.path.join(directory, name)
  if not os.path.isdir(path):
    raise ModelLoadError(f"missing subfolder {path!r}; a pipeline directory needs "
                         f"{', '.join(REQUIRED_SUBFOLDERS)} (image_encoder optional)")
  return path


def _converted_cache_path(component_dir, source_path, cache_dir):
  """Where converted msgpack weights of `source_path` are cached."""
  if not cache_dir:
    return os.path.join(component_dir, CONVERTED_NAME)
  key = hashlib.sha256(os.path.abspath(source_path).encode()).hexdigest()[:16]
  name = os.path.basename(os.path.normpath(component_dir))
  return os.path.join(cache_dir, "converted", f"{name}-{key}.msgpack")


def _load_weights(component_dir, file_names, convert_fn, expected_shapes, cache_dir):
  """Params of one component: msgpack if present, else converted (and cached) safetensors.

  Args:
    component_dir: e.g. <pipeline>/unet.
    file_names: (msgpack name, safetensors name).
    convert_fn: state_dict, source -> params (Flax layout).
    expected_shapes: {flax_path: ShapeDtypeStruct} for validation.
    cache_dir: "" to cache next to the safetensors, else a cache root.
  Returns:
    nested dict of jnp float32 arrays.
  """
  msgpack_name, safetensors_name = file_names
  msgpack_path = os.path.join(component_dir, msgpack_name)
  safetensors_path = os.path.join(component_dir, safetensors_name)
  if os.path.isfile(msgpack_path):
    params = convert.check_params(convert.load_msgpack(msgpack_path), expected_shapes,
                                  msgpack_path)
  elif os.path.isfile(safetensors_path):
    cache_path = _converted_cache_path(component_dir, safetensors_path, cache_dir)
    cache_is_fresh = (os.path.isfile(cache_path) and
                      os.path.getmtime(cache_path) >= os.path.getmtime(safetensors_path))
    if cache_is_fresh:
      params = convert.check_params(convert.load_msgpack(cache_path), expected_shapes, cache_path)
    else:
      params = convert_fn(convert.load_safetensors(safetensors_path), safetensors_path)
      try:
        convert.save_msgpack(params, cache_path)
      except OSError as error:  # read-only model dir: still usable, just not cached.
        logging.warning("could not cache converted weights at %s: %s", cache_path, error)
  else:
    raise ModelLoadError(f"no weight file in {component_dir!r}; expected {msgpack_name} or "
                         f"{safetensors_name}")
  return jax.tree.map(jnp.asarray, params)


def _load_diffusers_component(directory, from_config, cache_dir):
  """(module, params, config values) of a diffusers UNet/VAE directory.

  Args:
    from_config: `unet.from_diffusers_config` or `vae.from_diffusers_config`.
  """
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise ModelLoadError(f"missing config file {config_path!r}; expected a diffusers config.json")
  values = _read_json(config_path)
  try:
    module = from_config(values)
  except (TypeError, ValueError) as error:
    raise ModelLoadError(f"{config_path}: {error}") from error
  expected = diffusers_weights.expected_param_shapes(module)

  def convert_fn(state_dict, source):
    return diffusers_weights.diffusers_pytorch_to_flax(state_dict, module, source)

  params = _load_weights(directory, DIFFUSERS_WEIGHTS, convert_fn, expected, cache_dir)
  return module, params, values


def _load_clip_component(directory, module, init_fn, cache_dir):
  """params of a transformers CLIP tower directory, for a given Flax module."""
  expected = convert.expected_param_shapes(init_fn, jax.random.key(0))

  def convert_fn(state_dict, source):
    return convert.clip_pytorch_to_flax(state_dict, expected, source)

  return _load_weights(directory, TRANSFORMERS_WEIGHTS, convert_fn, expected, cache_dir)


def _read_config(directory, config_class):
  """A transformers config from `directory/config.json`, or a one-line error."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise ModelLoadError(f"missing config file {config_path!r}; expected a transformers "
                         "config.json")
  return config_class.from_pretrained(directory)


def text_encoder_module(config):
  """The CLIP text module (`clip.ClipTextModel`, float32) of a `CLIPTextConfig`, dict or
  `clip.TextConfig`."""
  return clip.ClipTextModel(clip.text_config(config))


def text_encoder_init_fn(module):
  """rng -> random params of a CLIP text module (input (1, max_position_embeddings))."""
  return lambda rng: clip.init_text_params(module, rng)


def load_text_encoder(directory, cache_dir=""):
  """(clip.ClipTextModel, params) from a CLIPTextModel directory (msgpack or safetensors)."""
  config = _read_config(directory, transformers.CLIPTextConfig)
  module = text_encoder_module(config)
  return module, _load_clip_component(directory, module, text_encoder_init_fn(module), cache_dir)


def read_vision_config(directory):
  """The `clip.VisionConfig` (with the right `projection_dim`) of a CLIP directory.

  Accepts a CLIPModel directory (then `projection_dim` is the top-level one: transformers'
  `CLIPVisionConfig.from_pretrained` would return the vision sub-config's default 512) or a
  CLIPVisionModelWithProjection directory. transformers' config classes read the file (they
  fill the defaults a saved config omits).
  """
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise ModelLoadError(f"missing CLIP config {path!r}; expected a CLIPModel or "
                                      "CLIPVisionModelWithProjection config.json")
  with open(path) as file:
    model_type = json.load(file).get("model_type")
  if model_type == "clip":
    config = transformers.CLIPConfig.from_pretrained(directory)
    return dataclasses.replace(clip.vision_config(config.vision_config),
                               projection_dim=config.projection_dim)
  return clip.vision_config(transformers.CLIPVisionConfig.from_pretrained(directory))


def load_image_encoder(directory, cache_dir=""):
  """(ImageEncoder, params) from a CLIPVisionModelWithProjection (or CLIPModel) directory."""
  if not os.path.isdir(directory):
    raise ModelLoadError(f"image encoder directory not found: {directory!r}; expected a "
                         "CLIPVisionModelWithProjection directory")
  config = read_vision_config(directory)
  resize_size, crop_size, mean, std = image_encoder_lib.read_preprocessor_config(
      directory, config.image_size)
  module = image_encoder_lib.ImageEncoder(
      config=config, resize_size=resize_size, crop_size=crop_size, image_mean=mean,
      image_std=std)
  return module, _load_clip_component(directory, module, module.init_weights, cache_dir)


def abstract_pipeline(spec):
  """A `Pipeline` of `spec`'s architectures whose params are `jax.ShapeDtypeStruct`s (no weights).

  Args:
    spec: a `pretrained.tiny`-format spec (configs/tiny.py `tiny_model_spec()`,
      configs/sd15.py `sd15_architecture()`): unet, vae (with `scaling_factor`), text_encoder,
      image_encoder and scheduler sections.
  """
  rng = jax.random.key(0)
  unet = unet_lib.from_diffusers_config(dict(spec["unet"]))
  vae_config = dict(spec["vae"])
  scaling = vae_config.pop("scaling_factor", 0.18215)
  vae = vae_lib.from_diffusers_config(vae_config)
  text = text_encoder_module(dict(spec["text_encoder"]))
  vision = dict(spec["image_encoder"])
  encoder = image_encoder_lib.ImageEncoder(config=vision, resize_size=vision["image_size"],
                                           crop_size=vision["image_size"])
  return Pipeline(
      unet=unet, unet_params=jax.eval_shape(unet.init_weights, rng),
      vae=vae, vae_params=jax.eval_shape(vae.init_weights, rng),
      text_encoder=text,
      text_encoder_params=jax.eval_shape(text_encoder_init_fn(text), rng),
      tokenizer=None, scheduler_config=dict(spec["scheduler"]), image_encoder=encoder,
      image_encoder_params=jax.eval_shape(encoder.init_weights, rng),
      vae_scaling_factor=scaling)


def _read_json(path):
  with open(path) as file:
    return json.load(file)


def load_pipeline(spec, *, cache_dir="", image_encoder="", tiny_spec=None):
  """Loads a pipeline from a directory, "tiny:<seed>" or a hub id (see the module docstring).

  Args:
    spec: the model spec.
    cache_dir: root for built tiny pipelines and converted weights; "" = defaults
      (~/.cache/tdpo_jax for tiny pipelines, converted msgpack next to the safetensors).
    image_encoder: "" = the pipeline's image_encoder/ subfolder if present (else None), or an
      explicit CLIPVisionModelWithProjection directory / hub id.
    tiny_spec: architecture ConfigDict for "tiny:<seed>" (configs/tiny.py `tiny_model_spec()`).
  Returns:
    a `Pipeline` with float32 params.
  Raises:
    ModelLoadError: missing directory / subfolder / weight file, malformed spec.
  """
  directory = resolve_model_spec(spec, cache_dir=cache_dir, tiny_spec=tiny_spec)
  if not os.path.isfile(os.path.join(directory, "model_index.json")):
    raise ModelLoadError(f"missing {os.path.join(directory, 'model_index.json')!r}; expected a "
                         "diffusers-format pipeline directory")
  folders = {name: _subfolder(directory, name) for name in REQUIRED_SUBFOLDERS}
  if image_encoder:  # resolved first: a bad path fails before the slow loads.
    encoder_dir = resolve_model_spec(image_encoder, cache_dir=cache_dir,
                                     allow_patterns=CLIP_HUB_PATTERNS)
  else:
    encoder_dir = os.path.join(directory, "image_encoder")
    encoder_dir = encoder_dir if os.path.isdir(encoder_dir) else ""
  unet, unet_params, _ = _load_diffusers_component(
      folders["unet"], unet_lib.from_diffusers_config, cache_dir)
  vae, vae_params, vae_config = _load_diffusers_component(
      folders["vae"], vae_lib.from_diffusers_config, cache_dir)
  text_encoder, text_encoder_params = load_text_encoder(folders["text_encoder"], cache_dir)
  tokenizer_files = ("vocab.json", "merges.txt")
  for name in tokenizer_files:
    if not os.path.isfile(os.path.join(folders["tokenizer"], name)):
      raise ModelLoadError(f"missing {os.path.join(folders['tokenizer'], name)!r}; expected a "
                           f"CLIP tokenizer with {' and '.join(tokenizer_files)}")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(folders["tokenizer"])
  scheduler_path = os.path.join(folders["scheduler"], "scheduler_config.json")
  if not os.path.isfile(scheduler_path):
    raise ModelLoadError(f"missing {scheduler_path!r}; expected a diffusers scheduler config")
  scheduler_config = _read_json(scheduler_path)

  encoder, encoder_params = (load_image_encoder(encoder_dir, cache_dir) if encoder_dir
                             else (None, None))
  return Pipeline(
      unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params,
      text_encoder=text_encoder, text_encoder_params=text_encoder_params, tokenizer=tokenizer,
      scheduler_config=scheduler_config, image_encoder=encoder,
      image_encoder_params=encoder_params,
      vae_scaling_factor=float(vae_config.get("scaling_factor", DEFAULT_SCALING_FACTOR)))


# ---------------------------------------------------------------------------------------------
# Pure helpers (jittable).


PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name):
  """The jnp dtype of a `config.precision` value; a clear error for anything else."""
  if name not in PRECISIONS:
    raise ValueError(f"precision {name!r}: expected one of {sorted(PRECISIONS)}")
  return PRECISIONS[name]


def with_precision(pipeline, *, unet="float32", frozen="float32"):
  """The pipeline with its modules computing in the given dtypes; parameters are untouched.

  The modules cast their (float32) parameters and inputs to the module's `dtype` per op, so a
  bfloat16 module over float32 parameters is bf16 compute with fp32 master weights: gradients
  still reach the float32 parameters. The outputs of `encode_text`, `unet_eps`,
  `decode_latents` and `image_encoder.embed_images` are cast back to float32, so everything
  around the networks (DDIM step, log-probabilities, losses) stays float32.

  Args:
    unet: compute dtype name of the UNet ("float32" or "bfloat16").
    frozen: compute dtype name of the text encoder, VAE and image encoder.
  """
  unet_dtype, frozen_dtype = compute_dtype(unet), compute_dtype(frozen)
  if unet_dtype == jnp.float32 and frozen_dtype == jnp.float32:
    return pipeline
  image_encoder = pipeline.image_encoder
  if image_encoder is not None:
    image_encoder = image_encoder.clone(dtype=frozen_dtype)
  return dataclasses.replace(
      pipeline, unet=pipeline.unet.clone(dtype=unet_dtype),
      vae=pipeline.vae.clone(dtype=frozen_dtype),
      text_encoder=pipeline.text_encoder.clone(dtype=frozen_dtype),
      image_encoder=image_encoder)


def tokenize(tokenizer, prompts):
  """Token ids, padded to max_length (77) and truncated.

  Args:
    tokenizer: a `transformers.CLIPTokenizer`.
    prompts: list of B strings.
  Returns:
    np.int32 (B, L).
  """
  encoded = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="np")
  return np.asarray(encoded.input_ids, dtype=np.int32)


def encode_text(pipeline, text_params, input_ids):
  """CLIP text embeddings (last_hidden_state) used as UNet context.

  Args:
    pipeline: a `Pipeline`.
    text_params: the text encoder's params.
    input_ids: (B, L) int token ids.
  Returns:
    (B, L, D) float32.
  """
  input_ids = jnp.asarray(input_ids, jnp.int32)
  position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  outputs = pipeline.text_encoder.apply({"params": text_params}, input_ids,
                                        position_ids=position_ids)
  return outputs.last_hidden_state.astype(jnp.float32)


def unet_eps(pipeline, unet_params, latents, timesteps, context):
  """Noise prediction eps(x_t, t, c).

  Args:
    pipeline: a `Pipeline`.
    unet_params: UNet params (LoRA already merged).
    latents: (B, C, h, w) NCHW.
    timesteps: (B,) or scalar; broadcast to a jnp array of shape (B,).
    context: (B, L, D) text embeddings.
  Returns:
    (B, C, h, w) NCHW.
  """
  timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (latents.shape[0],))
  return pipeline.unet.apply({"params": unet_params}, latents, timesteps,
                             context).astype(latents.dtype)


def decode_latents(pipeline, vae_params, latents):
  """VAE decode of SD latents to images: `x = D(z / scaling)`, `(x/2 + 0.5).clip(0, 1)`.

  Args:
    pipeline: a `Pipeline`.
    vae_params: VAE params.
    latents: (B, C, h, w) NCHW (scaled, as the UNet sees them).
  Returns:
    images (B, H, W, 3) NHWC float32 in [0, 1].
  """
  latents = jnp.transpose(latents / pipeline.vae_scaling_factor, (0, 2, 3, 1))  # NCHW -> NHWC
  images = pipeline.vae.apply({"params": vae_params}, latents, method=pipeline.vae.decode)
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
