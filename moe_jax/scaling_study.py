"""The expert-scaling study's statistics, computed from its committed run directories (results/SCALING.md, issue 35).

Axis legend: S seeds (pairs) · D evaluation files (documents) · R bootstrap resamples · NB MoE blocks.

Switch Transformer (Fedus et al. 2021, arXiv:2101.03961, Table 7 and Fig. 4) claims that at equal FLOPs per token
more experts lower the loss. results/SCALING.md pre-registers the test of it here and fixes its statistics
("Statistics (fixed here)"); this module computes exactly those, nothing chosen after seeing a result:

  * primary: Delta_s = CE(Switch E = 32, s) - CE(Switch E = 8, s) on the seeds 20-27 that have both runs, its mean
    and 95% t-interval (`stats.paired_difference`), and the verdict "more experts better" (interval below 0),
    "more experts worse" (above 0) or "inconclusive"; while fewer than all 8 pairs are committed the status is
    "k of 8, no verdict" (there is no interim test). Beside it, for the text, the paired bootstrap over the 132
    evaluation files (`stats.paired_document_bootstrap`: 10,000 resamples from a fixed seed, each recomputing every
    seed's byte-weighted Delta_s from the per-file sums), which never changes the verdict;
  * secondary, descriptive (no verdicts): (a) CE against E on seeds 20-22 with the per-seed least-squares slope in
    log2 E; (b) d_E = CE(Switch E) - CE(dense) per E with t-interval, file bootstrap and the gain as a fraction of
    the dense loss; (c) CE(E = 2) - CE(E = 8); (d) the steps Switch needs to reach its paired dense run's final
    subset loss; (e) per MoE block at the end: drop rate, mean top gate, expert load, load-balancing loss;
    (f) tokens/s and wall time; (g) Delta on seeds 20-22 alone, labelled a subset of the primary.

A run's number is its final cross-entropy on the whole fixed evaluation set (`moe_jax.evalset`), in nats per byte:
the sum of its per-file nats over the sum of the files' bytes, from the run's `eval_set.json`. Every statistic
takes whatever runs are committed and reports its n; a run that is not there is simply not paired, a diverged run
(result.json status 'diverged', no loss) is listed, never dropped silently.

A committed run directory (`results/expert-scaling/runs/<run>/`, as `experiments/study.sh` leaves it):
  result.json    status ('completed' | 'diverged'), step, wall_time_s
  config.json    'resolved': seed, model.moe_layer_interval (0: dense), moe.num_experts, the tuned settings
  eval_set.json  step, result.fingerprint, result.documents: file -> [nats, targets, bytes] (the per-file sums)
  metrics.jsonl  training records (tokens_per_s, per-block 'moe' routing statistics) and evaluation records
                 ('subset/cross_entropy' every 245 steps), read by `metrics.read_metrics`
  machine.json   the CPU the run finished on

`python -m moe_jax.scaling_study` writes all of it to results/expert-scaling/analysis.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax import fileio, stats
from moe_jax import metrics as metrics_lib
from moe_jax import sweep as sweep_lib

# results/SCALING.md, "Step 2: confirmatory runs" and "Statistics (fixed here)".
PRIMARY_SEEDS = tuple(range(20, 28))  # E = 8 and E = 32: the primary pairs
SECONDARY_SEEDS = (20, 21, 22)        # dense, E = 2 (and E = 128) too
PRIMARY = (32, 8)                     # Delta = CE(E = 32) - CE(E = 8)
SWITCH_EXPERTS = (2, 8, 32, 128)      # E = 128 only if freeze 1 includes it
DENSE = 0                             # the expert count this module gives the dense arm
STEPS = 2450                          # the step of every confirmatory run's whole-set score
TOKENS_PER_STEP = 32 * 128            # batch x sequence length: 2450 steps are 10,035,200 fresh tokens
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = stats.BOOTSTRAP_SEED  # fixed: every reader gets the same interval
VERDICTS = ("more experts better", "more experts worse")  # interval below 0, above 0
END_TAIL = 5  # training records averaged for the end-of-training routing statistics (one record is noisy)
RUNS_DIR = pathlib.Path("results") / "expert-scaling" / "runs"
ANALYSIS_FILE = pathlib.Path("results") / "expert-scaling" / "analysis.json"
# Settings a run of the study may differ in (the diagnosis's factors), read from config.json's resolved values.
SETTINGS = {"init_scale": ("model", "init_scale"), "learning_rate": ("train", "learning_rate"),
            "capacity_factor": ("moe", "capacity_factor"), "aux_loss_weight": ("train", "aux_loss_weight")}


# ----------------------------------------------------------------------------------------------------------
# Reading committed runs.


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
  """One committed run: its arm, seed and whole-set score with the per-file sums a bootstrap needs."""

  name: str
  path: str
  experts: int                  # DENSE (0) for the dense arm
  seed: int
  status: str                   # 'completed' | 'diverged'
  settings: Mapping[str, Any]   # SETTINGS (dense: no capacity factor or alpha)
  step: int | None              # the step eval_set.json was scored at (None: diverged)
  fingerprint: str | None       # of the evaluation set it was scored on
  files: tuple[str, ...]        # [D] evaluation files, sorted
  file_nats: np.ndarray         # float64 [D]: nats summed over each file's targets
  file_bytes: np.ndarray        # float64 [D]: each file's bytes (the byte-weighting of SCALING.md)
  wall_time_s: float | None
  cpu: str | None

  @property
  def completed(self) -> bool:
    return self.status == "completed"

  @property
  def cross_entropy(self) -> float:
    """Whole-set cross-entropy in nats per byte (nan for a diverged run)."""
    return float(self.file_nats.sum() / self.file_bytes.sum()) if self.completed else math.nan


def read_run(path: str | os.PathLike) -> Run:
  """A committed run directory (module docstring). ValueError naming the file for a status other than
  'completed' or 'diverged' (an unfinished run is not committed)."""
  path = pathlib.Path(path)
  result = fileio.read_json(path / sweep_lib.RESULT_FILE)
  config = fileio.read_json(path / "config.json")["resolved"]
  status = result.get("status")
  if status not in ("completed", "diverged"):
    raise ValueError(f"{path / sweep_lib.RESULT_FILE} says status {status!r}: commit a run once it has finished")
  experts = config["moe"]["num_experts"] if config["model"]["moe_layer_interval"] else DENSE
  router_only = ("capacity_factor", "aux_loss_weight")  # meaningless for the dense arm, which has no router
  settings = {key: config[section][field] for key, (section, field) in SETTINGS.items()
              if experts or key not in router_only}
  step, fingerprint, files, nats, weights = None, None, (), np.zeros(0), np.zeros(0)
  if status == "completed":
    scored = fileio.read_json(path / "eval_set.json")
    documents = scored["result"]["documents"]  # file -> [nats, targets, bytes]
    files = tuple(sorted(documents))
    nats = np.array([documents[name][0] for name in files], np.float64)
    weights = np.array([documents[name][2] for name in files], np.float64)
    step, fingerprint = int(scored["step"]), scored["result"]["fingerprint"]
  machine = path / "machine.json"
  return Run(name=path.name, path=str(path), experts=int(experts), seed=int(config["seed"]), status=status,
             settings=settings, step=step, fingerprint=fingerprint, files=files, file_nats=nats, file_bytes=weights,
             wall_time_s=result.get("wall_time_s"),
             cpu=fileio.read_json(machine).get("cpu") if machine.exists() else None)


def read_runs(runs_dir: str | os.PathLike, *, step: int | None = None,
              fingerprint: str | None = None) -> dict[str, Run]:
  """name -> Run for every run directory under `runs_dir` ({} when it does not exist yet: no run committed).

  With `step` / `fingerprint`, a completed run scored at another step or on another evaluation set is refused
  (ValueError naming it): the protocol's number is the score at step 2450 on the fingerprinted set.
  """
  runs_dir = pathlib.Path(runs_dir)
  if not runs_dir.is_dir():
    return {}
  runs = {}
  for path in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
    run = read_run(path)
    if run.completed and step is not None and run.step != step:
      raise ValueError(f"{path}/eval_set.json: scored at step {run.step}; the study's number is the score at step "
                       f"{step}")
    if run.completed and fingerprint is not None and run.fingerprint != fingerprint:
      raise ValueError(f"{path}/eval_set.json: scored on evaluation set {run.fingerprint[:16]}; the study's is "
                       f"{fingerprint[:16]}")
    runs[run.name] = run
  return runs


def by_arm(runs: Mapping[str, Run]) -> dict[tuple[int, int], Run]:
  """(experts, seed) -> Run. ValueError when two runs claim one arm and seed (a rerun is a deviation to report,
  not a second sample)."""
  arms: dict[tuple[int, int], Run] = {}
  for run in runs.values():
    key = (run.experts, run.seed)
    if key in arms:
      raise ValueError(f"runs {arms[key].name} and {run.name} are both E = {run.experts}, seed {run.seed}")
    arms[key] = run
  return arms


# ----------------------------------------------------------------------------------------------------------
# Paired comparisons: over seeds (t-interval) and over files (bootstrap).


@dataclasses.dataclass(frozen=True)
class Comparison:
  """CE(E = a) - CE(E = b) over the seeds where both runs completed (E = 0: dense)."""

  a: int
  b: int
  seeds: tuple[int, ...]               # [S] the pairs, in seed order
  t: stats.PairedDifference            # over seeds: mean, 95% t-interval (nan half-width for S < 2)
  files: stats.BootstrapInterval | None  # over files, the same files for every seed in a resample; None for S = 0
  diverged: tuple[int, ...]            # seeds where a run of the pair diverged: no number, not paired
  b_cross_entropy: tuple[float, ...]   # [S] CE(E = b) of each pair (the reference for a relative gain)

  @property
  def n(self) -> int:
    return len(self.seeds)

  @property
  def gain_fraction(self) -> float:
    """-mean(a - b) / mean CE(b): the gain of `a` over `b` as a fraction of b's loss (positive: a lower)."""
    return -self.t.mean / float(np.mean(self.b_cross_entropy)) if self.seeds else math.nan


