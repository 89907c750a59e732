"""The layer and training-step part of the GPU benchmarks (`benchmarks/gpu.sh` runs it with the grouped-matmul
lowering check, benchmarks/hlo_check.py, and the decode benchmark): bfloat16 MoE layer ratios per backend, and one
training step of a Switch LM against its dense twin and a 64-expert MoE of the same active FLOPs.

  bash benchmarks/gpu.sh            # on one H100/H200: a few minutes including compilation
  python benchmarks/gpu.py --tiny   # the same program at toy sizes on CPU (tests/test_benchmarks.py)

Needs only jax, flax, optax (and numpy): no ml_collections, grain or tensorflow-datasets, no network. It
imports the model modules directly (routing, dispatch, experts, moe_layer, model, flops), builds the model
from its dataclass configs and trains on synthetic tokens; the JSON records every module it imported that
is not allowed on the GPU machine (there must be none).

Parts, all in one JSON (--output, default benchmarks/results/gpu.json):
  1. layer: `benchmarks/moe_layer.py`'s single-device run in bfloat16 at E = 8, 16, 64 for every installed backend
     and the dense FFN (ratios of the same run, XLA cost, roofline at this device's measured peaks).
  2. train_step: seconds per step, tokens/s and MFU (against the matmul peak measured in the same run) of a
     ~100M-parameter decoder LM: dense; Switch (top-1, 8 experts every other block) with the capacity ('gather')
     and the platform's dropless backend ('auto', `dispatch.resolve_backend`); and top-1 over 64 experts of the same
     width (the same active FLOPs per token, 8x the expert parameters) with the dropless backend.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import moe_layer as layer_benchmark  # noqa: E402  (benchmarks/moe_layer.py)

from moe_jax import dispatch, fileio, flops, models, parallel  # noqa: E402
from moe_jax.model import ModelConfig  # noqa: E402
from moe_jax.moe_layer import MoeConfig  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.json")
FORBIDDEN = ("ml_collections", "grain", "tensorflow_datasets", "tensorflow")

# (layer benchmark arguments, model sizes, train batch) for the real and the tiny run.
SIZES = {
    "full": dict(
        layer=["--tokens", "65536", "--d_model", "1024", "--d_ff", "4096", "--group_size", "1024",
               "--experts", "8,16,64", "--repeats", "10", "--memory_limit_gb", "60", "--max_flop_ratio", "80"],
        model=dict(vocab_size=32768, d_model=768, num_heads=12, head_dim=64, d_ff=3072, num_layers=12,
                   max_seq_len=1024),
        batch=(32, 1024), steps=10, peaks=dict(matmul_size=8192, copy_mib=1024),
    ),
    "tiny": dict(
        layer=["--tokens", "128", "--d_model", "16", "--d_ff", "32", "--group_size", "64", "--experts", "8",
               "--repeats", "1"],
        model=dict(vocab_size=64, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_layers=2, max_seq_len=16),
        batch=(2, 16), steps=1, peaks=dict(matmul_size=256, copy_mib=8),
    ),
}


def _time_training(name: str, moe: MoeConfig | None, model_sizes: dict, inputs, targets, steps: int,
                   peaks: dict) -> dict:
  """One variant of `train_step_comparison`, on a one-device mesh (the model's params carry logical axes)."""
  batch_size, seq_len = inputs.shape
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    cfg = ModelConfig(**model_sizes, moe_layer_interval=0 if moe is None else 2, moe=moe, dtype="bfloat16")
    model = models.build(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, inputs, targets):
      def loss_fn(model):
        logits, aux = model(inputs, deterministic=False)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
        return ce + 1e-2 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss

      loss, grads = nnx.value_and_grad(loss_fn)(model)
      optimizer.update(model, grads)
      return loss

    start = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer, inputs, targets))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(train_step(model, optimizer, inputs, targets))
      times.append(time.perf_counter() - start)
    seconds = harness.summary(times)
    train_flop = flops.flops_per_token(cfg, seq_len).train * batch_size * seq_len
    result = {
        "params": flops.param_count(cfg).total,
        "active_params": flops.param_count(cfg).active,
        "dispatch": None if moe is None else moe.dispatch,
        "first_step_seconds": compile_seconds,
        "seconds": seconds,
        "tokens_per_second": batch_size * seq_len / seconds["median"],
        "mfu_vs_measured_matmul_peak": train_flop / seconds["median"] / (peaks["matmul_gflops"] * 1e9),
    }
  print(f"  train {name}: {seconds['median'] * 1e3:.1f} ms/step, {result['params'] / 1e6:.0f}M params",
        file=sys.stderr, flush=True)
  return result


