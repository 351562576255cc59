"""Tests for tdpo_jax.rewards.image_reward (and rewards.blip): Flax ImageReward vs PyTorch.

Shape legend: B = 2 images (B, 64, 64, 3) NHWC in [0, 1], preprocessed to (B, 3, 32, 32) NCHW; a
tiny ImageReward of the published architecture: a ViT of width 48 (patch 8: 16 patches + [CLS],
2 blocks, 4 heads, MLP 96), a BERT of width 32 (2 layers, 2 heads, FFN 64, 40 positions) with
cross-attention to the 48-d image tokens, the head 32 -> 24 -> 16 -> 8 -> 4 -> 1; L = 35 tokens of
a tiny BERT vocabulary (+ BLIP's [DEC], [ENC]).

Reference: transformers' PyTorch `BlipVisionModel` and `BlipTextModel` (`is_decoder=True` builds
the cross-attention layers; called with `is_decoder=False`, the bidirectional padding mask of
BLIP's med `BertModel` in `mode="multimodal"`) and an `nn.Sequential` head with ImageReward's
layout. These compute what ImageReward's own BLIP code (its vit.py and med.py) does: on these
sizes and random weights the two agreed exactly (max difference 0.0). The `image-reward` package
itself installs beside our pins but does not import: its torchvision (a timm dependency) fails
beside the local torch wheel, and it imports OpenAI's `clip`, which is not on the registry.

The random weights are written in ImageReward.pt's key layout (`blip.visual_encoder.*`,
`blip.text_encoder.*`, `mlp.layers.*`, plus the unused `blip.vision_proj` and buffers), saved with
`torch.save` and converted by the command, so every test goes through the converter.
"""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tdpo_jax import rewards
from tdpo_jax.models import convert as model_convert
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import convert as reward_convert
from tdpo_jax.rewards import image_reward

PROMPTS = ["a photo of a cat", "a red dog on a skateboard in the rain"]
LONG_PROMPT = " ".join(["a red dog on a skateboard in the rain"] * 6)  # 54 words > 35 tokens
TOLERANCE = 1e-5  # max relative score difference, float32 (issue 16)
# A tiny BERT WordPiece vocabulary: the special tokens, then the prompts' words.
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "red", "dog",
         "on", "skate", "##board", "in", "the", "rain", "blue", "sky", ","]
VISION = dict(image_size=32, patch_size=8, hidden_size=48, num_layers=2, num_heads=4, mlp_size=96)
TEXT = dict(vocab_size=len(VOCAB) + 2, hidden_size=32, num_layers=2, num_heads=2,
            intermediate_size=64, max_position_embeddings=40)
