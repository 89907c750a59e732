"""benchmarks/train_step.py runs end to end at a tiny size and writes the report it documents (no timings checked)."""

import importlib.util
import json
import os

import pytest

from tests.helpers import REPO


def _benchmark():
  spec = importlib.util.spec_from_file_location("train_step_benchmark", os.path.join(REPO, "benchmarks", "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # compiles four cpu-size training steps: ~1-2 min on 2 cores
def test_train_step_benchmark_reports_both_loops_for_switch_and_dense(tmp_path):
  output = tmp_path / "train_step.json"
  _benchmark().main(["--d_model", "16", "--num_layers", "2", "--d_ff", "32", "--batch_size", "4", "--seq_len", "16",
                     "--num_experts", "4", "--blocks", "2", "--steps_per_block", "2",
                     "--data_dir", str(tmp_path / "tfds"), "--output", str(output)])
  report = json.loads(output.read_text())
  assert set(report["platform"]) >= {"jax", "flax", "backend", "cpu_count", "machine", "peak_matmul_flops_per_s"}
  for variant in ("switch-cpu", "dense-cpu"):
    result = report["variants"][variant]
    assert result["xla_flops_per_step"] > 0
    for loop in ("per_step_sync", "async"):
      stats = result["loops"][loop]
      assert stats["min_s"] <= stats["median_s"] <= stats["max_s"] and len(stats["step_times_s"]) == 2
      assert stats["tokens_per_s"] > 0
  assert set(report["ratios"]["switch-cpu/dense-cpu"]) == {"per_step_sync", "async"}
