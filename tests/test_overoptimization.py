"""benchmarks/overoptimization.py: the matched-proxy arithmetic against hand-computed values, and
the whole benchmark on a reduced setting (4 algorithms x 1 seed x 2 epochs, tiny rollouts)."""
import csv
import importlib.util
import os

import numpy as np
from PIL import Image
import pytest

from tests import helpers

REDUCED = ["num_devices=1", "sample.num_steps=4", "sample.batch_size=4",
           "sample.num_batches_per_epoch=1", "train.batch_size=4",
           "train.gradient_accumulation_steps=1", "eval.num_prompts=2",
           "eval.samples_per_prompt=2", "reset.period=1", "eval.kl_to_pretrained=False"]


def _benchmark():
  path = os.path.join(helpers.REPO, "benchmarks", "overoptimization.py")
  spec = importlib.util.spec_from_file_location("overoptimization", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_first_crossing_interpolates_linearly():
  bench = _benchmark()
  proxy = np.array([0.1, 0.3, 0.2, 0.5])
  gold = np.array([1.0, 2.0, 3.0, 4.0])
  assert bench.first_crossing(proxy, gold, 0.05) == 1.0  # already above at the start
  assert bench.first_crossing(proxy, gold, 0.2) == pytest.approx(1.5)  # halfway 0.1 -> 0.3
  assert bench.first_crossing(proxy, gold, 0.4) == pytest.approx(3 + 2 / 3)  # 2/3 of 0.2 -> 0.5
  assert bench.first_crossing(proxy, gold, 0.6) is None


def test_matched_table_values():
  bench = _benchmark()
  # a: proxy 0 -> 0.3 with gold flat; b: proxy 0.1 -> 0.2 with gold falling 1 -> 0.
  records = []
  for epoch, (pa, pb, gb) in enumerate([(0.0, 0.1, 1.0), (0.3, 0.2, 0.0)]):
    for seed, shift in ((0, -0.01), (1, 0.01)):  # two seeds, symmetric around the values
      records.append(dict(algorithm="a", seed=seed, epoch=epoch, proxy=pa + shift, gold=0.5))
      records.append(dict(algorithm="b", seed=seed, epoch=epoch, proxy=pb + shift, gold=gb))
  curves = bench.mean_curves(records)
  np.testing.assert_allclose(curves["b"][1], [0.1, 0.2])
  np.testing.assert_allclose(curves["b"][2], [0.01, 0.01])
  table = bench.matched_table(curves)
  # Levels: from the highest start (0.1) to the lowest maximum (0.2), in 3 steps.
  lines = table.strip().splitlines()
  assert "gold @ proxy 0.1333" in lines[0] and "gold @ proxy 0.2000" in lines[0]
  row_b = [cell.strip() for cell in lines[3].split("|")[1:-1]]
  # b's gold at proxy 0.1333 (1/3 of its way) = 2/3; 0.1667 -> 1/3; 0.2 -> 0; epoch 1.0.
  assert row_b == ["b", "0.6667", "0.3333", "0.0000", "1.0", "0.2000", "0.0000"]
  row_a = [cell.strip() for cell in lines[2].split("|")[1:-1]]
  assert row_a[:5] == ["a", "0.5000", "0.5000", "0.5000", "0.7"]  # proxy 0.2 at epoch 2/3


def test_no_common_gain_is_said():
  bench = _benchmark()
  records = [dict(algorithm=a, seed=0, epoch=e, proxy=p, gold=0.0)
             for a, ps in (("a", (0.5, 0.4)), ("b", (0.1, 0.2))) for e, p in enumerate(ps)]
  assert "No proxy level above 0.5000" in bench.matched_table(bench.mean_curves(records))


def test_bad_arguments_are_one_line_errors(tmp_path):
  bench = _benchmark()
  with pytest.raises(SystemExit, match="unknown 'ppo'"):
    bench.main(["--out", str(tmp_path), "--algorithms", "ddpo,ppo"])
  with pytest.raises(SystemExit, match="no config entry 'sample.nope'"):
    bench.main(["--out", str(tmp_path), "--set", "sample.nope=1"])
  assert not os.listdir(tmp_path)


def test_reduced_benchmark_end_to_end(tmp_path, capsys):
  bench = _benchmark()
  args = ["--out", str(tmp_path), "--seeds", "0", "--epochs", "2"]
  for item in REDUCED:
    args += ["--set", item]
  bench.main(args)
  with open(tmp_path / "overoptimization.csv") as file:
    rows = list(csv.DictReader(file))
  assert [(r["algorithm"], r["epoch"]) for r in rows] == [
      (a, str(e)) for a in bench.ALGORITHMS for e in range(2)]
  for row in rows:
    assert np.isfinite(float(row["proxy"])) and 0.0 <= float(row["gold"]) <= 1.0
    assert np.isfinite(float(row["eval_proxy"])) and 0.0 <= float(row["eval_gold"]) <= 1.0
  # Epoch 0 samples the pre-trained model with the same seed and key: every algorithm agrees.
  first = [(float(r["proxy"]), float(r["gold"])) for r in rows if r["epoch"] == "0"]
  np.testing.assert_allclose(first, [first[0]] * len(first), rtol=1e-6)
  for name in ("reward_vs_epoch.png", "gold_vs_proxy.png"):
    image = np.asarray(Image.open(tmp_path / name).convert("L"), np.float32)
    assert image.shape[0] >= 300 and image.shape[1] >= 400
    assert image.std() > 5  # lines and text, not a blank canvas
  # Two rows of panels: the epoch's samples and the fixed-key eval samples (11 x 8 in at 100 dpi).
  assert Image.open(tmp_path / "reward_vs_epoch.png").size == (1100, 800)
  table = (tmp_path / "table.md").read_text()
  for algorithm in bench.ALGORITHMS:
    assert f"| {algorithm} |" in table
  assert table in capsys.readouterr().out
  # A rerun finds the finished runs and only rewrites the outputs.
  stamp = os.path.getmtime(tmp_path / "runs" / "ddpo_seed0" / "metrics.jsonl")
  bench.main(args)
  assert os.path.getmtime(tmp_path / "runs" / "ddpo_seed0" / "metrics.jsonl") == stamp
