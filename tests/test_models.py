"""Tests for tdpo_jax.models: tiny builder, torch-free loading, PyTorch parity, errors.

Shape legend: B batch, L = 77 tokens, latents (B,4,8,8) NCHW, images (B,64,64,3) NHWC in [0,1],
image-encoder pixel_values (B,3,32,32) NCHW.
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax.configs import tiny as tiny_config
from tdpo_jax.models import convert
from tdpo_jax.models import diffusers_weights
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.models import tiny

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder")


@pytest.fixture(scope="module")
def tiny_spec():
  return tiny_config.tiny_model_spec()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_spec):
  """Tiny pipeline, seed 0, both weight formats."""
  return tiny.build_tiny_pipeline(str(tmp_path_factory.mktemp("tiny") / "seed0"), tiny_spec,
                                  seed=0)


def _copy_without_msgpack(source, destination):
  shutil.copytree(source, destination, ignore=shutil.ignore_patterns("*.msgpack"))
  return str(destination)


@pytest.fixture(scope="module")
def safetensors_dir(tiny_dir, tmp_path_factory):
  """The same pipeline with only the PyTorch safetensors (the torch-free conversion path)."""
  return _copy_without_msgpack(tiny_dir, tmp_path_factory.mktemp("st") / "seed0")


@pytest.fixture(scope="module")
def safetensors_pipeline(safetensors_dir):
  return pipeline_lib.load_pipeline(safetensors_dir)


def _relative_error(actual, reference):
  """max |actual - reference| / max |reference|."""
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def _trees_equal(first, second):
  leaves = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), first, second))
  return jax.tree.structure(first) == jax.tree.structure(second) and all(leaves)


# ---------------------------------------------------------------------------------------------
# Tokenizer, formats, determinism, cache.


def test_tokenize_pads_and_truncates(safetensors_pipeline):
  ids = pipeline_lib.tokenize(safetensors_pipeline.tokenizer, ["a cat", "dog " * 100])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert (ids[:, 0] == tiny.BOS_ID).all()
  assert ids[0, -1] == tiny.EOS_ID  # pad = <|endoftext|>
  assert ids[1, -1] == tiny.EOS_ID and (ids[1, 1:-1] != tiny.EOS_ID).all()  # truncated + eos


def test_msgpack_and_safetensors_load_identical_params(tiny_dir, safetensors_pipeline):
  from_msgpack = pipeline_lib.load_pipeline(tiny_dir)
  for name in COMPONENTS:
    assert _trees_equal(getattr(from_msgpack, f"{name}_params"),
                        getattr(safetensors_pipeline, f"{name}_params")), name
  assert from_msgpack.vae_scaling_factor == pytest.approx(0.18215)
  assert from_msgpack.scheduler_config["steps_offset"] == 1
  assert from_msgpack.image_encoder.crop_size == 32


def test_same_seed_same_weights_other_seed_differs(tiny_dir, tiny_spec, tmp_path):
  """"tiny:<seed>" builds into cache_dir once; seed 0 matches the fixture bitwise, seed 1 not."""
  directory = pipeline_lib.resolve_model_spec("tiny:0", cache_dir=str(tmp_path),
                                              tiny_spec=tiny_spec)
  assert os.path.basename(directory).startswith("tiny-seed0-")
  assert [name for name in os.listdir(tmp_path) if name.startswith(".tmp")] == []
  for name, file_name in (("unet", "diffusion_flax_model.msgpack"),
                          ("text_encoder", "model.safetensors")):
    with open(os.path.join(directory, name, file_name), "rb") as built, open(
        os.path.join(tiny_dir, name, file_name), "rb") as fixture:
      assert built.read() == fixture.read(), name
  marker = os.path.getmtime(os.path.join(directory, "model_index.json"))
  assert pipeline_lib.resolve_model_spec("tiny:0", cache_dir=str(tmp_path),
                                         tiny_spec=tiny_spec) == directory
  assert os.path.getmtime(os.path.join(directory, "model_index.json")) == marker  # not rebuilt

  other = tiny.build_tiny_pipeline(str(tmp_path / "seed1"), tiny_spec, seed=1, formats=("flax",))
  for name, file_name in (("unet", "diffusion_flax_model.msgpack"),
                          ("text_encoder", "flax_model.msgpack")):
    first = convert.load_msgpack(os.path.join(tiny_dir, name, file_name))
    second = convert.load_msgpack(os.path.join(other, name, file_name))
    assert jax.tree.structure(first) == jax.tree.structure(second)
    assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, first, second))), name


@pytest.mark.parametrize("use_cache_dir", [False, True])
def test_converted_cache_written_and_reused(tiny_dir, tmp_path, monkeypatch, use_cache_dir):
  directory = _copy_without_msgpack(tiny_dir, tmp_path / "model")
  cache_dir = str(tmp_path / "cache") if use_cache_dir else ""
  first = pipeline_lib.load_pipeline(directory, cache_dir=cache_dir)
  if use_cache_dir:
    cached = sorted(os.listdir(os.path.join(cache_dir, "converted")))
    assert [name.split("-")[0] for name in cached] == sorted(COMPONENTS)
    cached = [os.path.join(cache_dir, "converted", name) for name in cached]
  else:
    cached = [os.path.join(directory, name, pipeline_lib.CONVERTED_NAME) for name in COMPONENTS]
  mtimes = [os.path.getmtime(path) for path in cached]

  def fail(*args, **kwargs):
    raise AssertionError("converter called although a converted cache exists")

  monkeypatch.setattr(diffusers_weights, "diffusers_pytorch_to_flax", fail)
  monkeypatch.setattr(convert, "clip_pytorch_to_flax", fail)
  second = pipeline_lib.load_pipeline(directory, cache_dir=cache_dir)
  assert [os.path.getmtime(path) for path in cached] == mtimes
  for name in COMPONENTS:
    assert _trees_equal(getattr(first, f"{name}_params"), getattr(second, f"{name}_params"))


# ---------------------------------------------------------------------------------------------
# Parity with the PyTorch reference modules (loaded from the same directory).


@pytest.fixture(scope="module")
def torch_models(safetensors_dir):
  """PyTorch UNet, VAE, text and image encoders via from_pretrained, with their loading info."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  models, infos = {}, {}
  for name, model_class in (("unet", diffusers.UNet2DConditionModel),
                            ("vae", diffusers.AutoencoderKL),
                            ("text_encoder", transformers.CLIPTextModel),
                            ("image_encoder", transformers.CLIPVisionModelWithProjection)):
    model, info = model_class.from_pretrained(os.path.join(safetensors_dir, name),
                                              output_loading_info=True)
    models[name], infos[name] = model.eval(), info
  return torch, models, infos


