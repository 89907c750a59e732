"""Run a sweep of training runs and aggregate them into results/<sweep>/ for notebooks and papers' tables.

A sweep config (configs/sweeps/) lists runs; each run is a full training config. Runs execute in sequence in
one process (or as printed commands on a cluster), each in `<workdir_root>/<sweep>/<run>`; a run whose
`result.json` says completed is skipped, an interrupted one resumes from its checkpoint.

results/<sweep>/
  summary.json, summary.csv   one row per run: config, seed, final eval loss, steps/tokens to the dense
                              model's final loss, wall time, FLOPs, parameters; diverged runs listed
                              apart in summary.json ("diverged"), never silently left out
  curves.json                 per run: eval loss by step; training loss every few steps, and per MoE block
                              ("routing": [{"block": 1, "dropped_token_fraction": [...], ...}, ...]) its
                              routing metrics at the same steps, and its per-expert vectors at the last
                              training record ("at_end": {"step": s, "expert_selection": [E], ...})
  numerics_check_<steps>.json a committed run trained again and compared value by value with what is committed
                              (`compare_with_committed`): every difference as measured, the machine and the
                              installed packages (experiments/check_numerics.sh)

Faults (docs/faults.md). Every result file is written atomically (`moe_jax.fileio`), so a full disk or a kill
leaves the previous version. A second sweep over the same runs is refused (a lock per run under
`<workdir_root>/<sweep>/.locks/`, released however the holder ends). A run refused for its config or input is
reported in one line and the other runs go on; the machine failing (full disk, I/O error) stops the sweep in one
line (`fileio.EnvironmentFailure`). A result.json that is not whole JSON counts as unfinished: the run resumes.
A run's wall time sums every invocation that ended with a result (`invocations` in result.json).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from moe_jax import config_lib, environment, fileio, flops, resolve
from moe_jax import metrics as metrics_lib
from moe_jax.workdir import DirectoryLock, check_workdir

RESULT_FILE = "result.json"
CURVE_STRIDE = 5  # keep every 5th training record in curves.json (the full JSONL stays in the workdir)
ROUTING_KEYS = ("dropped_token_fraction", "max_expert_load", "mean_expert_load", "router_entropy", "mean_top_gate")
# Per-expert [E] routing vectors (moe_jax.routing.RoutingMetrics), kept for the last training record only.
EXPERT_KEYS = ("expert_selection", "expert_load")


def code_commit() -> str:
  """The git commit of this checkout of moe_jax, with '+dirty' when tracked files have uncommitted changes;
  outside a git checkout (e.g. a `git archive` copy) $MOE_JAX_COMMIT, else 'unknown'."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    return subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, check=True).stdout.strip()

  try:
    commit = git("rev-parse", "HEAD")
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
  except (OSError, subprocess.CalledProcessError):
    return os.environ.get("MOE_JAX_COMMIT", "unknown")


