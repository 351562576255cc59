"""The shapes world's "aesthetic" reward: an image-only proxy of gold QUALITY, and its image tower.

Shape legend: B batch, S image side (32), d the trunk's embedding width (`AestheticNet.hidden`).

The analogue of the LAION aesthetic predictor that the paper's main runs maximise: that predictor
is an affine head on the unit-normalised CLIP image embedding, fit to a limited set of human
ratings, and blind to the prompt. Here:

  e(x)     = t(x) / ||t(x)||_2          t = the image trunk: stride-2 convs (16, 32, 64) ->
                                            flatten (4x4x64) -> Dense(d) gelu -> Dense(d) gelu
  r_psi(x) = w . e(x) + b               the affine head

fit by regression, min_psi mean (r_psi(x) - quality(x))^2, on a LIMITED set of gold quality
labels (`labelled_set`: world renders perturbed by noise, tint, blur and blanks, the proxy's
perturbations, labelled with `gold.quality`). It never sees a prompt, so maximising it can trade
prompt fidelity (the other 80 % of gold) for what it scores: the cross-reward evaluation of the
paper (ImageReward / HPSv2 / PickScore there; gold fidelity, gold quality and the
prompt-conditioned proxy here) is what shows that.

`e(x)` is also the tower TDPO-R's critic reads with `config.critic.tower = "shapes_aesthetic"`,
as the paper's critic reads the aesthetic predictor's CLIP tower (`make_tower`).

  python -m tdpo_jax.shapes.aesthetic --out=aesthetic.msgpack [--examples=3000 --steps=3000]
"""
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax.models import convert
from tdpo_jax.rewards import registry
from tdpo_jax.shapes import gold
from tdpo_jax.shapes import proxy
from tdpo_jax.shapes import world

NORM_EPS = 1e-12  # floor on ||t(x)||, so an all-zero trunk output does not divide by 0
DEFAULT_EXAMPLES = 3000  # labelled renders of `python -m tdpo_jax.shapes.aesthetic`


class AestheticNet(nn.Module):
  """r_psi(x) = w . e(x) + b on the unit-normalised trunk embedding e(x) (module docstring).

  Attributes:
    features: channels of the stride-2 convs (32 -> 16 -> 8 -> 4 px).
    hidden: d, the width of the trunk's two Dense layers and of the embedding.
  """
  features: tuple = (16, 32, 64)
  hidden: int = 64

  def setup(self):
    self.convs = [nn.Conv(channels, (3, 3), strides=2) for channels in self.features]
    self.dense = [nn.Dense(self.hidden), nn.Dense(self.hidden)]
    self.head = nn.Dense(1)

  def embed(self, images):
    """images (B, S, S, 3) in [0, 1] -> (B, d) unit-norm embeddings e(x)."""
    x = images.astype(jnp.float32) * 2.0 - 1.0
    for conv in self.convs:
      x = nn.gelu(conv(x))
    x = x.reshape(x.shape[0], -1)
    for dense in self.dense:
      x = nn.gelu(dense(x))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), NORM_EPS)

  def __call__(self, images):
    """images (B, S, S, 3) in [0, 1] -> (B,) float32 scores."""
    return self.head(self.embed(images))[:, 0]


def quality_labels(images):
  """gold quality (B,) float32 of images (B, S, S, 3) in [0, 1] (no prompt needed)."""
  labels = []
  for image in np.asarray(images):
    objects, object_mask = gold.detect(image)
    labels.append(gold.quality(image, objects, object_mask))
  return np.asarray(labels, np.float32)


def labelled_set(seed, size):
  """(images float32 (N, S, S, 3), gold quality labels float32 (N,)): perturbed renders."""
  rng = np.random.default_rng(seed)
  images = np.stack([proxy.perturb(rng, world.render(world.sample_scene(rng)))
                     for _ in range(size)]).astype(np.float32)
  return images, quality_labels(images)


def train(seed, examples, steps, batch_size=64, learning_rate=1e-3):
  """Fits AestheticNet to `examples` quality labels; returns (params, train MSE of the last 100
  steps)."""
  images, labels = labelled_set(seed, examples)
  net = AestheticNet()
  params = net.init(jax.random.key(seed), images[:1])["params"]
  return proxy.fit_regression(net, params, (images,), labels, steps, seed, batch_size,
                              learning_rate)


def load_params(weights):
  """AestheticNet params from a msgpack written by `python -m tdpo_jax.shapes.aesthetic`."""
  return proxy.load_weights(weights, "shapes_aesthetic", "tdpo_jax.shapes.aesthetic")


def make_reward_fn(weights, cache_dir=""):
  """`reward_fn(images (B, S, S, 3) in [0, 1], prompts) -> (B,)`; the prompts are ignored."""
  del cache_dir
  params = load_params(weights)
  # An image-only reward, as the LAION aesthetic predictor: no prompt inputs.
  return registry.DeviceReward(lambda p, x: AestheticNet().apply({"params": p}, x), params)


def make_tower(weights):
  """The critic's image tower: (embed_fn(params, images (B, S, S, 3)) -> (B, d), params).

  `embed_fn` is pure and jittable: e(x), the unit-norm trunk embedding the reward's affine head
  reads.
  """
  def embed_fn(params, images):
    return AestheticNet().apply({"params": params}, images, method=AestheticNet.embed)

  return embed_fn, load_params(weights)


def held_out_correlation(weights, seed=1000, size=1000):
  """Pearson correlation of the reward with gold quality on `size` fresh perturbed renders."""
  images, labels = labelled_set(seed, size)
  scores = make_reward_fn(weights)(images, None)
  return float(np.corrcoef(scores, labels)[0, 1]), float(np.mean((scores - labels) ** 2))


def main(argv=None):
  args = proxy.parse_fit_args("python -m tdpo_jax.shapes.aesthetic", DEFAULT_EXAMPLES, argv)
  start = time.time()
  params, loss = train(args.seed, args.examples, args.steps)
  convert.save_msgpack(params, args.out)
  corr, mse = held_out_correlation(args.out)
  logging.info("aesthetic: train mse %.4f, held-out mse %.4f, corr with gold quality %.3f "
               "(%.0f s) -> %s", loss, mse, corr, time.time() - start, args.out)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  main()
