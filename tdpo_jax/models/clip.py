"""CLIP text and vision transformers in Flax: the project's own code (transformers 5 has no Flax).

Shape legend: B batch, L token length (<= max_position_embeddings, 77 for CLIP), D a tower's
width (hidden_size), F the MLP width (intermediate_size), H heads, d_h = D/H the head width,
d the projection width (projection_dim), C image channels, S the image side (image_size), P the
patch side, N = (S // P)² patches. `pixel_values` are NCHW (B, C, S, S), as PyTorch's and as
`image_encoder.preprocess_images` returns them; the patch convolution runs NHWC (one transpose
inside `ClipVisionEmbeddings`).

What is computed (transformers' `CLIPTextModel` / `CLIPVisionModelWithProjection`, open_clip's
`TextTransformer` / `VisionTransformer` with the same numbers):
  text:    x = tok_emb(ids) + pos_emb(position_ids)                          (B, L, D)
           x += Attn_causal(LN_1 x);  x += fc2(act(fc1(LN_2 x)))             per layer
           last_hidden_state = LN_final(x)                                   (B, L, D)
           pooler_output = last_hidden_state[b, eot_b]                       (B, D)
           text_embeds = pooler_output · W_t                                 (B, d)
  vision:  x = [cls; Conv_PxP/P(pixel_values)] + pos_emb(0 … N)              (B, N+1, D)
           x = LN_pre(x); then the same pre-LN layers, no causal mask
           last_hidden_state = x (no final LN, as transformers)              (B, N+1, D)
           pooler_output = LN_post(x[:, 0])                                  (B, D)
           image_embeds = pooler_output · W_v                                (B, d)
with Attn(x) = out_proj(softmax(q kᵀ / √d_h + mask) v) per head (`jax.nn.dot_product_attention`:
logits and softmax in float32), act = quick_gelu (x·σ(1.702 x), OpenAI CLIP) or gelu (exact
erf, open_clip's ViT-H/14 and LAION models). The EOT position eot_b follows transformers: the
first position holding `eos_token_id`; for legacy configs with `eos_token_id == 2` (written
before transformers PR #24773, e.g. laion's ViT-H/14) the position of the largest id,
`argmax(ids)`, which is also open_clip's rule. Both pick the same token for CLIP's BPE
vocabulary, whose EOT (49407) is the largest id.

Parameter tree: identical (names, nesting, shapes) to transformers 4.x's Flax CLIP modules, so
PyTorch `CLIPTextModel` / `CLIPVisionModelWithProjection` / `CLIPModel` state dicts convert one
to one (`convert.clip_pytorch_to_flax`) and msgpack files written from those modules load:
  ClipTextModel                 = FlaxCLIPTextModule                  text_model/...
  ClipTextModelWithProjection   = FlaxCLIPTextModelWithProjectionModule  + text_projection/kernel
  ClipVisionModel               = FlaxCLIPVisionModule                vision_model/...
  ClipVisionModelWithProjection = `image_encoder.ImageEncoder` (the vision half of
                                  FlaxCLIPModule; transformers 4.x has no Flax one)
                                  vision_model/..., visual_projection/kernel
  ClipModel                     = FlaxCLIPModule                       text_model, vision_model,
                                  visual_projection, text_projection, logit_scale
with e.g. text_model/encoder/layers/0/self_attn/q_proj/kernel (D, D),
vision_model/embeddings/patch_embedding/kernel (P, P, C, D) HWIO, vision_model/pre_layrnorm/scale
(transformers' spelling).

Configuration: `config` is a transformers `CLIPTextConfig` / `CLIPVisionConfig` / `CLIPConfig`, a
dict (e.g. a parsed config.json) or one of this module's dataclasses, all with transformers' field
names; `text_config` / `vision_config` / `clip_config` read the fields used here.

Precision: params are float32; every module computes in its `dtype` (Dense, Conv, LayerNorm
outputs, attention inputs). The residual stream (the sum of the embeddings and the sublayer
outputs) is kept in float32, as transformers' Flax text tower does implicitly (its vision tower
carries a `dtype` stream after pre_layrnorm, so bfloat16 vision outputs differ from it at bf16
rounding level); module outputs are in `dtype`. Embedding tables are looked up in float32 (a
gather: nothing to save). `remat=True` wraps each encoder layer in `nn.remat` (activations recomputed in the
backward pass; same params, same outputs).

API differences from transformers' Flax classes (for the code that calls them):
  * vision modules take NCHW `pixel_values` (transformers' Flax modules take NHWC; the wrapper
    `FlaxCLIPVisionModel` transposed): drop the caller-side transposes; an NHWC array is
    rejected with a ValueError;
  * outputs are NamedTuples: `EncoderOutput(last_hidden_state, pooler_output)` (indices 0 and 1
    as transformers' tuples), `TextModelOutput(text_embeds, last_hidden_state, pooler_output)`,
    `VisionModelOutput(image_embeds, last_hidden_state, pooler_output)`,
    `ClipOutput(logits_per_image, logits_per_text, text_embeds, image_embeds)`;
    no `hidden_states` / `attentions`, no `return_dict` / `output_*` flags;
  * `attention_mask` and `position_ids` are optional (None = all tokens, positions 0 … L-1);
    `deterministic` is accepted and ignored (no dropout: CLIP's attention_dropout is 0);
  * `ClipModel.get_text_features` / `get_image_features` are module methods (pass
    `method=...` to `apply`), unnormalised projections as transformers' `get_*_features`.
"""
import collections.abc
import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# quick_gelu(x) = x · σ(QUICK_GELU_ALPHA · x) (OpenAI CLIP's activation).
QUICK_GELU_ALPHA = 1.702
# Before transformers PR #24773 CLIP configs said eos_token_id=2; such configs pool at argmax(ids).
LEGACY_EOS_TOKEN_ID = 2
# Initialiser scale of random params (shapes, tests and tiny models only; real weights are loaded).
INIT_STD = 0.02
# transformers' CLIPConfig default: log(1 / 0.07), CLIP's initial inverse temperature.
DEFAULT_LOGIT_SCALE_INIT = 2.6592
# dtype of the residual stream (embeddings plus sublayer outputs), whatever the compute dtype.
STREAM_DTYPE = jnp.float32


