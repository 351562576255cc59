"""The host loop of DDPO / TDPO / TDPO-R / GRPO: models, kernels, logging, checkpoints.

Shapes: N samples per epoch, T DDIM steps, M train micro-batch, k micro-batches per optimizer
step (gradient accumulation), d critic embedding width; latents NCHW.

Per epoch (DESIGN §3):
  sample (rollout.py) -> reward (rewards/) -> per-prompt normalisation (stats.py)
  -> critic values V_old(x_t) of every visited state (critic.py) -> advantages (objectives.py)
  -> timestep-outer PPO updates (train_step.py) -> active-neuron reset (reset.py) -> log.
The math between the reward and the reset is `epoch.py` (pure functions); the jitted kernels
that run it, with their shardings, are declared in `kernels.py`: the rollout per sample batch;
`prepare` (normalisation .. transition gather) and `train_epoch` (a scan over the S optimizer
steps, state donated) as one call each; the dormant fractions / reset; one metrics fetch. The
only mid-epoch host sync is the images leaving the device for the reward. This module keeps the
host loop, preemption, checkpoints and logging.

`config.algorithm` only switches flags of this one loop:
  ddpo   : no critic; every step gets the standardised normalised reward as advantage.
  tdpo   : critic on; A_k = G_k - V(x_k), standardised; no reset.
  tdpo_r : tdpo + reset of the critic's active neurons every `reset.period` epochs.
  grpo   : ddpo with group-relative rewards: the epoch samples `sample.group_size` images of
           each prompt it draws, and each reward is standardised within its group
           (`stats.group_normalise`) instead of by the per-prompt buffers.
"""
import contextlib
import fnmatch
import os
import signal
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from tdpo_jax import checkpoint as checkpoint_lib
from tdpo_jax import config_checks
from tdpo_jax import epoch as epoch_lib
from tdpo_jax import evaluation
from tdpo_jax import images as images_lib
from tdpo_jax import kernels as kernels_lib
from tdpo_jax import metrics_writer
from tdpo_jax import paths
from tdpo_jax import prompts as prompts_lib
from tdpo_jax import rewards
from tdpo_jax import rollout
from tdpo_jax import sharding as sharding_lib
from tdpo_jax.models import pipeline as pipeline_lib
# Used by the Trainer; validate_config itself is `config_checks.validate_config`.
from tdpo_jax.config_checks import ALGORITHMS, samples_per_epoch  # pylint: disable=g-importing-member


class NonFiniteError(FloatingPointError):
  """A reward or loss became NaN/inf; the run stops and keeps what it has written."""


def validate_mesh(config, mesh):
  """Checks that the global batches split over the mesh's batch devices (data x fsdp)."""
  sharding_lib.check_batch_divides("sample.batch_size", config.sample.batch_size, mesh)
  sharding_lib.check_batch_divides("train.batch_size", config.train.batch_size, mesh)


