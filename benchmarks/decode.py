"""Decode-step cost of a MoE against its two dense twins, as the batch grows (issue 32 item 6).

  python benchmarks/decode.py       # the committed run: JSON, figure and README reading (~8 minutes on 2 cores)
  python benchmarks/decode.py [--d_model 1024 --presets mixtral:8:2:3584,olmoe:64:8:512 --batches 1,2,4,...,256]
  python benchmarks/decode.py --report_only    # the figure and the README reading again, from the committed JSON
  python benchmarks/decode.py --d_model 16 --presets toy:4:2:16 --batches 1,4 --num_layers 1 --vocab 32 \
      --context 8 --repeats 1 --peak_mib 8 --output /tmp/decode.json          # smoke run (tests/test_benchmarks.py)

For each preset name:E:K:F (E experts of width F, K chosen per token; defaults Mixtral's E = 8, K = 2 and OLMoE's
E = 64, K = 8) it builds three decoder LMs of --num_layers blocks (float32):
  * moe            every block's FFN a top-K MoE of E experts of width F (dropless, as decoding runs it);
  * dense_active   a dense FFN of width K * F: equal active parameters (the router's M * E aside);
  * dense_total    a dense FFN of width E * F: equal total parameters;
and at each batch B it times one cached decode step (`decode.Decoder.step`, after a one-token prefill) of the three,
interleaved in one run (`harness.time_interleaved`, so load from other processes hits all alike), and records:
  seconds (min / median), ratios of the MoE against each twin (of minima), tokens/s = B / min seconds;
  weight bytes read per step: every non-expert weight once (the embedding table whole: an upper estimate) plus the
    expert weights the MoE path reads, B * K expert slices per layer when `dispatch.use_expert_gather` takes the
    gather path (B * K <= E), all E experts otherwise (the grouped matmuls walk every expert), and the ideal
    (`distinct` experts only);
  distinct experts touched per layer at that step (from the routing of the step's tokens, `tracing.capture_routing`
    on the sequences so far, which the cached step reproduces), against the expected E * (1 - (1 - K/E)^B) of
    uniform independent choices;
  achieved bandwidth = weight bytes read / min seconds, as a fraction of `harness.measure_peaks()['memory_gbps']`
    measured in the same run (a reused, donated buffer: memory, not page faults; it counts the bytes read and
    written), and of its `memory_read_gbps` (a sum over the buffer: reads only, as a decode step's weights are);
  memory held: the decoder's weights and KV cache (array bytes), against experiments/model_stats.py's inference
    figures (bf16 there, rescaled to the run's float32).
Timing includes the step's host work (token upload, logits left on the device).

First token: the latency of `make run`'s model (configs/lm.py:switch-cpu, its trained checkpoint in
workdirs/main/switch-cpu when there is one, else the same model with random weights: the time is the same) to the
first of --first_token_new_tokens greedy tokens after EOS (`Decoder.generate`: the prefill and the first token's
sampling, fetched to the host), after compilation, and to the last of them.

Results: JSON at --output (default benchmarks/results/decode.json), written atomically (`moe_jax.fileio`); with the
default --output also the figure (`cost_figure`, results/figures/decode_cost_per_token.png, as
notebooks/decode.ipynb draws it) and the reading between the markers of benchmarks/README.md (`reading`), both from
the JSON alone; elsewhere the figure goes beside the JSON and the README is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import lm  # noqa: E402
from moe_jax import config_lib, decode, dispatch, fileio, flops, models, runstate, tracing  # noqa: E402
from moe_jax.data import pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(ROOT, "benchmarks", "results", "decode.json")
DEFAULT_FIGURE = os.path.join(ROOT, "results", "figures", "decode_cost_per_token.png")
README = os.path.join(ROOT, "benchmarks", "README.md")
README_BEGIN, README_END = "<!-- decode reading: begin (python benchmarks/decode.py --report_only) -->", \
    "<!-- decode reading: end -->"
MODEL_STATS = os.path.join(ROOT, "experiments", "model_stats.py")
MAKE_RUN = ("switch-cpu", os.path.join(ROOT, "workdirs", "main", "switch-cpu"))  # `make run`'s MoE: config, workdir
DTYPE_BYTES = 4  # float32 parameters and caches
PROMPT = 1  # tokens of each row before the timed steps


def parse_preset(text: str) -> dict:
  name, experts, k, d_ff = text.split(":")
  preset = {"name": name, "experts": int(experts), "k": int(k), "d_ff": int(d_ff)}
  if not 1 <= preset["k"] <= preset["experts"]:
    raise argparse.ArgumentTypeError(f"preset {text!r}: K={k} must be in [1, E={experts}]")
  return preset


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(v) for v in s.split(",") if v]
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--presets", type=lambda s: [parse_preset(p) for p in s.split(",")],
                      default=[parse_preset("mixtral:8:2:3584"), parse_preset("olmoe:64:8:512")],
                      help="comma-separated name:E:K:F (experts, choices per token, expert width)")
  parser.add_argument("--batches", type=ints, default=[2**i for i in range(9)], help="comma-separated batch sizes")
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--num_heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--context", type=int, default=64, help="cache length T (>= prompt + repeats + 2)")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per model and batch")
  parser.add_argument("--peak_mib", type=int, default=256, help="buffer of the bandwidth measurement")
  parser.add_argument("--first_token_new_tokens", type=int, default=256,
                      help="tokens generated from `make run`'s model for the first-token latency (0: skip)")
  parser.add_argument("--first_token_repeats", type=int, default=5)
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--figure", default=None,
                      help=f"the PNG (default {DEFAULT_FIGURE} with the default --output, else beside the JSON)")
  parser.add_argument("--readme", default=None,
                      help="the README whose decode reading is rewritten (default benchmarks/README.md with the "
                           "default --output, else none)")
  parser.add_argument("--report_only", action="store_true", help="measure nothing: figure and reading from --output")
  args = parser.parse_args(argv)
  default_output = os.path.abspath(args.output) == DEFAULT_OUTPUT
  if args.figure is None:
    args.figure = DEFAULT_FIGURE if default_output else os.path.splitext(args.output)[0] + ".png"
  if args.readme is None:
    args.readme = README if default_output else ""
  if args.context < PROMPT + args.repeats + 2:
    parser.error(f"--context={args.context} must be >= {PROMPT + args.repeats + 2} (prompt + warm-up + repeats)")
  if args.d_model % args.num_heads:
    parser.error(f"--num_heads={args.num_heads} must divide --d_model={args.d_model}")
  return args


def experiment_config(args, d_ff: int, preset: dict | None):
  """The experiment ConfigDict of one model: a MoE of `preset` in every block, or dense of width d_ff (None)."""
  config = config_lib.default_config()
  config.model.update(dict(d_model=args.d_model, num_heads=args.num_heads, head_dim=args.d_model // args.num_heads,
                           d_ff=d_ff, num_layers=args.num_layers, max_seq_len=args.context, vocab_size=args.vocab,
                           moe_layer_interval=1 if preset else 0))
  if preset:
    config.moe.update(dict(num_experts=preset["experts"], router="top_k", dropless=True))
    config.moe.top_k.k = preset["k"]
  return config


def model_stats_module():
  """experiments/model_stats.py, if this checkout has it (None otherwise)."""
  if not os.path.exists(MODEL_STATS):
    return None
  spec = importlib.util.spec_from_file_location("model_stats", MODEL_STATS)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def expected_distinct(experts: int, k: int, batch: int) -> float:
  """Experts touched by B tokens choosing K of E each, uniformly and independently: E * (1 - (1 - K/E)^B)."""
  return experts * (1 - (1 - k / experts) ** batch)


class Model:
  """One built model: its config, parameters and the facts the rows need."""

  def __init__(self, name: str, config, preset: dict | None):
    self.name, self.config, self.preset = name, config, preset
    self.cfg = config_lib.model_config(config, vocab_size=config.model.vocab_size)
    self.model = nnx.jit(lambda: models.build(self.cfg, rngs=nnx.Rngs(0)))()
    breakdown = flops.param_breakdown(self.cfg)
    self.params = {"total": breakdown.total, "active": breakdown.active}
    per_expert = 0 if preset is None else breakdown.routed_experts / (self.cfg.num_layers * preset["experts"])
    self.expert_bytes = per_expert * DTYPE_BYTES
    self.other_bytes = (breakdown.total - breakdown.routed_experts) * DTYPE_BYTES

  def distinct_experts(self, tokens: np.ndarray) -> list[int]:
    """Per MoE layer: the experts the last position of `tokens` [B, L] chooses (the step's routing)."""
    _, routes = tracing.capture_routing(self.model, jax.numpy.asarray(tokens))
    return [len(np.unique(np.asarray(route.expert_index)[:, -1])) for _, route in sorted(routes.items())]

  def weight_bytes(self, batch: int, distinct: list[int]) -> dict:
    if self.preset is None:
      return {"read": self.other_bytes, "ideal": self.other_bytes, "expert_gather": False}
    e, k = self.preset["experts"], self.preset["k"]
    gather = dispatch.use_expert_gather(batch * k, e, False)
    per_layer = batch * k if gather else e
    return {"read": self.other_bytes + len(distinct) * per_layer * self.expert_bytes,
            "ideal": self.other_bytes + sum(distinct) * self.expert_bytes, "expert_gather": gather}


def stepper(model: Model, prompts: np.ndarray, tokens: np.ndarray, context: int):
  """A call that runs one decode step of `tokens` [B] (after a prefill of `prompts` [B, PROMPT]) and keeps the state
  it returns; and the bytes the decoder holds (weights, KV cache)."""
  batch = len(tokens)
  decoder = decode.Decoder(model.model, batch_size=batch, max_length=context)
  _, state = decoder.prefill(prompts, np.full((batch,), PROMPT))
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))
  held = {"weights": nbytes(decoder.params), "kv_cache": nbytes(state.cache)}
  holder = [state]

  def step():
    logits, holder[0] = decoder.step(holder[0], tokens)
    return logits

  return step, held