def compare(runs: Mapping[str, Run], a: int, b: int, seeds: Sequence[int], *,
            resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Comparison:
  """CE(E = a, s) - CE(E = b, s) for the `seeds` that have both runs completed.

  The t-interval covers the seeds (Student 1908; `stats.paired_difference`); the bootstrap resamples the
  evaluation files, every pair with the same files in one resample, and recomputes each pair's byte-weighted
  difference sum_d(nats_a - nats_b) / sum_d(bytes) (`stats.paired_document_bootstrap`): it covers the choice of
  text. ValueError when the pairs were scored on different evaluation sets (the files would not pair).
  """
  arms = by_arm(runs)
  pairs, diverged = [], []
  for s in seeds:
    pair = arms.get((a, s)), arms.get((b, s))
    if None in pair:
      continue
    if all(run.completed for run in pair):
      pairs.append(pair)
    else:
      diverged.append(s)
  sets = {(run.fingerprint, run.files) for pair in pairs for run in pair}
  if len(sets) > 1:
    raise ValueError(f"E = {a} vs E = {b}: the runs were scored on {len(sets)} different evaluation sets "
                     f"({sorted(fingerprint[:12] for fingerprint, _ in sets)}); a paired comparison needs one")
  t = stats.paired_difference([x.cross_entropy for x, _ in pairs], [y.cross_entropy for _, y in pairs])
  files = stats.paired_document_bootstrap(
      np.stack([x.file_nats for x, _ in pairs]), np.stack([y.file_nats for _, y in pairs]), pairs[0][0].file_bytes,
      resamples=resamples, seed=seed) if pairs else None
  return Comparison(a=a, b=b, seeds=tuple(x.seed for x, _ in pairs), t=t, files=files, diverged=tuple(diverged),
                    b_cross_entropy=tuple(y.cross_entropy for _, y in pairs))


@dataclasses.dataclass(frozen=True)
class PrimaryTest:
  """SCALING.md's primary test: Delta = CE(E = 32) - CE(E = 8) over seeds 20-27 and its status."""

  delta: Comparison
  planned: int  # 8 pairs
  status: str   # a verdict (VERDICTS or 'inconclusive') once all pairs are in, else 'k of 8, no verdict'

  @property
  def text_caveat(self) -> bool:
    """True when the verdict is 'better' or 'worse' but the file bootstrap contains 0: the reading must then say
    that the result holds on this evaluation text and that another choice of text could reverse it."""
    return self.status in VERDICTS and self.delta.files.low <= 0 <= self.delta.files.high


def primary_status(delta: Comparison, planned: int) -> str:
  """The verdict by the rule once all `planned` pairs have a number; before that 'k of n, no verdict' (no interim
  test). A diverged run leaves its pair without a number, so the rule has none to apply: no verdict either."""
  if delta.diverged:
    return (f"{delta.n} of {planned}, no verdict (diverged: seed{'s' * (len(delta.diverged) > 1)} "
            f"{', '.join(map(str, delta.diverged))}, a result to report; the rule has no number for its pair)")
  if delta.n < planned:
    return f"{delta.n} of {planned}, no verdict"
  return delta.t.verdict(*VERDICTS)


def primary_test(runs: Mapping[str, Run], **bootstrap) -> PrimaryTest:
  """The primary test over whatever pairs are committed (`bootstrap`: `compare`'s resamples and seed)."""
  delta = compare(runs, *PRIMARY, PRIMARY_SEEDS, **bootstrap)
  return PrimaryTest(delta=delta, planned=len(PRIMARY_SEEDS), status=primary_status(delta, len(PRIMARY_SEEDS)))


# ----------------------------------------------------------------------------------------------------------
# (a) CE against log2 E.


def log2_slope(experts: Sequence[int], cross_entropy: Sequence[float]) -> float:
  """Least-squares slope of CE against log2 E (nats per doubling of the experts), with x = log2 E and y = CE:
  sum((x - mean x)(y - mean y)) / sum((x - mean x)^2). Over E = 2, 8, 32 it equals (CE(32) - CE(2)) / 4 (SCALING.md)."""
  x, y = np.log2(np.asarray(experts, np.float64)), np.asarray(cross_entropy, np.float64)
  if x.shape != y.shape or len(np.unique(x)) < 2:
    raise ValueError(f"a slope needs CE at two or more distinct E of one length, got E = {list(experts)} and "
                     f"{len(y)} values")
  return float(np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2))


