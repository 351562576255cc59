"""Per-epoch metrics to `<workdir>/metrics.jsonl`, TensorBoard event files (tensorboardX) and,
optionally, Weights & Biases.

Only process 0 writes (multi-host runs call this on every host). tensorboardX, not
`flax.metrics.tensorboard`, which imports TensorFlow (DESIGN §6). W&B is not a dependency: with
`config.log.wandb.enabled` the `wandb` package must be installed (`pip install wandb`); it then
receives the same scalars and images, with the epoch as its step.

Writes are synchronous: a failed write (a full disk, a read-only filesystem) raises OSError in
the training loop, which stops the run (tensorboardX's own background writer thread would die
and leave the next write blocked forever on its full queue).

A non-local workdir (`gs://...`, through `etils.epath`, see paths.py): metrics.jsonl is rewritten
whole on every epoch (an object store cannot append; an object appears only once complete), and
TensorBoard's event files are written to a local temporary folder (their names end in a random
suffix), then copied to `<workdir>/tensorboard/<the same file name>` on every flush (each
`write`, `write_scalars`, `write_text`) and on `close` (tensorboardX writes gs:// only with extra
packages; an event file is append-only, so each copy is a valid prefix of the final file). A
failed copy raises in the training loop like a failed local write. The layout under the workdir
is the same as for a local one.
"""
import io
import json
import os
import shutil
import tempfile
import uuid

import jax
import numpy as np
from PIL import Image

from tdpo_jax import config_checks
from tdpo_jax import paths


class MetricWriter:
  """Appends one JSON line per epoch and mirrors the scalars to TensorBoard."""

  def __init__(self, workdir, resume_epoch=None, config=None):
    """
    Args:
      workdir: the run's directory.
      resume_epoch: when resuming from a checkpoint of this many completed epochs, the logged
        epochs >= resume_epoch (written after that checkpoint by the interrupted run) are dropped
        from metrics.jsonl and purged from TensorBoard, so no epoch is logged twice.
      config: the run's config; its `log.wandb` section turns W&B on (`enabled`).
    """
    self.active = jax.process_index() == 0
    self.local = paths.is_local(workdir)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.tensorboard = None
    self.wandb_run = None
    self._jsonl_lines = None  # non-local: the file's lines, rewritten whole on each write
    self._local_tensorboard = None  # non-local: the local folder of the event files
    self._uploaded = {}  # non-local: event file name -> size last copied
    if self.active:
      if config is not None and config.log.wandb.enabled:
        self.wandb_run = start_wandb(config.log.wandb, config, workdir)
      if resume_epoch is not None:
        truncate_metrics(workdir, resume_epoch)
      if not self.local:
        self._jsonl_lines = (list(io.StringIO(paths.read_text(self.jsonl_path)))
                             if paths.exists(self.jsonl_path) else [])
        self._local_tensorboard = tempfile.mkdtemp(prefix="tdpo_jax_tensorboard_")
      import tensorboardX  # pylint: disable=g-import-not-at-top  (heavy; writer process only)
      if self.local:
        self.tensorboard = tensorboardX.SummaryWriter(self.tensorboard_dir,
                                                      purge_step=resume_epoch)
      else:  # a unique name: a restart within the same second must not overwrite the old file
        self.tensorboard = tensorboardX.SummaryWriter(
            self._local_tensorboard, purge_step=resume_epoch,
            filename_suffix=f".{uuid.uuid4().hex[:8]}")
      _write_synchronously(self.tensorboard)

  def write(self, epoch, metrics):
    """metrics: flat dict of Python floats with namespaced keys (`reward/mean`, ...)."""
    if not self.active:
      return
    line = json.dumps({"epoch": epoch, **metrics}) + "\n"
    if self.local:
      with open(self.jsonl_path, "a") as f:
        f.write(line)
    else:
      if self._jsonl_lines and not self._jsonl_lines[-1].endswith("\n"):
        self._jsonl_lines[-1] += "\n"
      self._jsonl_lines.append(line)
      paths.write_text(self.jsonl_path, "".join(self._jsonl_lines))
    for key, value in metrics.items():
      if key != "epoch":
        self.tensorboard.add_scalar(key, value, epoch)
    self._flush()
    if self.wandb_run is not None:
      self.wandb_run.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

  def write_scalars(self, step, metrics):
    """Logs scalars to TensorBoard / W&B only (not metrics.jsonl, one line per epoch): for the
    evaluation before training, at step -1."""
    if not self.active:
      return
    for key, value in metrics.items():
      self.tensorboard.add_scalar(key, value, step)
    self._flush()
    if self.wandb_run is not None and step >= 0:  # W&B steps must not decrease or be negative
      self.wandb_run.log(dict(metrics), step=step)

  def write_image(self, epoch, tag, path):
    """Logs the PNG at `path` (an image grid; local or non-local) under `tag`."""
    if self.active:
      with paths.as_path(path).open("rb") as file:
        image = np.asarray(Image.open(file).convert("RGB"))
      self.tensorboard.add_image(tag, image, epoch, dataformats="HWC")
      if self.wandb_run is not None:
        self.wandb_run.log({tag: _import_wandb().Image(image)}, step=epoch)

  def write_text(self, epoch, tag, text):
    """Logs markdown `text` (TensorBoard's text plugin renders tables)."""
    if self.active:
      self.tensorboard.add_text(tag, text, epoch)
      self._flush()

  def _flush(self):
    self.tensorboard.flush()
    if not self.local:
      self._upload_events()

  def _upload_events(self):
    """Copies each local event file that grew since its last copy to `<workdir>/tensorboard/`."""
    for name in sorted(os.listdir(self._local_tensorboard)):
      local = os.path.join(self._local_tensorboard, name)
      if not os.path.isfile(local):
        continue
      size = os.path.getsize(local)
      if self._uploaded.get(name) != size:
        with open(local, "rb") as file:
          paths.write_bytes(os.path.join(self.tensorboard_dir, name), file.read())
        self._uploaded[name] = size

  def close(self):
    try:
      if self.tensorboard is not None:
        tensorboard, self.tensorboard = self.tensorboard, None
        tensorboard.close()
        if not self.local:
          self._upload_events()
    finally:
      if self._local_tensorboard is not None:
        shutil.rmtree(self._local_tensorboard, ignore_errors=True)
        self._local_tensorboard = None
    if self.wandb_run is not None:
      self.wandb_run.finish()
      self.wandb_run = None


