"""Tests for tdpo_jax.rewards: Flax reward models vs PyTorch, converters, registry, host rewards.

Shape legend: B = 2 images (B,64,64,3) NHWC in [0,1], resized by CLIP preprocessing to
(B,3,32,32) NCHW; L = 77 tokens; tiny CLIP towers of width 32 (2 layers, 2 heads, patch 4) with a
32-d projection; the aesthetic MLP reads the 32-d embedding.

Reference models: a tiny random transformers `CLIPModel` (PyTorch) for PickScore and, through
the open_clip key mapping, HPSv2; an `nn.Sequential` with the aesthetic predictor's layout. The
open_clip mapping is also checked against a hand-written NumPy forward of open_clip's towers
(open_clip itself needs torchvision, which does not import beside the local torch wheel).
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import scipy.special

from tdpo_jax import rewards
from tdpo_jax.models import convert as model_convert
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.models import tiny
from tdpo_jax.rewards import aesthetic
from tdpo_jax.rewards import clip_model
from tdpo_jax.rewards import convert as reward_convert
from tdpo_jax.rewards import host_callback
from tdpo_jax.rewards import hpsv2
from tdpo_jax.rewards import open_clip_keys

PROMPTS = ["a photo of a cat", "a dog on a skateboard in the rain"]
TOLERANCE = 1e-4


def _relative_error(actual, reference):
  """max |actual - reference| / max |reference|."""
  actual, reference = np.asarray(actual), np.asarray(reference)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def _images(seed=0):
  return np.random.default_rng(seed).uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The tiny PyTorch CLIPModel, saved in transformers' format with a tokenizer and preprocessor.


def _tiny_clip_config(transformers):
  tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               hidden_act="gelu")  # open_clip ViT-H/14 uses the exact GELU
  return transformers.CLIPConfig(
      text_config=dict(tower, vocab_size=514, max_position_embeddings=77,
                       bos_token_id=tiny.BOS_ID, eos_token_id=tiny.EOS_ID,
                       pad_token_id=tiny.EOS_ID),
      vision_config=dict(tower, image_size=32, patch_size=4), projection_dim=32)


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
  """(torch, CLIPModel in eval mode, its directory with model.safetensors + tokenizer)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  model = transformers.CLIPModel(_tiny_clip_config(transformers)).eval()
  with torch.no_grad():  # random biases / norm scales too, and a non-default logit scale
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
    model.logit_scale.fill_(2.0)
  directory = tmp_path_factory.mktemp("clip")
  model.save_pretrained(directory)  # config.json + model.safetensors
  for name in ("vocab.json", "merges.txt"):
    shutil.copyfile(os.path.join(tiny.TOKENIZER_DIR, name), directory / name)
  with open(directory / "preprocessor_config.json", "w") as file:
    json.dump({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
               "crop_size": {"height": 32, "width": 32}}, file)
  return torch, model, str(directory)


def _projected(features):
  """transformers 5's `get_*_features` return an output whose pooler_output is the projection;
  earlier releases the tensor itself."""
  return getattr(features, "pooler_output", features)


def _torch_features(torch_clip, images, prompts):
  """PyTorch (image, text) projected features, L2-normalised, on our preprocessing and ids."""
  torch, model, directory = torch_clip
  pixel_values = np.array(image_encoder_lib.preprocess_images(images, 32))
  tokenizer = clip_model.load_tokenizer(directory)
  ids = tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                  return_tensors="np").input_ids
  with torch.no_grad():
    image = _projected(model.get_image_features(pixel_values=torch.from_numpy(pixel_values)))
    text = _projected(model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64))))
  image = image / image.norm(dim=-1, keepdim=True)
  text = text / text.norm(dim=-1, keepdim=True)
  return image.numpy(), text.numpy(), ids