def first_token(new_tokens: int, repeats: int) -> dict:
  """Seconds to the first and to the last of `new_tokens` greedy tokens generated after EOS by `make run`'s model
  (one row; min / median over `repeats` generations after a compiling one), and where its weights came from."""
  name, workdir = MAKE_RUN
  config = lm.get_config(name)
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    model, source = runstate.load(workdir).model, os.path.relpath(workdir, ROOT)
  else:
    source = f"configs/lm.py:{name}, random weights (no {os.path.relpath(workdir, ROOT)})"
    model = runstate.build(config)
  eos = pipeline.get_tokenizer(config.data).eos_id
  decoder = decode.Decoder(model, batch_size=1, max_length=new_tokens)  # EOS + new_tokens - 1 fed back
  prompt = np.full((1, 1), eos, np.int32)
  first, total = [], []
  for i in range(repeats + 1):  # the first generation compiles the prefill, the sampling and the step
    start = time.perf_counter()
    steps = decoder.generate(prompt, [1], max_new_tokens=new_tokens)
    next(steps)  # tokens come back to the host as numpy: the first one has been computed
    elapsed = time.perf_counter() - start
    for _ in steps:
      pass
    if i:
      first.append(elapsed)
      total.append(time.perf_counter() - start)
  return {"model": source, "new_tokens": new_tokens, "seconds": harness.summary(first),
          "all_tokens_seconds": harness.summary(total)}