def test_pytorch_accepts_builder_safetensors(torch_models):
  _, _, infos = torch_models
  for name, info in infos.items():
    problems = {key: value for key, value in info.items() if value}
    assert problems == {}, (name, problems)


def test_text_encoder_matches_pytorch(safetensors_pipeline, torch_models):
  torch, models, _ = torch_models
  ids = pipeline_lib.tokenize(safetensors_pipeline.tokenizer, ["a photo of a cat", "a dog"])
  embeds = jax.jit(functools.partial(pipeline_lib.encode_text, safetensors_pipeline))(
      safetensors_pipeline.text_encoder_params, ids)
  with torch.no_grad():
    reference = models["text_encoder"](torch.from_numpy(ids.astype(np.int64))).last_hidden_state
  assert embeds.shape == (2, 77, 32)
  assert _relative_error(embeds, reference.numpy()) < 1e-4


def _unet_inputs():
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  return latents, np.array([901, 21], np.int32), context


@pytest.fixture(scope="module")
def unet_reference(torch_models):
  torch, models, _ = torch_models
  latents, timesteps, context = _unet_inputs()
  with torch.no_grad():
    return models["unet"](torch.from_numpy(latents), torch.from_numpy(timesteps.astype(np.int64)),
                          torch.from_numpy(context)).sample.numpy()


def _flax_eps(pipeline):
  latents, timesteps, context = _unet_inputs()
  unet_fn = jax.jit(functools.partial(pipeline_lib.unet_eps, pipeline))
  return unet_fn(pipeline.unet_params, latents, jnp.asarray(timesteps), context)


def test_unet_matches_pytorch(safetensors_pipeline, unet_reference):
  """The Flax UNet (with `models.flax_fixes`' exact GELU) matches PyTorch to ~3e-6."""
  eps = _flax_eps(safetensors_pipeline)
  assert eps.shape == (2, 4, 8, 8)
  assert _relative_error(eps, unet_reference) < 1e-4