MLP_WIDTHS = (24, 16, 8, 4, 1)
ARCHITECTURE = {"vision": VISION, "text": TEXT, "mlp_widths": MLP_WIDTHS}
# Parameter noise on top of transformers' init: random biases and norm scales too.
PARAM_NOISE = 0.1
# ImageReward's Block names (vit.py) -> transformers' BlipEncoderLayer names.
_VISION_BLOCK_NAMES = (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"),
                       ("attn.proj", "self_attn.projection"), ("norm2", "layer_norm2"),
                       ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


def _relative_error(actual, reference):
  """max |actual - reference| / max |reference|."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def _images(seed=0, shape=(2, 64, 64, 3)):
  return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def _section(checkpoint, tokenizer, **overrides):
  section = dict(checkpoint=checkpoint, tokenizer=tokenizer, architecture=ARCHITECTURE,
                 dtype="float32")
  section.update(overrides)
  return {"image_reward": section}


def _image_reward_state_dict(vision, text, head):
  """The reference models' weights in ImageReward.pt's key layout (NumPy)."""
  vision_state = {key: value.numpy() for key, value in vision.state_dict().items()}
  prefix = "blip.visual_encoder."
  state = {prefix + "cls_token": vision_state.pop("embeddings.class_embedding"),
           prefix + "pos_embed": vision_state.pop("embeddings.position_embedding"),
           prefix + "norm.weight": vision_state.pop("post_layernorm.weight"),
           prefix + "norm.bias": vision_state.pop("post_layernorm.bias")}
  for leaf in ("weight", "bias"):
    state[f"{prefix}patch_embed.proj.{leaf}"] = vision_state.pop(
        f"embeddings.patch_embedding.{leaf}")
  for index in range(VISION["num_layers"]):
    for ours, theirs in _VISION_BLOCK_NAMES:
      for leaf in ("weight", "bias"):
        state[f"{prefix}blocks.{index}.{ours}.{leaf}"] = vision_state.pop(
            f"encoder.layers.{index}.{theirs}.{leaf}")
  assert not vision_state, f"unmapped vision keys {sorted(vision_state)}"
  # BLIP's med BertModel and transformers' BlipTextModel share their key names; med.py also
  # saves its position_ids buffer (transformers' is not persistent).
  state.update({f"blip.text_encoder.{key}": value.numpy()
                for key, value in text.state_dict().items()})
  state["blip.text_encoder.embeddings.position_ids"] = np.arange(
      TEXT["max_position_embeddings"])[None]
  state.update({f"mlp.layers.{key}": value.numpy() for key, value in head.state_dict().items()})
  rng = np.random.default_rng(7)  # BLIP_Pretrain's contrastive projections: unused by the score
  state["blip.vision_proj.weight"] = rng.standard_normal((16, VISION["hidden_size"]))
  state["blip.text_proj.weight"] = rng.standard_normal((16, TEXT["hidden_size"]))
  return {key: np.ascontiguousarray(value) for key, value in state.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """Tiny PyTorch reference models, their ImageReward.pt, its conversion, a tokenizer directory.

  Returns a dict: torch, vision, text, head (eval-mode modules), state (the NumPy state dict),
  pickle, checkpoint (converted .safetensors), tokenizer (directory).
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(
      hidden_size=VISION["hidden_size"], intermediate_size=VISION["mlp_size"],
      num_hidden_layers=VISION["num_layers"], num_attention_heads=VISION["num_heads"],
      image_size=VISION["image_size"], patch_size=VISION["patch_size"], layer_norm_eps=1e-6,
      hidden_act="gelu")).eval()
  text = transformers.BlipTextModel(transformers.BlipTextConfig(
      vocab_size=TEXT["vocab_size"], hidden_size=TEXT["hidden_size"],
      encoder_hidden_size=VISION["hidden_size"], intermediate_size=TEXT["intermediate_size"],
      num_hidden_layers=TEXT["num_layers"], num_attention_heads=TEXT["num_heads"],
      max_position_embeddings=TEXT["max_position_embeddings"], layer_norm_eps=1e-12,
      is_decoder=True, hidden_act="gelu", pad_token_id=0), add_pooling_layer=False).eval()
  nn = torch.nn
  widths = (TEXT["hidden_size"],) + MLP_WIDTHS
  linears = [nn.Linear(width_in, width_out) for width_in, width_out in zip(widths, widths[1:])]
  head = nn.Sequential(linears[0], nn.Dropout(0.2), linears[1], nn.Dropout(0.2), linears[2],
                       nn.Dropout(0.1), linears[3], linears[4]).eval()
  with torch.no_grad():
    for module in (vision, text, head):
      for parameter in module.parameters():
        parameter.add_(PARAM_NOISE * torch.randn_like(parameter))
    for linear in linears:  # x4 gain per layer: the score depends on the features, not biases
      linear.weight.mul_(4.0)
  folder = tmp_path_factory.mktemp("image_reward")
  state = _image_reward_state_dict(vision, text, head)
  pickle_path = str(folder / "ImageReward.pt")
  torch.save({key: torch.from_numpy(value) for key, value in state.items()}, pickle_path)
  checkpoint = str(folder / "image_reward.safetensors")
  reward_convert.main(["image_reward", f"--src={pickle_path}", f"--out={checkpoint}"])
  tokenizer_dir = folder / "bert-tiny-uncased"
  tokenizer_dir.mkdir()
  (tokenizer_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  return dict(torch=torch, transformers=transformers, vision=vision, text=text, head=head,
              state=state, pickle=pickle_path, checkpoint=checkpoint,
              tokenizer=str(tokenizer_dir))


def _blip_tokenize(reference, prompt):
  """ImageReward's own tokenisation: BLIP's `init_tokenizer` then `ImageReward.score`'s call."""
  tokenizer = reference["transformers"].BertTokenizer.from_pretrained(reference["tokenizer"])
  tokenizer.add_special_tokens({"bos_token": "[DEC]"})
  tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
  return tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                   return_tensors="np")


