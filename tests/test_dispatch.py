"""Dispatch backends and experts as pure functions: every backend computes the reference MoE."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, reference, routing
from moe_jax import experts as experts_lib

GROUPS, TOKENS, D_MODEL, D_FF, EXPERTS = 2, 16, 8, 16, 4
# Every registered backend (an optional one where its package is installed: tests/test_dispatch_backends.py checks
# its wiring everywhere), and the tiled dropless backend with small tile heights, so that the test sizes cover
# several tiles per expert, every tile height, and segments that end mid-tile.
VARIANTS = {name: dispatch.get_backend(name) for name in dispatch.BACKENDS
            if name not in dispatch.OPTIONAL or name in dispatch.installed_optional()}
VARIANTS["dropless_tiles_6_4_2"] = functools.partial(dispatch.dropless_dispatch, tiles=(6, 4, 2))
BACKENDS = tuple(VARIANTS)

# Cases: a router with the options that change slots or weights, and an activation (each activation appears
# at least once). Capacity factors are small enough that the capacity routers drop assignments.
CASES = {
    "switch_drops": (lambda logits, key: routing.switch_route(logits, capacity_factor=0.5), "relu"),
    "top2": (lambda logits, key: routing.top_k_route(logits, k=2, capacity_factor=0.75), "gelu"),
    "top2_renormalized_prioritized": (
        lambda logits, key: routing.top_k_route(
            logits, k=2, capacity_factor=0.75, renormalize=True, batch_prioritized=True
        ),
        "geglu",
    ),
    "top2_random_policy": (
        lambda logits, key: routing.top_k_route(
            logits, k=2, capacity_factor=1.0, second_expert_policy="random", key=key
        ),
        "swiglu",
    ),
    "expert_choice": (lambda logits, key: routing.expert_choice_route(logits, capacity_factor=1.0), "gelu"),
    "top3_dropless": (lambda logits, key: routing.top_k_route(logits, k=3, dropless=True), "swiglu"),
}
ROUTERS = {name: router for name, (router, _) in CASES.items()}


def make_weights(activation: str, seed: int = 0, num_experts: int = EXPERTS) -> experts_lib.ExpertWeights:
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  normal = lambda key, shape: 0.3 * jax.random.normal(key, shape)
  return experts_lib.ExpertWeights(
      wi_0=normal(k0, (num_experts, D_MODEL, D_FF)),
      wo=normal(k1, (num_experts, D_FF, D_MODEL)),
      wi_1=normal(k2, (num_experts, D_MODEL, D_FF)) if experts_lib.is_gated(activation) else None,
  )


def make_inputs(seed: int = 1):
  k_tokens, k_logits, k_cotangent = jax.random.split(jax.random.key(seed), 3)
  tokens = jax.random.normal(k_tokens, (GROUPS, TOKENS, D_MODEL))
  logits = 2.0 * jax.random.normal(k_logits, (GROUPS, TOKENS, EXPERTS))
  cotangent = jax.random.normal(k_cotangent, (GROUPS, TOKENS, D_MODEL))
  return tokens, logits, cotangent


@functools.cache
def outputs_and_grads(case: str) -> dict:
  """{backend or 'reference': (output, grads wrt tokens, router logits, expert weights)} and the routing
  metrics, all from one compiled program: compile time dominates these tests, so share it."""
  router, activation = CASES[case]
  tokens, logits, cotangent = make_inputs()
  weights = make_weights(activation)

  def moe(backend, tokens, logits, weights):
    route = router(logits, jax.random.key(7))
    if backend == "reference":
      return reference.moe(tokens, route, weights, activation=activation), route.metrics
    return VARIANTS[backend](tokens, route, experts_lib.StackedExperts(weights, activation)), None

  def all_backends(tokens, logits, weights):
    results = {}
    for backend in ("reference",) + BACKENDS:
      loss = lambda *args: (jnp.sum(moe(backend, *args)[0] * cotangent), moe(backend, *args))
      (_, (out, metrics)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
          tokens, logits, weights
      )
      results[backend] = (out, grads)
      results["metrics"] = metrics if metrics is not None else results["metrics"]
    return results

  return jax.jit(all_backends)(tokens, logits, weights)


class TestBackendsEqualReference:

  @pytest.mark.parametrize("case", sorted(CASES))
  @pytest.mark.parametrize("backend", BACKENDS)
  def test_output_and_gradients_equal_reference(self, backend, case):
    results = outputs_and_grads(case)
    chex.assert_trees_all_close(results[backend], results["reference"], atol=1e-5, rtol=0)

  @pytest.mark.parametrize("case", sorted(CASES))
  def test_capacity_routers_under_test_do_drop(self, case):
    """Guards the test above: its capacity routers must actually drop some assignments."""
    dropped = float(outputs_and_grads(case)["metrics"].dropped_assignment_fraction)
    assert (dropped == 0.0) == (case == "top3_dropless"), dropped


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_tokens_give_exactly_zero_output(backend):
  """Equal logits send every token to expert 0; tokens past its capacity C are dropped and give 0."""
  tokens, _, _ = make_inputs()
  route = routing.switch_route(jnp.zeros((GROUPS, TOKENS, EXPERTS)), capacity_factor=1.0)
  experts = experts_lib.StackedExperts(make_weights("gelu"), "gelu")
  out = jax.jit(lambda tokens, route: VARIANTS[backend](tokens, route, experts))(tokens, route)
  capacity = route.capacity
  chex.assert_trees_all_equal(out[:, capacity:], jnp.zeros_like(out[:, capacity:]))
  assert bool(jnp.all(jnp.any(out[:, :capacity] != 0, axis=-1)))


class RecordingExperts:
  """Identity experts that record how many non-empty rows reach each expert."""

  def __init__(self):
    self.counts = None

  def __call__(self, x):  # [E, T, M]
    self.counts = jnp.sum(jnp.any(x != 0, axis=-1), axis=-1)
    return x

  def blocked(self, x, layout):  # [R, M]
    self.counts = layout.expert_rows
    return x

  def ragged(self, x, group_sizes, ragged_dot=jax.lax.ragged_dot):  # [N, M], [E]; identity: no matmul to run
    self.counts = group_sizes
    return x


@pytest.mark.parametrize("router", ["switch_drops", "top2", "expert_choice", "top3_dropless"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_reaching_each_expert_equal_routing_counts(backend, router):
  tokens, logits, _ = make_inputs()
  route = jax.jit(ROUTERS[router])(logits, jax.random.key(7))
  recorder = RecordingExperts()

  @jax.jit
  def run(tokens, route):
    return VARIANTS[backend](tokens, route, recorder), recorder.counts

  out, counts = run(tokens, route)
  expected = jnp.sum(jax.nn.one_hot(route.expert_index, EXPERTS, dtype=jnp.int32) * route.kept[..., None], (0, 1, 2))
  chex.assert_trees_all_equal(counts.astype(jnp.int32), expected)
  # Identity experts: each token comes back scaled by the sum of its kept combine weights.
  chex.assert_trees_all_close(out, tokens * jnp.sum(route.combine_weight, -1, keepdims=True), atol=1e-6)


def test_unknown_backend_raises():
  with pytest.raises(ValueError, match="dispatch='scatter' must be one of"):
    dispatch.get_backend("scatter")
  with pytest.raises(ValueError, match="dispatch='scatter' must be 'auto' or one of"):
    dispatch.resolve_backend("scatter", "cpu", False)


@pytest.mark.parametrize(
    "requested, platform, distributed, expected",
    [
        ("auto", "cpu", False, "dropless"),
        ("auto", "gpu", False, "ragged_dot"),
        ("auto", "tpu", False, "ragged_dot"),
        ("auto", "gpu", True, "gather"),
        ("dropless", "gpu", False, "dropless"),
        ("ragged_dot", "cpu", False, "ragged_dot"),
        ("dropless", "cpu", True, "gather"),
        ("ragged_dot", "tpu", True, "gather"),
        ("einsum", "cpu", True, "einsum"),
        ("gather", "gpu", False, "gather"),
    ],
)
def test_resolved_backend_is_the_request_unless_auto_or_ragged_across_devices(
    requested, platform, distributed, expected
):
  assert dispatch.resolve_backend(requested, platform, distributed) == expected


def test_tokens_not_matching_routing_shape_raise():
  tokens, logits, _ = make_inputs()
  route = routing.switch_route(logits, capacity_factor=1.0)
  with pytest.raises(ValueError, match="tokens must be"):
    dispatch.gather_dispatch(tokens[:, :-1], route, experts_lib.StackedExperts(make_weights("gelu"), "gelu"))


class TestExperts:

  @pytest.mark.parametrize("tiles", [(8,), (4, 2), (9, 3)])
  def test_grouped_matmul_ffn_equals_each_rows_expert_forward_and_backward(self, tiles):
    """Rows of expert e's segment go through expert e's FFN (empty experts, segments ending mid-tile); the
    padding and the rows after the last segment give zeros; gradients equal the reference's."""
    weights = make_weights("swiglu")
    sizes = jnp.asarray([5, 0, 9, 2], jnp.int32)
    layout = experts_lib.block_layout(sizes, num_assignments=20, tiles=tiles)
    starts, rows = np.asarray(layout.expert_start), np.asarray(sizes)
    owner = np.full(layout.num_rows, -1)
    for e in range(EXPERTS):
      owner[starts[e]:starts[e] + rows[e]] = e
    x = jax.random.normal(jax.random.key(3), (layout.num_rows, D_MODEL)) * (owner >= 0)[:, None]
    cotangent = jax.random.normal(jax.random.key(4), (layout.num_rows, D_MODEL)) * (owner >= 0)[:, None]

    def loss(ffn, x, weights):
      out = ffn(x, weights)
      return jnp.sum(out * cotangent), out

    blocked = lambda x, w: experts_lib.blocked_expert_ffn(w, x, layout, activation="swiglu")
    rows_reference = lambda x, w: reference.expert_rows(w, x, jnp.asarray(owner), activation="swiglu")
    grad = lambda ffn: jax.jit(jax.value_and_grad(functools.partial(loss, ffn), argnums=(0, 1), has_aux=True))
    (_, out), grads = grad(blocked)(x, weights)
    (_, expected), expected_grads = grad(rows_reference)(x, weights)
    chex.assert_trees_all_close(out, jnp.where((owner >= 0)[:, None], expected, 0.0), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(grads, expected_grads, atol=1e-5, rtol=0)

  def test_block_layout_bounds_every_routing_outcome(self):
    """R covers the worst case: all N rows on one expert, or every expert's segment ending one row in."""
    for sizes in ([20, 0, 0, 0], [1, 1, 1, 17], [5, 5, 5, 5]):
      layout = experts_lib.block_layout(jnp.asarray(sizes, jnp.int32), num_assignments=20, tiles=(6, 3))
      padded = -(-np.asarray(sizes) // 3) * 3
      chex.assert_trees_all_equal(layout.expert_start, np.cumsum(padded) - padded)
      assert padded.sum() <= layout.num_rows == 20 + 4 * 2 + 2  # N + E * (3 - 1), rounded up to 3

  @pytest.mark.parametrize("tiles", [(), (2, 4), (4, 4), (4, 0), (5, 2)])
  def test_bad_tiles_raise(self, tiles):
    with pytest.raises(ValueError, match="must be distinct positive tile heights in decreasing order, each a"):
      experts_lib.block_layout(jnp.zeros((EXPERTS,), jnp.int32), num_assignments=8, tiles=tiles)

  def test_ragged_ffn_equals_padded_ffn_row_by_row(self):
    weights = make_weights("swiglu")
    sizes = np.array([3, 0, 5, 2])
    x = jax.random.normal(jax.random.key(3), (12, D_MODEL))  # 10 rows in groups, 2 trailing rows
    ragged = experts_lib.ragged_expert_ffn(weights, x, jnp.asarray(sizes, jnp.int32), activation="swiglu")
    padded = experts_lib.expert_ffn(weights, jnp.broadcast_to(x, (EXPERTS,) + x.shape), activation="swiglu")
    owner = np.repeat(np.arange(EXPERTS), sizes)
    chex.assert_trees_all_close(ragged[:10], padded[owner, np.arange(10)], atol=1e-6)
    chex.assert_trees_all_equal(ragged[10:], jnp.zeros_like(ragged[10:]))

  def test_dropout_acts_only_with_a_key_and_is_reproducible(self):
    weights = make_weights("gelu")
    x = jax.random.normal(jax.random.key(3), (EXPERTS, 6, D_MODEL))
    ffn = jax.jit(
        lambda key: experts_lib.expert_ffn(weights, x, activation="gelu", dropout_rate=0.5, dropout_key=key)
    )
    plain = experts_lib.expert_ffn(weights, x, activation="gelu")
    chex.assert_trees_all_close(ffn(None), plain, atol=1e-6)
    chex.assert_trees_all_equal(ffn(jax.random.key(0)), ffn(jax.random.key(0)))
    assert not np.allclose(ffn(jax.random.key(0)), plain)

  def test_dropout_keeps_the_expected_hidden_activation(self):
    """Inverted dropout: averaged over many masks, the output approaches the dropout-free output."""
    weights = make_weights("relu")
    x = jax.random.normal(jax.random.key(3), (EXPERTS, 4, D_MODEL))
    keys = jax.random.split(jax.random.key(0), 2000)
    outs = jax.jit(jax.vmap(
        lambda key: experts_lib.expert_ffn(weights, x, activation="relu", dropout_rate=0.3, dropout_key=key)
    ))(keys)
    plain = experts_lib.expert_ffn(weights, x, activation="relu")
    chex.assert_trees_all_close(jnp.mean(outs, 0), plain, atol=0.05 * float(jnp.max(jnp.abs(plain))))

  @pytest.mark.parametrize(
      "activation, gated, match",
      [("swiglu", False, "needs second input projection"), ("gelu", True, "takes no second input projection")],
  )
  def test_weights_must_match_activation(self, activation, gated, match):
    weights = make_weights("swiglu" if gated else "gelu")
    with pytest.raises(ValueError, match=match):
      experts_lib.expert_ffn(weights, jnp.zeros((EXPERTS, 2, D_MODEL)), activation=activation)

  def test_unknown_activation_raises(self):
    with pytest.raises(ValueError, match="activation='tanh' must be one of"):
      experts_lib.is_gated("tanh")
