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


@pytest.mark.slow  # compiles six cpu-size training steps: ~2-3 min on 2 cores
def test_train_step_benchmark_reports_every_variant_and_loop_against_the_last(tmp_path):
  output = tmp_path / "train_step.json"
  _benchmark().main(["--d_model", "16", "--num_layers", "2", "--d_ff", "32", "--batch_size", "4", "--seq_len", "16",
                     "--num_experts", "4", "--variants", "switch-cpu,switch-cpu@16,dense-cpu",
                     "--loops", "per_step_sync,async", "--blocks", "2", "--steps_per_block", "2",
                     "--data_dir", str(tmp_path / "tfds"), "--output", str(output)])
  report = json.loads(output.read_text())
  assert set(report["platform"]) >= {"jax", "flax", "backend", "cpu_count", "machine", "peak_matmul_flops_per_s"}
  assert report["peaks"]["matmul_gflops"] * 1e9 == report["platform"]["peak_matmul_flops_per_s"]
  for variant in ("switch-cpu", "switch-cpu@16", "dense-cpu"):
    result = report["variants"][variant]
    assert result["xla_flops_per_step"] > 0
    for loop in ("per_step_sync", "async"):
      stats = result["loops"][loop]
      assert stats["min_s"] <= stats["median_s"] <= stats["max_s"] and len(stats["step_times_s"]) == 2
      assert stats["tokens_per_s"] > 0 and stats["mfu"] > 0
  switch, many = report["variants"]["switch-cpu"], report["variants"]["switch-cpu@16"]
  assert (switch["num_experts"], many["num_experts"]) == (4, 16)
  # E experts of the same width, top-1: the same FLOPs per token up to the router's d_model * E columns.
  assert many["analytic_train_flops_per_step"] == pytest.approx(switch["analytic_train_flops_per_step"], rel=0.01)
  assert many["active_params"] - switch["active_params"] == 16 * (16 - 4)  # the router of the one MoE block
  assert many["params"] > switch["params"]
  assert set(report["ratios"]) == {"switch-cpu/dense-cpu", "switch-cpu@16/dense-cpu", "per_step_sync/async"}
  assert set(report["ratios"]["switch-cpu/dense-cpu"]) == {"per_step_sync", "async"}
