"""Reward overoptimisation on the shapes world: gold reward at matched proxy reward.

  python benchmarks/overoptimization.py --out /tmp/overopt [--epochs 12] [--seeds 0,1,2]
      [--algorithms ddpo,tdpo,tdpo_r,redo] [--set sample.num_steps=10 ...]

Each (algorithm, seed) fine-tunes the shipped shapes model against the learned proxy reward with
`configs/shapes.py:algorithm=<name>` (redo = TDPO-R's loop resetting the critic's dormant neurons)
for `--epochs` epochs, in `<out>/runs/<algorithm>_seed<seed>` (a rerun resumes or skips finished
runs). Per epoch it reads, from the run's metrics.jsonl, the proxy reward of the epoch's samples
(`reward/mean`: what RL maximises) and the gold reward of the SAME samples
(`eval/train_prompts/shapes_gold/mean`), and the proxy, gold and KL to the pre-trained model of
the fixed-key eval samples (`eval/heldout/*`: configs/shapes.py draws them for the training
prompts with the same noise every epoch, so they move only with the policy).

Writes to `--out`:
  overoptimization.csv    one row per (algorithm, seed, epoch);
  reward_vs_epoch.png     proxy and gold against epoch, mean +- std over seeds, of the epoch's
                          samples and (second row) of the fixed-key eval samples;
  gold_vs_proxy.png       gold against proxy along each algorithm's mean trajectory;
  table.md                gold at matched proxy (printed too): the proxy levels are spread
                          over the gain every algorithm reached, and for each algorithm the
                          gold of its mean trajectory is interpolated where its mean proxy first
                          crosses the level. Higher gold at the same proxy = less
                          overoptimisation.
gold_vs_proxy.png and table.md use the fixed-key eval samples when every run logged them (else
the epoch's samples): the table's levels start above the highest epoch-0 proxy, which on the
epoch's own samples is as much sampling luck as policy.
"""
import argparse
import csv
import importlib.util
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # this checkout's package first, not an installed copy

ALGORITHMS = ("ddpo", "tdpo", "tdpo_r", "redo")
PROXY_KEY = "reward/mean"
GOLD_KEY = "eval/train_prompts/shapes_gold/mean"
EXTRA_KEYS = {  # CSV column -> metrics key (absent -> empty cell)
    "eval_gold": "eval/heldout/shapes_gold/mean",
    "eval_proxy": "eval/heldout/shapes_proxy/mean",
    "kl_to_pretrained": "eval/heldout/kl_to_pretrained",
    "diversity": "eval/heldout/diversity",
}
NUM_LEVELS = 3  # matched-proxy levels in the table
COLUMNS = ("algorithm", "seed", "epoch", "proxy", "gold") + tuple(EXTRA_KEYS)


