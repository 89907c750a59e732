#!/usr/bin/env bash
# Run runs of a study sweep from the pinned model code, as results/PROTOCOL.md prescribes.
#
#   experiments/study.sh configs/sweeps/confirm.py[:ARG] CORE RUN[,RUN...] [WORKDIR_ROOT]
#
# Builds (once) a tree from `git archive` of the sweep's PINNED_COMMIT (configs/sweeps/confirm.py names one; a
# sweep without one, e.g. the ablations, runs the code of this commit) with this checkout's sweep config copied
# in, the only file that may differ (with this commit's results/); runs the named runs there in sequence, niced
# and pinned to one CPU core (XLA then uses one intra-op thread, so two runs share a 2-core machine and each is
# bitwise reproducible on one core). Every result.json records $MOE_JAX_COMMIT =
# "<PINNED_COMMIT>+<sweep file>@<this commit>". Interrupted runs resume from their last checkpoint when the
# same command is run again. Afterwards, aggregate into results/ with this checkout:
#   python experiments/sweep.py --sweep=<sweep file> --workdir_root=WORKDIR_ROOT --aggregate_only
set -euo pipefail
cd "$(dirname "$0")/.."
sweep=$1 core=$2 runs=$3 workdir_root=${4:-$HOME/moe_jax_study}
python=${PYTHON:-$PWD/.venv/bin/python}
sweep_file=${sweep%%:*}  # the file; ":ARG" (e.g. confirm.py:replication) goes to its get_config
here=$(git rev-parse HEAD)
module=$(echo "${sweep_file%.py}" | tr / .)
pinned=$(PYTHONPATH=. "$python" -c "import importlib; print(getattr(importlib.import_module('$module'), 'PINNED_COMMIT', '$here'))")
if ! git diff --quiet HEAD -- "$sweep_file"; then
  echo "$sweep_file has uncommitted changes: commit it first, so that the runs record the sweep they ran" >&2
  exit 2
fi
tree=$workdir_root/code/$pinned+$(basename "$sweep_file")@$here
if [ ! -d "$tree" ]; then  # built aside, then renamed: two runs started at once never see half a tree
  mkdir -p "$workdir_root/code"
  staging=$(mktemp -d "$tree.XXXXXX")
  git archive "$pinned" | tar -x -C "$staging"
  # This commit's results/: a sweep may list later runs from the committed results of earlier ones
  # (configs/sweeps/expert_scaling.py: D2 from D1). Results are data; no model code reads them.
  git archive "$here" results | tar -x -C "$staging"
  cp "$sweep_file" "$staging/$sweep_file"
  mv -T "$staging" "$tree" 2>/dev/null || rm -rf "$staging"  # another run built it first
fi
cd "$tree"
if git rev-parse --git-dir >/dev/null 2>&1; then  # the runner would record that repository's commit instead
  echo "WORKDIR_ROOT=$workdir_root lies inside a git checkout: choose a folder outside any repository" >&2
  exit 2
fi
export MOE_JAX_COMMIT="$pinned+$sweep_file@$here" PYTHONPATH=.
# A sweep that records its evaluation set (check_eval_sets, e.g. expert_scaling.py) refuses, before any training,
# runs whose set as the pinned code builds it from this machine's corpus has another fingerprint.
taskset -c "$core" nice -n 19 "$python" - "$module" "$sweep" "$runs" <<'PY' || exit 2
import importlib, sys
check = getattr(importlib.import_module(sys.argv[1]), "check_eval_sets", None)
try:
  check and check(sys.argv[2], sys.argv[3].split(","))
except ValueError as error:
  sys.exit(f"study refused: {error}")
PY
exec taskset -c "$core" nice -n 19 "$python" experiments/sweep.py --sweep="$sweep" \
  --workdir_root="$workdir_root" --results_root="$workdir_root/results-core$core" --only="$runs"