def _reference_scores(reference, pixel_values, prompts):
  """(scores (B,), [CLS] features (B, D_t)) of the PyTorch reference, one prompt at a time."""
  torch = reference["torch"]
  scores, features = [], []
  with torch.no_grad():
    for pixels, prompt in zip(pixel_values, prompts):
      tokens = _blip_tokenize(reference, prompt)
      image_embeds = reference["vision"](
          pixel_values=torch.from_numpy(np.array(pixels)[None])).last_hidden_state
      hidden = reference["text"](
          input_ids=torch.from_numpy(tokens.input_ids), attention_mask=torch.from_numpy(
              tokens.attention_mask), encoder_hidden_states=image_embeds,
          encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
          is_decoder=False).last_hidden_state
      feature = hidden[:, 0].float()
      reward = reference["head"](feature)
      scores.append(((reward - image_reward.SCORE_MEAN) / image_reward.SCORE_STD).item())
      features.append(feature[0].numpy())
  return np.array(scores), np.stack(features)


# ---------------------------------------------------------------------------------------------
# Converter.


def test_convert_command_keeps_the_model_keys(reference):
  written = model_convert.load_safetensors(reference["checkpoint"])
  config = image_reward.config_from_dict(ARCHITECTURE)
  assert set(written) == set(image_reward.expected_pytorch_shapes(config))
  for key, value in written.items():
    np.testing.assert_array_equal(value, reference["state"][key])
  dropped = set(reference["state"]) - set(written)
  assert dropped == {"blip.vision_proj.weight", "blip.text_proj.weight",
                     "blip.text_encoder.embeddings.position_ids"}


def test_convert_wrong_shape_names_key(reference, tmp_path):
  torch = reference["torch"]
  state = dict(reference["state"])
  key = "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"
  state[key] = state[key][:, :32]  # a 32-d image width for a 48-d ViT
  pickle_path = str(tmp_path / "bad.pt")
  torch.save({name: torch.from_numpy(np.ascontiguousarray(value))
              for name, value in state.items()}, pickle_path)
  out = tmp_path / "out.safetensors"
  with pytest.raises(ValueError) as error:
    reward_convert.main(["image_reward", f"--src={pickle_path}", f"--out={out}"])
  message = str(error.value)
  assert repr(key) in message and "(32, 32)" in message and "(32, 48)" in message
  assert "\n" not in message and not out.exists()


def test_convert_wrong_architecture_names_first_key(reference, tmp_path):
  """The aesthetic MLP (or any other pickle) given as ImageReward.pt."""
  torch = reference["torch"]
  pickle_path = str(tmp_path / "mlp.pth")
  torch.save(reference["head"].state_dict(), pickle_path)
  with pytest.raises(ValueError, match="missing key 'blip.visual_encoder.patch_embed.proj"):
    reward_convert.main(["image_reward", f"--src={pickle_path}",
                         f"--out={tmp_path / 'out.safetensors'}"])


def test_published_architecture():
  """The published sizes: ViT-L/16 at 224 px, BERT-base with cross-attention to 1024-d tokens,
  a 30524-token vocabulary (bert-base-uncased + [DEC], [ENC]), the 768-d head; and the converter
  reads them all back from the shapes alone (no 446M-parameter file needed)."""
  config = image_reward.ARCHITECTURES[image_reward.PUBLISHED]
  shapes = image_reward.expected_pytorch_shapes(config)
  assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
  assert shapes["blip.visual_encoder.patch_embed.proj.weight"] == (1024, 3, 16, 16)
  assert shapes["blip.visual_encoder.blocks.23.mlp.fc1.weight"] == (4096, 1024)
  assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
  assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
  assert shapes["mlp.layers.0.weight"] == (1024, 768) and shapes["mlp.layers.7.weight"] == (1, 16)
  assert sum(int(np.prod(shape)) for shape in shapes.values()) == 446_206_689
  fake = {key: jax.ShapeDtypeStruct(shape, np.float32) for key, shape in shapes.items()}
  assert image_reward.infer_config(fake, "ImageReward.pt") == config
  assert list(image_reward.checkpoint_subset(fake, "ImageReward.pt")) == list(shapes)


# ---------------------------------------------------------------------------------------------
# Parity with PyTorch.


