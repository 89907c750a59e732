"""The tables and readings of benchmarks/README.md, generated from the benchmarks' JSON in benchmarks/results/.

  python benchmarks/report.py           # rewrite every generated block of benchmarks/README.md from the JSON
  python benchmarks/report.py --check   # exit 1 if a block differs from what the JSON gives (tests/test_benchmarks.py)

A generated block sits between `<!-- generated: NAME -->` and `<!-- end generated: NAME -->` in the README; only
those blocks are rewritten, everything else (prose, the decode section) is left as it is. Blocks and their JSON:
  moe_layer      results/moe_layer.json    peaks, ratio table, roofline and reading, targets of issue 34
  train_step     results/train_step.json   step times, tokens/s, MFU, ratios to the baseline
  profile        results/profile_moe.json  bytes, page faults, XLA's time per op category, allocators
  gpu            results/gpu_hlo_check.json, results/gpu.json   lowering verdicts, bf16 layer and train step
A missing JSON gives a block that says so (and which command writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

from moe_jax import fileio  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(HERE, "README.md")
RESULTS = os.path.join(HERE, "results")
# Issue 34: best backend's ratio to dense at each E, and the Switch E = 8 training step's to its dense twin.
LAYER_TARGETS = {8: 1.10, 32: 1.20, 128: 1.50, 256: 2.00}
TRAIN_TARGET = 1.10
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated: \2 -->)", re.DOTALL)


def _load(name: str) -> dict | None:
  path = os.path.join(RESULTS, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _missing(names: str, command: str) -> str:
  return f"Not measured yet: `{command}` writes {names}.\n"


def _peaks_line(peaks: dict) -> str:
  line = f"matmul {peaks['matmul_gflops']:.0f} GFLOP/s ({peaks['dtype']}, {peaks['matmul_size']}^3)"
  if "memory_read_gbps" not in peaks:
    return (line + f"; memory {peaks['memory_gbps']:.2f} GB/s, measured by the harness before issue 34 on a fresh "
            "output buffer each call: an allocation / first-touch rate, not memory bandwidth, so the memory bounds "
            "below are too high. Rerun for the corrected figures")
  return (line + f"; memory bandwidth {peaks['memory_gbps']:.1f} GB/s read + write on a reused (donated) buffer (the "
          f"roofline's), {peaks['memory_read_gbps']:.1f} GB/s read-only; a fresh output buffer each call "
          f"(allocation / first touch) {peaks['fresh_buffer_gbps']:.2f} GB/s, "
          f"{peaks['memory_gbps'] / peaks['fresh_buffer_gbps']:.1f}x slower than the reused one"
          + _numpy_copy(peaks))


def _numpy_copy(peaks: dict) -> str:
  """Issue 34's check of the harness: its bandwidth within 20 % of a numpy copy's, measured in the same run."""
  if "numpy_copy_gbps" not in peaks:
    return ""
  ratio = peaks["memory_gbps"] / peaks["numpy_copy_gbps"]
  verdict = "within" if abs(ratio - 1) <= 0.2 else "not within"
  line = (f"; a numpy copy (`np.copyto`, read + write) {peaks['numpy_copy_gbps']:.1f} GB/s: the harness's figure is "
          f"{ratio:.2f}x it, {verdict} issue 34's 20 %")
  if "numpy_in_place_gbps" in peaks:
    line += (f"; numpy's pass over one buffer (`np.multiply(x, 2, out=x)`, the harness's access pattern) "
             f"{peaks['numpy_in_place_gbps']:.1f} GB/s, {peaks['memory_gbps'] / peaks['numpy_in_place_gbps']:.2f}x")
  return line


def _ratio(variant: dict) -> str:
  if "ratio_vs_dense" not in variant:
    return f"skipped ({variant.get('skipped', '')})"
  return f"{variant['ratio_vs_dense']['min']:.2f}x ({variant['ratio_vs_dense']['median']:.2f}x)"


def moe_layer_block() -> str:
  result = _load("moe_layer.json")
  if result is None:
    return _missing("results/moe_layer.json", "python benchmarks/moe_layer.py")
  machine, peaks, config = result["machine"], result["peaks"], result["config"]
  names = config["backends"]
  out = [f"`results/moe_layer.json`: {machine['processor']}, {machine['cpu_count']} cores, jax "
         f"{machine['versions']['jax']}, flax {machine['versions']['flax']}; {config['tokens']} tokens, d_model "
         f"{config['d_model']}, d_ff {config['d_ff']}, {config['dtype']}, {config['repeats']} timed calls each. "
         f"Measured in the same run: {_peaks_line(peaks)}.", "",
         "Time / dense FFN time, ratio of minima (ratio of medians in brackets):", "",
         "| E | dense s (min) | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
  for row in result["single_device"]:
    variants = row["variants"]
    out.append(f"| {row['experts']} | {variants['dense']['seconds']['min']:.2f} | "
               + " | ".join(_ratio(variants[n]) for n in names) + " |")
  out += ["", "Roofline at the measured peaks (`harness.roofline_seconds` on the work model; bound ratios to the "
          "dense FFN's bound). Weight traffic: the 3 x expert-parameter bytes (read forward and backward, gradient "
          "written) at the reused-buffer bandwidth, and at the fresh-buffer rate, which is what they cost if every "
          "gradient lands in newly faulted pages:", "",
          "| E | variant | rows | model GFLOP | model GB | bound ratio, overlap / serial | weight traffic s, reused / "
          "first touch | measured ratio (min) |", "| --- " * 8 + "|"]
  readings = []
  for row in result["single_device"]:
    variants = row["variants"]
    dense_bound = harness.roofline_seconds(variants["dense"]["work"]["gflop"], variants["dense"]["work"]["gbytes"],
                                           peaks)
    for name in names:
      variant = variants[name]
      if "ratio_vs_dense" not in variant:
        continue
      work = variant["work"]
      bound = harness.roofline_seconds(work["gflop"], work["gbytes"], peaks)
      overlap, serial = (bound[k] / dense_bound[k] for k in ("overlap", "serial"))
      itemsize = 2 if config["dtype"] == "bfloat16" else 4
      weight_gb = 3 * work["params"] * itemsize / 1e9
      fresh = peaks.get("fresh_buffer_gbps")
      traffic = f"{weight_gb / peaks['memory_gbps']:.2f} / " + (f"{weight_gb / fresh:.2f}" if fresh else "n/a")
      measured = variant["ratio_vs_dense"]["min"]
      out.append(f"| {row['experts']} | {name} | {work['rows']} | {work['gflop']:.0f} | {work['gbytes']:.2f} | "
                 f"{overlap:.2f} / {serial:.2f} | {traffic} | {measured:.2f} |")
      if name in ("gather", "dropless"):
        where = ("at its overlap (roofline) bound" if measured <= 1.1 * overlap else
                 "between its overlap and serial bounds" if measured <= serial else
                 f"{measured / serial:.2f}x above its serial bound: time the work model does not explain")
        readings.append(f"- E = {row['experts']}, {name}: {measured:.2f}x, {where}.")
  out += ["", f"(the dense FFN: {result['single_device'][0]['variants']['dense']['work']['gflop']:.0f} GFLOP, "
          f"{result['single_device'][0]['variants']['dense']['work']['gbytes']:.2f} GB.) Reading, generated from the "
          "same figures:", ""]
  for row in result["single_device"]:
    timed = {n: v["ratio_vs_dense"]["min"] for n, v in row["variants"].items() if n != "dense" and "ratio_vs_dense" in v}
    if row["experts"] in LAYER_TARGETS and timed:
      best = min(timed, key=timed.get)
      target = LAYER_TARGETS[row["experts"]]
      out.append(f"- Target at E = {row['experts']}: best backend {best} {timed[best]:.2f}x against at most "
                 f"{target:.2f}x: {'met' if timed[best] <= target else 'missed'}.")
  out += readings
  if result.get("sharded") and isinstance(result["sharded"], list):
    out += ["", f"Expert parallelism: the gather layer under `shard_map` on an emulated {config['mesh']} mesh against "
            "the same layer on one device (same total work; emulated devices share the cores): "
            + ", ".join(f"{r['overhead']['min']:.2f}x at E = {r['experts']}" for r in result["sharded"])
            + " (ratio of minima)."]
  return "\n".join(out) + "\n"


def train_step_block() -> str:
  result = _load("train_step.json")
  if result is None:
    return _missing("results/train_step.json", "python benchmarks/train_step.py")
  loops = sorted({loop for v in result["variants"].values() for loop in v["loops"]}, reverse=True)
  peak = result["platform"]["peak_matmul_flops_per_s"]
  out = [f"`results/train_step.json`: {result['platform']['processor'] or result['platform']['machine']}, "
         f"{result['platform']['cpu_count']} cores, jax {result['platform']['jax']}; matmul peak measured in the same "
         f"run {peak / 1e9:.0f} GFLOP/s (the MFU denominator). Median of {result['config']['blocks']} blocks of "
         f"{result['config']['steps_per_block']} steps (min-max):", "",
         "| variant | " + " | ".join(f"{loop}: ms/step (min-max), tokens/s, MFU" for loop in loops) + " |",
         "| --- " * (len(loops) + 1) + "|"]
  for name, variant in result["variants"].items():
    cells = []
    for loop in loops:
      s = variant["loops"][loop]
      cells.append(f"{s['median_s'] * 1e3:.0f} ({s['min_s'] * 1e3:.0f}-{s['max_s'] * 1e3:.0f}), "
                   f"{s['tokens_per_s']:.0f}, {s['mfu']:.3f}")
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  out.append("")
  for name, values in result["ratios"].items():
    out.append(f"- {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
  switch = next((values for name, values in result["ratios"].items() if name.startswith("switch-cpu/")), None)
  if switch and "async" in switch:
    out.append(f"- Target (issue 34): Switch E = 8 at most {TRAIN_TARGET:.2f}x its dense twin: "
               f"{switch['async']:.2f}x, {'met' if switch['async'] <= TRAIN_TARGET else 'missed'}.")
  return "\n".join(out) + "\n"


def profile_block() -> str:
  result = _load("profile_moe.json")
  if result is None:
    return _missing("results/profile_moe.json", "python benchmarks/profile_moe.py")
  mib = lambda b: f"{b / 2**20:.0f}"
  out = [f"`results/profile_moe.json`: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
         f"pages of {result['page_size']} bytes. Per call of the forward + backward (after a warm-up call): minor page "
         "faults (first touches of fresh pages) and the MiB they map, the compiled program's temp, output and "
         "aliased (donated) MiB, and the share of XLA's op time per category (one traced call):", "",
         "| E | variant | minor faults | first-touch MiB | temp MiB | output MiB | alias MiB | s (median) | op time "
         "by category |", "| --- " * 9 + "|"]
  for row in result["rows"]:
    for name, v in row["variants"].items():
      ops = v.get("ops")
      shares = ", ".join(f"{k} {s / ops['total_seconds']:.0%}" for k, s in list(ops["by_category"].items())[:4]) \
          if ops and ops["total_seconds"] else "not traced"
      memory = v["memory_bytes"]
      out.append(f"| {row['experts']} | {name} | {v['faults_per_call']['minor']:.0f} | "
                 f"{mib(v['first_touch_bytes_per_call'])} | {mib(memory['temp'])} | {mib(memory['output'])} | "
                 f"{mib(memory['alias'])} | {v['seconds']['median']:.2f} | {shares} |")
  if result.get("allocators"):
    out += ["", "Allocators (same variants, one subprocess each): minor faults per call, seconds (median):", "",
            "| allocator | " + " | ".join(f"E = {r['experts']} {n}" for r in result["allocators"]["default"]
                                           for n in r["variants"]) + " |"]
    out.append("| --- " * (1 + sum(len(r["variants"]) for r in result["allocators"]["default"])) + "|")
    for name, entry in result["allocators"].items():
      rows = entry if isinstance(entry, list) else entry.get("rows")
      if rows is None:
        out.append(f"| {name} | skipped: {entry['skipped']} |")
        continue
      out.append(f"| {name} | " + " | ".join(f"{v['faults_per_call']['minor']:.0f}, {v['seconds']['median']:.2f} s"
                                            for r in rows for v in r["variants"].values()) + " |")
  return "\n".join(out) + "\n"


def gpu_block() -> str:
  check, result = _load("gpu_hlo_check.json"), _load("gpu.json")
  if check is None and result is None:
    return _missing("results/gpu_hlo_check.json, gpu.json and gpu_decode.json", "bash benchmarks/gpu.sh")
  out = []
  if check is not None:
    out.append(f"Grouped-matmul lowering on {check['device_kind']} ({check['platform']}, jax {check['jax']}), "
               f"forward + backward of the ragged FFN at {check['shape']}: 'auto' resolves to {check['auto']!r} "
               f"({check['auto_verdict']}).")
    for name, backend in check["backends"].items():
      out.append(f"- {name}: " + (backend["skipped"] if "skipped" in backend else
                                  f"{backend['verdict']}, dense dots {backend['work_ratio']:.1f}x the useful FLOPs, "
                                  f"{backend['ragged_dots']} ragged-dot ops, kernels {backend['kernel_calls']}"))
  if result is not None:
    if result.get("tiny"):
      out.append("\n`results/gpu.json` holds a --tiny run (toy sizes): no figures to report.")
    else:
      out += ["", f"`results/gpu.json`: {result['machine']['device_kind']}; {_peaks_line(result['peaks'])}.", "",
              "| E | dense s (min) | " + " | ".join(result["layer"]["config"]["backends"]) + " |",
              "| --- " * (len(result["layer"]["config"]["backends"]) + 2) + "|"]
      for row in result["layer"]["rows"]:
        variants = row["variants"]
        out.append(f"| {row['experts']} | {variants['dense']['seconds']['min']:.4f} | "
                   + " | ".join(_ratio(variants[n]) for n in result["layer"]["config"]["backends"]) + " |")
      out += ["", "| training step | ms (median) | x dense | tokens/s | MFU |", "| --- | --- | --- | --- | --- |"]
      for name, v in result["train_step"]["variants"].items():
        out.append(f"| {name} | {v['seconds']['median'] * 1e3:.1f} | {v['ratio_vs_dense']:.2f} | "
                   f"{v['tokens_per_second']:,.0f} | {v['mfu_vs_measured_matmul_peak']:.1%} |")
  return "\n".join(out) + "\n"


BLOCKS = {"moe_layer": moe_layer_block, "train_step": train_step_block, "profile": profile_block, "gpu": gpu_block}


def render(text: str) -> str:
  """`text` with every generated block replaced by what the JSON gives now."""
  return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group(2)]() + m.group(4), text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 if the README is out of date")
  parser.add_argument("--readme", default=README)
  args = parser.parse_args(argv)
  with open(args.readme) as f:
    text = f.read()
  rendered = render(text)
  if args.check:
    if rendered != text:
      print(f"{args.readme} is out of date with benchmarks/results: run python benchmarks/report.py")
      return 1
    return 0
  if rendered != text:
    fileio.write_text(args.readme, rendered)
  print(f"{args.readme}: {len(BLOCK.findall(text))} generated blocks, {'rewritten' if rendered != text else 'unchanged'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
