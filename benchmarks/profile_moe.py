"""Where the MoE layer's forward + backward spends its time at large E (issue 34 item 2), and what the candidate
fixes change: per-op times from XLA's own trace, bytes the compiled program allocates, and page faults per call.

  python benchmarks/profile_moe.py                  # E = 32, 128, 256 at moe_layer.py's sizes: ~8 min on 2 cores
  python benchmarks/profile_moe.py --tokens 128 --d_model 16 --d_ff 32 --group_size 64 --experts 8 \\
      --repeats 1 --output /tmp/profile_moe.json   # smoke run (tests/test_benchmarks.py)

The layer, inputs and loss are benchmarks/moe_layer.py's (Switch top-1, float32, routing groups of --group_size,
`value_and_grad` of sum(layer(x) * r) wrt the params and x). Variants per E:
  dense                    the dense FFN of the same widths (the baseline)
  gather, dropless         the two backends, as moe_layer.py times them
  dropless_sgd             dropless plus an SGD update that returns new params (a training step's shape: the
                           expert-weight gradients feed an update instead of leaving the program)
  dropless_sgd_donated     the same with the params donated, so the new params reuse their buffers (buffer reuse:
                           no fresh output pages per call for E x 2 x M x F weights)
  dropless_bf16            bfloat16 expert weights and compute: half the weight and gradient bytes
For each: `compiled.memory_analysis()` (argument, output, alias and temp bytes: what a call allocates), page faults
per call (minor = first touch of a fresh page, major = read from disk) from getrusage around --repeats calls after a
warm-up, their bytes at the page size (the bytes first-touched per call), the seconds of those calls, and, from one
call under `jax.profiler.trace`, XLA's time per HLO op (the runtime's events, summed per op name; a while body's ops
once per iteration), grouped into categories (matmul, gather, scatter, sort, slice, reduce, copy, elementwise) by
the op's opcode or the opcodes its fusion calls, with jax's op_name for the top ops.

Allocators (--allocators): the same measurement in a subprocess per allocator, for the variants of
--allocator_variants at --allocator_experts: 'default' (glibc malloc as is), 'glibc_no_mmap'
(GLIBC_TUNABLES: never mmap, never trim: freed pages stay mapped and are reused; no package needed), 'jemalloc' and
'tcmalloc' (LD_PRELOAD of the distribution's libjemalloc.so.2 / libtcmalloc_minimal.so.4 where installed, e.g.
`apt-get install libjemalloc2 libtcmalloc-minimal4`; recorded as skipped otherwise). Page-fault counts do not depend
on the machine's load; times do (use a quiet machine). JSON at --output (default benchmarks/results/profile_moe.json).
"""

from __future__ import annotations

import argparse
import collections
import ctypes.util
import glob
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (benchmarks/ is not a package)
import moe_layer  # noqa: E402

from moe_jax import fileio  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "profile_moe.json")
VARIANTS = ("dense", "gather", "dropless", "dropless_sgd", "dropless_sgd_donated", "dropless_bf16")
LEARNING_RATE = 1e-6  # small, so that repeated donated updates keep the params' scale
# allocator -> (shared object, ctypes name, Debian package)
ALLOCATOR_LIBRARIES = {"jemalloc": ("libjemalloc.so.2", "jemalloc", "libjemalloc2"),
                       "tcmalloc": ("libtcmalloc_minimal.so.4", "tcmalloc_minimal", "libtcmalloc-minimal4")}