class Trainer:
  """Loads the models once, holds the kernels (kernels.py) and runs the host loop of an epoch.

  `run_epoch` advances a `TrainState`: the rollout per sample batch, the reward on the host (or
  its jitted kernel), then the kernels `prepare`, `train_epoch`, `dormant` / `reset`.
  """

  def __init__(self, config):
    # The config is checked once per run, by `run` (config_checks.validate_config), not here.
    self.config = config
    # The mesh first: a mesh/batch mismatch is reported before any model is loaded.
    self.mesh = sharding_lib.make_mesh(config.mesh, config.num_devices)
    validate_mesh(config, self.mesh)
    self.use_critic, self.use_reset = ALGORITHMS[config.algorithm]
    self.prompts = prompts_lib.load_prompts(config.prompts)
    rewards.import_reward_modules(config.reward_modules)  # they register their rewards
    self.reward_fn = rewards.make_reward_fn(config.reward, config.rewards,
                                            cache_dir=config.pretrained.cache_dir)
    self.pipeline = pipeline_lib.load_pipeline(
        config.pretrained.model, cache_dir=config.pretrained.cache_dir,
        image_encoder=config.pretrained.image_encoder,
        tiny_spec=config.pretrained.tiny)
    self.input_uncond = rollout.tokenize_prompts(self.pipeline, [""])[1]
    # Model rewards score in a row-sharded kernel on the mesh, the others on the host.
    self.score_reward = kernels_lib.reward_scorer(config, self.mesh, self.reward_fn)
    self.models = epoch_lib.make_epoch_models(config, self.pipeline)
    self.kernels = kernels_lib.make_kernels(config, self.mesh, self.models, len(self.prompts),
                                            self.input_uncond)
    # True: wait for each phase so `time/*_s` are run times (benchmarks); False: fully async.
    self.sync_phases = False

  # ---------------------------------------------------------------- setup
  def frozen_params(self):
    """The frozen models placed on the mesh by `config.sharding.rules` (`FrozenParams`)."""
    shardings = self.kernels.shardings.frozen
    text_encoder = sharding_lib.put_tree(self.pipeline.text_encoder_params,
                                         shardings.text_encoder)
    uncond = self.kernels.encode_text(text_encoder, self.input_uncond)
    return sharding_lib.put_tree(
        kernels_lib.frozen_tree(self.models, text_encoder, uncond), shardings)

  def init_state(self):
    """A fresh `TrainState`, born sharded: LoRA at B = 0 (policy == pre-trained), critic at its
    init, `rng` = key(config.seed)."""
    unet = sharding_lib.put_tree(self.pipeline.unet_params, self.kernels.shardings.frozen.unet)
    return self.kernels.init_state(unet, np.int32(self.config.seed))

  def lower_kernels(self, state, frozen):
    """`kernels.lower_epoch` of this trainer (benchmarks/epoch.py)."""
    return kernels_lib.lower_epoch(self.kernels, self.config, state, frozen, self.input_uncond)

  # ---------------------------------------------------------------- phases
  def sample(self, state, frozen, epoch, progress=False):
    """Samples the epoch's N trajectories; returns (trajectory with leading dim N, prompt ids).

    Batch b's noise is `epoch.sample_key(state.rng, epoch, b)`; the prompts are drawn on the
    host by a NumPy generator seeded (config.seed, epoch).
    """
    config = self.config
    params = self.rollout_params(state, frozen)
    host_rng = np.random.default_rng([config.seed, epoch])
    size = config.sample.batch_size
    if config.sample.group_size:  # the whole epoch's prompts first: a group may span batches
      grouped = prompts_lib.grouped_prompt_indices(
          host_rng, len(self.prompts), samples_per_epoch(config), config.sample.group_size)
    trajectories, prompt_index = [], []
    batches = range(config.sample.num_batches_per_epoch)
    for batch in tqdm.tqdm(batches, desc=f"epoch {epoch} sample", disable=not progress,
                           leave=False):
      index = (grouped[batch * size:(batch + 1) * size] if config.sample.group_size
               else prompts_lib.sample_prompt_indices(host_rng, len(self.prompts), size))
      trajectories.append(self.rollout_prompts(
          params, [self.prompts[i] for i in index],
          self.kernels.sample_key(state.rng, epoch, batch)))
      prompt_index.append(index)
    trajectory = jax.tree.map(lambda *x: jnp.concatenate(x), *trajectories)
    return trajectory, np.concatenate(prompt_index)

  def rollout_params(self, state, frozen):
    """The current policy's `RolloutParams` (LoRA merged into the frozen UNet)."""
    unet_params = self.kernels.merge(frozen.unet, state.policy_params)
    return rollout.RolloutParams(unet=unet_params, text_encoder=frozen.text_encoder,
                                 vae=frozen.vae)

  def rollout_prompts(self, params, prompts, rng, reference_unet=None):
    """One jitted rollout of a global batch of prompt strings (every process passes all of
    them, the same on each; each feeds only its own rows). Returns the `Trajectory`, or with
    `reference_unet` (UNet params placed as the frozen UNet) `(Trajectory, path KL (B,))`, the
    KL of each sample's path to that UNet's policy (kernel `rollout_kl`).

    `rng`: a key on the mesh (a kernel's output) or a host key, the same on every process.
    """
    count = len(prompts)
    start, stop = sharding_lib.process_batch_slice(self.mesh, count)
    local_ids, uncond_ids = rollout.tokenize_prompts(self.pipeline, prompts[start:stop])
    input_ids = sharding_lib.host_batch_to_global(local_ids, self.mesh, count)
    uncond_ids = sharding_lib.replicate_host(uncond_ids, self.mesh)
    if not rng.is_fully_replicated or len(rng.sharding.device_set) != self.mesh.size:
      rng = sharding_lib.replicate_host(rng, self.mesh)
    if reference_unet is None:
      return self.kernels.rollout(params, input_ids, uncond_ids, rng)
    return self.kernels.rollout_kl(params, input_ids, uncond_ids, rng, reference_unet)

  def sampler(self):
    """The functions the evaluation samples the policy with (`evaluation.PolicySampler`)."""
    return evaluation.PolicySampler(
        rollout_params=self.rollout_params, rollout_prompts=self.rollout_prompts,
        reward_on_mesh=lambda reward_fn: kernels_lib.reward_scorer(self.config, self.mesh,
                                                                   reward_fn))

  def embed_states(self, frozen, trajectory):
    """Frozen critic embeddings of x_T ... x_1 for every sample: (N, T, d), one jitted call."""
    return self.kernels.embed_states(frozen, trajectory.latents[:, :self.config.sample.num_steps])

  def run_epoch(self, state, frozen, progress=False):
    """One epoch. Returns (new state, metrics dict of Python floats, host images, prompts, rewards).

    Kernels: the rollout (per sample batch), the reward (host or jitted), `prepare`,
    `train_epoch`, then `dormant` / `reset`. The only host syncs are the images for the reward
    and one metrics fetch at the end, unless `self.sync_phases` is set (then each phase is
    waited for, so that its `time/*_s` is its run time, not its dispatch time).
    """
    config, kernels = self.config, self.kernels
    sync = self.sync_phases
    epoch = int(state.epoch)
    times = {}
    tic = time.perf_counter()
    trajectory, prompt_index = self.sample(state, frozen, epoch, progress)
    images = sharding_lib.to_host(trajectory.images)  # all of them, on every process
    times["sample"] = time.perf_counter() - tic

    tic = time.perf_counter()
    prompts = [self.prompts[i] for i in prompt_index]
    reward = np.asarray(self.score_reward(trajectory.images, prompts), np.float32)
    times["reward"] = time.perf_counter() - tic
    if reward.shape != (len(prompts),):
      raise ValueError(f"reward {config.reward!r} returned shape {reward.shape}, expected "
                       f"({len(prompts)},)")
    if not np.all(np.isfinite(reward)):
      bad = np.flatnonzero(~np.isfinite(reward))
      raise NonFiniteError(
          f"epoch {epoch}: reward {config.reward!r} is NaN/inf for {len(bad)} of {len(reward)} "
          f"samples (first prompt: {prompts[bad[0]]!r}); stopping, earlier outputs kept")

    tic = time.perf_counter()
    host_inputs = sharding_lib.replicate_host((np.asarray(prompt_index, np.int32), reward),
                                              self.mesh)
    normaliser, batches, probe, metrics = kernels.prepare(state, frozen, trajectory, *host_inputs)
    del trajectory  # the batches hold what training needs
    if sync:
      jax.block_until_ready(batches)
    times["prepare"] = time.perf_counter() - tic

    tic = time.perf_counter()
    num_updates = batches.latents.shape[0]
    state, step_metrics = kernels.train_epoch(state.replace(normaliser=normaliser), frozen,
                                              batches)
    del batches
    if sync:
      jax.block_until_ready(state)
    times["train"] = time.perf_counter() - tic

    tic = time.perf_counter()
    if self.use_critic:
      metrics.update(kernels.dormant(state.critic_params, probe))
      if self.use_reset and (epoch + 1) % config.reset.period == 0:
        state, reset_stats = kernels.reset(state, probe)
        metrics.update(reset_stats)
    state = state.replace(epoch=state.epoch + 1)
    if sync:
      jax.block_until_ready(state)
    times["reset"] = time.perf_counter() - tic

    tic = time.perf_counter()
    step_metrics, metrics, step = jax.device_get((step_metrics, metrics, state.step))  # once
    times["fetch"] = time.perf_counter() - tic
    metrics.update({k: np.mean(v) for k, v in step_metrics.items()})
    for key in ("policy/loss", "critic/value_loss"):
      if key in metrics and not np.isfinite(metrics[key]):
        raise NonFiniteError(f"epoch {epoch}: {key} is {metrics[key]}; stopping, earlier "
                             "outputs kept")
    metrics.update({
        "epoch": epoch,
        "reward/mean": float(reward.mean()),
        "reward/std": float(reward.std()),
        "reward/min": float(reward.min()),
        "reward/max": float(reward.max()),
        "train/num_updates": num_updates,
        "train/optimizer_steps_total": int(step),
    })
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    metrics = {k: float(v) for k, v in metrics.items()}
    return state, metrics, images, prompts, reward


