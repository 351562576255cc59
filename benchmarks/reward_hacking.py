"""Can the shapes world's trained reward be overoptimised, and can the policy reach it?

  python benchmarks/reward_hacking.py --config=configs/shapes.py [--probe=ascent|backprop]
      [--steps=200] [--learning_rate=0.05] [--every=25] [--out=DIR]

Two probes of the config's trained reward r (`config.reward`, e.g. shapes_aesthetic), each
printing, every `--every` steps, the mean of r, gold fidelity and gold quality of the same images
(and writing them to `<out>/<probe>.csv`, with image grids `<out>/<probe>_SSSS.png`):

  * `ascent`: the pre-trained policy samples one batch (the config's training prompts, its
    sampler); then gradient ascent on r(decode(x_0)) with respect to the final latents x_0 alone,
    each step a move of `--learning_rate` along the per-sample gradient normalised to unit RMS:
        x_0 <- x_0 + lr g / rms(g),   g = d r(decode(x_0)) / d x_0.
    The images stay decoder outputs (the VAE's range), nothing else constrains them: if r rises
    while gold falls, r has reachable blind spots (reward hacking exists); the RMS distance
    |x_0 - x_0^init| says how far from the pre-trained samples they are.
  * `backprop`: direct reward backpropagation through the whole sampler into the policy's
    trainable parameters (the LoRA adapters, or the full UNet with `lora.enabled=False`), Adam
    with `--learning_rate`, a fresh noise key per step, the fixed key `eval.seed` for the printed
    rows: whether the POLICY CLASS can reach r's blind spots, whatever the RL estimator.
    Maximises E[r(x_0)] with x_0 = sampler(theta, noise) (DRaFT, Clark et al. 2024, with K = T).

Neither is an RL algorithm of this project; they bound what RL could find (docs/shapes.md).
"""
import csv
import os
import sys
import time
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The flags are defined only when this file runs as a script (`define_flags`), so that tests can
# import its functions beside another script that defines `--config` too.
_CONFIG = _PROBE = _STEPS = _LEARNING_RATE = _EVERY = _OUT = None


def define_flags():
  global _CONFIG, _PROBE, _STEPS, _LEARNING_RATE, _EVERY, _OUT  # noqa: PLW0603
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
  _PROBE = flags.DEFINE_enum("probe", "ascent", ["ascent", "backprop"], "Which probe.")
  _STEPS = flags.DEFINE_integer("steps", 200, "Ascent / Adam steps.")
  _LEARNING_RATE = flags.DEFINE_float(
      "learning_rate", 0.05, "ascent: RMS length of each latent step; backprop: Adam's lr.")
  _EVERY = flags.DEFINE_integer("every", 25, "Print (and save) every this many steps.")
  _OUT = flags.DEFINE_string("out", "", "Directory for the CSV and image grids (optional).")
  flags.mark_flags_as_required(["config"])


GRID_COLUMNS = 8
GRID_IMAGES = 16
RMS_EPS = 1e-12  # a zero gradient stays a zero step


def normalised_step(latents, grads, learning_rate):
  """x + lr g / rms(g), the RMS over each sample's own dimensions; (B, ...) arrays."""
  import jax.numpy as jnp  # noqa: PLC0415
  axes = tuple(range(1, grads.ndim))
  rms = jnp.sqrt(jnp.mean(grads ** 2, axis=axes, keepdims=True))
  return latents + learning_rate * grads / (rms + RMS_EPS)


