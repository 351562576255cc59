"""A non-local workdir (`gs://...`) through `etils.epath`, on a fake GCS bucket.

`etils.epath.testing.mock_epath` replaces the backend of every epath prefix (gs:// included) by
mock functions; `_FakeGcs` maps `gs://fake-bucket/...` onto a local folder (the bucket) and back,
so every write that goes through epath lands in that folder, and one that does not (a plain
`open` / `os.makedirs` on the string) would create a local folder named `gs:` instead, which each
test looks for (in the working directory too, which is moved to an empty folder).

Covered on the fake bucket: the metrics writer (metrics.jsonl rewritten whole, TensorBoard event
files copied from a local folder, truncation on resume, image grids), config.json and images/
(`train._start_logs`), the eval tables, json and grids, the plots, `clear_run_outputs`, and, with
orbax itself, a checkpoint manager's directory, metadata-only steps written and read back
(`checkpoint.latest`, `restore_meta`), an unreadable step named and set aside, `max_to_keep`
enforced; the workdir lock (not taken, one line logged) and `check_workdir` (no local access).

Not covered, and why: the checkpoint's arrays (`StandardSave` / `StandardRestore`) go through
tensorstore's own gcs driver, not epath, so they cannot be redirected to the fake bucket; hence no
end-to-end `train.run` on it. Orbax's one call outside epath when it opens a gs:// manager (the
bucket's hierarchical-namespace check through `google.cloud.storage`) is stubbed to False. The
real gs:// backends (gcsfs or TensorFlow's gfile) and GCS's own semantics are not exercised.
"""
import json
import os

from etils.epath import testing as epath_testing
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import gcs_utils
import pytest

from tdpo_jax import checkpoint
from tdpo_jax import config_checks
from tdpo_jax import evaluation
from tdpo_jax import images as images_lib
from tdpo_jax import metrics_writer
from tdpo_jax import paths
from tdpo_jax import plot
from tdpo_jax import train
from tests import helpers

BUCKET = "gs://fake-bucket"
WORKDIR = f"{BUCKET}/runs/a"


class _FakeGcs:
  """The mock functions of `mock_epath`: `gs://fake-bucket/x` <-> `<root>/x`, both ways."""

  def __init__(self, root):
    self.root = str(root)
    self.calls = []  # the gs:// paths the backend was asked about

  def local(self, path):
    path = os.fspath(path)
    if path.startswith(BUCKET):
      self.calls.append(path)
      return self.root + path[len(BUCKET):]
    assert not path.startswith("gs:"), f"an unexpected bucket: {path}"
    return path

  def remote(self, path):
    path = os.fspath(path)
    return BUCKET + path[len(self.root):] if path.startswith(self.root) else path

  def mocks(self):
    def one(fn, path, *args, **kwargs):
      return fn(self.local(path), *args, **kwargs)

    def open_(fn, path, mode):
      local = self.local(path)
      if path.startswith(BUCKET) and set(mode) & set("wax"):  # an object needs no folders
        os.makedirs(os.path.dirname(local), exist_ok=True)
      return fn(local, mode)

    def two(fn, path, target, **kwargs):
      return fn(self.local(path), self.local(target), **kwargs)

    def glob(fn, pattern):
      return [self.remote(p) for p in fn(self.local(pattern))]

    def walk(fn, top, **kwargs):
      for root, dirs, files in fn(self.local(top), **kwargs):
        yield self.remote(root), dirs, files

    return dict(open=open_, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one,
                remove=one, rmtree=one, stat=one, glob=glob, walk=walk, rename=two, replace=two,
                copy=two)


@pytest.fixture(name="bucket")
def _bucket(tmp_path, monkeypatch):
  """The fake bucket's local folder; the working directory is an empty folder meanwhile."""
  root = tmp_path / "fake-bucket"
  root.mkdir()
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  # Orbax asks google.cloud.storage whether a gs:// bucket has a hierarchical namespace.
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  fake = _FakeGcs(root)
  with epath_testing.mock_epath(**fake.mocks()):
    yield root
  assert fake.calls, "nothing went through the fake bucket"
  stray = [d for d, names, _ in os.walk(tmp_path) for n in names if n.startswith("gs:")]
  assert not stray, f"a local folder named gs: was created in {stray}"
  assert sorted(os.listdir(cwd)) == []


