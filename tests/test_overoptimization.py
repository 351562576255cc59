"""benchmarks/overoptimization.py: the matched-proxy and bootstrap arithmetic against hand-computed
values, the argument and settings checks, and the whole benchmark on a reduced setting
(ddpo and tdpo_r x 1 seed x 2 epochs, tiny rollouts)."""
import csv
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from tests import helpers

REDUCED = {"num_devices": 1, "sample.num_steps": 4, "sample.batch_size": 4,
           "sample.num_batches_per_epoch": 1, "train.batch_size": 4,
           "train.gradient_accumulation_steps": 1, "eval.num_prompts": 2,
           "eval.samples_per_prompt": 2, "reset.period": 1, "eval.kl_to_pretrained": False}
SHAPES = os.path.join(helpers.REPO, "configs", "shapes.py")
REDUCED_STATES = 4  # sample.num_steps above: ev_k00 .. ev_k03
MIN_IMAGE_STD = 5  # grey-level std of a PNG with lines and text (a blank canvas has ~0)


def _benchmark():
  return helpers.load_script("benchmarks/overoptimization.py", "overoptimization")


def _cells(line):
  return [cell.strip() for cell in line.split("|")[1:-1]]


def test_first_crossing_interpolates_linearly():
  bench = _benchmark()
  proxy = np.array([0.1, 0.3, 0.2, 0.5])
  gold = np.array([1.0, 2.0, 3.0, 4.0])
  assert bench.first_crossing(proxy, gold, 0.05) == 1.0  # already above at the start
  assert bench.first_crossing(proxy, gold, 0.2) == pytest.approx(1.5)  # halfway 0.1 -> 0.3
  assert bench.first_crossing(proxy, gold, 0.4) == pytest.approx(3 + 2 / 3)  # 2/3 of 0.2 -> 0.5
  assert bench.first_crossing(proxy, gold, 0.6) is None


def test_peak_proxy_and_late_mean():
  bench = _benchmark()
  proxy = [0.1, 0.2, 0.3, 0.4, 0.5]
  # gold rises, peaks at the third epoch (twice: the first maximum counts), then falls
  assert bench.peak_proxy(proxy, [0.5, 0.7, 0.9, 0.9, 0.6]) == pytest.approx(0.3)
  assert bench.peak_proxy(proxy, [np.nan, 0.7, np.nan, 0.2, 0.6]) == pytest.approx(0.2)
  assert bench.peak_proxy(proxy, [np.nan] * 5) is None
  assert bench.late_mean([9.0] + [1.0, 3.0] * 5) == pytest.approx(2.0)  # the last 10 only
  assert bench.late_mean([np.nan, 2.0], epochs=2) == pytest.approx(2.0)
  assert bench.late_mean([np.nan, np.nan]) is None


def test_bootstrap_identical_seeds_is_the_point():
  bench = _benchmark()
  curve = np.array([0.1, 0.4, 0.3])
  per_seed = {"gold": np.stack([curve] * 3, 1)}  # [E=3, S=3], every seed the same
  assert bench.bootstrap(per_seed, lambda m: m["gold"].max()) == (
      pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.4))
  # a single seed: the interval is the point itself
  assert bench.bootstrap({"gold": curve[:, None]}, lambda m: m["gold"][-1]) == (
      pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
  assert bench.bootstrap(per_seed, lambda m: None) == (None, None, None)
  low, high = bench.bootstrap_band(per_seed["gold"])
  np.testing.assert_allclose(low, curve)
  np.testing.assert_allclose(high, curve)


def test_bootstrap_two_seeds():
  bench = _benchmark()
  # Seed 0's gold peaks at proxy 0.2, seed 1's at proxy 0.3 (proxy the same in both); the mean
  # gold [0.5, 0.65, 0.6] peaks at 0.2.
  proxy = np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]])
  gold = np.array([[0.5, 0.5], [0.9, 0.4], [0.4, 0.8]])
  per_seed = {"proxy": proxy, "gold": gold}

  def statistic(m):
    return bench.peak_proxy(m["proxy"], m["gold"])

  point, low, high = bench.bootstrap(per_seed, statistic)
  assert point == pytest.approx(0.2)  # the statistic of the mean curve
  # 1000 resamples of 2 seeds: ~1/4 are seed 0 twice, ~1/4 seed 1 twice, so the 2.5 / 97.5
  # percentiles are exactly the per-seed statistics.
  assert (low, high) == (pytest.approx(0.2), pytest.approx(0.3))
  point, low, high = bench.bootstrap(per_seed, lambda m: m["gold"][-1])
  assert point == pytest.approx(0.6) and (low, high) == (pytest.approx(0.4), pytest.approx(0.8))
  # a level only seed 0's proxy reaches: the resamples without seed 0 are left out
  per_seed = {"proxy": np.array([[0.0, 0.0], [0.4, 0.2]]), "gold": gold[:2]}
  point, low, high = bench.bootstrap(
      per_seed, lambda m: bench.first_crossing(m["proxy"], m["gold"], 0.3))
  # mean proxy 0 -> 0.3 reaches 0.3 at the end: gold 0.65; seed 0 twice: proxy 0 -> 0.4 reaches
  # it 3/4 of the way, gold 0.5 -> 0.9 -> 0.8; seed 1 twice never does.
  assert point == pytest.approx(0.65)
  assert (low, high) == (pytest.approx(0.65), pytest.approx(0.8))
  assert bench.format_interval((0.8123, 0.79, 0.83101)) == "0.8123 [0.7900, 0.8310]"
  assert bench.format_interval((None, None, None)) == "n/a"