def run_workdir(workdir_root: str, sweep: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> str:
  return os.path.join(workdir_root, sweep.name, run.name)


FINAL_STATUSES = ("completed", "diverged")
LOCK_DIR = ".locks"  # <workdir_root>/<sweep>/.locks/<run>.lock: which sweep process owns a run


def read_result(workdir: str) -> dict | None:
  """The run's result.json, or None when there is none or it is not whole JSON (written in place by older code
  and cut short): then the run counts as unfinished, with a warning, and a rerun resumes it from its checkpoint
  instead of crashing."""
  path = os.path.join(workdir, RESULT_FILE)
  try:
    result = fileio.read_json(path)
  except FileNotFoundError:
    return None
  except ValueError as error:
    print(f"WARNING: {error}; the run counts as unfinished (resumed from its checkpoint when the sweep runs)",
          file=sys.stderr, flush=True)
    return None
  return result if isinstance(result, dict) else None


def run_status(workdir: str) -> str | None:
  """'completed', 'diverged', 'preempted', 'stopped', or None when the run never finished a call."""
  result = read_result(workdir)
  return None if result is None else result.get("status")


def is_finished(workdir: str) -> bool:
  return run_status(workdir) in FINAL_STATUSES


def commands(sweep: ml_collections.ConfigDict, sweep_arg: str, workdir_root: str,
             results_root: str = "results") -> list[str]:
  """One shell command per run, for a cluster scheduler (each resumes if restarted)."""
  lines = []
  for run in sweep.runs:
    args = ["python", "experiments/sweep.py", f"--sweep={sweep_arg}", f"--workdir_root={workdir_root}",
            f"--results_root={results_root}", f"--only={run.name}"]
    lines.append(" ".join(shlex.quote(a) for a in args))
  return lines


@contextlib.contextmanager
def _lock_runs(workdir_root: str, sweep: ml_collections.ConfigDict, runs: list):
  """Hold the lock of every run in `runs` for the whole sweep: a second sweep over any of them (same
  workdir_root, the same or an overlapping --only) is refused at once, naming the holder; disjoint --only
  commands (one per run on a cluster) do not block each other."""
  directory = os.path.join(workdir_root, sweep.name, LOCK_DIR)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    raise ValueError(f"--workdir_root={workdir_root!r}: cannot create {directory} "
                     f"({fileio.describe(error)})") from None
  with contextlib.ExitStack() as stack:
    for run in runs:
      stack.enter_context(DirectoryLock(
          os.path.join(directory, f"{run.name}.lock"), what=f"run {run.name} of sweep {sweep.name} under "
          f"--workdir_root={workdir_root}", hint="another sweep is running it; wait for that sweep to end"))
    yield


def _record_result(workdir: str, outcome: dict, commit: str, wall_time_s: float) -> None:
  """Write result.json (atomically) for one invocation of a run, carrying over the earlier invocations so that
  `wall_time_s` is the run's total: a preempted and resumed run spent the time of every invocation."""
  previous = read_result(workdir) or {}
  invocations = list(previous.get("invocations", []))
  if not invocations and "wall_time_s" in previous:  # written before invocations were recorded
    invocations = [{"status": previous.get("status"), "wall_time_s": previous["wall_time_s"],
                    "commit": previous.get("commit")}]
  this = outcome.get("wall_time_s")
  invocations.append({"status": outcome["status"], "wall_time_s": wall_time_s if this is None else this,
                      "commit": commit, "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
  outcome.update(commit=commit, invocations=invocations,
                 wall_time_s=sum(invocation["wall_time_s"] for invocation in invocations))
  fileio.write_json(os.path.join(workdir, RESULT_FILE), outcome)


def run_sweep(
    sweep: ml_collections.ConfigDict,
    build_config: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
    workdir_root: str,
    *,
    only: tuple[str, ...] = (),
) -> dict[str, str]:
  """Train every run (or those named in `only`) in sequence, skipping finished ones; returns {run name: reason}
  for the runs refused (bad config or input, one line each, printed as they happen) while the others went on.

  Each result.json records the commit of the code that trained it (`code_commit`). The machine failing (a full
  disk, an I/O error, a failed checkpoint save) stops the sweep: `fileio.EnvironmentFailure`, one line.
  """
  from moe_jax import train  # heavy: not needed to print commands or aggregate
  from moe_jax.checkpoint import CheckpointError

  unknown = set(only) - {run.name for run in sweep.runs}
  if unknown:
    raise ValueError(f"--only names runs not in sweep {sweep.name}: {sorted(unknown)}")
  selected = [run for run in sweep.runs if not only or run.name in only]
  commit = code_commit()
  refused: dict[str, str] = {}
  with _lock_runs(workdir_root, sweep, selected):
    for index, run in enumerate(selected, 1):
      workdir = run_workdir(workdir_root, sweep, run)
      if is_finished(workdir):
        print(f"[{index}/{len(selected)}] {run.name}: finished earlier, skipped", flush=True)
        continue
      print(f"[{index}/{len(selected)}] {run.name} -> {workdir}", flush=True)
      start = time.perf_counter()
      try:
        check_workdir(workdir)  # every entry the right type, before the trainer or this loop writes one
        outcome = dataclasses.asdict(train.train_and_evaluate(build_config(run), workdir))
      except train.NonFiniteLossError as error:  # a diverged run is a result (Switch Table 3), not a crash
        print(f"  {run.name} diverged: {error}", flush=True)
        outcome = {"status": "diverged", "error": str(error)}
      except (ValueError, FileNotFoundError) as error:  # refused before training: the next runs go on
        refused[run.name] = str(error).strip().splitlines()[0]
        print(f"  {run.name} refused: {refused[run.name]}", flush=True)
        continue
      except (OSError, CheckpointError) as error:  # the machine failed: every later run would fail the same way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise fileio.EnvironmentFailure(f"sweep {sweep.name} stopped at run {run.name}: {reason}") from error
      if outcome["status"] == "already_finished":  # result.json was lost or damaged after the run completed
        outcome["status"] = "completed"
      os.makedirs(workdir, exist_ok=True)
      _record_result(workdir, outcome, commit, time.perf_counter() - start)
      if outcome["status"] == "preempted":
        print("preempted: stopping the sweep; run the same command again to continue", flush=True)
        return refused
  return refused


def steps_to_reach(evals: dict[int, float], target: float) -> float | None:
  """First step at which the eval loss reaches `target`, interpolating linearly between evaluations."""
  steps = sorted(evals)
  previous_step, previous_loss = 0, None
  for step in steps:
    loss = evals[step]
    if loss <= target:
      if previous_loss is None or previous_loss == loss:
        return float(step)
      return previous_step + (previous_loss - target) / (previous_loss - loss) * (step - previous_step)
    previous_step, previous_loss = step, loss
  return None


def _routing_curve(run: metrics_lib.RunMetrics, steps: list[int]) -> list[dict[str, Any]]:
  """Per MoE block, its routing metrics at `steps` and its per-expert vectors at the last training record:
  [{"block": b, metric: [values], ..., "at_end": {"step": s, "expert_selection": [E], ...}}, ...]."""
  curves = []
  last = max(run.train) if run.train else None
  for block in run.moe_blocks():
    entry: dict[str, Any] = {"block": block}
    for metric in ROUTING_KEYS:
      series = run.block_series(block, metric)
      if series:  # runs logged before a metric existed lack it
        entry[metric] = [series[s] for s in steps]
    at_end = {key: run.block_series(block, key).get(last) for key in EXPERT_KEYS}
    if any(value is not None for value in at_end.values()):
      entry["at_end"] = {"step": last, **{key: value for key, value in at_end.items() if value is not None}}
    curves.append(entry)
  return curves


def aggregate(
    sweep: ml_collections.ConfigDict,
    build_config: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
    workdir_root: str,
    results_root: str,
) -> list[dict]:
  """Write summary.json/.csv and curves.json for every finished run; returns the summary rows.

  A run of the sweep with no finished workdir under `workdir_root` keeps the row and curves it already has in
  `results_root` (the workdir was on another machine, or in an earlier session whose workdirs are gone), so a
  sweep continued elsewhere adds to its committed results instead of dropping them. Steps to the dense loss are
  recomputed over all rows.
  """
  out = os.path.join(results_root, sweep.name)
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as error:
    raise ValueError(f"--results_root={results_root!r}: cannot create {out} ({fileio.describe(error)})") from None
  committed_rows, committed_curves = _committed(sweep, results_root)
  rows, curves, incomplete = [], {}, []
  for run in sweep.runs:
    workdir = run_workdir(workdir_root, sweep, run)
    if not is_finished(workdir):
      if run.name in committed_rows:
        rows.append(committed_rows[run.name])
        if run.name in committed_curves:
          curves[run.name] = committed_curves[run.name]
      continue
    config = build_config(run)
    result = read_result(workdir)
    identity = {"run": run.name, "group": run.group, "seed": run.seed, "base": run.base}
    if result["status"] == "diverged":
      rows.append({**identity, "status": "diverged", "error": result["error"]})
      continue
    try:
      run_metrics = metrics_lib.read_metrics(workdir)
    except OSError as error:  # finished, but its metrics.jsonl was deleted, moved or made unreadable since
      problem = f"its {metrics_lib.METRICS_FILE} cannot be read ({fileio.describe(error)})"
      run_metrics = None
    else:
      problem = None if run_metrics.eval else f"its {metrics_lib.METRICS_FILE} holds no evaluation record"
    if problem:  # never silently left out: its committed row stays, else it is listed as incomplete
      kept = run.name in committed_rows
      message = (f"run {run.name} finished but {problem} in {workdir}: "
                 + ("its committed row is kept" if kept else "listed under 'incomplete' in summary.json"))
      print(f"WARNING: {message}", file=sys.stderr, flush=True)
      if kept:
        rows.append(committed_rows[run.name])
        if run.name in committed_curves:
          curves[run.name] = committed_curves[run.name]
      else:
        incomplete.append({**identity, "status": "incomplete", "error": message})
      continue
    train, evals = run_metrics.train, run_metrics.series("cross_entropy", kind="eval")
    model_cfg = config_lib.model_config(config, vocab_size=_vocab_size(config))
    per_token = resolve.train_flops_per_token(config, model_cfg)
    params = flops.param_count(model_cfg)
    rows.append({
        "run": run.name, "group": run.group, "seed": run.seed, "base": run.base, "status": "completed",
        "flop_matched": run.flop_matched,
        "num_experts": config.moe.num_experts if model_cfg.moe_layers else 0,
        "overrides": json.dumps(run.overrides.to_dict()),
        "steps": result["step"], "final_eval_loss": evals[max(evals)], "commit": result.get("commit"),
        "wall_time_s": result["wall_time_s"],
        "tokens_per_s": _median_tokens_per_s(train),
        "train_flops_per_token": per_token,
        "total_train_flops": per_token * config.train.batch_size * config.train.seq_len * result["step"],
        "params_total": params.total, "params_active": params.active,
        "tokens_per_step": config.train.batch_size * config.train.seq_len,
    })
    stride_steps = sorted(train)[::CURVE_STRIDE]
    curves[run.name] = {
        "eval": [[step, evals[step]] for step in sorted(evals)],
        "train_steps": stride_steps,
        "train_loss": [train[s]["loss"] for s in stride_steps],
        "cross_entropy": [train[s]["cross_entropy"] for s in stride_steps],
        "load_balancing_loss": [train[s]["load_balancing_loss"] for s in stride_steps],
        "routing": _routing_curve(run_metrics, stride_steps),
    }
  diverged = [row for row in rows if row["status"] == "diverged"]
  rows = [row for row in rows if row["status"] == "completed"]
  _add_steps_to_dense(rows, curves)
  # Each file whole or not at all: a full disk here used to leave an empty curves.json (a committed one too).
  fileio.write_json(os.path.join(out, "summary.json"),
                    {"sweep": sweep.name, "runs": rows, "diverged": diverged, "incomplete": incomplete}, indent=1)
  fileio.write_json(os.path.join(out, "curves.json"), curves)
  if rows:
    fileio.write_csv(os.path.join(out, "summary.csv"), rows, fieldnames=list(rows[0]))
  return rows


def _committed(sweep: ml_collections.ConfigDict, results_root: str) -> tuple[dict[str, dict], dict[str, dict]]:
  """(rows by run name, curves by run name) of the sweep's results already in `results_root`; empty if none."""
  out = os.path.join(results_root, sweep.name)
  try:
    summary = fileio.read_json(os.path.join(out, "summary.json"))
    curves = fileio.read_json(os.path.join(out, "curves.json"))
  except FileNotFoundError:
    return {}, {}
  except ValueError as error:  # rewriting would drop the committed rows it holds: refuse instead
    raise ValueError(f"{error} Restore it (e.g. `git checkout -- {out}`) before aggregating again") from None
  rows = {row["run"]: row for row in summary["runs"] + summary["diverged"]}
  return rows, curves


# ----------------------------------------------------------------------------------------------------------
# Numerics check: a committed run trained again (experiments/check_numerics.sh), compared value by value.

NUMERICS_CHECK = "numerics_check"  # results/<sweep>/numerics_check_<steps>.json; numerics_check.json: the 11-step
                                   # check of 2026-12-04, committed before the file name said its steps
COMMITTED_RUNS = "runs"  # results/<sweep>/runs/<run>/: a sweep that commits its runs' own metrics.jsonl, result.json
# Values of a record that measure the machine's speed or the clock, not what it computed: never compared.
WALL_CLOCK_KEYS = ("time", "tokens_per_s", "mfu")
KIND_ORDER = ("train", "eval", "final")  # a step's training record, then its evaluation, then the run's result


def flat_values(record: dict) -> dict[str, float]:
  """A metrics record's numbers by one flat key each: 'loss'; an MoE block's statistic 'block1/router_entropy';
  an element of a vector 'block1/expert_load[3]', 'full/cross_entropy_interval[0]'. Booleans, strings and the
  `WALL_CLOCK_KEYS` are left out. The committed curves and a run's records meet in this one key space."""
  flat: dict[str, float] = {}

  def add(key: str, value: Any) -> None:
    if isinstance(value, list):
      for i, element in enumerate(value):
        add(f"{key}[{i}]", element)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[key] = value

  for key, value in record.items():
    if key in ("step", "kind", *WALL_CLOCK_KEYS):
      continue
    if key == "moe":
      for entry in value:
        for stat, stat_value in entry.items():
          if stat != "block":
            add(f"block{entry['block']}/{stat}", stat_value)
    else:
      add(key, value)
  return flat


def _curve_records(curve: dict) -> dict[str, dict[int, dict[str, float]]]:
  """{'train': {step: flat values}, 'eval': {...}} of one run's curves.json entry (every CURVE_STRIDE-th training
  record, its per-expert vectors at the last one, every evaluation), in `flat_values` keys."""
  train: dict[int, dict[str, float]] = {}
  for i, step in enumerate(curve["train_steps"]):
    train[step] = {key: curve[field][i] for key, field in (("loss", "train_loss"), ("cross_entropy", "cross_entropy"),
                                                           ("load_balancing_loss", "load_balancing_loss"))
                   if field in curve}
  for entry in curve.get("routing", []):
    for metric in ROUTING_KEYS:
      for step, value in zip(curve["train_steps"], entry.get(metric, [])):
        train[step][f"block{entry['block']}/{metric}"] = value
    if "at_end" in entry:
      at_end = {key: value for key, value in entry["at_end"].items() if key != "step"}
      train.setdefault(entry["at_end"]["step"], {}).update(flat_values({"moe": [{"block": entry["block"], **at_end}]}))
  return {"train": train, "eval": {step: {"cross_entropy": loss} for step, loss in curve.get("eval", [])}}


def _committed_records(results_root: str, sweep_name: str, name: str, curve: dict | None):
  """(records by kind as in `_curve_records`, the committed result.json or None) of one run: every record of
  its committed metrics.jsonl where the sweep commits one (results/<sweep>/runs/<run>/), else its curves."""
  run_dir = os.path.join(results_root, sweep_name, COMMITTED_RUNS, name)
  if os.path.exists(os.path.join(run_dir, metrics_lib.METRICS_FILE)):
    committed = metrics_lib.read_metrics(run_dir)
    records = {kind: {step: flat_values(record) for step, record in getattr(committed, kind).items()}
               for kind in ("train", "eval")}
    return records, read_result(run_dir)
  if curve is None:
    raise ValueError(f"run {name!r} has no committed curves in {os.path.join(results_root, sweep_name)}")
  return _curve_records(curve), None


def difference(committed: float, measured: float | None) -> dict[str, Any]:
  """`equal`: bitwise (NaN equals NaN: the same bits were computed); `abs_diff` |measured - committed| and
  `rel_diff` abs_diff / |committed| where both are finite (rel_diff None when committed is 0 and they differ);
  both None when the value was not measured."""
  if measured is None:
    return {"equal": False, "abs_diff": None, "rel_diff": None}
  equal = committed == measured or (committed != committed and measured != measured)
  if equal:
    return {"equal": True, "abs_diff": 0.0, "rel_diff": 0.0}
  if not (np.isfinite(committed) and np.isfinite(measured)):
    return {"equal": False, "abs_diff": None, "rel_diff": None}
  abs_diff = abs(float(measured) - float(committed))
  return {"equal": False, "abs_diff": abs_diff, "rel_diff": abs_diff / abs(committed) if committed else None}


def compare_with_committed(
    sweep: ml_collections.ConfigDict, runs: tuple[str, ...], workdir_root: str, results_root: str, max_step: int,
) -> list[dict]:
  """Every committed value of `runs` up to `max_step` against the same value as trained again under
  `workdir_root`: one row {run, kind, step, key, committed, measured, equal, abs_diff, rel_diff} per value
  (`difference`), ordered by run, step, kind ('train', 'eval', 'final') and key.

  Committed values: every record of results/<sweep>/runs/<run>/metrics.jsonl where the sweep commits it, else
  curves.json (training loss, cross-entropy, load-balancing loss and routing statistics every CURVE_STRIDE-th
  step, the per-expert vectors at the last step, every evaluation). Once `max_step` reaches the committed run's
  last step, its final evaluation too, as summary.json records it ('final_eval_loss', the last eval record's
  cross-entropy) and, where committed, its result.json ('eval_loss'); then the run trained again must have
  finished there. A committed value the run did not log is a row with `measured` None, never skipped.

  Bitwise equality is the claim being checked: another machine, or a later refactor, computes exactly what a
  committed (pinned) run computed, so runs of one study split across machines or commits are one study. Where it
  fails, the differences are the measurement (`difference_statistics`).
  """
  summary_rows, curves = _committed(sweep, results_root)
  rows = []
  for name in runs:
    records, committed_result = _committed_records(results_root, sweep.name, name, curves.get(name))
    workdir = run_workdir(workdir_root, sweep, _run(sweep, name))
    if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
      raise ValueError(f"run {name!r} has no {metrics_lib.METRICS_FILE} in {workdir}: train it there first "
                       "(experiments/check_numerics.sh)")
    measured = metrics_lib.read_metrics(workdir)
    committed_steps = [step for step in sorted(records["train"]) if step <= max_step]
    if not any(step in measured.train for step in committed_steps):
      raise ValueError(f"run {name!r}: no training step <= {max_step} both committed and logged under "
                       f"{workdir_root}; committed steps start {sorted(records['train'])[:3]}")
    found = []
    for kind in ("train", "eval"):
      logged = getattr(measured, kind)
      for step, values in records[kind].items():
        if step <= max_step:
          here = flat_values(logged.get(step, {}))
          found += [(name, kind, step, key, value, here.get(key)) for key, value in values.items()]
    found += _final_values(name, summary_rows.get(name), committed_result, workdir, measured, max_step)
    found.sort(key=lambda f: (f[2], KIND_ORDER.index(f[1])))  # stable: a record's keys keep their order
    rows += [{"run": run, "kind": kind, "step": step, "key": key, "committed": value, "measured": here,
              **difference(value, here)} for run, kind, step, key, value, here in found]
  return rows


def _final_values(name: str, row: dict | None, committed_result: dict | None, workdir: str,
                  measured: metrics_lib.RunMetrics, max_step: int) -> list[tuple]:
  """(run, 'final', step, key, committed, measured) for the committed run's final evaluation, as summary.json
  ('final_eval_loss') and its committed result.json ('eval_loss') record it, once `max_step` reaches the step
  they were recorded at; ValueError when the run trained again did not finish there."""
  finals = []
  if row is not None and row.get("status") == "completed":
    finals.append(("final_eval_loss", row["steps"], row["final_eval_loss"]))
  if (committed_result or {}).get("status") == "completed" and committed_result.get("eval_loss") is not None:
    finals.append(("eval_loss", committed_result["step"], committed_result["eval_loss"]))
  finals = [final for final in finals if final[1] <= max_step]
  if not finals:
    return []
  last = max(step for _, step, _ in finals)
  result = read_result(workdir) or {}
  if result.get("status") != "completed" or result.get("step") != last:
    raise ValueError(f"run {name!r}: comparing up to step {max_step} includes its final evaluation at step {last}, "
                     f"but its {RESULT_FILE} in {workdir} says {result.get('status')!r} at step "
                     f"{result.get('step')}: let it finish (experiments/check_numerics.sh with STEPS full)")
  evals = measured.series("cross_entropy", kind="eval")
  here = {"final_eval_loss": evals[max(evals)] if evals else None, "eval_loss": result.get("eval_loss")}
  return [(name, "final", step, key, value, here[key]) for key, step, value in finals]


def difference_statistics(rows: list[dict]) -> dict[str, Any]:
  """What a comparison measured: how many values, how many bitwise equal, how many not measured; the last step
  up to which every value (of every run) was equal and the first step with a difference (with its first row);
  the largest absolute and relative differences with their rows (None where nothing differs)."""
  differing = [row for row in rows if not row["equal"]]
  first = min(differing, key=lambda row: row["step"], default=None)  # the first row of the earliest step
  steps = sorted({row["step"] for row in rows})
  through = [step for step in steps if first is None or step < first["step"]]
  sized = [row for row in differing if row["abs_diff"] is not None]
  relative = [row for row in sized if row["rel_diff"] is not None]
  return {
      "values": len(rows), "bitwise_equal": len(rows) - len(differing),
      "not_measured": sum(row["measured"] is None for row in rows),
      "last_step": steps[-1] if steps else None, "equal_through_step": through[-1] if through else None,
      "first_differing_step": first["step"] if first else None, "first_difference": first,
      "largest_abs_difference": max(sized, key=lambda row: row["abs_diff"], default=None),
      "largest_rel_difference": max(relative, key=lambda row: row["rel_diff"], default=None),
  }


def per_step(rows: list[dict]) -> list[dict[str, Any]]:
  """One entry per (run, step): values compared, bitwise equal, the largest absolute and relative differences
  and the key of the largest absolute one: how a difference, once it appears, grows over training."""
  entries: dict[tuple[str, int], dict[str, Any]] = {}
  for row in rows:
    entry = entries.setdefault((row["run"], row["step"]), {"run": row["run"], "step": row["step"], "values": 0,
                                                           "bitwise_equal": 0, "max_abs_diff": 0.0,
                                                           "max_abs_key": None, "max_rel_diff": 0.0})
    entry["values"] += 1
    entry["bitwise_equal"] += row["equal"]
    if row["abs_diff"] is not None and row["abs_diff"] > entry["max_abs_diff"]:
      entry["max_abs_diff"], entry["max_abs_key"] = row["abs_diff"], row["key"]
    if row["rel_diff"] is not None:
      entry["max_rel_diff"] = max(entry["max_rel_diff"], row["rel_diff"])
  return list(entries.values())


def numerics_check(rows: list[dict], runs: tuple[str, ...]) -> dict[str, Any]:
  """The measured part of a check file: `all_equal`, `difference_statistics` over all rows and per run, the
  final evaluation's rows and statistics apart (empty when the comparison stopped before the last step), and
  `per_step`. The rows themselves go to a file of their own (`numerics_check_paths`): a whole run has 10^4-10^5."""
  final = [row for row in rows if row["kind"] == "final"]
  return {"all_equal": all(row["equal"] for row in rows), "statistics": difference_statistics(rows),
          "per_run": {name: difference_statistics([row for row in rows if row["run"] == name]) for name in runs},
          "final_evaluation": {"rows": final, "statistics": difference_statistics(final)},
          "per_step": per_step(rows)}


def numerics_check_lines(check: dict[str, Any]) -> list[str]:
  """A short report of `numerics_check`: counts, where equality ends, the largest differences, the final
  evaluation."""

  def where(row: dict) -> str:
    return (f"{row['run']} step {row['step']} {row['kind']} {row['key']}: committed {row['committed']!r}, "
            f"here {row['measured']!r}")

  def size(row: dict) -> str:
    return "not measured" if row["abs_diff"] is None else f"abs {row['abs_diff']:.3g}, rel " + (
        "-" if row["rel_diff"] is None else f"{row['rel_diff']:.3g}")

  stats = check["statistics"]
  lines = [f"{stats['bitwise_equal']} of {stats['values']} values bitwise equal ({stats['not_measured']} not "
           f"measured), steps up to {stats['last_step']}; equal through step {stats['equal_through_step']}"]
  if stats["first_difference"]:
    first = stats["first_difference"]
    lines.append(f"first difference at step {first['step']}: {where(first)} ({size(first)})")
  for label in ("abs", "rel"):
    row = stats[f"largest_{label}_difference"]
    if row:
      lines.append(f"largest {label} difference: {size(row)} at {where(row)}")
  for row in check["final_evaluation"]["rows"]:
    lines.append(f"final evaluation {where(row)} ({'bitwise equal' if row['equal'] else size(row)})")
  return lines


def numerics_check_paths(results_root: str, sweep_name: str, steps: int, name: str = "") -> tuple[str, str]:
  """(report, rows): results/<sweep>/<name>.json and <name>.rows.jsonl (one compared value a line), by default
  name = numerics_check_<steps>: a check never overwrites one of other steps, nor the committed
  numerics_check.json. `name` (e.g. for a second machine) is a plain file name."""
  name = name or f"{NUMERICS_CHECK}_{steps}"
  if name.startswith(".") or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
    raise ValueError(f"--check_name={name!r}: a file name of letters, digits, '-', '_' and '.' (no folder)")
  if name == NUMERICS_CHECK:
    raise ValueError(f"--check_name={name!r} is the committed 11-step check of 2026-12-04: choose another name")
  base = os.path.join(results_root, sweep_name, name)
  return f"{base}.json", f"{base}.rows.jsonl"


def machine_record() -> dict[str, Any]:
  """Where a check ran: the CPU model, its core count and the cores this process may use, with
  `environment.describe()` (Python, platform, every installed package's version)."""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    cpu = platform.processor() or platform.machine()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "cores_allowed": cores, **environment.describe()}


def check_json_text(check: dict[str, Any]) -> str:
  """The check file's JSON: indented, except one line per entry of `per_step` (a whole run has hundreds)."""
  header = json.dumps({key: value for key, value in check.items() if key != "per_step"}, indent=1)
  entries = ",\n".join(f"  {json.dumps(entry)}" for entry in check.get("per_step", []))
  return f"{header[:-2]},\n \"per_step\": [\n{entries}\n ]\n}}\n"


def rows_jsonl_text(rows: list[dict]) -> str:
  return "".join(json.dumps(row) + "\n" for row in rows)


def _run(sweep: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  for run in sweep.runs:
    if run.name == name:
      return run
  raise ValueError(f"run {name!r} is not in sweep {sweep.name}: {[run.name for run in sweep.runs]}")


def _median_tokens_per_s(train: dict[int, dict]) -> float | None:
  """Median training throughput over the logged steps (None for metrics written without it)."""
  rates = [record["tokens_per_s"] for record in train.values() if "tokens_per_s" in record]
  return float(np.median(rates)) if rates else None


def _add_steps_to_dense(rows: list[dict], curves: dict) -> None:
  """Steps and tokens each run needs to reach the final eval loss of the dense run with the same seed (the
  mean over dense runs when that seed has none; None: never reached, or no dense run in the sweep).

  Pairing by seed compares runs that saw the same data order and, in results made before the evaluation set
  was fixed, the same evaluation documents.
  """
  dense = {row["seed"]: row["final_eval_loss"] for row in rows if row["num_experts"] == 0}
  fallback = float(np.mean(list(dense.values()))) if dense else None
  for row in rows:
    target = dense.get(row["seed"], fallback)
    steps = steps_to_reach(dict(curves[row["run"]]["eval"]), target) if target is not None else None
    row["dense_final_eval_loss"] = target
    row["steps_to_dense_loss"] = steps
    row["tokens_to_dense_loss"] = steps * row["tokens_per_step"] if steps is not None else None
    row["speedup_to_dense_loss"] = row["steps"] / steps if steps else None


def _vocab_size(config: ml_collections.ConfigDict) -> int:
  from moe_jax import data as data_lib

  return data_lib.get_tokenizer(config.data).vocab_size
