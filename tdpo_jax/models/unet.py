"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel` family) as Flax linen modules.

Shape legend: B batch, C/h/w latent channels/height/width, L text length, D text (cross-attention)
width, C_i the channels of UNet level i (`block_out_channels[i]`), E the time-embedding width
(4 C_0), N heads, d_h the head width, T = h_i w_i the tokens of a spatial transformer, K the
number of SDXL micro-conditions (`time_ids`), P the pooled-text width of SDXL.

The public call is NCHW in and out, like diffusers' UNets; everything inside runs NHWC (one
transpose at each boundary):

  eps = UNet2DConditionModel(config).apply({"params": params}, sample (B, C, h, w),
                                           timesteps (B,), encoder_hidden_states (B, L, D),
                                           added_cond_kwargs=None)          -> (B, C, h, w)

What it computes (diffusers `models/unets/unet_2d_condition.py` and the blocks it builds):
  emb  = W_2 silu(W_1 sinusoid(t) + b_1) + b_2                                      (B, E)
         [+ W'_2 silu(W'_1 [text_embeds, sinusoid(time_ids)] + b'_1) + b'_2   (SDXL text_time)]
  x    = conv_in(sample)                                                          (B, h, w, C_0)
  down level i: layers_per_block x (ResnetBlock2D [+ Transformer2DModel]), then (but the last
        level) a stride-2 conv; every layer's output is kept as a skip
  mid:  ResnetBlock2D, Transformer2DModel, ResnetBlock2D
  up level i: (layers_per_block + 1) x (concat skip, ResnetBlock2D [+ Transformer2DModel]), then
        (but the last) a nearest 2x upsample + conv
  eps  = conv_out(silu(GroupNorm(x)))
with
  ResnetBlock2D(x, emb)      = shortcut(x) + conv2(silu(GN_2(conv1(silu(GN_1(x))) + W silu(emb))))
  Transformer2DModel(x, ctx) = x + proj_out(blocks(proj_in(GN(x))))     (GN epsilon 1e-6)
  BasicTransformerBlock(h)   : h += SelfAttn(LN_1 h); h += CrossAttn(LN_2 h, ctx);
                               h += W_out (a * gelu(g)), [a, g] = W_in LN_3 h  (GEGLU, exact gelu)
  Attention                  = softmax(q k^T / sqrt(d_h)) v per head, `jax.nn.dot_product_attention`
                               (logits and softmax in float32 on its XLA path)

The parameter tree is the one `diffusers.FlaxUNet2DConditionModel` builds for the same config
(`down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel`, conv kernels HWIO, norms
`scale`/`bias`), so Flax checkpoints, LoRA regexes and sharding rules written for it still apply.
The numerics follow the PyTorch model (the reference SD was trained in): GroupNorm epsilon 1e-6
in the spatial transformers and the exact GELU, where diffusers' Flax classes used 1e-5 and the
tanh approximation (DESIGN §6).