@dataclasses.dataclass(frozen=True)
class Slopes:
  """Per-seed slopes of CE in log2 E over `experts`, for the seeds that have every one of them completed."""

  experts: tuple[int, ...]
  seeds: tuple[int, ...]
  slopes: tuple[float, ...]     # [S]
  t: stats.PairedDifference     # mean slope and its t-interval (the slopes against 0)


def slopes(runs: Mapping[str, Run], experts: Sequence[int], seeds: Sequence[int] = SECONDARY_SEEDS) -> Slopes:
  """(a): one slope per seed over the same E (a seed missing one of them is left out, so every slope has one
  definition), their mean and t-interval."""
  arms = by_arm(runs)
  done = [s for s in seeds if all((e, s) in arms and arms[(e, s)].completed for e in experts)]
  values = [log2_slope(experts, [arms[(e, s)].cross_entropy for e in experts]) for s in done]
  return Slopes(experts=tuple(experts), seeds=tuple(done), slopes=tuple(values),
                t=stats.paired_difference(values, np.zeros(len(values))))


# ----------------------------------------------------------------------------------------------------------
# (d)-(f): from a run's metrics.jsonl.


def subset_curve(run_metrics: metrics_lib.RunMetrics) -> dict[int, float]:
  """step -> cross-entropy on the evaluation subset (scored every 245 steps and at the end)."""
  return run_metrics.series("subset/cross_entropy", kind="eval")


