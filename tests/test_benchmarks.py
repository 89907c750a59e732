"""The benchmarks run end to end at toy sizes and write the JSON they document. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cpu_env


def run_script(args: list[str], tmp_path) -> dict:
  output = tmp_path / "result.json"
  env = dict(cpu_env(1), PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  subprocess.run([sys.executable, *args, "--output", str(output)], check=True, env=env, cwd=tmp_path,
                 stdout=subprocess.DEVNULL, timeout=600)
  return json.loads(output.read_text())


@pytest.mark.slow  # the benchmark script end to end in a subprocess: ~20 s on a core
def test_layer_benchmark_records_every_variant_with_times_cost_and_bound(tmp_path):
  result = run_script([os.path.join(REPO, "benchmarks", "moe_layer.py"), "--tokens", "128", "--d_model", "16",
                       "--d_ff", "32", "--group_size", "64", "--experts", "4", "--repeats", "2",
                       "--sharded_experts", ""], tmp_path)
  assert result["machine"]["versions"]["jax"] and result["peaks"]["matmul_gflops"] > 0
  (row,) = result["single_device"]
  assert set(row["variants"]) == {"dense", "einsum", "gather", "dropless", "ragged_dot"}
  for name, variant in row["variants"].items():
    assert variant["seconds"]["min"] <= variant["seconds"]["median"] <= variant["seconds"]["max"], name
    assert variant["xla"]["gflop"] > 0 and variant["work"]["gbytes"] > 0, name
    assert variant["bound_seconds"]["overlap"] <= variant["bound_seconds"]["serial"], name
  assert row["variants"]["dense"]["ratio_vs_dense"] == {"median": 1.0, "min": 1.0}


@pytest.mark.slow  # compiles three small training steps: about a minute on two cores
def test_gpu_benchmark_runs_tiny_on_cpu_without_the_training_stack(tmp_path):
  result = run_script([os.path.join(REPO, "benchmarks", "gpu.py"), "--tiny"], tmp_path)
  assert result["forbidden_modules_imported"] == []
  assert {"dense", "switch_gather", "switch_dropless"} == set(result["train_step"]["variants"])
  assert result["grouped_matmul_lowering"]["dense_fallback"]  # ragged_dot on CPU is a masked dense dot
  assert [row["experts"] for row in result["layer"]["rows"]] == [8]


def test_the_readme_decode_reading_is_the_one_generated_from_the_committed_json():
  """benchmarks/README.md's decode reading is `reading(decode.json)` verbatim: regenerated with the JSON
  (`python benchmarks/decode.py --report_only`), never edited by hand."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import decode as decode_benchmark  # benchmarks/decode.py (this path first; moe_jax.decode is not `decode`)
  finally:
    sys.path.pop(0)
  result = json.loads(open(decode_benchmark.DEFAULT_OUTPUT).read())
  readme = open(decode_benchmark.README).read()
  assert f"{decode_benchmark.README_BEGIN}\n{decode_benchmark.reading(result)}{decode_benchmark.README_END}" in readme


def test_roofline_bandwidth_is_read_on_a_reused_buffer_and_beats_the_fresh_buffer_figure():
  """Issue 34: the roofline's bandwidth must not be the cost of first-touching fresh pages. The in-place pass
  keeps its buffer (donation), and in the same run it moves bytes faster than the pass that writes a new buffer
  each call (measured 10x apart on 2 cores, loaded or not); no absolute figure is asserted."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    import harness
  finally:
    sys.path.pop(0)
  peaks = harness.measure_peaks(matmul_size=64, copy_mib=64, repeats=3)
  assert peaks["memory_gbps"] > peaks["fresh_buffer_gbps"] > 0
  assert peaks["memory_read_gbps"] > peaks["fresh_buffer_gbps"]


@pytest.mark.slow  # the benchmark script end to end in a subprocess: ~30 s on a core
def test_decode_benchmark_records_the_moe_and_its_dense_twins_per_batch(tmp_path):
  """Issue 32 item 6 at toy size: every batch has the three models' times, bytes and memory, the twins have the
  MoE's active and total parameters (the router aside), and the gather path is taken exactly where the rule says."""
  result = run_script([os.path.join(REPO, "benchmarks", "decode.py"), "--d_model", "16", "--num_heads", "2",
                       "--presets", "toy:4:2:16", "--batches", "1,4", "--num_layers", "1", "--vocab", "32",
                       "--context", "8", "--repeats", "1", "--peak_mib", "8", "--first_token_new_tokens", "4",
                       "--first_token_repeats", "1"], tmp_path)
  assert result["peaks"]["memory_gbps"] > 0
  first = result["first_token"]  # `make run`'s model: prefill + first token, then all 4
  assert first["new_tokens"] == 4 and 0 < first["seconds"]["min"] <= first["all_tokens_seconds"]["min"]
  assert (tmp_path / "result.png").stat().st_size > 0  # the figure beside the JSON; the README is left alone
  (preset,) = result["presets"]
  params = preset["params"]
  router = 16 * 4  # M * E
  assert params["moe"]["active"] - router == params["dense_active"]["total"]
  assert params["moe"]["total"] - router == params["dense_total"]["total"]
  assert [row["batch"] for row in preset["rows"]] == [1, 4]
  for row in preset["rows"]:
    assert set(row["models"]) == {"moe", "dense_active", "dense_total"}
    assert all(1 <= d <= 4 for d in row["distinct_experts_per_layer"])
    assert row["expected_distinct_experts"] == pytest.approx(4 * (1 - (1 - 2 / 4) ** row["batch"]))
    moe = row["models"]["moe"]
    assert moe["weight_bytes"]["expert_gather"] == (row["batch"] == 1)  # B * K <= E only at B = 1
    assert moe["weight_bytes"]["ideal"] <= moe["weight_bytes"]["read"]
    for name, model in row["models"].items():
      assert model["seconds"]["min"] > 0 and model["tokens_per_second"] > 0 and model["bandwidth_fraction"] > 0
      assert model["memory_held"]["kv_cache"] >= model["model_stats"]["kv_cache"] > 0, name
      assert model["memory_held"]["weights"] == pytest.approx(model["model_stats"]["weights"], rel=0.01), name
