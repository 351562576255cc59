"""Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`) as Flax linen modules, NHWC.

Shape legend: B batch, H/W image height/width, C_img image channels (3), z latent channels (4),
f = 2 ** (levels - 1) the downsampling factor (8 for SD), h = H/f, w = W/f, C_i the channels of
level i (`block_out_channels[i]`). Everything here is NHWC, in and out (no transposes inside):

  mean, logvar = vae.apply({"params": p}, images (B, H, W, C_img) in [-1, 1], method=vae.encode)
                                                          -> (B, h, w, z), (B, h, w, z)
  images       = vae.apply({"params": p}, latents (B, h, w, z), method=vae.decode)
                                                          -> (B, H, W, C_img), about [-1, 1]

No scaling factor is applied inside: the pipeline divides latents by `config.scaling_factor`
before `decode` (and multiplies after `encode`).

What it computes (diffusers `models/autoencoders/autoencoder_kl.py` and `vae.py`):
  encoder: conv_in; per level `layers_per_block` ResnetBlock2D then (but the last level) a stride-2
           conv after padding 1 pixel at the bottom and right; mid block; GN, silu, conv_out to 2z
  [mean, logvar] = quant_conv(encoder(x)) split on the channels; logvar clipped to [-30, 20]
           (diffusers `DiagonalGaussianDistribution`)
  decoder: post_quant_conv; conv_in; mid block; per level (reversed) `layers_per_block + 1`
           ResnetBlock2D then (but the last) a nearest 2x upsample + conv; GN, silu, conv_out
  mid block: ResnetBlock2D, single-head self-attention over the h w tokens with a GN before and
           the residual added, ResnetBlock2D
All GroupNorms use epsilon 1e-6 and `norm_num_groups`; the resnets have no time embedding.

The parameter tree is the one `diffusers.FlaxAutoencoderKL` builds for the same config
(`encoder/down_blocks_0/resnets_0/conv1/kernel`, the attention's `query/key/value/proj_attn`).
Every module takes `dtype`, the compute dtype; parameters are float32.
"""
import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from tdpo_jax.models import unet

# diffusers builds every VAE GroupNorm (resnets, attention, conv_norm_out) with epsilon 1e-6.
VAE_NORM_EPS = 1e-6
# `DiagonalGaussianDistribution` clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
# The encoder's stride-2 conv: PyTorch pads (0, 1, 0, 1) (bottom and right) then convolves
# unpadded (Downsample2D with padding=0).
ENCODER_DOWNSAMPLE_PADDING = ((0, 1), (0, 1))

DOWN_ENCODER_BLOCK, UP_DECODER_BLOCK = "DownEncoderBlock2D", "UpDecoderBlock2D"

# diffusers config keys implemented only at their default (another value raises): {key: default}.
_FIXED_KEYS = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
               "mid_block_add_attention": True}
