"""Run a sweep locally in sequence (skipping finished runs), or print one command per run for a scheduler.

  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu
  python experiments/sweep.py --sweep=configs/sweeps/ablations.py:gpu --print_commands
  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu --aggregate_only

Results go to <results_root>/<sweep>/{summary.json, summary.csv, curves.json} when the sweep ends (or at once
with --aggregate_only, from the runs finished so far). Each run's result.json and summary row record the git
commit of the code that trained it ("+dirty" when the checkout had uncommitted changes; $MOE_JAX_COMMIT names
it for a copy without .git, e.g. `git archive` of a commit), and the summary its median tokens/s.

--compare_steps=N answers "does this machine, or this commit, compute what the committed runs computed?": it
compares every committed value of the --only runs up to step N (training records, evaluations and, once N is a
run's last step, its final evaluation) with the same value under --workdir_root, and writes each difference as
measured (absolute, relative), where bitwise equality ends, the largest differences, the final evaluation's
difference, per step the largest difference, the machine and every installed package's version to
<results_root>/<sweep>/numerics_check_N.json, and every compared value to numerics_check_N.rows.jsonl
(--check_name names them otherwise). Exit status 1 on any difference. With --tolerate_differences, only on a
committed value the run did not log: for a check whose differences are the measurement (check_numerics.sh passes
it for whole runs, where low-bit differences across machines are expected after some steps and their size is
what is reported). experiments/check_numerics.sh trains the runs for it.

Faults end in one line on stderr: exit status 2 for bad input (a run refused for its config is reported as it
happens, the other runs go on, and the sweep exits 2 at the end), 1 when the machine failed (a full disk).
"""

import os
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
    "compare_steps", 0, "Compare the --only runs under --workdir_root up to this step with the committed results "
    "(their final evaluation too when it is their last step).", lower_bound=0)
_CHECK_NAME = flags.DEFINE_string(
    "check_name", "", "File name (without .json) of the --compare_steps report; default numerics_check_<steps>.")
_TOLERATE = flags.DEFINE_bool(
    "tolerate_differences", False, "--compare_steps: exit 0 when values differ (the differences are the "
    "measurement, e.g. a whole run on another machine), 1 only when a committed value was not logged; without it "
    "any difference exits 1.")
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
  """--compare_steps: write every compared value and what the comparison measured; print a short report; exit 1
  on a difference (with --tolerate_differences: only on a value not measured)."""
  if not _ONLY.value:
    raise app.UsageError("--compare_steps needs --only=RUN[,RUN...]")
  runs = tuple(_ONLY.value)
  out, rows_out = sweep_lib.numerics_check_paths(_RESULTS_ROOT.value, sweep.name, _COMPARE_STEPS.value,
                                                 _CHECK_NAME.value)
  rows = sweep_lib.compare_with_committed(sweep, runs, _WORKDIR_ROOT.value, _RESULTS_ROOT.value,
                                          _COMPARE_STEPS.value)
  trained_by = {}
  for name in runs:  # the code that trained the check runs (e.g. the pinned tree of study.sh), not this one
    result = sweep_lib.read_result(os.path.join(_WORKDIR_ROOT.value, sweep.name, name))
    if result is not None:
      trained_by[name] = result.get("commit")
  measured = sweep_lib.numerics_check(rows, runs)
  check = {"sweep": sweep.name, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "compare_steps": _COMPARE_STEPS.value, "runs": list(runs), "trained_by": trained_by,
           "machine": sweep_lib.machine_record(), "rows_file": os.path.basename(rows_out), **measured}
  fileio.write_text(rows_out, sweep_lib.rows_jsonl_text(rows))
  fileio.write_text(out, sweep_lib.check_json_text(check))
  if len(rows) <= 50:  # a short check: every value; a long one: the report below, every row in the file
    for row in rows:
      print(f"  {row['run']:<16} step {row['step']:>4} {row['kind']:<5} {row['key']:<14} "
            f"committed {row['committed']!r:<20} here {row['measured']!r:<20} "
            f"{'equal' if row['equal'] else 'DIFFERENT'}")
  print("\n".join(f"{sweep.name}: {line}" for line in sweep_lib.numerics_check_lines(measured)))
  print(f"-> {out}, {rows_out}")
  if measured["statistics"]["not_measured"] or (not measured["all_equal"] and not _TOLERATE.value):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
