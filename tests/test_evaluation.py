"""Cross-reward evaluation (tdpo_jax/evaluation.py) and its hook in `train.run`.

- Diversity against the closed form, computed pair by pair in NumPy; identical images -> 0.
- A bad eval config names the bad value (an unknown reward lists the registered ones).
- A tiny 2-epoch run with two eval rewards logs every eval metric each epoch; the train-prompt
  scores agree with the training reward's own computation on the same images; the per-prompt
  table agrees with the scalars; `tdpo_jax.plot` draws the workdir.
- The train-prompt scores equal the JPEG sizes PIL gives for the same images; the held-out
  samples are identical across calls with the same state (fixed key) and across a 1- and a
  2-device mesh.
- The evaluation before training is the held-out evaluation of the initial state (KL to the
  pre-trained model exactly 0), written beside the epochs' and not into metrics.jsonl.
- The path KL summed while sampling (kernel `rollout_kl`) equals torch's Normal KLs of the two
  policies' steps on the visited states, and its samples are the training rollout's.
"""
import csv
import io
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from tdpo_jax import config_checks
from tdpo_jax import evaluation
from tdpo_jax import plot
from tdpo_jax import train
from tests import helpers

EVAL_REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")


def _fast_config(cache_dir, **overrides):
  """tiny with 4 DDIM steps (4 optimizer steps per epoch): the kernels of test_checkpoint.py's
  and test_faults.py's configs (the rest differs only in run-only keys), so that whichever test
  file compiles them first serves the others through the compilation cache."""
  values = {"num_epochs": 2, "eval.every": 1, "eval.rewards": EVAL_REWARDS,
            "sample.num_steps": 4, "checkpoint.async_save": False}
  values.update(overrides)
  return helpers.tiny_config(cache_dir, **values)


@pytest.fixture(scope="module")
def run_dir(cache_dir, trainer_and_evaluator, tmp_path_factory):
  """The tiny 2-epoch run, with the module's shared Trainer (its compiled kernels serve the
  evaluator tests below too)."""
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer, _ = trainer_and_evaluator
  history = train.run(_fast_config(cache_dir), workdir, trainer=trainer)
  return workdir, history


# --------------------------------------------------------------------------------- diversity
def _diversity_reference(embeds):
  """Mean over i < j of 1 - cos(e_i, e_j), one prompt at a time, in float64 NumPy."""
  out = []
  for group in np.asarray(embeds, np.float64):
    distances = []
    for i in range(len(group)):
      for j in range(i + 1, len(group)):
        cosine = group[i] @ group[j] / (np.linalg.norm(group[i]) * np.linalg.norm(group[j]))
        distances.append(1.0 - cosine)
    out.append(np.mean(distances))
  return np.asarray(out)


def test_diversity_matches_pairwise_cosine_distance():
  embeds = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(evaluation.pairwise_cosine_diversity(embeds),
                             _diversity_reference(embeds), rtol=1e-5, atol=1e-6)


def test_diversity_of_identical_and_opposite_samples():
  vector = np.random.default_rng(1).normal(size=(1, 1, 8)).astype(np.float32)
  identical = np.repeat(vector, 3, axis=1)
  np.testing.assert_allclose(evaluation.pairwise_cosine_diversity(identical), [0.0], atol=1e-6)
  opposite = np.concatenate([vector, -vector], axis=1)  # cos = -1 -> distance 2
  np.testing.assert_allclose(evaluation.pairwise_cosine_diversity(opposite), [2.0], rtol=1e-6)
  with pytest.raises(ValueError, match=">= 2 samples"):
    evaluation.pairwise_cosine_diversity(vector)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, message", [
    ({"eval.rewards": ("jpeg_compressibility", "no_such_reward")},
     r"unknown reward 'no_such_reward': expected one of \[.*'jpeg_compressibility'"),
    ({"eval.samples_per_prompt": 1}, r"eval.samples_per_prompt=1 must be >= 2"),
    ({"eval.num_prompts": 99}, r"eval.num_prompts=99 must be in \[0, 12\]"),
    ({"eval.prompts": "no_such_set"}, r"unknown prompt set 'no_such_set'"),
    ({"eval.every": -1}, r"eval.every=-1 must be >= 0"),
    ({"eval.rewards": ()}, r"eval.rewards=\(\) must be a non-empty tuple"),
])
def test_bad_eval_config_is_named(tmp_path, overrides, message):
  config = helpers.tiny_config(tmp_path, **overrides)
  with pytest.raises(ValueError, match=message):
    config_checks.validate_config(config)


