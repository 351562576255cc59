"""The TDPO-R critic: a value head on frozen image embeddings of noisy latents (DESIGN §3).

Shape legend:
  B  batch
  d  embedding width (768 for CLIP-L/14, 1024 for ViT-H/14)
  d_l  width of hidden layer l (default 1024, 128, 64, 16)
  C, h, w  latent channels / height / width; latents are NCHW (what the Flax UNet takes)
  H, W  image height / width; images are NHWC float32 in [0, 1]

The critic estimates `V_phi(x_t)` as

  e = normalise(embed(decode(x_t)))                      (frozen, no gradient)
  V = W_4 a(W_3 a(W_2 a(W_1 a(W_0 e + b_0) + b_1) + b_2) + b_3) + b_4

with dropout (0.2, 0.2, 0.1) after the first three hidden layers. The official critic has **no
nonlinearity**: `a` is the identity by default, so the critic is an affine map of `e`; other
activations are a config option (`config.critic.activation`). Every layer's weights are drawn
from N(0, sigma^2) with sigma = 1/(d+1) (a standard deviation, the same for all layers, d the
*embedding* width) and biases are 0.
"""
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The aesthetic reward's CLIP-L/14 embedding width; only the module's default init_std uses it.
CLIP_L14_EMBED_DIM = 768

ACTIVATIONS = {
  "identity": lambda x: x,
  "relu": nn.relu,
  "gelu": nn.gelu,
  "silu": nn.silu,
  "tanh": jnp.tanh,
}


def preactivation_name(index: int) -> str:
  """Name under which hidden layer `index` sows its pre-activation ("intermediates")."""
  return f"hidden_{index}_preactivation"


def critic_init_std(embed_dim: int) -> float:
  """The critic's weight-init standard deviation, sigma = 1/(d+1) (DESIGN §3).

  Args:
    embed_dim: d, the width of the embedding the critic reads.

  Returns:
    1 / (embed_dim + 1).
  """
  if embed_dim < 1:
    raise ValueError(f"embed_dim={embed_dim!r}; expected a positive embedding width")
  return 1.0 / (embed_dim + 1)


class CriticMLP(nn.Module):
  """MLP value head `d -> 1024 -> 128 -> 64 -> 16 -> 1` (DESIGN §3).

  The official critic has no nonlinearity between its layers: with the default
  `activation="identity"` the whole network is affine in its input. Dropout follows hidden
  layer i when `dropout_rates[i] > 0` (default: after the first three). Each hidden layer's
  pre-activation `h_l = x_{l-1} W_l + b_l` is sown into the "intermediates" collection as
  `hidden_{l}` so that the neuron reset (tdpo_jax/reset.py) can score neurons.

  Attributes:
    hidden_sizes: widths d_l of the hidden layers `hidden_0 ... hidden_{L-1}`.
    dropout_rates: one dropout rate per hidden layer; 0.0 = no dropout after that layer.
    activation: "identity" (official), "relu", "gelu", "silu" or "tanh".
    init_std: standard deviation of every layer's weights (callers pass 1/(d+1)).
  """
  hidden_sizes: Sequence[int] = (1024, 128, 64, 16)
  dropout_rates: Sequence[float] = (0.2, 0.2, 0.1, 0.0)
  activation: str = "identity"
  init_std: float = 1.0 / (CLIP_L14_EMBED_DIM + 1)

  @nn.compact
  def __call__(self, embeds: jax.Array, *, deterministic: bool) -> jax.Array:
    """Critic values of a batch of embeddings.

    Args:
      embeds: (B, d) embeddings (L2-normalised by `embed_noisy_latents`).
      deterministic: True turns dropout off (values for advantages); False needs
        `rngs={"dropout": key}` (the value loss).

    Returns:
      (B,) values V(e).
    """
    if len(self.hidden_sizes) != len(self.dropout_rates):
      raise ValueError(
        f"dropout_rates={tuple(self.dropout_rates)!r} has {len(self.dropout_rates)} entries; "
        f"expected one per hidden layer of hidden_sizes={tuple(self.hidden_sizes)!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f"activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
    activation_fn = ACTIVATIONS[self.activation]
    kernel_init = nn.initializers.normal(stddev=self.init_std)
    bias_init = nn.initializers.zeros
    x = embeds
    for index, (width, rate) in enumerate(zip(self.hidden_sizes, self.dropout_rates)):
      h = nn.Dense(width, kernel_init=kernel_init, bias_init=bias_init, name=f"hidden_{index}")(x)
      self.sow("intermediates", preactivation_name(index), h)
      x = activation_fn(h)
      if rate > 0.0:
        x = nn.Dropout(rate=rate)(x, deterministic=deterministic)
    values = nn.Dense(1, kernel_init=kernel_init, bias_init=bias_init, name="output")(x)
    return values[:, 0]


def make_critic(config_critic, embed_dim: int) -> CriticMLP:
  """Builds the critic from `config.critic` (configs/sd15.py).

  Args:
    config_critic: has `hidden_sizes`, `dropout_rates`, `activation` and `init_std`
      (0 = use `critic_init_std(embed_dim)`).
    embed_dim: d, the width of the embedding the critic reads.

  Returns:
    A `CriticMLP`.
  """
  init_std = float(config_critic.init_std)
  if init_std < 0.0:
    raise ValueError(f"config.critic.init_std={init_std!r}; expected >= 0 (0 = 1/(d+1))")
  if init_std == 0.0:
    init_std = critic_init_std(embed_dim)
  return CriticMLP(
    hidden_sizes=tuple(int(width) for width in config_critic.hidden_sizes),
    dropout_rates=tuple(float(rate) for rate in config_critic.dropout_rates),
    activation=str(config_critic.activation),
    init_std=init_std,
  )


def embed_noisy_latents(
  decode_fn: Callable[[jax.Array], jax.Array],
  embed_fn: Callable[[jax.Array], jax.Array],
  latents: jax.Array,
  eps: float = 1e-12,
) -> jax.Array:
  """The critic's frozen input path: x_t -> VAE decode -> [0,1] image -> image embed -> L2 norm.

    e = stop_gradient(z / max(||z||_2, eps)),   z = embed_fn(decode_fn(x_t))

  Model-agnostic: the caller binds the VAE and image encoder (e.g. `models.decode_latents` and
  `models.image_encoder.embed_images` with their frozen params) into the two callables.

  Args:
    decode_fn: latents (B, C, h, w) NCHW -> images (B, H, W, 3) NHWC in [0, 1].
    embed_fn: images (B, H, W, 3) -> embeddings (B, d) (not normalised).
    latents: (B, C, h, w) noisy latents x_t, NCHW.
    eps: floor on the norm, so an all-zero embedding does not divide by 0.

  Returns:
    (B, d) unit-norm embeddings, with no gradient to the frozen models or the latents.
  """
  images = decode_fn(latents)
  embeds = embed_fn(images)
  norms = jnp.linalg.norm(embeds, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(embeds / jnp.maximum(norms, eps))
