"""The benchmarks run end to end at toy sizes and write the JSON they document (no timing is asserted); the HLO
checker of the GPU path and the profile's op categories on HLO snippets; the README generated from the JSON."""

import importlib
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from moe_jax import dispatch
from tests.helpers import REPO, cpu_env


def _benchmark_script(name: str):
  """A script of benchmarks/ imported as a module (that folder first on the path: benchmarks/decode.py, not
  moe_jax.decode)."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


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
  assert set(row["variants"]) == {"dense", "einsum", "gather", "dropless", "ragged_dot", *dispatch.installed_optional()}
  for name, variant in row["variants"].items():
    assert variant["seconds"]["min"] <= variant["seconds"]["median"] <= variant["seconds"]["max"], name
    assert variant["xla"]["gflop"] > 0 and variant["work"]["gbytes"] > 0, name
    assert variant["bound_seconds"]["overlap"] <= variant["bound_seconds"]["serial"], name
  assert row["variants"]["dense"]["ratio_vs_dense"] == {"median": 1.0, "min": 1.0}


@pytest.mark.slow  # the three GPU benchmarks at toy size in subprocesses: ~3 min on two cores
def test_gpu_script_runs_tiny_on_cpu_and_writes_every_json(tmp_path):
  """benchmarks/gpu.sh --tiny: the lowering check (on CPU 'auto' is the tiled backend, and ragged_dot a dense
  fallback), the layer and training step without the training stack, and the decode benchmark."""
  env = dict(cpu_env(1), PYTHON=sys.executable,
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), "--tiny", "--results", str(tmp_path)],
                 check=True, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, timeout=1200)
  check = json.loads((tmp_path / "gpu_hlo_check.json").read_text())
  assert check["auto"] == "dropless" and check["backends"]["ragged_dot"]["verdict"] == "dense_fallback"
  result = json.loads((tmp_path / "gpu.json").read_text())
  assert result["forbidden_modules_imported"] == []
  assert {"dense", "switch_gather", "switch_dropless", "moe64_dropless"} == set(result["train_step"]["variants"])
  variants = result["train_step"]["variants"]
  moe64, switch = variants["moe64_dropless"], variants["switch_dropless"]
  # the same active FLOPs: only the router (d_model x E, one MoE block at this size) grows
  assert moe64["active_params"] == switch["active_params"] + 16 * (64 - 8)
  assert [row["experts"] for row in result["layer"]["rows"]] == [8]
  decode = json.loads((tmp_path / "gpu_decode.json").read_text())
  assert [row["batch"] for row in decode["presets"][0]["rows"]] == [1, 4]


def test_the_readme_decode_reading_is_the_one_generated_from_the_committed_json():
  """benchmarks/README.md's decode reading is `reading(decode.json)` verbatim: regenerated with the JSON
  (`python benchmarks/decode.py --report_only`), never edited by hand."""
  decode_benchmark = _benchmark_script("decode")
  result = json.loads(open(decode_benchmark.DEFAULT_OUTPUT).read())
  readme = open(decode_benchmark.README).read()
  assert f"{decode_benchmark.README_BEGIN}\n{decode_benchmark.reading(result)}{decode_benchmark.README_END}" in readme


def test_roofline_bandwidth_is_read_on_a_reused_buffer_and_beats_the_fresh_buffer_figure():
  """Issue 34: the roofline's bandwidth must not be the cost of first-touching fresh pages. The in-place pass
  keeps its buffer (donation), and in the same run it moves bytes faster than the pass that writes a new buffer
  each call (measured 10x apart on 2 cores, loaded or not); no absolute figure is asserted."""
  harness = _benchmark_script("harness")
  peaks = harness.measure_peaks(matmul_size=64, copy_mib=64, repeats=3)
  assert peaks["memory_gbps"] > peaks["fresh_buffer_gbps"] > 0
  assert peaks["memory_read_gbps"] > peaks["fresh_buffer_gbps"]
  assert peaks["numpy_copy_gbps"] > peaks["fresh_buffer_gbps"]  # a copy into mapped pages: no first touches


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




# HLO text as XLA prints a compiled module (`compiled.as_text()`): a masked dense dot over E = 4 experts of K = 8
# (the lhs [16, E*K] as jax lowers ragged_dot on CPU), a native ragged-dot, a Pallas kernel, a cuBLAS GEMM over all
# experts, and dots inside while loops of known and unknown trip count. Useful FLOPs of the one product: 2*16*8*6.
USEFUL_GFLOP = 2 * 16 * 8 * 6 / 1e9
DENSE_CPU = """HloModule jit_f, entry_computation_layout={(f32[16,8]{1,0}, f32[4,8,6]{2,1,0})->f32[16,6]{1,0}}