def test_eval_off_skips_validation_of_the_rest(tmp_path):
  config = helpers.tiny_config(tmp_path, **{"eval.every": 0, "eval.rewards": ("nope",)})
  config_checks.validate_config(config)  # nothing is evaluated, so nothing else is checked


def test_eval_epochs():
  config = helpers.tiny_config("", **{"num_epochs": 7, "eval.every": 3})
  assert [e for e in range(7) if evaluation.is_due(config, e)] == [0, 3, 6]
  config = helpers.tiny_config("", **{"num_epochs": 5, "eval.every": 3})
  assert [e for e in range(5) if evaluation.is_due(config, e)] == [0, 3, 4]  # + the last


# ------------------------------------------------------------------------------- tiny run
def test_run_logs_every_eval_metric(run_dir):
  workdir, history = run_dir
  assert [int(m["epoch"]) for m in history] == [0, 1]
  for metrics in history:
    for name in EVAL_REWARDS:
      for split in ("train_prompts", "heldout"):
        for stat in ("mean", "std"):
          assert np.isfinite(metrics[f"eval/{split}/{name}/{stat}"])
    assert 0.0 <= metrics["eval/heldout/diversity"] <= 2.0
    # Evaluated after the epoch's updates: the LoRA is no longer zero, so the policy moved.
    assert metrics["eval/heldout/kl_to_pretrained"] > 0.0
    # The training reward is jpeg_compressibility (-kB), computed by run_epoch on the same
    # images; incompressibility is +kB.
    np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_compressibility/mean"],
                               metrics["reward/mean"], rtol=1e-6)
    np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_incompressibility/mean"],
                               -metrics["reward/mean"], rtol=1e-6)
    np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_compressibility/std"],
                               metrics["reward/std"], rtol=1e-5)
    np.testing.assert_allclose(metrics["eval/heldout/jpeg_compressibility/mean"],
                               -metrics["eval/heldout/jpeg_incompressibility/mean"], rtol=1e-6)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert len(logged) == 2  # one line per epoch, eval included
  assert logged[1]["eval/heldout/diversity"] == history[1]["eval/heldout/diversity"]


def test_run_evaluates_the_initial_policy_once_before_training(run_dir, trainer_and_evaluator):
  workdir, _ = run_dir
  origin = evaluation.read_before_training(workdir)
  # The initial policy is the pre-trained model (LoRA B = 0): its path KL is exactly 0, and its
  # scores are those of an evaluation of a fresh initial state (the same fixed key).
  assert origin["eval/heldout/kl_to_pretrained"] == 0.0
  trainer, evaluator = trainer_and_evaluator
  expected, rows = evaluator.evaluate_heldout(trainer.init_state(), trainer.frozen_params(),
                                              "unused", 0)
  for name in EVAL_REWARDS:
    np.testing.assert_allclose(origin[f"eval/heldout/{name}/mean"],
                               expected[f"eval/heldout/{name}/mean"], rtol=1e-6)
  with open(os.path.join(workdir, "eval", "before_training.csv"), newline="") as f:
    assert [r["prompt"] for r in csv.DictReader(f)] == [r["prompt"] for r in rows]
  assert os.path.isfile(os.path.join(workdir, "eval", "before_training.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_run_writes_per_prompt_table(run_dir):
  workdir, history = run_dir
  config = _fast_config("")
  prompts = evaluation.heldout_prompt_list(config)
  for metrics in history:
    epoch = int(metrics["epoch"])
    with open(os.path.join(workdir, "eval", f"epoch_{epoch:04d}.csv"), newline="") as f:
      rows = list(csv.DictReader(f))
    assert [row["prompt"] for row in rows] == prompts
    assert list(rows[0]) == ["prompt", *EVAL_REWARDS, "diversity", "kl_to_pretrained"]
    # Equal samples per prompt: the mean of the per-prompt means is the overall mean.
    for name in EVAL_REWARDS:
      np.testing.assert_allclose(np.mean([float(r[name]) for r in rows]),
                                 metrics[f"eval/heldout/{name}/mean"], rtol=1e-5)
    np.testing.assert_allclose(np.mean([float(r["diversity"]) for r in rows]),
                               metrics["eval/heldout/diversity"], rtol=1e-5)
    assert os.path.isfile(os.path.join(workdir, "eval", f"epoch_{epoch:04d}.png"))


def test_plot_draws_the_run(run_dir, tmp_path):
  workdir, _ = run_dir
  paths = plot.main([workdir, "--out", str(tmp_path)])
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["reward.png", "eval_jpeg_compressibility.png",
                          "eval_jpeg_incompressibility.png", "diversity.png", "kl.png",
                          "dormant.png"])
  for path in paths:
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (plot.FIGURE_SIZE[1] * plot.DPI, plot.FIGURE_SIZE[0] * plot.DPI, 3)
    assert image.std() > 0 and len(np.unique(image.reshape(-1, 3), axis=0)) > 2


# --------------------------------------------------------------------- evaluator directly
def _pil_jpeg_kb(images):
  sizes = []
  for image in images:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(image * 255), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=95)
    sizes.append(buffer.tell() / 1000.0)
  return np.asarray(sizes)


