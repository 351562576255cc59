"""Pre-training of the shapes-world model on a CPU, resumable: VAE first, then UNet + text encoder.

  python -m tdpo_jax.shapes.pretrain --workdir=DIR [--stage=vae|unet|all] [--steps=N] [--batch=B]
      [--config=configs/shapes_pretrain.py] [--config.unet.dataset_size=256 ...]
  python -m tdpo_jax.shapes.pretrain --workdir=DIR --export=OUT_DIR [--export_weights=ema|params]

The settings are `tdpo_jax/configs/shapes.py` `pretrain_config()` (the default `--config`,
`configs/shapes_pretrain.py`), overridable entry by entry with `--config.KEY=VALUE`; the
architecture is its `shapes_model_spec()`.

Shape legend: B batch, images NHWC (B, 32, 32, 3) in [-1, 1] for the VAE, latents NCHW
(B, 4, 8, 8) for the UNet, text ids (B, L).

Stage "vae": the AutoencoderKL on world images, loss = mean |D(z) - x| + kl_weight KL(q(z|x) || N(0, I)),
z ~ q(z|x). At its end the latent scale 1/std(z) is measured (SD's `scaling_factor`).
Stage "unet": the UNet and the CLIP text encoder jointly, the VAE frozen; the DDPM epsilon loss
  z0 = scale * z, eps = n + offset * n_c  (n ~ N(0, I), n_c ~ N(0, I) per (sample, channel)),
  x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps,  loss = mean (eps_theta(x_t, t, c) - eps)^2,
with c the empty prompt with probability `prompt_dropout` (classifier-free guidance). An EMA of
the weights is kept; samples, evaluation and export use it.

Each stage writes `DIR/<stage>/checkpoint.msgpack` atomically (step, params, optimizer state,
EMA, scale) every `checkpoint_every` steps and at its end; a rerun resumes from it. Randomness
and data depend only on (seed, step), so a resumed run continues the same stream. Logs:
`DIR/metrics.jsonl`, sample grids `DIR/samples/unet_<step>.png`, and the gold-detector rates of
samples of fixed prompts (`eval`); after each evaluation the EMA weights are also exported to
`DIR/export` (a `load_pipeline` directory).
"""
import functools
import json
import logging
import os
import shutil
import tempfile
import time

from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from tdpo_jax import cli
from tdpo_jax import ddim
from tdpo_jax import images as images_lib
from tdpo_jax import rollout as rollout_lib
from tdpo_jax.configs import shapes as shapes_config
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.models import vae as vae_lib
from tdpo_jax.shapes import model as model_lib
from tdpo_jax.shapes import world

# The default --config (what configs/shapes_pretrain.py re-exports).
CONFIG_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                           "shapes_pretrain.py")
CHECKPOINT_NAME = "checkpoint.msgpack"
STAGES = ("vae", "unet", "all")
# fold_in streams of the root key.
_STREAM_INIT, _STREAM_VAE, _STREAM_UNET, _STREAM_SCALE = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def save_checkpoint(path, state):
  """Writes a pytree of arrays / numbers as msgpack, atomically (temp file + rename)."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  data = flax.serialization.to_bytes(jax.device_get(state))
  handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(data)
    os.replace(temp_path, path)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)


def load_checkpoint(path, template):
  """The checkpoint at `path` restored into `template`'s structure, or None if absent."""
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as file:
    return flax.serialization.from_bytes(template, file.read())


def _checkpoint_path(workdir, stage):
  return os.path.join(workdir, stage, CHECKPOINT_NAME)


# ---------------------------------------------------------------------------------------------
# Stage kernels.