@dataclasses.dataclass(frozen=True)
class StepsToDense:
  """(d): steps a Switch run needs to reach its paired dense run's final subset loss."""

  target: float             # the dense run's final subset cross-entropy
  steps: float | None       # interpolated between evaluations (`sweep.steps_to_reach`); None: never reached
  total_steps: int          # the Switch run's steps

  @property
  def speedup(self) -> float | None:
    return self.total_steps / self.steps if self.steps else None

  @property
  def fraction_saved(self) -> float | None:
    """1 - steps / total_steps: the share of the budget Switch did not need (a speedup of 1.19 saves 16%)."""
    return 1 - self.steps / self.total_steps if self.steps is not None else None


def steps_to_dense(switch_curve: Mapping[int, float], dense_curve: Mapping[int, float]) -> StepsToDense:
  """Curves: step -> subset cross-entropy (`subset_curve`); the target is dense's value at its last step."""
  target = dense_curve[max(dense_curve)]
  return StepsToDense(target=target, steps=sweep_lib.steps_to_reach(dict(switch_curve), target),
                      total_steps=max(switch_curve))


# Per-block statistics averaged at the end of training (metrics.block_stats names).
END_STATS = ("dropped_token_fraction", "mean_top_gate", "max_expert_load", "mean_expert_load",
             "load_balancing_loss", "router_entropy")