def train_step_comparison(model_sizes: dict, batch: tuple[int, int], steps: int, peaks: dict) -> dict:
  """Seconds per training step (AdamW, bfloat16 compute, synthetic tokens) of dense vs Switch variants."""
  batch_size, seq_len = batch
  auto = dispatch.resolve_backend("auto", jax.default_backend(), distributed=False)
  variants = {
      "dense": None,
      "switch_gather": MoeConfig(num_experts=8, capacity_factor=1.25, dispatch="gather"),
      f"switch_{auto}": MoeConfig(num_experts=8, dropless=True, dispatch=auto),
      f"moe64_{auto}": MoeConfig(num_experts=64, dropless=True, dispatch=auto),  # same active FLOPs, top-1
  }
  tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len + 1), 0, model_sizes["vocab_size"])
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  results = {}
  for name, moe in variants.items():
    results[name] = _time_training(name, moe, model_sizes, inputs, targets, steps, peaks)
  for name, result in results.items():
    result["ratio_vs_dense"] = result["seconds"]["median"] / results["dense"]["seconds"]["median"]
  return {"batch": batch_size, "seq_len": seq_len, "variants": results}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tiny", action="store_true", help="toy sizes, for a CPU smoke test")
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  sizes = SIZES["tiny" if args.tiny else "full"]
  start = time.perf_counter()

  machine = harness.machine_info()
  print(f"{machine['device_count']} x {machine['device_kind']} ({machine['backend']})", flush=True)
  peaks = harness.measure_peaks(jnp.bfloat16, **sizes["peaks"])
  print(f"measured: bf16 matmul {peaks['matmul_gflops'] / 1e3:.1f} TFLOP/s, memory {peaks['memory_gbps']:.0f} GB/s",
        flush=True)

  layer_args = layer_benchmark.parse_args(sizes["layer"] + ["--dtype", "bfloat16", "--sharded_experts", ""])
  layer_rows = layer_benchmark.run_single_device(layer_args, peaks)
  print("\nMoE layer, bfloat16: forward+backward time / dense FFN time, ratio of minima (of medians), bound ratio b")
  print(layer_benchmark.format_table(layer_rows, layer_args.backends))

  train = train_step_comparison(sizes["model"], sizes["batch"], sizes["steps"], peaks)
  print("\ntraining step (median):")
  for name, result in train["variants"].items():
    print(f"  {name:>20}: {result['seconds']['median'] * 1e3:8.1f} ms  {result['ratio_vs_dense']:.2f}x dense  "
          f"{result['tokens_per_second']:,.0f} tokens/s  MFU {result['mfu_vs_measured_matmul_peak']:.1%}")

  forbidden = sorted(name for name in sys.modules if name.split(".")[0] in FORBIDDEN)
  total = time.perf_counter() - start
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, {
      "benchmark": "gpu",
      "tiny": args.tiny,
      "machine": machine,
      "peaks": peaks,
      "layer": {"config": {k: v for k, v in vars(layer_args).items() if k not in ("sharded_worker", "output")},
                "rows": layer_rows},
      "train_step": train,
      "forbidden_modules_imported": forbidden,
      "total_seconds": total,
  }, indent=2)  # atomically: a stopped run never leaves half a result
  print(f"\n{total:.0f} s in all; wrote {args.output}")


if __name__ == "__main__":
  main()