def quick_gelu(x):
  """x · σ(1.702 x), elementwise."""
  return x * jax.nn.sigmoid(QUICK_GELU_ALPHA * x)


def exact_gelu(x):
  """x · Φ(x) with the erf form (torch `nn.GELU()`, transformers "gelu"), elementwise."""
  return nn.gelu(x, approximate=False)


# config.hidden_act -> activation function.
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


# ---------------------------------------------------------------------------------------------
# Configs (transformers' field names and defaults).


def _check_tower(config, kind):
  """Shared checks of a text or vision config: divisible heads, a known activation."""
  width, heads = config.hidden_size, config.num_attention_heads
  if heads <= 0 or width % heads:
    raise ValueError(f"{kind}: hidden_size {width} is not divisible by num_attention_heads="
                     f"{heads}; expected a positive divisor")
  if config.hidden_act not in ACTIVATIONS:
    raise ValueError(f"{kind}: hidden_act {config.hidden_act!r}; expected one of "
                     f"{sorted(ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """CLIP text tower sizes; field names and defaults of transformers' `CLIPTextConfig`."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  eos_token_id: int = 49407

  def __post_init__(self):
    _check_tower(self, "TextConfig")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """CLIP vision tower sizes; field names and defaults of transformers' `CLIPVisionConfig`."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    _check_tower(self, "VisionConfig")
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f"VisionConfig: patch_size {self.patch_size}; expected 1 <= patch_size <= "
                       f"image_size ({self.image_size})")

  @property
  def num_patches(self):
    """N = (S // P)² (a VALID convolution drops a remainder, as transformers)."""
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """A dual encoder: both towers, the shared projection width d and the initial logit scale."""
  text_config: TextConfig = TextConfig()
  vision_config: VisionConfig = VisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = DEFAULT_LOGIT_SCALE_INIT


def _read_fields(config_class, config):
  """Instance of `config_class` from a dataclass, a mapping or an object with those attributes.

  Fields the source lacks take the defaults; other keys (e.g. `architectures`) are ignored.
  """
  if isinstance(config, config_class):
    return config
  names = [field.name for field in dataclasses.fields(config_class)]
  if isinstance(config, collections.abc.Mapping):
    values = {name: config[name] for name in names if name in config}
  else:
    values = {name: getattr(config, name) for name in names if hasattr(config, name)}
  return config_class(**values)


def text_config(config):
  """`TextConfig` of a `CLIPTextConfig`, a dict or a `TextConfig`."""
  return _read_fields(TextConfig, config)


def vision_config(config):
  """`VisionConfig` of a `CLIPVisionConfig`, a dict or a `VisionConfig`."""
  return _read_fields(VisionConfig, config)


def clip_config(config):
  """`ClipConfig` of a `CLIPConfig`, a (config.json) dict or a `ClipConfig`.

  The towers are read with `text_config` / `vision_config`; `projection_dim` is the top-level one
  (a `CLIPConfig`'s sub-configs keep their own default 512, which the dual encoder ignores).
  """
  if isinstance(config, ClipConfig):
    return config
  if isinstance(config, collections.abc.Mapping):
    get = config.get
  else:
    def get(name, default):
      return getattr(config, name, default)
  defaults = ClipConfig()
  text, vision = get("text_config", None), get("vision_config", None)
  return ClipConfig(
      text_config=defaults.text_config if text is None else text_config(text),
      vision_config=defaults.vision_config if vision is None else vision_config(vision),
      projection_dim=get("projection_dim", defaults.projection_dim),
      logit_scale_init_value=get("logit_scale_init_value", defaults.logit_scale_init_value))


# Presets. OpenAI CLIP ViT-L/14 (Stable Diffusion 1.x's text encoder, the aesthetic reward's and
# the critic's image tower): openai/clip-vit-large-patch14's config.json.
CLIP_VIT_L_14_TEXT = TextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=768, eos_token_id=LEGACY_EOS_TOKEN_ID)
CLIP_VIT_L_14_VISION = VisionConfig(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    num_channels=3, image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    projection_dim=768)
# open_clip ViT-H/14 (HPSv2; PickScore is a fine-tuned laion/CLIP-ViT-H-14-laion2B-s32B-b79K):
# open_clip's model_configs/ViT-H-14.json (embed_dim 1024; vision width 1280, 32 layers,
# head_width 80 -> 16 heads, patch 14 at 224 px, mlp_ratio 4; text width 1024, 16 heads,
# 24 layers, context 77) with open_clip's defaults: nn.GELU (exact; no QuickGELU for this model),
# LayerNorm eps 1e-5, no layer scale, CLS pooling. Text pooling at argmax(ids), as open_clip:
# eos_token_id = 2 selects that rule (laion's transformers config.json says 2 as well).
OPEN_CLIP_VIT_H_14_TEXT = TextConfig(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=1024, eos_token_id=LEGACY_EOS_TOKEN_ID)
OPEN_CLIP_VIT_H_14_VISION = VisionConfig(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
    num_channels=3, image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=1024)
OPEN_CLIP_VIT_H_14 = ClipConfig(text_config=OPEN_CLIP_VIT_H_14_TEXT,
                                vision_config=OPEN_CLIP_VIT_H_14_VISION, projection_dim=1024)


# ---------------------------------------------------------------------------------------------
# Outputs.


class EncoderOutput(NamedTuple):
  """A tower's outputs: last_hidden_state (B, L or N+1, D), pooler_output (B, D)."""
  last_hidden_state: jax.Array
  pooler_output: jax.Array


class TextModelOutput(NamedTuple):
  """text_embeds (B, d) (not normalised), last_hidden_state (B, L, D), pooler_output (B, D)."""
  text_embeds: jax.Array
  last_hidden_state: jax.Array
  pooler_output: jax.Array


class VisionModelOutput(NamedTuple):
  """image_embeds (B, d) (not normalised), last_hidden_state (B, N+1, D), pooler_output (B, D)."""
  image_embeds: jax.Array
  last_hidden_state: jax.Array
  pooler_output: jax.Array


class ClipOutput(NamedTuple):
  """Dual-encoder outputs with L2-normalised embeddings e_T (B_t, d), e_I (B_i, d):
  logits_per_text = exp(logit_scale) e_T e_Iᵀ (B_t, B_i); logits_per_image its transpose."""
  logits_per_image: jax.Array
  logits_per_text: jax.Array
  text_embeds: jax.Array
  image_embeds: jax.Array


# ---------------------------------------------------------------------------------------------
# Shared transformer blocks.


def _dense(features, dtype, name, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=nn.initializers.normal(INIT_STD), name=name)


class ClipAttention(nn.Module):
  """Multi-head self-attention, (B, T, D) -> (B, T, D).

  out_proj(softmax(q kᵀ / √d_h + mask) v) with q, k, v = {q,k,v}_proj(x) split into H heads of
  d_h; the causal mask (text) lets position i attend to j <= i; `mask` (B, 1, 1, T) bool removes
  padded keys.

  Attributes:
    config: a `TextConfig` or `VisionConfig`.
    causal: whether to apply the causal mask.
  """
  config: Any
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, mask=None):
    width, heads = self.config.hidden_size, self.config.num_attention_heads
    split_shape = hidden.shape[:2] + (heads, width // heads)
    query, key, value = (_dense(width, self.dtype, name)(hidden).reshape(split_shape)
                         for name in ("q_proj", "k_proj", "v_proj"))
    output = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=self.causal)
    return _dense(width, self.dtype, "out_proj")(output.reshape(hidden.shape[:2] + (width,)))


