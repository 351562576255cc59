"""The proxy reward of the shapes world: a small CNN + bag-of-words net fit to gold labels.

Shape legend: B batch, S image side (32), W prompt words (`MAX_WORDS`).

The proxy r_phi(x, c) is trained by regression, min_phi mean (r_phi(x, c) - gold(x, c))^2, on a
LIMITED labelled set: `labelled_set` renders world scenes, perturbs them (noise, tint, blur,
blank) and pairs half of them with a prompt that differs in one attribute, labelling each with
`gold.score`. Outside that distribution the proxy is unconstrained, which is what RL fine-tuning
can exploit (reward overoptimization).

  python -m tdpo_jax.shapes.proxy --out=proxy.msgpack [--examples=4000 --steps=3000 --seed=0]
"""
import logging
import time
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import ndimage

from tdpo_jax.models import convert
from tdpo_jax.rewards import registry
from tdpo_jax.shapes import gold
from tdpo_jax.shapes import world

MAX_WORDS = 8
VOCABULARY = tuple(world.vocabulary())
_WORD_IDS = {word: index + 1 for index, word in enumerate(VOCABULARY)}  # 0 = padding / unknown
# Perturbations of the labelled set.
PROB_WRONG_PROMPT = 0.5
PROB_NOISE, NOISE_STD = 0.3, 0.2
PROB_TINT, TINT_RANGE = 0.3, (0.7, 1.0)
PROB_BLUR, BLUR_SIGMA = 0.2, (0.5, 1.5)
PROB_BLANK = 0.05
DEFAULT_EXAMPLES = 4000  # labelled renders of `python -m tdpo_jax.shapes.proxy`