def _optimizer(stage_config):
  """AdamW with global-norm clipping; linear warmup, then cosine decay to 10% or constant.

  A constant rate (the UNet's) lets a resumed run extend `--steps` without changing the
  schedule of the steps already taken; the EMA does the averaging.
  """
  if stage_config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, stage_config.learning_rate, stage_config.warmup_steps, stage_config.steps,
        end_value=stage_config.learning_rate * 0.1)
  elif stage_config.schedule == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, stage_config.learning_rate, stage_config.warmup_steps),
         optax.constant_schedule(stage_config.learning_rate)], [stage_config.warmup_steps])
  else:
    raise ValueError(f"schedule={stage_config.schedule!r}; expected 'cosine' or 'constant'")
  return optax.chain(
      optax.clip_by_global_norm(stage_config.grad_clip),
      optax.adamw(schedule, weight_decay=stage_config.weight_decay))


def to_signed(images):
  """uint8 NHWC -> float32 NHWC in [-1, 1] (the VAE's input)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def gaussian_kl(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) per sample: 0.5 sum(mean² + var - 1 - logvar), (B,).

  Args:
    mean, logvar: (B, h, w, z) NHWC posterior moments (`vae.encode`).
  """
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def make_vae_step(vae, optimizer, kl_weight):
  """(params, opt_state, images uint8 (B, H, W, 3), rng) -> (params, opt_state, metrics)."""

  def loss_fn(params, images, rng):
    x = to_signed(images)
    mean, logvar = vae.apply({"params": params}, x, method=vae.encode)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)  # reparameterised
    recon = vae.apply({"params": params}, z, method=vae.decode)  # NHWC
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = jnp.mean(gaussian_kl(mean, logvar))
    return l1 + kl_weight * kl, {"l1": l1, "kl": kl}

  def step(params, opt_state, images, rng):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(aux, loss=loss)

  return step


def encode_posteriors(vae, vae_params, images, scale):
  """Scaled posterior (mean, std) of q(z | x): uint8 (B, H, W, 3) -> 2 x (B, C, h, w) NCHW."""
  mean, logvar = vae.apply({"params": vae_params}, to_signed(images), method=vae.encode)
  return (scale * jnp.transpose(mean, (0, 3, 1, 2)),
          scale * jnp.transpose(jnp.exp(0.5 * logvar), (0, 3, 1, 2)))


def make_unet_step(pipeline, optimizer, alphas_cumprod, unet_config):
  """(state, (mean, std), input_ids, uncond_ids, rng) -> (state, metrics).

  state = {"params": {"unet", "text_encoder"}, "opt_state", "ema"}; (mean, std) (B, C, h, w) are
  the scaled VAE posteriors of the batch's images (precomputed: the frozen encoder would cost
  ~40% of a step), from which z0 = mean + std n is drawn.
  """
  alphas_cumprod = jnp.asarray(alphas_cumprod)
  num_train_timesteps = alphas_cumprod.shape[0]

  def loss_fn(params, posterior, input_ids, uncond_ids, rng):
    keys = [jax.random.fold_in(rng, i) for i in range(5)]
    mean, std = posterior
    latents = mean + std * jax.random.normal(keys[0], mean.shape)
    batch = latents.shape[0]
    drop = jax.random.bernoulli(keys[1], unet_config.prompt_dropout, (batch, 1))
    ids = jnp.where(drop, uncond_ids, input_ids)
    context = pipeline_lib.encode_text(pipeline, params["text_encoder"], ids)
    timesteps = jax.random.randint(keys[2], (batch,), 0, num_train_timesteps)
    noise = (jax.random.normal(keys[3], latents.shape) + unet_config.offset_noise *
             jax.random.normal(keys[4], latents.shape[:2] + (1, 1)))
    alpha = alphas_cumprod[timesteps].reshape(batch, 1, 1, 1)
    noisy = jnp.sqrt(alpha) * latents + jnp.sqrt(1 - alpha) * noise
    eps = pipeline_lib.unet_eps(pipeline, params["unet"], noisy, timesteps, context)
    return jnp.mean((eps - noise) ** 2)

  def step(state, posterior, input_ids, uncond_ids, rng):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], posterior, input_ids, uncond_ids,
                                              rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = optax.incremental_update(params, state["ema"], 1.0 - unet_config.ema_decay)
    return {"params": params, "opt_state": opt_state, "ema": ema}, {"loss": loss}

  return step