def routing_at_end(run_metrics: metrics_lib.RunMetrics, tail: int = END_TAIL) -> list[dict[str, Any]]:
  """(e): per MoE block, the mean of each END_STATS statistic over its last `tail` training records, and the
  largest expert's share of the selections relative to uniform (E * max_e selection_e; 1 when balanced)."""
  blocks = []
  for block in run_metrics.moe_blocks():
    entry: dict[str, Any] = {"block": block}
    for stat in (*END_STATS, "expert_selection"):
      series = run_metrics.block_series(block, stat)
      if not series:
        continue
      last = [series[step] for step in sorted(series)[-tail:]]
      if stat == "expert_selection":  # [tail, E]
        selection = np.asarray(last, np.float64)
        entry["max_selection_vs_uniform"] = float(np.mean(selection.max(axis=1) * selection.shape[1]))
      else:
        entry[stat] = float(np.mean(last))
    blocks.append(entry)
  return blocks


def tokens_per_s(run_metrics: metrics_lib.RunMetrics) -> float | None:
  """(f): median training throughput over the logged steps (None when the run logged none)."""
  rates = list(run_metrics.series("tokens_per_s").values())
  return float(np.median(rates)) if rates else None


# ----------------------------------------------------------------------------------------------------------
# Everything at once, JSON-safe.


def _number(value):
  return None if value is None or isinstance(value, float) and not math.isfinite(value) else value


def _t_record(t: stats.PairedDifference) -> dict[str, Any]:
  return {"n": t.n, "mean": _number(t.mean), "interval": [_number(v) for v in t.interval],
          "values": list(t.differences)}


def comparison_record(comparison: Comparison) -> dict[str, Any]:
  files = comparison.files
  return {"a_experts": comparison.a, "b_experts": comparison.b, "seeds": list(comparison.seeds),
          "t": _t_record(comparison.t), "diverged_seeds": list(comparison.diverged),
          "files_bootstrap": None if files is None else {
              "mean": files.mean, "interval": list(files.interval), "files": files.n, "resamples": files.resamples,
              "seed": BOOTSTRAP_SEED},
          "b_mean_cross_entropy": _number(float(np.mean(comparison.b_cross_entropy))) if comparison.n else None,
          "gain_fraction_of_b": _number(comparison.gain_fraction)}


