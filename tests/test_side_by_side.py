"""benchmarks/side_by_side.py: the report's arithmetic and its up-front input errors (the runs
themselves need the official code's checkout and venv, which CI does not have)."""
import subprocess
import sys

from tests import helpers


_SCRIPT = []


def _script():
  """The script as a module, loaded once (its absl flags can be defined once per process)."""
  if not _SCRIPT:
    _SCRIPT.append(helpers.load_script("benchmarks/side_by_side.py", "side_by_side"))
  return _SCRIPT[0]


def test_table_divides_ours_by_the_official_median():
  bench = _script()
  official_seconds = {"sampling_excl_critic": 2.0, "critic": 1.0, "reward_fn_in_threads": 0.0005,
                      "training": 4.0, "total": 8.0}
  official = {"tdpo_r": {"seconds": official_seconds, "peak_rss_mib": 500.0, "epochs": [
      {"epoch": 0, "total": 9.0, "sampling_excl_critic": 2.5, "critic": 1.5, "training": 5.0}]}}
  ours = {"device": "cpu x1 (cpu)", "peak_note": "measured", "peak_rss_mib": 1000.0, "results": [
      {"algorithm": "tdpo_r", "compile_s": {"rollout": 1.0, "train_epoch": 2.5},
       "seconds": {"sample": 0.5, "critic": 1.5, "reward": 0.001, "train_and_reset": 1.0,
                   "epoch": 3.0}}]}
  lines = bench.format_tables(official, ours, epochs=3).splitlines()
  row = {line[:44].strip(): line[44:].split() for line in lines if len(line) > 44}
  assert row["sampling (text + denoise + final decode)"] == ["2.000", "0.500", "0.25"]
  assert row["critic: decode + embed + value, 80 states"] == ["1.000", "1.500", "1.50"]
  assert row["reward (JPEG)"] == ["0.001", "0.001"]  # official under 1 ms: no ratio
  assert row["training (+ reset)"] == ["4.000", "1.000", "0.25"]
  assert lines[-1] == "RATIO tdpo_r epoch, ours / official: 0.38"  # 3.0 / 8.0
  assert "rollout 1.0 s, train_epoch 2.5 s; total 3.5 s" in "\n".join(lines)


def test_missing_checkout_is_a_one_line_error(tmp_path):
  result = subprocess.run(
      [sys.executable, "benchmarks/side_by_side.py", f"--official_src={tmp_path}",
       f"--official_python={sys.executable}"],
      capture_output=True, text=True, cwd=helpers.REPO, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f"error: --official_src={str(tmp_path)!r}: no scripts/train_tdpo.py there; expected a "
      "checkout of github.com/ZiyiZhang27/tdpo")


def test_ratios_pair_each_official_run_with_the_ours_that_follows_it():
  bench = _script()
  official = lambda total: {"tdpo_r": {"seconds": {"total": total}}}
  ours = lambda epoch: {"results": [{"algorithm": "tdpo_r", "seconds": {"epoch": epoch}}]}
  # A machine that slows down 2x between the pairs: each pair's ratio is still 0.5.
  assert bench.epoch_ratios([(official(4.0), ours(2.0)), (official(8.0), ours(4.0))]) == {
      "tdpo_r": [0.5, 0.5]}