def _files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root)
                for f in fs)


def test_check_workdir_accepts_gs_without_touching_the_local_filesystem(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError(f"the local filesystem was consulted: {args}")

  for name in ("exists", "isdir", "abspath", "expanduser"):
    monkeypatch.setattr(config_checks.os.path, name, forbidden)
  monkeypatch.setattr(config_checks.os, "access", forbidden)
  monkeypatch.setattr(config_checks.os, "statvfs", forbidden)
  config_checks.check_workdir("gs://bucket/x")
  config_checks.check_workdir("s3://bucket/runs/x/")
  with pytest.raises(ValueError, match=r"workdir 'gs://' names no bucket"):
    config_checks.check_workdir("gs://")
  with pytest.raises(ValueError, match=r"scheme 'ftp':// is not supported; expected a local "
                                       r"folder or one of gs://"):
    config_checks.check_workdir("ftp://host/x")


def test_paths_tell_local_from_remote():
  assert paths.is_local("/tmp/run") and paths.is_local("run") and paths.is_local("~/run")
  assert not paths.is_local(WORKDIR) and not paths.is_local("s3://b/x")
  assert checkpoint.checkpoint_dir(WORKDIR) == f"{WORKDIR}/checkpoints"
  assert checkpoint.checkpoint_dir("run") == os.path.join(os.getcwd(), "run", "checkpoints")


def test_metrics_writer_on_a_bucket(bucket):
  writer = metrics_writer.MetricWriter(WORKDIR)
  local_events = writer._local_tensorboard  # pylint: disable=protected-access
  writer.write(0, {"epoch": 0.0, "reward/mean": 1.5})
  events = sorted((bucket / "runs/a/tensorboard").iterdir())
  assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.")
  first_size = events[0].stat().st_size
  assert b"reward/mean" in events[0].read_bytes()  # copied on the flush, before close
  writer.write_scalars(-1, {"eval/heldout/x/mean": 0.25})
  writer.write_text(0, "eval/heldout_table", "| prompt | x |\n|---|---|\n| a | 1 |")
  grid = images_lib.save_grid(f"{WORKDIR}/images/epoch_0000.png", np.full((2, 4, 4, 3), 0.5))
  assert grid == f"{WORKDIR}/images/epoch_0000.png"
  writer.write_image(0, "samples", grid)
  writer.write(1, {"epoch": 1.0, "reward/mean": 2.5})
  writer.close()
  assert not os.path.exists(local_events)  # the local copy is removed on close
  assert events[0].stat().st_size > first_size
  assert b"eval/heldout_table" in events[0].read_bytes() and b"samples" in events[0].read_bytes()
  lines = (bucket / "runs/a/metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["reward/mean"] for line in lines] == [1.5, 2.5]
  assert [m["epoch"] for m in metrics_writer.read_metrics(WORKDIR)] == [0, 1]

  # A resume from the checkpoint after epoch 0 drops epoch 1, then appends the new epoch 1.
  writer = metrics_writer.MetricWriter(WORKDIR, resume_epoch=1)
  assert [m["epoch"] for m in metrics_writer.read_metrics(WORKDIR)] == [0]
  writer.write(1, {"epoch": 1.0, "reward/mean": 3.5})
  writer.close()
  assert [m["reward/mean"] for m in metrics_writer.read_metrics(WORKDIR)] == [1.5, 3.5]
  assert len(list((bucket / "runs/a/tensorboard").iterdir())) == 2  # a new file (purge_step)
  assert not os.path.exists(bucket / "runs/a/metrics.jsonl.tmp")


def test_run_outputs_on_a_bucket(bucket, tmp_path):
  config = helpers.tiny_config(str(tmp_path / "cache"))
  train._start_logs(config, WORKDIR, None)  # pylint: disable=protected-access
  assert json.loads((bucket / "runs/a/config.json").read_text())["seed"] == config.seed
  rows = [{"prompt": "a cat", "aesthetic": 5.0}, {"prompt": "a dog", "aesthetic": 4.0}]
  table = evaluation.write_table(WORKDIR, "epoch_0000", 0, rows)
  assert table == f"{WORKDIR}/eval/epoch_0000.csv"
  assert (bucket / "runs/a/eval/epoch_0000.csv").read_bytes() == (
      b"prompt,aesthetic\r\na cat,5.0\r\na dog,4.0\r\n")
  evaluation.write_json_atomic(evaluation.before_training_path(WORKDIR), {"x": 1.0})
  assert evaluation.read_before_training(WORKDIR) == {"x": 1.0}
  images_lib.save_grid(f"{WORKDIR}/eval/epoch_0000.png", np.zeros((2, 4, 4, 3)), ["a", "b"])
  writer = metrics_writer.MetricWriter(WORKDIR)
  for epoch in range(3):
    writer.write(epoch, {"epoch": float(epoch), "reward/mean": float(epoch), "reward/std": 0.1,
                         "policy/approx_kl": 0.01})
  writer.close()
  plotted = plot.plot_workdir(WORKDIR)
  assert sorted(plotted) == [f"{WORKDIR}/plots/kl.png", f"{WORKDIR}/plots/reward.png"]
  assert (bucket / "runs/a/plots/reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (bucket / "runs/a/eval/epoch_0000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Starting from scratch deletes what the lost run logged; the plots stay.
  removed = metrics_writer.clear_run_outputs(WORKDIR)
  assert all(p.startswith(f"{WORKDIR}/") for p in removed)
  assert sorted(p[len(WORKDIR) + 1:] for p in removed if "tfevents" not in p) == [
      "config.json", "eval/before_training.json", "eval/epoch_0000.csv", "eval/epoch_0000.png",
      "metrics.jsonl"]
  assert [f for f in _files(bucket) if not f.startswith("runs/a/plots/")] == []


def _save_meta_steps(workdir, steps):
  """Metadata-only steps (the `state` item's arrays would go through tensorstore's gcs driver)."""
  manager = checkpoint.make_manager(workdir, async_save=False)
  for step in steps:
    manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(
        {"epoch": step, "config": {"seed": 0}})), force=True)
  manager.wait_until_finished()
  manager.close()


def test_checkpoint_metadata_on_a_bucket(bucket, monkeypatch):
  assert checkpoint.latest(WORKDIR) == (None, None)  # reads only: creates nothing
  assert _files(bucket) == []
  _save_meta_steps(WORKDIR, (1, 2, 3))
  assert {f.split("/")[3] for f in _files(bucket)} == {"1", "2", "3"}
  assert "runs/a/checkpoints/3/commit_success.txt" in _files(bucket)  # orbax's gs:// commit
  assert checkpoint.latest(WORKDIR) == (3, {"epoch": 3, "config": {"seed": 0}})

  # An unreadable meta is named (as a gs:// path), skipped, and can be set aside.
  (bucket / "runs/a/checkpoints/3/meta/metadata").write_text("not json")
  warnings = []
  monkeypatch.setattr(checkpoint.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  assert checkpoint.latest(WORKDIR) == (2, {"epoch": 2, "config": {"seed": 0}})
  assert warnings and f"file {WORKDIR}/checkpoints/3/meta/metadata" in warnings[0]
  manager = checkpoint.make_manager(WORKDIR, async_save=False)
  with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint 3 is unreadable \\(file "
                                                       f"{WORKDIR}/checkpoints/3/meta/metadata"):
    checkpoint.restore_meta(manager, 3)
  checkpoint.set_aside(manager, 3)
  assert manager.all_steps() == [1, 2]
  assert os.path.isdir(bucket / "runs/a/checkpoints/3.corrupt")
  checkpoint.enforce_max_to_keep(manager, 1)
  assert manager.all_steps() == [2]
  manager.close()
  assert not os.path.exists(bucket / "runs/a/checkpoints/1")


def test_a_bucket_workdir_is_not_locked_and_says_so(bucket, monkeypatch):
  warnings = []
  monkeypatch.setattr(checkpoint.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
  with checkpoint.workdir_lock(WORKDIR):
    with checkpoint.workdir_lock(WORKDIR):  # nothing to stop a second holder
      pass
  assert warnings == [checkpoint.unlocked_message(WORKDIR)] * 2
  assert warnings[0].startswith(f"workdir {WORKDIR} is not locked (no file locks on gs://)")
  assert "\n" not in warnings[0] and "only one run may use it" in warnings[0]
  assert _files(bucket) == []  # no .run.lock anywhere
  paths.makedirs(f"{WORKDIR}/x")  # the fixture's check needs one call through the bucket
