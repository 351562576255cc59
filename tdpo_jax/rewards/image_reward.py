"""ImageReward (Xu et al., NeurIPS 2023): a BLIP image-text human-preference reward, in Flax.

Shape legend: B batch, H/W image height/width, S the ViT input side (224), N+1 image tokens
(197 = 14² patches + [CLS] for ViT-L/16), L the token length (35), D_v / D_t the vision / text
widths (1024 / 768). Images are NHWC float in [0, 1]; prompts a sequence of B strings.

  pixel_values = preprocess(images)                                     (B, 3, S, S) NCHW
  image_embeds = ViT(pixel_values)                                      (B, N+1, D_v)
  f            = BertModel(ids, mask, image_embeds)[:, 0]   ([CLS])     (B, D_t)
  r            = W_7 (W_6 (W_4 (W_2 (W_0 f + b_0) + b_2) + b_4) + b_6) + b_7     (B,)
  score        = (r - score_mean) / score_std     (the published 0.16717…, 1.03333…)

as ImageReward's `ImageReward.score` computes it (one prompt and image per call there, batched
here). The towers are `rewards.blip` (BLIP's ViT-L/16 and its med BERT with cross-attention);
the head `mlp.layers.{0,2,4,6,7}` is Linear layers with dropout (inactive) and no nonlinearity.
Preprocessing as ImageReward's torchvision transform: bicubic resize of the shortest edge to S,
centre crop S, /255, CLIP mean/std (`image_encoder.preprocess_images`, on uint8-quantised
images). Text: BLIP's tokenizer (bert-base-uncased plus the special tokens [DEC] and [ENC]),
padded to `max_length` 35 and truncated, with its attention mask.

Weights: the published `ImageReward.pt` is a pickle of the ImageReward module's state dict
(`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`, plus the unused `blip.vision_proj`
/ `blip.text_proj`). Convert it once (torch only in that command):

  python -m tdpo_jax.rewards.convert image_reward --src=ImageReward.pt --out=image_reward.safetensors

which checks the state dict and keeps, under their PyTorch names, the keys the model reads. This
module maps them to Flax in NumPy when it loads (not cached: transposes only). The architecture is
a value (`ImageRewardConfig`; `ARCHITECTURES` names the published one), so tests build tiny ones.
"""
import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.rewards import blip
from tdpo_jax.rewards import registry
from tdpo_jax.rewards import state_dicts

# The published ImageReward-v1.0 (ImageReward.py: `self.mean`, `self.std`, tokenizer max_length).
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
MLP_WIDTHS = (1024, 128, 64, 16, 1)
# nn.Sequential indices of the head's Linear layers (Linear, Dropout, Linear, Dropout, Linear,
# Dropout, Linear, Linear).
MLP_LINEAR_INDICES = (0, 2, 4, 6, 7)
# BLIP's `init_tokenizer`: bert-base-uncased with a [DEC] bos token and an [ENC] special token.
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
# The files a tokenizer hub id (e.g. google-bert/bert-base-uncased) downloads.
TOKENIZER_HUB_PATTERNS = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
PUBLISHED = "ImageReward-v1.0"
ARCHITECTURE = "an ImageReward (BLIP ViT + BERT + MLP head)"
KIND = "image_reward"  # the converter's name for it (python -m tdpo_jax.rewards.convert KIND)


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
  """ImageReward's architecture and score constants; the defaults are the published model's."""
  vision: blip.VisionConfig = dataclasses.field(default_factory=blip.VisionConfig)
  text: blip.TextConfig = dataclasses.field(default_factory=blip.TextConfig)
  mlp_widths: tuple = MLP_WIDTHS
  max_length: int = MAX_LENGTH
  score_mean: float = SCORE_MEAN
  score_std: float = SCORE_STD
  image_mean: tuple = image_encoder_lib.CLIP_MEAN
  image_std: tuple = image_encoder_lib.CLIP_STD

  def __post_init__(self):
    if len(self.mlp_widths) != len(MLP_LINEAR_INDICES) or self.mlp_widths[-1] != 1:
      raise ValueError(f"mlp_widths={self.mlp_widths}; expected {len(MLP_LINEAR_INDICES)} "
                       "Linear widths ending in 1, like ImageReward's MLP")
    if self.max_length > self.text.max_position_embeddings:
      raise ValueError(f"max_length={self.max_length} exceeds the text tower's "
                       f"max_position_embeddings={self.text.max_position_embeddings}")