Every module takes `dtype`, the compute dtype; parameters are created (and stay) float32, and
Flax casts them per op. Norm statistics and attention softmax are computed in float32.
"""
import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The positional time embedding is 4x the first level's width (diffusers `_set_time_proj`).
TIME_EMBED_MULTIPLIER = 4
# The GEGLU feed-forward's hidden width is 4x the transformer width (diffusers `FeedForward`).
FEED_FORWARD_MULTIPLIER = 4
# Sinusoidal embeddings use periods up to 10000 steps (diffusers `get_timestep_embedding`).
MAX_PERIOD = 10000
# PyTorch `Transformer2DModel.norm` (GroupNorm before proj_in) uses epsilon 1e-6 whatever the
# config's norm_eps; the transformer blocks' LayerNorms use PyTorch's default 1e-5.
TRANSFORMER_GROUP_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5
# Each down level but the last halves h and w, each up level but the last doubles them.
SPATIAL_FACTOR = 2
# The UNet's stride-2 downsampling conv pads 1 pixel on every side (config downsample_padding=1).
UNET_DOWNSAMPLE_PADDING = ((1, 1), (1, 1))

CROSS_ATTN_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_ATTN_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"
TEXT_TIME = "text_time"  # SDXL's addition_embed_type

# diffusers config keys the module implements only at their PyTorch default value (a config
# with another value raises): {key: default}.
_FIXED_KEYS = {
    "act_fn": "silu", "center_input_sample": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "num_attention_heads": None,
}
# Keys that change nothing here: `dropout` (the module is deterministic, like diffusers' with
# train=False), `upcast_attention` (attention logits are float32 anyway),
# `addition_embed_type_num_heads` (only for addition_embed_type "text"),
# `mid_block_only_cross_attention` (only for the UNetMidBlock2DSimpleCrossAttn mid block).
_IGNORED_KEYS = frozenset({"dropout", "upcast_attention", "addition_embed_type_num_heads",
                           "mid_block_only_cross_attention"})


def _per_block(value, num_blocks, key):
  """A per-level tuple from an int/bool (repeated) or a list of `num_blocks` values."""
  if isinstance(value, (list, tuple)):
    if len(value) != num_blocks:
      raise ValueError(f"UNet config: {key}={list(value)} has {len(value)} entries; expected one "
                       f"per down block ({num_blocks})")
    return tuple(value)
  return (value,) * num_blocks


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture of a `UNet2DConditionModel`, per-level values as tuples.

  Build it from a diffusers `config.json` dict with `UNetConfig.from_diffusers`. The defaults are
  those of diffusers' PyTorch `UNet2DConditionModel` (so a partial config means the same thing).

  Attributes:
    num_attention_heads: N per down level. diffusers' config calls this `attention_head_dim`
      (a naming slip kept for compatibility, diffusers issue 2011): SD1.x's 8 is 8 heads of
      C_i / 8, SD2.x's [5, 10, 20, 20] is 5 heads at 320 channels (64 wide).
    transformer_layers_per_block: transformer blocks per spatial transformer, per level (SDXL
      [1, 2, 10]); the mid block uses the last level's.
  """
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
  up_block_types: tuple = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
  mid_block_type: str | None = CROSS_ATTN_MID
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: tuple = (2, 2, 2, 2)
  num_attention_heads: tuple = (8, 8, 8, 8)
  transformer_layers_per_block: tuple = (1, 1, 1, 1)
  only_cross_attention: tuple = (False, False, False, False)
  cross_attention_dim: int = 1280
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  def __post_init__(self):
    num_levels = len(self.block_out_channels)
    for key in ("down_block_types", "up_block_types", "layers_per_block", "num_attention_heads",
                "transformer_layers_per_block", "only_cross_attention"):
      if len(getattr(self, key)) != num_levels:
        raise ValueError(f"UNet config: {key} has {len(getattr(self, key))} entries; expected "
                         f"one per block_out_channels entry ({num_levels})")
    for kind, allowed in (("down_block_types", (CROSS_ATTN_DOWN, PLAIN_DOWN)),
                          ("up_block_types", (CROSS_ATTN_UP, PLAIN_UP))):
      for name in getattr(self, kind):
        if name not in allowed:
          raise ValueError(f"UNet config: {kind} entry {name!r} is not supported; expected one "
                           f"of {allowed}")
    if self.mid_block_type not in (CROSS_ATTN_MID, None):
      raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r}; expected "
                       f"{CROSS_ATTN_MID!r} or None")
    for level in self.attention_levels:
      channels, heads = self.block_out_channels[level], self.num_attention_heads[level]
      if channels % heads:
        raise ValueError(f"UNet config: level {level} has {channels} channels, not divisible by "
                         f"its {heads} attention heads")
    for level, channels in enumerate(self.block_out_channels):
      if channels % self.norm_num_groups:
        raise ValueError(f"UNet config: level {level} has {channels} channels, not divisible by "
                         f"norm_num_groups={self.norm_num_groups}")
    if self.addition_embed_type not in (None, TEXT_TIME):
      raise ValueError(f"UNet config: addition_embed_type={self.addition_embed_type!r}; "
                       f"expected None or {TEXT_TIME!r}")
    if self.addition_embed_type == TEXT_TIME and (
        self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
      raise ValueError("UNet config: addition_embed_type 'text_time' needs "
                       "addition_time_embed_dim and projection_class_embeddings_input_dim; got "
                       f"{self.addition_time_embed_dim} and "
                       f"{self.projection_class_embeddings_input_dim}")

  @property
  def time_embed_dim(self):
    """E = 4 C_0."""
    return self.block_out_channels[0] * TIME_EMBED_MULTIPLIER

  @property
  def attention_levels(self):
    """The levels with spatial transformers (down, mirrored up, and the last one's mid block)."""
    last_level = len(self.block_out_channels) - 1
    levels = {level for level, name in enumerate(self.down_block_types)
              if name == CROSS_ATTN_DOWN}
    levels |= {last_level - index for index, name in enumerate(self.up_block_types)
               if name == CROSS_ATTN_UP}
    if self.mid_block_type == CROSS_ATTN_MID:
      levels.add(last_level)
    return sorted(levels)

  @property
  def num_downsamplers(self):
    """How many times h and w are halved (every down level but the last)."""
    return len(self.block_out_channels) - 1

  @classmethod
  def from_diffusers(cls, values):
    """The config of a diffusers `UNet2DConditionModel` `config.json` (a dict).

    Keys starting with "_" are metadata; keys this module does not know are logged and ignored;
    keys of features it does not implement raise unless at their PyTorch default.

    Raises:
      ValueError: an unsupported feature or an inconsistent per-level list, named.
    """
    values = {key: value for key, value in dict(values).items() if not key.startswith("_")}
    for key, default in _FIXED_KEYS.items():
      if key in values and values[key] != default:
        raise ValueError(f"UNet config: {key}={values[key]!r} is not supported; expected "
                         f"{default!r} (the Stable Diffusion UNets' value)")
    fields = {field.name for field in dataclasses.fields(cls)}
    known = fields | set(_FIXED_KEYS) | _IGNORED_KEYS | {"attention_head_dim"}
    unknown = sorted(set(values) - known)
    if unknown:
      logging.warning("UNet config keys ignored (unknown to tdpo_jax.models.unet): %s", unknown)
    defaults = cls()
    block_out_channels = tuple(values.get("block_out_channels", defaults.block_out_channels))
    num_levels = len(block_out_channels)
    cross_attention_dim = values.get("cross_attention_dim", defaults.cross_attention_dim)
    if isinstance(cross_attention_dim, (list, tuple)):
      if len(set(cross_attention_dim)) != 1:
        raise ValueError(f"UNet config: cross_attention_dim={list(cross_attention_dim)}; expected "
                         "one width for all levels (they all read the same text embeddings)")
      cross_attention_dim = cross_attention_dim[0]
    transformer_layers = values.get("transformer_layers_per_block", 1)
    if isinstance(transformer_layers, (list, tuple)) and any(
        isinstance(entry, (list, tuple)) for entry in transformer_layers):
      raise ValueError("UNet config: transformer_layers_per_block as per-layer lists is not "
                       f"supported; got {transformer_layers}, expected an int or one int per level")
    norm_num_groups = values.get("norm_num_groups", defaults.norm_num_groups)
    if norm_num_groups is None:
      raise ValueError("UNet config: norm_num_groups=None (no output GroupNorm) is not supported; "
                       "expected an int")
    sample_size = values.get("sample_size") or defaults.sample_size
    return cls(
        sample_size=tuple(sample_size) if isinstance(sample_size, list) else sample_size,
        in_channels=values.get("in_channels", defaults.in_channels),
        out_channels=values.get("out_channels", defaults.out_channels),
        down_block_types=tuple(values.get("down_block_types", defaults.down_block_types)),
        up_block_types=tuple(values.get("up_block_types", defaults.up_block_types)),
        mid_block_type=values.get("mid_block_type", defaults.mid_block_type),
        block_out_channels=block_out_channels,
        layers_per_block=_per_block(values.get("layers_per_block", 2), num_levels,
                                    "layers_per_block"),
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        num_attention_heads=_per_block(values.get("attention_head_dim", 8), num_levels,
                                       "attention_head_dim"),
        transformer_layers_per_block=_per_block(transformer_layers, num_levels,
                                                "transformer_layers_per_block"),
        only_cross_attention=_per_block(values.get("only_cross_attention", False), num_levels,
                                        "only_cross_attention"),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=values.get("use_linear_projection", defaults.use_linear_projection),
        flip_sin_to_cos=values.get("flip_sin_to_cos", defaults.flip_sin_to_cos),
        freq_shift=values.get("freq_shift", defaults.freq_shift),
        norm_num_groups=norm_num_groups,
        norm_eps=values.get("norm_eps", defaults.norm_eps),
        addition_embed_type=values.get("addition_embed_type"),
        addition_time_embed_dim=values.get("addition_time_embed_dim"),
        projection_class_embeddings_input_dim=values.get("projection_class_embeddings_input_dim"))


# ---------------------------------------------------------------------------------------------
# Layers shared with the VAE (tdpo_jax.models.vae).


class GroupNorm(nn.Module):
  """GroupNorm over (h, w, C/G) per group, two-pass variance (as PyTorch), float32 statistics.

  x (B, ..., C) NHWC -> same shape: y = (x - mean_g) / sqrt(var_g + eps) * scale + bias, with
  mean_g, var_g over the spatial dims and the C/G channels of group g. Normalised in the grouped
  (B, hw, G, C/G) shape: `flax.linen.GroupNorm` (same parameters, "scale" and "bias" (C,))
  repeats its (B, G) statistics back to (B, C) first, which made the tiny VAE decode 1.18x
  slower on CPU (benchmarks/group_norm.py).
  """
  num_groups: int
  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    grouped = x.astype(jnp.float32).reshape(
        (x.shape[0], -1, self.num_groups, channels // self.num_groups))
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    centred = grouped - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def group_norm(num_groups, epsilon, dtype, name):
  """`GroupNorm` (two-pass variance as PyTorch, float32 statistics)."""
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, name=name)


def _stride1_conv(inputs, kernel, padding, precision):
  """y = conv(x, W), NHWC x (B, h, w, C_in), HWIO W (k_h, k_w, C_in, C_out), stride 1."""
  return jax.lax.conv_general_dilated(inputs, kernel, (1, 1), padding, precision=precision,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def stride1_conv(inputs, kernel, padding, precision=None):
  """A stride-1 NHWC/HWIO convolution whose input gradient is itself an HWIO convolution.

  The input cotangent of y = conv(x, W) with padding (lo, hi) per spatial dim is
      dx = conv(dy, W'),  W'[a, b, o, i] = W[k_h - 1 - a, k_w - 1 - b, i, o],
  padded (k - 1 - lo, k - 1 - hi). JAX's own transpose rule gives XLA that convolution with
  the kernel's in/out dims swapped in its dimension numbers (HWOI); inside a loop XLA:CPU keeps
  that layout and runs it on its generic Eigen convolution (21 GFLOP/s for the shapes UNet's
  8x8x128 up-block convs, measured) while HWIO convolutions go to its YNNPACK fusions
  (~65 GFLOP/s). Writing W' out as an array makes the backward convolution HWIO too.
  The kernel's cotangent is JAX's own. Being a `custom_vjp`, it has reverse-mode derivatives
  only (`jax.grad`/`jax.vjp`; no `jax.jvp`/`jacfwd` through the models, which nothing here uses).

  Args:
    inputs: (B, h, w, C_in); kernel: (k_h, k_w, C_in, C_out).
    padding: ((lo_h, hi_h), (lo_w, hi_w)); precision: `lax.Precision` or None.
  Returns:
    (B, h + lo_h + hi_h - k_h + 1, w + lo_w + hi_w - k_w + 1, C_out).
  """
  return _stride1_conv(inputs, kernel, padding, precision)


def _stride1_conv_fwd(inputs, kernel, padding, precision):
  return _stride1_conv(inputs, kernel, padding, precision), (inputs, kernel)


def _stride1_conv_bwd(padding, precision, residuals, cotangent):
  inputs, kernel = residuals
  flipped = jnp.swapaxes(jnp.flip(kernel, (0, 1)), 2, 3)
  transposed_padding = tuple((size - 1 - lo, size - 1 - hi)
                             for size, (lo, hi) in zip(kernel.shape[:2], padding))
  inputs_grad = _stride1_conv(cotangent, flipped, transposed_padding, precision)
  _, kernel_vjp = jax.vjp(lambda w: _stride1_conv(inputs, w, padding, precision), kernel)
  return inputs_grad.astype(inputs.dtype), kernel_vjp(cotangent)[0]


stride1_conv.defvjp(_stride1_conv_fwd, _stride1_conv_bwd)


def _flax_stride1_conv(inputs, kernel, window_strides, padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                       precision=None):
  """`stride1_conv` with `lax.conv_general_dilated`'s signature, as `nn.Conv` calls it."""
  unit = lambda dims: dims is None or all(d == 1 for d in dims)
  if not (unit(window_strides) and unit(lhs_dilation) and unit(rhs_dilation)
          and feature_group_count == 1 and inputs.ndim == 4 and not isinstance(padding, str)):
    raise ValueError("stride1_conv: a 2-D stride-1 undilated convolution with explicit padding "
                     f"expected, got strides {window_strides}, padding {padding!r}")
  if dimension_numbers != jax.lax.conv_dimension_numbers(
      inputs.shape, kernel.shape, ("NHWC", "HWIO", "NHWC")):
    raise ValueError(f"stride1_conv: NHWC/HWIO expected, got {dimension_numbers}")
  return stride1_conv(inputs, kernel, tuple(tuple(p) for p in padding), precision)


def conv(features, kernel_size, dtype, name):
  """A square stride-1 NHWC convolution padded (k - 1) / 2 per side, like PyTorch SD's convs
  (`stride1_conv`: the same values, a faster backward pass on XLA:CPU)."""
  half = (kernel_size - 1) // 2
  return nn.Conv(features, (kernel_size, kernel_size), padding=((half, half), (half, half)),
                 dtype=dtype, name=name, conv_general_dilated=_flax_stride1_conv)


def multi_head_attention(query, key, value, num_heads, implementation=None):
  """softmax(q k^T / sqrt(d_h)) v per head.

  Args:
    query: (B, T, N d_h).
    key, value: (B, S, N d_h).
    num_heads: N.
    implementation: `jax.nn.dot_product_attention`'s (None = JAX's choice, "xla", "cudnn").
  Returns:
    (B, T, N d_h), in value's dtype.
  """
  batch, num_queries, width = query.shape
  head_dim = width // num_heads

  def split_heads(tensor):
    return tensor.reshape(tensor.shape[0], tensor.shape[1], num_heads, head_dim)

  output = jax.nn.dot_product_attention(split_heads(query), split_heads(key), split_heads(value),
                                        implementation=implementation)
  return output.reshape(batch, num_queries, width)


def upsample_nearest(hidden_states):
  """(B, h, w, C) -> (B, 2h, 2w, C), each pixel repeated (PyTorch `interpolate(mode="nearest")`)."""
  hidden_states = jnp.repeat(hidden_states, SPATIAL_FACTOR, axis=1)
  return jnp.repeat(hidden_states, SPATIAL_FACTOR, axis=2)


class Downsample2D(nn.Module):
  """A 3x3 stride-2 conv `conv`: (B, h, w, C) -> (B, h/2, w/2, out_channels).

  `padding` is ((top, bottom), (left, right)): the UNet pads 1 on every side
  (`UNET_DOWNSAMPLE_PADDING`), the VAE encoder 0 before and 1 after (PyTorch's
  `F.pad(x, (0, 1, 0, 1))` then an unpadded conv).
  """
  out_channels: int
  padding: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_states):
    return nn.Conv(self.out_channels, (3, 3), strides=(SPATIAL_FACTOR, SPATIAL_FACTOR),
                   padding=self.padding, dtype=self.dtype, name="conv")(hidden_states)


class Upsample2D(nn.Module):
  """Nearest 2x upsample, then a 3x3 conv `conv`: (B, h, w, C) -> (B, 2h, 2w, out_channels)."""
  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_states):
    return conv(self.out_channels, 3, self.dtype, "conv")(upsample_nearest(hidden_states))


class ResnetBlock2D(nn.Module):
  """PyTorch ResnetBlock2D: `shortcut(x) + conv2(silu(GN_2(conv1(silu(GN_1 x)) [+ W silu(emb)])))`.

  The 1x1 `conv_shortcut` exists only when the input width differs from `out_channels`; the
  time projection `time_emb_proj` only when `emb` is given (the VAE's blocks have none).

  Args of `__call__`:
    hidden_states: (B, h, w, C_in).
    emb: (B, E) or None.
  Returns:
    (B, h, w, out_channels).
  """
  out_channels: int
  norm_num_groups: int
  norm_eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_states, emb=None):
    residual = hidden_states
    hidden_states = group_norm(self.norm_num_groups, self.norm_eps, self.dtype,
                               "norm1")(hidden_states)
    hidden_states = conv(self.out_channels, 3, self.dtype, "conv1")(nn.silu(hidden_states))
    if emb is not None:
      emb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))
      hidden_states = hidden_states + emb[:, None, None, :]
    hidden_states = group_norm(self.norm_num_groups, self.norm_eps, self.dtype,
                               "norm2")(hidden_states)
    hidden_states = conv(self.out_channels, 3, self.dtype, "conv2")(nn.silu(hidden_states))
    if residual.shape[-1] != self.out_channels:
      residual = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(residual)
    return residual + hidden_states


