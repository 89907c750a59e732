"""Shared by the benchmarks: machine and version record, compiled cost, interleaved timing, and the machine's
measured matmul peak and memory bandwidth (the roofline of a run is measured in that run)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def machine_info() -> dict:
  """Where and with what a result was measured."""
  processor = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      processor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), processor)
  except OSError:
    pass
  try:
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError, AttributeError):
    memory_gb = None
  versions = {"python": sys.version.split()[0]}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {
      "backend": jax.default_backend(),
      "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(),
      "processor": processor,
      "cpu_count": os.cpu_count(),
      "memory_gb": memory_gb,
      "machine": platform.machine(),
      "system": platform.system(),
      "versions": versions,
  }


def cost(compiled) -> dict:
  """XLA's own count for a compiled program: FLOPs and bytes accessed (every op's operands and result, no
  cache reuse, so an upper estimate of memory traffic). A while loop's body is counted once, not once per
  trip: for looped programs (the tiled dropless backend) both figures are far too low."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return {"gflop": float(analysis.get("flops", float("nan"))) / 1e9,
          "gbytes": float(analysis.get("bytes accessed", float("nan"))) / 1e9}


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Seconds of each call of each function, ended by block_until_ready. One warm-up call each, then the
  functions take turns, so that load from other processes hits all of them alike."""
  times = {name: [] for name in calls}
  for call in calls.values():
    jax.block_until_ready(call())
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return times


def summary(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure_peaks(dtype=jnp.float32, *, matmul_size: int = 2048, copy_mib: int = 256, repeats: int = 5) -> dict:
  """The machine's matmul throughput (a jitted [n, n] x [n, n] product) and memory bandwidth over `copy_mib` MiB,
  best of `repeats`, three ways:

  - `memory_gbps` (the roofline's): an elementwise pass whose output reuses its input's buffer (donated), so
    every call reads and writes pages that are already mapped: the bandwidth of memory itself;
  - `memory_read_gbps`: a sum over the buffer (read once, nothing written);
  - `fresh_buffer_gbps`: the same elementwise pass into a new output buffer each call, as a step that allocates
    its results does. On a CPU the allocator hands back fresh pages that the kernel maps on first touch, so this
    measures page faults as much as memory ("allocation / first touch"; 1.1-1.5 GB/s against about 15 GB/s
    reused on the 2-core machine of issue 34). It is recorded beside the others, never used as the roofline;
  - `numpy_copy_gbps`: `np.copyto` between two preallocated host arrays of the same size (read + written), the
    reference outside XLA that issue 34 holds `memory_gbps` against (within 20 %). A copy into another buffer
    moves more than the bytes counted: each destination line is read before it is written (write-allocate),
    three transfers per two counted, where a pass over one buffer reads a line and writes it back;
  - `numpy_in_place_gbps`: numpy's own pass over one buffer (`np.multiply(x, 2, out=x)`), the same access
    pattern as `memory_gbps` outside XLA.
  """
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (matmul_size, matmul_size), dtype)
  b = jax.random.normal(k2, (matmul_size, matmul_size), dtype)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  shape = (copy_mib * 2**20 // jnp.dtype(dtype).itemsize,)
  big = jnp.ones(shape, dtype)
  fresh = jax.jit(lambda x: x * 2).lower(big).compile()
  read = jax.jit(jnp.sum).lower(big).compile()
  in_place = jax.jit(lambda x: x * 2, donate_argnums=0).lower(big).compile()
  reused = [jnp.ones(shape, dtype)]  # the one buffer every in-place call consumes and returns
  source, target = np.ones(shape, dtype), np.zeros(shape, dtype)  # both touched before timing: no first faults

  def scale_in_place():
    reused[0] = in_place(reused[0])
    return reused[0]

  times = time_interleaved({"matmul": lambda: matmul(a, b), "in_place": scale_in_place, "read": lambda: read(big),
                            "fresh": lambda: fresh(big), "numpy_copy": lambda: np.copyto(target, source),
                            "numpy_in_place": lambda: np.multiply(source, 2, out=source)}, repeats)
  return {
      "matmul_gflops": 2 * matmul_size**3 / min(times["matmul"]) / 1e9,
      "memory_gbps": 2 * big.nbytes / min(times["in_place"]) / 1e9,
      "memory_read_gbps": big.nbytes / min(times["read"]) / 1e9,
      "fresh_buffer_gbps": 2 * big.nbytes / min(times["fresh"]) / 1e9,
      "numpy_copy_gbps": 2 * source.nbytes / min(times["numpy_copy"]) / 1e9,
      "numpy_in_place_gbps": 2 * source.nbytes / min(times["numpy_in_place"]) / 1e9,
      "matmul_size": matmul_size,
      "copy_mib": copy_mib,
      "dtype": jnp.dtype(dtype).name,
  }


def roofline_seconds(gflop: float, gbytes: float, peaks: dict) -> dict:
  """Time bounds of a program doing `gflop` and moving `gbytes` at the measured peaks: `overlap` (roofline:
  the slower of compute and memory, both at full speed at once) and `serial` (one after the other)."""
  compute = gflop / peaks["matmul_gflops"]
  memory = gbytes / peaks["memory_gbps"]
  return {"compute": compute, "memory": memory, "overlap": max(compute, memory), "serial": compute + memory}
