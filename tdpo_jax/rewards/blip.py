"""BLIP's image and text towers in Flax (ImageReward's backbone), and their PyTorch key names.

Shape legend: B batch, S the image side (`VisionConfig.image_size`), P the patch side, N = (S/P)²
patches, D_v the vision width, L the token length, D_t the text width, H heads, d_h = D/H the head
width. `pixel_values` are NCHW like PyTorch's; the patch convolution runs NHWC (one transpose).

Vision tower, BLIP's `vit.VisionTransformer` (timm-style, pre-norm):
  x   = [cls; PatchEmbed(pixel_values)] + pos_embed                       (B, N+1, D_v)
  x  += Attn(LN_1(x));  x += fc2(gelu(fc1(LN_2(x))))                      per block
  image_embeds = LN(x)                                                    (B, N+1, D_v)
Text tower, BLIP's `med.BertModel` as ImageReward calls it (encoder, `mode="multimodal"`): post-norm
BERT layers, each with a cross-attention to all image tokens after the self-attention:
  h   = LN(word_emb(ids) + pos_emb(0 … L-1))                              (B, L, D_t)
  a   = LN(h + SelfAttn(h));  c = LN(a + CrossAttn(a, image_embeds));  h = LN(c + FFN(c))
Attention: softmax(q kᵀ / √d_h + bias) v per head (logits and softmax in float32); padding tokens
get BERT's additive bias -10000 in the self-attention; every image token is attended (ImageReward's
image mask is all ones). GELU is the exact (erf) one in both towers (torch `nn.GELU`, BERT "gelu").
No token-type embeddings and no pooler (BLIP's med.py has neither in this use).

Params are named after the PyTorch modules (`blocks_0/attn/qkv`, `encoder/layer_0/attention/self/
query`, `embeddings/LayerNorm`, ...), so `pytorch_key` maps a Flax path to the PyTorch state-dict
key mechanically: a trailing `_<i>` is the list index `.<i>`, and `kernel`/`scale`/`embedding`
are `weight`. Every module takes a compute `dtype`; params are float32.
"""
import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# BERT's extended attention mask: (1 - mask) * MASK_BIAS is added to the logits.
MASK_BIAS = -10000.0
# Initialiser scale of the random params (shapes and tests only; real weights are loaded).
INIT_STD = 0.02
# Flax leaf name -> PyTorch leaf name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """BLIP ViT sizes; the defaults are ViT-L/16 at 224 px (BLIP `create_vit("large", 224)`)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_size: int = 4096  # mlp_ratio 4
  layer_norm_eps: float = 1e-6

  @property
  def num_patches(self):
    """N = (S / P)²."""
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """BLIP med BERT sizes; the defaults are ImageReward's med_config.json (BERT-base, 30522
  WordPiece tokens + BLIP's [DEC] and [ENC]). The cross-attention reads the vision width."""
  vocab_size: int = 30524
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12


def _check_heads(width, heads, what):
  if heads <= 0 or width % heads:
    raise ValueError(f"{what}: width {width} is not divisible by num_heads={heads}; expected a "
                     "positive divisor")


def attention(query, key, value, bias, dtype):
  """Multi-head scaled dot-product attention (`jax.nn.dot_product_attention`, as the UNet and CLIP).

  Args:
    query: (B, L_q, H, d_h).
    key, value: (B, L_k, H, d_h).
    bias: None or float32 broadcastable to (B, H, L_q, L_k), added to the logits.
    dtype: the output dtype.
  Returns:
    (B, L_q, H · d_h): softmax(q kᵀ / √d_h + bias) v, heads concatenated.
  """
  if bias is not None:
    bias = bias.astype(query.dtype)
  output = jax.nn.dot_product_attention(query, key, value, bias=bias).astype(dtype)
  return output.reshape(output.shape[:2] + (-1,))


def padding_bias(attention_mask):
  """(B, L) 1/0 token mask -> (B, 1, 1, L) float32 additive bias: 0 kept, MASK_BIAS padded."""
  return (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * MASK_BIAS


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(INIT_STD), name=name)


# ---------------------------------------------------------------------------------------------
# Vision tower.


