"""Invariants of the pure routers in `moe_jax.routing`, hand-checked examples, and bad input.

Axis legend (as in moe_jax.routing): G groups · S tokens per group · E experts · C capacity per expert ·
K choices per token (K = E for expert choice).

Cost model, which shapes this file: on two CPU cores compiling dominates. One jitted router compiles in
~0.45 s (~0.22 s with `FAST_COMPILE`), and eager JAX is worse (every primitive compiles afresh for each new
shape: ~3 s for one eager top_k_route). So property tests route through module-level jitted routers over a
small grid of (shape, capacity factor) points; hypothesis draws the seeds and the grid point, and all tests
share the compiled executables. Logits come from numpy, so drawing them compiles nothing. Eager execution is
covered by the chex `without_jit` variants and by the bad-input tests (which raise before any computation).
"""

from __future__ import annotations

import fractions
import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import reference, routing

# ----------------------------------------------------------------------------------------------------------
# Jitted routers shared by all tests (static arguments: everything that is not an array).

# The arrays here are tiny, so XLA's backend optimisation buys no run time, while it doubles compile time
# (~0.45 s -> ~0.22 s a router on two cores). The options are local to these jits; the chex `with_jit`
# variants below compile with the defaults.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, **jit_kwargs):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **jit_kwargs)


TOP_K_STATIC = (
    "k",
    "capacity_factor",
    "dropless",
    "renormalize",
    "batch_prioritized",
    "second_expert_policy",
    "second_expert_threshold",
)
top_k_jit = fast_jit(routing.top_k_route, static_argnames=TOP_K_STATIC)
switch_jit = fast_jit(routing.switch_route, static_argnames=("capacity_factor", "dropless", "batch_prioritized"))
expert_choice_jit = fast_jit(routing.expert_choice_route, static_argnames=("capacity_factor",))
router_logits_jit = fast_jit(routing.router_logits, static_argnames=("jitter_eps",))
dispatch_and_combine_jit = fast_jit(routing.dispatch_and_combine_tensors)

# name -> (route(logits, capacity_factor, **options), K or None for expert choice). Top-1 is `switch`, which
# `test_switch_route_is_top_k_route_with_k_1` pins to top_k_route(k=1), so k = 1 is not compiled twice over.
ROUTERS = {
    "switch": (lambda logits, cf, **kw: switch_jit(logits, capacity_factor=cf, **kw), 1),
    "top2": (lambda logits, cf, **kw: top_k_jit(logits, k=2, capacity_factor=cf, **kw), 2),
    "top3": (lambda logits, cf, **kw: top_k_jit(logits, k=3, capacity_factor=cf, **kw), 3),
    "expert_choice": (lambda logits, cf: expert_choice_jit(logits, capacity_factor=cf), None),
}
TOKEN_CHOICE = ("switch", "top2", "top3")
ALL_ROUTERS = tuple(ROUTERS)

# ([G, S, E], capacity factor) points; each costs one compile per router configuration, so there are few,
# differing in every axis. At the two tight points the E * C slots are fewer than the K * S assignments for
# every k, so they always drop something; cf = 1.25 is loose.
GRID = (((2, 12, 3), 0.5), ((3, 14, 4), 0.75), ((1, 10, 5), 1.25))

PROPERTY = hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None)


def cases_on(points=GRID):
  """(shape, seed, capacity_factor) on the given grid points, any seed."""
  return st.tuples(st.sampled_from(points), st.integers(0, 2**32 - 1)).map(lambda c: (c[0][0], c[1], c[0][1]))


cases = cases_on(GRID)


def given_cases(points=GRID):
  """hypothesis.given(case=...) on `points`, plus one explicit example per point (seed 0): every point runs
  whatever the derandomised draw picks, and the drawn examples add seeds."""

  def decorate(test):
    for shape, cf in points:
      test = hypothesis.example(case=(shape, 0, cf))(test)
    return hypothesis.given(case=cases_on(points))(test)

  return decorate


TIGHT = GRID[:2]  # batch-prioritised variants: the two tight points, where contested slots exist


