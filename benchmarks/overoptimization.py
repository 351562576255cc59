"""Reward overoptimisation on the shapes world: gold reward at matched trained (proxy) reward.

  python benchmarks/overoptimization.py --out=DIR [--results=DIR]
      [--config=configs/shapes.py:reward=aesthetic|proxy|gold] [--config.KEY=VALUE ...]
      [--algorithms=ddpo,tdpo,tdpo_r,redo,ddpo_kl,grpo] [--seeds=0,1,2] [--epochs=100]

Each (algorithm, seed) fine-tunes the shipped shapes model with
`configs/shapes.py:algorithm=<algorithm>,reward=<preset>` (the preset, `reward=` of `--config`,
default aesthetic, names the reward RL maximises: shapes_aesthetic, shapes_proxy or shapes_gold;
"proxy" below always means that trained reward) for `--epochs` epochs in
`<out>/runs/<algorithm>_seed<seed>/` (checkpoints: an interrupted run resumes there). The
`--config.KEY=VALUE` overrides (as for `python -m tdpo_jax.main`) apply to every run.

From each run's metrics.jsonl it keeps one row per epoch (CSV columns, an absent metric is an
empty cell):
  preset, algorithm, seed, epoch;
  proxy, gold, gold_fidelity, gold_quality    the trained reward (`reward/mean`) and the gold terms
      (`eval/train_prompts/shapes_gold*/mean`) of the epoch's own samples, drawn BEFORE its update;
  eval_proxy, eval_gold, eval_gold_fidelity, eval_gold_quality, eval_prompt_proxy (shapes_proxy),
  eval_aesthetic (shapes_aesthetic)    the same rewards of the fixed-key eval samples
      (`eval/heldout/*/mean`), drawn AFTER the update with the same noise every epoch, so they move
      only with the policy;
  an extra first row, epoch -1, holds only the eval columns of the pre-trained policy
      (`eval/before_training.json`, `eval.before_training`): every algorithm's and seed's curve
      starts from this same point;
  kl_to_pretrained, diversity    of the fixed-key samples;
  ev, ev_late, ev_k00 ... ev_kNN    the critic's explained variance: all states, the late states,
      each denoising state k (k = 0 is x_T);
  dormant_l0 ... dormant_l3, num_reset    the critic's dormant fraction per layer, neurons reset;
  approx_kl, clipfrac, epoch_s, eval_s.

`--results` (default: `--out`) holds what is meant to be committed:
  settings.json           preset, epochs and the overrides ({"KEY": value}; a file written by
                          the former `--set KEY=VALUE` command line holds them as the list "set",
                          read the same way): a later call on the same directory with another
                          preset or other overrides is refused (mixed rows would not be
                          comparable); a larger --epochs extends the runs, a smaller is refused;
  rows/<algorithm>_seed<seed>.csv    one run's rows, written when the run has finished all its
                          epochs. A run whose rows file holds --epochs rows is skipped, even
                          without its runs/ directory (a new machine keeps the committed rows);
  overoptimization.csv    every rows file's rows;
  reward_vs_epoch.png     proxy, gold, gold fidelity, gold quality of the fixed-key samples against
                          epoch: mean over seeds with a seed-bootstrap 95% band;
  gold_vs_proxy.png       gold and gold fidelity against proxy along each mean trajectory;
  critic.png              critic algorithms: late and all-states EV against epoch, EV per state k
                          over the final epochs, layer-0 dormant fraction with resets marked;
  kl_diversity.png        KL to the pre-trained model and diversity against epoch;
  table.md                (printed too) of the fixed-key samples, per algorithm: gold and gold
                          fidelity at matched proxy levels (spread from the highest starting
                          proxy to the lowest maximum: higher gold at the same proxy = less
                          overoptimisation), the proxy where gold / gold fidelity peak, the final
                          values, the late EV over the last epochs; each with a seed-bootstrap 95%
                          interval.
The aggregates are regenerated from all rows files after every finished run, so an interrupted
benchmark leaves committable results. SIGTERM stops after the current epoch (checkpoint saved).
"""
import ast
import csv
import importlib.util
import json
import os
import re
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's package first, not an installed copy

ALGORITHMS = ("ddpo", "tdpo", "tdpo_r", "redo", "ddpo_kl", "grpo")
PRESETS = ("aesthetic", "proxy", "gold")
DEFAULT_PRESET = "aesthetic"
DEFAULT_SEEDS = "0,1,2"
DEFAULT_EPOCHS = 100
MIN_EPOCHS = 2  # a trajectory needs a start and an end
ORIGIN_EPOCH = -1  # the row of the evaluation before the first update (eval.before_training)
EPOCH_AXIS = f"epoch ({ORIGIN_EPOCH}: before the first update)"

GOLD_REWARDS = {"gold": "shapes_gold", "gold_fidelity": "shapes_gold_fidelity",
                "gold_quality": "shapes_gold_quality"}
PROMPT_PROXY_REWARD = "shapes_proxy"
AESTHETIC_REWARD = "shapes_aesthetic"
NUM_DORMANT_LAYERS = 4  # the critic head's layers l0..l3
EV_STATE_KEY = re.compile(r"^critic/explained_variance/k(\d+)$")
HEAD_COLUMNS = ("preset", "algorithm", "seed", "epoch")
TEXT_COLUMNS = ("preset", "algorithm")