def run(args) -> dict:
  peaks = harness.measure_peaks(copy_mib=args.peak_mib)
  first = first_token(args.first_token_new_tokens, args.first_token_repeats) if args.first_token_new_tokens else None
  if first:
    print(f"first token of {first['new_tokens']} from {first['model']}: {first['seconds']['min'] * 1e3:.1f} ms "
          f"(all {first['all_tokens_seconds']['min']:.2f} s)", flush=True)
  stats_module = model_stats_module()
  presets = []
  for preset in args.presets:
    models_ = {
        "moe": Model("moe", experiment_config(args, preset["d_ff"], preset), preset),
        "dense_active": Model("dense_active", experiment_config(args, preset["k"] * preset["d_ff"], None), None),
        "dense_total": Model("dense_total", experiment_config(args, preset["experts"] * preset["d_ff"], None), None),
    }
    rows = []
    for batch in args.batches:
      # Rows of different tokens, fixed per batch: every step feeds `tokens` again, at the next position.
      sequence = np.asarray(jax.random.randint(jax.random.key(batch), (batch, PROMPT + 1), 1, args.vocab), np.int32)
      steps, held = {}, {}
      for name, model in models_.items():
        steps[name], held[name] = stepper(model, sequence[:, :PROMPT], sequence[:, PROMPT], args.context)
      times = harness.time_interleaved(steps, args.repeats)
      # The routing of the warm-up step (the step's token after the prompt), which the timed steps resemble.
      distinct = models_["moe"].distinct_experts(sequence)
      row = {"batch": batch, "expected_distinct_experts": expected_distinct(preset["experts"], preset["k"], batch),
             "distinct_experts_per_layer": distinct, "models": {}}
      for name, model in models_.items():
        seconds = harness.summary(times[name])
        weight = model.weight_bytes(batch, distinct if name == "moe" else [])
        entry = {"seconds": seconds, "tokens_per_second": batch / seconds["min"], "weight_bytes": weight,
                 "bandwidth_fraction": weight["read"] / seconds["min"] / 1e9 / peaks["memory_gbps"],
                 "bandwidth_fraction_of_reads": weight["read"] / seconds["min"] / 1e9 / peaks["memory_read_gbps"],
                 "memory_held": held[name]}
        if stats_module is not None:
          serve = stats_module.stats(model.config, serve_batch=batch, serve_context=args.context)["inference"]
          entry["model_stats"] = {"weights": serve["weights_bf16"] * DTYPE_BYTES / 2,
                                  "kv_cache": serve["kv_cache_bf16"] * DTYPE_BYTES / 2}
        row["models"][name] = entry
      for twin in ("dense_active", "dense_total"):
        row[f"moe_over_{twin}"] = row["models"]["moe"]["seconds"]["min"] / row["models"][twin]["seconds"]["min"]
      rows.append(row)
      print(f"{preset['name']} B={batch:4d}: moe {row['models']['moe']['seconds']['min'] * 1e3:8.3f} ms, "
            f"x{row['moe_over_dense_active']:.2f} of dense_active, x{row['moe_over_dense_total']:.2f} of dense_total, "
            f"experts {np.mean(distinct):.1f} (expected {row['expected_distinct_experts']:.1f}) of {preset['experts']}",
            flush=True)
    presets.append({"preset": preset, "params": {n: m.params for n, m in models_.items()}, "rows": rows})
  return {"peaks": peaks, "first_token": first, "presets": presets}


