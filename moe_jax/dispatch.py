"""How tokens move: from a `RoutingResult` to the experts and back.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff · B batch · L sequence length. T = G*S tokens, N = T*K (token, choice) assignments.

Every backend has the signature `backend(tokens [G, S, M], route, experts) -> [G, S, M]` and computes
  out[g, s] = sum_k combine_weight[g, s, k] * FFN_{expert_index[g, s, k]}(tokens[g, s])   over kept choices,
so a dropped assignment contributes exactly zero (the layer's residual connection carries the token).

  * `einsum_dispatch`   one-hot dispatch and combine tensors [G, S, E, C] (GShard, Lepikhin et al. 2020;
                        Switch, Fedus et al. 2021): two dense einsums, the TPU-friendly form. Memory and
                        FLOPs grow as S*E*C = capacity_factor*K*S^2 per group: use small groups.
  * `gather_dispatch`   the same capacity buffers filled by index: no [S, E, C] tensor. Each row moves by a
                        gather, forward and backward (see `_take_rows`), never by the scatter-add that
                        autodiff of a plain gather emits.
  * `dropless_dispatch` ('dropless') kept assignments sorted by expert into segments padded to a tile, run by
                        `Experts.blocked`, a grouped matmul over row tiles (MegaBlocks, Gale et al. 2022,
                        arXiv:2211.15841): no capacity, about N + E * tile rows of work on every platform.
  * `ragged_dot_dispatch` ('ragged_dot') the same sort, one row per kept assignment, run by `Experts.ragged`
                        (`jax.lax.ragged_dot`, MaxText's dropless path): native on GPU and TPU only.
  * 'tokamax'           the same, with `tokamax.ragged_dot` (Pallas grouped-matmul kernels: Mosaic GPU on Hopper,
                        Triton on other GPUs, Mosaic TPU; XLA's ragged_dot elsewhere), an optional package
                        (`pip install 'moe_jax[tokamax]'`, Python >= 3.11).
The dropless backends honour `route.kept`, so they also match the others when the router dropped
assignments. `resolve_backend` says which backend runs on a platform and mesh; `AUTO` is what 'auto' prefers.

Decoding (`moe_jax.decode`) adds one more, chosen per call by the number of assignments, not by the config:
  * `expert_gather_dispatch` one row per (token, choice), run by `StackedExperts.gathered`: the chosen experts'
                        weights read in row tiles on the expert axis (`experts.gathered_expert_ffn`), so the
                        weights of experts no token chose are never read. It reads N expert slices, the other
                        backends up to all E:
                        `use_expert_gather` takes it while N <= E (N = T*K; a decode step of a few rows), on one
                        device only (an expert-split mesh keeps the resolved backend).

Soft MoE (`routing.soft_moe_route`) has no indices to move: its slots are weighted sums of every token, so it has
one dense backend of its own, `soft_dispatch`, the einsum form with real-valued weights (the only backend that
fits; the config refuses the others for router='soft_moe').

The capacity backends hand `experts` one buffer [E, G*C, M], expert-major, row g*C + c of expert e holding
slot c of group g: `moe_jax.parallel.AllToAllExperts` relies on the expert-major layout to send each
expert's rows to the device that holds it.

The ground truth of every backend is `moe_jax.reference.moe`: a loop over experts in plain jax.numpy.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import jax
import jax.numpy as jnp
from absl import flags as absl_flags

from moe_jax import experts as experts_lib
from moe_jax import routing

Backend = Callable[[jax.Array, routing.RoutingResult, experts_lib.Experts], jax.Array]


# ----------------------------------------------------------------------------------------------------------
# Moving rows by index.


@jax.custom_vjp
def _take_rows(
    x: jax.Array,  # [R, M]
    index: jax.Array,  # [*I] int32 in [0, R]; R (out of range) gives a zero row
    transpose_index: jax.Array,  # [R, J] int32 in [0, prod(I)]: the positions of index that name each row
) -> jax.Array:  # [*I, M]
  """x[index], whose gradient is again a gather: dx[r] = sum_j ct[transpose_index[r, j]].

  The two indices must describe the same partial one-to-many map (row r is read at exactly the positions
  transpose_index[r, :] that are in range); the dispatch helpers below build both from one destination
  array. Autodiff of a plain gather would scatter-add the cotangent instead: same numbers, slower on CPU.
  """
  return x.at[index].get(mode="fill", fill_value=0)


def _take_rows_fwd(x, index, transpose_index):
  return _take_rows(x, index, transpose_index), (index, transpose_index)


def _take_rows_bwd(residuals, cotangent):
  index, transpose_index = residuals
  rows = cotangent.reshape(-1, cotangent.shape[-1])
  dx = jnp.sum(rows.at[transpose_index].get(mode="fill", fill_value=0), axis=1)
  return dx, None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _move(
    tokens: jax.Array,  # [T, M]
    destination: jax.Array,  # [T, K] int32 row of each (token, choice) in the buffer; R where dropped
    num_rows: int,  # R
    compute: Callable[[jax.Array], jax.Array],  # [R, M] -> [R, M]
    weights: jax.Array,  # [T, K] combine weights, 0 where dropped
) -> jax.Array:  # [T, M]
  """Pack tokens into R buffer rows, run `compute` on the buffer, combine the rows back with weights."""
  num_tokens, k = destination.shape
  flat = destination.reshape(-1)
  assignment = jnp.arange(num_tokens * k, dtype=jnp.int32)
  # Inverse map, one int per row: which (token, choice) fills row r (num_tokens * k when empty).
  source = jnp.full((num_rows,), num_tokens * k, jnp.int32).at[flat].set(assignment, mode="drop")
  source_token = jnp.where(source < num_tokens * k, source // k, num_tokens)
  buffer = _take_rows(tokens, source_token, destination)  # [R, M]
  out_rows = compute(buffer)  # [R, M]
  per_choice = _take_rows(out_rows, destination, source[:, None])  # [T, K, M]
  return jnp.einsum("tkm,tk->tm", per_choice, weights.astype(per_choice.dtype))


def _flatten(route: routing.RoutingResult) -> tuple[jax.Array, jax.Array, jax.Array]:
  """expert_index, kept, combine_weight as [T, K]."""
  k = route.expert_index.shape[-1]
  return (
      route.expert_index.reshape(-1, k),
      route.kept.reshape(-1, k),
      route.combine_weight.reshape(-1, k),
  )


def _check(tokens: jax.Array, route: routing.RoutingResult) -> None:
  if tokens.ndim != 3 or tokens.shape[:2] != route.expert_index.shape[:2]:
    raise ValueError(
        f"tokens must be [G, S, M] with [G, S] = {route.expert_index.shape[:2]} of the routing; "
        f"got shape {tokens.shape}"
    )


# ----------------------------------------------------------------------------------------------------------
# Backends.


def einsum_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.Experts,
) -> jax.Array:  # [G, S, M]
  """GShard/Switch dispatch: buffers = einsum(dispatch [G,S,E,C], tokens); out = einsum(combine, outputs).
  Two dense products with one-hot tensors: the form that maps onto a TPU's matrix units."""
  _check(tokens, route)
  num_groups, _, d_model = tokens.shape
  num_experts, capacity = route.num_experts, route.capacity
  dispatch, combine = routing.dispatch_and_combine_tensors(route)  # [G, S, E, C] each
  buffer = jnp.einsum("gsec,gsm->egcm", dispatch.astype(tokens.dtype), tokens)
  out = experts(buffer.reshape(num_experts, num_groups * capacity, d_model))
  out = out.reshape(num_experts, num_groups, capacity, d_model)
  return jnp.einsum("gsec,egcm->gsm", combine.astype(out.dtype), out)