def _evaluator(config, trainer):
  return evaluation.Evaluator(config, trainer.sampler(), trainer.models, trainer.score_reward)


@pytest.fixture(scope="module")
def trainer_and_evaluator(cache_dir):
  """One Trainer of `_fast_config` for the module (`helpers.shared_trainer`: the run above uses
  it too) and one evaluator of it, whose jitted embedding function the other evaluators of this
  module reuse (a fresh `jax.jit` would compile it again). The evaluator
  gets `_fast_config` itself: a shared trainer's `config` may be another test's that differs in
  eval.* (run-only keys)."""
  config = _fast_config(cache_dir)
  trainer = helpers.shared_trainer(config)
  return trainer, _evaluator(config, trainer)


def test_train_prompt_scores_are_the_jpeg_sizes(trainer_and_evaluator):
  trainer, evaluator = trainer_and_evaluator
  frozen, state = trainer.frozen_params(), trainer.init_state()
  images = np.random.default_rng(2).uniform(size=(4, 64, 64, 3)).astype(np.float32)
  images[:2] *= 0.1  # two darker, more compressible images: the scores must differ
  metrics, rows = evaluator.evaluate(state, frozen, 0, images, ["cat"] * 4)
  sizes = _pil_jpeg_kb(images)
  np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_incompressibility/mean"],
                             sizes.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_incompressibility/std"],
                             sizes.std(), rtol=1e-4)
  np.testing.assert_allclose(metrics["eval/train_prompts/jpeg_compressibility/mean"],
                             -sizes.mean(), rtol=1e-5)
  assert len(rows) == evaluator.config.eval.num_prompts


def test_heldout_samples_are_fixed_and_mesh_independent(cache_dir, trainer_and_evaluator):
  trainer, evaluator = trainer_and_evaluator
  frozen, state = trainer.frozen_params(), trainer.init_state()
  images_a, prompts_a, embeds_a, kls_a = evaluator.sample_heldout(state, frozen)
  images_b, prompts_b, embeds_b, _ = evaluator.sample_heldout(state, frozen)
  # Before the first update the policy is the pre-trained model (LoRA B = 0): no KL.
  np.testing.assert_array_equal(kls_a, 0.0)
  config = evaluator.config
  assert images_a.shape == (config.eval.num_prompts * config.eval.samples_per_prompt, 64, 64, 3)
  assert prompts_a == prompts_b
  np.testing.assert_array_equal(images_a, images_b)
  np.testing.assert_array_equal(embeds_a, embeds_b)
  # Samples of one prompt differ (their keys do), so diversity is not trivially 0.
  assert np.abs(images_a[0] - images_a[1]).max() > 1e-3
  # 3 prompts x 2 samples = 6 rows: two rollouts of 4, the second padded. Chunk 0 holds the
  # same prompts with the same key as above, so its rows are the same images, embeddings and
  # (zero) KLs. It reuses the module evaluator's jitted functions: the same shapes, no compile.
  padded = _evaluator(_fast_config(cache_dir, **{"eval.num_prompts": 3}), trainer)
  padded.jit_embed_images = evaluator.jit_embed_images
  images_p, prompts_p, embeds_p, kls_p = padded.sample_heldout(state, frozen)
  assert images_p.shape[0] == embeds_p.shape[0] == kls_p.shape[0] == 6
  assert prompts_p[:4] == prompts_a and prompts_p[4] == prompts_p[5]
  np.testing.assert_array_equal(images_p[:4], images_a)
  np.testing.assert_array_equal(embeds_p[:4], embeds_a)
  np.testing.assert_array_equal(kls_p, 0.0)
  # The same evaluation on a 2-device mesh: the rollout batch splits over both devices. (Its
  # path KL is not compared, so it is off there: one compilation less.)
  sharded = helpers.shared_trainer(_fast_config(cache_dir, num_devices=2))
  assert sharded.mesh.devices.size == 2
  assert sharded.kernels.shardings.rows.num_devices == 2
  sharded_eval = _evaluator(
      _fast_config(cache_dir, num_devices=2, **{"eval.kl_to_pretrained": False}), sharded)
  # The same state, placed on the 2-device mesh as the sharded trainer places its own.
  sharded_state = jax.device_put(state, sharded.kernels.shardings.state)
  images_c, _, embeds_c, _ = sharded_eval.sample_heldout(sharded_state, sharded.frozen_params())
  np.testing.assert_allclose(images_c, images_a, atol=1e-4)
  # Per row: the random tiny image tower amplifies the images' rounding (3.1e-6 here) to 1.8e-4
  # relative in one row on an AVX2 AMD EPYC (within 1e-3 elementwise on earlier machines); two
  # samples differ by ~0.24.
  row_error = helpers.row_relative_errors(embeds_c, embeds_a)
  assert row_error.max() <= 1e-3, row_error
  assert jax.device_count() >= 2