ARCHITECTURES = {PUBLISHED: ImageRewardConfig()}


def config_from_dict(values):
  """`ImageRewardConfig` from a (nested) dict: {"vision": {...}, "text": {...}, other fields}."""
  values = dict(values)
  try:
    vision = blip.VisionConfig(**dict(values.pop("vision", {})))
    text = blip.TextConfig(**dict(values.pop("text", {})))
    return ImageRewardConfig(vision=vision, text=text, **values)
  except TypeError as error:
    raise ValueError(f"ImageReward architecture: {error}; expected the fields of "
                     "ImageRewardConfig, blip.VisionConfig (vision) and blip.TextConfig "
                     "(text)") from None


def architecture_from(value):
  """`ImageRewardConfig` of a config value: a name in `ARCHITECTURES`, a config, or a dict."""
  if isinstance(value, ImageRewardConfig):
    return value
  if isinstance(value, str):
    if value not in ARCHITECTURES:
      raise ValueError(f"unknown ImageReward architecture {value!r}; expected one of "
                       f"{sorted(ARCHITECTURES)} or a dict of ImageRewardConfig fields")
    return ARCHITECTURES[value]
  if hasattr(value, "to_dict"):  # an ml_collections.ConfigDict
    value = value.to_dict()
  if isinstance(value, dict):
    return config_from_dict(value)
  raise ValueError(f"ImageReward architecture {value!r}: expected a name, an ImageRewardConfig "
                   "or a dict")


# ---------------------------------------------------------------------------------------------
# Flax modules.


class Blip(nn.Module):
  """The two BLIP towers (`visual_encoder`, `text_encoder`): the text's [CLS] feature.

  pixel_values (B, 3, S, S) NCHW, input_ids (B, L), attention_mask (B, L) -> (B, D_t).
  """
  vision: blip.VisionConfig
  text: blip.TextConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.visual_encoder = blip.VisionTransformer(self.vision, self.dtype)
    self.text_encoder = blip.BertModel(self.text, self.dtype)

  def __call__(self, pixel_values, input_ids, attention_mask):
    image_embeds = self.visual_encoder(pixel_values)
    return self.text_encoder(input_ids, attention_mask, image_embeds)[:, 0]


class RewardHead(nn.Module):
  """ImageReward's MLP: affine layers `layers_{0,2,4,6,7}`, (B, D_t) -> (B, 1)."""
  widths: tuple = MLP_WIDTHS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features):
    hidden = features
    for index, width in zip(MLP_LINEAR_INDICES, self.widths):
      hidden = nn.Dense(width, dtype=self.dtype, name=f"layers_{index}")(hidden)
    return hidden


class ImageRewardModule(nn.Module):
  """BLIP + head: pixel_values (B, 3, S, S), ids (B, L), mask (B, L) -> raw reward r (B,) float32.

  Params `blip/...` and `mlp/...`, named like the PyTorch module's (`blip.pytorch_key`).
  """
  config: ImageRewardConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.blip = Blip(self.config.vision, self.config.text, self.dtype)
    self.mlp = RewardHead(tuple(self.config.mlp_widths), self.dtype)

  def features(self, pixel_values, input_ids, attention_mask):
    """The text [CLS] features f (B, D_t), float32."""
    return self.blip(pixel_values, input_ids, attention_mask).astype(jnp.float32)

  def __call__(self, pixel_values, input_ids, attention_mask):
    features = self.blip(pixel_values, input_ids, attention_mask)
    return self.mlp(features)[:, 0].astype(jnp.float32)


def init_fn(module):
  """rng -> random params of an `ImageRewardModule` (inputs of batch 1)."""
  config = module.config
  size, length = config.vision.image_size, config.max_length

  def init(rng):
    pixel_values = jnp.zeros((1, config.vision.num_channels, size, size), jnp.float32)
    input_ids = jnp.zeros((1, length), jnp.int32)
    return module.init(rng, pixel_values, input_ids, jnp.ones_like(input_ids))["params"]

  return init


def expected_shapes(config):
  """{flax_path: ShapeDtypeStruct} of an ImageReward model's params (traced, not computed)."""
  module = ImageRewardModule(config)
  return flax.traverse_util.flatten_dict(jax.eval_shape(init_fn(module), jax.random.key(0)))