def gather_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.Experts,
) -> jax.Array:  # [G, S, M]
  """Capacity buffers [E, G*C, M] filled and read by row index: O(T*K*M) data movement, no one-hot."""
  _check(tokens, route)
  num_groups, tokens_per_group, d_model = tokens.shape
  num_experts, capacity = route.num_experts, route.capacity
  expert_index, kept, weights = _flatten(route)  # [T, K]
  group = (jnp.arange(num_groups * tokens_per_group, dtype=jnp.int32) // tokens_per_group)[:, None]
  num_rows = num_experts * num_groups * capacity
  slot = route.slot.reshape(expert_index.shape)
  destination = jnp.where(kept, (expert_index * num_groups + group) * capacity + slot, num_rows)

  def compute(buffer):  # [E*G*C, M]
    return experts(buffer.reshape(num_experts, num_groups * capacity, d_model)).reshape(num_rows, d_model)

  out = _move(tokens.reshape(-1, d_model), destination, num_rows, compute, weights)
  return out.reshape(tokens.shape)


def _sorted_destinations(route: routing.RoutingResult) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Kept assignments in expert order (stable, so within an expert in (token, choice) order).

  Returns position [T, K] (rank of each kept assignment in that order; N = T*K where dropped), expert_rows [E]
  (kept assignments per expert) and first [E] (the rank of each expert's first assignment). Sorting and
  binary search only: no scatter-add, so the result is exact and order-independent.
  """
  num_experts = route.num_experts
  expert_index, kept, _ = _flatten(route)  # [T, K]
  sort_key = jnp.where(kept, expert_index, num_experts).reshape(-1)  # [N]; dropped sort last
  num_assignments = sort_key.shape[0]
  order = jnp.argsort(sort_key, stable=True)  # rank -> assignment
  bounds = jnp.searchsorted(sort_key[order], jnp.arange(num_experts + 1, dtype=sort_key.dtype)).astype(jnp.int32)
  rank = jnp.arange(num_assignments, dtype=jnp.int32)
  position = jnp.zeros((num_assignments,), jnp.int32).at[order].set(rank)  # a permutation: unique indices
  position = jnp.where(kept.reshape(-1), position, num_assignments).reshape(kept.shape)
  return position, bounds[1:] - bounds[:-1], bounds[:-1]


def dropless_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.Experts,
    *,
    tiles: tuple[int, ...] | None = None,  # tile heights of the grouped matmul; None: experts.default_tiles
) -> jax.Array:  # [G, S, M]
  """Kept assignments sorted by expert into row segments padded to a tile multiple, run by `Experts.blocked`
  (a grouped matmul over row tiles, `experts.grouped_matmul`): about N + E * tile rows of work for N
  assignments, where capacity buffers cost capacity_factor * N and a masked dense grouped matmul E * N.

  Groups do not matter here: every kept assignment gets a row whatever `route.capacity` says. Pair it with
  dropless routing (capacity = S) for a layer that never drops.
  """
  _check(tokens, route)
  d_model = tokens.shape[-1]
  expert_index, kept, weights = _flatten(route)
  position, expert_rows, first = _sorted_destinations(route)
  layout = experts_lib.block_layout(expert_rows, position.size, tiles)
  # The r-th assignment of expert e goes to row r of e's padded segment.
  destination = jnp.where(kept, position + (layout.expert_start - first)[expert_index], layout.num_rows)
  out = _move(
      tokens.reshape(-1, d_model), destination, layout.num_rows, lambda rows: experts.blocked(rows, layout), weights
  )
  return out.reshape(tokens.shape)


def ragged_dot_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.Experts,
    *,
    ragged_dot: experts_lib.RaggedDot = jax.lax.ragged_dot,  # the grouped matmul; tokamax_dispatch passes its own
) -> jax.Array:  # [G, S, M]
  """Kept assignments sorted by expert (dropped ones parked after the last group) and run by `Experts.ragged`
  (`jax.lax.ragged_dot`, native on GPU and TPU; MaxText's dropless path). Same contract as `dropless_dispatch`."""
  _check(tokens, route)
  d_model = tokens.shape[-1]
  _, _, weights = _flatten(route)
  position, expert_rows, _ = _sorted_destinations(route)
  out = _move(
      tokens.reshape(-1, d_model), position, position.size,
      lambda rows: experts.ragged(rows, expert_rows, ragged_dot=ragged_dot), weights,
  )
  return out.reshape(tokens.shape)


def tokamax_ragged_dot() -> experts_lib.RaggedDot:
  """`tokamax.ragged_dot` (google/tokamax: the same signature as `jax.lax.ragged_dot`; it picks the first of its
  Pallas kernels that supports the device and shapes, XLA's ragged_dot as the last resort), imported on use so that
  the package stays optional."""
  try:
    import tokamax  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"dispatch='tokamax' needs the optional package tokamax: {OPTIONAL['tokamax']}") from error
  # tokamax reads its options from absl flags and, where no program parsed them, parses sys.argv itself, which fails
  # on any other program's arguments (pytest's, the benchmarks'): then its defaults are taken as they are.
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot


def tokamax_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.Experts,
) -> jax.Array:  # [G, S, M]
  """`ragged_dot_dispatch` with tokamax's grouped matmul (`tokamax_ragged_dot`)."""
  return ragged_dot_dispatch(tokens, route, experts, ragged_dot=tokamax_ragged_dot())


def expert_gather_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    experts: experts_lib.StackedExperts,
) -> jax.Array:  # [G, S, M]
  """Every (token, choice) through its expert's gathered weights (`experts.gathered_expert_ffn`), combined with the
  kept combine weights: no buffer, no sort, no capacity, and only the chosen experts' weights read. Drops only what
  the router dropped (dropless routing: nothing). Gradients flow (through the gathers' scatter-add), but it is meant
  for inference: see `use_expert_gather`."""
  _check(tokens, route)
  d_model = tokens.shape[-1]
  expert_index, kept, weights = _flatten(route)  # [T, K]
  rows = jnp.repeat(tokens.reshape(-1, d_model), expert_index.shape[1], axis=0)  # [T*K, M], (token, choice) order
  out = experts.gathered(rows, expert_index.reshape(-1)).reshape(*expert_index.shape, d_model)  # [T, K, M]
  out = jnp.einsum("tkm,tk->tm", out, jnp.where(kept, weights, 0.0).astype(out.dtype))
  return out.reshape(tokens.shape)


