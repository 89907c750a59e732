"""Training-step time of the Switch `cpu` config (E = 8) and of the same model with E = 64 experts (top-1, the
same expert width: the same active FLOPs per token, 8x the expert parameters) against their dense twin.

  python benchmarks/train_step.py                    # switch-cpu, switch-cpu@64, dense-cpu, async loop: ~4 min
  python benchmarks/train_step.py --loops per_step_sync,async    # also the loop before issue 14
  python benchmarks/train_step.py --d_model 32 --num_layers 2 --batch_size 4 --seq_len 16 --blocks 2 \
      --steps_per_block 2                             # smoke run (tests/test_benchmarks_train_step.py)

A variant is a configs/lm.py name, optionally `@E` for its MoE layers' expert count. The last variant is the
baseline every other one is compared with. Up to two loops over the same model, optimizer, data pipeline and one
CPU device, per variant (--loops; default the current one, async):
  per_step_sync  the loop as it was: `nnx.jit` over the (model, optimizer) objects, the batch prepared on the
                 training thread, and `jax.device_get` of the metrics after every step (the host waits for
                 the device each step);
  async          `moe_jax.train`'s loop: a jitted step over the split state with the state donated, metrics
                 left on device and fetched once per block (as the trainer does every `log_every` steps),
                 batches prepared by a background thread (`runstate.BatchPrefetcher`).
Each loop runs --blocks blocks of --steps_per_block steps after one compiling block; a block's time ends with
its metrics on the host, and the step time is block time / steps. Variants and loops take turns block by block,
so that load from other processes hits all alike. Reported: median / min / max step time, tokens/s, MFU against
the float32 matmul peak measured in the same run (`harness.measure_peaks`, whose other figures are recorded too),
XLA's FLOPs of one compiled step, and the ratios of each variant to the baseline per loop (and per_step_sync / async
per variant when both loops run). JSON at --output (default benchmarks/results/train_step.json). The goal measured
against (issue 34, not asserted): Switch E = 8 within 1.1x of dense.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import flax
import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

from moe_jax import data as data_lib, fileio, flops, parallel, runstate, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "benchmarks", "results", "train_step.json")
LOOPS = ("per_step_sync", "async")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--variants", type=lambda s: s.split(","), default=["switch-cpu", "switch-cpu@64", "dense-cpu"],
                      help="configs/lm.py variants, each optionally @E (experts per MoE layer); each is compared "
                           "against the last")
  parser.add_argument("--loops", type=lambda s: s.split(","), default=["async"],
                      help=f"comma-separated, of {LOOPS}")
  parser.add_argument("--blocks", type=int, default=5, help="timed blocks per loop (median reported)")
  parser.add_argument("--steps_per_block", type=int, default=10)
  for name in ("d_model", "num_layers", "d_ff", "batch_size", "seq_len", "num_experts"):
    parser.add_argument(f"--{name}", type=int, default=None, help="override the config's value")
  parser.add_argument("--data_dir", default=None, help="prepared TFDS cache (default: moe_jax's)")
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  args = parser.parse_args(argv)
  for loop in args.loops:
    if loop not in LOOPS:
      parser.error(f"--loops: {loop!r} must be one of {LOOPS}")
  return args


def load_config(variant: str, args) -> ml_collections.ConfigDict:
  """configs/lm.py's `name` of a variant `name[@E]`, with the command line's overrides and then E."""
  name, _, experts = variant.partition("@")
  spec = importlib.util.spec_from_file_location("lm_configs", os.path.join(REPO, "configs", "lm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(name)
  for name, section in (("d_model", "model"), ("num_layers", "model"), ("d_ff", "model"),
                        ("batch_size", "train"), ("seq_len", "train"), ("num_experts", "moe")):
    if getattr(args, name) is not None:
      config[section][name] = getattr(args, name)
  if args.seq_len is not None:
    config.model.max_seq_len = max(config.model.max_seq_len, args.seq_len)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  if experts:
    config.moe.num_experts = int(experts)
  return config


def per_step_sync_step(train_cfg, seed: int):
  """The training step before this change: nnx.jit over the module objects (no donation)."""
  base_key = jax.random.key(seed)

  @nnx.jit
  def step_fn(model, optimizer, batch, step):
    step_key = jax.random.fold_in(base_key, step)
    nnx.reseed(model, **{name: jax.random.fold_in(step_key, i) for i, name in enumerate(train.RUNTIME_STREAMS)})
    grad_fn = nnx.value_and_grad(
        lambda m: train.lm_loss(m, batch, deterministic=False, aux_loss_weight=train_cfg.aux_loss_weight,
                                z_loss_weight=train_cfg.z_loss_weight), has_aux=True)
    (loss, (ce, aux)), grads = grad_fn(model)
    optimizer.update(model, grads)
    return {"loss": loss, "cross_entropy": ce, "grad_norm": optax.tree.norm(grads)}

  return step_fn


class Runner:
  """One variant: its model and both loops, each advanced a block at a time."""

  def __init__(self, variant: str, args):
    self.variant, self.loops = variant, args.loops
    self.mesh = parallel.create_mesh(1, 1)
    run = runstate.resolve_for_mesh(load_config(variant, args), self.mesh)
    self.config, self.model_cfg = run.typed, runstate.model_config(run)
    self.sharding = runstate.batch_sharding(self.mesh)
    self.tokens_per_step = self.config.train.batch_size * self.config.train.seq_len
    with parallel.mesh_context(self.mesh):
      if "per_step_sync" in self.loops:
        self.sync = self._fresh()
        self.sync_step = per_step_sync_step(self.config.train, self.config.seed)
        self.sync_iter = self._iterator()
      graphdef, self.state = nnx.split(self._fresh())
      self.async_step = train.make_train_step(graphdef, self.config.train, self.config.seed, skip_nonfinite=False)
      self.prefetcher = runstate.BatchPrefetcher(self._iterator(), self.sharding)
      batch, _ = self.prefetcher.next()
      compiled = self.async_step.lower(self.state, batch, np.int32(0)).compile()
      self.xla_flops = float(compiled.cost_analysis().get("flops", float("nan")))
    self.step = 0

  def _fresh(self):
    return runstate.create(self.config, self.model_cfg, self.mesh)

  def _iterator(self):
    train_cfg = self.config.train
    return data_lib.create_iterator(self.config.data, split="train", batch_size=train_cfg.batch_size,
                                    seq_len=train_cfg.seq_len, seed=0, repeat=True)

  def block(self, loop: str, steps: int) -> float:
    """Seconds per step over `steps` steps of `loop`, metrics on the host at the end."""
    start = time.perf_counter()
    with parallel.mesh_context(self.mesh):
      if loop == "per_step_sync":
        model, optimizer = self.sync
        for _ in range(steps):
          batch = runstate.global_batch(next(self.sync_iter), self.sharding)
          jax.device_get(self.sync_step(model, optimizer, batch, np.int32(self.step)))
          self.step += 1
      else:
        pending = []
        for _ in range(steps):
          batch, _ = self.prefetcher.next()
          self.state, metrics = self.async_step(self.state, batch, np.int32(self.step))
          pending.append(metrics)
          self.step += 1
        jax.device_get(pending)
    return (time.perf_counter() - start) / steps

  def close(self) -> None:
    self.prefetcher.close()
    if "per_step_sync" in self.loops:
      self.sync_iter.close()


def summary(times: list[float], tokens_per_step: int, train_flops_per_token: float, peak: float) -> dict:
  median = statistics.median(times)
  return {"median_s": median, "min_s": min(times), "max_s": max(times), "tokens_per_s": tokens_per_step / median,
          "mfu": train_flops_per_token * tokens_per_step / median / peak, "step_times_s": times}


def main(argv=None) -> dict:
  args = parse_args(argv)
  runners = [Runner(v, args) for v in args.variants]
  peaks = harness.measure_peaks()  # float32, as the models train
  peak = peaks["matmul_gflops"] * 1e9
  times = {(r.variant, loop): [] for r in runners for loop in args.loops}
  for r in runners:  # compile and warm every loop
    for loop in args.loops:
      r.block(loop, 2)
  for _ in range(args.blocks):
    for r in runners:
      for loop in args.loops:
        times[(r.variant, loop)].append(r.block(loop, args.steps_per_block))
  results = {}
  for r in runners:
    per_token = flops.flops_per_token(r.model_cfg, r.config.train.seq_len).train
    params = flops.param_count(r.model_cfg)
    results[r.variant] = {
        "tokens_per_step": r.tokens_per_step, "xla_flops_per_step": r.xla_flops,
        "analytic_train_flops_per_step": per_token * r.tokens_per_step,
        "params": params.total, "active_params": params.active,
        "num_experts": r.config.moe.num_experts if r.model_cfg.moe_layer_interval else 0,
        "loops": {loop: summary(times[(r.variant, loop)], r.tokens_per_step, per_token, peak) for loop in args.loops},
    }
    r.close()
  baseline = args.variants[-1]
  ratios = {f"{v}/{baseline}": {loop: results[v]["loops"][loop]["median_s"] / results[baseline]["loops"][loop]["median_s"]
                                for loop in args.loops} for v in args.variants[:-1]}
  if len(args.loops) == len(LOOPS):
    ratios["per_step_sync/async"] = {v: results[v]["loops"]["per_step_sync"]["median_s"] /
                                     results[v]["loops"]["async"]["median_s"] for v in results}
  report = {
      "config": vars(args),
      "platform": {"jax": jax.__version__, "flax": flax.__version__,
                   "optax": optax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                   "machine": platform.machine(), "processor": platform.processor(),
                   "peak_matmul_flops_per_s": peak},
      "machine": harness.machine_info(),
      "peaks": peaks,
      "variants": results,
      "ratios": ratios,
  }
  print(f"{jax.default_backend()}, one device, median of {args.blocks} blocks of {args.steps_per_block} steps; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s")
  for variant, result in results.items():
    for loop, s in result["loops"].items():
      print(f"  {variant:14s} {loop:14s} step {s['median_s'] * 1e3:7.1f} ms (min {s['min_s'] * 1e3:.1f}, max "
            f"{s['max_s'] * 1e3:.1f})  {s['tokens_per_s']:8.0f} tokens/s  MFU {s['mfu']:.3f}")
  for name, values in ratios.items():
    print(f"  {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in values.items()))
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, report, indent=2)  # atomically: a stopped run never leaves half a result
  print(f"wrote {args.output}")
  return report


if __name__ == "__main__":
  main()
