"""Optional Weights & Biases logging in `metrics_writer.MetricWriter`, with a fake `wandb`
module (the real one is not a dependency): it receives the scalars with the epoch as step, the
image grids, and the run is finished on close; enabled without wandb installed is a clear error.
"""
import sys
import types

import numpy as np
from PIL import Image
import pytest

from tdpo_jax import config_checks
from tdpo_jax import metrics_writer
from tests import helpers


class _FakeRun:

  def __init__(self, **kwargs):
    self.init_kwargs = kwargs
    self.logged = []
    self.finished = False

  def log(self, data, step=None):
    self.logged.append((step, dict(data)))

  def finish(self):
    self.finished = True


def _fake_wandb():
  module = types.ModuleType("wandb")
  module.runs = []

  def init(**kwargs):
    run = _FakeRun(**kwargs)
    module.runs.append(run)
    return run

  class FakeImage:  # pylint: disable=too-few-public-methods

    def __init__(self, data):
      self.data = np.asarray(data)

  module.init = init
  module.Image = FakeImage
  return module


def _wandb_config(tmp_path):
  config = helpers.tiny_config(tmp_path)
  config.log.wandb.enabled = True
  config.log.wandb.project = "proj"
  config.log.wandb.entity = "team"
  config.log.wandb.name = "tiny-run"
  return config


def test_wandb_receives_scalars_and_images(tmp_path, monkeypatch):
  fake = _fake_wandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  config = _wandb_config(tmp_path)
  config_checks.validate_config(config)  # wandb "installed": no error
  writer = metrics_writer.MetricWriter(str(tmp_path), config=config)
  writer.write(0, {"epoch": 0.0, "reward/mean": 1.5, "eval/heldout/aesthetic/mean": 5.25})
  writer.write(1, {"epoch": 1.0, "reward/mean": 2.5})
  grid = np.zeros((8, 6, 3), np.uint8)
  grid[2:5, 1:3] = (10, 200, 30)
  Image.fromarray(grid).save(tmp_path / "grid.png")
  writer.write_image(1, "samples", str(tmp_path / "grid.png"))
  writer.close()
  (run,) = fake.runs
  assert run.init_kwargs["project"] == "proj" and run.init_kwargs["entity"] == "team"
  assert run.init_kwargs["name"] == "tiny-run" and run.init_kwargs["dir"] == str(tmp_path)
  assert run.init_kwargs["config"]["reward"] == config.reward
  assert run.logged[0] == (0, {"reward/mean": 1.5, "eval/heldout/aesthetic/mean": 5.25})
  assert run.logged[1] == (1, {"reward/mean": 2.5})
  step, images = run.logged[2]
  assert step == 1 and list(images) == ["samples"]
  np.testing.assert_array_equal(images["samples"].data, grid)
  assert run.finished


def test_wandb_disabled_by_default_never_imports_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` would raise ImportError
  config = helpers.tiny_config(tmp_path)
  assert not config.log.wandb.enabled
  config_checks.validate_config(config)
  writer = metrics_writer.MetricWriter(str(tmp_path), config=config)
  writer.write(0, {"epoch": 0.0, "reward/mean": 1.0})
  writer.close()


def test_wandb_enabled_but_missing_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)
  with pytest.raises(ValueError, match=r"wandb package is not installed; run `pip install wandb`"):
    config_checks.validate_config(_wandb_config(tmp_path))