NUM_LEVELS = 3  # matched-proxy levels in the table
NUM_BOOTSTRAP = 1000  # seed resamples per interval
BOOTSTRAP_SEED = 0  # the same resamples every call: regenerated tables do not jitter
INTERVAL_PERCENTILES = (2.5, 97.5)  # a 95% interval
LATE_EV_EPOCHS = 10  # the table's late EV: mean over this many final epochs
EV_PROFILE_EPOCHS = 5  # critic.png's EV per state: mean over this many final epochs
DECIMALS = 4  # the table's reward cells

DPI = 100
GRID_FIGURE_SIZE = (11, 8)  # inches: 2 x 2 panels
ROW_FIGURE_SIZE = (11, 4.5)  # inches: 1 x 2 panels
BAND_ALPHA = 0.2
MARKER_SIZE = 3
RESET_MARKER_SIZE = 7
GRID_ALPHA = 0.3
LABELS = {  # column -> plot / table label
    "proxy": "proxy", "eval_proxy": "proxy",
    "gold": "gold", "eval_gold": "gold",
    "gold_fidelity": "gold fidelity", "eval_gold_fidelity": "gold fidelity",
    "gold_quality": "gold quality", "eval_gold_quality": "gold quality",
}
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes.py")
SETTINGS_FILE = "settings.json"
ROWS_DIR = "rows"
RUNS_DIR = "runs"
AGGREGATE_CSV = "overoptimization.csv"
TABLE_FILE = "table.md"