# ----------------------------------------------------------------------------------------------------------
# The figure and the README's reading, from the JSON alone.

MODELS = {"moe": ("MoE", "tab:red"), "dense_active": ("dense, equal active", "tab:blue"),
          "dense_total": ("dense, equal total", "black")}
ACTIVE_LIKE = 1.3  # the bar: a MoE step within 1.3x of its equal-active twin costs like its active parameters


def preset_label(preset: dict) -> str:
  return f"{preset['name']}: E = {preset['experts']}, K = {preset['k']}, F = {preset['d_ff']}"


def cost_figure(result: dict):
  """Per preset (columns): milliseconds per generated token (a step's minimum time / B) against the batch B for the
  MoE and its two dense twins (top), and the distinct experts one MoE layer read at that step against the expected
  E * (1 - (1 - K/E)^B) (bottom). Returns the matplotlib figure."""
  import matplotlib

  matplotlib.use("Agg")  # headless: the benchmark and the notebook tests draw without a display
  import matplotlib.pyplot as plt

  presets = result["presets"]
  fig, axes = plt.subplots(2, len(presets), figsize=(5.5 * len(presets), 7), squeeze=False, sharex="col",
                           gridspec_kw={"height_ratios": [2, 1]})
  for column, entry in enumerate(presets):
    rows, preset = entry["rows"], entry["preset"]
    batches = [row["batch"] for row in rows]
    top, bottom = axes[0, column], axes[1, column]
    for name, (label, color) in MODELS.items():
      per_token = [row["models"][name]["seconds"]["min"] / row["batch"] * 1e3 for row in rows]
      top.plot(batches, per_token, "o-", color=color, label=label)
    top.set(xscale="log", yscale="log", ylabel="ms per token (decode step / B)", title=preset_label(preset))
    top.grid(True, which="both", alpha=0.3)
    top.legend()
    measured = [np.mean(row["distinct_experts_per_layer"]) for row in rows]
    bottom.plot(batches, measured, "o", color=MODELS["moe"][1], label="measured (mean over layers)")
    bottom.plot(batches, [row["expected_distinct_experts"] for row in rows], "-", color="gray",
                label="E (1 - (1 - K/E)^B)")
    bottom.axhline(preset["experts"], color="black", linestyle=":", linewidth=1)
    bottom.set(xscale="log", xlabel="batch B (rows decoded together)", ylabel="experts read per layer")
    bottom.set_xticks(batches, [str(b) for b in batches])
    bottom.grid(True, alpha=0.3)
    bottom.legend()
  fig.suptitle("Decode step cost per token: a MoE against its dense twins")
  fig.tight_layout()
  return fig