def analyse(runs: Mapping[str, Run], run_metrics: Mapping[str, metrics_lib.RunMetrics], *,
            resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
  """Every statistic of SCALING.md over the committed `runs` (name -> Run) and their metrics (name ->
  RunMetrics; runs without are left out of (d)-(f)), as one JSON-safe dict. Missing runs lower the n's."""
  bootstrap = {"resamples": resamples}
  arms = by_arm(runs)
  primary = primary_test(runs, **bootstrap)
  present = sorted({run.experts for run in runs.values()})
  switch = [e for e in present if e != DENSE]
  out: dict[str, Any] = {
      "protocol": "results/SCALING.md", "unit": "nats per byte, whole evaluation set",
      "runs": {name: {"experts": run.experts, "seed": run.seed, "status": run.status, "step": run.step,
                      "cross_entropy": _number(run.cross_entropy), "fingerprint": run.fingerprint,
                      "settings": dict(run.settings), "wall_time_s": run.wall_time_s, "cpu": run.cpu}
               for name, run in sorted(runs.items())},
      "primary": {"status": primary.status, "planned_pairs": primary.planned, "text_caveat": primary.text_caveat,
                  **comparison_record(primary.delta)},
      "secondary": {
          "a_slopes": {},
          "b_vs_dense": {str(e): comparison_record(compare(runs, e, DENSE, SECONDARY_SEEDS, **bootstrap))
                         for e in switch},
          "c_e2_minus_e8": comparison_record(compare(runs, 2, 8, SECONDARY_SEEDS, **bootstrap)),
          "d_steps_to_dense": {}, "e_routing_at_end": {}, "f_throughput": {},
          "g_primary_on_seeds_20_22": comparison_record(compare(runs, *PRIMARY, SECONDARY_SEEDS, **bootstrap)),
      },
  }
  secondary = out["secondary"]
  for experts in ((2, 8, 32), (2, 8, 32, 128)):
    if set(experts) <= set(switch):
      fit = slopes(runs, experts)
      secondary["a_slopes"][",".join(map(str, experts))] = {"seeds": list(fit.seeds), **_t_record(fit.t)}
  for name, run in sorted(runs.items()):
    if not run.completed or name not in run_metrics:
      continue
    curve = subset_curve(run_metrics[name])
    dense = arms.get((DENSE, run.seed))
    if run.experts != DENSE and dense is not None and dense.name in run_metrics and curve:
      reached = steps_to_dense(curve, subset_curve(run_metrics[dense.name]))
      secondary["d_steps_to_dense"][name] = {"dense_run": dense.name, **dataclasses.asdict(reached),
                                             "speedup": reached.speedup, "fraction_saved": reached.fraction_saved}
    if run.experts != DENSE:
      secondary["e_routing_at_end"][name] = routing_at_end(run_metrics[name])
    secondary["f_throughput"][name] = {"tokens_per_s": tokens_per_s(run_metrics[name]),
                                       "wall_time_s": run.wall_time_s, "cpu": run.cpu}
  return out


def read_metrics(runs: Mapping[str, Run]) -> dict[str, metrics_lib.RunMetrics]:
  """name -> the run's metrics.jsonl, for the completed runs that have one."""
  return {name: metrics_lib.read_metrics(run.path) for name, run in runs.items()
          if run.completed and os.path.exists(os.path.join(run.path, metrics_lib.METRICS_FILE))}


def main(argv: Sequence[str] | None = None) -> None:
  """Write the study's statistics (`analyse`) over its committed runs to a JSON file."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--runs", default=str(RUNS_DIR), help="the committed run directories")
  parser.add_argument("--output", default=str(ANALYSIS_FILE))
  parser.add_argument("--fingerprint", default=None,
                      help="refuse a run scored on another evaluation set (configs/sweeps/expert_scaling.py EVAL_SET)")
  args = parser.parse_args(argv)
  runs = read_runs(args.runs, step=STEPS, fingerprint=args.fingerprint)
  fileio.write_json(args.output, analyse(runs, read_metrics(runs)), indent=1)
  print(f"{len(runs)} committed run(s) -> {args.output}")


if __name__ == "__main__":
  main()