# Metadata for the pipeline or PyTorch only: `latents_mean`/`latents_std` (SDXL-style latent
# normalisation, applied outside), `force_upcast` (PyTorch's fp16 VAE workaround).
_METADATA_KEYS = frozenset({"latents_mean", "latents_std", "force_upcast"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture of an `AutoencoderKL` (defaults: diffusers' PyTorch `AutoencoderKL`).

  `scaling_factor` and `shift_factor` are not used by the module: the pipeline scales latents
  as `(z - shift) * scaling` after encode and inverts it before decode.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = (DOWN_ENCODER_BLOCK,)
  up_block_types: tuple = (UP_DECODER_BLOCK,)
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None

  def __post_init__(self):
    num_levels = len(self.block_out_channels)
    for key, allowed in (("down_block_types", DOWN_ENCODER_BLOCK),
                         ("up_block_types", UP_DECODER_BLOCK)):
      types = getattr(self, key)
      if len(types) != num_levels or any(name != allowed for name in types):
        raise ValueError(f"VAE config: {key}={list(types)}; expected {num_levels} x {allowed!r} "
                         "(one per block_out_channels entry)")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        raise ValueError(f"VAE config: {channels} channels not divisible by "
                         f"norm_num_groups={self.norm_num_groups}")

  @property
  def num_downsamplers(self):
    """log2 f: how many times the encoder halves H and W."""
    return len(self.block_out_channels) - 1

  @classmethod
  def from_diffusers(cls, values):
    """The config of a diffusers `AutoencoderKL` `config.json` (a dict).

    Raises:
      ValueError: an unsupported feature or block type, named.
    """
    values = {key: value for key, value in dict(values).items() if not key.startswith("_")}
    for key, default in _FIXED_KEYS.items():
      if key in values and values[key] != default:
        raise ValueError(f"VAE config: {key}={values[key]!r} is not supported; expected "
                         f"{default!r} (the Stable Diffusion VAEs' value)")
    fields = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields - set(_FIXED_KEYS) - _METADATA_KEYS)
    if unknown:
      logging.warning("VAE config keys ignored (unknown to tdpo_jax.models.vae): %s", unknown)
    kwargs = {key: values[key] for key in fields if key in values}
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)


class VAEAttention(nn.Module):
  """Single-head self-attention over the h w tokens: `x + proj_attn(attn(q, k, v))`.

  q, k, v = `query`, `key`, `value` (Dense, with bias) of `group_norm(x)` (diffusers `Attention`
  with `_from_deprecated_attn_block`, whose old names the Flax tree keeps).

  Args of `__call__`: hidden_states (B, h, w, C). Returns: (B, h, w, C).
  """
  norm_num_groups: int
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, hidden_states):
    batch, height, width, channels = hidden_states.shape
    residual = hidden_states
    hidden_states = unet.group_norm(self.norm_num_groups, VAE_NORM_EPS, self.dtype,
                                    "group_norm")(hidden_states)
    tokens = hidden_states.reshape(batch, height * width, channels)

    def dense(name):
      return nn.Dense(channels, dtype=self.dtype, name=name)

    output = unet.multi_head_attention(dense("query")(tokens), dense("key")(tokens),
                                       dense("value")(tokens), 1, self.attention_implementation)
    output = dense("proj_attn")(output).reshape(batch, height, width, channels)
    return output + residual


class MidBlock2D(nn.Module):
  """UNetMidBlock2D of the VAE: `resnets_0`, `attentions_0`, `resnets_1` (B, h, w, C) -> same."""
  channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, hidden_states):
    def resnet(index):
      return unet.ResnetBlock2D(self.channels, self.norm_num_groups, VAE_NORM_EPS, self.dtype,
                                name=f"resnets_{index}")

    hidden_states = resnet(0)(hidden_states)
    hidden_states = VAEAttention(self.norm_num_groups, self.dtype, self.attention_implementation,
                                 name="attentions_0")(hidden_states)
    return resnet(1)(hidden_states)


class _CoderBlock(nn.Module):
  """A VAE level: `num_layers` resnets, then a down- or upsampler (DownEncoder/UpDecoderBlock2D)."""
  out_channels: int
  num_layers: int
  norm_num_groups: int
  resample: bool
  dtype: Any = jnp.float32

  def _resnets(self, hidden_states):
    for index in range(self.num_layers):
      hidden_states = unet.ResnetBlock2D(self.out_channels, self.norm_num_groups, VAE_NORM_EPS,
                                         self.dtype, name=f"resnets_{index}")(hidden_states)
    return hidden_states


class DownEncoderBlock2D(_CoderBlock):
  """(B, H, W, C_in) -> (B, H/2, W/2, C_out) (H, W kept when `resample` is False)."""

  @nn.compact
  def __call__(self, hidden_states):
    hidden_states = self._resnets(hidden_states)
    if self.resample:
      hidden_states = unet.Downsample2D(self.out_channels, ENCODER_DOWNSAMPLE_PADDING, self.dtype,
                                        name="downsamplers_0")(hidden_states)
    return hidden_states


class UpDecoderBlock2D(_CoderBlock):
  """(B, h, w, C_in) -> (B, 2h, 2w, C_out) (h, w kept when `resample` is False)."""

  @nn.compact
  def __call__(self, hidden_states):
    hidden_states = self._resnets(hidden_states)
    if self.resample:
      hidden_states = unet.Upsample2D(self.out_channels, self.dtype,
                                      name="upsamplers_0")(hidden_states)
    return hidden_states