def summary_line(metrics):
  """One human-readable line per epoch (the full set goes to metrics.jsonl / TensorBoard)."""
  parts = [f"epoch {int(metrics['epoch'])}",
           f"reward {metrics['reward/mean']:.4f} ± {metrics['reward/std']:.4f}",
           f"policy loss {metrics['policy/loss']:+.2e} kl {metrics['policy/approx_kl']:.1e} "
           f"clip {metrics['policy/clipfrac']:.2f}"]
  if "critic/value_loss" in metrics:
    part = (f"value loss {metrics['critic/value_loss']:.4f} "
            f"ev {metrics['critic/explained_variance']:+.3f}")
    if "critic/explained_variance/late" in metrics:
      part += f" late {metrics['critic/explained_variance/late']:+.3f}"
    parts.append(part)
  dormant = [metrics[k] for k in sorted(metrics) if k.startswith("reset/dormant_frac/l")]
  if dormant:
    parts.append("dormant " + "/".join(f"{d:.2f}" for d in dormant))
  if "reset/num_reset" in metrics:
    parts.append(f"reset {int(metrics['reset/num_reset'])} neurons")
  evaluated = eval_summary(metrics)
  if evaluated:
    parts.append(evaluated)
  seconds = f"{metrics['time/epoch_s']:.1f} s"
  if "time/eval_s" in metrics:  # evaluation runs after the epoch, outside its time
    seconds += f" + eval {metrics['time/eval_s']:.1f} s"
  parts.append(seconds)
  return " | ".join(parts)