def use_expert_gather(num_assignments: int, num_experts: int, experts_across_devices: bool) -> bool:
  """Whether a decode-time call gathers expert weights (`expert_gather_dispatch`): when its N = T*K assignments
  are at most E, and only when every expert is on this device (`StackedExperts`; across an 'expert' mesh axis
  the experts are reached by all-to-all of capacity buffers, so the resolved backend runs).

  Why N <= E: the gather reads one expert's weights per assignment (a repeated expert once per row), so it never
  reads more than the E experts that the other backends read. Side by side in one process (CPU, 2 cores loaded by
  other jobs, float32 GeLU, one layer, d_model 1024, medians of 25 interleaved calls; gather / dropless / capacity
  gather): E=8 F=3584 K=2: N=4 36 / 128 / 144 ms, N=8 89 / 173 / 160 ms, N=16 124 / 213 / 206 ms; E=64 F=512 K=8:
  N=32 59 / 120 / 196 ms, N=64 101 / 125 / 213 ms, but N=128 230 / 139 / 276 ms. (Before
  `experts.gathered_expert_ffn` read row tiles, each row's slice was copied whole before its matmul and the gather
  lost from N = E / 2 on.)"""
  return not experts_across_devices and num_assignments <= num_experts


def soft_dispatch(
    tokens: jax.Array,  # [G, S, M]
    route: routing.SoftRoutingResult,
    experts: experts_lib.Experts,
) -> jax.Array:  # [G, S, M]
  """Soft MoE (Puigcerver et al. 2023, eqs. 1-3): slot inputs X~ = D^T X, outputs Y = C Y~, two dense einsums.

  The slots form the same expert-major buffer [E, G*P, M] as the capacity backends (row g*P + p of expert e is
  slot p of group g), so `moe_jax.parallel.AllToAllExperts` sends them to the experts' devices unchanged."""
  if tokens.ndim != 3 or tokens.shape[:2] != route.dispatch_weight.shape[:2]:
    raise ValueError(f"tokens must be [G, S, M] with [G, S] = {route.dispatch_weight.shape[:2]} of the routing; "
                     f"got shape {tokens.shape}")
  num_groups, _, d_model = tokens.shape
  num_experts, slots = route.num_experts, route.slots_per_expert
  buffer = jnp.einsum("gsep,gsm->egpm", route.dispatch_weight.astype(tokens.dtype), tokens)
  out = experts(buffer.reshape(num_experts, num_groups * slots, d_model))
  out = out.reshape(num_experts, num_groups, slots, d_model)
  return jnp.einsum("gsep,egpm->gsm", route.combine_weight.astype(out.dtype), out)