CONTAINERS = ("while", "conditional", "call")  # ops whose events enclose their body's: not counted themselves
# Never serve an allocation by mmap and never give the heap's top back: what is freed is reused, already mapped.
GLIBC_NO_MMAP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
# Categories of an HLO op by the opcodes it runs, first match wins.
CATEGORIES = (("matmul", ("dot", "convolution", "ragged-dot", "custom-call")), ("scatter", ("scatter",)),
              ("gather", ("gather",)), ("sort", ("sort",)), ("slice", ("dynamic-slice", "dynamic-update-slice")),
              ("reduce", ("reduce", "reduce-window")), ("copy", ("copy", "transpose", "concatenate", "pad")))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ints = lambda s: [int(v) for v in s.split(",") if v]
  names = lambda s: [v for v in s.split(",") if v]
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--d_model", type=int, default=512)
  parser.add_argument("--d_ff", type=int, default=2048)
  parser.add_argument("--group_size", type=int, default=1024)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--experts", type=ints, default=[32, 128, 256])
  parser.add_argument("--variants", type=names, default=list(VARIANTS))
  parser.add_argument("--repeats", type=int, default=2, help="calls counted for faults and seconds, after a warm-up")
  parser.add_argument("--no_trace", action="store_true", help="skip the per-op trace (faults and bytes only)")
  parser.add_argument("--allocators", type=names, default=["glibc_no_mmap", "jemalloc", "tcmalloc"],
                      help="besides the default allocator; empty to skip")
  parser.add_argument("--allocator_experts", type=ints, default=[256])
  parser.add_argument("--allocator_variants", type=names, default=["dense", "dropless", "dropless_sgd_donated"])
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # an allocator's subprocess
  args = parser.parse_args(argv)
  for name in args.variants + args.allocator_variants:
    if name not in VARIANTS:
      parser.error(f"variant {name!r} must be one of {VARIANTS}")
  for name in args.allocators:
    if name not in ("glibc_no_mmap", *ALLOCATOR_LIBRARIES):
      parser.error(f"--allocators: {name!r} must be one of {('glibc_no_mmap', *ALLOCATOR_LIBRARIES)}")
  if args.tokens % args.group_size:
    parser.error(f"--group_size={args.group_size} must divide --tokens={args.tokens}")
  return args


def layer_args(args, dtype: str) -> argparse.Namespace:
  """moe_layer.py's arguments for the same layer."""
  return moe_layer.parse_args(["--tokens", str(args.tokens), "--d_model", str(args.d_model), "--d_ff", str(args.d_ff),
                               "--group_size", str(args.group_size), "--capacity_factor", str(args.capacity_factor),
                               "--dtype", dtype])