def test_matched_table_values():
  bench = _benchmark()
  # a: proxy 0 -> 0.3 with gold flat; b: proxy 0.1 -> 0.2 with gold falling 1 -> 0.
  records = []
  for epoch, (pa, pb, gb) in enumerate([(0.0, 0.1, 1.0), (0.3, 0.2, 0.0)]):
    for seed, shift in ((0, -0.01), (1, 0.01)):  # two seeds, symmetric around the values
      records.append(dict(algorithm="a", seed=seed, epoch=epoch, proxy=pa + shift, gold=0.5))
      records.append(dict(algorithm="b", seed=seed, epoch=epoch, proxy=pb + shift, gold=gb,
                          ev_late=0.25 * (seed + 1)))
  curves = bench.mean_curves(records)
  np.testing.assert_allclose(curves["b"].mean("proxy"), [0.1, 0.2])
  np.testing.assert_allclose(curves["b"].values["proxy"], [[0.09, 0.11], [0.19, 0.21]])
  np.testing.assert_allclose(curves["b"].epochs, [0, 1])
  assert not curves["a"].has("ev_late") and curves["b"].has("ev_late")
  table = bench.matched_table(curves, proxy="proxy", golds=("gold",))
  # Levels: from the highest start (0.1) to the lowest maximum (0.2), in 3 steps.
  lines = table.strip().splitlines()
  assert _cells(lines[0]) == ["algorithm", "gold @ proxy 0.1333", "gold @ proxy 0.1667",
                              "gold @ proxy 0.2000", "epoch @ proxy 0.2000"]
  # b's gold at proxy 0.1333 (1/3 of its way) = 2/3; 0.1667 -> 1/3; 0.2 -> 0; epoch 1.0. Resampled
  # seeds shift b's proxy by up to 0.01, so the interval of gold spans +-0.1 around it.
  row_b = _cells(lines[3])
  assert [cell.split(" [")[0] for cell in row_b] == ["b", "0.6667", "0.3333", "0.0000", "1.0"]
  assert row_b[1] == "0.6667 [0.5667, 0.7667]"
  row_a = _cells(lines[2])
  assert row_a[1] == "0.5000 [0.5000, 0.5000]"  # gold is flat: every resample agrees
  assert row_a[4].startswith("0.7 [")  # proxy 0.2 at epoch 2/3
  second = lines.index("") + 1
  assert _cells(lines[second]) == ["algorithm", "proxy @ peak gold", "final proxy",
                                   "final gold", "late EV (last 10 epochs)"]
  row_b = _cells(lines[second + 3])
  assert row_b[1] == "0.1000 [0.0900, 0.1100]"  # b's gold peaks at its first epoch
  assert row_b[2] == "0.2000 [0.1900, 0.2100]" and row_b[3] == "0.0000 [0.0000, 0.0000]"
  assert row_b[4] == "0.3750 [0.2500, 0.5000]"  # seeds' late EV 0.25 and 0.5
  assert _cells(lines[second + 2])[4] == "n/a"  # a has no critic


