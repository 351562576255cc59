"""Cross-reward evaluation: reward overoptimisation shows only under rewards a run did not train on.

Shape legend: P held-out prompts, S samples per prompt, N = P x S held-out images, B the rollout
batch (`sample.batch_size`), d the CLIP image-embedding width; images NHWC float in [0, 1].

Every `eval.every` epochs (and after the last epoch), with `config.eval`:
  * the epoch's own samples (training prompts) are scored by every reward in `eval.rewards`
    -> `eval/train_prompts/<reward>/{mean,std}`;
  * `eval.num_prompts` prompts of the held-out set `eval.prompts`, `eval.samples_per_prompt`
    each, are sampled by the CURRENT policy with the fixed key `eval.seed` (so epochs are
    comparable, and a resumed run evaluates exactly as an uninterrupted one) and scored
    -> `eval/heldout/<reward>/{mean,std}`;
  * diversity of prompt p: the mean over sample pairs i < j of the cosine distance of their
    image embeddings by the critic's tower (`config.critic.tower`, critic_tower.py),
        div_p = 2 / (S (S - 1)) sum_{i<j} (1 - <e_i, e_j> / (|e_i| |e_j|)),
    -> `eval/heldout/diversity` = mean_p div_p;
  * with `eval.kl_to_pretrained`, the KL of the current policy's sampling path to the
    pre-trained model's, on the held-out samples x_T..x_0 ~ pi_theta: each DDIM transition is
    N(mu, std^2 I) with the same std under both policies, so the path KL given the visited
    states is a sum of closed forms (DESIGN §3, `objectives.gaussian_kl`, mean over latent dims),
        KL_path = sum_t mean_{C,h,w} (mu_theta(x_t, t) - mu_ref(x_t, t))^2 / (2 std_t^2),
    averaged over the samples -> `eval/heldout/kl_to_pretrained` (exactly 0 before the first
    update; the Monte Carlo part is only over the visited states, never negative). It is summed
    while sampling (`rollout.make_path_kl_rollout_fn`, the trainer's kernel `rollout_kl`): mu_theta
    is the mean each step sampled from, mu_ref one more guided UNet call on the same x_t.
Per-prompt rows (prompt, each reward's mean, diversity) go to `<workdir>/eval/epoch_EEEE.csv` and
to TensorBoard as a markdown table; a captioned grid of the held-out samples to
`<workdir>/eval/epoch_EEEE.png` (a non-local workdir, `gs://...`, is written through `paths`).

With `eval.before_training` the held-out set is also evaluated once before the first update (the
initial policy: `eval/before_training.{json,csv,png}`, TensorBoard step -1), so the curves of every
algorithm and seed of one config start from the same point.

The held-out rollouts use the training side's rollout kernels (`PolicySampler`: the training
rollout itself, or `rollout_kl` with the path KL) in chunks of `sample.batch_size` (the last chunk
padded with repeats of its last prompt, dropped afterwards), so they split over the mesh exactly as
training samples do.
"""
import csv
import io
import json
import math
import os
import time
from typing import Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from tdpo_jax import images as images_lib
from tdpo_jax import paths
from tdpo_jax import prompts as prompts_lib
from tdpo_jax import rewards
from tdpo_jax import sharding as sharding_lib

# Keeps 1 - cos finite for an all-zero embedding (such a pair counts as distance 1).
NORM_EPS = 1e-12
# The evaluation before the first update: its files' stem and its TensorBoard step (the epochs
# are 0, 1, ...; epoch 0's evaluation is after epoch 0's update).
BEFORE_TRAINING_NAME = "before_training"
BEFORE_TRAINING_STEP = -1


def is_due(config, epoch):
  """Whether epoch `epoch` (0-based) is evaluated: every `eval.every`-th, and the last one."""
  every = config.eval.every
  return every > 0 and (epoch % every == 0 or epoch == config.num_epochs - 1)