def test_vae_decode_and_encode_match_pytorch(safetensors_pipeline, torch_models):
  torch, models, _ = torch_models
  pipeline = safetensors_pipeline
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  images = jax.jit(functools.partial(pipeline_lib.decode_latents, pipeline))(
      pipeline.vae_params, latents)
  with torch.no_grad():
    decoded = models["vae"].decode(torch.from_numpy(latents / pipeline.vae_scaling_factor)).sample
  reference = np.clip(decoded.numpy().transpose(0, 2, 3, 1) / 2 + 0.5, 0.0, 1.0)
  assert images.shape == (2, 64, 64, 3)
  assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
  assert _relative_error(images, reference) < 1e-4

  pixels = rng.uniform(-1.0, 1.0, (2, 3, 64, 64)).astype(np.float32)  # NCHW in [-1, 1]
  encode_fn = jax.jit(lambda params, x: pipeline.vae.apply(
      {"params": params}, x, method=pipeline.vae.encode)[0])
  mean = np.asarray(encode_fn(pipeline.vae_params, pixels.transpose(0, 2, 3, 1)))  # NHWC
  mean = mean.transpose(0, 3, 1, 2)  # as PyTorch's NCHW
  with torch.no_grad():
    reference = models["vae"].encode(torch.from_numpy(pixels)).latent_dist.mean.numpy()
  assert _relative_error(mean, reference) < 1e-4


def test_image_encoder_matches_pytorch(safetensors_pipeline, torch_models):
  torch, models, _ = torch_models
  pipeline = safetensors_pipeline
  pixel_values = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
  embeds = jax.jit(lambda params, x: pipeline.image_encoder.apply({"params": params}, x))(
      pipeline.image_encoder_params, pixel_values)
  with torch.no_grad():
    reference = models["image_encoder"](torch.from_numpy(pixel_values)).image_embeds.numpy()
  assert _relative_error(embeds, reference) < 1e-4


def test_embed_images_preprocesses_like_clip(safetensors_pipeline):
  """embed_images == encoder(preprocess(images)); preprocessing ~ CLIPImageProcessor (PIL)."""
  transformers = pytest.importorskip("transformers")
  pipeline = safetensors_pipeline
  images = np.random.default_rng(3).uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)
  embeds = jax.jit(functools.partial(image_encoder_lib.embed_images, pipeline))(
      pipeline.image_encoder_params, images)
  assert embeds.shape == (2, 32)
  pixel_values = image_encoder_lib.preprocess_images(images, 32)
  assert pixel_values.shape == (2, 3, 32, 32)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32})
  uint8_images = list(np.clip(np.round(images * 255), 0, 255).astype(np.uint8))
  reference = processor(images=uint8_images, return_tensors="np").pixel_values
  # PIL's and jax.image's bicubic kernels differ slightly: a few uint8 levels at most.
  assert np.abs(np.asarray(pixel_values) - reference).mean() < 0.05


def test_no_torch_import_in_package():
  package_dir = os.path.join(REPO_ROOT, "tdpo_jax")
  for folder, _, files in os.walk(package_dir):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name)) as file:
          source = file.read()
        assert "import torch" not in source, os.path.join(folder, name)


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_directory_error(tmp_path):
  missing = str(tmp_path / "no_such_model")
  with pytest.raises(pipeline_lib.ModelLoadError, match="no_such_model"):
    pipeline_lib.load_pipeline(missing)


def test_missing_subfolder_error(tiny_dir, tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(tiny_dir, directory, ignore=shutil.ignore_patterns("vae"))
  with pytest.raises(pipeline_lib.ModelLoadError) as error:
    pipeline_lib.load_pipeline(str(directory))
  message = str(error.value)
  assert os.path.join(str(directory), "vae") in message and "unet" in message
  assert "\n" not in message


def test_unrecognised_weight_file_error(tiny_dir, tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(tiny_dir, directory)
  unet_dir = directory / "unet"
  for name in ("diffusion_flax_model.msgpack", "diffusion_pytorch_model.safetensors"):
    os.rename(unet_dir / name, unet_dir / ("weights-" + name))
  with pytest.raises(pipeline_lib.ModelLoadError) as error:
    pipeline_lib.load_pipeline(str(directory))
  message = str(error.value)
  assert str(unet_dir) in message and "diffusion_pytorch_model.safetensors" in message


@pytest.mark.parametrize("spec", ["tiny:abc", "tiny:", "tiny:-1"])
def test_malformed_tiny_spec_error(spec, tiny_spec, tmp_path):
  with pytest.raises(pipeline_lib.ModelLoadError, match=spec):
    pipeline_lib.load_pipeline(spec, cache_dir=str(tmp_path), tiny_spec=tiny_spec)


def test_tiny_spec_required(tmp_path):
  with pytest.raises(pipeline_lib.ModelLoadError, match="tiny_spec"):
    pipeline_lib.load_pipeline("tiny:0", cache_dir=str(tmp_path))


def test_explicit_image_encoder_dir_missing(tiny_dir, tmp_path):
  missing = str(tmp_path / "no_encoder")
  with pytest.raises(pipeline_lib.ModelLoadError, match="no_encoder"):
    pipeline_lib.load_pipeline(tiny_dir, image_encoder=missing)