def _pytorch_shapes(flax_shapes):
  return {blip.pytorch_key(path): state_dicts.pytorch_shape(path, struct.shape)
          for path, struct in flax_shapes.items()}


def expected_pytorch_shapes(config):
  """Ordered {PyTorch key: shape} that an ImageReward state dict of `config` must hold."""
  return _pytorch_shapes(expected_shapes(config))


# ---------------------------------------------------------------------------------------------
# Checkpoints (NumPy only).


def pytorch_to_flax(state_dict, config, source):
  """ImageReward PyTorch state dict -> `ImageRewardModule` params (NumPy float32).

  Checks every key the model reads first and names the first one missing or of another shape;
  extra keys (`blip.vision_proj`, buffers) are ignored.
  """
  shapes = expected_shapes(config)
  state_dicts.check_state_dict(state_dict, _pytorch_shapes(shapes), source, ARCHITECTURE)
  return flax.traverse_util.unflatten_dict({
      path: blip.pytorch_to_flax_leaf(path, state_dict[blip.pytorch_key(path)])
      for path in shapes})


def infer_config(state_dict, source):
  """The sizes of the ImageReward model a state dict holds (for the converter's check).

  Head counts and norm epsilons are not visible in shapes: they keep the published values
  when they divide the widths, else 1 (they do not change any shape).
  """
  def shape(key, ndim):
    if key not in state_dict:
      raise ValueError(f"{source}: missing key {key!r}; expected {ARCHITECTURE} checkpoint")
    value_shape = tuple(np.shape(state_dict[key]))
    if len(value_shape) != ndim:
      raise ValueError(f"{source}: key {key!r} has shape {value_shape}; expected {ndim} "
                       f"dimensions for {ARCHITECTURE}")
    return value_shape

  def count(key_format):
    index = 0
    while key_format.format(index) in state_dict:
      index += 1
    return index

  def heads(width, published):
    return published if width % published == 0 else 1

  vision_prefix, text_prefix = "blip.visual_encoder.", "blip.text_encoder."
  width, channels, patch, _ = shape(vision_prefix + "patch_embed.proj.weight", 4)
  grid = math.isqrt(shape(vision_prefix + "pos_embed", 3)[1] - 1)
  vision = blip.VisionConfig(
      image_size=grid * patch, patch_size=patch, num_channels=channels, hidden_size=width,
      num_layers=count(vision_prefix + "blocks.{}.norm1.weight"),
      num_heads=heads(width, blip.VisionConfig.num_heads),
      mlp_size=shape(vision_prefix + "blocks.0.mlp.fc1.weight", 2)[0])
  vocab_size, hidden = shape(text_prefix + "embeddings.word_embeddings.weight", 2)
  text = blip.TextConfig(
      vocab_size=vocab_size, hidden_size=hidden,
      num_layers=count(text_prefix + "encoder.layer.{}.attention.self.query.weight"),
      num_heads=heads(hidden, blip.TextConfig.num_heads),
      intermediate_size=shape(text_prefix + "encoder.layer.0.intermediate.dense.weight", 2)[0],
      max_position_embeddings=shape(text_prefix + "embeddings.position_embeddings.weight", 2)[0])
  widths = tuple(shape(f"mlp.layers.{index}.weight", 2)[0] for index in MLP_LINEAR_INDICES)
  return ImageRewardConfig(vision=vision, text=text, mlp_widths=widths,
                           max_length=min(MAX_LENGTH, text.max_position_embeddings))


def checkpoint_subset(state_dict, source):
  """The converter's check: the keys an ImageReward model of the state dict's own sizes reads
  (`infer_config`), each present with its shape (else a one-line error naming the first bad
  key); returns just those entries."""
  expected = expected_pytorch_shapes(infer_config(state_dict, source))
  state_dicts.check_state_dict(state_dict, expected, source, ARCHITECTURE)
  return {key: state_dict[key] for key in expected}


# ---------------------------------------------------------------------------------------------
# Loading and scoring.


def load_tokenizer(directory):
  """BLIP's tokenizer: `BertTokenizer` of `directory` (vocab.txt) + [DEC] and [ENC] tokens."""
  path = os.path.join(directory, "vocab.txt")
  if not os.path.isfile(path):
    raise pipeline_lib.ModelLoadError(f"missing BERT tokenizer vocabulary {path!r}; expected a "
                                      "bert-base-uncased tokenizer directory with vocab.txt")
  tokenizer = transformers.BertTokenizer.from_pretrained(directory)
  tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
  tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
  return tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRewardModel:
  """Static handles (params are passed separately). `eq=False`: hashable by identity for jit.

  Attributes:
    module: `ImageRewardModule` (its compute dtype; params float32).
    tokenizer: BLIP's `BertTokenizer` (host-side).
    config: the `ImageRewardConfig`.
  """
  module: ImageRewardModule
  tokenizer: transformers.BertTokenizer
  config: ImageRewardConfig