def pairwise_cosine_diversity(embeds):
  """Mean pairwise cosine distance per group (the diversity of one prompt's samples).

  Args:
    embeds: (P, S, d) embeddings, S >= 2 samples of each of P prompts.
  Returns:
    (P,) float32: mean over i < j of 1 - cos(e_i, e_j); 0 when all S samples are identical.
  """
  embeds = jnp.asarray(embeds, jnp.float32)
  samples = embeds.shape[1]
  if samples < 2:
    raise ValueError(f"diversity needs >= 2 samples per prompt, got {samples}")
  unit = embeds / jnp.maximum(jnp.linalg.norm(embeds, axis=-1, keepdims=True), NORM_EPS)
  similarity = jnp.einsum("psd,ptd->pst", unit, unit)
  first, second = np.triu_indices(samples, k=1)
  return jnp.mean(1.0 - similarity[:, first, second], axis=-1)


def heldout_prompt_list(config):
  """The P held-out prompts: the first `eval.num_prompts` of `eval.prompts` (0 = all)."""
  prompts = prompts_lib.load_prompts(config.eval.prompts)
  return list(prompts[:config.eval.num_prompts or len(prompts)])


class PolicySampler(NamedTuple):
  """The two functions of the training side that the evaluation samples with.

  Attributes:
    rollout_params: (state, frozen) -> the current policy's `rollout.RolloutParams`.
    rollout_prompts: (params, prompts (list of B strings), key) -> `rollout.Trajectory`; with
      `reference_unet=` UNet params, (Trajectory, path KL (B,) to that UNet's policy).
    reward_on_mesh: reward_fn -> the same reward scored on the training mesh
      (`kernels.reward_scorer`).
  """
  rollout_params: Callable
  rollout_prompts: Callable
  reward_on_mesh: Callable


