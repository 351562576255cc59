"""Side by side: the official PyTorch TDPO-R code, then ours, on the tiny shapes, in one invocation.

  bash benchmarks/official/make_venv.sh /tmp/tdpo_official_venv     # once: the official pins
  python benchmarks/side_by_side.py --official_src=/path/to/tdpo \\
      --official_python=/tmp/tdpo_official_venv/bin/python [--epochs=3] [--repeats=3] [--ddpo]

`--official_src` is a checkout of github.com/ZiyiZhang27/tdpo (the harness was written against
e9c58cf); nothing of it is in this repo. `benchmarks/official/run_official.py` runs its training
script unchanged but for model loading (the hub ids -> the tiny random pipeline built by
`benchmarks/official/build_tiny.py`; the CLIP-L critic tower -> the tiny one; the JPEG reward;
the list of patches is printed). Then `benchmarks/epoch.py --json` times our epoch on
configs/tiny.py, the same shapes and schedule (8 samples in 2 batches of 4, 10 DDIM steps, CFG 5,
micro-batch 2 x 4 accumulated, LoRA rank 4, fp32, the JPEG reward). Both processes get the same
thread budget (`--threads`, default all cores).

Prints the official per-epoch rows, then one table: phase, official seconds, ours, ratio (ours /
official), medians over the epochs after the first (official) and the timed epochs after the
warm-up (ours; compilation excluded, reported apart). Machines of one kind differ by up to 2x,
and one machine's speed can drift within minutes: only a ratio measured in one invocation, on an
idle machine, is comparable; `--repeats=N` runs N official-then-ours pairs and prints the median
of their ratios.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

from absl import flags

# Its own FlagValues: importing this script (the tests do) defines no global absl flag, so it
# cannot clash with another script loaded in the same process.
FLAGS = flags.FlagValues()
_SRC = flags.DEFINE_string("official_src", None, "Checkout of github.com/ZiyiZhang27/tdpo.",
                           flag_values=FLAGS)
_PYTHON = flags.DEFINE_string(
    "official_python", None,
    "Python of a venv with the official code's pins (benchmarks/official/make_venv.sh).",
    flag_values=FLAGS)
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Epochs per side (official: the first is warm-up).",
                               flag_values=FLAGS)
_DDPO = flags.DEFINE_bool("ddpo", False, "Also time DDPO (official: TDPO with the critic off).",
                          flag_values=FLAGS)
_THREADS = flags.DEFINE_integer("threads", os.cpu_count(), "Threads each side may use.",
                                flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", os.path.join(tempfile.gettempdir(), "tdpo_side_by_side"),
                               "Where the tiny PyTorch pipeline, logs and result JSONs go.",
                               flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Official-then-ours pairs; the ratio is the median of the pairs' ratios (a "
    "machine whose speed drifts during the run then moves both sides of a pair alike).",
    flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Optional: write both sides' results here as JSON.",
                           flag_values=FLAGS)
flags.mark_flags_as_required(["official_src", "official_python"], flag_values=FLAGS)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OFFICIAL_MODES = {"tdpo_r": "tdpo", "ddpo": "ddpo"}

# (label, official key of run_official.py's epoch rows, our key of benchmarks/epoch.py's seconds)
PHASES = [
    ("sampling (text + denoise + final decode)", "sampling_excl_critic", "sample"),
    ("critic: decode + embed + value, 80 states", "critic", "critic"),
    ("reward (JPEG)", "reward_fn_in_threads", "reward"),
    ("training (+ reset)", "training", "train_and_reset"),
    ("epoch", "total", "epoch"),
]


def _fail(message):
  sys.exit(f"error: {message}")


def _check_inputs():
  """One-line errors up front, before minutes of compute."""
  script = os.path.join(_SRC.value, "scripts", "train_tdpo.py")
  if not os.path.isfile(script):
    _fail(f"--official_src={_SRC.value!r}: no scripts/train_tdpo.py there; expected a checkout "
          "of github.com/ZiyiZhang27/tdpo")
  if not (os.path.isfile(_PYTHON.value) and os.access(_PYTHON.value, os.X_OK)):
    _fail(f"--official_python={_PYTHON.value!r} is not an executable; expected the python of a "
          "venv made by benchmarks/official/make_venv.sh")
  if _REPEATS.value < 1:
    _fail(f"--repeats={_REPEATS.value}: expected >= 1")
  if _EPOCHS.value < 2:
    _fail(f"--epochs={_EPOCHS.value}: expected >= 2 (the first epoch is warm-up)")
  if not 1 <= _THREADS.value <= os.cpu_count():
    _fail(f"--threads={_THREADS.value}: expected 1 .. {os.cpu_count()} (this machine's cores)")


def _run(command, env, log_path):
  print("+ " + " ".join(command), flush=True)
  with open(log_path, "w") as log:
    done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
  if done.returncode != 0:
    with open(log_path) as log:
      last = (log.read().strip().splitlines() or [""])[-1]
    _fail(f"{os.path.basename(command[1])} exited {done.returncode} (log: {log_path}): {last}")


def run_official(algorithm, workdir):
  """Official per-phase seconds (median over epochs >= 1) and its per-epoch rows."""
  env = dict(os.environ, OMP_NUM_THREADS=str(_THREADS.value), MKL_NUM_THREADS=str(_THREADS.value),
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
             PYTHONWARNINGS="ignore")
  tiny = os.path.join(workdir, "tiny_sd")
  if not os.path.isfile(os.path.join(tiny, "model_index.json")):
    _run([_PYTHON.value, os.path.join(HERE, "official", "build_tiny.py"), tiny,
          os.path.join(workdir, "tiny_config.json")], env, os.path.join(workdir, "build_tiny.log"))
  mode = OFFICIAL_MODES[algorithm]
  out = os.path.join(workdir, f"official_{mode}.json")
  _run([_PYTHON.value, os.path.join(HERE, "official", "run_official.py"), "--src", _SRC.value,
        "--tiny", tiny, "--logdir", os.path.join(workdir, "logs"), "--out", out, "--mode", mode,
        "--epochs", str(_EPOCHS.value)], env, os.path.join(workdir, f"official_{mode}.log"))
  with open(out) as file:
    result = json.load(file)
  timed = [row for row in result["epochs"] if row["epoch"] >= 1]
  seconds = {key: statistics.median(row[key] for row in timed) for _, key, _ in PHASES}
  return {"seconds": seconds, "epochs": result["epochs"], "patches": result["patches"],
          "peak_rss_mib": result["peak_rss_mib"]}


def run_ours(algorithms, workdir):
  """Our `benchmarks/epoch.py --json` result on configs/tiny.py."""
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  # XLA:CPU sizes its thread pool from the visible cores: pin the process to --threads of them.
  command = [sys.executable, os.path.join(HERE, "epoch.py"),
             f"--config={os.path.join(REPO, 'tdpo_jax', 'configs', 'tiny.py')}",
             f"--algorithm={algorithms[0] if len(algorithms) == 1 else 'both'}",
             f"--epochs={_EPOCHS.value}", "--json"]
  if _THREADS.value < os.cpu_count():
    command = ["taskset", "-c", f"0-{_THREADS.value - 1}"] + command
  log = os.path.join(workdir, "ours.log")
  _run(command, env, log)
  with open(log) as file:
    text = file.read()
  return json.loads(text[text.index("{\n"):])


def format_tables(official, ours, epochs):
  """The printed report: official per-epoch rows, then per algorithm the phase table and ratio."""
  lines = []
  for algorithm, result in official.items():
    lines.append(f"official {algorithm}, per epoch (s): " + "; ".join(
        f"epoch {row['epoch']}: total {row['total']:.2f}, sampling "
        f"{row['sampling_excl_critic']:.2f}, critic {row['critic']:.2f}, training "
        f"{row['training']:.2f}" for row in result["epochs"]))
  lines.append(f"ours: {ours['device']}; {ours['peak_note']}")
  by_algorithm = {r["algorithm"]: r for r in ours["results"]}
  for algorithm, result in official.items():
    mine = by_algorithm[algorithm]
    lines += ["", f"== {algorithm} (official median of epochs 1..{epochs - 1}; ours: "
              f"median of {epochs} timed epochs after warm-up)",
              f"{'phase':44s} {'official s':>10s} {'ours s':>8s} {'ours/official':>13s}"]
    for label, official_key, our_key in PHASES:
      theirs = result["seconds"][official_key]
      value = mine["seconds"].get(our_key, 0.0)
      ratio = f"{value / theirs:13.2f}" if theirs > 1e-3 else f"{'':13s}"
      lines.append(f"{label:44s} {theirs:10.3f} {value:8.3f} {ratio}")
    compile_s = mine["compile_s"]
    lines.append("ours, compile (AOT, not in the epoch): " + ", ".join(
        f"{k} {v:.1f} s" for k, v in compile_s.items())
                 + f"; total {sum(compile_s.values()):.1f} s")
    lines.append(f"peak RSS: official {result['peak_rss_mib']:.0f} MiB, ours "
                 f"{ours['peak_rss_mib']:.0f} MiB (whole benchmark process)")
    lines.append(f"RATIO {algorithm} epoch, ours / official: "
                 f"{mine['seconds']['epoch'] / result['seconds']['total']:.2f}")
  return "\n".join(lines)


def epoch_ratios(pairs):
  """{algorithm: [ours / official epoch seconds, one per (official, ours) pair]}."""
  ratios = {}
  for official, ours in pairs:
    by_algorithm = {r["algorithm"]: r for r in ours["results"]}
    for algorithm, result in official.items():
      ratios.setdefault(algorithm, []).append(
          by_algorithm[algorithm]["seconds"]["epoch"] / result["seconds"]["total"])
  return ratios


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags are --name=value")
  _check_inputs()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  algorithms = ["tdpo_r", "ddpo"] if _DDPO.value else ["tdpo_r"]
  pairs = []
  for repeat in range(_REPEATS.value):
    if _REPEATS.value > 1:
      print(f"\n### pair {repeat + 1} of {_REPEATS.value}", flush=True)
    official = {}
    for algorithm in algorithms:
      official[algorithm] = run_official(algorithm, _WORKDIR.value)
    if not repeat:
      print("official patches (model loading only):\n  " + "\n  ".join(
          official["tdpo_r"]["patches"]), flush=True)
    ours = run_ours(algorithms, _WORKDIR.value)
    print(format_tables(official, ours, _EPOCHS.value), flush=True)
    pairs.append((official, ours))
  if _REPEATS.value > 1:
    for algorithm, ratios in epoch_ratios(pairs).items():
      print(f"\nRATIO {algorithm} epoch over {len(ratios)} pairs: "
            + ", ".join(f"{r:.2f}" for r in ratios) + f"; median {statistics.median(ratios):.2f}")
  if _OUT.value:
    with open(_OUT.value, "w") as file:
      json.dump([{"official": official, "ours": ours} for official, ours in pairs], file,
                indent=1)


if __name__ == "__main__":
  try:
    arguments = FLAGS(sys.argv)
  except flags.Error as error:
    _fail(" ".join(str(error).split()))
  main(arguments)