class ClipMlp(nn.Module):
  """fc2(act(fc1(x))), (B, T, D) -> (B, T, F) -> (B, T, D)."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    hidden = _dense(self.config.intermediate_size, self.dtype, "fc1")(hidden)
    hidden = ACTIVATIONS[self.config.hidden_act](hidden)
    return _dense(self.config.hidden_size, self.dtype, "fc2")(hidden)


class ClipEncoderLayer(nn.Module):
  """Pre-LN block: x += Attn(LN_1 x); x += MLP(LN_2 x). (B, T, D) float32 in and out."""
  config: Any
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, mask=None):
    eps = self.config.layer_norm_eps
    update = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm1")(hidden)
    update = ClipAttention(self.config, self.causal, self.dtype, name="self_attn")(update, mask)
    hidden = hidden + update.astype(STREAM_DTYPE)
    update = nn.LayerNorm(eps, dtype=self.dtype, name="layer_norm2")(hidden)
    update = ClipMlp(self.config, self.dtype, name="mlp")(update)
    return hidden + update.astype(STREAM_DTYPE)


class ClipLayerStack(nn.Module):
  """num_hidden_layers `ClipEncoderLayer`s named "0", "1", …; `remat` wraps each in `nn.remat`."""
  config: Any
  causal: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, hidden, mask=None):
    layer_class = nn.remat(ClipEncoderLayer) if self.remat else ClipEncoderLayer
    for index in range(self.config.num_hidden_layers):
      hidden = layer_class(self.config, self.causal, self.dtype, name=str(index))(hidden, mask)
    return hidden


class ClipEncoder(nn.Module):
  """The layer stack under transformers' names (`encoder/layers/<i>`), (B, T, D) float32."""
  config: Any
  causal: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, hidden, mask=None):
    return ClipLayerStack(self.config, self.causal, self.dtype, self.remat,
                          name="layers")(hidden, mask)