def eval_summary(metrics):
  """`eval <reward> <mean> ...` of the fixed-key samples' rewards in `metrics` ("" if none)."""
  evaluated = sorted(k for k in metrics if k.startswith("eval/heldout/") and k.endswith("/mean"))
  return ("eval " + " ".join(f"{k[len('eval/heldout/'):-len('/mean')]} {metrics[k]:.4f}"
                             for k in evaluated)) if evaluated else ""


class RunHistory(list):
  """The per-epoch metric dicts of one `run` call (epochs before a resume are not included).

  Attributes:
    preempted: True when SIGTERM (or a JAX preemption notice) stopped the run early, after it
      saved a checkpoint; rerunning the same command resumes.
    resumed_from: the number of completed epochs restored from the workdir, or None.
    already_finished: True when the workdir's checkpoint had `num_epochs` epochs already (nothing
      was loaded or run).
  """
  preempted = False
  resumed_from = None
  already_finished = False


def install_stop_handler():
  """Makes the first SIGTERM set the returned event instead of killing the process (main thread
  only): the run finishes its epoch, saves and returns. A second SIGTERM kills the process at
  once with the default action (whatever the run is blocked in; checkpoints are atomic, so the
  last complete one stays the latest).

  Returns:
    (event, restore): `restore()` puts the previous handler back.
  """
  stop = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    return stop, lambda: None

  def handler(signum, frame):
    del frame
    if stop.is_set():  # the second one: end now
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    stop.set()
    logging.warning("SIGTERM: stopping after this epoch and saving a checkpoint (send SIGTERM "
                    "again to stop at once, without saving)")

  previous = signal.signal(signal.SIGTERM, handler)
  return stop, lambda: signal.signal(signal.SIGTERM, previous)


def stop_requested(stop, manager, epoch):
  """Whether any process got SIGTERM or JAX's preemption notice; every process gets the same
  answer (all of them must take part in the save)."""
  requested = stop.is_set()
  if jax.process_count() > 1:
    requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
  return requested or manager.reached_preemption(epoch)


def restore_or_keep(manager, state):
  """`state` restored from the manager's latest readable checkpoint into the layout (shapes,
  dtypes, shardings) of `state`, or `state` itself when there is none. Returns (state, resumed
  epoch).

  A checkpoint that does not restore or whose checksums differ (checkpoint.py) is reported in one
  warning naming its directory and file; the previous one is tried next, and the unreadable ones
  are moved aside (`<E>.corrupt`) once one restores. Raises `checkpoint.CheckpointError` when
  none does.
  """
  steps = checkpoint_lib.readable_steps(manager)
  if not steps:
    return state, None
  template = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  del state  # free the fresh state before the restored one is allocated
  failed = []
  for epoch in steps:
    tic = time.perf_counter()
    try:
      state, _ = checkpoint_lib.restore(manager, epoch, template)
    except checkpoint_lib.CheckpointError as error:
      if epoch == steps[-1]:
        raise checkpoint_lib.CheckpointError(
            f"{error}; no earlier checkpoint to fall back to: move {manager.directory} away to "
            "start from scratch") from error
      logging.warning("%s; falling back to the previous checkpoint", error)
      failed.append(epoch)
      continue
    for bad in failed:
      checkpoint_lib.set_aside(manager, bad)
    if failed:
      logging.warning("moved the unreadable checkpoint(s) %s aside as <E>.corrupt in %s", failed,
                      manager.directory)
    logging.info("resumed from the checkpoint after epoch %d in %s (%.1f s)", epoch - 1,
                 manager.directory, time.perf_counter() - tic)
    return state, epoch
  raise AssertionError("unreachable")