def _write_synchronously(summary_writer):
  """Makes a tensorboardX `SummaryWriter` write each event in the calling thread.

  tensorboardX (2.6.5, pinned) queues events for a daemon thread (`EventFileWriter._worker`);
  when a write fails there (ENOSPC) the thread dies with the error printed, and the next
  `add_event` blocks forever on the full queue. Writing in the caller's thread turns the failure
  into an OSError the run stops on. (Private attributes: checked, so another tensorboardX
  version keeps its own behaviour instead of breaking.)
  """
  event_writer = summary_writer._get_file_writer().event_writer  # pylint: disable=protected-access
  worker = getattr(event_writer, "_worker", None)
  records = getattr(event_writer, "_ev_writer", None)
  if worker is None or records is None or not hasattr(records, "write_event"):
    return
  worker.stop()  # drains the queue (the file's first events) and joins the thread
  event_writer._worker = _StoppedWorker()  # pylint: disable=protected-access  (close() stops it)
  event_writer.add_event = records.write_event


class _StoppedWorker:
  """Stands for tensorboardX's stopped writer thread (its `close()` calls `stop()`)."""

  def stop(self):
    pass


# What a run logs into its workdir besides checkpoints (cleared when it starts from scratch).
RUN_OUTPUT_PATTERNS = ("metrics.jsonl", "metrics.jsonl.tmp", "config.json",
                       "tensorboard/events.out.tfevents.*", "images/epoch_*.png",
                       "eval/epoch_*.csv", "eval/epoch_*.png", "eval/before_training.*")


def clear_run_outputs(workdir):
  """Deletes what an earlier run logged in `workdir` (metrics.jsonl, TensorBoard event files,
  image grids, eval tables and grids): called when a run starts from scratch because no
  checkpoint was committed, so the lost run's epochs are not logged twice. Only process 0.

  Returns:
    the list of deleted paths.
  """
  removed = []
  for pattern in RUN_OUTPUT_PATTERNS:
    for path in paths.glob(workdir, pattern):
      if paths.as_path(path).is_file():
        paths.remove(path)
        removed.append(path)
  return removed


def _import_wandb():
  """The `wandb` module, or a one-line ValueError with the install command (the startup check,
  `config_checks.check_wandb`, raises the same)."""
  return config_checks.import_wandb()


def start_wandb(wandb_config, config, workdir):
  """The `wandb.init(...)` run of `config.log.wandb` (project, entity, name; "" = W&B's default)."""
  return _import_wandb().init(  # W&B's local files: in the workdir, or W&B's default (./wandb)
      project=wandb_config.project or None, entity=wandb_config.entity or None,
      name=wandb_config.name or None, dir=workdir if paths.is_local(workdir) else None,
      config=json.loads(config.to_json_best_effort()))


def read_metrics(workdir):
  """The list of per-epoch dicts in `<workdir>/metrics.jsonl` (local or non-local)."""
  with paths.as_path(os.path.join(workdir, "metrics.jsonl")).open() as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir, epoch):
  """Keeps the lines of `<workdir>/metrics.jsonl` with epoch < `epoch` (atomic rewrite); a line
  cut short by a killed process is dropped too."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return

  def keep(line):
    try:
      return json.loads(line)["epoch"] < epoch
    except (ValueError, KeyError):
      return False

  lines = [line for line in io.StringIO(paths.read_text(path)) if keep(line)]
  paths.write_atomic(path, "".join(lines), temp=path + ".tmp")
