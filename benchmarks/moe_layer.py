"""Forward + backward time of the MoE layer per dispatch backend, against a dense FFN of equal FLOPs per token,
with each variant's roofline on this machine.

  python benchmarks/moe_layer.py                   # full default run (about ten minutes on 2 quiet cores)
  python benchmarks/moe_layer.py --tokens 256 --d_model 32 --d_ff 64 --group_size 64 --experts 4,8 \
      --repeats 1 --sharded_experts "" --output /tmp/moe_layer.json    # smoke run (tests/test_benchmarks.py)

What is timed: one jitted `value_and_grad` of sum(layer(x) * r) (+ the load-balancing loss for MoE) wrt the
params and x, r a fixed random cotangent (an all-ones cotangent lets XLA drop matmuls and flatters the
dense baseline). Switch top-1 routing, training mode (capacity_factor; the dropless backends route with
dropless=True), one device. Compile first, then --repeats timed calls of every variant in turn (so load from
other processes hits all alike); median, min and max are recorded, and ratios to the dense FFN timed in
the same run, of medians and of minima (on a shared machine the minimum is the least disturbed estimate).
The dense baseline is `FeedForward` with the same d_model and d_ff: the FLOPs per token of a top-1 expert.
All backends share one set of parameters per E.

Routing groups: x is [tokens / group_size, group_size, M], one routing group per row (MoeConfig.group_size
= 0), the same for every backend. The einsum backend's one-hot tensors grow as group_size^2 per group.

Roofline. The run first measures this machine's matmul throughput and memory bandwidth (harness.measure_peaks).
For every variant it records XLA's cost analysis (FLOPs, bytes accessed; while-loop bodies counted once, so
the tiled dropless backend's figures are far too low there) and a model of the work it cannot avoid:
  rows     rows through the expert FFN: tokens (dense), E*G*C capacity slots (einsum, gather), kept assignments
           plus tile padding (dropless: counted on the benchmark's own routing), E * assignments (ragged_dot,
           tokamax where it is a masked dense dot, i.e. not on GPU/TPU);
  FLOPs    6 * rows * M * F * projections (forward + two backward products), + the einsum one-hot products;
  bytes    3 * expert params (weights read forward and backward, gradient written) + 2 * rows * F * inputs
           (hidden activations written and read back) + 4 * rows * M (FFN inputs and outputs, both passes);
and the time bounds they imply at the measured peaks: `overlap` = max(compute, memory), `serial` = their sum.
A measured ratio far above the bound ratio is overhead; a bound ratio above 1 is physics (e.g. at E = 256
the expert weights alone are 256x the dense FFN's).

Skips, listed in the output: a combination whose estimated memory exceeds --memory_limit_gb, or whose
model FLOPs exceed --max_flop_ratio times the dense FLOPs (ragged_dot on CPU at large E).

Expert parallelism: the gather layer on an 8-device shard_map mesh (--mesh, default 1x8) against the same
layer on one device, same total work, in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
Emulated devices share the machine's cores: this measures the overhead of the sharded program, not a speed-up.

Results: tables on stdout and JSON at --output (default benchmarks/results/moe_layer.json); see
benchmarks/README.md for the figures and how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)

from moe_jax import dispatch, experts, fileio, parallel, routing  # noqa: E402
from moe_jax.moe_layer import DTYPES, FeedForward, MoeConfig, MoeFeedForward  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "moe_layer.json")
BACKENDS = tuple(dispatch.BACKENDS)
INSTALLED = tuple(name for name in BACKENDS if name not in dispatch.OPTIONAL or name in dispatch.installed_optional())


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(v) for v in s.split(",") if v]
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--experts", type=ints, default=[8, 32, 128, 256], help="comma-separated E values")
  parser.add_argument("--backends", type=lambda s: s.split(","), default=list(INSTALLED),
                      help="comma-separated; default: every backend whose package is installed")
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--group_size", type=int, default=1024, help="tokens per routing group")
  parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
  parser.add_argument("--memory_limit_gb", type=float, default=8.0, help="skip combinations estimated above this")
  parser.add_argument("--max_flop_ratio", type=float, default=12.0,
                      help="skip combinations whose model FLOPs exceed this multiple of dense (ragged_dot on CPU)")
  parser.add_argument("--sharded_experts", type=ints, default=[8, 32, 128, 256], help="E values for the shard_map "
                      "overhead part (gather backend); empty to skip it")
  parser.add_argument("--mesh", default="1x8", help="data x expert mesh of the shard_map part")
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--sharded_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for backend in args.backends:
    if backend not in BACKENDS:
      parser.error(f"--backends: {backend!r} must be one of {BACKENDS}")
  if args.tokens % args.group_size:
    parser.error(f"--group_size={args.group_size} must divide --tokens={args.tokens}")
  return args


# ----------------------------------------------------------------------------------------------------------
# Layers and their compiled steps.


def moe_config(args, backend: str, num_experts: int) -> MoeConfig:
  return MoeConfig(
      num_experts=num_experts, capacity_factor=args.capacity_factor, dispatch=backend, dropless=backend in dispatch.RAGGED
  )


def build(args, backend: str | None, num_experts: int):
  """(graph, params, rest) of the dense FFN (backend None) or the MoE layer."""
  dtype = DTYPES[args.dtype]
  if backend is None:
    layer = FeedForward(args.d_model, args.d_ff, dtype=dtype, rngs=nnx.Rngs(0))
  else:
    layer = MoeFeedForward(args.d_model, args.d_ff, moe_config(args, backend, num_experts), dtype=dtype,
                           rngs=nnx.Rngs(0))
  return nnx.split(layer, nnx.Param, ...)


def layer_loss(graph, rest, cotangent):
  """loss(params, x) = sum(layer(x) * cotangent) (+ the load-balancing loss of an MoE layer), for the layer
  nnx.merge(graph, params, rest)."""

  def loss(params, x):
    out = nnx.merge(graph, params, rest)(x, deterministic=False)
    if isinstance(out, tuple):
      out, aux = out
      return jnp.sum((out * cotangent).astype(jnp.float32)) + aux.load_balancing_loss
    return jnp.sum((out * cotangent).astype(jnp.float32))

  return loss


def compile_step(graph, params, rest, cotangent, x):
  """Compiled value_and_grad of `layer_loss` wrt (params, x)."""
  return jax.jit(jax.value_and_grad(layer_loss(graph, rest, cotangent), argnums=(0, 1))).lower(params, x).compile()


def inputs(args):
  k_x, k_r = jax.random.split(jax.random.key(0))
  shape = (args.tokens // args.group_size, args.group_size, args.d_model)
  dtype = DTYPES[args.dtype]
  return jax.random.normal(k_x, shape, dtype), jax.random.normal(k_r, shape, dtype)


# ----------------------------------------------------------------------------------------------------------
# Work model.


def expert_rows(args, backend: str | None, num_experts: int, router_kernel, x) -> int:
  """Rows through the expert FFN (module docstring), counted on this run's routing for the dropless backends."""
  tokens, groups = args.tokens, args.tokens // args.group_size
  if backend is None:
    return tokens
  if backend in ("einsum", "gather"):
    return num_experts * groups * routing.compute_capacity(args.group_size, num_experts, args.capacity_factor)
  if backend in ("ragged_dot", "tokamax"):  # tokamax falls back to XLA's ragged_dot where it has no kernel
    return tokens if jax.default_backend() in dispatch.NATIVE_RAGGED_DOT else num_experts * tokens

  @jax.jit
  def padded_rows(x, kernel):
    route = routing.switch_route(routing.router_logits(x, kernel), dropless=True)
    counts = jnp.sum(jax.nn.one_hot(route.expert_index[..., 0], num_experts, dtype=jnp.int32), axis=(0, 1))
    layout = experts.block_layout(counts, tokens)
    return jnp.sum((counts + layout.tiles[-1] - 1) // layout.tiles[-1] * layout.tiles[-1])

  return int(padded_rows(x, router_kernel))


def work_model(args, backend: str | None, num_experts: int, rows: int) -> dict:
  """Model FLOPs and bytes of one forward + backward (module docstring)."""
  m, f, itemsize = args.d_model, args.d_ff, jnp.dtype(DTYPES[args.dtype]).itemsize
  projections, inputs_per_row = 2, 1  # gelu: wi_0 and wo; gated activations would add wi_1
  params = (1 if backend is None else num_experts) * projections * m * f
  flop = 6 * rows * m * f * projections
  if backend == "einsum":  # dispatch and combine einsums [G, S, E, C] x [G, S, M], forward and backward
    capacity = routing.compute_capacity(args.group_size, num_experts, args.capacity_factor)
    flop += 3 * 2 * 2 * args.tokens * num_experts * capacity * m
  moved = itemsize * (3 * params + 2 * rows * f * inputs_per_row + 4 * rows * m)
  return {"rows": rows, "gflop": flop / 1e9, "gbytes": moved / 1e9, "params": params}


def estimated_bytes(args, backend: str | None, num_experts: int, rows: int) -> float:
  """Rough peak memory of one forward + backward: params and grads, hidden activations and their gradients,
  the einsum one-hot tensors."""
  itemsize = jnp.dtype(DTYPES[args.dtype]).itemsize
  params = 4 * (1 if backend is None else num_experts) * args.d_model * args.d_ff
  one_hot = 0
  if backend == "einsum":
    capacity = routing.compute_capacity(args.group_size, num_experts, args.capacity_factor)
    one_hot = 6 * args.tokens * num_experts * capacity
  return itemsize * (params + 4 * rows * args.d_ff + 8 * rows * args.d_model + one_hot)


# ----------------------------------------------------------------------------------------------------------
# Runs.


def run_single_device(args, peaks: dict) -> list[dict]:
  limit = args.memory_limit_gb * 2**30
  x, cotangent = inputs(args)
  rows = []
  for num_experts in args.experts:
    graph, dense_params, rest = build(args, None, num_experts)
    dense_rows = expert_rows(args, None, num_experts, None, x)
    variants = {"dense": {"work": work_model(args, None, num_experts, dense_rows)}}
    compiled = {"dense": (compile_step(graph, dense_params, rest, cotangent, x), dense_params)}
    # The backends' layers differ only in static config: one set of parameters (and RNG state) serves all.
    _, params, rest = build(args, args.backends[0], num_experts)
    router_kernel = params["router"][...]
    for backend in args.backends:
      work = work_model(args, backend, num_experts, expert_rows(args, backend, num_experts, router_kernel, x))
      variants[backend] = {"work": work}
      need = estimated_bytes(args, backend, num_experts, work["rows"])
      if need > limit:
        variants[backend]["skipped"] = f"estimated {need / 2**30:.1f} GiB > --memory_limit_gb"
        continue
      if work["gflop"] > args.max_flop_ratio * variants["dense"]["work"]["gflop"]:
        variants[backend]["skipped"] = f"{work['gflop'] / variants['dense']['work']['gflop']:.0f}x the dense " \
                                       "FLOPs > --max_flop_ratio"
        continue
      graph, _, _ = nnx.split(nnx.eval_shape(lambda: MoeFeedForward(
          args.d_model, args.d_ff, moe_config(args, backend, num_experts), dtype=DTYPES[args.dtype],
          rngs=nnx.Rngs(0))), nnx.Param, ...)
      compiled[backend] = (compile_step(graph, params, rest, cotangent, x), params)
    for name, (step, _) in compiled.items():
      variants[name]["xla"] = harness.cost(step)
    times = harness.time_interleaved(
        {name: (lambda step=step, p=p: step(p, x)) for name, (step, p) in compiled.items()}, args.repeats
    )
    dense_time = harness.summary(times["dense"])
    dense_bound = harness.roofline_seconds(variants["dense"]["work"]["gflop"], variants["dense"]["work"]["gbytes"],
                                           peaks)
    for name, variant in variants.items():
      bound = harness.roofline_seconds(variant["work"]["gflop"], variant["work"]["gbytes"], peaks)
      variant["bound_seconds"] = bound
      variant["bound_ratio_vs_dense"] = {k: bound[k] / dense_bound[k] for k in ("overlap", "serial")}
      if name in times:
        seconds = harness.summary(times[name])
        variant["seconds"] = seconds
        variant["ratio_vs_dense"] = {"median": seconds["median"] / dense_time["median"],
                                     "min": seconds["min"] / dense_time["min"]}
    if "dropless" in variants:
      variants["dropless"]["tiles"] = list(experts.default_tiles(args.tokens, num_experts))
    row = {"experts": num_experts, "variants": variants}
    print(f"  E={num_experts:4d} " + ", ".join(
        f"{name} {v['ratio_vs_dense']['min']:.2f}x" for name, v in variants.items() if "ratio_vs_dense" in v
    ), file=sys.stderr, flush=True)
    del compiled, params, rest
    rows.append(row)
  return rows


def run_sharded_worker(args) -> list[dict]:
  """In the 8-device subprocess: the gather layer on one device vs under shard_map on --mesh."""
  data, expert = (int(v) for v in args.mesh.split("x"))
  x, cotangent = inputs(args)
  rows = []
  for num_experts in args.sharded_experts:
    graph, params, rest = build(args, "gather", num_experts)  # no mesh: device 0 only
    single = compile_step(graph, params, rest, cotangent, x)
    single_params = params
    with parallel.mesh_context(parallel.create_mesh(data, expert)):
      # Created under nnx.jit: eager init ops under a mesh run replicated on every device (8x the memory).
      layer = nnx.jit(lambda: MoeFeedForward(args.d_model, args.d_ff, moe_config(args, "gather", num_experts),
                                              dtype=DTYPES[args.dtype], rngs=nnx.Rngs(0)))()
      graph, params, rest = nnx.split(layer, nnx.Param, ...)
      sharded = compile_step(graph, params, rest, cotangent, x)
      times = harness.time_interleaved(
          {"single": lambda: single(single_params, x), "sharded": lambda: sharded(params, x)}, args.repeats
      )
    seconds = {name: harness.summary(values) for name, values in times.items()}
    rows.append({
        "experts": num_experts,
        "mesh": args.mesh,
        "single_device_seconds": seconds["single"],
        "sharded_seconds": seconds["sharded"],
        "overhead": {k: seconds["sharded"][k] / seconds["single"][k] for k in ("median", "min")},
    })
    print(f"  sharded E={num_experts:4d} overhead {rows[-1]['overhead']}", file=sys.stderr, flush=True)
    del single, sharded, params, rest, single_params
  return rows


def run_sharded(args, argv) -> list[dict] | dict:
  data, expert = (int(v) for v in args.mesh.split("x"))
  devices = data * expert
  if (args.tokens // args.group_size) % devices:
    return {"skipped": f"{args.tokens // args.group_size} routing groups do not split over {devices} devices"}
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
             f"--xla_force_host_platform_device_count={devices}".strip())
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), *argv, "--sharded_worker"],
      env=env, stdout=subprocess.PIPE, text=True, check=True,
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], names: list[str]) -> str:
  """Per E and variant: time / dense time of minima (of medians), then the roofline bound ratio."""
  header = f"{'E':>5} {'dense s':>8} " + " ".join(f"{name:>22}" for name in names)
  lines = [header, "-" * len(header)]
  for row in rows:
    dense = row["variants"]["dense"]
    cells = []
    for name in names:
      variant = row["variants"][name]
      if "ratio_vs_dense" not in variant:
        cells.append(f"{'skipped':>22}")
        continue
      ratio, bound = variant["ratio_vs_dense"], variant["bound_ratio_vs_dense"]["overlap"]
      cells.append(f"{ratio['min']:5.2f}x ({ratio['median']:4.2f}x) b{bound:5.2f}x")
    lines.append(f"{row['experts']:>5} {dense['seconds']['min']:8.3f} " + " ".join(cells))
  return "\n".join(lines)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.sharded_worker:
    print(json.dumps(run_sharded_worker(args)))
    return

  machine = harness.machine_info()
  print(f"{machine['device_count']} {machine['backend']} device(s), {machine['processor']}; {args.tokens} tokens, "
        f"d_model {args.d_model}, d_ff {args.d_ff}, capacity factor {args.capacity_factor}, routing groups of "
        f"{args.group_size}, {args.dtype}, {args.repeats} repeats", flush=True)
  peaks = harness.measure_peaks(DTYPES[args.dtype])
  print(f"measured: matmul {peaks['matmul_gflops']:.0f} GFLOP/s, memory {peaks['memory_gbps']:.1f} GB/s", flush=True)
  rows = run_single_device(args, peaks)
  print("\nforward+backward time / dense FFN time: ratio of minima (of medians) and the roofline bound ratio b")
  print(format_table(rows, args.backends))
  for row in rows:
    for name, variant in row["variants"].items():
      if "skipped" in variant:
        print(f"  skipped E={row['experts']} {name}: {variant['skipped']}")

  sharded = []
  if args.sharded_experts:
    sharded = run_sharded(args, argv)
    print(f"\nshard_map overhead, gather backend, mesh {args.mesh} (emulated devices on {os.cpu_count()} cores) "
          "vs one device, same total work, ratio of minima")
    if isinstance(sharded, dict):
      print(f"  skipped: {sharded['skipped']}")
    else:
      for row in sharded:
        print(f"  E={row['experts']:4d}: single {row['single_device_seconds']['min']:.3f}s, sharded "
              f"{row['sharded_seconds']['min']:.3f}s, overhead {row['overhead']['min']:.2f}x")

  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, {
      "benchmark": "moe_layer",
      "config": {k: v for k, v in vars(args).items() if k not in ("sharded_worker", "output")},
      "machine": machine,
      "peaks": peaks,
      "single_device": rows,
      "sharded": sharded,
  }, indent=2)  # atomically: a stopped run never leaves half a result
  print(f"\nwrote {args.output}")


if __name__ == "__main__":
  main()