# ---------------------------------------------------------------------------------------------
# Text tower.


def eot_positions(input_ids, eos_token_id):
  """(B,) index of the pooled (EOT) token of each row of `input_ids` (B, L).

  transformers' rule: the first position equal to `eos_token_id` (0 when a row has none); for the
  legacy `eos_token_id == 2` the position of the largest id (first one on ties), open_clip's rule.
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class ClipTextEmbeddings(nn.Module):
  """tok_emb(ids) + pos_emb(position_ids): (B, L) ints -> (B, L, D) float32 (a lookup, no math)."""
  config: Any

  @nn.compact
  def __call__(self, input_ids, position_ids):
    init = nn.initializers.normal(INIT_STD)
    tokens = nn.Embed(self.config.vocab_size, self.config.hidden_size, embedding_init=init,
                      name="token_embedding")(input_ids.astype(jnp.int32))
    positions = nn.Embed(self.config.max_position_embeddings, self.config.hidden_size,
                         embedding_init=init, name="position_embedding")(
                             position_ids.astype(jnp.int32))
    return (tokens + positions).astype(STREAM_DTYPE)


class ClipTextTransformer(nn.Module):
  """CLIP text transformer (transformers' `CLIPTextTransformer`): ids (B, L) -> `EncoderOutput`.

  Attributes:
    config: `CLIPTextConfig`, dict or `TextConfig`.
    dtype: compute dtype.
    remat: rematerialise each encoder layer in the backward pass.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """Args:
      input_ids: (B, L) int token ids, L <= max_position_embeddings.
      attention_mask: None or (B, L), 1 = token, 0 = padding (masked out as a key).
      position_ids: None (= 0 … L-1) or ints broadcastable to (B, L).
      deterministic: ignored (no dropout); kept for transformers' call signature.
    Returns:
      EncoderOutput(last_hidden_state (B, L, D), pooler_output (B, D)), in `dtype`.
    """
    del deterministic
    config = text_config(self.config)
    if input_ids.ndim != 2 or input_ids.shape[1] > config.max_position_embeddings:
      raise ValueError(f"input_ids of shape {input_ids.shape}; expected (B, L) with L <= "
                       f"max_position_embeddings={config.max_position_embeddings}")
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[1])[None]
    hidden = ClipTextEmbeddings(config, name="embeddings")(input_ids, position_ids)
    mask = None if attention_mask is None else (attention_mask > 0)[:, None, None, :]
    hidden = ClipEncoder(config, True, self.dtype, self.remat, name="encoder")(hidden, mask)
    last_hidden_state = nn.LayerNorm(config.layer_norm_eps, dtype=self.dtype,
                                     name="final_layer_norm")(hidden)
    rows = jnp.arange(input_ids.shape[0])
    pooled = last_hidden_state[rows, eot_positions(input_ids, config.eos_token_id)]
    return EncoderOutput(last_hidden_state, pooled)