%fused_computation (param_0: f32[16,32], param_1: f32[32,6]) -> f32[16,6] {
  %param_0 = f32[16,32]{1,0} parameter(0)
  %param_1 = f32[32,6]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,6]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.2 (x.1: f32[16,8], w.1: f32[4,8,6]) -> f32[16,6] {
  %masked = f32[16,32]{1,0} fusion(%x.1), kind=kLoop, calls=%masked_computation
  %bitcast = f32[32,6]{1,0} bitcast(%w.1)
  ROOT %ynn_fusion = f32[16,6]{1,0} fusion(%masked, %bitcast), kind=kCustom, calls=%fused_computation
}
"""
RAGGED = """ENTRY %main (x: bf16[16,8], w: bf16[4,8,6], sizes: s32[4]) -> bf16[16,6] {
  %x = bf16[16,8]{1,0} parameter(0)
  ROOT %ragged-dot.1 = bf16[16,6]{1,0} ragged-dot(%x, %w, %sizes), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""
KERNEL = """ENTRY %main (x: bf16[16,8], w: bf16[4,8,6], sizes: s32[4]) -> bf16[16,6] {
  ROOT %custom-call.3 = bf16[16,6]{1,0} custom-call(%x, %w, %sizes), custom_call_target="mosaic_gpu_v2", api_version=API_VERSION_TYPED_FFI
}
"""
CUBLAS = """ENTRY %main (x: bf16[16,32], w: bf16[32,6]) -> bf16[16,6] {
  %gemm = (bf16[16,6]{1,0}, s8[4194304]{0}) custom-call(bf16[16,32]{1,0} %x, bf16[32,6]{1,0} %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %out = bf16[16,6]{1,0} get-tuple-element(%gemm), index=0
}
"""
LOOP = """%body (arg: (s32[], f32[16,6], (f32[16,8], f32[4,8,6]))) -> (s32[], f32[16,6], (f32[16,8], f32[4,8,6])) {
  %x = f32[16,8]{1,0} get-tuple-element(%inner), index=0
  %w = f32[8,6]{1,0} dynamic-slice(%weights, %i), dynamic_slice_sizes={1,8,6}
  %dot.7 = f32[16,6]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (arg: (s32[], f32[16,6], (f32[16,8], f32[4,8,6]))) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[16,8], w: f32[4,8,6]) -> f32[16,6] {
  %while.1 = (s32[], f32[16,6]{1,0}, (f32[16,8]{1,0}, f32[4,8,6]{2,1,0})) while(%tuple), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  ROOT %out = f32[16,6]{1,0} get-tuple-element(%while.1), index=1
}
"""


@pytest.mark.parametrize("name, text, expected, dense_gflop", [
    ("masked dense dot (CPU)", DENSE_CPU, "dense_fallback", 4 * USEFUL_GFLOP),
    ("native ragged-dot", RAGGED, "grouped", 0.0),
    ("Pallas kernel", KERNEL, "grouped", 0.0),
    ("cuBLAS GEMM over all experts", CUBLAS, "dense_fallback", 4 * USEFUL_GFLOP),
    ("dense dot per expert in a loop of 4", LOOP, "dense_fallback", 4 * USEFUL_GFLOP),
    ("the same loop, trip count unknown", LOOP.replace(', backend_config={"known_trip_count":{"n":"4"}}', ""),
     "unknown", 0.0),
])
def test_hlo_check_tells_a_dense_fallback_from_a_grouped_matmul(name, text, expected, dense_gflop):
  hlo_check = _benchmark_script("hlo_check")
  analysis = hlo_check.analyze(text)
  assert analysis["dense_dot_gflop"] == pytest.approx(dense_gflop), name
  assert hlo_check.verdict(analysis, USEFUL_GFLOP) == expected, name


def test_hlo_check_reads_jax_ragged_dot_on_cpu_as_a_dense_fallback():
  """The parser on a real compiled program: jax lowers ragged_dot on CPU to a masked dense dot over all experts."""
  result = _benchmark_script("hlo_check").check("ragged_dot", tokens=64, d_model=16, d_ff=32, num_experts=8,
                                                dtype=jnp.float32)
  assert result["verdict"] == "dense_fallback" and result["work_ratio"] > 4, result


def test_profile_categories_ops_by_what_their_fusion_runs_and_leaves_out_loops():
  text = """%fused_scatter (p0: f32[8,4], p1: s32[3]) -> f32[8,4] {
  ROOT %scatter.1 = f32[8,4]{1,0} scatter(%p0, %p1, %u), to_apply=%add
}

%body (arg: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %dot.3 = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/dot_general"}
}

ENTRY %main (x: f32[8,4]) -> f32[8,4] {
  %scatter_fusion = f32[8,4]{1,0} fusion(%x, %i), kind=kLoop, calls=%fused_scatter, metadata={op_name="jit(f)/scatter-add"}
  %while.2 = (s32[], f32[8,4]{1,0}) while(%t), condition=%cond, body=%body
  ROOT %add.5 = f32[8,4]{1,0} add(%scatter_fusion, %x)
}
"""
  categories = _benchmark_script("profile_moe").hlo_categories(text)
  assert categories["scatter_fusion"] == ("scatter", "jit(f)/scatter-add")
  assert categories["dot.3"] == ("matmul", "jit(f)/dot_general")
  assert categories["add.5"][0] == "elementwise" and "while.2" not in categories


@pytest.mark.slow  # compiles six toy layers twice (and once more per allocator): ~1 min on 2 cores
def test_profile_records_faults_bytes_and_op_times_per_variant(tmp_path):
  output = tmp_path / "profile.json"
  profile_moe = _benchmark_script("profile_moe")
  profile_moe.main(["--tokens", "128", "--d_model", "16", "--d_ff", "32", "--group_size", "64", "--experts", "8",
                    "--repeats", "1", "--allocators", "glibc_no_mmap", "--allocator_experts", "8",
                    "--allocator_variants", "dropless", "--output", str(output)])
  result = json.loads(output.read_text())
  (row,) = result["rows"]
  assert set(row["variants"]) == set(profile_moe.VARIANTS)
  for name, variant in row["variants"].items():
    assert variant["faults_per_call"]["minor"] >= 0 and variant["memory_bytes"]["argument"] > 0, name
    assert variant["ops"]["total_seconds"] > 0 and variant["ops"]["by_category"]["matmul"] > 0, name
  # bf16 weights: half the argument bytes of the float32 layer's weights (x and the router stay close to it)
  assert row["variants"]["dropless_bf16"]["memory_bytes"]["argument"] < row["variants"]["dropless"]["memory_bytes"]["argument"]
  assert row["variants"]["dropless_sgd_donated"]["memory_bytes"]["alias"] > 0  # the params' buffers reused
  assert set(result["allocators"]) == {"default", "glibc_no_mmap"}
  assert result["allocators"]["glibc_no_mmap"]["environment"]["GLIBC_TUNABLES"].startswith("glibc.malloc")


def test_readme_generated_blocks_equal_what_the_committed_json_gives():
  """benchmarks/README.md's tables and readings come from benchmarks/results/*.json (`benchmarks/report.py`): a
  rerun that commits new JSON without regenerating the README fails here."""
  report = _benchmark_script("report")
  with open(report.README) as f:
    text = f.read()
  assert {name for _, name, _, _ in report.BLOCK.findall(text)} == set(report.BLOCKS)
  assert report.render(text) == text, "run: python benchmarks/report.py"
  # Only the generated blocks change: emptying one and rendering gives the README back.
  emptied = report.BLOCK.sub(lambda m: m.group(1) + m.group(4), text)
  assert emptied != text and report.render(emptied) == text
