#!/usr/bin/env bash
# The GPU benchmark in one command (see benchmarks/gpu.py): writes benchmarks/results/gpu.json.
# Needs jax[cuda], flax, optax; run from anywhere: bash benchmarks/gpu.sh [--tiny] [--output PATH]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" "${repo}/benchmarks/gpu.py" "$@"