def load(checkpoint, tokenizer, architecture=PUBLISHED, dtype="float32"):
  """(ImageRewardModel, params) from the converted safetensors and a tokenizer directory.

  Args:
    checkpoint: the `.safetensors` file written by `python -m tdpo_jax.rewards.convert
      image_reward`.
    tokenizer: a bert-base-uncased tokenizer directory (vocab.txt).
    architecture: a name in `ARCHITECTURES`, an `ImageRewardConfig` or a dict of its fields.
    dtype: compute dtype name, "float32" or "bfloat16" (params stay float32).
  Returns:
    (ImageRewardModel, params) with float32 jnp params.
  """
  config = architecture_from(architecture)
  state_dict = state_dicts.load_converted(checkpoint, KIND, "ImageReward checkpoint")
  params = pytorch_to_flax(state_dict, config, checkpoint)
  if not os.path.isdir(tokenizer):
    raise pipeline_lib.ModelLoadError(f"ImageReward tokenizer directory not found: "
                                      f"{tokenizer!r}; expected a bert-base-uncased tokenizer")
  bert_tokenizer = load_tokenizer(tokenizer)
  if len(bert_tokenizer) > config.text.vocab_size:
    raise ValueError(f"tokenizer {tokenizer!r} has {len(bert_tokenizer)} tokens with [DEC] and "
                     f"[ENC], more than the checkpoint's vocab_size={config.text.vocab_size}")
  module = ImageRewardModule(config, dtype=pipeline_lib.compute_dtype(dtype))
  return (ImageRewardModel(module=module, tokenizer=bert_tokenizer, config=config),
          jax.tree.map(jnp.asarray, params))


def tokenize(model, prompts):
  """(input_ids, attention_mask), each (B, L) np.int32, padded to L = max_length, truncated."""
  encoded = model.tokenizer(list(prompts), padding="max_length", truncation=True,
                            max_length=model.config.max_length, return_tensors="np")
  return (np.asarray(encoded.input_ids, np.int32), np.asarray(encoded.attention_mask, np.int32))


def preprocess(model, images):
  """pixel_values (B, 3, S, S) NCHW of images (B, H, W, 3) in [0, 1] (ImageReward's transform)."""
  config = model.config
  return image_encoder_lib.preprocess_images(images, config.vision.image_size, config.image_mean,
                                             config.image_std, crop_size=config.vision.image_size)


def normalise_score(raw, config):
  """(r - score_mean) / score_std, float32, any shape."""
  return (jnp.asarray(raw, jnp.float32) - config.score_mean) / config.score_std


def text_features(model, params, images, input_ids, attention_mask):
  """The text [CLS] features f (B, D_t) float32 the head reads (jittable)."""
  return model.module.apply({"params": params}, preprocess(model, images), input_ids,
                            attention_mask, method=ImageRewardModule.features)


def score(model, params, images, input_ids, attention_mask):
  """ImageReward scores (B,) float32 of images (B, H, W, 3) in [0, 1] and prompt tokens (jittable).

  Args:
    input_ids, attention_mask: (B, L) from `tokenize`.
  """
  raw = model.module.apply({"params": params}, preprocess(model, images), input_ids,
                           attention_mask)
  return normalise_score(raw, model.config)


def reward_fn_from_model(model, params):
  """The `registry.DeviceReward` of `score`: host tokenisation (`tokenize`: ids and mask), then
  the jitted score."""
  return registry.DeviceReward(functools.partial(score, model), params,
                               encode_prompts=lambda prompts: tokenize(model, prompts))


def make_reward_fn(checkpoint, tokenizer, architecture=PUBLISHED, dtype="float32", cache_dir=""):
  """`reward_fn` of the converted `checkpoint` (.safetensors) and a `tokenizer` directory."""
  del cache_dir  # NumPy transposes only, nothing worth caching
  return reward_fn_from_model(*load(checkpoint, tokenizer, architecture, dtype))
