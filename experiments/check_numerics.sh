#!/usr/bin/env bash
# Does this machine (or this checkout's pinned tree) compute what a committed study run computed? Trains the
# named runs again exactly as experiments/study.sh runs them (pinned code, one core) and compares every
# committed value with the value computed here:
#
#   experiments/check_numerics.sh configs/sweeps/confirm.py[:ARG] CORE RUN[,RUN...] STEPS|full [SWEEP.PY FLAGS]
#
# STEPS (below a run's last step): the runs go to their first STEPS steps and are stopped by SIGTERM (a clean
# checkpoint) once step STEPS is logged; every committed training record up to STEPS is compared, and any
# difference exits 1 (use it before continuing a study on another machine, or after a refactor that might change
# a pinned run). `full` (or STEPS = the runs' last step): the runs train to their end, never stopped, and every
# committed record is compared: training, evaluation, and the final evaluation as summary.json (and result.json
# where committed) records it. Then a difference exits 0, since across machines low-bit differences after some
# steps are expected and their size is the measurement (experiments/sweep.py --tolerate_differences); a committed
# value the run did not log exits 1, a run that fails 2.
# experiments/sweep.py --compare_steps writes each value's absolute and relative difference, where bitwise
# equality ends, the largest differences, per step the largest difference, the machine and every installed
# package's version to results/<sweep>/numerics_check_<steps>.json, and every compared value to
# numerics_check_<steps>.rows.jsonl (a trailing --check_name=NAME names them NAME.json, NAME.rows.jsonl). The
# runs go to a temporary WORKDIR_ROOT, never the study's.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=$1 core=$2 runs=$3 steps=$4
shift 4
python=${PYTHON:-$PWD/.venv/bin/python}
if ! [[ $steps =~ ^(full|[1-9][0-9]*)$ ]]; then
  echo "STEPS=$steps: a step number >= 1, or full" >&2; exit 2
fi
num_steps() {  # the run's train.num_steps, as this checkout's sweep config builds it
  PYTHONPATH=. "$python" - "$sweep" "$1" <<'PY'
import importlib, sys
from configs.sweeps import common
path, _, arg = sys.argv[1].partition(":")
sweep = importlib.import_module(path.removesuffix(".py").replace("/", ".")).get_config(*([arg] if arg else []))
found = [common.build_config(run).train.num_steps for run in sweep.runs if run.name == sys.argv[2]]
if not found:
  sys.exit(f"run {sys.argv[2]} is not in {sys.argv[1]}")
print(found[0])
PY
}
root=$(mktemp -d /tmp/moe_jax_check.XXXXXX)
compare_steps=0 whole=yes
for run in ${runs//,/ }; do
  last=$(num_steps "$run") || exit 2
  stop=$steps
  [ "$steps" = full ] && stop=$last
  if [ "$stop" -gt "$last" ]; then
    echo "STEPS=$steps: run $run has $last steps" >&2; exit 2
  fi
  compare_steps=$(( stop > compare_steps ? stop : compare_steps ))
  experiments/study.sh "$sweep" "$core" "$run" "$root" > "$root/$run.log" 2>&1 &
  pid=$!
  if [ "$stop" -eq "$last" ]; then  # the whole run: never stopped, so its final evaluation is the study's
    if ! wait "$pid"; then
      echo "$run failed:" >&2; tail -n 20 "$root/$run.log" >&2; exit 2
    fi
    continue
  fi
  whole=no
  # One process logs every step, records start {"step": s, "kind": ...}; a run that dies first ends the check.
  until grep -qs "\"step\": $stop, \"kind\": \"train\"" "$root"/*/"$run"/metrics.jsonl; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$run stopped before step $stop:" >&2; tail -n 20 "$root/$run.log" >&2; exit 2
    fi
    sleep 2
  done
  kill -TERM "$pid"
  wait "$pid" || true
done
echo "work files in $root"
tolerate=()
[ "$whole" = yes ] && tolerate=(--tolerate_differences)
exec "$python" experiments/sweep.py --sweep="$sweep" --workdir_root="$root" --only="$runs" \
  --compare_steps="$compare_steps" "${tolerate[@]}" "$@"