def test_path_kl_is_the_sum_of_gaussian_kls(trainer_and_evaluator):
  """The held-out path KL against torch's Normal KL, step by step, for a perturbed policy."""
  torch = pytest.importorskip("torch")
  from tdpo_jax import ddim  # pylint: disable=import-outside-toplevel
  from tdpo_jax import rollout  # pylint: disable=import-outside-toplevel
  trainer, evaluator = trainer_and_evaluator
  frozen = trainer.frozen_params()
  # The perturbation drawn on the host (NumPy): with jax.random it cost a compilation per leaf
  # shape eagerly (most of this test's time: 44 s, 8 s now), or ~70 s to compile as one jit.
  rng = np.random.default_rng(3)
  policy_unet = jax.device_put(
      jax.tree.map(lambda leaf: (np.asarray(leaf) + 1e-2 * rng.standard_normal(
          leaf.shape, np.float32)).astype(leaf.dtype), frozen.unet),
      jax.tree.map(lambda leaf: leaf.sharding, frozen.unet))
  params = trainer.rollout_params(trainer.init_state(), frozen).replace(unet=policy_unet)
  prompts, key = ["a cat", "a dog", "a cat", "a fox"], jax.random.key(4)
  trajectory, kl = trainer.rollout_prompts(params, prompts, key, reference_unet=frozen.unet)
  kl = np.asarray(kl)
  # The samples are the training rollout's (the same kernel math, compiled apart).
  plain = trainer.rollout_prompts(params, prompts, key)
  for name in ("latents", "log_probs", "images"):
    np.testing.assert_allclose(getattr(trajectory, name), getattr(plain, name), rtol=1e-5,
                               atol=1e-6, err_msg=name)
  config, pipeline = evaluator.config, trainer.models.policy_pipeline
  alphas = ddim.alphas_cumprod(pipeline.scheduler_config)
  expected = np.zeros(kl.shape, np.float64)

  @jax.jit  # one step's Gaussian; jitted once instead of ~20 eager UNet calls (~100 s on CPU)
  def mean_std(unet, latents, timesteps):
    eps = rollout.guided_eps(pipeline, unet, latents, timesteps, trajectory.prompt_embeds,
                             frozen.uncond_embeds, config.sample.guidance_scale)
    return ddim.ddim_mean_std(eps, timesteps, latents, alphas, config.sample.num_steps,
                              config.sample.eta)

  for t in range(config.sample.num_steps):
    latents, timesteps = trajectory.latents[:, t], trajectory.timesteps[:, t]
    normals = []
    for unet in (policy_unet, frozen.unet):
      mean, std = mean_std(unet, latents, timesteps)
      normals.append(torch.distributions.Normal(
          torch.from_numpy(np.asarray(mean, np.float64)),
          torch.from_numpy(np.broadcast_to(np.asarray(std, np.float64), mean.shape).copy())))
    step = torch.distributions.kl_divergence(*normals).numpy()
    expected += step.reshape(step.shape[0], -1).mean(axis=1)
  assert np.all(expected > 0)
  np.testing.assert_allclose(kl, expected, rtol=1e-3)