def load_shapes_config(arg, path=DEFAULT_CONFIG):
  """`get_config(arg)` of the config file `path` (configs/shapes.py)."""
  spec = importlib.util.spec_from_file_location("config_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def run_config(algorithm, preset, seed, epochs, overrides, path=DEFAULT_CONFIG):
  """The config of one run: `path:algorithm=<algorithm>,reward=<preset>` with the benchmark's
  settings and `overrides` ({"a.b": value}, the `--config.a.b=value` flags)."""
  config = load_shapes_config(f"algorithm={algorithm},reward={preset}", path)
  config.seed = seed
  config.num_epochs = epochs
  config.eval.every = 1  # the curves need every epoch's eval
  config.log.progress = sys.stderr.isatty()  # tqdm bars on a terminal only
  config.lock()  # an override sets a declared entry; it adds none
  config.update_from_flattened_dict(overrides)
  return config


def check_config(preset, overrides, path=DEFAULT_CONFIG):
  """The config every run shares (its trained reward, eval settings); one-line SystemExit if the
  overrides drop what the curves need."""
  try:
    config = run_config(ALGORITHMS[0], preset, 0, MIN_EPOCHS, overrides, path)
  except (KeyError, AttributeError, TypeError, ValueError) as error:
    raise SystemExit(f"error: {' '.join(str(error).split())}") from None
  if config.eval.every != 1:
    raise SystemExit(f"error: --config.eval.every={config.eval.every}; expected 1 (the curves "
                     "need every epoch's eval)")
  if not config.eval.before_training:
    raise SystemExit("error: --config.eval.before_training=False; expected True (the curves' "
                     "common origin)")
  missing = [r for r in (config.reward, *GOLD_REWARDS.values()) if r not in config.eval.rewards]
  if missing:
    raise SystemExit(f"error: eval.rewards={tuple(config.eval.rewards)} lacks {missing[0]!r}; "
                     "expected the trained reward and the gold terms")
  return config


def metric_keys(trained_reward):
  """(columns before the per-state EV, columns after it): {CSV column: metrics.jsonl key}."""
  before = {"proxy": "reward/mean"}
  before.update({c: f"eval/train_prompts/{r}/mean" for c, r in GOLD_REWARDS.items()})
  before["eval_proxy"] = f"eval/heldout/{trained_reward}/mean"
  before.update({f"eval_{c}": f"eval/heldout/{r}/mean" for c, r in GOLD_REWARDS.items()})
  before["eval_prompt_proxy"] = f"eval/heldout/{PROMPT_PROXY_REWARD}/mean"
  before["eval_aesthetic"] = f"eval/heldout/{AESTHETIC_REWARD}/mean"
  before["kl_to_pretrained"] = "eval/heldout/kl_to_pretrained"
  before["diversity"] = "eval/heldout/diversity"
  before["ev"] = "critic/explained_variance"
  before["ev_late"] = "critic/explained_variance/late"
  after = {f"dormant_l{i}": f"reset/dormant_frac/l{i}" for i in range(NUM_DORMANT_LAYERS)}
  after.update({"num_reset": "reset/num_reset", "approx_kl": "policy/approx_kl",
                "clipfrac": "policy/clipfrac", "epoch_s": "time/epoch_s",
                "eval_s": "time/eval_s"})
  return before, after


def columns_of(records):
  """The CSV columns of `records`: fixed ones with as many ev_kNN as any record holds."""
  before, after = metric_keys("")
  states = sorted({c for r in records for c in r if c.startswith("ev_k")})
  return list(HEAD_COLUMNS) + list(before) + states + list(after)


def to_records(preset, algorithm, seed, rows, trained_reward, origin=None):
  """One CSV record per metrics.jsonl row (see the module docstring); absent metrics -> "".

  `origin`: the run's `eval/before_training.json` metrics (or None): a first record at epoch
  ORIGIN_EPOCH holding only its fixed-key eval columns.
  """
  before, after = metric_keys(trained_reward)
  records = []
  if origin is not None:
    record = {"preset": preset, "algorithm": algorithm, "seed": seed, "epoch": ORIGIN_EPOCH}
    record.update({column: origin.get(key, "") for column, key in before.items()
                   if key.startswith("eval/heldout/")})
    records.append(record)
  for row in rows:
    record = {"preset": preset, "algorithm": algorithm, "seed": seed, "epoch": int(row["epoch"])}
    record.update({column: row.get(key, "") for column, key in before.items()})
    for key in sorted(row):
      match = EV_STATE_KEY.match(key)
      if match:
        record[f"ev_k{int(match.group(1)):02d}"] = row[key]
    record.update({column: row.get(key, "") for column, key in after.items()})
    records.append(record)
  return records


def write_csv(path, records, columns=None):
  """Writes `records` to `path` atomically (a temp file renamed over it: a kill leaves the old
  file or the new one, never half of one)."""
  temp = f"{path}.tmp{os.getpid()}"
  with open(temp, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=columns or columns_of(records), restval="")
    writer.writeheader()
    writer.writerows(records)
  os.replace(temp, path)


def write_text(path, text):
  temp = f"{path}.tmp{os.getpid()}"
  with open(temp, "w") as file:
    file.write(text)
  os.replace(temp, path)


def read_rows(path):
  """The records of a rows file: seed / epoch ints, metrics floats, empty cells ""."""
  records = []
  with open(path, newline="") as file:
    for row in csv.DictReader(file):
      record = {}
      for key, value in row.items():
        if key in TEXT_COLUMNS:
          record[key] = value
        elif key in ("seed", "epoch"):
          record[key] = int(value)
        else:
          record[key] = float(value) if value not in ("", None) else ""
      records.append(record)
  return records


def count_rows(path):
  """Epochs in a rows file, the origin row not counted (0 if there is no file)."""
  if not os.path.exists(path):
    return 0
  with open(path, newline="") as file:
    return sum(1 for row in csv.DictReader(file) if int(row["epoch"]) >= 0)


def algorithm_order(algorithm):
  return ALGORITHMS.index(algorithm) if algorithm in ALGORITHMS else len(ALGORITHMS)


def read_all_rows(results):
  """Every rows file's records, in ALGORITHMS order, then seed, then epoch."""
  directory = os.path.join(results, ROWS_DIR)
  records = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if name.endswith(".csv"):
      records += read_rows(os.path.join(directory, name))
  return sorted(records, key=lambda r: (algorithm_order(r["algorithm"]), r["algorithm"],
                                        r["seed"], r["epoch"]))


class Curves:
  """One algorithm's per-seed curves over the epochs every one of its seeds reached.

  seeds: the sorted seeds (S); values: {column: [E, S] float array, NaN for empty cells}; the
  "epoch" column is always there.
  """

  def __init__(self, seeds, values):
    self.seeds = seeds
    self.values = values

  @property
  def epochs(self):
    return self.values["epoch"][:, 0]

  def mean(self, column):
    """[E]: the mean over seeds (NaN where a seed lacks the value)."""
    return self.values[column].mean(1)

  def has(self, column):
    return column in self.values and bool(np.isfinite(self.values[column]).any())


def _float(value):
  return np.nan if value in ("", None) else float(value)


def mean_curves(records, columns=None):
  """{algorithm: Curves} of `records` (dicts with algorithm, seed, epoch and the `columns`;
  default: every column but the text ones and seed), in the records' algorithm order.

  Only the epochs every seed of the algorithm reached are kept, so a mean is over the same seeds
  throughout.
  """
  if columns is None:
    columns = [c for c in dict.fromkeys(k for r in records for k in r)
               if c not in TEXT_COLUMNS and c != "seed"]
  columns = ["epoch"] + [c for c in columns if c != "epoch"]
  curves = {}
  for algorithm in dict.fromkeys(r["algorithm"] for r in records):
    by_key = {(r["epoch"], r["seed"]): r for r in records if r["algorithm"] == algorithm}
    seeds = sorted({seed for _, seed in by_key})
    epochs = sorted(e for e in {e for e, _ in by_key} if all((e, s) in by_key for s in seeds))
    values = {c: np.array([[_float(by_key[e, s].get(c, "")) for s in seeds] for e in epochs],
                          float).reshape(len(epochs), len(seeds))
              for c in columns}
    curves[algorithm] = Curves(seeds, values)
  return curves


def first_crossing(x, y, level):
  """y linearly interpolated where the sequence x first reaches `level` (None if never)."""
  for i in range(len(x)):
    if x[i] >= level:
      if i == 0:
        return float(y[0])
      t = (level - x[i - 1]) / (x[i] - x[i - 1])
      return float(y[i - 1] + t * (y[i] - y[i - 1]))
  return None


def peak_proxy(proxy, gold):
  """proxy where `gold` is highest along the trajectory (its first maximum; None if all NaN)."""
  gold = np.asarray(gold, float)
  if not np.isfinite(gold).any():
    return None
  return float(np.asarray(proxy, float)[np.nanargmax(gold)])


def late_mean(values, epochs=LATE_EV_EPOCHS):
  """Mean of the finite values among the last `epochs` entries of a curve (None if none)."""
  tail = np.asarray(values, float)[-epochs:]
  tail = tail[np.isfinite(tail)]
  return float(tail.mean()) if tail.size else None


def _finite(value):
  return None if value is None or not np.isfinite(value) else float(value)


def resample_indices(num_seeds):
  """[NUM_BOOTSTRAP, num_seeds] seed indices drawn with replacement (fixed numpy seed)."""
  rng = np.random.default_rng(BOOTSTRAP_SEED)
  return rng.integers(0, num_seeds, size=(NUM_BOOTSTRAP, num_seeds))


def bootstrap(per_seed, statistic):
  """A statistic of the mean-over-seeds curves with its seed-bootstrap 95% interval.

  Args:
    per_seed: {column: [E, S] array}, the same S seeds in every column.
    statistic: {column: [E] mean curve} -> float, or None where undefined (a level never
      reached).
  Returns:
    (point, low, high): point = the statistic of the mean curves; low / high = the 2.5 / 97.5
    percentiles of the statistic of the mean curves of NUM_BOOTSTRAP resamples of the seeds (with
    replacement), over the resamples where it is defined (NaN if none is). A single seed, or
    identical seeds, give low = high = point. (None, None, None) if the point is undefined.
  """
  point = _finite(statistic({c: v.mean(1) for c, v in per_seed.items()}))
  if point is None:
    return None, None, None
  num_seeds = next(iter(per_seed.values())).shape[1]
  samples = [_finite(statistic({c: v[:, index].mean(1) for c, v in per_seed.items()}))
             for index in resample_indices(num_seeds)]
  samples = [s for s in samples if s is not None]
  if not samples:
    return point, np.nan, np.nan
  low, high = np.percentile(samples, INTERVAL_PERCENTILES)
  return point, float(low), float(high)


def bootstrap_band(values):
  """([E] low, [E] high): per epoch, the 95% seed-bootstrap interval of the mean of `values`
  ([E, S]); NaN where a seed lacks the value."""
  means = values[:, resample_indices(values.shape[1])].mean(-1)  # [E, NUM_BOOTSTRAP]
  low, high = np.percentile(means, INTERVAL_PERCENTILES, axis=1)
  return low, high


def format_interval(estimate, decimals=DECIMALS):
  """A `bootstrap` estimate as table text: 0.8120 [0.7900, 0.8310], or n/a if undefined."""
  point, low, high = estimate
  if point is None:
    return "n/a"
  if not np.isfinite(low):
    return f"{point:.{decimals}f} [n/a]"
  return f"{point:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def matched_levels(curves, proxy):
  """NUM_LEVELS proxy levels from the highest starting mean proxy to the lowest maximum among the
  algorithms that rise above that start (the top level exactly that maximum, so each of them
  reaches it despite rounding; an algorithm that never rises above the start gets "n/a" cells);
  [] if none rises above it. Also returns that start."""
  start = max(c.mean(proxy)[0] for c in curves.values())
  maxima = [np.nanmax(c.mean(proxy)) for c in curves.values()]
  gains = [m for m in maxima if m > start]
  if not gains:
    return [], start
  reached = min(gains)
  levels = [start + (reached - start) * (i + 1) / NUM_LEVELS for i in range(NUM_LEVELS - 1)]
  return levels + [reached], start


def _row(cells):
  return "| " + " | ".join(cells) + " |"


def _table(header, rows):
  return [_row(header), "|" + "---|" * len(header)] + [_row(r) for r in rows]


def matched_table(curves, proxy="eval_proxy", golds=("eval_gold", "eval_gold_fidelity"),
                  ev="ev_late"):
  """Markdown: gold at matched proxy, then the peaks, final values and late EV.

  Per algorithm, each cell is the statistic of the mean-over-seeds trajectory with its
  seed-bootstrap 95% interval (see `bootstrap`):
    `<gold> @ proxy L`: the gold column interpolated where the mean proxy first reaches L;
    `epoch @ proxy L_top`: the epoch at which it does;
    `proxy @ peak <gold>`: the mean proxy at the epoch where the mean gold is highest;
    final proxy / golds; late EV: mean `ev` over the last LATE_EV_EPOCHS epochs (n/a without a
    critic).
  """
  def label(column):
    return LABELS.get(column, column)

  levels, start = matched_levels(curves, proxy)
  lines = []
  if levels:
    header = ["algorithm"] + [f"{label(g)} @ proxy {level:.{DECIMALS}f}"
                              for g in golds for level in levels]
    header.append(f"epoch @ proxy {levels[-1]:.{DECIMALS}f}")
    rows = []
    for algorithm, c in curves.items():
      per_seed = {k: c.values[k] for k in (proxy, "epoch", *golds)}
      cells = [algorithm]
      for g in golds:
        cells += [format_interval(bootstrap(
            per_seed, lambda m, g=g, level=level: first_crossing(m[proxy], m[g], level)))
                  for level in levels]
      cells.append(format_interval(bootstrap(
          per_seed, lambda m: first_crossing(m[proxy], m["epoch"], levels[-1])), decimals=1))
      rows.append(cells)
    lines += _table(header, rows)
  else:
    lines.append(f"No proxy level above {start:.{DECIMALS}f} (the highest initial proxy) was "
                 "reached by any algorithm: no matched comparison.")
  header = (["algorithm"] + [f"proxy @ peak {label(g)}" for g in golds] + ["final proxy"]
            + [f"final {label(g)}" for g in golds] + [f"late EV (last {LATE_EV_EPOCHS} epochs)"])
  rows = []
  for algorithm, c in curves.items():
    per_seed = {k: c.values[k] for k in (proxy, *golds)}
    cells = [algorithm]
    cells += [format_interval(bootstrap(per_seed, lambda m, g=g: peak_proxy(m[proxy], m[g])))
              for g in golds]
    cells += [format_interval(bootstrap(per_seed, lambda m, k=k: m[k][-1]))
              for k in (proxy, *golds)]
    cells.append(format_interval(bootstrap({ev: c.values[ev]}, lambda m: late_mean(m[ev])))
                 if c.has(ev) else "n/a")
    rows.append(cells)
  lines += [""] + _table(header, rows)
  return "\n".join(lines) + "\n"


def describe_runs(curves):
  """The runs behind the curves: 3 seed(s) x 100 epochs per algorithm, or each algorithm's."""
  shapes = {a: (len(c.seeds), int(np.sum(c.epochs >= 0))) for a, c in curves.items()}
  if len(set(shapes.values())) == 1:
    seeds, epochs = next(iter(shapes.values()))
    return f"{seeds} seed(s) x {epochs} epochs per algorithm"
  return "seeds x epochs: " + ", ".join(f"{a} {s} x {e}" for a, (s, e) in shapes.items())


def table_text(curves, preset, config):
  """table.md: a header line saying what the numbers are of, then `matched_table`."""
  prompts = (f"the first {config.eval.num_prompts}" if config.eval.num_prompts
             else "all")  # eval.num_prompts=0: the whole prompt set
  return (
      f"Shapes world, preset {preset}: RL maximises {config.reward} (\"proxy\" below). Fixed-key "
      f"eval samples of the policy after each epoch's update, and at epoch {ORIGIN_EPOCH} of the "
      f"pre-trained policy where the runs evaluated it ({prompts} {config.eval.prompts} "
      f"prompts x {config.eval.samples_per_prompt} samples, the same noise every epoch); "
      f"{describe_runs(curves)}. Each cell: the statistic of the mean-over-seeds trajectory "
      f"[seed-bootstrap 95% interval, {NUM_BOOTSTRAP} resamples; a level's interval is over the "
      "resamples that reach it].\n\n"
      f"Gold at matched proxy: {NUM_LEVELS} levels from the highest starting proxy to the "
      "lowest maximum over the algorithms that rise above it (n/a: never reached); higher gold "
      "at the same proxy = less overoptimisation.\n\n" + matched_table(curves))


def _pyplot():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _color(algorithm):
  """The same colour for an algorithm in every figure."""
  return f"C{algorithm_order(algorithm)}"


def _decorate(axis, title, xlabel, ylabel, integer_x=True):
  axis.set_title(title, fontsize=10)
  axis.set_xlabel(xlabel)
  axis.set_ylabel(ylabel)
  if integer_x:
    axis.xaxis.get_major_locator().set_params(integer=True)
  axis.grid(alpha=GRID_ALPHA)
  if axis.get_legend_handles_labels()[0]:
    axis.legend(fontsize=8)
  else:
    axis.text(0.5, 0.5, "not logged", ha="center", va="center", transform=axis.transAxes)


def _plot_band(axis, algorithm, c, column):
  """Mean over seeds against epoch with its seed-bootstrap 95% band; nothing if not logged."""
  if not c.has(column):
    return None
  line, = axis.plot(c.epochs, c.mean(column), marker="o", markersize=MARKER_SIZE,
                    color=_color(algorithm), label=algorithm)
  low, high = bootstrap_band(c.values[column])
  axis.fill_between(c.epochs, low, high, color=line.get_color(), alpha=BAND_ALPHA, linewidth=0)
  return line


def _save(plt, figure, path):
  figure.tight_layout()
  temp = f"{path}.tmp{os.getpid()}"
  figure.savefig(temp, dpi=DPI, format="png")
  os.replace(temp, path)
  plt.close(figure)


def plot(results, curves, preset, trained_reward):
  """Writes the PNGs of the module docstring to `results`; returns their names."""
  plt = _pyplot()
  band = "mean over seeds, seed-bootstrap 95% band"
  names = []

  figure, axes = plt.subplots(2, 2, figsize=GRID_FIGURE_SIZE)
  panels = (("eval_proxy", f"proxy: trained reward ({trained_reward})"),
            ("eval_gold", "gold reward"), ("eval_gold_fidelity", "gold fidelity (prompt)"),
            ("eval_gold_quality", "gold quality (image)"))
  for axis, (column, name) in zip(axes.flat, panels):
    for algorithm, c in curves.items():
      _plot_band(axis, algorithm, c, column)
    _decorate(axis, name, EPOCH_AXIS, LABELS[column])
  figure.suptitle(f"Shapes world, preset {preset}: fixed-key eval samples after each epoch "
                  f"({band})")
  _save(plt, figure, os.path.join(results, "reward_vs_epoch.png"))
  names.append("reward_vs_epoch.png")

  figure, axes = plt.subplots(1, 2, figsize=ROW_FIGURE_SIZE)
  for axis, column in zip(axes, ("eval_gold", "eval_gold_fidelity")):
    for algorithm, c in curves.items():
      if c.has(column) and c.has("eval_proxy"):
        proxy, gold = c.mean("eval_proxy"), c.mean(column)
        axis.plot(proxy, gold, marker="o", markersize=MARKER_SIZE, color=_color(algorithm),
                  label=algorithm)
        axis.annotate("start", (proxy[0], gold[0]), fontsize=7)
    _decorate(axis, f"{LABELS[column]} against proxy", f"proxy ({trained_reward})",
              LABELS[column], integer_x=False)
  figure.suptitle(f"Shapes world, preset {preset}: fixed-key eval samples, mean over seeds, "
                  "one point per epoch")
  _save(plt, figure, os.path.join(results, "gold_vs_proxy.png"))
  names.append("gold_vs_proxy.png")

  critics = {a: c for a, c in curves.items() if c.has("ev")}
  if critics:
    figure, axes = plt.subplots(2, 2, figsize=GRID_FIGURE_SIZE)
    for axis, column, name in ((axes[0, 0], "ev_late", "late states"),
                               (axes[0, 1], "ev", "all states")):
      for algorithm, c in critics.items():
        _plot_band(axis, algorithm, c, column)
      _decorate(axis, f"critic explained variance: {name}", "epoch", "explained variance")
    for algorithm, c in critics.items():
      states = sorted(k for k in c.values if k.startswith("ev_k") and c.has(k))
      if states:
        profile = [np.nanmean(c.values[k][-EV_PROFILE_EPOCHS:]) for k in states]
        axes[1, 0].plot([int(k[len("ev_k"):]) for k in states], profile, marker="o",
                        markersize=MARKER_SIZE, color=_color(algorithm), label=algorithm)
    _decorate(axes[1, 0], f"explained variance per state (last {EV_PROFILE_EPOCHS} epochs)",
              "denoising state k (0 = x_T)", "explained variance")
    for algorithm, c in critics.items():
      line = _plot_band(axes[1, 1], algorithm, c, "dormant_l0")
      if line is not None and c.has("num_reset"):
        # an epoch with a reset in any seed (the reset period is the same for every seed)
        reset = np.isfinite(c.values["num_reset"]).any(1)
        axes[1, 1].plot(c.epochs[reset], c.mean("dormant_l0")[reset], "x",
                        markersize=RESET_MARKER_SIZE, color=line.get_color())
    axes[1, 1].plot([], [], "x", color="k", label="reset epoch")
    _decorate(axes[1, 1], "critic dormant fraction, layer 0", "epoch", "dormant fraction")
    figure.suptitle(f"Shapes world, preset {preset}: the critic ({band})")
    _save(plt, figure, os.path.join(results, "critic.png"))
    names.append("critic.png")

  figure, axes = plt.subplots(1, 2, figsize=ROW_FIGURE_SIZE)
  for axis, column, name, ylabel in (
      (axes[0], "kl_to_pretrained", "KL of the sampling path to the pre-trained model", "KL"),
      (axes[1], "diversity", "diversity (mean pairwise CLIP cosine distance)", "diversity")):
    for algorithm, c in curves.items():
      _plot_band(axis, algorithm, c, column)
    _decorate(axis, name, EPOCH_AXIS, ylabel)
  figure.suptitle(f"Shapes world, preset {preset}: fixed-key eval samples ({band})")
  _save(plt, figure, os.path.join(results, "kl_diversity.png"))
  names.append("kl_diversity.png")
  return names


def write_aggregates(results, preset, config):
  """overoptimization.csv, the PNGs and table.md from every rows file; returns the table."""
  records = read_all_rows(results)
  write_csv(os.path.join(results, AGGREGATE_CSV), records)
  curves = mean_curves(records)
  names = plot(results, curves, preset, config.reward)
  table = table_text(curves, preset, config)
  write_text(os.path.join(results, TABLE_FILE), table)
  print(f"wrote {results}/{AGGREGATE_CSV}, {', '.join(names)}, {TABLE_FILE}", flush=True)
  return table


def normalised_overrides(overrides):
  """{"a.b": value} as JSON types (tuples -> lists), the keys sorted: the form settings.json
  holds and compares."""
  return json.loads(json.dumps(dict(sorted(overrides.items()))))


def overrides_of_set_list(items):
  """The overrides of a settings.json written by the former command line: its "set" list of
  "a.b=VALUE" items (VALUE a Python literal, else a string; a later item of a key wins)."""
  overrides = {}
  for item in items:
    key, _, text = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[key] = text
  return normalised_overrides(overrides)


def saved_overrides(saved):
  """The overrides a settings.json holds: "overrides" ({key: value}) or a former "set" list."""
  if "overrides" in saved:
    return normalised_overrides(saved["overrides"])
  return overrides_of_set_list(saved.get("set", []))


def flag_list(overrides):
  """{"a.b": value} as the `--config.a.b=value` flags that give it (for messages)."""
  return " ".join(f"--config.{key}={value!r}" for key, value in overrides.items()) or "none"


def check_settings(results, settings):
  """One-line SystemExit if `results` holds rows of another preset / other overrides or of more
  epochs; returns the settings to write (nothing is written here).

  `settings`: {"preset", "epochs", "overrides": normalised_overrides(...)}. Overrides compare by
  value, so `--config.train.learning_rate=0.01` matches a former `--set train.learning_rate=1e-2`.
  """
  path = os.path.join(results, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as file:
      saved = json.load(file)
    if saved["preset"] != settings["preset"]:
      raise SystemExit(f"error: --config=...:reward={settings['preset']}: {path} holds preset "
                       f"{saved['preset']!r}; expected --config=configs/shapes.py:reward="
                       f"{saved['preset']} or another --results")
    if saved_overrides(saved) != settings["overrides"]:
      raise SystemExit(f"error: overrides {flag_list(settings['overrides'])}: {path} holds "
                       f"overrides {flag_list(saved_overrides(saved))}; expected the same "
                       "overrides or another --results")
    if settings["epochs"] < saved["epochs"]:
      raise SystemExit(f"error: --epochs={settings['epochs']}: {path} holds "
                       f"{saved['epochs']}-epoch runs; expected >= {saved['epochs']} or another "
                       "--results")
  else:  # rows without settings.json (deleted by hand): their preset column still tells
    for record in read_all_rows(results)[:1]:
      if record["preset"] != settings["preset"]:
        raise SystemExit(f"error: --config=...:reward={settings['preset']}: {results}/{ROWS_DIR} "
                         f"holds preset {record['preset']!r} rows; expected --config=configs/"
                         f"shapes.py:reward={record['preset']} or another --results")
  return settings


def read_origin(workdir):
  """The run's evaluation before its first update (eval/before_training.json), or None."""
  from tdpo_jax import evaluation  # noqa: PLC0415
  return evaluation.read_before_training(workdir)


def resume_epoch(workdir):
  """The epoch a run in `workdir` would start at (0 without a checkpoint)."""
  from tdpo_jax import checkpoint  # noqa: PLC0415
  epoch, _ = checkpoint.latest(workdir)
  return epoch or 0


def run_one(config, workdir):
  """Trains (or resumes) one run to `config.num_epochs` epochs; returns its metrics rows."""
  from tdpo_jax import metrics_writer  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  epochs = config.num_epochs
  from tdpo_jax import paths  # noqa: PLC0415
  rows = metrics_writer.read_metrics(workdir) if paths.is_dir(workdir) else []
  if len(rows) < epochs:
    if train.run(config, workdir).preempted:  # SIGTERM: stop here, not start the next run
      raise SystemExit(f"stopped on SIGTERM during {workdir} (checkpoint saved); rerun the same "
                       "command to resume")
    rows = metrics_writer.read_metrics(workdir)
  if len(rows) < epochs:
    raise RuntimeError(f"{workdir}: {len(rows)} epochs logged after training; expected {epochs}")
  return rows[:epochs]


def parse_list(text, kind, name, allowed=None):
  try:
    values = [kind(v) for v in text.split(",") if v]
  except ValueError:
    raise SystemExit(f"error: --{name}={text!r}; expected a comma-separated list") from None
  if not values:
    raise SystemExit(f"error: --{name} is empty; expected a comma-separated list")
  bad = [v for v in values if allowed is not None and v not in allowed]
  if bad:
    raise SystemExit(f"error: --{name}: unknown {bad[0]!r}; expected some of {list(allowed)}")
  duplicates = [v for i, v in enumerate(values) if v in values[:i]]
  if duplicates:
    raise SystemExit(f"error: --{name}: {duplicates[0]!r} twice; expected each once")
  return values


def define_flags(flag_values, argv):
  from absl import flags  # noqa: PLC0415
  from tdpo_jax import cli  # noqa: PLC0415
  cli.define_config(flag_values, argv, DEFAULT_CONFIG,
                    "configs/shapes.py[:reward=aesthetic|proxy|gold]: the shapes config whose "
                    "reward preset every run trains on; --config.KEY=VALUE overrides an entry of "
                    "every run's config")
  flags.DEFINE_string("out", None, "runs/ (checkpoints) go here; local or gs://...",
                      flag_values=flag_values)
  flags.DEFINE_string("results", None,
                      "rows/, the CSV, plots, table.md, settings.json (default: --out)",
                      flag_values=flag_values)
  flags.DEFINE_string("algorithms", ",".join(ALGORITHMS), "comma-separated algorithm presets",
                      flag_values=flag_values)
  flags.DEFINE_string("seeds", DEFAULT_SEEDS, "comma-separated seeds", flag_values=flag_values)
  flags.DEFINE_string("epochs", str(DEFAULT_EPOCHS), f"epochs per run (>= {MIN_EPOCHS})",
                      flag_values=flag_values)


class Args:
  """The parsed command line: out, results, config_path, preset, overrides, algorithms, seeds,
  epochs."""


def parse_args(argv):
  from tdpo_jax import cli  # noqa: PLC0415
  from tdpo_jax.configs import sd15  # noqa: PLC0415
  values = cli.parse_flags_only(argv, define_flags, "benchmarks/overoptimization.py")
  if not values["out"].value:
    raise SystemExit("error: --out is required (runs/ go there)")
  args = Args()
  arg, args.config_path = cli.config_argument(values)
  try:
    presets = sd15.parse_arg(arg, reward=DEFAULT_PRESET, algorithm="")
  except ValueError as error:
    raise SystemExit(f"error: --config={args.config_path}:{arg}: {error}") from None
  if presets.algorithm:
    raise SystemExit(f"error: --config=...:algorithm={presets.algorithm}; expected only "
                     "reward=PRESET there (the runs' algorithms are --algorithms)")
  args.preset = presets.reward
  if args.preset not in PRESETS:
    raise SystemExit(f"error: --config=...:reward={args.preset}; expected one of {list(PRESETS)}")
  args.overrides = cli.override_values(values)
  args.algorithms = parse_list(values["algorithms"].value, str, "algorithms", ALGORITHMS)
  args.seeds = parse_list(values["seeds"].value, int, "seeds")
  if min(args.seeds) < 0:
    raise SystemExit(f"error: --seeds: {min(args.seeds)}; expected non-negative integers")
  try:
    args.epochs = int(values["epochs"].value)
  except ValueError:
    raise SystemExit(f"error: --epochs={values['epochs'].value!r}; expected an integer") from None
  if args.epochs < MIN_EPOCHS:
    raise SystemExit(f"error: --epochs={args.epochs}; expected >= {MIN_EPOCHS}")
  args.out = values["out"].value
  args.results = values["results"].value or args.out
  if "://" in args.results:  # the runs may be on gs:// (epath), the committed results are local
    raise SystemExit(f"error: --results={args.results!r}; expected a local folder (--out may be "
                     "non-local: pass --results=DIR)")
  return args


def main(argv=None):
  """`argv`: the arguments without the program name (None: sys.argv[1:])."""
  args = parse_args(argv)
  # Bad overrides fail before anything is written.
  config = check_config(args.preset, args.overrides, args.config_path)
  settings = check_settings(args.results, {"preset": args.preset, "epochs": args.epochs,
                                           "overrides": normalised_overrides(args.overrides)})
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR")
                    or os.path.expanduser("~/.cache/tdpo_jax/jax_cache"))
  os.makedirs(os.path.join(args.results, ROWS_DIR), exist_ok=True)
  write_text(os.path.join(args.results, SETTINGS_FILE), json.dumps(settings, indent=2) + "\n")
  runs = [(a, s) for a in args.algorithms for s in args.seeds]
  table = None
  for number, (algorithm, seed) in enumerate(runs, 1):
    name = f"{algorithm}_seed{seed}"
    rows_path = os.path.join(args.results, ROWS_DIR, f"{name}.csv")
    done = count_rows(rows_path)
    prefix = f"run {number}/{len(runs)}: {algorithm} seed {seed}"
    if done >= args.epochs:
      print(f"{prefix} (skipped: {ROWS_DIR}/{name}.csv holds {done} epochs)", flush=True)
      continue
    workdir = os.path.join(args.out, RUNS_DIR, name)
    start = resume_epoch(workdir)
    print(f"{prefix} ({f'resuming at epoch {start}' if start else 'from scratch'})", flush=True)
    tic = time.time()
    rows = run_one(run_config(algorithm, args.preset, seed, args.epochs, args.overrides,
                              args.config_path), workdir)
    records = to_records(args.preset, algorithm, seed, rows, config.reward,
                         origin=read_origin(workdir))
    write_csv(rows_path, records)
    first, last = records[0], records[-1]
    print(f"{algorithm} seed {seed}: fixed-key proxy ({config.reward}) "
          f"{first['eval_proxy']:.4f} -> {last['eval_proxy']:.4f}, gold "
          f"{first['eval_gold']:.4f} -> {last['eval_gold']:.4f}, gold fidelity "
          f"{first['eval_gold_fidelity']:.4f} -> {last['eval_gold_fidelity']:.4f} "
          f"({time.time() - tic:.0f} s)", flush=True)
    table = write_aggregates(args.results, args.preset, config)
  if table is None:  # every run was skipped: the aggregates still reflect every rows file
    table = write_aggregates(args.results, args.preset, config)
  print(table)


if __name__ == "__main__":
  main()
