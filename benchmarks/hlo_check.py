"""Does the dropless path's grouped matmul compile to a grouped matmul here, or to a dense fallback over all experts?

  python benchmarks/hlo_check.py                    # the ragged backends at the GPU sizes, JSON to --output
  python benchmarks/hlo_check.py --require_native   # as benchmarks/gpu.sh runs it: exit 1 if 'auto' falls back
  python benchmarks/hlo_check.py --tokens 64 --d_model 16 --d_ff 32 --experts 4   # toy size (CPU: dense fallback)

For each backend that runs a grouped matmul through a `jax.lax.ragged_dot`-like call ('ragged_dot', and 'tokamax'
where it is installed), it compiles the forward + backward of `experts.ragged_expert_ffn` (gelu: two projections)
on balanced groups (the group sizes an argument, so nothing is specialised to them) and reads the optimised HLO
(`compiled.as_text()`), not XLA's cost analysis, which counts a while loop's body once and a custom kernel not at
all:
  * dense dot FLOPs: every `dot` (in fusions too, a while body times its known trip count) and every cuBLAS GEMM
    custom call, 2 * result elements * contracted size each;
  * grouped ops: `ragged-dot` instructions, and custom calls of Pallas/Mosaic/Triton kernels (tokamax's);
  * the verdict against the useful FLOPs, 12 * tokens * d_model * d_ff (three products per projection):
      dense_fallback  dense dot FLOPs >= 1.5x useful (a masked dense dot over all E experts does about E times);
      grouped         below that, with a ragged-dot op or a kernel call doing the rest;
      unknown         neither (e.g. dots inside a loop of unknown trip count): read `ops` in the JSON.
The JSON also names the backend 'auto' resolves to on this platform (`dispatch.resolve_backend`) and its verdict;
--require_native exits 1 when that backend is ragged and its verdict is not 'grouped'. The parser's logic is tested
on HLO snippets in tests/test_benchmarks.py, on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moe_jax import dispatch, experts, fileio  # noqa: E402

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu_hlo_check.json")
DENSE_FACTOR = 1.5  # dense dot FLOPs at or above this multiple of the useful ones: a dense fallback
# Custom-call targets of hand-written kernels (Pallas on Triton / Mosaic GPU / Mosaic TPU, and grouped GEMMs).
KERNEL_TARGET = re.compile(r"triton|mosaic|tpu_custom_call|grouped|ragged", re.IGNORECASE)
# Custom-call targets of a library GEMM: a dense dot with its dimension numbers in the backend config.
GEMM_TARGET = re.compile(r"cublas|gemm|matmul|hipblas", re.IGNORECASE)
ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
CALLEE = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class Computation:
  shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # array-valued names -> dims
  dot_flop: float = 0.0  # dense dots and GEMM custom calls in this computation alone
  ragged_dots: int = 0
  kernel_calls: list[str] = dataclasses.field(default_factory=list)
  calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)  # (callee, trips; None: unknown)


def _dims(shape: str) -> list[int] | None:
  """The dims of an array shape ('f32[8,16]{1,0}'), or of a tuple's first array (a GEMM's (output, workspace))."""
  match = ARRAY.search(shape)
  return None if match is None else [int(d) for d in match.group(2).split(",") if d]


def _split_shape(rest: str) -> tuple[str, str]:
  """'(s32[], f32[8]{0}) while(%t), body=...' -> (shape, the rest from the opcode on); tuples may nest."""
  if not rest.startswith("("):
    shape, _, tail = rest.partition(" ")
    return shape, tail
  depth = 0
  for i, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  return rest, ""


def _operands(tail: str) -> list[str]:
  """Operand names of 'dot(%a, %b), ...' (older HLO text prints 'dot(f32[8,4]{1,0} %a, ...)')."""
  inner = tail[tail.index("(") + 1:]
  depth, end = 1, 0
  for end, char in enumerate(inner):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", inner[:end])


def _contracted(computation: Computation, lhs: str, dims: list[int]) -> int:
  return math.prod(computation.shapes.get(lhs, [0])[d] for d in dims) if lhs in computation.shapes else 0


def parse(hlo_text: str) -> tuple[dict[str, Computation], str]:
  """The computations of an HLO module's text and the name of its entry computation."""
  computations: dict[str, Computation] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    header = HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), Computation())
      entry = header.group(1) if line.startswith("ENTRY") else entry
      for name, shape in re.findall(r"([\w.\-]+):\s*([a-z]+[0-9]*\[[0-9,]*\])", header.group(2)):
        current.shapes[name] = _dims(shape)
      continue
    instruction = INSTRUCTION.match(line)
    if current is None or instruction is None:
      continue
    name = instruction.group(1)
    shape, tail = _split_shape(line[instruction.end():])
    opcode = re.match(r"[\w\-]+", tail)
    opcode = opcode.group(0) if opcode else ""
    dims = _dims(shape)
    if dims is not None and not shape.startswith("("):
      current.shapes[name] = dims
    if opcode == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", tail)
      indices = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
      current.dot_flop += 2 * math.prod(dims or [0]) * _contracted(current, _operands(tail)[0], indices)
    elif opcode == "ragged-dot":
      current.ragged_dots += 1
    elif opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]+)"', tail)
      target = target.group(1) if target else ""
      if KERNEL_TARGET.search(target):
        current.kernel_calls.append(target)
      elif GEMM_TARGET.search(target):
        contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', tail)
        indices = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
        current.dot_flop += 2 * math.prod(dims or [0]) * _contracted(current, _operands(tail)[0], indices)
    trips = 1
    if opcode == "while":
      known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', tail)
      trips = int(known.group(1)) if known else None
    for _, callees in CALLEE.findall(tail):
      for callee in re.findall(r"%?([\w.\-]+)", callees):
        current.calls.append((callee, trips))
  return computations, entry


