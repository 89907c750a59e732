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
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from moe_jax import config_lib, fileio, flops, resolve
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


def compare_with_committed(
    sweep: ml_collections.ConfigDict, runs: tuple[str, ...], workdir_root: str, results_root: str, max_step: int,
) -> list[dict]:
  """The training loss and cross-entropy of `runs` as trained again under `workdir_root`, step by step up to
  `max_step`, against the sweep's committed curves in `results_root`: one row per (run, step, key) with
  `equal` true only when the two float values are identical.

  Bitwise equality is the claim being checked: another machine, or a later refactor, computes exactly what a
  committed (pinned) run computed, so runs of one study split across machines or commits are one study.
  """
  _, committed = _committed(sweep, results_root)
  rows = []
  for name in runs:
    if name not in committed:
      raise ValueError(f"run {name!r} has no committed curves in {os.path.join(results_root, sweep.name)}")
    workdir = run_workdir(workdir_root, sweep, _run(sweep, name))
    if not os.path.exists(os.path.join(workdir, metrics_lib.METRICS_FILE)):
      raise ValueError(f"run {name!r} has no {metrics_lib.METRICS_FILE} in {workdir}: train it there first "
                       "(experiments/check_numerics.sh)")
    train = metrics_lib.read_metrics(workdir).train
    curve = committed[name]
    steps = [(i, step) for i, step in enumerate(curve["train_steps"]) if step <= max_step and step in train]
    if not steps:
      raise ValueError(f"run {name!r}: no training step <= {max_step} both committed and logged under "
                       f"{workdir_root}; committed steps start {curve['train_steps'][:3]}")
    for i, step in steps:
      for key, values in (("loss", curve["train_loss"]), ("cross_entropy", curve["cross_entropy"])):
        rows.append({"run": name, "step": step, "key": key, "committed": values[i], "measured": train[step][key],
                     "equal": values[i] == train[step][key]})
  return rows


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