class Evaluator:
  """Holds the eval reward functions (built once) and runs the evaluation of one epoch."""

  def __init__(self, config, sampler, models, train_reward_fn):
    """Builds nothing when `eval.every` is 0; otherwise loads every eval reward once.

    Args:
      config: the run config.
      sampler: `PolicySampler`, the training side's rollout (the held-out samples are drawn by
        the kernel the policy trains with).
      models: `epoch.EpochModels` (the critic tower for diversity).
      train_reward_fn: the training reward (already on the mesh), reused when it is also an
        eval reward.

    `config.eval` is checked once per run, by `config_checks.validate_config` (train.run)."""
    self.config, self.sampler = config, sampler
    self.enabled = config.eval.every > 0
    if not self.enabled:
      return
    cache_dir = config.pretrained.cache_dir
    rewards.import_reward_modules(config.reward_modules)  # they register their rewards
    # The training reward is already loaded: a second copy of a ViT-H would double its memory.
    self.reward_fns = {
        name: (train_reward_fn if name == config.reward
               else sampler.reward_on_mesh(
                   rewards.make_reward_fn(name, config.rewards, cache_dir=cache_dir)))
        for name in config.eval.rewards}
    self.prompts = heldout_prompt_list(config)
    self.samples_per_prompt = config.eval.samples_per_prompt
    self.diversity = bool(config.eval.diversity)
    if self.diversity and models.tower is None:
      logging.warning("eval.diversity is on but the pipeline %r has no CLIP image encoder "
                      "(set pretrained.image_encoder); skipping diversity",
                      config.pretrained.model)
      self.diversity = False
    if self.diversity:
      self.jit_embed_images = jax.jit(models.tower.embed_fn)
    self.kl_to_pretrained = bool(config.eval.kl_to_pretrained)

  def due(self, epoch):
    return self.enabled and is_due(self.config, epoch)

  def sample_heldout(self, state, frozen):
    """The held-out samples of the current policy, with the fixed key `eval.seed`.

    Returns:
      (images (N, H, W, 3) host float32, prompts list of N, embeds (N, d) host or None,
      path KL to the pre-trained policy (N,) host or None), rows ordered prompt-major: sample
      s of prompt p is row p S + s.
    """
    sampler, batch = self.sampler, self.config.sample.batch_size
    prompts = [p for p in self.prompts for _ in range(self.samples_per_prompt)]
    total = len(prompts)
    padded = prompts + prompts[-1:] * (math.ceil(total / batch) * batch - total)
    params = sampler.rollout_params(state, frozen)
    key = jax.random.key(self.config.eval.seed)
    images, embeds, kls = [], [], []
    for chunk, start in enumerate(range(0, len(padded), batch)):
      chunk_prompts, chunk_key = padded[start:start + batch], jax.random.fold_in(key, chunk)
      if self.kl_to_pretrained:  # the same samples, with their path KL to the frozen UNet
        trajectory, kl = sampler.rollout_prompts(params, chunk_prompts, chunk_key,
                                                 reference_unet=frozen.unet)
        kls.append(sharding_lib.to_host(kl))
      else:
        trajectory = sampler.rollout_prompts(params, chunk_prompts, chunk_key)
      images.append(sharding_lib.to_host(trajectory.images))
      if self.diversity:
        embeds.append(sharding_lib.to_host(
            self.jit_embed_images(frozen.image_encoder, trajectory.images)))
    images = np.concatenate(images)[:total]
    embeds = np.concatenate(embeds)[:total] if self.diversity else None
    kls = np.concatenate(kls)[:total] if self.kl_to_pretrained else None
    return images, prompts, embeds, kls

  def score(self, images, prompts):
    """{reward name: (N,) float32 host scores} of every eval reward."""
    return {name: np.asarray(fn(images, prompts), np.float32)
            for name, fn in self.reward_fns.items()}

  def evaluate(self, state, frozen, epoch, images, prompts, writer=None, workdir=None):
    """Scores the epoch's samples and the held-out set; writes the table when given a workdir.

    Args:
      state: the `TrainState` after the epoch (its policy samples the held-out prompts).
      frozen: the trainer's `FrozenParams`.
      epoch: the epoch index (table file names, TensorBoard step).
      images, prompts: the epoch's own samples (N_train, H, W, 3) host and their prompts.
      writer: a `MetricWriter` for the markdown table and the grid (optional).
      workdir: where `eval/epoch_EEEE.{csv,png}` go (optional; process 0 only).
    Returns:
      (metrics dict of Python floats, per-prompt rows: list of dicts).
    """
    tic = time.perf_counter()
    metrics = {}
    for name, scores in self.score(images, prompts).items():
      metrics[f"eval/train_prompts/{name}/mean"] = float(np.mean(scores))
      metrics[f"eval/train_prompts/{name}/std"] = float(np.std(scores))
    heldout_metrics, rows = self.evaluate_heldout(state, frozen, f"epoch_{epoch:04d}", epoch,
                                                  writer, workdir)
    metrics.update(heldout_metrics)
    metrics["time/eval_s"] = time.perf_counter() - tic
    return metrics, rows

  def evaluate_before_training(self, state, frozen, writer=None, workdir=None):
    """The held-out evaluation of the initial policy: every curve's common origin.

    Run once before the first update (`eval.before_training`); with the fixed key `eval.seed`
    every algorithm and seed of one config starts from the same images, so their curves share
    this point. Writes `eval/before_training.{json,csv,png}` (process 0) and logs the scalars
    to TensorBoard at step `BEFORE_TRAINING_STEP`; metrics.jsonl keeps one line per epoch.

    Returns:
      the metrics dict (`eval/heldout/...`, `time/eval_s`).
    """
    tic = time.perf_counter()
    metrics, _ = self.evaluate_heldout(state, frozen, BEFORE_TRAINING_NAME, BEFORE_TRAINING_STEP,
                                       writer, workdir)
    metrics["time/eval_s"] = time.perf_counter() - tic
    if workdir is not None and jax.process_index() == 0:
      write_json_atomic(before_training_path(workdir), metrics)
      if writer is not None:
        writer.write_scalars(BEFORE_TRAINING_STEP, metrics)
    return metrics

  def evaluate_heldout(self, state, frozen, name, step, writer=None, workdir=None):
    """Samples and scores the held-out set with the current policy.

    Args:
      state, frozen: as in `evaluate`.
      name: file stem of the table and grid under `<workdir>/eval/`.
      step: the TensorBoard step of the table and grid.
      writer, workdir: as in `evaluate`.
    Returns:
      (metrics dict `eval/heldout/...` of Python floats, per-prompt rows: list of dicts).
    """
    metrics = {}
    heldout_images, heldout_prompts, embeds, kls = self.sample_heldout(state, frozen)
    heldout = self.score(heldout_images, heldout_prompts)
    for reward_name, scores in heldout.items():
      metrics[f"eval/heldout/{reward_name}/mean"] = float(np.mean(scores))
      metrics[f"eval/heldout/{reward_name}/std"] = float(np.std(scores))
    if kls is not None:
      metrics["eval/heldout/kl_to_pretrained"] = float(np.mean(kls))
    shape = (len(self.prompts), self.samples_per_prompt)
    diversity = None
    if embeds is not None:
      diversity = np.asarray(pairwise_cosine_diversity(embeds.reshape(shape + (-1,))))
      metrics["eval/heldout/diversity"] = float(np.mean(diversity))
    rows = []
    for p, prompt in enumerate(self.prompts):
      row = {"prompt": prompt}
      row.update({reward_name: float(np.mean(scores.reshape(shape)[p]))
                  for reward_name, scores in heldout.items()})
      if diversity is not None:
        row["diversity"] = float(diversity[p])
      if kls is not None:
        row["kl_to_pretrained"] = float(np.mean(kls.reshape(shape)[p]))
      rows.append(row)
    if workdir is not None and jax.process_index() == 0:
      write_table(workdir, name, step, rows, writer)
      count = min(len(heldout_prompts), self.config.log.num_grid_images)
      captions = [f"{p} | " + " ".join(f"{n} {heldout[n][i]:.3g}" for n in heldout)
                  for i, p in enumerate(heldout_prompts[:count])]
      path = images_lib.save_grid(os.path.join(workdir, "eval", f"{name}.png"),
                                  heldout_images[:count], captions,
                                  columns=self.samples_per_prompt)
      if writer is not None:
        writer.write_image(step, "eval/heldout_samples", path)
    return metrics, rows