def rms_distance(a, b):
  """Mean over samples of the RMS of (a - b) over each sample's dimensions."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.mean(np.sqrt(np.mean((a - b) ** 2, axis=tuple(range(1, a.ndim))))))


def score_row(step, images, prompts, reward_fn, extra=None):
  """{step, reward, gold_fidelity, gold_quality, ...extra} means of one batch of images."""
  from tdpo_jax.shapes import gold  # noqa: PLC0415
  images = np.asarray(images)
  row = {"step": step, "reward": float(np.mean(reward_fn(images, prompts))),
         "gold_fidelity": float(np.mean(gold.gold_fidelity(images, prompts))),
         "gold_quality": float(np.mean(gold.gold_quality(images, prompts)))}
  row.update(extra or {})
  return row


def ascent_rows(trainer, reward_apply, steps, learning_rate, every, save=None):
  """The `ascent` probe's rows (module docstring): dicts of step, reward, gold_fidelity,
  gold_quality, rms_from_start; `save(step, images, prompts)` is called on each."""
  import jax  # noqa: PLC0415
  from tdpo_jax.models import pipeline as pipeline_lib  # noqa: PLC0415
  state, frozen = trainer.init_state(), trainer.frozen_params()
  trajectory, index = trainer.sample(state, frozen, 0)
  prompts = [trainer.prompts[i] for i in index]
  start = trajectory.latents[:, -1]

  def objective(latents):
    images = pipeline_lib.decode_latents(trainer.models.frozen_pipeline, frozen.vae, latents)
    return reward_apply(images, prompts).sum(), images

  grad_fn = jax.jit(jax.grad(objective, has_aux=True))
  latents, rows = start, []
  for step in range(steps + 1):
    grads, images = grad_fn(latents)
    if step % every == 0 or step == steps:
      rows.append(score_row(step, images, prompts, trainer.reward_fn,
                            {"rms_from_start": rms_distance(latents, start)}))
      if save is not None:
        save(step, images, prompts)
      print_row(rows[-1])
    latents = normalised_step(latents, grads, learning_rate)
  return rows


class BackpropFunctions(NamedTuple):
  """The `backprop` probe's pieces (module docstring); params are the policy's trainable ones.

  params: the pre-trained policy's trainable parameters (`TrainState.policy_params`).
  prompts: the fixed prompts, each repeated `eval.samples_per_prompt` times (B of them).
  images(params, key): (B, S, S, 3) images the sampler draws with `key` (jitted).
  loss(params, key): -mean over the B samples of r(images(params, key)).
  grad(params, key): d loss / d params through the whole sampler (jitted), a tree like params.
  """
  params: Any
  prompts: list
  images: Callable
  loss: Callable
  grad: Callable


def backprop_functions(trainer, reward_apply):
  """`BackpropFunctions` of `trainer`'s pre-trained policy and the differentiable reward."""
  config = trainer.config
  import jax  # noqa: PLC0415
  from tdpo_jax import policy  # noqa: PLC0415
  from tdpo_jax import rollout  # noqa: PLC0415
  state, frozen = trainer.init_state(), trainer.frozen_params()
  rollout_fn = rollout.make_rollout_fn(trainer.models.frozen_pipeline, config.sample)
  prompts = [p for p in trainer.prompts for _ in range(config.eval.samples_per_prompt)]
  input_ids, uncond_ids = rollout.tokenize_prompts(trainer.models.frozen_pipeline, prompts)

  def images_of(params, key):
    unet = policy.unet_params(config.lora, frozen.unet, params)
    return rollout_fn(rollout.RolloutParams(unet=unet, text_encoder=frozen.text_encoder,
                                            vae=frozen.vae), input_ids, uncond_ids, key).images

  def loss(params, key):
    return -reward_apply(images_of(params, key), prompts).mean()

  return BackpropFunctions(params=state.policy_params, prompts=prompts,
                           images=jax.jit(images_of), loss=loss, grad=jax.jit(jax.grad(loss)))


def backprop_rows(trainer, reward_apply, steps, learning_rate, every, save=None,
                  functions=None):
  """The `backprop` probe's rows (module docstring): dicts of step, reward, gold_fidelity,
  gold_quality of the fixed-key samples; `save(step, images, prompts)` is called on each.
  `functions`: `backprop_functions(trainer, reward_apply)` when the caller already has them."""
  import jax  # noqa: PLC0415
  import optax  # noqa: PLC0415
  functions = functions or backprop_functions(trainer, reward_apply)
  prompts = functions.prompts
  optimizer = optax.adam(learning_rate)
  params = functions.params
  opt_state = optimizer.init(params)
  eval_key, rows = jax.random.key(trainer.config.eval.seed), []
  for step in range(steps + 1):
    if step % every == 0 or step == steps:
      images = functions.images(params, eval_key)
      rows.append(score_row(step, images, prompts, trainer.reward_fn))
      if save is not None:
        save(step, images, prompts)
      print_row(rows[-1])
    updates, opt_state = optimizer.update(functions.grad(params, jax.random.key(step)),
                                          opt_state, params)
    params = optax.apply_updates(params, updates)
  return rows


def print_row(row):
  print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in row.items()), flush=True)


def differentiable_reward(config):
  """`apply(images (B, S, S, 3), prompts) -> (B,)` of the trained reward, jax-differentiable."""
  if config.reward != "shapes_aesthetic":
    raise SystemExit(f"error: config.reward={config.reward!r}; this probe differentiates "
                     "shapes_aesthetic (reward=aesthetic)")
  from tdpo_jax.shapes import aesthetic  # noqa: PLC0415
  params = aesthetic.load_params(config.rewards.shapes_aesthetic.weights)
  return lambda images, prompts: aesthetic.AestheticNet().apply({"params": params}, images)


def main(argv):
  del argv
  config = _CONFIG.value
  config.log.progress = False
  if _STEPS.value < 1 or _EVERY.value < 1:
    raise SystemExit(f"error: --steps={_STEPS.value} --every={_EVERY.value}; expected >= 1")
  reward_apply = differentiable_reward(config)
  from tdpo_jax import images as images_lib  # noqa: PLC0415
  from tdpo_jax import config_checks  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  out = _OUT.value
  if out:
    os.makedirs(out, exist_ok=True)

  def save(step, images, prompts):
    if out:
      images = np.asarray(images)[:GRID_IMAGES]
      images_lib.make_grid(images, list(prompts[:GRID_IMAGES]), columns=GRID_COLUMNS).save(
          os.path.join(out, f"{_PROBE.value}_{step:04d}.png"))

  tic = time.time()
  config_checks.validate_config(config)  # the Trainer does not validate (train.run does)
  trainer = train.Trainer(config)
  probe = ascent_rows if _PROBE.value == "ascent" else backprop_rows
  rows = probe(trainer, reward_apply, _STEPS.value, _LEARNING_RATE.value, _EVERY.value, save)
  print(f"{_PROBE.value}: {len(rows)} rows in {time.time() - tic:.0f} s", flush=True)
  if out:
    with open(os.path.join(out, f"{_PROBE.value}.csv"), "w", newline="") as file:
      writer = csv.DictWriter(file, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  define_flags()
  app.run(main)