def test_image_reward_matches_pytorch(reference):
  reward_fn = rewards.make_reward_fn(
      "image_reward", _section(reference["checkpoint"], reference["tokenizer"]))
  images = _images()
  scores = reward_fn(images, PROMPTS)
  # A model reward: jittable math the trainer scores on the mesh (kernels.reward_scorer).
  assert isinstance(reward_fn, rewards.DeviceReward)
  assert scores.shape == (2,) and scores.dtype == np.float32
  pixel_values = np.asarray(image_encoder_lib.preprocess_images(images, VISION["image_size"]))
  expected, expected_features = _reference_scores(reference, pixel_values, PROMPTS)
  assert abs(expected[0] - expected[1]) > 0.1 * np.abs(expected).max()  # not bias-dominated
  assert _relative_error(scores, expected) <= TOLERANCE

  model, params = image_reward.load(reference["checkpoint"], reference["tokenizer"],
                                    ARCHITECTURE)
  input_ids, attention_mask = image_reward.tokenize(model, PROMPTS)
  features = jax.jit(image_reward.text_features, static_argnums=0)(
      model, params, images, input_ids, attention_mask)
  assert _relative_error(features, expected_features) <= TOLERANCE


def test_image_reward_accepts_sharded_images(reference):
  """Images sharded over the device mesh (batch axis): the same scores as unsharded."""
  devices = np.array(jax.devices())
  reward_fn = rewards.make_reward_fn(
      "image_reward", _section(reference["checkpoint"], reference["tokenizer"]))
  images = _images(4, (len(devices), 64, 64, 3))
  prompts = [PROMPTS[index % 2] for index in range(len(devices))]
  mesh = jax.sharding.Mesh(devices, ("data",))
  sharded = jax.device_put(images, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  assert _relative_error(reward_fn(sharded, prompts), reward_fn(images, prompts)) <= TOLERANCE


def test_bfloat16_compute_is_close(reference):
  """dtype="bfloat16": bf16 compute over float32 params, float32 scores near float32's."""
  section = _section(reference["checkpoint"], reference["tokenizer"])
  images = _images(5)
  full = rewards.make_reward_fn("image_reward", section)(images, PROMPTS)
  section["image_reward"]["dtype"] = "bfloat16"
  half = rewards.make_reward_fn("image_reward", section)(images, PROMPTS)
  assert half.dtype == jnp.float32
  assert _relative_error(half, full) < 0.1


def test_preprocessing_follows_image_reward_transform():
  """Our jitted preprocessing vs ImageReward's transform (torchvision Resize(S, BICUBIC) on the
  PIL image, CenterCrop(S), ToTensor, CLIP Normalize) written with PIL: the resize differs by a
  few uint8 levels at most (a float resize vs PIL's two rounded passes, docs/differences.md)."""
  images = _images(6, (2, 48, 64, 3))  # not square: shortest edge 48 -> 24, then a 24x24 crop
  size = 24
  ours = np.asarray(image_encoder_lib.preprocess_images(images, size))
  expected = []
  for image in images:
    pil = Image.fromarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))
    width = int(size * pil.width / pil.height)
    resized = np.asarray(pil.resize((width, size), Image.BICUBIC), np.float32) / 255.0
    left = (width - size) // 2
    cropped = resized[:, left:left + size]
    expected.append(((cropped - image_encoder_lib.CLIP_MEAN) / image_encoder_lib.CLIP_STD)
                    .transpose(2, 0, 1))
  difference = np.abs(ours - np.stack(expected)) * np.asarray(
      image_encoder_lib.CLIP_STD)[:, None, None] * 255.0  # in uint8 levels
  assert ours.shape == (2, 3, size, size)
  assert difference.max() <= 3.0 + 1e-3 and difference.mean() < 0.5


# ---------------------------------------------------------------------------------------------
# Score normalisation and tokenisation.