def random_logits(shape, seed: int, scale: float = 2.0, dtype=jnp.float32) -> jax.Array:
  """Gaussian router logits. Continuous, so no two probabilities tie (a tie would make the order arbitrary).
  Drawn with numpy: an eager jax.random call would compile afresh for every shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale, dtype)


def route(name: str, logits: jax.Array, capacity_factor: float | None, **options) -> routing.RoutingResult:
  return ROUTERS[name][0](logits, capacity_factor, **options)


def num_choices(name: str, num_experts: int) -> int:
  return ROUTERS[name][1] or num_experts


def kept_per_expert(result: routing.RoutingResult) -> np.ndarray:  # [G, E]
  onehot = np.eye(result.num_experts, dtype=np.int64)[np.asarray(result.expert_index)]  # [G, S, K, E]
  return np.sum(onehot * np.asarray(result.kept)[..., None], axis=(1, 2))


def chosen_probs(result: routing.RoutingResult) -> np.ndarray:  # [G, S, K] probability of each choice
  return np.take_along_axis(np.asarray(result.router_probs), np.asarray(result.expert_index), axis=-1)


def softmax_np(logits) -> np.ndarray:  # float64 reference
  x = np.asarray(logits, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------------
# Who may go where.


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_each_token_takes_at_most_k_distinct_experts(router, case):
  shape, seed, cf = case
  num_groups, tokens, num_experts = shape
  k = num_choices(router, num_experts)
  result = route(router, random_logits(shape, seed), cf)
  chex.assert_shape([result.expert_index, result.slot, result.combine_weight, result.kept], (num_groups, tokens, k))
  chex.assert_shape(result.router_probs, shape)
  chex.assert_type([result.expert_index, result.slot], jnp.int32)
  index = np.asarray(result.expert_index)
  assert np.all((index >= 0) & (index < num_experts))
  assert np.all(np.diff(np.sort(index, axis=-1), axis=-1) > 0), "a token chose the same expert twice"
  assert np.all(np.sum(np.asarray(result.kept), axis=-1) <= k)
  if router == "expert_choice":  # choice e is expert e
    chex.assert_trees_all_equal(index, np.broadcast_to(np.arange(num_experts, dtype=np.int32), index.shape))


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_no_expert_exceeds_capacity(router, case):
  shape, seed, cf = case
  _, tokens, num_experts = shape
  result = route(router, random_logits(shape, seed), cf)
  k = ROUTERS[router][1] or 1  # expert choice sizes its buffers with K = 1
  assert result.capacity == routing.compute_capacity(tokens, num_experts, cf, k)
  load = kept_per_expert(result)  # [G, E]
  assert np.all(load <= result.capacity), (load, result.capacity)
  if router == "expert_choice":  # perfectly balanced by construction
    chex.assert_trees_all_equal(load, np.full_like(load, result.capacity))


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_slots_within_an_expert_are_unique_dense_and_below_capacity(router, case):
  """Kept assignments of expert e occupy exactly slots 0 .. n_e - 1: no collision, no hole, no overflow."""
  shape, seed, cf = case
  result = route(router, random_logits(shape, seed), cf)
  index, slot, kept = (np.asarray(a) for a in (result.expert_index, result.slot, result.kept))
  assert np.all((slot >= 0) & (slot < result.capacity))
  for g in range(shape[0]):
    for e in range(shape[2]):
      used = np.sort(slot[g][kept[g] & (index[g] == e)])
      chex.assert_trees_all_equal(used, np.arange(used.size, dtype=np.int32))


@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("router", ["top2", "top3"])
@PROPERTY
@given_cases(TIGHT)
def test_first_choices_take_priority_over_later_choices(router, batch_prioritized, case):
  """GShard: no expert keeps a j-th choice of any token while it drops an earlier choice of any token."""
  shape, seed, cf = case
  result = route(router, random_logits(shape, seed), cf, batch_prioritized=batch_prioritized)
  index, kept = np.asarray(result.expert_index), np.asarray(result.kept)
  assert not kept.all(), "the example must drop something"  # guaranteed at the tight grid points
  for g in range(shape[0]):
    for e in range(shape[2]):
      for j in range(index.shape[-1]):
        dropped_j = np.any(~kept[g, :, j] & (index[g, :, j] == e))
        kept_later = np.any(kept[g, :, j + 1:] & (index[g, :, j + 1:] == e))
        assert not (dropped_j and kept_later), (g, e, j)


@pytest.mark.parametrize("batch_prioritized", [False, True])
@pytest.mark.parametrize("router", TOKEN_CHOICE)
@PROPERTY
@given_cases(TIGHT)
def test_token_choice_matches_gshard_reference_loop(router, batch_prioritized, case):
  shape, seed, cf = case
  k = ROUTERS[router][1]
  result = route(router, random_logits(shape, seed), cf, batch_prioritized=batch_prioritized)
  expected = reference.token_choice_loop(result.router_probs, k, result.capacity, batch_prioritized=batch_prioritized)
  chex.assert_trees_all_equal((result.expert_index, result.slot, result.kept), expected)


# (G, S, K, E, capacity): few experts, many experts (E > S), and a capacity that keeps everything.
SLOT_POINTS = ((2, 12, 2, 3, 4), (1, 40, 3, 96, 1), (3, 17, 1, 5, 17))
sort_slots_jit = fast_jit(routing.token_choice_slots, static_argnames=("capacity",))
cumsum_slots_jit = fast_jit(reference.token_choice_slots, static_argnames=("capacity", "num_experts"))


@pytest.mark.parametrize("prioritized", [False, True])
@PROPERTY
@hypothesis.given(point=st.sampled_from(SLOT_POINTS), seed=st.integers(0, 2**32 - 1))
def test_sorted_slots_equal_one_hot_running_count(point, seed, prioritized):
  """Slots by sorting = the GShard running count over a one-hot, for any claims: repeated experts within a
  token, pairs that claim nothing (random policy), any claim order of the tokens."""
  num_groups, tokens, k, num_experts, capacity = point
  rng = np.random.default_rng(seed)
  expert_index = jnp.asarray(rng.integers(0, num_experts, (num_groups, tokens, k)), jnp.int32)
  wanted = jnp.asarray(rng.random((num_groups, tokens, k)) < 0.8)
  order = jnp.asarray(np.argsort(rng.random((num_groups, tokens)), axis=1), jnp.int32) if prioritized else None
  chex.assert_trees_all_equal(
      sort_slots_jit(expert_index, wanted, capacity=capacity, order=order),
      cumsum_slots_jit(expert_index, wanted, capacity=capacity, order=order, num_experts=num_experts),
  )


@PROPERTY
@given_cases()
def test_expert_choice_matches_reference_loop(case):
  shape, seed, cf = case
  result = route("expert_choice", random_logits(shape, seed), cf)
  expected = reference.expert_choice_loop(result.router_probs, result.capacity)
  chex.assert_trees_all_equal((result.expert_index, result.slot, result.kept), expected)


@PROPERTY
@given_cases(GRID[:1])
def test_switch_route_is_top_k_route_with_k_1(case):
  shape, seed, cf = case
  logits = random_logits(shape, seed)
  chex.assert_trees_all_equal(switch_jit(logits, capacity_factor=cf), top_k_jit(logits, k=1, capacity_factor=cf))


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@PROPERTY
@given_cases(GRID[1:2])  # the tight point with the most groups: cf alone would drop
def test_dropless_routing_drops_no_token(router, case):
  shape, seed, _ = case
  result = route(router, random_logits(shape, seed), None, dropless=True)
  assert result.capacity == shape[1]
  assert np.all(np.asarray(result.kept))
  chex.assert_trees_all_equal(
      (result.metrics.dropped_token_fraction, result.metrics.dropped_assignment_fraction),
      (jnp.float32(0.0), jnp.float32(0.0)),
  )


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0, None])
def test_dropless_mode_accepts_any_capacity_factor(capacity_factor):
  """Outside dropless mode these raise (see the bad-input tests); dropless routing never reads them. Traced
  with eval_shape: validation and capacity are static, so nothing needs compiling."""
  route_fn = functools.partial(routing.top_k_route, k=2, capacity_factor=capacity_factor, dropless=True)
  assert jax.eval_shape(route_fn, jnp.zeros((1, 8, 4))).capacity == 8


# ----------------------------------------------------------------------------------------------------------
# Capacity factor.


@pytest.mark.parametrize("router", ["top2", "expert_choice"])  # switch is top_k_route with k = 1
@PROPERTY
@hypothesis.given(seed=st.integers(0, 2**32 - 1))
def test_capacity_and_kept_count_are_monotone_in_capacity_factor(router, seed):
  """More capacity never drops an assignment that less capacity kept: kept sets are nested as cf grows."""
  logits = random_logits((2, 12, 3), seed)
  results = [route(router, logits, cf) for cf in (0.5, 1.0, 2.0)]
  capacities = [r.capacity for r in results]
  assert capacities == sorted(capacities) and capacities[0] < capacities[-1]
  for smaller, larger in zip(results, results[1:]):
    small_kept, large_kept = np.asarray(smaller.kept), np.asarray(larger.kept)
    assert np.all(~small_kept | large_kept)
    assert small_kept.sum() <= large_kept.sum()
    if router == "expert_choice":  # every expert fills its C slots
      assert small_kept.sum() == 2 * 3 * smaller.capacity


def test_capacity_is_monotone_in_capacity_factor():
  for tokens, num_experts, k in [(8, 4, 1), (12, 3, 2), (10, 6, 3), (1000, 64, 2)]:
    capacities = [routing.compute_capacity(tokens, num_experts, cf, k) for cf in np.linspace(0.05, 8.0, 160)]
    assert capacities == sorted(capacities)
    assert capacities[0] >= 1 and capacities[-1] <= tokens


@pytest.mark.parametrize(
    "tokens, num_experts, capacity_factor, top_k, expected",
    [
        (8, 4, 1.0, 1, 2),  # 8 / 4 = 2 exactly
        (8, 4, 1.25, 1, 3),  # 2.5 -> 3
        (8, 4, 1.25, 2, 5),  # 5 exactly
        (10, 3, 1.0, 1, 4),  # 3.33 -> 4
        (4, 8, 1.0, 1, 1),  # 0.5 -> 1
        (4, 8, 0.1, 1, 1),  # 0.05 -> at least one slot
        (8, 2, 4.0, 1, 8),  # 16 -> capped at S = 8
        (6, 3, 1.0, 3, 6),  # 6 = S
        (100, 10, 1.1, 1, 11),  # 1.1 * 100 / 10 = 11.000000000000002 in floating point: must be 11, not 12
        (10, 1, 1.1, 1, 10),  # 1.1 * 10 = 11.000000000000002, capped at S = 10
        (50, 5, 1.1, 1, 11),  # 11.000000000000002 again
        (30, 3, 0.7, 1, 7),  # 0.7 * 30 / 3 = 7.0
        (1000, 64, 1.25, 2, 40),  # 39.0625 -> 40
        (4096, 128, 1.25, 1, 40),  # 40 exactly
        (1, 1, 1.0, 1, 1),
    ],
)
def test_compute_capacity_matches_documented_formula(tokens, num_experts, capacity_factor, top_k, expected):
  capacity = routing.compute_capacity(tokens, num_experts, capacity_factor, top_k)
  assert isinstance(capacity, int)
  assert capacity == expected


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    tokens=st.integers(1, 4096), num_experts=st.integers(1, 256), hundredths=st.integers(1, 800), data=st.data()
)
def test_compute_capacity_matches_exact_decimal_formula(tokens, num_experts, hundredths, data):
  """min(S, max(1, ceil(cf * K * S / E))), cf read as the decimal the user wrote (exact rationals)."""
  top_k = data.draw(st.integers(1, num_experts))
  exact = fractions.Fraction(hundredths, 100) * top_k * tokens / num_experts
  expected = min(tokens, max(1, math.ceil(exact)))
  assert routing.compute_capacity(tokens, num_experts, hundredths / 100, top_k) == expected


# ----------------------------------------------------------------------------------------------------------
# Combine weights.


def check_combine_weights(router: str, renormalize: bool, case) -> None:
  shape, seed, cf = case
  logits = random_logits(shape, seed)
  result = route(router, logits, cf, **({"renormalize": True} if renormalize else {}))
  chex.assert_type(result.combine_weight, jnp.float32)
  chex.assert_trees_all_close(result.router_probs, softmax_np(logits).astype(np.float32), rtol=1e-5, atol=1e-7)
  weight, kept = np.asarray(result.combine_weight), np.asarray(result.kept)
  gates = chosen_probs(result)  # [G, S, K]
  expected = gates / gates.sum(-1, keepdims=True) if renormalize else gates
  chex.assert_trees_all_close(weight[kept], expected[kept], rtol=1e-6)
  assert np.all(weight[~kept] == 0.0)
  if router != "expert_choice":  # choice j is the j-th most probable expert
    assert np.all(np.diff(gates, axis=-1) <= 0)
    chex.assert_trees_all_close(gates[..., 0], np.asarray(result.router_probs).max(-1))


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_kept_combine_weight_is_router_probability_and_dropped_is_zero(router, case):
  check_combine_weights(router, False, case)


@pytest.mark.parametrize("router", ["top2", "top3"])
@PROPERTY
@given_cases(GRID[:1])
def test_kept_combine_weight_is_renormalized_probability_and_dropped_is_zero(router, case):
  check_combine_weights(router, True, case)


# ----------------------------------------------------------------------------------------------------------
# Batch-prioritised routing (V-MoE).


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@PROPERTY
@given_cases(TIGHT)
def test_batch_prioritized_higher_top_gate_wins_contested_slot(router, case):
  """Within one choice at one expert, every kept token has a higher top gate than every dropped one."""
  shape, seed, cf = case
  result = route(router, random_logits(shape, seed), cf, batch_prioritized=True)
  index, kept = np.asarray(result.expert_index), np.asarray(result.kept)
  top_gate = np.asarray(result.router_probs).max(-1)  # [G, S]
  contests = 0
  for g in range(shape[0]):
    for e in range(shape[2]):
      for j in range(index.shape[-1]):
        claims = index[g, :, j] == e
        winners, losers = top_gate[g][claims & kept[g, :, j]], top_gate[g][claims & ~kept[g, :, j]]
        if winners.size and losers.size:
          contests += 1
          assert winners.min() > losers.max(), (g, e, j)
  if index.shape[-1] == 1:  # a dropped first choice always lost to the C tokens that filled its expert
    assert contests > 0 or kept.all()


@pytest.mark.parametrize("router", TOKEN_CHOICE)
@PROPERTY
@given_cases(TIGHT)
def test_batch_prioritized_routing_is_equivariant_under_token_permutation(router, case):
  shape, seed, cf = case
  logits = random_logits(shape, seed)
  perm = np.random.default_rng(seed + 1).permutation(shape[1])
  result = route(router, logits, cf, batch_prioritized=True)
  permuted = route(router, jnp.asarray(np.asarray(logits)[:, perm]), cf, batch_prioritized=True)
  per_token = lambda r: (r.expert_index, r.slot, r.kept, r.combine_weight, r.router_probs)
  chex.assert_trees_all_equal(per_token(permuted), jax.tree.map(lambda a: np.asarray(a)[:, perm], per_token(result)))
  chex.assert_trees_all_close(
      (permuted.load_balancing_loss, permuted.router_z_loss, permuted.metrics),
      (result.load_balancing_loss, result.router_z_loss, result.metrics),
      rtol=1e-5,
  )


# Five tokens, two experts, logits = log of odds so the probabilities are exact fractions.
SWITCH_LOGITS = np.log(np.array([[[3.0, 1.0], [1.0, 4.0], [9.0, 1.0], [4.0, 1.0], [19.0, 1.0]]], np.float32))


def test_switch_pinned_example():
  """E = 2, S = 5, cf = 1: C = min(5, max(1, ceil(1 * 1 * 5 / 2))) = ceil(2.5) = 3.

    token  logits        p(e0)  p(e1)  argmax  claim order at expert    slot  kept  combine
    t0     [ln 3, 0]     0.75   0.25   e0      1st at e0                0     yes   0.75
    t1     [0, ln 4]     0.20   0.80   e1      1st at e1                0     yes   0.80
    t2     [ln 9, 0]     0.90   0.10   e0      2nd at e0                1     yes   0.90
    t3     [ln 4, 0]     0.80   0.20   e0      3rd at e0                2     yes   0.80
    t4     [ln 19, 0]    0.95   0.05   e0      4th at e0 -> 3 >= C      -     no    0
  """
  result = switch_jit(jnp.asarray(SWITCH_LOGITS), capacity_factor=1.0)
  assert result.capacity == 3 and result.num_experts == 2
  chex.assert_trees_all_equal(result.expert_index, np.array([[[0], [1], [0], [0], [0]]], np.int32))
  chex.assert_trees_all_equal(result.slot, np.array([[[0], [0], [1], [2], [0]]], np.int32))
  chex.assert_trees_all_equal(result.kept, np.array([[[True], [True], [True], [True], [False]]]))
  chex.assert_trees_all_close(result.combine_weight, np.array([[[0.75], [0.8], [0.9], [0.8], [0.0]]]), rtol=1e-6)
  # f = [4, 1] / 5 (before drops). P = [0.75 + 0.2 + 0.9 + 0.8 + 0.95, 0.25 + 0.8 + 0.1 + 0.2 + 0.05] / 5
  # = [0.72, 0.28]. loss = 2 * (0.8 * 0.72 + 0.2 * 0.28) = 2 * 0.632 = 1.264.
  chex.assert_trees_all_close(result.load_balancing_loss, 1.264, rtol=1e-6)
  # One of five tokens dropped; e0 holds 3/3, e1 1/3; mean top gate (0.75 + 0.8 + 0.9 + 0.8 + 0.95) / 5.
  chex.assert_trees_all_close(result.metrics.dropped_token_fraction, 0.2, rtol=1e-6)
  chex.assert_trees_all_close(result.metrics.dropped_assignment_fraction, 0.2, rtol=1e-6)
  chex.assert_trees_all_close(result.metrics.expert_load, np.array([1.0, 1.0 / 3.0]), rtol=1e-6)
  chex.assert_trees_all_close(result.metrics.mean_top_gate, 0.84, rtol=1e-6)


def test_batch_prioritized_switch_pinned_example():
  """The tokens of `test_switch_pinned_example` claim e0 by decreasing top gate instead of position:
  t4 (0.95) slot 0, t2 (0.90) slot 1, t3 (0.80) slot 2, t0 (0.75) slot 3 >= C = 3: dropped. So the most
  confident token t4, dropped in position order, now wins; t1 keeps e1 slot 0. Same drop count, same loss."""
  result = switch_jit(jnp.asarray(SWITCH_LOGITS), capacity_factor=1.0, batch_prioritized=True)
  assert result.capacity == 3
  chex.assert_trees_all_equal(result.expert_index, np.array([[[0], [1], [0], [0], [0]]], np.int32))
  chex.assert_trees_all_equal(result.slot, np.array([[[0], [0], [1], [2], [0]]], np.int32))
  chex.assert_trees_all_equal(result.kept, np.array([[[False], [True], [True], [True], [True]]]))
  chex.assert_trees_all_close(result.combine_weight, np.array([[[0.0], [0.8], [0.9], [0.8], [0.95]]]), rtol=1e-6)
  chex.assert_trees_all_close(result.load_balancing_loss, 1.264, rtol=1e-6)
  chex.assert_trees_all_close(result.metrics.dropped_token_fraction, 0.2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Symmetry in the experts.


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_permuting_expert_columns_permutes_assignments(router, case):
  """logits' = logits[..., perm] renames expert perm[e'] to e', i.e. old expert e is new expert inverse[e]."""
  shape, seed, cf = case
  logits = random_logits(shape, seed)
  perm = np.random.default_rng(seed + 7).permutation(shape[2])
  inverse = np.argsort(perm)
  result = route(router, logits, cf)
  permuted = route(router, jnp.asarray(np.asarray(logits)[..., perm]), cf)
  chex.assert_trees_all_close(permuted.router_probs, np.asarray(result.router_probs)[..., perm], rtol=1e-6)
  chex.assert_trees_all_close(permuted.metrics.expert_load, np.asarray(result.metrics.expert_load)[perm])
  if router == "expert_choice":  # the choice axis is the expert axis
    chex.assert_trees_all_equal(
        (permuted.slot, permuted.kept), (np.asarray(result.slot)[..., perm], np.asarray(result.kept)[..., perm])
    )
    chex.assert_trees_all_close(permuted.combine_weight, np.asarray(result.combine_weight)[..., perm], rtol=1e-6)
  else:
    chex.assert_trees_all_equal(permuted.expert_index, inverse[np.asarray(result.expert_index)].astype(np.int32))
    chex.assert_trees_all_equal((permuted.slot, permuted.kept), (result.slot, result.kept))
    chex.assert_trees_all_close(permuted.combine_weight, result.combine_weight, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Auxiliary losses.


def test_load_balancing_loss_is_one_for_uniform_probabilities_and_assignment():
  num_groups, tokens, num_experts = 2, 10, 5
  uniform = jnp.full((num_groups, tokens, num_experts), 1.0 / num_experts)  # [G, S, E]
  round_robin = np.eye(num_experts, dtype=np.float32)[np.arange(tokens) % num_experts]  # [S, E] token s -> s % E
  one_choice = np.broadcast_to(round_robin[None, :, None], (num_groups, tokens, 1, num_experts))
  two_choices = np.broadcast_to(
      np.stack([round_robin, np.roll(round_robin, 1, axis=-1)], axis=1)[None], (num_groups, tokens, 2, num_experts)
  )
  for mask in (one_choice, two_choices):
    chex.assert_trees_all_close(routing.load_balancing_loss(uniform, jnp.asarray(mask)), 1.0, rtol=1e-6)
  # Through the routers: token s has logit 2 on expert s % E and 0 elsewhere, so each expert's mean
  # probability is 1/E by symmetry and the first choices are round robin.
  logits = jnp.asarray(2.0 * round_robin[None, :, :])  # [1, 10, 5]: grid point GRID[2]
  for router in ALL_ROUTERS:
    chex.assert_trees_all_close(route(router, logits, GRID[2][1]).load_balancing_loss, 1.0, rtol=1e-6)


def test_load_balancing_loss_exceeds_one_when_skewed():
  """All 10 tokens have logits [ln 4, 0, 0, 0, 0]: p = [4/8, 1/8, 1/8, 1/8, 1/8], every token picks e0, so
  f = [1, 0, 0, 0, 0], P = p and the loss is E * f . P = 5 * 0.5 = 2.5."""
  logits = jnp.asarray(np.broadcast_to(np.log(np.array([4.0, 1.0, 1.0, 1.0, 1.0], np.float32)), (1, 10, 5)))
  chex.assert_trees_all_close(route("switch", logits, GRID[2][1]).load_balancing_loss, 2.5, rtol=1e-6)
  # Top-2: the tie among e1..e4 goes to e1, so f = [1/2, 1/2, 0, 0, 0] and
  # loss = 5 (1/2 * 1/2 + 1/2 * 1/8) = 5 * 0.3125 = 1.5625.
  chex.assert_trees_all_close(route("top2", logits, GRID[2][1]).load_balancing_loss, 1.5625, rtol=1e-6)
  # Random logits biased to e0: the assignment concentrates where the mean probability is high.
  skewed = np.asarray(random_logits((2, 12, 3), seed=3, scale=1.0)) + np.array([3.0, 0.0, 0.0], np.float32)
  assert float(route("switch", jnp.asarray(skewed), 0.5).load_balancing_loss) > 1.5


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_load_balancing_loss_matches_switch_equation_4(router, case):
  """E * sum_i f_i P_i per group, averaged; f counts every (token, choice) before capacity drops."""
  shape, seed, cf = case
  result = route(router, random_logits(shape, seed), cf)
  num_experts = shape[2]
  counted = np.ones(result.kept.shape, bool) if router != "expert_choice" else np.asarray(result.kept)
  counts = np.sum(np.eye(num_experts)[np.asarray(result.expert_index)] * counted[..., None], axis=(1, 2))  # [G, E]
  f = counts / counts.sum(-1, keepdims=True)
  p = np.asarray(result.router_probs, np.float64).mean(1)  # [G, E]
  chex.assert_trees_all_close(result.load_balancing_loss, np.float32(np.mean(num_experts * np.sum(f * p, -1))),
                              rtol=1e-5)


@PROPERTY
@hypothesis.given(case=cases, scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_router_z_loss_is_nonnegative_and_matches_logsumexp_squared(case, scale):
  shape, seed, cf = case
  logits = random_logits(shape, seed, scale=scale)
  z_loss = route("top2", logits, cf).router_z_loss
  x = np.asarray(logits, np.float64)
  expected = np.mean((x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))) ** 2)
  assert float(z_loss) >= 0.0
  chex.assert_trees_all_close(z_loss, np.float32(expected), rtol=1e-5)


