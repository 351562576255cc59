"""PNG plots of a run's `<workdir>/metrics.jsonl`: `python -m tdpo_jax.plot <workdir> [--out=DIR]`.

Writes (each only when its metrics were logged):
  reward.png            training reward, mean ± std per epoch;
  eval_<reward>.png     each cross-reward: training prompts and held-out prompts, mean ± std;
  diversity.png         held-out diversity (mean pairwise CLIP cosine distance);
  kl.png                KL to the initial policy when `train.kl_mode` logs it
                        (`policy/kl_penalty`, `policy/kl_to_ref`), and PPO's `policy/approx_kl`
                        (to the epoch's sampling policy; always logged);
  dormant.png           dormant fraction of each critic layer (`reset/dormant_frac/l*`).
The default output directory is `<workdir>/plots`. The workdir and the output directory may be
non-local (`gs://...`, through `paths`: each PNG is rendered to a local temporary file and
uploaded).
"""
import os
import re
import sys

from tdpo_jax import metrics_writer
from tdpo_jax import paths as paths_lib

FIGURE_SIZE = (6.0, 4.0)  # inches
DPI = 100
STD_ALPHA = 0.25  # opacity of the ± std band
EVAL_KEY = re.compile(r"^eval/(train_prompts|heldout)/(.+)/mean$")
SPLIT_LABELS = {"train_prompts": "training prompts", "heldout": "held-out prompts"}
# The logged KL estimates: to the pre-trained policy when a KL term is on (train.kl_mode), and
# PPO's approximate KL between the sampling policy and the updated one (always logged).
KL_LABELS = {
    "eval/heldout/kl_to_pretrained": "to the initial policy (held-out path KL)",
    "policy/kl_penalty": "to the initial policy (return penalty)",
    "policy/kl_to_ref": "to the initial policy (gaussian)",
    "policy/approx_kl": "PPO approx. KL to the epoch's sampling policy",
}


def series(rows, key):
  """(epochs, values) of the rows that logged `key` (eval metrics exist only on eval epochs)."""
  points = [(row["epoch"], row[key]) for row in rows if key in row]
  return [p[0] for p in points], [p[1] for p in points]


def _plot_mean_std(axes, rows, prefix, label):
  """Plots `<prefix>/mean` with a ± `<prefix>/std` band (when logged) on `axes`."""
  epochs, mean = series(rows, f"{prefix}/mean")
  line, = axes.plot(epochs, mean, marker="o", markersize=3, label=label)
  std_epochs, std = series(rows, f"{prefix}/std")
  if std_epochs == epochs and std:
    axes.fill_between(epochs, [m - s for m, s in zip(mean, std)],
                      [m + s for m, s in zip(mean, std)], color=line.get_color(),
                      alpha=STD_ALPHA, linewidth=0)


def _new_figure(plt, title, ylabel):
  figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
  axes.set_title(title)
  axes.set_xlabel("epoch")
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # epochs are whole numbers
  axes.set_ylabel(ylabel)
  axes.grid(True, alpha=0.3)
  return figure, axes


def _save(plt, figure, axes, path, legend=True):
  if legend:
    axes.legend()
  figure.tight_layout()
  with paths_lib.local_target(path) as target:
    figure.savefig(target)
  plt.close(figure)
  return path


def plot_metrics(rows, out_dir):
  """Writes the PNGs for the per-epoch metric dicts `rows`; returns the written paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (plotting only; headless backend)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths_lib.makedirs(out_dir)
  keys = set().union(*rows)
  paths = []
  if "reward/mean" in keys:
    figure, axes = _new_figure(plt, "training reward", "reward")
    _plot_mean_std(axes, rows, "reward", "mean ± std")
    paths.append(_save(plt, figure, axes, os.path.join(out_dir, "reward.png")))

  eval_rewards = sorted({m.group(2) for m in map(EVAL_KEY.match, keys) if m})
  for name in eval_rewards:
    figure, axes = _new_figure(plt, f"cross-reward evaluation: {name}", name)
    for split, label in SPLIT_LABELS.items():
      if f"eval/{split}/{name}/mean" in keys:
        _plot_mean_std(axes, rows, f"eval/{split}/{name}", label)
    safe = re.sub(r"[^\w.-]", "_", name)
    paths.append(_save(plt, figure, axes, os.path.join(out_dir, f"eval_{safe}.png")))

  if "eval/heldout/diversity" in keys:
    figure, axes = _new_figure(plt, "held-out diversity", "mean pairwise cosine distance")
    epochs, values = series(rows, "eval/heldout/diversity")
    axes.plot(epochs, values, marker="o", markersize=3)
    paths.append(_save(plt, figure, axes, os.path.join(out_dir, "diversity.png"), legend=False))

  kl_keys = [k for k in KL_LABELS if k in keys]
  if kl_keys:
    figure, axes = _new_figure(plt, "policy KL", "KL")
    for key in kl_keys:
      axes.plot(*series(rows, key), marker="o", markersize=3, label=KL_LABELS[key])
    paths.append(_save(plt, figure, axes, os.path.join(out_dir, "kl.png")))

  dormant = sorted((k for k in keys if k.startswith("reset/dormant_frac/l")),
                   key=lambda k: int(re.sub(r"\D", "", k.rsplit("/", 1)[1]) or 0))
  if dormant:
    figure, axes = _new_figure(plt, "critic dormant fraction per layer", "dormant fraction")
    for key in dormant:
      axes.plot(*series(rows, key), marker="o", markersize=3,
                label=f"layer {key.rsplit('/', 1)[1][1:]}")
    paths.append(_save(plt, figure, axes, os.path.join(out_dir, "dormant.png")))
  return paths


def plot_workdir(workdir, out_dir=None):
  """Plots `<workdir>/metrics.jsonl` into `out_dir` (default `<workdir>/plots`); returns paths.

  Raises:
    ValueError: the workdir has no (or an empty) metrics.jsonl.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not paths_lib.as_path(path).is_file():
    raise ValueError(f"no metrics.jsonl in {workdir!r}; expected the --workdir of a "
                     "tdpo_jax.main run")
  rows = metrics_writer.read_metrics(workdir)
  if not rows:
    raise ValueError(f"{path!r} is empty; expected one JSON line per epoch")
  return plot_metrics(rows, out_dir or os.path.join(workdir, "plots"))


def define_flags(flag_values, argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("out", None, "Output directory (default <workdir>/plots).",
                      flag_values=flag_values)


def main(argv=None):
  """`argv`: WORKDIR and the flags, without the program name (None: sys.argv[1:])."""
  from tdpo_jax import cli  # pylint: disable=g-import-not-at-top
  values, positional = cli.parse(argv, define_flags, "python -m tdpo_jax.plot")
  if len(positional) != 1:
    raise SystemExit(f"error: got arguments {positional}; expected one WORKDIR (a tdpo_jax.main "
                     "--workdir)")
  try:
    paths = plot_workdir(positional[0], values["out"].value)
  except ValueError as error:
    raise SystemExit(f"error: {error}") from None
  for path in paths:
    print(path)
  return paths


if __name__ == "__main__":
  main(sys.argv[1:])