# ---------------------------------------------------------------------------------------------
# Time embeddings.


def sinusoidal_embedding(positions, dim, flip_sin_to_cos, freq_shift):
  """[sin(p f_k), cos(p f_k)] with f_k = exp(-ln(10000) k / (dim/2 - freq_shift)), k < dim/2.

  diffusers `get_timestep_embedding` (`flip_sin_to_cos` puts the cosines first), in float32.

  Args:
    positions: (M,) timesteps (any real dtype).
    dim: the embedding width (even).
  Returns:
    (M, dim) float32.
  """
  half = dim // 2
  exponent = -math.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = positions.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  embedding = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


class TimestepEmbedding(nn.Module):
  """`linear_2(silu(linear_1(x)))`: (B, F) -> (B, E) (diffusers TimestepEmbedding)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    hidden = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(inputs)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(hidden))


# ---------------------------------------------------------------------------------------------
# Spatial transformer.


class Attention(nn.Module):
  """Multi-head (cross-)attention: `to_out_0(attn(to_q x, to_k c, to_v c))`, no q/k/v bias.

  Args of `__call__`:
    hidden_states: (B, T, C).
    context: (B, S, D), or None for self-attention (then c = x).
  Returns:
    (B, T, C).
  """
  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, hidden_states, context=None):
    context = hidden_states if context is None else context
    inner_dim = self.num_heads * self.head_dim
    query = nn.Dense(inner_dim, use_bias=False, dtype=self.dtype, name="to_q")(hidden_states)
    key = nn.Dense(inner_dim, use_bias=False, dtype=self.dtype, name="to_k")(context)
    value = nn.Dense(inner_dim, use_bias=False, dtype=self.dtype, name="to_v")(context)
    output = multi_head_attention(query, key, value, self.num_heads,
                                  self.attention_implementation)
    return nn.Dense(hidden_states.shape[-1], dtype=self.dtype, name="to_out_0")(output)


class GEGLU(nn.Module):
  """`a * gelu(g)` with `[a, g] = proj(x)` split in halves; the EXACT (erf) gelu, as PyTorch SD."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_states):
    projected = nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(hidden_states)
    linear, gate = jnp.split(projected, 2, axis=-1)
    return linear * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """`net_2(GEGLU(x))` with hidden width 4 C: (B, T, C) -> (B, T, C) (diffusers FeedForward)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_states):
    width = hidden_states.shape[-1]
    hidden = GEGLU(FEED_FORWARD_MULTIPLIER * width, self.dtype, name="net_0")(hidden_states)
    return nn.Dense(width, dtype=self.dtype, name="net_2")(hidden)


class BasicTransformerBlock(nn.Module):
  """Pre-LN block: self-attn (or cross-attn if `only_cross_attention`), cross-attn, GEGLU FF.

  h += attn1(LN_1 h [, ctx]);  h += attn2(LN_2 h, ctx);  h += ff(LN_3 h)      (B, T, C)
  """
  num_heads: int
  head_dim: int
  only_cross_attention: bool = False
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  def _layer_norm(self, name):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False,
                        name=name)

  def _attention(self, name):
    return Attention(self.num_heads, self.head_dim, self.dtype, self.attention_implementation,
                     name=name)

  @nn.compact
  def __call__(self, hidden_states, context):
    self_context = context if self.only_cross_attention else None
    hidden_states = hidden_states + self._attention("attn1")(
        self._layer_norm("norm1")(hidden_states), self_context)
    hidden_states = hidden_states + self._attention("attn2")(
        self._layer_norm("norm2")(hidden_states), context)
    return hidden_states + FeedForward(self.dtype, name="ff")(
        self._layer_norm("norm3")(hidden_states))


class Transformer2DModel(nn.Module):
  """Spatial transformer: `x + proj_out(blocks(proj_in(GN(x)), ctx))` over the h w tokens.

  `proj_in`/`proj_out` are 1x1 convolutions (SD1.x) or Dense layers (`use_linear_projection`,
  SD2.x/SDXL): the same map, stored as a (1, 1, C, C) or a (C, C) kernel.

  Args of `__call__`:
    hidden_states: (B, h, w, C), C = num_heads * head_dim.
    context: (B, L, D).
  Returns:
    (B, h, w, C).
  """
  num_heads: int
  head_dim: int
  depth: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  norm_num_groups: int = 32
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, hidden_states, context):
    batch, height, width, channels = hidden_states.shape
    inner_dim = self.num_heads * self.head_dim
    residual = hidden_states
    hidden_states = group_norm(self.norm_num_groups, TRANSFORMER_GROUP_NORM_EPS, self.dtype,
                               "norm")(hidden_states)
    if self.use_linear_projection:
      hidden_states = hidden_states.reshape(batch, height * width, channels)
      hidden_states = nn.Dense(inner_dim, dtype=self.dtype, name="proj_in")(hidden_states)
    else:
      hidden_states = conv(inner_dim, 1, self.dtype, "proj_in")(hidden_states)
      hidden_states = hidden_states.reshape(batch, height * width, inner_dim)
    for index in range(self.depth):
      hidden_states = BasicTransformerBlock(
          self.num_heads, self.head_dim, self.only_cross_attention, self.dtype,
          self.attention_implementation, name=f"transformer_blocks_{index}")(hidden_states, context)
    if self.use_linear_projection:
      hidden_states = nn.Dense(channels, dtype=self.dtype, name="proj_out")(hidden_states)
      hidden_states = hidden_states.reshape(batch, height, width, channels)
    else:
      hidden_states = hidden_states.reshape(batch, height, width, inner_dim)
      hidden_states = conv(channels, 1, self.dtype, "proj_out")(hidden_states)
    return hidden_states + residual


# ---------------------------------------------------------------------------------------------
# UNet levels.


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
  """The spatial transformers of one UNet level (None in a level without attention)."""
  num_heads: int
  depth: int
  use_linear_projection: bool
  only_cross_attention: bool


class _LevelBlock(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  out_channels: int
  num_layers: int
  transformer: TransformerSpec | None
  norm_num_groups: int
  norm_eps: float
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  def _resnet(self, index):
    return ResnetBlock2D(self.out_channels, self.norm_num_groups, self.norm_eps, self.dtype,
                         name=f"resnets_{index}")

  def _attention(self, index):
    spec = self.transformer
    return Transformer2DModel(
        spec.num_heads, self.out_channels // spec.num_heads, spec.depth,
        spec.use_linear_projection, spec.only_cross_attention, self.norm_num_groups, self.dtype,
        self.attention_implementation, name=f"attentions_{index}")


class DownBlock2D(_LevelBlock):
  """A down level: CrossAttnDownBlock2D (with `transformer`) or DownBlock2D (without).

  Each layer is `resnets_j` [then `attentions_j`]; `downsamplers_0` is a 3x3 stride-2 conv
  (padding 1). Every layer's output and the downsampled output are skips for the up path.

  Args of `__call__`:
    hidden_states: (B, h, w, C_in); emb: (B, E); context: (B, L, D) (unused without attention).
  Returns:
    (hidden_states (B, h', w', C_out), skips: tuple of (B, ., ., C_out)), h' = h/2 if
    `add_downsample` else h.
  """
  add_downsample: bool = True

  @nn.compact
  def __call__(self, hidden_states, emb, context):
    skips = ()
    for index in range(self.num_layers):
      hidden_states = self._resnet(index)(hidden_states, emb)
      if self.transformer is not None:
        hidden_states = self._attention(index)(hidden_states, context)
      skips += (hidden_states,)
    if self.add_downsample:
      hidden_states = Downsample2D(self.out_channels, UNET_DOWNSAMPLE_PADDING, self.dtype,
                                   name="downsamplers_0")(hidden_states)
      skips += (hidden_states,)
    return hidden_states, skips


class UpBlock2D(_LevelBlock):
  """An up level: CrossAttnUpBlock2D (with `transformer`) or UpBlock2D (without).

  Each layer concatenates the last remaining skip on the channels ([x, skip], as PyTorch's
  `torch.cat([hidden, res], dim=1)`), then `resnets_j` [then `attentions_j`]; `upsamplers_0` is a
  nearest 2x upsample and a 3x3 conv.

  Args of `__call__`:
    hidden_states: (B, h, w, C); emb: (B, E); context: (B, L, D);
    skips: `num_layers` skips, consumed last first.
  Returns:
    (B, h', w', C_out), h' = 2h if `add_upsample` else h.
  """
  add_upsample: bool = True

  @nn.compact
  def __call__(self, hidden_states, emb, context, skips):
    if len(skips) != self.num_layers:
      raise ValueError(f"up block got {len(skips)} skips; expected {self.num_layers}")
    for index in range(self.num_layers):
      hidden_states = jnp.concatenate([hidden_states, skips[-1 - index]], axis=-1)
      hidden_states = self._resnet(index)(hidden_states, emb)
      if self.transformer is not None:
        hidden_states = self._attention(index)(hidden_states, context)
    if self.add_upsample:
      hidden_states = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(hidden_states)
    return hidden_states


class MidBlock2DCrossAttn(_LevelBlock):
  """UNetMidBlock2DCrossAttn: `resnets_0`, then `num_layers` x (`attentions_j`, `resnets_{j+1}`).

  Args of `__call__`: hidden_states (B, h, w, C), emb (B, E), context (B, L, D).
  Returns: (B, h, w, C).
  """

  @nn.compact
  def __call__(self, hidden_states, emb, context):
    hidden_states = self._resnet(0)(hidden_states, emb)
    for index in range(self.num_layers):
      hidden_states = self._attention(index)(hidden_states, context)
      hidden_states = self._resnet(index + 1)(hidden_states, emb)
    return hidden_states


# ---------------------------------------------------------------------------------------------
# The UNet.


def remat_policy_from_name(name):
  """A `jax.checkpoint_policies` member by name; None = save nothing (recompute everything)."""
  if name is None:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"remat_policy={name!r}: expected None or a jax.checkpoint_policies name, "
                     "e.g. 'nothing_saveable' or 'dots_with_no_batch_dims_saveable'")
  return policy


class UNet2DConditionModel(nn.Module):
  """The conditional UNet eps(x_t, t, c) (see the module docstring for what it computes).

  Attributes:
    config: the architecture (`UNetConfig.from_diffusers(config_json_dict)`).
    dtype: compute dtype; params are float32 whatever it is.
    remat_blocks: wrap each down/mid/up block in `nn.remat` (activations recomputed in the
      backward pass; same outputs, same parameter names).
    remat_policy: a `jax.checkpoint_policies` name for `remat_blocks`; None saves nothing.
    attention_implementation: `jax.nn.dot_product_attention`'s (None = JAX's choice).
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  remat_blocks: bool = False
  remat_policy: str | None = None
  attention_implementation: str | None = None

  def _block_class(self, block_class):
    if not self.remat_blocks:
      return block_class
    return nn.remat(block_class, policy=remat_policy_from_name(self.remat_policy))

  def _transformer_spec(self, level, has_attention):
    config = self.config
    if not has_attention:
      return None
    return TransformerSpec(
        num_heads=config.num_attention_heads[level],
        depth=config.transformer_layers_per_block[level],
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=config.only_cross_attention[level])

  def _embedding(self, timesteps, batch, added_cond_kwargs):
    """emb (B, E): the time embedding [+ SDXL's text_time embedding]."""
    config = self.config
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    time_features = sinusoidal_embedding(timesteps, config.block_out_channels[0],
                                         config.flip_sin_to_cos, config.freq_shift)
    emb = TimestepEmbedding(config.time_embed_dim, self.dtype, name="time_embedding")(
        time_features)
    if config.addition_embed_type == TEXT_TIME:
      if added_cond_kwargs is None or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
        raise ValueError("addition_embed_type 'text_time' needs added_cond_kwargs with "
                         "'text_embeds' (B, P) and 'time_ids' (B, K); got "
                         f"{None if added_cond_kwargs is None else sorted(added_cond_kwargs)}")
      text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"], jnp.float32)
      time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
      time_embeds = sinusoidal_embedding(time_ids.reshape(-1), config.addition_time_embed_dim,
                                         config.flip_sin_to_cos, config.freq_shift)
      added = jnp.concatenate([text_embeds, time_embeds.reshape(batch, -1)], axis=-1)
      if added.shape[-1] != config.projection_class_embeddings_input_dim:
        raise ValueError(
            f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
            f"{added.shape[-1]} added features; expected projection_class_embeddings_input_dim="
            f"{config.projection_class_embeddings_input_dim}")
      emb = emb + TimestepEmbedding(config.time_embed_dim, self.dtype, name="add_embedding")(added)
    return emb

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None):
    """eps(x_t, t, c).

    Args:
      sample: (B, C, h, w) NCHW latents; h and w divisible by 2 ** (levels - 1).
      timesteps: (B,) or a scalar (broadcast), int or float.
      encoder_hidden_states: (B, L, D) text embeddings.
      added_cond_kwargs: SDXL only: {"text_embeds": (B, P), "time_ids": (B, K)}; else ignored.
    Returns:
      (B, out_channels, h, w) NCHW, in `dtype`.
    """
    config = self.config
    batch, _, height, width = sample.shape
    scale = SPATIAL_FACTOR ** config.num_downsamplers
    if height % scale or width % scale:
      raise ValueError(f"latent size {height}x{width}: expected both divisible by {scale} (the "
                       f"UNet halves them {config.num_downsamplers} times)")
    emb = self._embedding(timesteps, batch, added_cond_kwargs)
    context = jnp.asarray(encoder_hidden_states).astype(self.dtype)
    hidden_states = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)  # NCHW -> NHWC
    hidden_states = conv(config.block_out_channels[0], 3, self.dtype, "conv_in")(hidden_states)

    common = dict(norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
                  dtype=self.dtype, attention_implementation=self.attention_implementation)
    last_level = len(config.block_out_channels) - 1
    skips = (hidden_states,)
    down_class = self._block_class(DownBlock2D)
    for level, block_type in enumerate(config.down_block_types):
      hidden_states, level_skips = down_class(
          out_channels=config.block_out_channels[level],
          num_layers=config.layers_per_block[level],
          transformer=self._transformer_spec(level, block_type == CROSS_ATTN_DOWN),
          add_downsample=level != last_level, name=f"down_blocks_{level}", **common)(
              hidden_states, emb, context)
      skips += level_skips

    if config.mid_block_type == CROSS_ATTN_MID:
      mid_spec = dataclasses.replace(self._transformer_spec(last_level, True),
                                     only_cross_attention=False)
      hidden_states = self._block_class(MidBlock2DCrossAttn)(
          out_channels=config.block_out_channels[-1], num_layers=1, transformer=mid_spec,
          name="mid_block", **common)(hidden_states, emb, context)

    up_class = self._block_class(UpBlock2D)
    for index, block_type in enumerate(config.up_block_types):
      level = last_level - index  # up block i mirrors down level n-1-i
      num_layers = config.layers_per_block[level] + 1
      level_skips, skips = skips[-num_layers:], skips[:-num_layers]
      hidden_states = up_class(
          out_channels=config.block_out_channels[level], num_layers=num_layers,
          transformer=self._transformer_spec(level, block_type == CROSS_ATTN_UP),
          add_upsample=level != 0, name=f"up_blocks_{index}", **common)(
              hidden_states, emb, context, level_skips)

    hidden_states = group_norm(config.norm_num_groups, config.norm_eps, self.dtype,
                               "conv_norm_out")(hidden_states)
    hidden_states = conv(config.out_channels, 3, self.dtype, "conv_out")(nn.silu(hidden_states))
    return jnp.transpose(hidden_states, (0, 3, 1, 2))  # NHWC -> NCHW

  def init_weights(self, rng):
    """Random float32 params (Flax default initialisers) from the smallest valid input.

    The parameter shapes do not depend on the spatial size or the text length, so the init runs
    at h = w = 2 ** (levels - 1) and L = 1 (use `jax.eval_shape(module.init_weights, rng)` for
    shapes only).
    """
    config = self.config
    size = SPATIAL_FACTOR ** config.num_downsamplers
    sample = jnp.zeros((1, config.in_channels, size, size), jnp.float32)
    context = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32)
    added_cond_kwargs = None
    if config.addition_embed_type == TEXT_TIME:
      # One micro-condition: only the concatenated width (the add_embedding's input) matters.
      text_width = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim
      added_cond_kwargs = {"text_embeds": jnp.zeros((1, text_width), jnp.float32),
                           "time_ids": jnp.zeros((1, 1), jnp.float32)}
    return self.init(rng, sample, jnp.ones((1,), jnp.float32), context,
                     added_cond_kwargs)["params"]


def from_diffusers_config(values, **module_kwargs):
  """`UNet2DConditionModel(UNetConfig.from_diffusers(values), **module_kwargs)`."""
  return UNet2DConditionModel(UNetConfig.from_diffusers(values), **module_kwargs)