# Config keys (fnmatch patterns on dotted paths) that a `Trainer` never reads: a run whose config
# differs from the trainer's only in these may use it (`run(..., trainer=)`).
RUN_ONLY_KEY_PATTERNS = ("num_epochs", "log.*", "eval.*", "checkpoint.*")


def check_trainer_serves(trainer, config):
  """Raises ValueError naming the keys in which `config` differs from `trainer.config` outside
  `RUN_ONLY_KEY_PATTERNS` (the trainer's models and kernels were built for its own config)."""
  built, wanted = (checkpoint_lib.flatten(checkpoint_lib.config_to_dict(c))
                   for c in (trainer.config, config))
  differences = [
      f"{key}: trainer {built.get(key, '<missing>')!r}, run {wanted.get(key, '<missing>')!r}"
      for key in sorted(set(built) | set(wanted))
      if built.get(key, "<missing>") != wanted.get(key, "<missing>")
      and not any(fnmatch.fnmatchcase(key, p) for p in RUN_ONLY_KEY_PATTERNS)]
  if differences:
    raise ValueError(f"the trainer was built for another config ({'; '.join(differences)}); "
                     f"expected one that differs only in {', '.join(RUN_ONLY_KEY_PATTERNS)}")


def run(config, workdir, *, validated=False, trainer=None):
  """Trains until `config.num_epochs` epochs are done; writes metrics (JSONL + TensorBoard),
  image grids and checkpoints to `workdir`, resuming from its latest checkpoint if any.

  Saves the whole `TrainState` every `checkpoint.every_epochs` epochs, after the last epoch, and
  on SIGTERM (after finishing the current epoch; the run then returns early with
  `preempted=True`). A NaN/inf epoch raises `NonFiniteError` and saves nothing of that epoch. A
  failed checkpoint save raises `checkpoint.CheckpointError`, a failed metrics write OSError.
  Without a committed checkpoint the run starts from scratch and first deletes what an earlier
  run logged (`metrics_writer.clear_run_outputs`).

  Args:
    config: the run's config.
    workdir: the run's folder: local, or any path `etils.epath` reaches (`gs://bucket/run`;
      paths.py). A local one is locked for the run (`checkpoint.workdir_lock`); a non-local one
      cannot be, and the run logs one line saying so.
    validated: the caller already ran `config_checks.validate_config(config)` (main does, before
      its heavy imports); otherwise it runs here, once.
    trainer: a `Trainer` to run with instead of building one, so that its models and compiled
      kernels serve several runs in one process (the tests do this); its config may differ from
      `config` only in `RUN_ONLY_KEY_PATTERNS` (the seed is not among them: the trainer draws
      each epoch's prompts with it).

  Returns:
    a `RunHistory` (a list) of the per-epoch metric dicts of the epochs run by this call.
  """
  if not validated:
    config_checks.validate_config(config)  # before anything is written to the workdir
  if trainer is not None:
    check_trainer_serves(trainer, config)
  config_checks.check_workdir(workdir)
  resume_epoch, meta = checkpoint_lib.latest(workdir)
  if jax.process_count() > 1:  # nobody creates checkpoints/ before every process has looked
    multihost_utils.sync_global_devices("tdpo_jax.run: read latest checkpoint")
  if meta is not None:  # also before anything is written
    checkpoint_lib.check_compatible(meta["config"], config, workdir)
  if resume_epoch is not None and resume_epoch >= config.num_epochs:
    history = RunHistory()
    history.resumed_from, history.already_finished = resume_epoch, True
    logging.info("already finished: %d of %d epochs in %s; nothing to do", resume_epoch,
                 config.num_epochs, workdir)
    return history
  # Process 0 writes the logs and coordinates the checkpoints: its lock stands for the run.
  lock = (checkpoint_lib.workdir_lock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    return _train_in_workdir(config, workdir, trainer)


def _start_logs(config, workdir, resume_epoch):
  """Process 0, once the state is restored: clears a lost run's logs when starting from
  scratch, and writes config.json."""
  if resume_epoch is None:
    removed = metrics_writer.clear_run_outputs(workdir)
    if removed:
      logging.warning("no committed checkpoint in %s: starting from scratch; deleted %d files an "
                      "earlier run logged (metrics.jsonl, TensorBoard events, images, eval)",
                      workdir, len(removed))
  paths.makedirs(os.path.join(workdir, "images"))
  path = os.path.join(workdir, "config.json")
  paths.write_atomic(path, config.to_json_best_effort(indent=2), temp=path + ".tmp")


def _train_in_workdir(config, workdir, trainer):
  """`run`'s body once the config is checked and the workdir is this run's."""
  trainer = trainer or Trainer(config)
  evaluator = evaluation.Evaluator(  # loads the eval rewards once (or nothing)
      config, trainer.sampler(), trainer.models, trainer.score_reward)
  frozen = trainer.frozen_params()
  manager = checkpoint_lib.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                        async_save=config.checkpoint.async_save)
  writer = None
  stop, restore_handler = install_stop_handler()
  every = config.checkpoint.every_epochs
  history = RunHistory()
  finished = False
  try:
    state, resume_epoch = restore_or_keep(manager, trainer.init_state())
    # A run killed between orbax's final rename and its clean-up leaves one step too many.
    checkpoint_lib.enforce_max_to_keep(manager, config.checkpoint.max_to_keep)
    history.resumed_from = resume_epoch
    if jax.process_index() == 0:  # only process 0 writes logs and images
      _start_logs(config, workdir, resume_epoch)  # only now: the restore succeeded
    writer = metrics_writer.MetricWriter(workdir, resume_epoch=resume_epoch, config=config)
    if evaluator.enabled and config.eval.before_training and int(state.epoch) == 0:
      # Every curve's common origin: the initial policy (a rerun before the first checkpoint
      # recomputes the same numbers: the held-out key is fixed).
      origin = evaluator.evaluate_before_training(state, frozen, writer, workdir)
      logging.info("before training | %s | %.1f s", eval_summary(origin), origin["time/eval_s"])
    epochs = tqdm.trange(int(state.epoch), config.num_epochs, desc="epochs",
                         disable=not config.log.progress)
    for _ in epochs:
      tic = time.perf_counter()
      state, metrics, images, prompts, reward = trainer.run_epoch(
          state, frozen, progress=config.log.progress)
      metrics["time/epoch_s"] = time.perf_counter() - tic
      epoch = int(metrics["epoch"])
      if evaluator.due(epoch):  # before writing: one metrics.jsonl line per epoch
        metrics.update(evaluator.evaluate(state, frozen, epoch, images, prompts, writer,
                                          workdir)[0])
      writer.write(epoch, metrics)
      if (jax.process_index() == 0 and config.log.image_grid_every
          and epoch % config.log.image_grid_every == 0):  # images only from process 0
        count = min(config.log.num_grid_images, len(images))
        captions = [f"{p} | {r:.3g}" for p, r in zip(prompts[:count], reward[:count])]
        path = images_lib.save_grid(
            os.path.join(workdir, "images", f"epoch_{epoch:04d}.png"), images[:count], captions)
        writer.write_image(epoch, "samples", path)
      epochs.set_postfix(reward=f"{metrics['reward/mean']:.4g}")
      logging.info("%s", summary_line(metrics))
      history.append(metrics)
      done = epoch + 1
      history.preempted = done < config.num_epochs and stop_requested(stop, manager, done)
      if (history.preempted or done == config.num_epochs
          or (every > 0 and done % every == 0)):
        checkpoint_lib.save(manager, state, config)  # raises if the previous save failed
      if history.preempted:
        logging.warning("stopping after epoch %d on SIGTERM/preemption; checkpoint in %s",
                        epoch, manager.directory)
        break
    checkpoint_lib.wait_for_saves(manager)  # the last save failed: an error, not a success
    finished = True
  finally:
    restore_handler()
    # Close everything even when one of them fails; re-raise only when nothing else is.
    errors = []
    for close in (manager.wait_until_finished, manager.close,
                  writer.close if writer is not None else None):
      if close is None:
        continue
      try:
        close()
      except Exception as error:  # pylint: disable=broad-except
        errors.append(error)
        logging.warning("while stopping: %s", error)
    if finished and errors:
      raise errors[0]
  return history