def _batches(values: list[int]) -> str:
  return ", ".join(str(b) for b in values) if values else "none"


def _twin_ratio(row: dict) -> float:
  """The equal-total twin's step time over the equal-active twin's."""
  return row["models"]["dense_total"]["seconds"]["min"] / row["models"]["dense_active"]["seconds"]["min"]


def reading(result: dict) -> str:
  """The README's reading of a decode.json (markdown): for each preset, where the MoE costs like its active
  parameters and where like its total, and why (the experts its batches read); every number from `result`."""
  config, peaks, machine = result["config"], result["peaks"], result["machine"]
  out = [f"Measured on {machine['cpu_count']} {machine['backend'].upper()} cores ({machine['processor']}), float32, "
         f"{config['num_layers']} blocks of d_model {config['d_model']}, a cache of {config['context']} tokens; each "
         f"time the minimum of {config['repeats']} steps, the three models interleaved. Bandwidth measured in the "
         f"same run: {peaks['memory_gbps']:.1f} GB/s on a reused buffer (bytes read + written), "
         f"{peaks['memory_read_gbps']:.1f} GB/s reading only."]
  first = result.get("first_token")
  if first:
    out.append(f"\nFirst token of {first['new_tokens']} generated by `make run`'s model ({first['model']}), after "
               f"compilation: {first['seconds']['min'] * 1e3:.1f} ms (median {first['seconds']['median'] * 1e3:.1f}); "
               f"all {first['new_tokens']} tokens in {first['all_tokens_seconds']['min']:.2f} s.")
  for entry in result["presets"]:
    preset, rows, params = entry["preset"], entry["rows"], entry["params"]
    e, k = preset["experts"], preset["k"]
    out.append(f"\n**{preset_label(preset)}** ({params['moe']['total'] / 1e6:.0f}M parameters, "
               f"{params['moe']['active'] / 1e6:.0f}M active; the twins {params['dense_active']['total'] / 1e6:.0f}M "
               f"and {params['dense_total']['total'] / 1e6:.0f}M)\n")
    out.append("| B | ms/token: MoE | dense active | dense total | MoE / active | MoE / total | experts read per "
               "layer (expected) | MoE weight MB read | bandwidth fraction: MoE, active, total |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
      m = row["models"]
      ms = {name: m[name]["seconds"]["min"] / row["batch"] * 1e3 for name in MODELS}
      fractions = ", ".join(f"{m[name]['bandwidth_fraction']:.2f}" for name in MODELS)
      out.append(f"| {row['batch']} | {ms['moe']:.3g} | {ms['dense_active']:.3g} | {ms['dense_total']:.3g} | "
                 f"{row['moe_over_dense_active']:.2f} | {row['moe_over_dense_total']:.2f} | "
                 f"{np.mean(row['distinct_experts_per_layer']):.1f} ({row['expected_distinct_experts']:.1f}) | "
                 f"{m['moe']['weight_bytes']['read'] / 1e6:.0f} | {fractions} |")
    active_like = [r["batch"] for r in rows if r["moe_over_dense_active"] <= ACTIVE_LIKE]
    total_like = [r["batch"] for r in rows if r["moe_over_dense_active"] > ACTIVE_LIKE
                  and abs(math.log(r["moe_over_dense_total"])) < abs(math.log(r["moe_over_dense_active"]))]
    gather = [r["batch"] for r in rows if r["models"]["moe"]["weight_bytes"]["expert_gather"]]
    woken = [r["batch"] for r in rows if r["expected_distinct_experts"] >= 0.9 * e]
    one = rows[0]
    out.append(
        f"\nAt B = {one['batch']} the MoE step takes {one['moe_over_dense_active']:.2f}x its equal-active twin's time "
        f"and {one['moe_over_dense_total']:.2f}x its equal-total twin's, reading "
        f"{one['models']['moe']['weight_bytes']['read'] / 1e6:.0f} MB of weights at "
        f"{one['models']['moe']['bandwidth_fraction']:.0%} of the reused-buffer bandwidth ("
        + (f"{one['models']['moe']['bandwidth_fraction_of_reads']:.0%} of the read-only one; "
           if "bandwidth_fraction_of_reads" in one["models"]["moe"] else "")
        + f"the twins {one['models']['dense_active']['bandwidth_fraction']:.0%} and "
        f"{one['models']['dense_total']['bandwidth_fraction']:.0%}). "
        f"It costs like its active parameters (within {ACTIVE_LIKE}x of the equal-active twin) at "
        f"B = {_batches(active_like)}; nearer its total parameters (closer to the equal-total twin's time than to the "
        f"equal-active one's) at B = {_batches(total_like)}. Why: a decode step is a matrix-vector product per "
        f"weight, so its time is the weight bytes it reads while B is small. The B tokens of a step choose "
        f"{k} of {e} experts each, so a layer reads E (1 - (1 - K/E)^B) distinct experts in expectation: "
        + ", ".join(f"{r['expected_distinct_experts']:.1f} at B = {r['batch']}" for r in rows[:4])
        + f", and at least 90% of all {e} from B = {woken[0] if woken else 'beyond ' + str(rows[-1]['batch'])} on "
        f"(measured per layer as in the table). Only at B = {_batches(gather)} (where `dispatch.use_expert_gather` "
        f"took the gather path) does the layer read the chosen experts alone; above, the grouped matmul reads all {e} "
        f"experts, "
        f"the bytes of the equal-total twin. How far the steps are bound by reading weights: the equal-total twin's "
        f"time over the equal-active one's is {_twin_ratio(rows[0]):.2f} at B = {rows[0]['batch']} and "
        f"{_twin_ratio(rows[-1]):.2f} at B = {rows[-1]['batch']}, against the ratio of their parameters, "
        f"{params['dense_total']['total'] / params['dense_active']['total']:.2f}.")
  return "\n".join(out) + "\n"


def write_reading(readme: str, text: str) -> None:
  """Replace what lies between the decode markers of `readme` with `text`; ValueError if the markers are missing."""
  with open(readme) as f:
    content = f.read()
  pattern = re.compile(re.escape(README_BEGIN) + r"\n.*?" + re.escape(README_END), re.DOTALL)
  if not pattern.search(content):
    raise ValueError(f"{readme} has no lines {README_BEGIN!r} ... {README_END!r} to put the decode reading between")
  fileio.write_text(readme, pattern.sub(lambda _: f"{README_BEGIN}\n{text}{README_END}", content))


def report(result: dict, figure: str, readme: str) -> None:
  """Write the figure to `figure` and, when `readme` is set, the reading into it."""
  fig = cost_figure(result)
  os.makedirs(os.path.dirname(os.path.abspath(figure)), exist_ok=True)
  with fileio.atomic_write(figure, "wb") as f:
    fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  print(f"wrote {figure}")
  if readme:
    write_reading(readme, reading(result))
    print(f"wrote the decode reading of {readme}")


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.report_only:
    report(fileio.read_json(args.output), args.figure, args.readme)
    return
  machine = harness.machine_info()
  print(f"{machine['device_count']} {machine['backend']} device(s), {machine['processor']}", flush=True)
  result = run(args)
  config = {k: v for k, v in vars(args).items() if k not in ("output", "figure", "readme", "report_only")}
  result = {"benchmark": "decode", "config": config, "machine": machine, **result}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, result, indent=2)
  print(f"wrote {args.output}")
  report(result, args.figure, args.readme)


if __name__ == "__main__":
  main()