class Encoder(nn.Module):
  """(B, H, W, C_img) -> (B, h, w, 2z) moments (before quant_conv)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, images):
    config = self.config
    channels = config.block_out_channels
    hidden_states = unet.conv(channels[0], 3, self.dtype, "conv_in")(images)
    for level, out_channels in enumerate(channels):
      hidden_states = DownEncoderBlock2D(
          out_channels, config.layers_per_block, config.norm_num_groups,
          resample=level != len(channels) - 1, dtype=self.dtype,
          name=f"down_blocks_{level}")(hidden_states)
    hidden_states = MidBlock2D(channels[-1], config.norm_num_groups, self.dtype,
                               self.attention_implementation, name="mid_block")(hidden_states)
    hidden_states = unet.group_norm(config.norm_num_groups, VAE_NORM_EPS, self.dtype,
                                    "conv_norm_out")(hidden_states)
    return unet.conv(2 * config.latent_channels, 3, self.dtype, "conv_out")(
        nn.silu(hidden_states))


class Decoder(nn.Module):
  """(B, h, w, z) (after post_quant_conv) -> (B, H, W, C_out)."""
  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, latents):
    config = self.config
    reversed_channels = tuple(reversed(config.block_out_channels))
    hidden_states = unet.conv(reversed_channels[0], 3, self.dtype, "conv_in")(latents)
    hidden_states = MidBlock2D(reversed_channels[0], config.norm_num_groups, self.dtype,
                               self.attention_implementation, name="mid_block")(hidden_states)
    for index, out_channels in enumerate(reversed_channels):
      hidden_states = UpDecoderBlock2D(
          out_channels, config.layers_per_block + 1, config.norm_num_groups,
          resample=index != len(reversed_channels) - 1, dtype=self.dtype,
          name=f"up_blocks_{index}")(hidden_states)
    hidden_states = unet.group_norm(config.norm_num_groups, VAE_NORM_EPS, self.dtype,
                                    "conv_norm_out")(hidden_states)
    return unet.conv(config.out_channels, 3, self.dtype, "conv_out")(nn.silu(hidden_states))


class AutoencoderKL(nn.Module):
  """The KL autoencoder; `encode` and `decode` are its methods (see the module docstring).

  Attributes:
    config: the architecture (`VAEConfig.from_diffusers(config_json_dict)`).
    dtype: compute dtype; params are float32 whatever it is.
    attention_implementation: `jax.nn.dot_product_attention`'s (None = JAX's choice).
  """
  config: VAEConfig
  dtype: Any = jnp.float32
  attention_implementation: str | None = None

  def setup(self):
    config = self.config
    self.encoder = Encoder(config, self.dtype, self.attention_implementation)
    self.decoder = Decoder(config, self.dtype, self.attention_implementation)
    self.quant_conv = unet.conv(2 * config.latent_channels, 1, self.dtype, None)
    self.post_quant_conv = unet.conv(config.latent_channels, 1, self.dtype, None)

  def _check_size(self, height, width, factor, what):
    if height % factor or width % factor:
      raise ValueError(f"{what} size {height}x{width}: expected both divisible by {factor}")

  def encode(self, images):
    """The posterior's mean and log-variance.

    Args:
      images: (B, H, W, C_img) NHWC, in [-1, 1]; H, W divisible by f.
    Returns:
      (mean, logvar), each (B, h, w, z) NHWC in `dtype`; logvar clipped to [-30, 20].
    """
    self._check_size(images.shape[1], images.shape[2],
                     unet.SPATIAL_FACTOR ** self.config.num_downsamplers, "image")
    moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents):
    """Images from (unscaled) latents.

    Args:
      latents: (B, h, w, z) NHWC, already divided by the scaling factor.
    Returns:
      (B, h f, w f, C_out) NHWC in `dtype`, about [-1, 1] (not clipped).
    """
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype)))

  def __call__(self, images):
    """`decode(mean of encode(images))`: (B, H, W, C_img) -> (B, H, W, C_out); builds all params."""
    mean, _ = self.encode(images)
    return self.decode(mean)

  def init_weights(self, rng):
    """Random float32 params (Flax default initialisers) from a (1, f, f, C_img) image.

    The shapes do not depend on the image size (`jax.eval_shape(module.init_weights, rng)` for
    shapes only).
    """
    size = unet.SPATIAL_FACTOR ** self.config.num_downsamplers
    images = jnp.zeros((1, size, size, self.config.in_channels), jnp.float32)
    return self.init(rng, images)["params"]


def from_diffusers_config(values, **module_kwargs):
  """`AutoencoderKL(VAEConfig.from_diffusers(values), **module_kwargs)`."""
  return AutoencoderKL(VAEConfig.from_diffusers(values), **module_kwargs)