def test_no_common_gain_is_said():
  bench = _benchmark()
  records = [dict(algorithm=a, seed=0, epoch=e, proxy=p, gold=0.0)
             for a, ps in (("a", (0.5, 0.4)), ("b", (0.1, 0.2))) for e, p in enumerate(ps)]
  table = bench.matched_table(bench.mean_curves(records), proxy="proxy", golds=("gold",))
  assert "No proxy level above 0.5000" in table
  assert "| b | 0.1000 [0.1000, 0.1000] |" in table  # the peaks table is still there
  # A third algorithm that rises above the start sets the levels; the others read n/a there.
  records += [dict(algorithm="c", seed=0, epoch=e, proxy=p, gold=g)
              for e, (p, g) in enumerate(((0.2, 1.0), (0.8, 0.0)))]
  table = bench.matched_table(bench.mean_curves(records), proxy="proxy", golds=("gold",))
  lines = table.splitlines()
  assert "gold @ proxy 0.6000" in lines[0] and "gold @ proxy 0.8000" in lines[0]
  assert _cells(lines[2])[1:4] == ["n/a", "n/a", "n/a"]  # a never rises above 0.5
  assert _cells(lines[4])[1] == "0.3333 [0.3333, 0.3333]"  # c: 0.6 is 2/3 of 0.2 -> 0.8


def test_bad_arguments_are_one_line_errors(tmp_path):
  bench = _benchmark()
  out = ["--out", str(tmp_path)]
  for argv, message in (
      (["--algorithms", "ddpo,ppo"], "unknown 'ppo'"),
      (["--config.sample.nope=1"], "unknown config key in --config.sample.nope"),
      (["--config.sample.num_steps=ten"], "--config.sample.num_steps=ten: invalid literal"),
      ([f"--config={SHAPES}:reward=pickscore"], "unknown reward preset 'pickscore'"),
      ([f"--config={SHAPES}:algorithm=ddpo"], "expected only reward=PRESET"),
      (["--preset=gold"], "Unknown command line flag 'preset'"),
      (["--epochs", "1"], "--epochs=1; expected >= 2"),
      (["--epochs", "ten"], "--epochs='ten'; expected an integer"),
      (["--seeds", "0,0"], "0 twice"),
      (["--seeds", ""], "--seeds is empty"),
      (["--config.eval.every=2"], "eval.every=2; expected 1"),
      (["--config.eval.rewards=('shapes_gold',)"], "lacks 'shapes_aesthetic'")):
    with pytest.raises(SystemExit, match=message) as error:
      bench.main(out + argv)
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
  assert not os.listdir(tmp_path)


def test_settings_mismatch_is_refused_before_any_run(tmp_path):
  bench = _benchmark()
  settings = {"preset": "aesthetic", "epochs": 5, "overrides": {"sample.num_steps": 4}}
  (tmp_path / "settings.json").write_text(json.dumps(settings))
  for argv, message in (([f"--config={SHAPES}:reward=gold"], "holds preset 'aesthetic'"),
                        (["--config.sample.num_steps=5"], "holds overrides"),
                        ([], "holds overrides --config.sample.num_steps=4"),
                        (["--epochs", "3", "--config.sample.num_steps=4"], "5-epoch runs")):
    with pytest.raises(SystemExit, match=message) as error:
      bench.main(["--out", str(tmp_path), "--epochs", "5"] + argv)
    assert "\n" not in str(error.value)
  assert os.listdir(tmp_path) == ["settings.json"]
  # rows of another preset without a settings.json
  rows = tmp_path / "other" / "rows"
  rows.mkdir(parents=True)
  bench.write_csv(str(rows / "ddpo_seed0.csv"), [dict(preset="gold", algorithm="ddpo", seed=0,
                                                      epoch=0)])
  with pytest.raises(SystemExit, match="holds preset 'gold' rows"):
    bench.main(["--out", str(tmp_path / "other")])