class ClipTextModel(nn.Module):
  """`ClipTextTransformer` under `text_model/` (transformers' `FlaxCLIPTextModule` tree and call:
  `apply(params, input_ids, attention_mask, position_ids, deterministic=True)`)."""
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """Same arguments and `EncoderOutput` as `ClipTextTransformer`."""
    return ClipTextTransformer(self.config, self.dtype, self.remat, name="text_model")(
        input_ids, attention_mask, position_ids, deterministic)


class ClipTextModelWithProjection(nn.Module):
  """Text tower + bias-free `text_projection` (D -> d = config.projection_dim).

  Tree of transformers' `FlaxCLIPTextModelWithProjectionModule`; returns `TextModelOutput`.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """Arguments as `ClipTextTransformer`; text_embeds (B, d) = pooler_output · W_t."""
    config = text_config(self.config)
    outputs = ClipTextTransformer(config, self.dtype, self.remat, name="text_model")(
        input_ids, attention_mask, position_ids, deterministic)
    text_embeds = _dense(config.projection_dim, self.dtype, "text_projection", use_bias=False)(
        outputs.pooler_output)
    return TextModelOutput(text_embeds, *outputs)


# ---------------------------------------------------------------------------------------------
# Vision tower.


class ClipVisionEmbeddings(nn.Module):
  """[cls; patches] + pos_emb: pixel_values (B, C, S, S) NCHW -> (B, N+1, D) float32.

  Patches: a P×P convolution of stride P without bias (NHWC inside), flattened row-major over the
  (S/P, S/P) grid as PyTorch's `flatten(2)`. Token 0 is the learnt class embedding.
  """
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    config = self.config
    width, patch = config.hidden_size, config.patch_size
    init = nn.initializers.normal(INIT_STD)
    class_embedding = self.param("class_embedding", init, (width,))
    images = jnp.transpose(pixel_values, (0, 2, 3, 1))  # NCHW -> NHWC for the Flax conv
    patches = nn.Conv(width, (patch, patch), strides=(patch, patch), padding="VALID",
                      use_bias=False, dtype=self.dtype, kernel_init=init,
                      name="patch_embedding")(images)
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, width).astype(STREAM_DTYPE)
    positions = nn.Embed(config.num_patches + 1, width, embedding_init=init,
                         name="position_embedding")(jnp.arange(config.num_patches + 1))
    class_tokens = jnp.broadcast_to(class_embedding.astype(STREAM_DTYPE), (batch, 1, width))
    return jnp.concatenate([class_tokens, patches], axis=1) + positions.astype(STREAM_DTYPE)


class ClipVisionTransformer(nn.Module):
  """CLIP ViT (transformers' `CLIPVisionTransformer`): pixel_values NCHW -> `EncoderOutput`.

  Attributes:
    config: `CLIPVisionConfig`, dict or `VisionConfig`.
    dtype: compute dtype.
    remat: rematerialise each encoder layer in the backward pass.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values, deterministic=True):
    """Args:
      pixel_values: (B, C, S, S) NCHW, CLIP-normalised.
      deterministic: ignored (no dropout).
    Returns:
      EncoderOutput(last_hidden_state (B, N+1, D) before any final LN, pooler_output (B, D) =
      LN_post of the class token), in `dtype`.
    """
    del deterministic
    config = vision_config(self.config)
    expected = (config.num_channels, config.image_size, config.image_size)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values of shape {pixel_values.shape}; expected (B, "
                       f"{', '.join(map(str, expected))}) NCHW")
    hidden = ClipVisionEmbeddings(config, self.dtype, name="embeddings")(pixel_values)
    eps = config.layer_norm_eps
    hidden = nn.LayerNorm(eps, dtype=self.dtype, name="pre_layrnorm")(hidden)
    hidden = ClipEncoder(config, False, self.dtype, self.remat, name="encoder")(
        hidden.astype(STREAM_DTYPE))
    pooled = nn.LayerNorm(eps, dtype=self.dtype, name="post_layernorm")(hidden[:, 0])
    return EncoderOutput(hidden.astype(self.dtype), pooled)


