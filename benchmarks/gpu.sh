#!/usr/bin/env bash
# The GPU benchmarks in one command, each writing its JSON into --results (default benchmarks/results):
#   1. gpu_hlo_check.json  benchmarks/hlo_check.py --require_native: does the dropless path that 'auto' resolves to
#                          compile to a grouped matmul, or to a dense dot over all experts? (tokamax's and XLA's)
#   2. gpu.json            benchmarks/gpu.py: bf16 MoE layer ratios per backend, training step dense / Switch E=8 /
#                          MoE E=64 at the same active FLOPs, tokens/s and MFU against the measured matmul peak
#   3. gpu_decode.json     benchmarks/decode.py: MoE decode step against its dense twins per batch
# Every part runs even when an earlier one failed; the exit status is 1 if any failed (the lowering check included).
#
#   bash benchmarks/gpu.sh [--tiny] [--results DIR]     # --tiny: toy sizes, on CPU in a few minutes
#
# Needs jax (with its CUDA plugin on a GPU), flax, optax. Packages the machine lacks travel as wheels in ./.whl at the
# repository root and are installed from there, offline, first (benchmarks/README.md, "GPU": which wheels, and how
# to fetch them): tokamax and its needs (dispatch='tokamax'; without them 'auto' takes XLA's ragged_dot), and
# ml-collections, grain, tensorflow-datasets and their needs for decode.py (whose imports reach moe_jax.data).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
tiny=0
results="${repo}/benchmarks/results"
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --results) results="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--tiny] [--results DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "${results}"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
export PYTHONUNBUFFERED=1
if compgen -G "${repo}/.whl/*.whl" >/dev/null; then
  site="$(mktemp -d)"
  "${python}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "${site}" "${repo}"/.whl/*.whl \
    && export PYTHONPATH="${PYTHONPATH}:${site}"  # after the repo, and after nothing the machine has: only adds
fi

if [ "${tiny}" = 1 ]; then
  hlo_args=(--tokens 64 --d_model 16 --d_ff 32 --experts 4 --dtype float32)
  gpu_args=(--tiny)
  decode_args=(--d_model 16 --num_heads 2 --presets toy:4:2:16 --batches 1,4 --num_layers 1 --vocab 32 --context 8
               --repeats 1 --peak_mib 8)
else
  hlo_args=()
  gpu_args=()
  decode_args=(--peak_mib 1024)
fi

status=0
run() {
  local name="$1"; shift
  echo "== ${name}: $*"
  local start=${SECONDS}
  "${python}" "$@"
  local code=$?
  echo "== ${name}: exit ${code} after $((SECONDS - start)) s"
  [ "${code}" = 0 ] || status=1
}
run hlo_check "${repo}/benchmarks/hlo_check.py" --require_native "${hlo_args[@]}" --output "${results}/gpu_hlo_check.json"
run layer_and_train_step "${repo}/benchmarks/gpu.py" "${gpu_args[@]}" --output "${results}/gpu.json"
run decode "${repo}/benchmarks/decode.py" "${decode_args[@]}" --output "${results}/gpu_decode.json"
exit "${status}"