def test_score_normalisation(reference):
  """score = (r - 0.16717362830052426) / 1.0333394966054072, r the head's output: with a head
  of zero kernels r is its last bias, whatever the image and prompt."""
  model, params = image_reward.load(reference["checkpoint"], reference["tokenizer"],
                                    ARCHITECTURE)
  assert (model.config.score_mean, model.config.score_std) == (0.16717362830052426,
                                                               1.0333394966054072)
  mlp = jax.tree.map(jnp.zeros_like, params["mlp"])
  mlp["layers_7"]["bias"] = jnp.array([2.5], jnp.float32)
  input_ids, attention_mask = image_reward.tokenize(model, PROMPTS)
  scores = image_reward.score(model, dict(params, mlp=mlp), _images(), input_ids, attention_mask)
  np.testing.assert_allclose(scores, [(2.5 - 0.16717362830052426) / 1.0333394966054072] * 2,
                             rtol=1e-6)
  np.testing.assert_allclose(
      image_reward.normalise_score(np.array([0.16717362830052426, 1.2005131249059297]),
                                   model.config), [0.0, 1.0], atol=1e-6)


def test_tokenisation_is_blips_at_35_tokens(reference):
  model, _ = image_reward.load(reference["checkpoint"], reference["tokenizer"], ARCHITECTURE)
  prompts = ["a photo of a cat", LONG_PROMPT, "a blue sky, a zebra"]  # "zebra" is unknown
  input_ids, attention_mask = image_reward.tokenize(model, prompts)
  assert input_ids.shape == attention_mask.shape == (3, 35)
  assert input_ids.dtype == attention_mask.dtype == np.int32
  cls_id, sep_id, pad_id, unk_id = (VOCAB.index(token)
                                    for token in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
  # [CLS] a photo of a cat [SEP], then padding that the mask hides.
  np.testing.assert_array_equal(input_ids[0, :7], [cls_id, 5, 6, 7, 5, 8, sep_id])
  assert (input_ids[0, 7:] == pad_id).all() and attention_mask[0].sum() == 7
  assert input_ids[1, 0] == cls_id and input_ids[1, -1] == sep_id and attention_mask[1].all()
  assert unk_id in input_ids[2]
  for row, prompt in enumerate(prompts):
    tokens = _blip_tokenize(reference, prompt)
    np.testing.assert_array_equal(input_ids[row], tokens.input_ids[0])
    np.testing.assert_array_equal(attention_mask[row], tokens.attention_mask[0])
  assert len(model.tokenizer) == len(VOCAB) + 2  # [DEC] and [ENC]


# ---------------------------------------------------------------------------------------------
# Loading errors and the registry.


def test_missing_checkpoint_names_the_path(reference, tmp_path):
  path = str(tmp_path / "nowhere" / "image_reward.safetensors")
  with pytest.raises(ValueError, match=re.escape(f"ImageReward checkpoint not found: {path!r}")):
    rewards.make_reward_fn("image_reward", _section(path, reference["tokenizer"]))


def test_pickle_is_refused_with_the_convert_command(reference):
  with pytest.raises(ValueError, match="python -m tdpo_jax.rewards.convert image_reward"):
    rewards.make_reward_fn("image_reward", _section(reference["pickle"], reference["tokenizer"]))


def test_missing_tokenizer_names_the_path(reference, tmp_path):
  vocab = os.path.join(str(tmp_path), "vocab.txt")
  with pytest.raises(pipeline_lib.ModelLoadError, match=re.escape(repr(vocab))):
    rewards.make_reward_fn("image_reward", _section(reference["checkpoint"], str(tmp_path)))


def test_wrong_architecture_names_first_key(reference):
  """The tiny checkpoint under a 3-layer ViT: the first missing block is reported."""
  architecture = dict(ARCHITECTURE, vision=dict(VISION, num_layers=3))
  with pytest.raises(ValueError, match="missing key 'blip.visual_encoder.blocks.2."):
    image_reward.load(reference["checkpoint"], reference["tokenizer"], architecture)


def test_architecture_values():
  assert image_reward.architecture_from("ImageReward-v1.0") == image_reward.ImageRewardConfig()
  with pytest.raises(ValueError, match="unknown ImageReward architecture 'v2'"):
    image_reward.architecture_from("v2")
  with pytest.raises(ValueError, match="ImageReward architecture: .*num_blocks"):
    image_reward.architecture_from({"vision": {"num_blocks": 2}})
  with pytest.raises(ValueError, match="mlp_widths"):
    image_reward.architecture_from({"mlp_widths": (8, 1)})


def test_registry_lists_image_reward():
  assert "image_reward" in rewards.available()
  with pytest.raises(ValueError, match="config.rewards.image_reward has no 'tokenizer'"):
    rewards.make_reward_fn("image_reward", {"image_reward": {"checkpoint": "x.safetensors"}})