def analyze(hlo_text: str) -> dict:
  """Totals over the entry computation and everything it calls, a while body times its trip count."""
  computations, entry = parse(hlo_text)
  totals = {"dense_dot_gflop": 0.0, "ragged_dots": 0, "kernel_calls": [], "unknown_trip_count_dot_gflop": 0.0}

  def visit(name: str, times: int | None, depth: int = 0) -> None:
    computation = computations.get(name)
    if computation is None or depth > 64:
      return
    if times is None:
      totals["unknown_trip_count_dot_gflop"] += computation.dot_flop / 1e9
    else:
      totals["dense_dot_gflop"] += times * computation.dot_flop / 1e9
    totals["ragged_dots"] += computation.ragged_dots
    totals["kernel_calls"] += computation.kernel_calls
    for callee, trips in computation.calls:
      visit(callee, None if times is None or trips is None else times * trips, depth + 1)

  visit(entry, 1)
  totals["kernel_calls"] = sorted(set(totals["kernel_calls"]))
  return totals


def verdict(analysis: dict, useful_gflop: float) -> str:
  """'dense_fallback', 'grouped' or 'unknown' (module docstring)."""
  if analysis["dense_dot_gflop"] >= DENSE_FACTOR * useful_gflop:
    return "dense_fallback"
  if (analysis["ragged_dots"] or analysis["kernel_calls"]) and not analysis["unknown_trip_count_dot_gflop"]:
    return "grouped"
  return "unknown"


def ragged_dot_of(backend: str) -> experts.RaggedDot:
  return dispatch.tokamax_ragged_dot() if backend == "tokamax" else jax.lax.ragged_dot


def check(backend: str, tokens: int, d_model: int, d_ff: int, num_experts: int, dtype) -> dict:
  """Compile the ragged FFN's forward + backward with `backend`'s grouped matmul and judge its HLO."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  weights = experts.ExpertWeights(wi_0=jax.random.normal(k1, (num_experts, d_model, d_ff), dtype),
                                  wo=jax.random.normal(k2, (num_experts, d_ff, d_model), dtype))
  x = jax.random.normal(k3, (tokens, d_model), dtype)
  sizes = jnp.full((num_experts,), tokens // num_experts, jnp.int32)
  ragged_dot = ragged_dot_of(backend)

  def loss(x, weights, sizes):
    out = experts.ragged_expert_ffn(weights, x, sizes, activation="gelu", ragged_dot=ragged_dot)
    return jnp.sum(out.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights, sizes).compile().as_text()
  useful = 12 * tokens * d_model * d_ff / 1e9
  analysis = analyze(text)
  return {"useful_gflop": useful, **analysis, "work_ratio": analysis["dense_dot_gflop"] / useful,
          "verdict": verdict(analysis, useful)}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--d_ff", type=int, default=4096)
  parser.add_argument("--experts", type=int, default=16, help=">= 4, so that a dense fallback shows as >= 4x work")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--require_native", action="store_true",
                      help="exit 1 when the backend 'auto' resolves to is ragged and not compiled to a grouped matmul")
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  platform = jax.default_backend()
  installed = dispatch.installed_optional()
  auto = dispatch.resolve_backend("auto", platform, distributed=False)
  shape = {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
           "dtype": args.dtype}
  results = {}
  for backend in ("ragged_dot", "tokamax"):
    if backend in dispatch.OPTIONAL and backend not in installed:
      results[backend] = {"skipped": f"not installed: {dispatch.OPTIONAL[backend]}"}
    else:
      results[backend] = check(backend, args.tokens, args.d_model, args.d_ff, args.experts, jnp.dtype(args.dtype))
    print(f"{backend:>10}: {results[backend].get('verdict', results[backend].get('skipped'))} "
          f"{json.dumps({k: v for k, v in results[backend].items() if k != 'verdict'})}", flush=True)
  auto_verdict = results[auto]["verdict"] if auto in results and "verdict" in results[auto] else "not ragged"
  print(f"'auto' on {platform} ({jax.devices()[0].device_kind}) resolves to {auto!r}: {auto_verdict}")
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  fileio.write_json(args.output, {"benchmark": "hlo_check", "platform": platform,
                                  "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                                  "shape": shape, "auto": auto, "auto_verdict": auto_verdict, "backends": results},
                    indent=2)
  print(f"wrote {args.output}")
  failed = args.require_native and auto in results and auto_verdict != "grouped"
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