class PatchEmbed(nn.Module):
  """pixel_values (B, 3, S, S) NCHW -> patch tokens (B, N, D_v), row-major over the patch grid."""
  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    patch = self.config.patch_size
    images = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC
    tokens = nn.Conv(self.config.hidden_size, (patch, patch), strides=(patch, patch),
                     padding="VALID", dtype=self.dtype, name="proj")(images)
    return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


class VisionAttention(nn.Module):
  """Self-attention with one packed `qkv` projection, (B, N+1, D_v) -> (B, N+1, D_v)."""
  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    width, heads = self.config.hidden_size, self.config.num_heads
    qkv = _dense(3 * width, self.dtype, "qkv")(hidden)
    qkv = qkv.reshape(hidden.shape[:2] + (3, heads, width // heads))  # [q; k; v], head-major
    output = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, self.dtype)
    return _dense(width, self.dtype, "proj")(output)


class VisionMlp(nn.Module):
  """fc2(gelu(fc1(x))), (B, N+1, D_v) -> (B, N+1, D_v)."""
  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    hidden = _dense(self.config.mlp_size, self.dtype, "fc1")(hidden)
    hidden = nn.gelu(hidden, approximate=False)
    return _dense(self.config.hidden_size, self.dtype, "fc2")(hidden)


class VisionBlock(nn.Module):
  """Pre-norm transformer block: x += Attn(LN_1 x); x += MLP(LN_2 x). (B, N+1, D_v) in and out."""
  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    eps = self.config.layer_norm_eps
    hidden = hidden + VisionAttention(self.config, self.dtype, name="attn")(
        nn.LayerNorm(eps, dtype=self.dtype, name="norm1")(hidden))
    return hidden + VisionMlp(self.config, self.dtype, name="mlp")(
        nn.LayerNorm(eps, dtype=self.dtype, name="norm2")(hidden))


class VisionTransformer(nn.Module):
  """BLIP's ViT: pixel_values (B, 3, S, S) NCHW -> image_embeds (B, N+1, D_v), token 0 = [CLS]."""
  config: VisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    config = self.config
    _check_heads(config.hidden_size, config.num_heads, "VisionConfig")
    if pixel_values.shape[1:] != (config.num_channels, config.image_size, config.image_size):
      raise ValueError(f"pixel_values of shape {pixel_values.shape}; expected (B, "
                       f"{config.num_channels}, {config.image_size}, {config.image_size}) NCHW")
    tokens = PatchEmbed(config, self.dtype, name="patch_embed")(pixel_values)
    init = nn.initializers.normal(INIT_STD)
    cls_token = self.param("cls_token", init, (1, 1, config.hidden_size))
    pos_embed = self.param("pos_embed", init, (1, config.num_patches + 1, config.hidden_size))
    cls_tokens = jnp.broadcast_to(cls_token.astype(self.dtype),
                                  (tokens.shape[0], 1, config.hidden_size))
    hidden = jnp.concatenate([cls_tokens, tokens], axis=1) + pos_embed.astype(self.dtype)
    for index in range(config.num_layers):
      hidden = VisionBlock(config, self.dtype, name=f"blocks_{index}")(hidden)
    return nn.LayerNorm(config.layer_norm_eps, dtype=self.dtype, name="norm")(hidden)


# ---------------------------------------------------------------------------------------------
# Text tower.


class BertEmbeddings(nn.Module):
  """LN(word_emb(ids) + pos_emb(0 … L-1)): ids (B, L) -> (B, L, D_t)."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    config, init = self.config, nn.initializers.normal(INIT_STD)
    words = nn.Embed(config.vocab_size, config.hidden_size, dtype=self.dtype, embedding_init=init,
                     name="word_embeddings")(input_ids)
    positions = nn.Embed(config.max_position_embeddings, config.hidden_size, dtype=self.dtype,
                         embedding_init=init, name="position_embeddings")(
                             jnp.arange(input_ids.shape[-1]))
    return nn.LayerNorm(config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
        words + positions[None])


class BertSelfAttention(nn.Module):
  """Attention of `hidden` (B, L, D_t) to `context` (B, L_k, D_c) (itself, or the image tokens);
  separate query/key/value projections -> (B, L, D_t)."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, context, bias):
    width, heads = self.config.hidden_size, self.config.num_heads

    def project(inputs, name):
      projected = _dense(width, self.dtype, name)(inputs)
      return projected.reshape(projected.shape[:2] + (heads, width // heads))

    return attention(project(hidden, "query"), project(context, "key"),
                     project(context, "value"), bias, self.dtype)


class BertResidualOutput(nn.Module):
  """LN(residual + dense(hidden)): BERT's `BertSelfOutput` / `BertOutput`, (B, L, D_t) out."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, residual):
    hidden = _dense(self.config.hidden_size, self.dtype, "dense")(hidden)
    return nn.LayerNorm(self.config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(
        hidden + residual)


class BertAttention(nn.Module):
  """LN(hidden + SelfAttn(hidden, context)): self- (context = hidden) or cross-attention."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, context, bias):
    attended = BertSelfAttention(self.config, self.dtype, name="self")(hidden, context, bias)
    return BertResidualOutput(self.config, self.dtype, name="output")(attended, hidden)


class BertIntermediate(nn.Module):
  """gelu(dense(hidden)): (B, L, D_t) -> (B, L, intermediate_size)."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden):
    return nn.gelu(_dense(self.config.intermediate_size, self.dtype, "dense")(hidden),
                   approximate=False)


class BertLayer(nn.Module):
  """One multimodal BERT layer: self-attention, cross-attention to the image, feed-forward.

  hidden (B, L, D_t), bias (B, 1, 1, L), image_embeds (B, N+1, D_v) -> (B, L, D_t).
  """
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, bias, image_embeds):
    hidden = BertAttention(self.config, self.dtype, name="attention")(hidden, hidden, bias)
    hidden = BertAttention(self.config, self.dtype, name="crossattention")(
        hidden, image_embeds, None)
    expanded = BertIntermediate(self.config, self.dtype, name="intermediate")(hidden)
    return BertResidualOutput(self.config, self.dtype, name="output")(expanded, hidden)


class BertLayers(nn.Module):
  """The stack of `num_layers` BertLayers (`encoder/layer_<i>`), (B, L, D_t) in and out."""
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden, bias, image_embeds):
    for index in range(self.config.num_layers):
      hidden = BertLayer(self.config, self.dtype, name=f"layer_{index}")(hidden, bias,
                                                                        image_embeds)
    return hidden


class BertModel(nn.Module):
  """BLIP's med BertModel in multimodal encoder mode (no pooler).

  input_ids (B, L) int, attention_mask (B, L) 1/0, image_embeds (B, N+1, D_v) ->
  last_hidden_state (B, L, D_t).
  """
  config: TextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask, image_embeds):
    config = self.config
    _check_heads(config.hidden_size, config.num_heads, "TextConfig")
    if input_ids.shape[-1] > config.max_position_embeddings:
      raise ValueError(f"{input_ids.shape[-1]} tokens; expected at most "
                       f"max_position_embeddings={config.max_position_embeddings}")
    hidden = BertEmbeddings(config, self.dtype, name="embeddings")(input_ids)
    return BertLayers(config, self.dtype, name="encoder")(
        hidden, padding_bias(attention_mask), image_embeds.astype(self.dtype))


# ---------------------------------------------------------------------------------------------
# PyTorch names.


def pytorch_key(flax_path):
  """PyTorch state-dict key of a Flax param path of these modules (a tuple of names).

  `("blip", "visual_encoder", "blocks_3", "attn", "qkv", "kernel")` ->
  `"blip.visual_encoder.blocks.3.attn.qkv.weight"`; raw params (`cls_token`, `pos_embed`) keep
  their names.
  """
  modules = []
  for name in flax_path[:-1]:
    match = re.fullmatch(r"(.+)_(\d+)", name)
    modules.append(f"{match[1]}.{match[2]}" if match else name)
  return ".".join(modules + [_LEAF_NAMES.get(flax_path[-1], flax_path[-1])])


def pytorch_to_flax_leaf(flax_path, value):
  """A PyTorch tensor (NumPy) in the Flax layout of `flax_path`, float32."""
  value = np.asarray(value, np.float32)
  if flax_path[-1] == "kernel" and value.ndim == 2:
    return value.T
  if flax_path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return value