def _numpy_state_dict(torch_model):
  return {key: value.detach().numpy().copy() for key, value in torch_model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# PickScore.


def test_pickscore_matches_pytorch(torch_clip):
  _, model, directory = torch_clip
  reward_fn = rewards.make_reward_fn(
      "pickscore", {"pickscore": {"model": directory, "processor": ""}})
  images = _images()
  scores = reward_fn(images, PROMPTS)
  # A model reward: jittable math the trainer scores on the mesh (kernels.reward_scorer).
  assert isinstance(reward_fn, rewards.DeviceReward)
  assert scores.shape == (2,) and scores.dtype == np.float32
  image, text, _ = _torch_features(torch_clip, images, PROMPTS)
  reference = np.exp(2.0) * np.sum(image * text, axis=-1)
  assert _relative_error(scores, reference) < TOLERANCE


def test_model_reward_accepts_sharded_images(torch_clip):
  """Images sharded over the device mesh (batch axis): same scores as unsharded."""
  devices = np.array(jax.devices())
  reward_fn = rewards.make_reward_fn(
      "pickscore", {"pickscore": {"model": torch_clip[2], "processor": ""}})
  images = np.random.default_rng(4).uniform(0.0, 1.0, (len(devices), 64, 64, 3))
  images = images.astype(np.float32)
  prompts = [f"prompt {index}" for index in range(len(devices))]
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharded = jax.device_put(images, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  np.testing.assert_allclose(reward_fn(sharded, prompts), reward_fn(images, prompts),
                             rtol=1e-5, atol=1e-6)


def test_image_encoder_of_shares_the_image_tower(torch_clip):
  """The critic can reuse a CLIP reward's image tower: same embeddings as the full model."""
  model, params = clip_model.load_clip_model(torch_clip[2])
  encoder, encoder_params = clip_model.image_encoder_of(model, params)
  pixel_values = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
  np.testing.assert_allclose(encoder.apply({"params": encoder_params}, pixel_values),
                             clip_model.image_embeds(model, params, pixel_values), rtol=1e-5,
                             atol=1e-6)


def test_pickscore_wrong_shape_names_key(torch_clip, tmp_path):
  _, model, directory = torch_clip
  bad_dir = tmp_path / "bad"
  shutil.copytree(directory, bad_dir, ignore=shutil.ignore_patterns("*.msgpack"))
  state_dict = _numpy_state_dict(model)
  key = "vision_model.encoder.layers.1.mlp.fc1.weight"
  state_dict[key] = state_dict[key][:, :16]
  model_convert.save_safetensors(state_dict, str(bad_dir / "model.safetensors"))
  with pytest.raises(ValueError) as error:
    clip_model.load_clip_model(str(bad_dir))
  message = str(error.value)
  assert repr(key) in message and "(64, 16)" in message and "\n" not in message


def test_pickscore_wrong_architecture_names_first_key(torch_clip, tmp_path):
  """A vision-only checkpoint under a CLIPModel config: the first text key is reported."""
  _, model, directory = torch_clip
  bad_dir = tmp_path / "bad"
  shutil.copytree(directory, bad_dir, ignore=shutil.ignore_patterns("*.msgpack"))
  state_dict = {key: value for key, value in _numpy_state_dict(model).items()
                if not key.startswith("text_")}
  model_convert.save_safetensors(state_dict, str(bad_dir / "model.safetensors"))
  with pytest.raises(ValueError, match="missing key 'text_model\\."):
    clip_model.load_clip_model(str(bad_dir))


# ---------------------------------------------------------------------------------------------
# HPSv2 (open_clip key names).


@pytest.fixture(scope="module")
def hpsv2_checkpoint(torch_clip, tmp_path_factory):
  """HPSv2-style pickle ({"state_dict": {"module." + open_clip key: tensor}}) converted by the
  command; returns (open_clip NumPy state dict, safetensors path)."""
  torch, model, directory = torch_clip
  config = model.config
  open_clip_state = open_clip_keys.transformers_to_open_clip(_numpy_state_dict(model), config)
  folder = tmp_path_factory.mktemp("hpsv2")
  pickle_path = str(folder / "HPS_v2_compressed.pt")
  torch.save({"state_dict": {f"module.{key}": torch.from_numpy(np.array(value))
                             for key, value in open_clip_state.items()}, "epoch": 1},
             pickle_path)
  out = str(folder / "hpsv2.safetensors")
  reward_convert.main(["hpsv2", f"--src={pickle_path}", f"--out={out}",
                       f"--clip_config={directory}"])
  return open_clip_state, out


def test_hpsv2_convert_command_keeps_open_clip_keys(hpsv2_checkpoint):
  open_clip_state, path = hpsv2_checkpoint
  written = model_convert.load_safetensors(path)
  assert sorted(written) == sorted(open_clip_state)
  for key, value in open_clip_state.items():
    np.testing.assert_array_equal(written[key], value)


def test_hpsv2_matches_pytorch(torch_clip, hpsv2_checkpoint):
  directory = torch_clip[2]
  reward_fn = rewards.make_reward_fn(
      "hpsv2", {"hpsv2": {"checkpoint": hpsv2_checkpoint[1], "clip_config": directory}})
  images = _images(1)
  scores = reward_fn(images, PROMPTS)
  image, text, _ = _torch_features(torch_clip, images, PROMPTS)
  reference = np.sum(image * text, axis=-1)  # cosine similarity, no logit scale
  assert scores.shape == (2,)
  assert _relative_error(scores, reference) < TOLERANCE


def _layer_norm(x, weight, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + eps) * weight + bias


def _open_clip_block(x, state, prefix, heads, causal):
  """open_clip `ResidualAttentionBlock` in NumPy, read straight from open_clip key names:
  x += out_proj(MHA(ln_1(x))) with nn.MultiheadAttention's packed [q; k; v] in_proj;
  x += c_proj(gelu(c_fc(ln_2(x)))). x: (B, N, W)."""
  batch, length, width = x.shape
  head_dim = width // heads
  hidden = _layer_norm(x, state[f"{prefix}.ln_1.weight"], state[f"{prefix}.ln_1.bias"])
  qkv = hidden @ state[f"{prefix}.attn.in_proj_weight"].T + state[f"{prefix}.attn.in_proj_bias"]
  query, key, value = (part.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)
                       for part in np.split(qkv, 3, axis=-1))
  logits = query @ key.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  if causal:
    logits = logits + np.triu(np.full((length, length), -np.inf), 1)
  weights = scipy.special.softmax(logits, axis=-1)
  attended = (weights @ value).transpose(0, 2, 1, 3).reshape(batch, length, width)
  x = x + attended @ state[f"{prefix}.attn.out_proj.weight"].T + state[
      f"{prefix}.attn.out_proj.bias"]
  hidden = _layer_norm(x, state[f"{prefix}.ln_2.weight"], state[f"{prefix}.ln_2.bias"])
  hidden = hidden @ state[f"{prefix}.mlp.c_fc.weight"].T + state[f"{prefix}.mlp.c_fc.bias"]
  hidden = 0.5 * hidden * (1.0 + scipy.special.erf(hidden / np.sqrt(2.0)))  # exact GELU
  return x + hidden @ state[f"{prefix}.mlp.c_proj.weight"].T + state[f"{prefix}.mlp.c_proj.bias"]


def _open_clip_encode_image(state, pixel_values, layers=2, heads=2):
  """open_clip `VisionTransformer.forward` (+ `encode_image(normalize=True)`) in NumPy."""
  weight = state["visual.conv1.weight"].astype(np.float64)  # (W, 3, P, P), no bias
  width, _, patch, _ = weight.shape
  batch, channels, size, _ = pixel_values.shape
  grid = size // patch
  patches = pixel_values.reshape(batch, channels, grid, patch, grid, patch)
  patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, -1)
  x = patches @ weight.reshape(width, -1).T
  class_token = np.broadcast_to(state["visual.class_embedding"], (batch, 1, width))
  x = np.concatenate([class_token, x], axis=1) + state["visual.positional_embedding"]
  x = _layer_norm(x, state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
  for index in range(layers):
    x = _open_clip_block(x, state, f"visual.transformer.resblocks.{index}", heads, causal=False)
  pooled = _layer_norm(x[:, 0], state["visual.ln_post.weight"], state["visual.ln_post.bias"])
  features = pooled @ state["visual.proj"]
  return features / np.linalg.norm(features, axis=-1, keepdims=True)


def _open_clip_encode_text(state, ids, layers=2, heads=2):
  """open_clip `CLIP.encode_text(normalize=True)` in NumPy: pooled at argmax(ids) (the EOT)."""
  x = state["token_embedding.weight"][ids] + state["positional_embedding"]
  for index in range(layers):
    x = _open_clip_block(x, state, f"transformer.resblocks.{index}", heads, causal=True)
  x = _layer_norm(x, state["ln_final.weight"], state["ln_final.bias"])
  features = x[np.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"]
  return features / np.linalg.norm(features, axis=-1, keepdims=True)


def test_open_clip_mapping_matches_numpy_open_clip(torch_clip, hpsv2_checkpoint):
  """The converted Flax model == a NumPy forward written from open_clip's key semantics, so the
  mapping (q/k/v order of in_proj, x @ proj layouts, norms) is checked independently of the
  transformers -> open_clip inverse used to build the checkpoint."""
  open_clip_state, path = hpsv2_checkpoint
  directory = torch_clip[2]
  model, params = hpsv2.load(path, directory)
  state = {key: value.astype(np.float64) for key, value in open_clip_state.items()}
  images = _images(2)
  pixel_values = np.asarray(image_encoder_lib.preprocess_images(images, 32), np.float64)
  ids = clip_model.tokenize(model, PROMPTS)
  image = jax.jit(lambda p, x: clip_model.normalise(clip_model.image_embeds(model, p, x)))(
      params, pixel_values.astype(np.float32))
  text = jax.jit(lambda p, x: clip_model.text_features(model, p, x))(params, ids)
  assert _relative_error(image, _open_clip_encode_image(state, pixel_values)) < TOLERANCE
  assert _relative_error(text, _open_clip_encode_text(state, ids)) < TOLERANCE


def test_open_clip_key_table_round_trip(torch_clip):
  model = torch_clip[1]
  state_dict = _numpy_state_dict(model)
  open_clip_state = open_clip_keys.transformers_to_open_clip(state_dict, model.config)
  expected = open_clip_keys.expected_open_clip_shapes(model.config)
  assert {key: value.shape for key, value in open_clip_state.items()} == expected
  back = open_clip_keys.open_clip_to_transformers(open_clip_state, model.config)
  for key, value in back.items():
    np.testing.assert_array_equal(value, state_dict[key])
  assert set(state_dict) - set(back) <= {"text_model.embeddings.position_ids",
                                         "vision_model.embeddings.position_ids"}


def test_hpsv2_wrong_shape_names_key(torch_clip, hpsv2_checkpoint, tmp_path):
  open_clip_state = dict(hpsv2_checkpoint[0])
  key = "transformer.resblocks.1.attn.in_proj_weight"
  open_clip_state[key] = open_clip_state[key][:64]  # (64, 32): a 2-projection fuse, not q,k,v
  path = str(tmp_path / "bad.safetensors")
  model_convert.save_safetensors(open_clip_state, path)
  with pytest.raises(ValueError) as error:
    hpsv2.load(path, torch_clip[2])
  assert repr(key) in str(error.value) and "(96, 32)" in str(error.value)


def test_hpsv2_wrong_architecture_names_first_key(torch_clip, tmp_path):
  """A transformers-named checkpoint given as HPSv2: the first open_clip key is missing."""
  path = str(tmp_path / "transformers_named.safetensors")
  model_convert.save_safetensors(_numpy_state_dict(torch_clip[1]), path)
  with pytest.raises(ValueError, match="missing key 'visual.class_embedding'"):
    hpsv2.load(path, torch_clip[2])


def test_hpsv2_refuses_pickles(torch_clip):
  with pytest.raises(ValueError, match="tdpo_jax.rewards.convert hpsv2"):
    rewards.make_reward_fn("hpsv2", {"hpsv2": {"checkpoint": "HPS_v2_compressed.pt",
                                               "clip_config": torch_clip[2]}})


# ---------------------------------------------------------------------------------------------
# Aesthetic.


def _torch_mlp(torch, input_dim, first_width=1024):
  """A module whose `layers` is the aesthetic predictor's nn.Sequential (state-dict keys
  `layers.{0,2,4,6,7}.*`, as the published file); the first width is changeable for errors."""
  nn = torch.nn
  container = nn.Module()
  container.layers = nn.Sequential(
      nn.Linear(input_dim, first_width), nn.Dropout(0.2), nn.Linear(first_width, 128),
      nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
  return container.eval()


@pytest.fixture(scope="module")
def aesthetic_files(torch_clip, tmp_path_factory):
  """(torch MLP, .pth path, converted .safetensors path) of a d=32 aesthetic MLP."""
  torch = torch_clip[0]
  torch.manual_seed(1)
  mlp = _torch_mlp(torch, 32)
  with torch.no_grad():  # x4 gain per layer: the score depends on the embedding, not just biases
    for layer in mlp.layers:
      if isinstance(layer, torch.nn.Linear):
        layer.weight.mul_(4.0)
  folder = tmp_path_factory.mktemp("aesthetic")
  pickle_path = str(folder / "sac+logos+ava1-l14-linearMSE.pth")
  torch.save(mlp.state_dict(), pickle_path)
  out = str(folder / "aesthetic_mlp.safetensors")
  reward_convert.main(["aesthetic", f"--src={pickle_path}", f"--out={out}"])
  return mlp, pickle_path, out


def test_aesthetic_matches_pytorch(torch_clip, aesthetic_files):
  torch, model, directory = torch_clip
  mlp, _, mlp_path = aesthetic_files
  reward_fn = rewards.make_reward_fn("aesthetic",
                                     {"aesthetic": {"clip": directory, "mlp": mlp_path}})
  images = _images(3)
  scores = reward_fn(images, PROMPTS)
  image, _, _ = _torch_features(torch_clip, images, PROMPTS)
  with torch.no_grad():
    reference = mlp.layers(torch.from_numpy(image)).squeeze(1).numpy()
  # Not bias-dominated: the two images' scores differ by far more than the parity bound, so a
  # wrong embedding could not pass it.
  assert abs(reference[0] - reference[1]) > 100 * TOLERANCE * np.abs(reference).max()
  # A model reward: jittable math the trainer scores on the mesh (kernels.reward_scorer).
  assert isinstance(reward_fn, rewards.DeviceReward)
  assert scores.shape == (2,) and scores.dtype == np.float32
  assert _relative_error(scores, reference) < TOLERANCE


def test_aesthetic_convert_wrong_shape_names_key(torch_clip, tmp_path):
  torch = torch_clip[0]
  pickle_path = str(tmp_path / "wrong.pth")
  torch.save(_torch_mlp(torch, 32, first_width=512).state_dict(), pickle_path)
  with pytest.raises(ValueError) as error:
    reward_convert.main(["aesthetic", f"--src={pickle_path}",
                         f"--out={tmp_path / 'out.safetensors'}"])
  assert "'layers.0.weight'" in str(error.value) and "(512, 32)" in str(error.value)
  assert not os.path.exists(tmp_path / "out.safetensors")


def test_aesthetic_wrong_architecture_names_first_key(torch_clip, tmp_path):
  """A CLIP checkpoint given as the MLP (convert-time and load-time checks)."""
  torch, model, _ = torch_clip
  pickle_path = str(tmp_path / "clip.pth")
  torch.save(model.state_dict(), pickle_path)
  with pytest.raises(ValueError, match="missing key 'layers.0.weight'"):
    reward_convert.main(["aesthetic", f"--src={pickle_path}",
                         f"--out={tmp_path / 'out.safetensors'}"])
  path = str(tmp_path / "clip.safetensors")
  model_convert.save_safetensors(_numpy_state_dict(model), path)
  with pytest.raises(ValueError, match="missing key 'layers.0.weight'"):
    aesthetic.load_mlp(path, 32)


def test_aesthetic_mlp_input_width_checked_at_load(aesthetic_files):
  """An MLP for a 768-d CLIP-L/14 embedding is rejected for another embedding width."""
  with pytest.raises(ValueError, match="'layers.0.weight' has shape \\(1024, 32\\), expected "
                                       "\\(1024, 768\\)"):
    aesthetic.load_mlp(aesthetic_files[2], 768)


def test_aesthetic_refuses_pickles(torch_clip, aesthetic_files):
  with pytest.raises(ValueError, match="tdpo_jax.rewards.convert aesthetic"):
    rewards.make_reward_fn("aesthetic", {"aesthetic": {"clip": torch_clip[2],
                                                       "mlp": aesthetic_files[1]}})


# ---------------------------------------------------------------------------------------------
# JPEG, host callbacks, registry.


def test_jpeg_compressibility_prefers_flat_images():
  flat = np.full((1, 64, 64, 3), 0.5, np.float32)
  noise = np.random.default_rng(0).uniform(0.0, 1.0, (1, 64, 64, 3)).astype(np.float32)
  images = np.concatenate([flat, noise])
  compressibility = rewards.make_reward_fn("jpeg_compressibility")(images, ["a", "b"])
  incompressibility = rewards.get("jpeg_incompressibility")(images, ["a", "b"])
  assert compressibility[0] > compressibility[1]
  np.testing.assert_allclose(incompressibility, -compressibility)


def test_host_reward_wraps_python_callable():
  seen = {}

  def brightness(images, prompts):
    seen["types"] = {type(image).__name__ for image in images}
    seen["prompts"] = prompts
    return [np.asarray(image, np.float32).mean() / 255.0 + len(prompt)
            for image, prompt in zip(images, prompts)]

  reward_fn = host_callback.register_host_reward("test_brightness", brightness)
  assert rewards.get("test_brightness") is reward_fn
  assert rewards.make_reward_fn("test_brightness") is reward_fn
  images = jax.numpy.stack([jax.numpy.zeros((8, 8, 3)), jax.numpy.ones((8, 8, 3))])
  scores = reward_fn(images, ["ab", "c"])
  assert scores.dtype == np.float32 and scores.shape == (2,)
  np.testing.assert_allclose(scores, [2.0, 2.0])
  assert seen == {"types": {"Image"}, "prompts": ["ab", "c"]}

  uint8_fn = host_callback.host_reward_fn(lambda x, p: x.reshape(len(x), -1).max(-1), "max",
                                          image_format="uint8")
  np.testing.assert_array_equal(uint8_fn(np.asarray(images), ["a", "b"]), [0.0, 255.0])


def test_host_reward_wrong_length_error():
  reward_fn = host_callback.host_reward_fn(lambda images, prompts: [1.0], "short")
  with pytest.raises(ValueError, match="'short' returned 1 values for 2 images"):
    reward_fn(np.zeros((2, 4, 4, 3), np.float32), ["a", "b"])


def test_imagereward_needs_its_package():
  try:
    import ImageReward  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    pytest.skip("ImageReward is installed (this test checks the missing-package message)")
  except ImportError:
    pass
  with pytest.raises(ValueError, match="pip install image-reward"):
    rewards.make_reward_fn("imagereward",
                           {"imagereward": {"model": "ImageReward-v1.0", "device": "cpu"}})


def test_registry_errors():
  with pytest.raises(ValueError, match="unknown reward 'nope'.*aesthetic"):
    rewards.make_reward_fn("nope", {})
  with pytest.raises(ValueError, match="make_reward_fn"):
    rewards.get("pickscore")
  with pytest.raises(ValueError, match="config.rewards.pickscore"):
    rewards.make_reward_fn("pickscore", {})
  with pytest.raises(ValueError, match="config.rewards.aesthetic has no 'mlp'"):
    rewards.make_reward_fn("aesthetic", {"aesthetic": {"clip": "x"}})
  rewards.check_name("hpsv2")
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.check_name("hps")


def test_reward_clip_directories_accept_hub_ids(tmp_path, monkeypatch):
  """A hub id in a CLIP directory entry is downloaded (single-model file patterns) before the
  loader reads it; the loader then reports what is missing in the downloaded directory."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_download(repo_id, allow_patterns=None, cache_dir=None):
    calls.append((repo_id, tuple(allow_patterns), cache_dir))
    return str(tmp_path)  # an empty "download"

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  section = {"pickscore": {"model": "yuvalkirstain/PickScore_v1", "processor": ""}}
  with pytest.raises(ValueError, match=r"missing CLIP config .*config.json"):
    rewards.make_reward_fn("pickscore", section, cache_dir=str(tmp_path / "hub"))
  assert calls == [("yuvalkirstain/PickScore_v1", tuple(pipeline_lib.CLIP_HUB_PATTERNS),
                    str(tmp_path / "hub"))]
  assert "config.json" in pipeline_lib.CLIP_HUB_PATTERNS