# ---------------------------------------------------------------------------------------------
# Logging and evaluation.


class _Log:
  """Appends metrics lines to DIR/metrics.jsonl and logs them."""

  def __init__(self, workdir):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, stage, step, **metrics):
    record = {"stage": stage, "step": int(step), "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as file:
      file.write(json.dumps(record) + "\n")
    text = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    logging.info("%s step %d %s", stage, step, text)


def eval_prompts(num_samples, seed):
  """A fixed list of prompts for evaluation: `num_samples` drawn from `world.all_prompts()`."""
  prompts = world.all_prompts()
  order = np.random.default_rng(seed).permutation(len(prompts))
  return [prompts[order[i % len(prompts)]] for i in range(num_samples)]


def make_sampler(pipeline, eval_config):
  """Jitted `(params: RolloutParams, input_ids, uncond_ids, rng) -> images` (the RL sampler)."""
  sample_config = _SampleConfig(eval_config.num_steps, eval_config.eta,
                                eval_config.guidance_scale, world.IMAGE_SIZE, world.IMAGE_SIZE)
  rollout_fn = rollout_lib.make_rollout_fn(pipeline, sample_config)
  return jax.jit(lambda *args: rollout_fn(*args).images)


class _SampleConfig:
  """The fields of `config.sample` that `rollout.make_rollout_fn` reads."""

  def __init__(self, num_steps, eta, guidance_scale, height, width):
    self.num_steps, self.eta, self.guidance_scale = int(num_steps), eta, guidance_scale
    self.height, self.width = height, width


def evaluate(sampler, pipeline, params, eval_config, rng):
  """Samples of fixed prompts and their gold-detector attribute match rates.

  Returns:
    (images (N, H, W, 3) in [0, 1], prompts, {"colour", "shape", "count", "position",
    "fidelity", "gold"} rates / means).
  """
  from tdpo_jax.shapes import gold  # noqa: PLC0415
  prompts = eval_prompts(eval_config.num_samples, eval_config.seed)
  input_ids, uncond_ids = rollout_lib.tokenize_prompts(pipeline, prompts)
  rollout_params = rollout_lib.RolloutParams(
      unet=params["unet"], text_encoder=params["text_encoder"], vae=pipeline.vae_params)
  images = np.asarray(sampler(rollout_params, input_ids, uncond_ids, rng))
  return images, prompts, gold.attribute_rates(images, prompts)


# ---------------------------------------------------------------------------------------------
# Stages.


def _rate_tracker():
  start = {"time": time.time(), "step": None}

  def rate(step):
    now = time.time()
    if start["step"] is None:
      start.update(time=now, step=step)
      return 0.0
    value = (step - start["step"]) / max(now - start["time"], 1e-9)
    start.update(time=now, step=step)
    return value

  return rate


@functools.lru_cache(maxsize=4)
def _vae_kernels(vae_spec_json, vae_config_json):
  """(vae, optimizer, jitted step, jitted encode) per (spec.vae, config.vae), compiled once."""
  vae = vae_lib.from_diffusers_config(json.loads(vae_spec_json))
  vae_config = ml_collections.ConfigDict(json.loads(vae_config_json))
  optimizer = _optimizer(vae_config)
  step_fn = jax.jit(make_vae_step(vae, optimizer, vae_config.kl_weight), donate_argnums=(0, 1))
  encode = jax.jit(lambda p, x: encode_posteriors(vae, p, x, 1.0))
  return vae, optimizer, step_fn, encode


def train_vae(workdir, config, spec, steps, batch_size, log):
  """Runs (or resumes) the VAE stage up to `steps`; returns (vae_params, scale)."""
  vae, optimizer, step_fn, encode = _vae_kernels(
      json.dumps(model_lib.tiny._to_dict(spec.vae), sort_keys=True),
      json.dumps(config.vae.to_dict(), sort_keys=True))
  root = jax.random.key(config.seed)
  path = _checkpoint_path(workdir, "vae")
  params = model_lib.init_params(spec, config.seed)["vae"]
  template = {"step": 0, "params": params, "opt_state": optimizer.init(params), "scale": 0.0}
  state = load_checkpoint(path, template) or template
  if state["step"]:
    logging.info("vae: resumed at step %d from %s", state["step"], path)
  params, opt_state = state["params"], state["opt_state"]
  rate = _rate_tracker()
  rate(state["step"])
  vae_rng = jax.random.fold_in(root, _STREAM_VAE)
  start = int(state["step"])
  for step in range(start, steps):
    images, _ = world.batch(config.data_seed, step, batch_size)
    params, opt_state, metrics = step_fn(params, opt_state, images,
                                         jax.random.fold_in(vae_rng, step))
    done = step + 1
    if done % config.log_every == 0 or done == steps:
      log.write("vae", done, **jax.device_get(metrics), steps_per_s=rate(done))
    if done % config.checkpoint_every == 0 and done < steps:
      save_checkpoint(path, {"step": done, "params": params, "opt_state": opt_state, "scale": 0.0})
  scale = float(state["scale"]) if start >= steps and state["scale"] else _latent_scale(
      encode, params, config, root)
  save_checkpoint(path, {"step": max(steps, start), "params": params, "opt_state": opt_state,
                         "scale": scale})
  _save_vae_samples(workdir, vae, params, config, steps)
  log.write("vae", max(steps, start), scale=scale)
  return params, scale


def _latent_scale(encode, params, config, root):
  """1 / std of posterior samples of `config.vae.scaling_images` held-out images."""
  images, _ = world.batch(config.data_seed + 1, 0, config.vae.scaling_images)
  mean, std = encode(params, images)
  noise = jax.random.normal(jax.random.fold_in(root, _STREAM_SCALE), mean.shape)
  latents = np.asarray(mean + std * noise)
  return float(1.0 / latents.std())


def _save_vae_samples(workdir, vae, params, config, step):
  """Originals (top) over their reconstructions (bottom), 16 held-out images."""
  images, prompts = world.batch(config.data_seed + 1, 1, 16)
  x = to_signed(jnp.asarray(images))
  z, _ = vae.apply({"params": params}, x, method=vae.encode)  # the posterior's mode
  recon = np.asarray(vae.apply({"params": params}, z, method=vae.decode))
  recon = np.clip(recon / 2 + 0.5, 0, 1)
  grid = np.concatenate([images / 255.0, recon])
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  images_lib.make_grid(grid, list(prompts) * 2, columns=16).save(
      os.path.join(folder, f"vae_{step}.png"))


def _load_finished_vae(workdir, config, spec):
  path = _checkpoint_path(workdir, "vae")
  params = model_lib.init_params(spec, config.seed)["vae"]
  optimizer = _optimizer(config.vae)
  template = {"step": 0, "params": params, "opt_state": optimizer.init(params), "scale": 0.0}
  state = load_checkpoint(path, template)
  if state is None or not state["scale"]:
    raise FileNotFoundError(f"no finished VAE checkpoint at {path!r}; run --stage=vae first")
  return state["params"], float(state["scale"])


def _unet_template(config, spec, optimizer):
  init = model_lib.init_params(spec, config.seed)
  params = {"unet": init["unet"], "text_encoder": init["text_encoder"]}
  return {"step": 0, "params": params, "opt_state": optimizer.init(params),
          "ema": jax.tree.map(jnp.array, params)}, init


def latent_dataset(workdir, vae, vae_params, scale, config):
  """The UNet stage's training set: N world images as scaled VAE posteriors, built once.

  Returns:
    {"mean": (N, C, h, w) float32, "std": (N, C, h, w) float32, "prompts": (N,) str}, cached in
    DIR/unet/latents.npz (written atomically).
  """
  path = os.path.join(workdir, "unet", "latents.npz")
  if os.path.isfile(path):
    with np.load(path) as data:
      return {name: data[name] for name in data.files}
  encode = jax.jit(lambda p, x: encode_posteriors(vae, p, x, scale))
  chunk = config.unet.encode_batch_size
  means, stds, prompts = [], [], []
  start = time.time()
  for index in range(-(-config.unet.dataset_size // chunk)):
    images, texts = world.batch(config.data_seed, index, chunk)
    mean, std = jax.device_get(encode(vae_params, images))
    means.append(mean)
    stds.append(std)
    prompts.extend(texts)
  size = config.unet.dataset_size
  data = {"mean": np.concatenate(means)[:size], "std": np.concatenate(stds)[:size],
          "prompts": np.asarray(prompts[:size])}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, temp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
  try:
    with os.fdopen(handle, "wb") as file:
      np.savez(file, **data)
    os.replace(temp_path, path)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)
  logging.info("encoded %d latents in %.0f s", size, time.time() - start)
  return data


def train_unet(workdir, config, spec, steps, batch_size, log):
  """Runs (or resumes) the UNet + text-encoder stage up to `steps`."""
  vae_params, scale = _load_finished_vae(workdir, config, spec)
  root = jax.random.key(config.seed)
  optimizer = _optimizer(config.unet)
  template, init = _unet_template(config, spec, optimizer)
  path = _checkpoint_path(workdir, "unet")
  state = load_checkpoint(path, template) or template
  start = int(state.pop("step"))
  if start:
    logging.info("unet: resumed at step %d from %s", start, path)
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  model_lib.write_tokenizer(tokenizer_dir, spec.text_encoder.max_position_embeddings)
  pipeline = model_lib.make_pipeline(
      spec, dict(init, vae=vae_params), tokenizer_dir, scale)
  data = latent_dataset(workdir, pipeline.vae, vae_params, scale, config)
  all_ids = pipeline_lib.tokenize(pipeline.tokenizer, list(data["prompts"]))
  step_fn = jax.jit(make_unet_step(pipeline, optimizer, ddim.alphas_cumprod(spec.scheduler),
                                   config.unet), donate_argnums=(0,))
  sampler = make_sampler(pipeline, config.eval)
  unet_rng = jax.random.fold_in(root, _STREAM_UNET)
  uncond_ids = rollout_lib.tokenize_prompts(pipeline, [""])[1]
  rate = _rate_tracker()
  rate(start)
  losses = []
  for step in range(start, steps):
    index = np.random.default_rng([config.data_seed, step]).integers(len(all_ids), size=batch_size)
    state, metrics = step_fn(state, (data["mean"][index], data["std"][index]), all_ids[index],
                             uncond_ids, jax.random.fold_in(unet_rng, step))
    losses.append(metrics["loss"])
    done = step + 1
    if done % config.log_every == 0 or done == steps:
      log.write("unet", done, loss=np.mean(jax.device_get(losses)), steps_per_s=rate(done))
      losses = []
    if done % config.checkpoint_every == 0 or done == steps:
      save_checkpoint(path, dict(state, step=done))
    if done % config.eval_every == 0 or done == steps:
      _evaluate_and_log(workdir, sampler, pipeline, state["ema"], config, done, log)
      _export_atomic(os.path.join(workdir, "export"), spec,
                     dict(state["ema"], vae=vae_params, image_encoder=init["image_encoder"]),
                     scale, config.export_fp16)
  return state, pipeline


def _export_atomic(out_dir, spec, params, scale, fp16):
  """`model.export_pipeline` into a temp dir, then swapped in for `out_dir`."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  temp_dir = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
  model_lib.export_pipeline(temp_dir, spec, jax.device_get(params), scale, fp16=fp16)
  old_dir = out_dir + ".old"
  if os.path.isdir(out_dir):
    shutil.rmtree(old_dir, ignore_errors=True)
    os.rename(out_dir, old_dir)
  os.rename(temp_dir, out_dir)
  shutil.rmtree(old_dir, ignore_errors=True)


def _evaluate_and_log(workdir, sampler, pipeline, params, config, step, log):
  start = time.time()
  images, prompts, rates = evaluate(sampler, pipeline, params, config.eval,
                                    jax.random.key(config.eval.seed))
  folder = os.path.join(workdir, "samples")
  os.makedirs(folder, exist_ok=True)
  images_lib.make_grid(images, prompts, columns=8).save(os.path.join(folder, f"unet_{step}.png"))
  log.write("eval", step, **rates, eval_s=time.time() - start)


def export(workdir, out_dir, config, spec, weights="ema"):
  """Writes the pipeline directory of the UNet checkpoint's weights; returns its size in bytes.

  weights: "ema" (the EMA of the parameters) or "params" (the raw parameters). The EMA starts
    at the random init, which still weighs decay^step (0.999^2800 = 6 %) in it: early on the raw
    parameters sample better (the shipped model: docs/shapes.md).
  """
  if weights not in ("ema", "params"):
    raise ValueError(f"weights={weights!r}; expected 'ema' or 'params'")
  vae_params, scale = _load_finished_vae(workdir, config, spec)
  optimizer = _optimizer(config.unet)
  template, init = _unet_template(config, spec, optimizer)
  state = load_checkpoint(_checkpoint_path(workdir, "unet"), template)
  if state is None:
    raise FileNotFoundError(f"no UNet checkpoint in {workdir!r}; run --stage=unet first")
  params = dict(state[weights], vae=vae_params, image_encoder=init["image_encoder"])
  model_lib.export_pipeline(out_dir, spec, params, scale, fp16=config.export_fp16)
  size = sum(os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(out_dir) for name in names)
  logging.info("exported the %s weights of step %d to %s (%.1f MB)", weights, state["step"],
               out_dir, size / 1e6)
  return size


def define_flags(flag_values, argv):
  cli.define_config(flag_values, argv, CONFIG_PATH,
                    "The pre-training settings (default: configs/shapes_pretrain.py); "
                    "--config.KEY=VALUE overrides an entry, e.g. --config.unet.dataset_size=256")
  flags.DEFINE_string("workdir", None, "Checkpoints, metrics, samples and exports go here.",
                      flag_values=flag_values)
  flags.DEFINE_enum("stage", "all", STAGES, "Which stage(s) to train.", flag_values=flag_values)
  flags.DEFINE_integer("steps", 0, "Total steps of the stage (0 = the config's); with --stage=all, "
                       "the UNet's.", lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("vae_steps", 0, "0 = the config's", lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("batch", 0, "Batch size (0 = the config's).", lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_string("export", "", "Write the pipeline directory here and exit.",
                      flag_values=flag_values)
  flags.DEFINE_enum("export_weights", "ema", ("ema", "params"),
                    "Which UNet / text-encoder weights --export writes.", flag_values=flag_values)


def main(argv=None):
  """`argv`: the arguments without the program name (None: sys.argv[1:])."""
  values = cli.parse_flags_only(argv, define_flags, "python -m tdpo_jax.shapes.pretrain")
  workdir = values["workdir"].value
  if not workdir:
    raise SystemExit("error: --workdir is required")
  config, spec = values["config"].value, shapes_config.shapes_model_spec()
  steps, vae_steps, batch = values["steps"].value, values["vae_steps"].value, values["batch"].value
  stage = values["stage"].value
  os.makedirs(workdir, exist_ok=True)
  if values["export"].value:
    export(workdir, values["export"].value, config, spec, values["export_weights"].value)
    return
  log = _Log(workdir)
  if stage in ("vae", "all"):
    vae_steps = vae_steps or (steps if stage == "vae" else 0) or config.vae.steps
    train_vae(workdir, config, spec, vae_steps, batch or config.vae.batch_size, log)
  if stage in ("unet", "all"):
    train_unet(workdir, config, spec, steps or config.unet.steps, batch or config.unet.batch_size,
               log)


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  main()
