"""What the three notebooks share: where results live, seed statistics over runs, one colour per expert count.

results/<sweep>/{summary.json, curves.json} are written by `experiments/sweep.py` (schema: moe_jax/sweep.py).
Two environment variables move the folders, so tests can read fixtures and write figures out of the tree:
  MOE_JAX_RESULTS_DIR  sweep results   (default <repo>/results)
  MOE_JAX_FIGURES_DIR  PNGs written    (default <repo>/results/figures)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import matplotlib

matplotlib.use("Agg")  # headless: notebooks run under nbclient in tests and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import fileio  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DENSE_COLOR = "black"

# Fedus et al. (2021), Table 7: C4 negative log perplexity (nats per SentencePiece token) of the pre-trained
# models at equal FLOPs per token: dense T5-Base and Switch-Base with E experts.
PAPER_DENSE = -1.636
PAPER_SWITCH = {16: -1.505, 32: -1.474, 64: -1.444, 128: -1.432, 256: -1.427}


def paper_gap() -> dict[int, float]:
  """E -> Switch-Base minus T5-Base negative log perplexity of Table 7 (positive: Switch better), 0.131 ... 0.209."""
  return {e: round(nlp - PAPER_DENSE, 3) for e, nlp in PAPER_SWITCH.items()}


def results_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MOE_JAX_RESULTS_DIR", ROOT / "results"))


def figures_dir() -> pathlib.Path:
  path = pathlib.Path(os.environ.get("MOE_JAX_FIGURES_DIR", ROOT / "results" / "figures"))
  path.mkdir(parents=True, exist_ok=True)
  return path


def sweep_command(sweep: str) -> str:
  """The command that trains and aggregates a sweep, e.g. 'scaling-cpu' or 'ablations-cpu'."""
  name, _, size = sweep.rpartition("-")
  arg = f"configs/sweeps/{name}.py:{size}"
  return f"python experiments/sweep.py --sweep={arg}"


@dataclasses.dataclass
class Sweep:
  """One sweep's summary rows and curves, with runs gathered into groups (the seeds of one setting)."""

  name: str
  rows: list[dict]
  curves: dict
  diverged: list[dict] = dataclasses.field(default_factory=list)  # runs stopped by a non-finite loss

  def groups(self) -> dict[str, list[dict]]:
    """{group: rows}, dense first, then by expert count; ties keep the sweep config's order."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(self.rows, key=lambda r: r["num_experts"]):  # stable: config order within a count
      groups.setdefault(row["group"], []).append(row)
    return groups

  def group_experts(self) -> dict[str, int]:
    return {group: rows[0]["num_experts"] for group, rows in self.groups().items()}


def load_sweep(sweep: str, *, required: bool = True) -> Sweep | None:
  """Read results/<sweep>/; a missing sweep raises (required) or returns None, naming the command to run."""
  folder = results_dir() / sweep
  summary_path, curves_path = folder / "summary.json", folder / "curves.json"
  if not summary_path.exists() or not curves_path.exists():
    if not required:
      return None
    raise FileNotFoundError(
        f"{summary_path} not found. Train and aggregate the sweep from the repository root:\n"
        f"  {sweep_command(sweep)}\n"
        f"or, if its runs already finished in workdirs/{sweep}/, rebuild the summaries with\n"
        f"  {sweep_command(sweep)} --aggregate_only")
  with open(summary_path) as f:
    summary = json.load(f)
  with open(curves_path) as f:
    curves = json.load(f)
  if not summary["runs"]:
    if not required:
      return None
    raise ValueError(f"{summary_path} lists no finished runs yet: run `{sweep_command(sweep)}`")
  return Sweep(name=summary["sweep"], rows=summary["runs"], curves=curves, diverged=summary.get("diverged", []))


def spread(values) -> tuple[float, float, float]:
  """(mean, min, max) over seeds; NaN for a missing value (a run that never reached a target)."""
  values = np.asarray([np.nan if v is None else v for v in values], dtype=float)
  if np.all(np.isnan(values)):
    return math.nan, math.nan, math.nan
  return float(np.nanmean(values)), float(np.nanmin(values)), float(np.nanmax(values))


def seed_curves(steps_and_values: list[tuple[list, list]]) -> tuple[np.ndarray, ...]:
  """(steps, mean, min, max) over seeds, on the steps every seed logged."""
  common = sorted(set.intersection(*(set(steps) for steps, _ in steps_and_values)))
  stacked = np.array([[dict(zip(steps, values))[s] for s in common] for steps, values in steps_and_values],
                     dtype=float)
  return np.array(common), stacked.mean(0), stacked.min(0), stacked.max(0)


def eval_curve(sweep: Sweep, rows: list[dict]):
  """Seed statistics of the eval cross-entropy of `rows`: (steps, mean, min, max)."""
  return seed_curves([tuple(zip(*sweep.curves[row["run"]]["eval"])) for row in rows])


def routing_curve(sweep: Sweep, rows: list[dict], block: int, metric: str):
  """Seed statistics of one routing metric of one MoE block over training: (steps, mean, min, max)."""
  def values(curve):
    return next(entry[metric] for entry in curve["routing"] if entry["block"] == block)

  return seed_curves([(sweep.curves[row["run"]]["train_steps"], values(sweep.curves[row["run"]])) for row in rows])


def routing_end(sweep: Sweep, row: dict, metric: str, tail: int = 5) -> list[float]:
  """End-of-training value of a routing metric of one run, one per MoE block: the mean of its last `tail` logged
  training records (one record is noisy)."""
  return [float(np.mean(entry[metric][-tail:])) for entry in sweep.curves[row["run"]]["routing"]]


def fmt(value, spec: str) -> str:
  """format(value, spec), or '-' for a missing value (None or NaN)."""
  return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def tokens_per_s(rows: list[dict]) -> str:
  """Mean of the runs' median training throughput (runs logged without it are left out)."""
  rates = [row["tokens_per_s"] for row in rows if row.get("tokens_per_s")]
  return fmt(float(np.mean(rates)) if rates else None, ".0f")


