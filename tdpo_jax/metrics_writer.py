"""Per-epoch metrics to `<workdir>/metrics.jsonl`, TensorBoard event files (tensorboardX) and,
optionally, Weights & Biases.

Only process 0 writes (multi-host runs call this on every host). tensorboardX, not
`flax.metrics.tensorboard`, which imports TensorFlow (DESIGN §6). W&B is not a dependency: with
`config.log.wandb.enabled` the `wandb` package must be installed (`pip install wandb`); it then
receives the same scalars and images, with the epoch as its step.
"""
import importlib
import json
import os

import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Appends one JSON line per epoch and mirrors the scalars to TensorBoard."""

  def __init__(self, workdir, resume_epoch=None, config=None):
    """
    Args:
      workdir: the run's directory.
      resume_epoch: when resuming from a checkpoint of this many completed epochs, the logged
        epochs >= resume_epoch (written after that checkpoint by the interrupted run) are dropped
        from metrics.jsonl and purged from TensorBoard, so no epoch is logged twice.
      config: the run's config; its `log.wandb` section (if any) turns W&B on.
    """
    self.active = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    self.wandb_run = None
    if self.active:
      wandb_config = config.log.get("wandb") if config is not None else None
      if wandb_config is not None and wandb_config.enabled:
        self.wandb_run = start_wandb(wandb_config, config, workdir)
      if resume_epoch is not None:
        truncate_metrics(workdir, resume_epoch)
      import tensorboardX  # pylint: disable=g-import-not-at-top  (heavy; writer process only)
      self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"),
                                                    purge_step=resume_epoch)

  def write(self, epoch, metrics):
    """metrics: flat dict of Python floats with namespaced keys (`reward/mean`, ...)."""
    if not self.active:
      return
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"epoch": epoch, **metrics}) + "\n")
    for key, value in metrics.items():
      if key != "epoch":
        self.tensorboard.add_scalar(key, value, epoch)
    self.tensorboard.flush()
    if self.wandb_run is not None:
      self.wandb_run.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

  def write_scalars(self, step, metrics):
    """Logs scalars to TensorBoard / W&B only (not metrics.jsonl, one line per epoch): for the
    evaluation before training, at step -1."""
    if not self.active:
      return
    for key, value in metrics.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()
    if self.wandb_run is not None and step >= 0:  # W&B steps must not decrease or be negative
      self.wandb_run.log(dict(metrics), step=step)

  def write_image(self, epoch, tag, path):
    """Logs the PNG at `path` (an image grid) under `tag`."""
    if self.active:
      image = np.asarray(Image.open(path).convert("RGB"))
      self.tensorboard.add_image(tag, image, epoch, dataformats="HWC")
      if self.wandb_run is not None:
        self.wandb_run.log({tag: _import_wandb().Image(image)}, step=epoch)

  def write_text(self, epoch, tag, text):
    """Logs markdown `text` (TensorBoard's text plugin renders tables)."""
    if self.active:
      self.tensorboard.add_text(tag, text, epoch)
      self.tensorboard.flush()

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None


def check_config(config):
  """Raises a one-line ValueError when `log.wandb.enabled` but `wandb` is not installed (run at
  startup, before any model is loaded)."""
  wandb_config = config.log.get("wandb")
  if wandb_config is not None and wandb_config.enabled:
    _import_wandb()


def _import_wandb():
  """The `wandb` module, or a ValueError with the install command (main prints it as one line,
  like any other bad setting)."""
  try:
    return importlib.import_module("wandb")
  except ImportError as error:
    raise ValueError("config.log.wandb.enabled is True but the wandb package is not "
                     "installed; run `pip install wandb` or set "
                     "--config.log.wandb.enabled=False") from error


def start_wandb(wandb_config, config, workdir):
  """The `wandb.init(...)` run of `config.log.wandb` (project, entity, name; "" = W&B's default)."""
  return _import_wandb().init(
      project=wandb_config.project or None, entity=wandb_config.entity or None,
      name=wandb_config.name or None, dir=workdir,
      config=json.loads(config.to_json_best_effort()))


def read_metrics(workdir):
  """The list of per-epoch dicts in `<workdir>/metrics.jsonl`."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir, epoch):
  """Keeps the lines of `<workdir>/metrics.jsonl` with epoch < `epoch` (atomic rewrite); a line
  cut short by a killed process is dropped too."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return

  def keep(line):
    try:
      return json.loads(line)["epoch"] < epoch
    except (ValueError, KeyError):
      return False

  with open(path) as f:
    lines = [line for line in f if keep(line)]
  with open(path + ".tmp", "w") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)