class ProxyNet(nn.Module):
  """r_phi(x, c): conv features of the image and a mean word embedding -> MLP -> scalar.

  Attributes:
    features: channels of the stride-2 convs (32 -> 16 -> 8 -> 4 px).
    text_dim: word embedding width.
    hidden: MLP width.
  """
  features: tuple = (16, 32, 64)
  text_dim: int = 32
  hidden: int = 64

  @nn.compact
  def __call__(self, images, words):
    """images (B, S, S, 3) in [0, 1], words (B, W) int ids -> (B,) float32."""
    x = images.astype(jnp.float32) * 2.0 - 1.0
    for channels in self.features:
      x = nn.gelu(nn.Conv(channels, (3, 3), strides=2)(x))
    x = x.reshape(x.shape[0], -1)  # keep the 4x4 layout: positions matter
    mask = (words > 0).astype(jnp.float32)[..., None]
    embedded = nn.Embed(len(VOCABULARY) + 1, self.text_dim)(words)
    text = (embedded * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    h = jnp.concatenate([x, text], axis=-1)
    h = nn.gelu(nn.Dense(self.hidden)(h))
    h = nn.gelu(nn.Dense(self.hidden)(h))
    return nn.Dense(1)(h)[:, 0]


def encode_prompts(prompts):
  """(B, W) int32 word ids of prompts (unknown words -> 0, truncated to MAX_WORDS)."""
  ids = np.zeros((len(prompts), MAX_WORDS), np.int32)
  for row, text in enumerate(prompts):
    words = [_WORD_IDS.get(word, 0) for word in text.lower().split()][:MAX_WORDS]
    ids[row, :len(words)] = words
  return ids


def _wrong_prompt(rng, scene):
  """The scene's prompt with one attribute changed (colour, shape, count or position)."""
  colour, shape, count, position = scene.colour, scene.shape, scene.count, scene.position
  choice = rng.integers(4)
  if choice == 0:
    colour = rng.choice([c for c in world.COLOURS if c != colour])
  elif choice == 1:
    shape = rng.choice([s for s in world.SHAPES if s != shape])
  elif choice == 2 or count == 2:
    count, position = 3 - count, None
  else:
    position = rng.choice([p for p in world.POSITIONS if p != position])
  return world.prompt_of(str(colour), str(shape), int(count),
                         None if position is None else str(position))


def perturb(rng, image):
  """A randomly degraded copy of a uint8 render -> float (S, S, 3) in [0, 1]."""
  x = image.astype(np.float64) / 255.0
  if rng.random() < PROB_BLANK:
    return np.ones_like(x)
  if rng.random() < PROB_BLUR:
    x = ndimage.gaussian_filter(x, (rng.uniform(*BLUR_SIGMA),) * 2 + (0,))
  if rng.random() < PROB_TINT:
    x = x * rng.uniform(*TINT_RANGE, size=3)
  if rng.random() < PROB_NOISE:
    x = x + rng.normal(0.0, rng.uniform(0, NOISE_STD), x.shape)
  return np.clip(x, 0.0, 1.0)


def labelled_set(seed, size):
  """(images float32 (N, S, S, 3), prompts list of N, gold labels float32 (N,))."""
  rng = np.random.default_rng(seed)
  images, prompts, labels = [], [], []
  for _ in range(size):
    scene = world.sample_scene(rng)
    image = perturb(rng, world.render(scene))
    text = (_wrong_prompt(rng, scene) if rng.random() < PROB_WRONG_PROMPT
            else world.prompt(scene))
    images.append(image)
    prompts.append(text)
    labels.append(gold.score(image, text)["gold"])
  return np.stack(images).astype(np.float32), prompts, np.asarray(labels, np.float32)


def fit_regression(net, params, inputs, labels, steps, seed, batch_size=64,
                   learning_rate=1e-3):
  """Adam on the mean squared error of `net.apply({"params": p}, *inputs[rows]) - labels[rows]`.

  Args:
    net: a Flax module returning (B,) scores.
    params: its initial params.
    inputs: a tuple of arrays with a leading dim N (the module's positional inputs).
    labels: (N,) float32 targets.
    steps, batch_size, learning_rate: the optimisation; rows are drawn with replacement by
      `np.random.default_rng(seed + 1)`.

  Returns:
    (params, train MSE averaged over the last 100 steps).
  """
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch, y):
    def loss_fn(p):
      return jnp.mean((net.apply({"params": p}, *batch) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed + 1)
  losses = []
  for _ in range(steps):
    index = rng.integers(len(labels), size=batch_size)
    params, opt_state, loss = step(params, opt_state, tuple(x[index] for x in inputs),
                                   labels[index])
    losses.append(loss)
  return params, float(np.mean(jax.device_get(losses[-100:])))


def parse_fit_args(program, default_examples, argv=None):
  """`--out --examples --steps --seed` (absl flags) of the reward-fitting commands, as a
  namespace; a one-line SystemExit if bad. `argv` without the program name (None: sys.argv)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tdpo_jax import cli  # pylint: disable=g-import-not-at-top

  def define(flag_values, full_argv):
    del full_argv
    flags.DEFINE_string("out", None, "msgpack file to write", flag_values=flag_values)
    flags.DEFINE_integer("examples", default_examples, "size of the labelled set",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer("steps", 3000, "optimizer steps", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "data and init seed", flag_values=flag_values)

  values, positional = cli.parse(argv, define, program)
  if positional or not values["out"].value:
    raise SystemExit("error: expected --out=FILE (and optionally --examples, --steps, --seed)")
  return types.SimpleNamespace(**{name: values[name].value
                                  for name in ("out", "examples", "steps", "seed")})


def train(seed, examples, steps, batch_size=64, learning_rate=1e-3):
  """Fits ProxyNet to `examples` gold labels; returns (params, train MSE of the last 100 steps)."""
  images, prompts, labels = labelled_set(seed, examples)
  words = encode_prompts(prompts)
  net = ProxyNet()
  params = net.init(jax.random.key(seed), images[:1], words[:1])["params"]
  return fit_regression(net, params, (images, words), labels, steps, seed, batch_size,
                        learning_rate)


def load_weights(weights, reward_name, module):
  """The params in the msgpack `weights` written by `python -m <module> --out=FILE`; a one-line
  ValueError naming `config.rewards.<reward_name>.weights` if it is empty."""
  if not weights:
    raise ValueError(f"config.rewards.{reward_name}.weights is empty; expected a msgpack "
                     f"written by `python -m {module} --out=FILE`")
  return jax.tree.map(jnp.asarray, convert.load_msgpack(weights))


def make_reward_fn(weights, cache_dir=""):
  """`reward_fn(images (B, S, S, 3) in [0, 1], prompts) -> (B,)` from a msgpack of ProxyNet."""
  del cache_dir
  params = load_weights(weights, "shapes_proxy", "tdpo_jax.shapes.proxy")
  net = ProxyNet()
  return registry.DeviceReward(lambda p, x, w: net.apply({"params": p}, x, w), params,
                               encode_prompts=lambda prompts: (encode_prompts(prompts),))


def main(argv=None):
  args = parse_fit_args("python -m tdpo_jax.shapes.proxy", DEFAULT_EXAMPLES, argv)
  start = time.time()
  params, loss = train(args.seed, args.examples, args.steps)
  convert.save_msgpack(params, args.out)
  images, prompts, labels = labelled_set(args.seed + 1000, 1000)
  held_out = make_reward_fn(args.out)(images, prompts)
  logging.info("proxy: train mse %.4f, held-out mse %.4f, corr %.3f (%.0f s) -> %s", loss,
               np.mean((held_out - labels) ** 2), np.corrcoef(held_out, labels)[0, 1],
               time.time() - start, args.out)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  main()
