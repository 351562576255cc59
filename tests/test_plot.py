"""`python -m tdpo_jax.plot`: PNGs from a metrics.jsonl (the run-based check is in
tests/test_evaluation.py::test_plot_draws_the_run).

- A synthetic metrics.jsonl with every plotted family gives one non-blank PNG per family, of the
  configured size; the command prints their paths.
- Families that were not logged are not drawn; a workdir without metrics.jsonl is a clear error.
"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tdpo_jax import plot
from tests import helpers


def _write_metrics(workdir, rows):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def _rows(num_epochs=6, eval_every=2):
  rng = np.random.default_rng(0)
  rows = []
  for epoch in range(num_epochs):
    row = {"epoch": epoch, "reward/mean": 5.0 + 0.1 * epoch, "reward/std": 0.3,
           "policy/approx_kl": 1e-4 * epoch, "policy/kl_penalty": 2e-4 * epoch}
    row.update({f"reset/dormant_frac/l{i}": float(rng.uniform()) for i in range(4)})
    if epoch % eval_every == 0:
      for name in ("aesthetic", "pickscore"):
        for split in ("train_prompts", "heldout"):
          row[f"eval/{split}/{name}/mean"] = float(rng.normal())
          row[f"eval/{split}/{name}/std"] = 0.1
      row["eval/heldout/diversity"] = 0.3 - 0.01 * epoch
    rows.append(row)
  return rows


def _check_png(path):
  image = np.asarray(Image.open(path).convert("RGB"))
  assert image.shape == (plot.FIGURE_SIZE[1] * plot.DPI, plot.FIGURE_SIZE[0] * plot.DPI, 3)
  assert image.std() > 0 and len(np.unique(image.reshape(-1, 3), axis=0)) > 2


def test_every_family_is_plotted(tmp_path):
  _write_metrics(tmp_path, _rows())
  paths = plot.plot_workdir(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == sorted([
      "reward.png", "eval_aesthetic.png", "eval_pickscore.png", "diversity.png", "kl.png",
      "dormant.png"])
  assert all(os.path.dirname(p) == os.path.join(str(tmp_path), "plots") for p in paths)
  for path in paths:
    _check_png(path)


def test_unlogged_families_are_skipped(tmp_path):
  rows = [{"epoch": e, "reward/mean": float(e), "reward/std": 0.5, "policy/approx_kl": 0.0}
          for e in range(3)]
  _write_metrics(tmp_path, rows)
  paths = plot.plot_workdir(str(tmp_path), str(tmp_path / "out"))
  assert sorted(os.path.basename(p) for p in paths) == ["kl.png", "reward.png"]


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"no metrics.jsonl in .*expected the --workdir"):
    plot.plot_workdir(str(tmp_path))
  _write_metrics(tmp_path, [])
  with pytest.raises(ValueError, match="is empty"):
    plot.plot_workdir(str(tmp_path))


def test_command_prints_the_written_paths(tmp_path):
  _write_metrics(tmp_path, _rows(num_epochs=3))
  out = tmp_path / "figures"
  result = subprocess.run([sys.executable, "-m", "tdpo_jax.plot", str(tmp_path), "--out",
                           str(out)], cwd=helpers.REPO, capture_output=True, text=True,
                          check=True)
  printed = result.stdout.split()
  assert len(printed) == 6 and all(os.path.isfile(p) for p in printed)
  assert all(p.startswith(str(out)) for p in printed)
  missing = subprocess.run([sys.executable, "-m", "tdpo_jax.plot", str(tmp_path / "nope")],
                           cwd=helpers.REPO, capture_output=True, text=True)
  assert missing.returncode != 0 and "error: no metrics.jsonl" in missing.stderr


def test_grid_caption_band_fits_the_longest_caption():
  from tdpo_jax import images  # pylint: disable=import-outside-toplevel
  pixels = np.zeros((2, 32, 32, 3), np.float32)
  one_line = images.make_grid(pixels, ["a red circle", "two blue squares"], columns=2)
  assert one_line.size == (2 * 128, 128 + 12 + 4)  # 32 px cells upscaled to 128, one text line
  long = " ".join(f"reward_{i} 0.123" for i in range(20))  # wraps past the cap
  capped = images.make_grid(pixels, [long, "short"], columns=2)
  assert capped.size == (2 * 128, 128 + 12 * images.MAX_CAPTION_LINES + 4)
  assert images.make_grid(pixels).size == (2 * 128, 128)  # no captions, no band
