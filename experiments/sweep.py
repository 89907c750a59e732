"""Run a sweep locally in sequence (skipping finished runs), or print one command per run for a scheduler.

  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu
  python experiments/sweep.py --sweep=configs/sweeps/ablations.py:gpu --print_commands
  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu --aggregate_only

Results go to <results_root>/<sweep>/{summary.json, summary.csv, curves.json} when the sweep ends (or at once
with --aggregate_only, from the runs finished so far). Each run's result.json and summary row record the git
commit of the code that trained it ("+dirty" when the checkout had uncommitted changes; $MOE_JAX_COMMIT names
it for a copy without .git, e.g. `git archive` of a commit), and the summary its median tokens/s.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs.sweeps import common  # noqa: E402
from moe_jax import sweep as sweep_lib  # noqa: E402

_SWEEP = config_flags.DEFINE_config_file("sweep", None, "Sweep config, e.g. configs/sweeps/scaling.py:cpu.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "workdirs", "Run directories: <root>/<sweep>/<run>.")
_RESULTS_ROOT = flags.DEFINE_string("results_root", "results", "Summaries: <root>/<sweep>/.")
_ONLY = flags.DEFINE_list("only", [], "Run only these runs (names from the sweep config).")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one command per run instead of running.")
_AGGREGATE_ONLY = flags.DEFINE_bool("aggregate_only", False, "Only rebuild the summaries from the workdirs.")
flags.mark_flag_as_required("sweep")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every step at INFO; keep the progress readable
    logging.set_verbosity(logging.WARNING)
  sweep = _SWEEP.value
  if _PRINT.value:
    sweep_arg = config_flags.get_config_filename(flags.FLAGS["sweep"])
    print("\n".join(sweep_lib.commands(sweep, sweep_arg, _WORKDIR_ROOT.value, _RESULTS_ROOT.value)))
    return
  if not _AGGREGATE_ONLY.value:
    sweep_lib.run_sweep(sweep, common.build_config, _WORKDIR_ROOT.value, only=tuple(_ONLY.value))
  rows = sweep_lib.aggregate(sweep, common.build_config, _WORKDIR_ROOT.value, _RESULTS_ROOT.value)
  print(f"\n{sweep.name}: {len(rows)} finished runs -> {os.path.join(_RESULTS_ROOT.value, sweep.name)}")
  for row in sorted(rows, key=lambda r: (r["num_experts"], r["run"])):
    to_dense = f"{row['steps_to_dense_loss']:.0f}" if row["steps_to_dense_loss"] else "-"
    print(f"  {row['run']:<22} eval {row['final_eval_loss']:.4f}  steps to dense loss {to_dense:>6}  "
          f"{row['wall_time_s']:.0f} s  {row['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
  app.run(main)