def moe_blocks(sweep: Sweep) -> list[int]:
  """Indices of the MoE blocks that logged routing metrics in any run of the sweep."""
  return sorted({entry["block"] for curve in sweep.curves.values() for entry in curve["routing"]})


def expert_color(num_experts: int):
  """One colour per expert count on a log2 scale (2 ... 256), shared by every notebook; black for dense."""
  if num_experts == 0:
    return DENSE_COLOR
  return plt.cm.viridis(min(math.log2(num_experts) - 1, 7) / 7 * 0.9)  # stop before the pale yellow end


def group_label(group: str, num_experts: int) -> str:
  return "dense" if num_experts == 0 else f"Switch E={num_experts}"


def log2_experts_axis(ax, experts) -> None:
  """x axis in log2 of the expert count, ticked at the counts present."""
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted(experts))
  ax.set_xticklabels([str(e) for e in sorted(experts)])
  ax.minorticks_off()
  ax.set_xlabel("experts E per MoE layer (log2 scale)")


def band(ax, steps, mean, lo, hi, *, color, label, **kwargs) -> None:
  """Mean line with the seeds' min-max range shaded."""
  ax.plot(steps, mean, color=color, label=label, **kwargs)
  if np.any(hi > lo):
    ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)


def save(fig, name: str) -> pathlib.Path:
  """Write the figure as <figures>/<name>.png and say where."""
  path = figures_dir() / f"{name}.png"
  with fileio.atomic_write(path, "wb") as f:  # a committed figure is replaced whole or kept
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  print(f"saved {path}")
  return path


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def eval_curves_figure(sweep: Sweep, *, color_of, label_of, x_of=None, xlabel: str = "training step",
                       title: str = ""):
  """Eval loss per group (seed mean, min-max band): the whole run (left) and its second half zoomed (right).

  color_of(group) and label_of(group, rows) style each group; x_of(row, steps) maps steps to another x (FLOPs).
  Dense groups are dashed.
  """
  fig, (full, zoom) = plt.subplots(1, 2, figsize=(12, 4.3))
  tails = []
  for group, rows in sweep.groups().items():
    steps, mean, lo, hi = eval_curve(sweep, rows)
    x = steps if x_of is None else x_of(rows[0], steps)
    style = dict(color=color_of(group), label=label_of(group, rows),
                 linestyle="--" if rows[0]["num_experts"] == 0 else "-")
    for ax in (full, zoom):
      band(ax, x, mean, lo, hi, marker="." if ax is zoom else None, **style)
    second_half = steps >= steps.max() / 2
    tails.append((x[second_half], lo[second_half], hi[second_half]))
  x_lo, x_hi = min(t[0].min() for t in tails), max(t[0].max() for t in tails)
  y_lo, y_hi = min(t[1].min() for t in tails), max(t[2].max() for t in tails)
  margin = 0.05 * (y_hi - y_lo) or 0.01
  zoom.set_xlim(x_lo - 0.02 * (x_hi - x_lo), x_hi + 0.02 * (x_hi - x_lo))
  zoom.set_ylim(y_lo - margin, y_hi + margin)
  full.set_title("whole run")
  zoom.set_title("second half, zoomed")
  for ax in (full, zoom):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("eval cross-entropy (nats/byte)")
    ax.grid(alpha=0.3)
  zoom.legend(fontsize=8, loc="upper right")
  fig.suptitle(title + "\nline: mean over seeds; band: min-max over seeds")
  fig.tight_layout()
  return fig


def seeds(count: int) -> str:
  return f"{count} seed{'s' * (count != 1)}"