BACKENDS: dict[str, Backend] = {
    "einsum": einsum_dispatch,
    "gather": gather_dispatch,
    "dropless": dropless_dispatch,
    "ragged_dot": ragged_dot_dispatch,
    "tokamax": tokamax_dispatch,
}
# Backends that exchange variable-size row groups: across devices they would need jax.lax.ragged_all_to_all.
RAGGED = ("dropless", "ragged_dot", "tokamax")
# What a config may ask for (moe.dispatch): a backend, or 'auto' (the platform's dropless grouped matmul); the
# choices that need dropless routing (no capacity to fill).
CHOICES = ("auto", *BACKENDS)
DROPLESS = ("auto", *RAGGED)
# Backends that need a package outside moe_jax's requirements: backend -> how to install it.
OPTIONAL = {"tokamax": "pip install 'moe_jax[tokamax]' (tokamax, Python >= 3.11)"}
# Platforms where jax.lax.ragged_dot lowers to a native grouped matmul.
NATIVE_RAGGED_DOT = ("gpu", "cuda", "rocm", "tpu")
# What 'auto' runs on one device, per platform (`jax.default_backend()`), best first: the first whose package is
# installed. On a GPU, tokamax's kernels are grouped matmuls by construction, while what XLA makes of ragged_dot
# depends on its version (`benchmarks/hlo_check.py` reads the compiled program for either); on a TPU, XLA's
# ragged_dot is itself a grouped-matmul kernel. Elsewhere the tiled grouped matmul: ragged_dot is a masked dense
# dot over all experts there (benchmarks/README.md).
AUTO = {"gpu": ("tokamax", "ragged_dot"), "cuda": ("tokamax", "ragged_dot"), "rocm": ("tokamax", "ragged_dot"),
        "tpu": ("ragged_dot",)}