def test_router_z_loss_pinned_example():
  """Token a: logits [0, 0, 0, 0] -> logsumexp = ln 4 = 2 ln 2. Token b: all ln 2 -> ln(4 * 2) = 3 ln 2.
  z = mean((2 ln 2)^2, (3 ln 2)^2) = 6.5 (ln 2)^2 ~= 3.1230. Zero logits alone give (ln 4)^2 > 0."""
  logits = np.array([[[0.0] * 4, [math.log(2.0)] * 4]], np.float32)  # [1, 2, 4]
  z_loss = fast_jit(routing.router_z_loss)
  chex.assert_trees_all_close(z_loss(logits), 6.5 * math.log(2.0) ** 2, rtol=1e-6)
  chex.assert_trees_all_close(z_loss(logits[:, :1]), math.log(4.0) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Precision: bfloat16 in, float32 router.


@pytest.mark.parametrize("router", ["top2", "expert_choice"])  # the two code paths (switch is top-k)
def test_bfloat16_logits_route_exactly_as_their_float32_cast(router):
  shape, cf = GRID[0]
  for seed in range(3):
    logits_bf16 = random_logits(shape, seed, dtype=jnp.bfloat16)
    chex.assert_type(logits_bf16, jnp.bfloat16)
    from_bf16 = route(router, logits_bf16, cf)
    chex.assert_type([from_bf16.router_probs, from_bf16.combine_weight, from_bf16.load_balancing_loss], jnp.float32)
    chex.assert_trees_all_equal(from_bf16, route(router, logits_bf16.astype(jnp.float32), cf))


def test_bfloat16_tokens_give_router_logits_of_their_float32_cast():
  shape, cf = GRID[0]
  tokens = jnp.asarray(np.random.default_rng(0).standard_normal(shape[:2] + (16,)), jnp.bfloat16)  # [G, S, M]
  kernel = jnp.asarray(np.random.default_rng(1).standard_normal((16, shape[2])) * 0.5, jnp.float32)  # [M, E]
  # Without jitter: the noise is drawn in float32 after the cast anyway, and each jittered compile costs ~1 s.
  from_bf16 = router_logits_jit(tokens, kernel)
  chex.assert_type(from_bf16, jnp.float32)
  chex.assert_shape(from_bf16, shape)
  from_f32 = router_logits_jit(tokens.astype(jnp.float32), kernel)
  chex.assert_trees_all_equal(from_bf16, from_f32)
  for router in ALL_ROUTERS:
    chex.assert_trees_all_equal(route(router, from_bf16, cf), route(router, from_f32, cf))


# ----------------------------------------------------------------------------------------------------------
# jit and eager agree (chex variants), both checked against the plain-loop references.


class RouterVariantsTest(chex.TestCase):
  """Eager compiles per primitive and shape (~3 s a router), so one small shape and the widest settings.
  (The random policy is left out: jit/eager agreement of its draws is jax.random's property, not ours.)"""

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_choice_jit_and_eager_match_reference(self):
    logits = random_logits((2, 8, 4), seed=11)
    route_fn = self.variant(
        functools.partial(routing.top_k_route, k=2, capacity_factor=0.5, batch_prioritized=True, renormalize=True)
    )
    result = route_fn(logits)
    probs = softmax_np(logits)
    expected = reference.token_choice_loop(probs, 2, routing.compute_capacity(8, 4, 0.5, 2), batch_prioritized=True)
    assert not expected[2].all(), "the example must drop something"
    chex.assert_trees_all_equal((result.expert_index, result.slot, result.kept), expected)
    gates = np.take_along_axis(probs, expected[0], axis=-1)
    weights = np.where(expected[2], gates / gates.sum(-1, keepdims=True), 0.0)
    chex.assert_trees_all_close(result.combine_weight, weights.astype(np.float32), rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_expert_choice_jit_and_eager_match_reference(self):
    logits = random_logits((2, 8, 4), seed=12)
    result = self.variant(functools.partial(routing.expert_choice_route, capacity_factor=1.0))(logits)
    probs = softmax_np(logits)
    expected = reference.expert_choice_loop(probs, routing.compute_capacity(8, 4, 1.0))
    chex.assert_trees_all_equal((result.expert_index, result.slot, result.kept), expected)
    chex.assert_trees_all_close(result.combine_weight, np.where(expected[2], probs, 0.0).astype(np.float32), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Hand-pinned examples (the Switch ones are above, with batch prioritisation).

TOP2_ODDS = [[4.0, 3.0, 1.0], [2.0, 5.0, 1.0], [5.0, 2.0, 1.0], [1.0, 5.0, 2.0]]  # each row sums to 8


def test_top2_pinned_example():
  """Four tokens, E = 3, k = 2, cf = 0.75: C = ceil(0.75 * 2 * 4 / 3) = ceil(2.0) = 2. Logits = log(odds),
  so p = odds / 8.

    token  p                      1st (p)     2nd (p)
    t0     [.5, .375, .125]       e0 (.5)     e1 (.375)
    t1     [.25, .625, .125]      e1 (.625)   e0 (.25)
    t2     [.625, .25, .125]      e0 (.625)   e1 (.25)
    t3     [.125, .625, .25]      e1 (.625)   e2 (.25)

  First choices claim slots first, in token order: e0 <- t0 (slot 0), t2 (slot 1); e1 <- t1 (0), t3 (1).
  Then second choices: t0 -> e1 full, dropped (t0 comes before t3, but t3's FIRST choice took the slot);
  t1 -> e0 full, dropped; t2 -> e1 full, dropped; t3 -> e2 slot 0, kept.
  """
  logits = jnp.asarray(np.log(np.array([TOP2_ODDS], np.float32)))  # [1, 4, 3]
  result = top_k_jit(logits, k=2, capacity_factor=0.75)
  assert result.capacity == 2
  chex.assert_trees_all_equal(result.expert_index, np.array([[[0, 1], [1, 0], [0, 1], [1, 2]]], np.int32))
  chex.assert_trees_all_equal(result.slot, np.array([[[0, 0], [0, 0], [1, 0], [1, 0]]], np.int32))
  chex.assert_trees_all_equal(result.kept, np.array([[[True, False], [True, False], [True, False], [True, True]]]))
  chex.assert_trees_all_close(
      result.combine_weight, np.array([[[0.5, 0.0], [0.625, 0.0], [0.625, 0.0], [0.625, 0.25]]]), rtol=1e-6
  )
  # Assignments before drops: e0 3 (t0, t1', t2), e1 4 (t0', t1, t2', t3), e2 1 (t3') -> f = [3, 4, 1] / 8.
  # P = column means of p = [1.5, 1.875, 0.625] / 4 = [0.375, 0.46875, 0.15625].
  # loss = 3 * (3 * 0.375 + 4 * 0.46875 + 1 * 0.15625) / 8 = 3 * 3.15625 / 8 = 1.18359375.
  chex.assert_trees_all_close(result.load_balancing_loss, 1.18359375, rtol=1e-6)
  # 3 of 8 assignments dropped, no token lost entirely; loads e0 2/2, e1 2/2, e2 1/2.
  chex.assert_trees_all_close(result.metrics.dropped_assignment_fraction, 3.0 / 8.0, rtol=1e-6)
  chex.assert_trees_all_close(result.metrics.dropped_token_fraction, 0.0)
  chex.assert_trees_all_close(result.metrics.expert_load, np.array([1.0, 1.0, 0.5]), rtol=1e-6)
  # Mixtral renormalisation over the two chosen experts: t0 .5 / .875 = 4/7; t1, t2 .625 / .875 = 5/7;
  # t3 5/7 and .25 / .875 = 2/7. The routing is the same; only the weights change.
  renormalized = top_k_jit(logits, k=2, capacity_factor=0.75, renormalize=True)
  chex.assert_trees_all_equal(
      (renormalized.expert_index, renormalized.slot, renormalized.kept), (result.expert_index, result.slot, result.kept)
  )
  chex.assert_trees_all_close(
      renormalized.combine_weight, np.array([[[4 / 7, 0.0], [5 / 7, 0.0], [5 / 7, 0.0], [5 / 7, 2 / 7]]]), rtol=1e-6
  )


EXPERT_CHOICE_ODDS = [[4.0, 3.0, 1.0], [2.0, 5.0, 1.0], [5.0, 1.0, 2.0], [1.0, 4.0, 3.0]]  # each row sums to 8


def test_expert_choice_pinned_example():
  """Four tokens, E = 3, logits = log(odds) so p = odds / 8:

    token  odds       e0 column   e1 column   e2 column
    t0     [4, 3, 1]  4           3           1
    t1     [2, 5, 1]  2           5           1
    t2     [5, 1, 2]  5           1           2
    t3     [1, 4, 3]  1           4           3

  cf = 1: C = ceil(1 * 4 / 3) = 2 tokens per expert, slot = rank in the expert's column:
    e0 picks t2 (5, slot 0), t0 (4, slot 1); e1 picks t1 (5, 0), t3 (4, 1); e2 picks t3 (3, 0), t2 (2, 1).
  cf = 0.75: C = ceil(0.75 * 4 / 3) = ceil(1.0) = 1: e0 <- t2, e1 <- t1, e2 <- t3; nobody picks t0.
  """
  logits = jnp.asarray(np.log(np.array([EXPERT_CHOICE_ODDS], np.float32)))  # [1, 4, 3]
  result = expert_choice_jit(logits, capacity_factor=1.0)
  assert result.capacity == 2
  chex.assert_trees_all_equal(result.expert_index, np.broadcast_to(np.arange(3, dtype=np.int32), (1, 4, 3)))
  chex.assert_trees_all_equal(
      result.kept, np.array([[[True, False, False], [False, True, False], [True, False, True], [False, True, True]]])
  )
  chex.assert_trees_all_equal(result.slot, np.array([[[1, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0]]], np.int32))
  chex.assert_trees_all_close(
      result.combine_weight, np.array([[[4, 0, 0], [0, 5, 0], [5, 0, 2], [0, 4, 3]]]) / 8.0, rtol=1e-6
  )
  chex.assert_trees_all_close(result.load_balancing_loss, 1.0, rtol=1e-6)  # balanced by construction
  chex.assert_trees_all_close(result.metrics.dropped_token_fraction, 0.0)
  chex.assert_trees_all_close(result.metrics.expert_load, np.ones(3, np.float32))

  tight = expert_choice_jit(logits, capacity_factor=0.75)
  assert tight.capacity == 1
  chex.assert_trees_all_equal(
      tight.kept, np.array([[[False, False, False], [False, True, False], [True, False, False], [False, False, True]]])
  )
  chex.assert_trees_all_equal(tight.slot, np.zeros((1, 4, 3), np.int32))
  chex.assert_trees_all_close(tight.combine_weight, np.array([[[0, 0, 0], [0, 5, 0], [5, 0, 0], [0, 0, 3]]]) / 8.0)
  chex.assert_trees_all_close(tight.metrics.dropped_token_fraction, 0.25)


# ----------------------------------------------------------------------------------------------------------
# Gradients.


def test_gradient_reaches_router_logits_through_switch_combine_weights():
  """d/dl_j [r * p_i] = r * p_i (delta_ij - p_j) for a kept token routed to i; 0 for a dropped token."""
  shape, cf = GRID[0]
  logits = random_logits(shape, seed=5)
  cotangent = jnp.asarray(np.random.default_rng(6).standard_normal(shape[:2] + (1,)), jnp.float32)  # [G, S, K]
  loss = lambda l, r: jnp.sum(routing.switch_route(l, capacity_factor=cf).combine_weight * r)
  grad = np.asarray(fast_jit(jax.grad(loss))(logits, cotangent))
  result = route("switch", logits, cf)
  kept = np.asarray(result.kept)[..., 0]  # [G, S]
  assert kept.any() and (~kept).any(), "the example must keep some tokens and drop others"
  probs = softmax_np(logits)  # [G, S, E]
  chosen = np.asarray(result.expert_index)[..., 0]  # [G, S]
  p_i = np.take_along_axis(probs, chosen[..., None], axis=-1)  # [G, S, 1]
  analytic = np.asarray(cotangent) * p_i * (np.eye(shape[2])[chosen] - probs) * kept[..., None]
  chex.assert_trees_all_close(grad, analytic.astype(np.float32), rtol=1e-4, atol=1e-6)
  assert np.all(np.abs(grad[kept]).sum(-1) > 0)
  assert np.all(grad[~kept] == 0.0)
  # Central finite differences on every logit of the first kept token (small enough not to change routing).
  g, s = map(int, np.argwhere(kept)[0])
  value = lambda l: float(np.sum(np.asarray(route("switch", jnp.asarray(l), cf).combine_weight) * cotangent))
  h = 1e-2
  for j in range(shape[2]):
    bump = np.zeros(shape, np.float32)
    bump[g, s, j] = h
    finite_difference = (value(np.asarray(logits) + bump) - value(np.asarray(logits) - bump)) / (2 * h)
    chex.assert_trees_all_close(grad[g, s, j], np.float32(finite_difference), rtol=1e-2, atol=1e-4)


def test_gradient_reaches_router_logits_through_renormalized_top2_weights():
  """Mixtral: w_c = softmax over the k chosen logits, so dw_c/dl_{i_d} = w_c (delta_cd - w_d) and the other
  experts get no gradient. Dropless, so every choice is kept."""
  shape = (1, 8, 4)
  logits = random_logits(shape, seed=8)
  cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(shape[:2] + (2,)), jnp.float32)  # [G, S, K]
  route_fn = functools.partial(routing.top_k_route, k=2, capacity_factor=None, dropless=True, renormalize=True)
  grad = np.asarray(fast_jit(jax.grad(lambda l, r: jnp.sum(route_fn(l).combine_weight * r)))(logits, cotangent))
  result = top_k_jit(logits, k=2, capacity_factor=None, dropless=True, renormalize=True)
  weight, index, r = np.asarray(result.combine_weight), np.asarray(result.expert_index), np.asarray(cotangent)
  analytic = np.zeros(shape)
  for s in range(shape[1]):
    for d in range(2):
      analytic[0, s, index[0, s, d]] = sum(r[0, s, c] * weight[0, s, c] * (float(c == d) - weight[0, s, d])
                                           for c in range(2))
  chex.assert_trees_all_close(grad, analytic.astype(np.float32), rtol=1e-4, atol=1e-6)
  assert np.all(np.abs(grad).sum(-1) > 0)


# ----------------------------------------------------------------------------------------------------------
# GShard's random second-expert policy.

POLICY_SHAPE = (1, 1024, 4)  # many tokens, so dispatch rates can be compared with their expectation


def route_random(logits, key, threshold: float, *, k: int = 2, **options) -> routing.RoutingResult:
  return top_k_jit(logits, k=k, second_expert_policy="random", second_expert_threshold=threshold, key=key, **options)


def test_random_policy_is_deterministic_given_the_key():
  logits = random_logits(POLICY_SHAPE, seed=21)
  first = route_random(logits, jax.random.key(1), 0.5, capacity_factor=None, dropless=True)
  chex.assert_trees_all_equal(first, route_random(logits, jax.random.key(1), 0.5, capacity_factor=None, dropless=True))
  other = route_random(logits, jax.random.key(2), 0.5, capacity_factor=None, dropless=True)
  assert not np.array_equal(np.asarray(first.kept), np.asarray(other.kept)), "the key must matter"
  with pytest.raises(ValueError, match="key"):
    routing.top_k_route(logits, k=2, second_expert_policy="random")


@pytest.mark.parametrize("k", [2, 3])
@PROPERTY
@hypothesis.given(seed=st.integers(0, 2**32 - 1), key_seed=st.integers(0, 2**31 - 1))
def test_random_policy_never_drops_first_choices(k, seed, key_seed):
  """The policy thins only the choices after the first, and those claim capacity after every first choice,
  so first choices are kept and slotted exactly as under policy 'all', even at a tight capacity. Threshold 1,
  the strongest thinning: were the policy applied to first choices too, it would drop them w.p. 1 - w1 > 0."""
  shape, cf = GRID[0]
  logits = random_logits(shape, seed)
  result = route_random(logits, jax.random.key(key_seed), 1.0, k=k, capacity_factor=cf)
  policy_all = route(f"top{k}", logits, cf)
  chex.assert_trees_all_equal(
      (result.expert_index, result.slot[..., 0], result.kept[..., 0]),
      (policy_all.expert_index, policy_all.slot[..., 0], policy_all.kept[..., 0]),
  )


@PROPERTY
@hypothesis.given(seed=st.integers(0, 2**32 - 1))
def test_random_policy_drops_more_second_choices_as_threshold_rises(seed):
  logits = random_logits(POLICY_SHAPE, seed)
  key = jax.random.key(seed % 1000)
  thresholds = (0.1, 0.5, 1.0)
  kept_second = [
      np.asarray(route_random(logits, key, t, capacity_factor=None, dropless=True).kept)[..., 1] for t in thresholds
  ]
  for lower, higher in zip(kept_second, kept_second[1:]):
    assert np.all(lower | ~higher), "a second choice dispatched at a higher threshold must be at a lower one"
    assert lower.sum() > higher.sum()


@pytest.mark.parametrize("threshold", [0.1, 0.5, 1.0])
def test_random_policy_dispatches_with_probability_weight_over_threshold(threshold):
  """P(dispatch choice 2) = min(1, w2 / threshold), w2 the weight normalised over the two choices: the
  empirical rate over 1024 tokens matches its expectation (standard error <= 0.016; fixed key)."""
  logits = random_logits(POLICY_SHAPE, seed=31, scale=1.0)
  result = route_random(logits, jax.random.key(32), threshold, capacity_factor=None, dropless=True)
  gates = chosen_probs(result)
  w2 = gates[..., 1] / gates.sum(-1)
  expected = np.mean(np.minimum(1.0, w2 / threshold))
  assert abs(np.mean(np.asarray(result.kept)[..., 1]) - expected) < 0.05, expected
  assert np.all(np.asarray(result.kept)[..., 0])
  chex.assert_trees_all_equal(  # a choice the policy did not dispatch is not counted as dropped
      (result.metrics.dropped_token_fraction, result.metrics.dropped_assignment_fraction),
      (jnp.float32(0.0), jnp.float32(0.0)),
  )


# ----------------------------------------------------------------------------------------------------------
# Dense dispatch form.


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_dispatch_and_combine_tensors_agree_with_routing_result(router, case):
  shape, seed, cf = case
  num_groups, tokens, num_experts = shape
  result = route(router, random_logits(shape, seed), cf)
  dispatch, combine = (np.asarray(a) for a in dispatch_and_combine_jit(result))
  chex.assert_shape([dispatch, combine], (num_groups, tokens, num_experts, result.capacity))
  assert dispatch.dtype == np.bool_ and combine.dtype == np.float32
  index, slot, kept, weight = (np.asarray(a) for a in (result.expert_index, result.slot, result.kept,
                                                       result.combine_weight))
  # Each kept (token, choice) has its single 1 at (expert, slot); nothing else is set.
  assert dispatch.sum() == kept.sum()
  g, s, c = np.nonzero(kept)
  assert np.all(dispatch[g, s, index[g, s, c], slot[g, s, c]])
  chex.assert_trees_all_close(combine[g, s, index[g, s, c], slot[g, s, c]], weight[g, s, c])
  assert np.all(combine[~dispatch] == 0.0)
  assert np.all(dispatch.sum(axis=1) <= 1), "two tokens share one slot"
  chex.assert_trees_all_close(combine.sum(axis=(2, 3)), weight.sum(-1), rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Router input jitter.


def test_zero_jitter_is_identity_whatever_the_key():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.standard_normal((2, 8, 6)), jnp.float32)  # [G, S, M]
  kernel = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)  # [M, E]
  plain = router_logits_jit(tokens, kernel, jitter_eps=0.0, key=None)
  for key in (jax.random.key(2), jax.random.key(3)):
    chex.assert_trees_all_equal(router_logits_jit(tokens, kernel, jitter_eps=0.0, key=key), plain)
  chex.assert_trees_all_close(plain, np.asarray(tokens) @ np.asarray(kernel), rtol=1e-5, atol=1e-6)
  identity = np.eye(6, dtype=np.float32)
  chex.assert_trees_all_equal(router_logits_jit(tokens, identity, jitter_eps=0.0, key=jax.random.key(4)), tokens)


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_jitter_multiplies_router_inputs_by_noise_within_one_plus_minus_eps(eps):
  """With kernel = I the logits are the jittered inputs themselves, so logits / x is the noise."""
  tokens = np.random.default_rng(0).uniform(0.5, 2.0, (2, 16, 8)).astype(np.float32)  # [G, S, M], positive
  identity = np.eye(8, dtype=np.float32)  # [M, E]
  jittered = lambda key: np.asarray(router_logits_jit(jnp.asarray(tokens), identity, jitter_eps=eps, key=key))
  noise = jittered(jax.random.key(1)) / tokens
  slack = 1e-6
  assert np.all((noise >= 1 - eps - slack) & (noise <= 1 + eps + slack)), (noise.min(), noise.max())
  # 256 draws from U[1 - eps, 1 + eps] reach into both outer quarters: the full interval, both sides of 1.
  assert noise.min() < 1 - eps / 2 and noise.max() > 1 + eps / 2
  assert np.unique(noise).size > 200, "one draw per element, not one per row or tensor"
  chex.assert_trees_all_equal(jittered(jax.random.key(1)), noise * tokens)
  assert not np.allclose(jittered(jax.random.key(2)), noise * tokens), "the key must matter"


def test_jitter_needs_a_key():
  tokens, kernel = jnp.ones((1, 2, 3)), jnp.ones((3, 2))
  with pytest.raises(ValueError, match=r"jitter_eps=0.1.*key"):
    routing.router_logits(tokens, kernel, jitter_eps=0.1)
  with pytest.raises(ValueError, match=r"jitter_eps=0.1.*key"):
    router_logits_jit(tokens, kernel, jitter_eps=0.1)


# ----------------------------------------------------------------------------------------------------------
# Metrics.


@pytest.mark.parametrize("router", ALL_ROUTERS)
@PROPERTY
@given_cases()
def test_metrics_are_bounded_and_consistent_with_kept(router, case):
  shape, seed, cf = case
  num_experts = shape[2]
  result = route(router, random_logits(shape, seed), cf)
  metrics = result.metrics
  kept, probs = np.asarray(result.kept), np.asarray(result.router_probs)
  for fraction in (metrics.dropped_token_fraction, metrics.dropped_assignment_fraction):
    assert 0.0 <= float(fraction) <= 1.0
  chex.assert_trees_all_close(metrics.dropped_token_fraction, (~kept.any(-1)).mean(), rtol=1e-6)
  if router != "expert_choice":
    chex.assert_trees_all_close(metrics.dropped_assignment_fraction, 1.0 - kept.mean(), rtol=1e-6, atol=1e-7)
    assert float(metrics.dropped_token_fraction) <= float(metrics.dropped_assignment_fraction)
  chex.assert_shape(metrics.expert_load, (num_experts,))
  assert np.all(np.asarray(metrics.expert_load) <= 1.0), metrics.expert_load  # a full buffer is exactly 1
  chex.assert_trees_all_close(metrics.expert_load, kept_per_expert(result).mean(0) / result.capacity, rtol=1e-6)
  assert 0.0 <= float(metrics.router_entropy) <= math.log(num_experts) + 1e-6
  chex.assert_trees_all_close(metrics.router_entropy, np.mean(-np.sum(probs * np.log(probs), -1)), rtol=1e-5)
  assert 1.0 / num_experts - 1e-7 <= float(metrics.mean_top_gate) <= 1.0
  chex.assert_trees_all_close(metrics.mean_top_gate, probs.max(-1).mean(), rtol=1e-6)


def test_router_entropy_reaches_its_bounds():
  """Uniform probabilities give log E; a near one-hot router gives ~0."""
  uniform = route("switch", jnp.zeros((1, 10, 5)), GRID[2][1])
  chex.assert_trees_all_close(uniform.metrics.router_entropy, math.log(5), rtol=1e-6)
  peaked = route("switch", jnp.asarray(100.0 * np.eye(5, dtype=np.float32)[np.arange(10) % 5][None]), GRID[2][1])
  assert 0.0 <= float(peaked.metrics.router_entropy) < 1e-6


def test_full_buffers_report_load_exactly_one():
  """Three groups whose every expert is full (expert choice, C = ceil(0.75 * 14 / 4) = 3): the load must be
  exactly 1.0. Mean-then-divide gave 1.0000001 here: XLA's mean multiplies by 1/G = 0.33333334."""
  shape, cf = GRID[1]
  result = route("expert_choice", random_logits(shape, seed=0), cf)
  assert shape[0] == 3 and result.capacity == 3
  chex.assert_trees_all_equal(result.metrics.expert_load, np.ones(4, np.float32))


# ----------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument, raised while tracing (so under jit too, before any XLA error).

GOOD = jnp.zeros((1, 4, 3))  # [G, S, E]
NO_EXPERTS = jnp.zeros((1, 4, 0))
TOKENS, KERNEL = jnp.ones((1, 4, 2)), jnp.ones((2, 3))

BAD_CALLS = {
    # name: (function, static argnames under jit, args, kwargs, message pattern)
    "switch_no_experts": (routing.switch_route, (), (NO_EXPERTS,), {}, r"num_experts=0"),
    "top_k_no_experts": (routing.top_k_route, ("k",), (NO_EXPERTS,), {"k": 1}, r"num_experts=0"),
    "expert_choice_no_experts": (routing.expert_choice_route, (), (NO_EXPERTS,), {}, r"num_experts=0"),
    "top_k_zero": (routing.top_k_route, ("k",), (GOOD,), {"k": 0}, r"top_k=0"),
    "top_k_above_num_experts": (routing.top_k_route, ("k",), (GOOD,), {"k": 4}, r"top_k=4.*num_experts=3"),
    "switch_capacity_factor_zero": (
        routing.switch_route, ("capacity_factor",), (GOOD,), {"capacity_factor": 0.0}, r"capacity_factor=0.0"),
    "switch_capacity_factor_negative": (
        routing.switch_route, ("capacity_factor",), (GOOD,), {"capacity_factor": -1.0}, r"capacity_factor=-1.0"),
    "switch_capacity_factor_none": (
        routing.switch_route, ("capacity_factor",), (GOOD,), {"capacity_factor": None}, r"capacity_factor=None"),
    "top_k_capacity_factor_zero": (
        routing.top_k_route, ("k", "capacity_factor"), (GOOD,), {"k": 2, "capacity_factor": 0.0},
        r"capacity_factor=0.0"),
    "top_k_capacity_factor_negative": (
        routing.top_k_route, ("k", "capacity_factor"), (GOOD,), {"k": 2, "capacity_factor": -0.5},
        r"capacity_factor=-0.5"),
    "expert_choice_capacity_factor_zero": (
        routing.expert_choice_route, ("capacity_factor",), (GOOD,), {"capacity_factor": 0.0},
        r"capacity_factor=0.0"),
    "expert_choice_capacity_factor_negative": (
        routing.expert_choice_route, ("capacity_factor",), (GOOD,), {"capacity_factor": -2.0},
        r"capacity_factor=-2.0"),
    # With a key, so that only the range check can raise (not the missing-key check).
    "jitter_eps_negative": (
        routing.router_logits, ("jitter_eps",), (TOKENS, KERNEL), {"jitter_eps": -0.1, "key": jax.random.key(0)},
        r"jitter_eps=-0.1 must be in \[0, 1\)"),
    "jitter_eps_one": (
        routing.router_logits, ("jitter_eps",), (TOKENS, KERNEL), {"jitter_eps": 1.0, "key": jax.random.key(0)},
        r"jitter_eps=1.0 must be in \[0, 1\)"),
    "jitter_eps_above_one": (
        routing.router_logits, ("jitter_eps",), (TOKENS, KERNEL), {"jitter_eps": 1.5, "key": jax.random.key(0)},
        r"jitter_eps=1.5 must be in \[0, 1\)"),
    "switch_rank_2": (routing.switch_route, (), (jnp.zeros((4, 3)),), {}, r"rank 3.*\(4, 3\)"),
    "switch_rank_4": (routing.switch_route, (), (jnp.zeros((1, 2, 4, 3)),), {}, r"rank 3.*\(1, 2, 4, 3\)"),
    "top_k_rank_2": (routing.top_k_route, ("k",), (jnp.zeros((4, 3)),), {"k": 2}, r"rank 3"),
    "top_k_rank_4": (routing.top_k_route, ("k",), (jnp.zeros((1, 2, 4, 3)),), {"k": 2}, r"rank 3"),
    "expert_choice_rank_2": (routing.expert_choice_route, (), (jnp.zeros((4, 3)),), {}, r"rank 3"),
    "expert_choice_rank_4": (routing.expert_choice_route, (), (jnp.zeros((1, 2, 4, 3)),), {}, r"rank 3"),
    "random_policy_threshold_zero": (
        routing.top_k_route, ("k", "second_expert_policy", "second_expert_threshold"), (GOOD,),
        {"k": 2, "second_expert_policy": "random", "second_expert_threshold": 0.0, "key": jax.random.key(0)},
        r"second_expert_threshold=0.0"),
    "unknown_policy": (
        routing.top_k_route, ("k", "second_expert_policy"), (GOOD,), {"k": 2, "second_expert_policy": "first"},
        r"second_expert_policy='first'"),
}


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_value_error_naming_the_argument(case, use_jit):
  fn, static, args, kwargs, message = BAD_CALLS[case]
  if use_jit:
    fn = jax.jit(fn, static_argnames=static)
  with pytest.raises(ValueError, match=message):
    fn(*args, **kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        ((8, 0, 1.0, 1), r"num_experts=0"),
        ((8, 4, 1.0, 0), r"top_k=0"),
        ((8, 4, 1.0, 5), r"top_k=5"),
        ((8, 4, 0.0, 1), r"capacity_factor=0.0"),
        ((8, 4, -1.25, 1), r"capacity_factor=-1.25"),
    ],
)
def test_compute_capacity_rejects_bad_arguments(args, message):
  with pytest.raises(ValueError, match=message):
    routing.compute_capacity(*args)
