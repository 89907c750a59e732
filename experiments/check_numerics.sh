#!/usr/bin/env bash
# Does this machine (or this checkout's pinned tree) compute what a committed study run computed? Trains the
# named runs again for their first STEPS steps, exactly as experiments/study.sh runs them (pinned code, one
# core), then compares every committed training record up to STEPS, bitwise:
#
#   experiments/check_numerics.sh configs/sweeps/confirm.py[:ARG] CORE RUN[,RUN...] STEPS
#
# Use it before continuing a study on another machine, or after a refactor that might change a pinned run.
# The runs go to a temporary WORKDIR_ROOT (never the study's) and are stopped by SIGTERM (a clean checkpoint)
# once step STEPS is logged. experiments/sweep.py --compare_steps writes the verdict and every compared value
# to results/<sweep>/numerics_check.json; the exit status is 1 when any value differs.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=$1 core=$2 runs=$3 steps=$4
python=${PYTHON:-$PWD/.venv/bin/python}
root=$(mktemp -d /tmp/moe_jax_check.XXXXXX)
for run in ${runs//,/ }; do
  experiments/study.sh "$sweep" "$core" "$run" "$root" > "$root/$run.log" 2>&1 &
  pid=$!
  # One process logs every step, records start {"step": s, "kind": ...}; a run that dies first ends the check.
  until grep -qs "\"step\": $steps, \"kind\": \"train\"" "$root"/*/"$run"/metrics.jsonl; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$run stopped before step $steps:" >&2; tail -n 20 "$root/$run.log" >&2; exit 2
    fi
    sleep 2
  done
  kill -TERM "$pid"
  wait "$pid" || true
done
echo "work files in $root"
exec "$python" experiments/sweep.py --sweep="$sweep" --workdir_root="$root" --only="$runs" --compare_steps="$steps"
