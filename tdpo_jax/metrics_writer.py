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

  def __init__(self, workdir):
    self.active = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = None
    if self.active:
      import tensorboardX  # pylint: disable=g-import-not-at-top  (heavy; writer process only)
      self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

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