class ClipVisionModel(nn.Module):
  """`ClipVisionTransformer` under `vision_model/` (transformers' `FlaxCLIPVisionModule` tree), with
  NCHW `pixel_values`; returns `EncoderOutput`."""
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values, deterministic=True):
    """Same argument and `EncoderOutput` as `ClipVisionTransformer`."""
    return ClipVisionTransformer(self.config, self.dtype, self.remat, name="vision_model")(
        pixel_values, deterministic)


class ClipVisionModelWithProjection(nn.Module):
  """Vision tower + bias-free `visual_projection` (D -> d = config.projection_dim).

  The tree of `image_encoder.ImageEncoder` / the vision half of transformers' `FlaxCLIPModule`
  (`vision_model/...`, `visual_projection/kernel`), i.e. PyTorch's
  `CLIPVisionModelWithProjection`. Returns `VisionModelOutput`.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, pixel_values, deterministic=True):
    """pixel_values (B, C, S, S) NCHW -> image_embeds (B, d) = pooler_output · W_v, and more."""
    config = vision_config(self.config)
    outputs = ClipVisionTransformer(config, self.dtype, self.remat, name="vision_model")(
        pixel_values, deterministic)
    image_embeds = _dense(config.projection_dim, self.dtype, "visual_projection",
                          use_bias=False)(outputs.pooler_output)
    return VisionModelOutput(image_embeds, *outputs)


# ---------------------------------------------------------------------------------------------
# Dual encoder.


def normalise(features):
  """x / ||x||_2 over the last axis."""
  return features / jnp.linalg.norm(features, axis=-1, keepdims=True)


class ClipModel(nn.Module):
  """CLIP dual encoder with transformers' `FlaxCLIPModule` tree: `text_model/...`,
  `vision_model/...`, `visual_projection/kernel` (D_v, d), `text_projection/kernel` (D_t, d),
  `logit_scale` ().

  Attributes:
    config: `CLIPConfig`, dict (config.json) or `ClipConfig`; d is its top-level projection_dim.
    dtype: compute dtype.
    remat: rematerialise each encoder layer in the backward pass.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    config = clip_config(self.config)
    self.text_model = ClipTextTransformer(config.text_config, self.dtype, self.remat)
    self.vision_model = ClipVisionTransformer(config.vision_config, self.dtype, self.remat)
    self.visual_projection = _dense(config.projection_dim, self.dtype, None, use_bias=False)
    self.text_projection = _dense(config.projection_dim, self.dtype, None, use_bias=False)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(config.logit_scale_init_value), ())

  def get_text_features(self, input_ids, attention_mask=None, position_ids=None):
    """Unnormalised text embeddings (B, d) of ids (B, L) (transformers' `get_text_features`)."""
    pooled = self.text_model(input_ids, attention_mask, position_ids).pooler_output
    return self.text_projection(pooled)

  def get_image_features(self, pixel_values):
    """Unnormalised image embeddings (B, d) of pixel_values (B, C, S, S) NCHW."""
    return self.visual_projection(self.vision_model(pixel_values).pooler_output)

  def __call__(self, input_ids, pixel_values, attention_mask=None, position_ids=None,
               deterministic=True):
    """Contrastive logits and normalised embeddings (`ClipOutput`); `deterministic` ignored."""
    del deterministic
    image_embeds = normalise(self.get_image_features(pixel_values))
    text_embeds = normalise(self.get_text_features(input_ids, attention_mask, position_ids))
    logits_per_text = jnp.exp(self.logit_scale) * text_embeds @ image_embeds.T
    return ClipOutput(logits_per_text.T, logits_per_text, text_embeds, image_embeds)


# ---------------------------------------------------------------------------------------------
# Init helpers (random params; shapes via `jax.eval_shape`).


def init_text_params(module, rng, batch_size=1):
  """Random params of a text module (input ids (batch_size, max_position_embeddings))."""
  length = text_config(module.config).max_position_embeddings
  return module.init(rng, jnp.zeros((batch_size, length), jnp.int32))["params"]


def init_vision_params(module, rng, batch_size=1):
  """Random params of a vision module (input (batch_size, C, S, S) NCHW zeros)."""
  config = vision_config(module.config)
  shape = (batch_size, config.num_channels, config.image_size, config.image_size)
  return module.init(rng, jnp.zeros(shape, jnp.float32))["params"]


def init_clip_params(module, rng, batch_size=1):
  """Random params of a `ClipModel` (text ids (batch_size, L), pixel_values NCHW)."""
  config = clip_config(module.config)
  vision = config.vision_config
  input_ids = jnp.zeros((batch_size, config.text_config.max_position_embeddings), jnp.int32)
  pixel_values = jnp.zeros((batch_size, vision.num_channels, vision.image_size,
                            vision.image_size), jnp.float32)
  return module.init(rng, input_ids, pixel_values)["params"]