AUTO_ELSEWHERE = ("dropless",)


def get_backend(name: str) -> Backend:
  if name not in BACKENDS:
    raise ValueError(f"dispatch={name!r} must be one of {sorted(BACKENDS)}")
  return BACKENDS[name]


def installed_optional() -> tuple[str, ...]:
  """The `OPTIONAL` backends whose package is importable here (found, not imported)."""
  return tuple(name for name in OPTIONAL if importlib.util.find_spec(name) is not None)


def resolve_backend(requested: str, platform: str, distributed: bool,
                    installed: tuple[str, ...] | None = None) -> str:
  """The backend that runs for a requested one: a pure decision given `installed`, for the config resolution to log
  and record.

  requested: a `BACKENDS` name, or 'auto' = the platform's best dropless grouped matmul (`AUTO`: tokamax's kernels,
  then jax.lax.ragged_dot, on a GPU; ragged_dot on a TPU; the tiled 'dropless' elsewhere). platform:
  `jax.default_backend()`. distributed: the experts are split over devices (an 'expert' mesh axis > 1). Then a
  ragged backend becomes 'gather', whose capacity buffers travel by all_to_all (XLA:CPU has no ragged_all_to_all);
  with dropless routing (capacity C = S) it still drops nothing and computes the same outputs, on E * S rows per
  group. installed: the `OPTIONAL` backends available (default: `installed_optional()`); an optional backend that
  would run but is not installed raises a ValueError that says how to install it, before anything compiles.
  """
  if requested != "auto" and requested not in BACKENDS:
    raise ValueError(f"dispatch={requested!r} must be 'auto' or one of {sorted(BACKENDS)}")
  if distributed and requested in RAGGED + ("auto",):
    return "gather"
  installed = installed_optional() if installed is None else installed
  if requested == "auto":
    return next(name for name in AUTO.get(platform, AUTO_ELSEWHERE) + AUTO_ELSEWHERE
                if name not in OPTIONAL or name in installed)
  if requested in OPTIONAL and requested not in installed:
    raise ValueError(f"dispatch={requested!r} needs an optional package that is not installed: {OPTIONAL[requested]}")
  return requested
