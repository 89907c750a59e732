"""Run a sweep locally in sequence (skipping finished runs), or print one command per run for a scheduler.

  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu
  python experiments/sweep.py --sweep=configs/sweeps/ablations.py:gpu --print_commands
  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu --aggregate_only

Results go to <results_root>/<sweep>/{summary.json, summary.csv, curves.json} when the sweep ends (or at once
with --aggregate_only, from the runs finished so far). Each run's result.json and summary row record the git
commit of the code that trained it ("+dirty" when the checkout had uncommitted changes; $MOE_JAX_COMMIT names
it for a copy without .git, e.g. `git archive` of a commit), and the summary its median tokens/s.

--compare_steps=N answers "does this machine, or this commit, compute what the committed runs computed?": it
compares the --only runs' training records up to step N under --workdir_root with the committed curves,
bitwise, and writes <results_root>/<sweep>/numerics_check.json (exit status 1 on any difference).
experiments/check_numerics.sh trains the runs for it.

Faults end in one line on stderr: exit status 2 for bad input (a run refused for its config is reported as it
happens, the other runs go on, and the sweep exits 2 at the end), 1 when the machine failed (a full disk).
"""

import importlib.metadata
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.sweeps import common  # noqa: E402
from moe_jax import fileio  # noqa: E402
from moe_jax import sweep as sweep_lib  # noqa: E402
from moe_jax import workdir as workdir_lib  # noqa: E402

_SWEEP = config_flags.DEFINE_config_file("sweep", None, "Sweep config, e.g. configs/sweeps/scaling.py:cpu.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs", "Run directories: <root>/<sweep>/<run>.")
_RESULTS_ROOT = flags.DEFINE_string("results_root", "results", "Summaries: <root>/<sweep>/.")
_ONLY = flags.DEFINE_list("only", [], "Run only these runs (names from the sweep config).")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one command per run instead of running.")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Only rebuild the summaries from the workdirs.")
_COMPARE_STEPS = flags.DEFINE_integer(
    "compare_steps", 0, "Compare the --only runs under --workdir_root up to this step with the committed curves.",
    lower_bound=0)
flags.mark_flag_as_required("sweep")


def _fail(message: str, status: int) -> None:
  print(message, file=sys.stderr, flush=True)
  sys.exit(status)


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every step at INFO; keep the progress readable
    logging.set_verbosity(logging.WARNING)
    fileio.quiet_library_tracebacks()  # a full disk: orbax's threads log it once each, our line says what to do
  try:
    workdir_lib.check_path_given(_WORKDIR_ROOT.value, "--workdir_root")
    workdir_lib.check_path_given(_RESULTS_ROOT.value, "--results_root")
    run(_SWEEP.value)
  except fileio.EnvironmentFailure as error:
    _fail(str(error), 1)
  except (ValueError, FileNotFoundError) as error:
    _fail(f"sweep refused: {str(error).strip().splitlines()[0]}", 2)
  except OSError as error:  # e.g. results_root unwritable or full while aggregating
    _fail(f"sweep stopped: {error}", 1)


def run(sweep) -> None:
  if _PRINT.value:
    sweep_arg = config_flags.get_config_filename(flags.FLAGS["sweep"])
    print("\n".join(sweep_lib.commands(sweep, sweep_arg, _WORKDIR_ROOT.value, _RESULTS_ROOT.value)))
    return
  if _COMPARE_STEPS.value:
    return compare(sweep)
  refused = {}
  if not _AGGREGATE_ONLY.value:
    refused = sweep_lib.run_sweep(sweep, common.build_config, _WORKDIR_ROOT.value, only=tuple(_ONLY.value))
  rows = sweep_lib.aggregate(sweep, common.build_config, _WORKDIR_ROOT.value, _RESULTS_ROOT.value)
  print(f"\n{sweep.name}: {len(rows)} finished runs -> {os.path.join(_RESULTS_ROOT.value, sweep.name)}")
  for row in sorted(rows, key=lambda r: (r["num_experts"], r["run"])):
    to_dense = f"{row['steps_to_dense_loss']:.0f}" if row["steps_to_dense_loss"] else "-"
    rate = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] is not None else "?"
    print(f"  {row['run']:<22} eval {row['final_eval_loss']:.4f}  steps to dense loss {to_dense:>6}  "
          f"{row['wall_time_s']:.0f} s  {rate} tokens/s")
  if refused:
    raise ValueError(f"{len(refused)} run(s) refused: " + "; ".join(f"{name}: {why}" for name, why in refused.items()))


def compare(sweep) -> None:
  """--compare_steps: print and write the exact comparison with the committed curves; exit 1 on a difference."""
  if not _ONLY.value:
    raise app.UsageError("--compare_steps needs --only=RUN[,RUN...]")
  rows = sweep_lib.compare_with_committed(sweep, tuple(_ONLY.value), _WORKDIR_ROOT.value, _RESULTS_ROOT.value,
                                          _COMPARE_STEPS.value)
  for row in rows:
    print(f"  {row['run']:<16} step {row['step']:>4} {row['key']:<14} committed {row['committed']!r:<20} "
          f"here {row['measured']!r:<20} {'equal' if row['equal'] else 'DIFFERENT'}")
  trained_by = {}
  for name in _ONLY.value:  # the code that trained the check runs (e.g. the pinned tree of study.sh), not this one
    result = sweep_lib.read_result(os.path.join(_WORKDIR_ROOT.value, sweep.name, name))
    if result is not None:
      trained_by[name] = result.get("commit")
  check = {"sweep": sweep.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": _cpu_model(),
           "cpu_count": os.cpu_count(), "jax": importlib.metadata.version("jax"), "trained_by": trained_by,
           "all_equal": all(r["equal"] for r in rows), "rows": rows}
  out = os.path.join(_RESULTS_ROOT.value, sweep.name, "numerics_check.json")
  fileio.write_json(out, check, indent=1)
  print(f"{sum(r['equal'] for r in rows)} of {len(rows)} values equal -> {out}")
  if not check["all_equal"]:
    sys.exit(1)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


if __name__ == "__main__":
  app.run(main)