def step_of(variant: str, args, num_experts: int):
  """(compiled step, a function making its next call) for one variant."""
  dtype = "bfloat16" if variant.endswith("_bf16") else "float32"
  largs = layer_args(args, dtype)
  backend = None if variant == "dense" else variant.split("_")[0]
  graph, params, rest = moe_layer.build(largs, backend, num_experts)
  if dtype == "bfloat16":
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  x, cotangent = moe_layer.inputs(largs)
  grad = jax.value_and_grad(moe_layer.layer_loss(graph, rest, cotangent), argnums=(0, 1))
  if "_sgd" not in variant:
    compiled = jax.jit(grad).lower(params, x).compile()
    return compiled, lambda: compiled(params, x)

  def sgd(params, x):
    loss, (grads, dx) = grad(params, x)
    return loss, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), dx

  donate = (0,) if variant.endswith("_donated") else ()
  compiled = jax.jit(sgd, donate_argnums=donate).lower(params, x).compile()
  state = [params]

  def call():
    loss, state[0], dx = compiled(state[0], x)
    return loss, dx

  return compiled, call


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (category, jax op_name), from the compiled module's text; loops and calls left out
  (`CONTAINERS`: the ops of their bodies are listed themselves)."""
  opcodes: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes in it
  instructions = {}
  computation = ""
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*->.*\{\s*$", line)
    if header:
      computation = header.group(1)
      continue
    match = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\(", line)
    if not match:
      continue
    name, opcode = match.groups()
    opcodes[computation].add(opcode)
    callee = re.search(r"\bcalls=%?([\w.\-]+)", line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    instructions[name] = (opcode, callee.group(1) if callee and opcode == "fusion" else None,
                          op_name.group(1) if op_name else "")
  result = {}
  for name, (opcode, callee, op_name) in instructions.items():
    if opcode in CONTAINERS:
      continue
    ran = opcodes.get(callee, set()) if callee else {opcode}
    category = next((label for label, members in CATEGORIES if ran & set(members)), "elementwise")
    result[name] = (category, op_name)
  return result


def op_times(call, hlo_text: str, top: int = 12) -> dict:
  """XLA's time per HLO op over one call, from the runtime's trace events."""
  categories = hlo_categories(hlo_text)
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      jax.block_until_ready(call())
    (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    profile = ProfileData.from_file(path)
    per_op = collections.Counter()
    for plane in profile.planes:
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):  # the runtime's threads; the python line holds the dispatch
          for event in line.events:
            if event.name in categories:
              per_op[event.name] += event.duration_ns / 1e9
  by_category = collections.Counter()
  for name, seconds in per_op.items():
    by_category[categories[name][0]] += seconds
  return {"total_seconds": sum(per_op.values()), "by_category": dict(by_category.most_common()),
          "top_ops": [{"op": name, "category": categories[name][0], "op_name": categories[name][1],
                       "seconds": seconds} for name, seconds in per_op.most_common(top)]}


def faults() -> tuple[int, int]:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_minflt, usage.ru_majflt


def measure(variant: str, args, num_experts: int, trace: bool) -> dict:
  compiled, call = step_of(variant, args, num_experts)
  memory = compiled.memory_analysis()
  jax.block_until_ready(call())  # warm-up: first touches of the arguments and code
  seconds = []
  minor, major = faults()
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - start)
  minor_after, major_after = faults()
  page = resource.getpagesize()
  result = {
      "memory_bytes": {name: int(getattr(memory, f"{name}_size_in_bytes")) for name in
                       ("argument", "output", "alias", "temp", "generated_code")},
      "faults_per_call": {"minor": (minor_after - minor) / args.repeats, "major": (major_after - major) / args.repeats},
      "first_touch_bytes_per_call": (minor_after - minor) / args.repeats * page,
      "seconds": harness.summary(seconds),
      "xla": harness.cost(compiled),
  }
  if trace:
    result["ops"] = op_times(call, compiled.as_text())
  print(f"  E={num_experts:4d} {variant:>22}: {result['faults_per_call']['minor']:10.0f} minor faults/call "
        f"({result['first_touch_bytes_per_call'] / 2**20:8.1f} MiB), temp {result['memory_bytes']['temp'] / 2**20:8.1f}"
        f" MiB, output {result['memory_bytes']['output'] / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
  return result


def run(args, experts: list[int], variants: list[str], trace: bool) -> list[dict]:
  return [{"experts": e, "variants": {v: measure(v, args, e, trace) for v in variants}} for e in experts]


def allocator_env(name: str) -> dict | str:
  """The environment of an allocator's subprocess, or why it cannot run here."""
  if name == "glibc_no_mmap":
    return {"GLIBC_TUNABLES": GLIBC_NO_MMAP}
  soname, short, package = ALLOCATOR_LIBRARIES[name]
  found = [p for p in glob.glob(f"/usr/lib/*/{soname}") + glob.glob(f"/usr/lib/{soname}") if os.path.exists(p)]
  if not found and ctypes.util.find_library(short):
    found = [ctypes.util.find_library(short)]
  return {"LD_PRELOAD": found[0]} if found else f"{soname} not installed (Debian: apt-get install {package})"


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    print(json.dumps(run(args, args.allocator_experts, args.allocator_variants, trace=False)))
    return
  machine = harness.machine_info()
  print(f"{machine['processor']}, {machine['cpu_count']} cores; {args.tokens} tokens, d_model {args.d_model}, d_ff "
        f"{args.d_ff}; page size {resource.getpagesize()}", flush=True)
  rows = run(args, args.experts, args.variants, trace=not args.no_trace)
  allocators = {}
  if args.allocators:
    allocators["default"] = run(args, args.allocator_experts, args.allocator_variants, trace=False)
  for name in args.allocators:
    env = allocator_env(name)
    if isinstance(env, str):
      allocators[name] = {"skipped": env}
      print(f"  allocator {name}: skipped, {env}", flush=True)
      continue
    print(f"  allocator {name}: {env}", flush=True)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", name],
                          env=dict(os.environ, **env), stdout=subprocess.PIPE, text=True, check=True)
    allocators[name] = {"environment": env, "rows": json.loads(proc.stdout.strip().splitlines()[-1])}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, {
      "benchmark": "profile_moe",
      "config": {k: v for k, v in vars(args).items() if k not in ("worker", "output")},
      "machine": machine,
      "page_size": resource.getpagesize(),
      "rows": rows,
      "allocators": allocators,
  }, indent=2)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
