"""Decode-step cost of a MoE against its two dense twins, as the batch grows (issue 32 item 6).

  python benchmarks/decode.py [--d_model 1024 --presets mixtral:8:2:3584,olmoe:64:8:512 --batches 1,2,4,...,256]
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
    gather path (2 * B * K <= E), all E experts otherwise (the grouped matmuls walk every expert), and the ideal
    (`distinct` experts only);
  distinct experts touched per layer at that step (from the routing of the step's tokens, `tracing.capture_routing`
    on the sequences so far, which the cached step reproduces), against the expected E * (1 - (1 - K/E)^B) of
    uniform independent choices;
  achieved bandwidth = weight bytes read / min seconds, as a fraction of `harness.measure_peaks()['memory_gbps']`
    measured in the same run (a reused, donated buffer: memory, not page faults);
  memory held: the decoder's weights and KV cache (array bytes), against experiments/model_stats.py's inference
    figures (bf16 there, rescaled to the run's float32).
Timing includes the step's host work (token upload, logits left on the device). Results: JSON at --output (default
benchmarks/results/decode.json), written atomically (`moe_jax.fileio`).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax import config_lib, decode, dispatch, fileio, flops, models, tracing  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "decode.json")
MODEL_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                           "model_stats.py")
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
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
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


def run(args) -> dict:
  peaks = harness.measure_peaks(copy_mib=args.peak_mib)
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
  return {"peaks": peaks, "presets": presets}


def main(argv=None) -> None:
  args = parse_args(argv)
  machine = harness.machine_info()
  print(f"{machine['device_count']} {machine['backend']} device(s), {machine['processor']}", flush=True)
  result = run(args)
  config = {k: v for k, v in vars(args).items() if k != "output"}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, {"benchmark": "decode", "config": config, "machine": machine, **result}, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