def load_shapes_config(arg):
  path = os.path.join(REPO, "configs", "shapes.py")
  spec = importlib.util.spec_from_file_location("config_shapes", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def apply_overrides(config, items):
  """`key.path=value` items (Python literals, else strings) onto `config`; ValueError if bad."""
  from tdpo_jax import config_overrides  # noqa: PLC0415
  for item in items:
    config_overrides.apply(config, item)


def run_one(algorithm, seed, epochs, overrides, workdir):
  """Trains (or resumes) one run; returns its metrics rows."""
  from tdpo_jax import metrics_writer  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  config = load_shapes_config(f"algorithm={algorithm}")
  config.seed = seed
  config.num_epochs = epochs
  config.eval.every = 1
  config.log.progress = sys.stderr.isatty()  # tqdm bars on a terminal only
  apply_overrides(config, overrides)
  rows = metrics_writer.read_metrics(workdir) if os.path.isdir(workdir) else []
  if len(rows) < epochs:
    if train.run(config, workdir).preempted:  # SIGTERM: stop here, not start the next run
      raise SystemExit(f"stopped on SIGTERM during {workdir} (checkpoint saved); rerun the same "
                       "command to resume")
    rows = metrics_writer.read_metrics(workdir)
  return rows


def to_records(algorithm, seed, rows):
  records = []
  for row in rows:
    if PROXY_KEY not in row or GOLD_KEY not in row:
      raise KeyError(f"{algorithm} seed {seed} epoch {row.get('epoch')}: metrics lack "
                     f"{PROXY_KEY!r} or {GOLD_KEY!r} (eval.every must be 1 and eval.rewards "
                     "must hold shapes_gold)")
    record = {"algorithm": algorithm, "seed": seed, "epoch": int(row["epoch"]),
              "proxy": row[PROXY_KEY], "gold": row[GOLD_KEY]}
    record.update({column: row.get(key, "") for column, key in EXTRA_KEYS.items()})
    records.append(record)
  return records


def mean_curves(records, proxy_column="proxy", gold_column="gold"):
  """{algorithm: (epochs, proxy mean, proxy std, gold mean, gold std)} over seeds.

  The columns: the epoch's samples by default; "eval_proxy" / "eval_gold" for the fixed-key
  samples.
  """
  curves = {}
  for algorithm in dict.fromkeys(r["algorithm"] for r in records):
    rows = [r for r in records if r["algorithm"] == algorithm]
    epochs = sorted({r["epoch"] for r in rows})
    # only epochs every seed reached, so a mean is over the same seeds throughout
    seeds = {r["seed"] for r in rows}
    epochs = [e for e in epochs if sum(r["epoch"] == e for r in rows) == len(seeds)]
    proxy = np.array([[r[proxy_column] for r in rows if r["epoch"] == e] for e in epochs], float)
    gold = np.array([[r[gold_column] for r in rows if r["epoch"] == e] for e in epochs], float)
    curves[algorithm] = (np.array(epochs), proxy.mean(1), proxy.std(1), gold.mean(1),
                         gold.std(1))
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


def matched_table(curves):
  """Markdown table of the gold reward at matched proxy reward (see the module docstring)."""
  start = max(c[1][0] for c in curves.values())
  reached = min(c[1].max() for c in curves.values())
  lines = []
  if reached > start:
    # the top level is exactly the lowest maximum, so every curve reaches it despite rounding
    levels = [start + (reached - start) * (i + 1) / NUM_LEVELS for i in range(NUM_LEVELS - 1)]
    levels.append(reached)
    header = ["algorithm"] + [f"gold @ proxy {level:.4f}" for level in levels] + [
        "epoch @ top level", "final proxy", "final gold"]
  else:
    levels = []
    header = ["algorithm", "final proxy", "final gold"]
    lines.append(f"No proxy level above {start:.4f} (the highest initial proxy) was reached by "
                 "every algorithm: no matched comparison.\n")
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for algorithm, (epochs, proxy, _, gold, _) in curves.items():
    cells = [algorithm]
    cells += [f"{first_crossing(proxy, gold, level):.4f}" for level in levels]
    if levels:
      cells.append(f"{first_crossing(proxy, epochs, levels[-1]):.1f}")
    cells += [f"{proxy[-1]:.4f}", f"{gold[-1]:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path, records):
  with open(path, "w", newline="") as file:
    writer = csv.DictWriter(file, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(records)


def plot(out, curves, eval_curves=None):
  """reward_vs_epoch.png (a second row for the fixed-key samples if `eval_curves`) and
  gold_vs_proxy.png (of `eval_curves` if given, else of `curves`)."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  rows = [(curves, "the epoch's own samples")]
  if eval_curves:
    rows.append((eval_curves, "fixed-key samples of the eval prompts"))
  figure, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
  for row, (row_curves, title) in zip(axes, rows):
    for algorithm, (epochs, proxy, proxy_std, gold, gold_std) in row_curves.items():
      for axis, mean, std in ((row[0], proxy, proxy_std), (row[1], gold, gold_std)):
        line, = axis.plot(epochs, mean, marker="o", markersize=3, label=algorithm)
        axis.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    for axis, name in zip(row, ("proxy reward (trained on)", "gold reward (true)")):
      axis.set_title(f"{name}: {title}", fontsize=10)
      axis.set_xlabel("epoch")
      axis.set_ylabel(name.split(" (")[0])
      axis.xaxis.get_major_locator().set_params(integer=True)
      axis.grid(alpha=0.3)
      axis.legend()
  figure.suptitle("Shapes world: mean ± std over seeds")
  figure.tight_layout()
  figure.savefig(os.path.join(out, "reward_vs_epoch.png"), dpi=100)
  plt.close(figure)

  figure, axis = plt.subplots(figsize=(6, 4.5))
  for algorithm, (_, proxy, _, gold, _) in (eval_curves or curves).items():
    axis.plot(proxy, gold, marker="o", markersize=3, label=algorithm)
    axis.annotate("start", (proxy[0], gold[0]), fontsize=7)
  axis.set_xlabel("proxy reward")
  axis.set_ylabel("gold reward")
  axis.set_title("Gold against proxy (mean over seeds, one point per epoch)\n"
                 + ("fixed-key eval samples" if eval_curves else "the epoch's own samples"),
                 fontsize=10)
  axis.grid(alpha=0.3)
  axis.legend()
  figure.tight_layout()
  figure.savefig(os.path.join(out, "gold_vs_proxy.png"), dpi=100)
  plt.close(figure)


def parse_list(text, kind, name, allowed=None):
  try:
    values = [kind(v) for v in text.split(",") if v]
  except ValueError:
    raise SystemExit(f"error: --{name}={text!r}; expected a comma-separated list") from None
  if not values:
    raise SystemExit(f"error: --{name} is empty")
  bad = [v for v in values if allowed is not None and v not in allowed]
  if bad:
    raise SystemExit(f"error: --{name}: unknown {bad[0]!r}; expected some of {list(allowed)}")
  return values


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory (runs/ inside)")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--epochs", type=int, default=12)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a configs/shapes.py entry for every run")
  args = parser.parse_args(argv)
  algorithms = parse_list(args.algorithms, str, "algorithms", ALGORITHMS)
  seeds = parse_list(args.seeds, int, "seeds")
  if args.epochs < 2:
    raise SystemExit(f"error: --epochs={args.epochs}; expected >= 2")
  try:
    apply_overrides(load_shapes_config(None), args.set)  # bad --set fails before any run
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  import jax  # noqa: PLC0415
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR")
                    or os.path.expanduser("~/.cache/tdpo_jax/jax_cache"))
  os.makedirs(args.out, exist_ok=True)
  records = []
  for algorithm in algorithms:
    for seed in seeds:
      tic = time.time()
      workdir = os.path.join(args.out, "runs", f"{algorithm}_seed{seed}")
      rows = run_one(algorithm, seed, args.epochs, args.set, workdir)
      records += to_records(algorithm, seed, rows[:args.epochs])
      print(f"{algorithm} seed {seed}: proxy {rows[0][PROXY_KEY]:.4f} -> "
            f"{rows[args.epochs - 1][PROXY_KEY]:.4f}, gold {rows[0][GOLD_KEY]:.4f} -> "
            f"{rows[args.epochs - 1][GOLD_KEY]:.4f} ({time.time() - tic:.0f} s)", flush=True)
  write_csv(os.path.join(args.out, "overoptimization.csv"), records)
  curves = mean_curves(records)
  has_eval = all(r["eval_proxy"] != "" and r["eval_gold"] != "" for r in records)
  eval_curves = mean_curves(records, "eval_proxy", "eval_gold") if has_eval else None
  plot(args.out, curves, eval_curves)
  table = (f"Samples: {'fixed-key eval samples' if has_eval else 'the epoch samples'}; "
           f"{len(seeds)} seed(s), {args.epochs} epochs.\n\n"
           + matched_table(eval_curves or curves))
  with open(os.path.join(args.out, "table.md"), "w") as file:
    file.write(table)
  print(table)
  print(f"wrote {args.out}/overoptimization.csv, reward_vs_epoch.png, gold_vs_proxy.png, table.md")


if __name__ == "__main__":
  main()