def test_settings_of_the_former_set_command_line_stay_compatible(tmp_path):
  """A settings.json written with `--set KEY=VALUE` (its "set" list) accepts the equivalent
  `--config.KEY=VALUE` flags (by value, in any order) and refuses others."""
  bench = _benchmark()
  committed = os.path.join(helpers.REPO, "docs", "overopt_aesthetic", "settings.json")
  with open(committed) as file:
    saved = json.load(file)
  # the committed aesthetic results (rewritten in the new format when a run resumed them) and
  # the same results as the `--set` command line wrote them: no overrides either way
  for written in (saved, {"preset": "aesthetic", "epochs": saved["epochs"], "set": []}):
    (tmp_path / "settings.json").write_text(json.dumps(written))
    args = bench.parse_args(["--out", str(tmp_path), "--epochs", str(saved["epochs"])])
    settings = {"preset": args.preset, "epochs": args.epochs,
                "overrides": bench.normalised_overrides(args.overrides)}
    assert bench.check_settings(str(tmp_path), settings) == {
        "preset": "aesthetic", "epochs": saved["epochs"], "overrides": {}}
  old = {"preset": "aesthetic", "epochs": 5,
         "set": ["sample.num_steps=4", "prompts=/data/my prompts.txt", "train.learning_rate=1e-2",
                 "eval.rewards=('shapes_gold', 'shapes_aesthetic')", "sample.num_steps=5"]}
  (tmp_path / "settings.json").write_text(json.dumps(old))
  flags = ["--config.eval.rewards=('shapes_gold', 'shapes_aesthetic')",
           "--config.train.learning_rate=0.01", "--config.sample.num_steps=5",
           "--config.prompts=/data/my prompts.txt"]
  args = bench.parse_args(["--out", str(tmp_path), "--epochs", "5"] + flags)
  settings = {"preset": "aesthetic", "epochs": 5,
              "overrides": bench.normalised_overrides(args.overrides)}
  assert bench.check_settings(str(tmp_path), settings)["overrides"] == {
      "eval.rewards": ["shapes_gold", "shapes_aesthetic"], "prompts": "/data/my prompts.txt",
      "sample.num_steps": 5, "train.learning_rate": 0.01}
  args = bench.parse_args(["--out", str(tmp_path), "--epochs", "5"] + flags[1:])
  with pytest.raises(SystemExit, match="holds overrides"):
    bench.check_settings(str(tmp_path), {"preset": "aesthetic", "epochs": 5, "overrides":
                                         bench.normalised_overrides(args.overrides)})