def before_training_path(workdir):
  """`<workdir>/eval/before_training.json`: the held-out metrics of the initial policy."""
  return os.path.join(workdir, "eval", f"{BEFORE_TRAINING_NAME}.json")


def read_before_training(workdir):
  """The metrics `Evaluator.evaluate_before_training` wrote in `workdir`, or None."""
  path = before_training_path(workdir)
  if not paths.exists(path):
    return None
  return json.loads(paths.read_text(path))


def write_json_atomic(path, data):
  """Writes `data` as JSON through a temp file renamed over `path` (a kill leaves no half file;
  on an object store one upload, `paths.write_atomic`)."""
  paths.makedirs(os.path.dirname(path))
  paths.write_atomic(path, json.dumps(data, indent=2), temp=f"{path}.tmp{os.getpid()}")


def markdown_table(rows):
  """A markdown table of per-prompt rows (TensorBoard's text plugin renders markdown)."""
  columns = list(rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [str(row[c]).replace("|", "/") if c == "prompt" else f"{row[c]:.4g}"
             for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_table(workdir, name, step, rows, writer=None):
  """Writes `<workdir>/eval/<name>.csv` and the markdown table to TensorBoard at `step`."""
  directory = os.path.join(workdir, "eval")
  paths.makedirs(directory)
  path = os.path.join(directory, f"{name}.csv")
  text = io.StringIO(newline="")
  table = csv.DictWriter(text, fieldnames=list(rows[0]))
  table.writeheader()
  table.writerows(rows)
  paths.write_text(path, text.getvalue())
  if writer is not None:
    writer.write_text(step, "eval/heldout_table", markdown_table(rows))
  return path
