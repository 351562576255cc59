"""Per-epoch metrics to `<workdir>/metrics.jsonl` and TensorBoard event files (tensorboardX).

Only process 0 writes (multi-host runs call this on every host). tensorboardX, not
`flax.metrics.tensorboard`, which imports TensorFlow (DESIGN §6).
"""
import json
import os

import jax
import numpy as np
from PIL import Image


class MetricWriter:
  """Appends one JSON line per epoch and mirrors the scalars to TensorBoard."""

  def __init__(self, workdir, resume_epoch=None):
    """resume_epoch: when resuming from a checkpoint of this many completed epochs, the logged
    epochs >= resume_epoch (written after that checkpoint by the interrupted run) are dropped
    from metrics.jsonl and purged from TensorBoard, so no epoch is logged twice."""
    self.active = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    if self.active:
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

  def write_image(self, epoch, tag, path):
    if self.active:
      image = np.asarray(Image.open(path).convert("RGB"))
      self.tensorboard.add_image(tag, image, epoch, dataformats="HWC")

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()


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