def test_reduced_benchmark_end_to_end(tmp_path, capsys):
  bench = _benchmark()
  out, results = tmp_path / "out", tmp_path / "results"
  args = ["--out", str(out), "--results", str(results), "--algorithms", "ddpo,tdpo_r",
          "--seeds", "0", "--epochs", "2"]
  for key, value in REDUCED.items():
    args.append(f"--config.{key}={value}")
  bench.main(args)
  printed = capsys.readouterr().out
  assert "run 1/2: ddpo seed 0 (from scratch)" in printed
  assert "run 2/2: tdpo_r seed 0 (from scratch)" in printed
  assert sorted(os.listdir(out)) == ["runs"]  # everything else goes to --results
  assert json.loads((results / "settings.json").read_text()) == {
      "preset": "aesthetic", "epochs": 2, "overrides": dict(sorted(REDUCED.items()))}
  assert sorted(os.listdir(results / "rows")) == ["ddpo_seed0.csv", "tdpo_r_seed0.csv"]
  with open(results / "overoptimization.csv") as file:
    reader = csv.DictReader(file)
    rows = list(reader)
  states = [f"ev_k{k:02d}" for k in range(REDUCED_STATES)]
  assert reader.fieldnames == [
      "preset", "algorithm", "seed", "epoch", "proxy", "gold", "gold_fidelity", "gold_quality",
      "eval_proxy", "eval_gold", "eval_gold_fidelity", "eval_gold_quality", "eval_prompt_proxy",
      "eval_aesthetic", "kl_to_pretrained", "diversity", "ev", "ev_late", *states,
      "dormant_l0", "dormant_l1", "dormant_l2", "dormant_l3", "num_reset", "approx_kl",
      "clipfrac", "epoch_s", "eval_s"]
  assert [(r["preset"], r["algorithm"], r["seed"], r["epoch"]) for r in rows] == [
      ("aesthetic", a, "0", str(e)) for a in ("ddpo", "tdpo_r") for e in range(-1, 2)]
  # Epoch -1: the pre-trained policy's fixed-key eval, the same for every algorithm (the curves'
  # common origin), and nothing else.
  origins = [r for r in rows if r["epoch"] == "-1"]
  assert origins[0]["eval_aesthetic"] == origins[1]["eval_aesthetic"] != ""
  assert origins[0]["eval_gold"] == origins[1]["eval_gold"] != ""
  assert all(r["proxy"] == r["ev"] == r["approx_kl"] == "" for r in origins)
  rows = [r for r in rows if r["epoch"] != "-1"]
  critic = ["ev", "ev_late", *states, "dormant_l0", "dormant_l1", "dormant_l2", "dormant_l3",
            "num_reset"]  # reset.period=1: a reset every epoch
  for row in rows:
    for column in ("proxy", "gold", "gold_fidelity", "gold_quality", "eval_proxy", "eval_gold",
                   "eval_gold_fidelity", "eval_gold_quality", "eval_prompt_proxy",
                   "eval_aesthetic", "diversity", "approx_kl", "clipfrac", "epoch_s", "eval_s"):
      assert np.isfinite(float(row[column])), (row["algorithm"], column)
    for column in ("gold", "eval_gold", "eval_gold_fidelity", "eval_gold_quality"):
      assert 0.0 <= float(row[column]) <= 1.0
    assert row["eval_proxy"] == row["eval_aesthetic"]  # preset aesthetic: the trained reward
    assert row["kl_to_pretrained"] == ""  # eval.kl_to_pretrained=False
    for column in critic:
      if row["algorithm"] == "ddpo":
        assert row[column] == "", column
      else:
        assert np.isfinite(float(row[column])), column
  # Epoch 0 samples the pre-trained model with the same seed and key: both algorithms agree.
  first = [(float(r["proxy"]), float(r["gold"])) for r in rows if r["epoch"] == "0"]
  np.testing.assert_allclose(first, [first[0]] * len(first), rtol=1e-6)
  with open(results / "rows" / "tdpo_r_seed0.csv") as file:
    assert [r for r in csv.DictReader(file) if r["epoch"] != "-1"] == rows[2:]
  sizes = {"reward_vs_epoch.png": (1100, 800), "gold_vs_proxy.png": (1100, 450),
           "critic.png": (1100, 800), "kl_diversity.png": (1100, 450)}
  for name, size in sizes.items():
    image = Image.open(results / name)
    assert image.size == size, name
    assert np.asarray(image.convert("L"), np.float32).std() > MIN_IMAGE_STD, name
  table = (results / "table.md").read_text()
  assert "RL maximises shapes_aesthetic" in table and "1 seed(s) x 2 epochs" in table
  for algorithm in ("ddpo", "tdpo_r"):
    assert f"| {algorithm} |" in table
  assert table in printed
  late_ev = [_cells(line)[-1] for line in table.splitlines() if line.startswith("| tdpo_r |")]
  assert late_ev[-1] != "n/a" and "[" in late_ev[-1]

  # A new machine: the committed results survive, the checkpoints do not. Both runs are skipped.
  shutil.rmtree(out)
  stamps = {name: os.path.getmtime(results / "rows" / name)
            for name in os.listdir(results / "rows")}
  bench.main(args)
  printed = capsys.readouterr().out
  assert "run 1/2: ddpo seed 0 (skipped: rows/ddpo_seed0.csv holds 2 epochs)" in printed
  assert "run 2/2: tdpo_r seed 0 (skipped" in printed
  assert not out.exists()
  assert stamps == {name: os.path.getmtime(results / "rows" / name) for name in stamps}
  assert (results / "table.md").read_text() == table  # regenerated from the same rows

  # Other overrides on the same results: refused before anything runs.
  with pytest.raises(SystemExit, match="holds overrides") as error:
    bench.main(args + ["--config.train.learning_rate=0.01"])
  assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
  assert not out.exists()
