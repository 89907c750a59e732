"""Issue 32 item 5: the decode-time backend that reads only the chosen experts' weights
(`dispatch.expert_gather_dispatch`, chosen by `dispatch.use_expert_gather` in layers that `moe_jax.decode` marks)
equals the reference MoE (float32, 1e-5) for top-1, top-k with dropped assignments and shared experts; a Decoder
using it gives the full forward pass's logits; XLA's count of the bytes it accesses grows with the choices K, not
with the number of experts E; an expert-split mesh keeps the resolved backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import decode, dispatch, parallel, reference, routing
from moe_jax import experts as experts_lib
from moe_jax.moe_layer import MoeFeedForward
from tests.test_decode import assert_cached_equals_full, build, lm_cfg, tokens_of

ATOL = 1e-5
D_MODEL, D_FF = 16, 24


def make_weights(num_experts: int, activation: str, seed: int = 0) -> experts_lib.ExpertWeights:
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  gated = experts_lib.is_gated(activation)
  return experts_lib.ExpertWeights(
      wi_0=0.3 * jax.random.normal(k0, (num_experts, D_MODEL, D_FF)),
      wo=0.3 * jax.random.normal(k1, (num_experts, D_FF, D_MODEL)),
      wi_1=0.3 * jax.random.normal(k2, (num_experts, D_MODEL, D_FF)) if gated else None)


ROUTERS = {
    "top1": (lambda logits: routing.switch_route(logits, dropless=True), "relu"),
    "top2": (lambda logits: routing.top_k_route(logits, k=2, dropless=True), "swiglu"),
    "top2_drops": (lambda logits: routing.top_k_route(logits, k=2, capacity_factor=0.5), "gelu"),
}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_expert_gather_equals_the_reference_moe(router):
  route_fn, activation = ROUTERS[router]
  k_tokens, k_logits = jax.random.split(jax.random.key(1))
  tokens = jax.random.normal(k_tokens, (2, 3, D_MODEL))  # [G, S, M]
  route = route_fn(2.0 * jax.random.normal(k_logits, (2, 3, 8)))
  weights = make_weights(8, activation)
  if router == "top2_drops":
    assert not bool(jnp.all(route.kept))  # the case checks that dropped assignments give zero
  cotangent = jax.random.normal(jax.random.key(4), tokens.shape)

  def loss(fn, tokens, weights):  # forward and gradients (wrt tokens and expert weights) in one program
    return jnp.sum(fn(tokens, weights) * cotangent)

  gather = lambda t, w: dispatch.expert_gather_dispatch(t, route, experts_lib.StackedExperts(w, activation))
  moe = lambda t, w: reference.moe(t, route, w, activation=activation)
  # One compiled program for both (compile time dominates): outputs and gradients of each.
  ours, theirs = jax.jit(lambda t, w: [(fn(t, w), jax.grad(loss, argnums=(1, 2))(fn, t, w)) for fn in (gather, moe)])(
      tokens, weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0), ours, theirs)


@pytest.mark.parametrize("tile_rows", [5, 8, 256], ids=["tiles_and_rest", "whole_tiles", "one_tile"])
def test_gathered_experts_read_in_tiles_equal_the_reference(tile_rows):
  """`experts.gathered_expert_ffn` reads each row's expert in tiles of `tile_rows` rows (M=16, F=24: with 5, three
  tiles and a rest of 1 on M, four and a rest of 4 on F; with 8, two and three whole tiles; with 256, one tile):
  outputs and gradients equal the reference's per-row expert FFN, a repeated expert included."""
  weights = make_weights(8, "swiglu")
  x = jax.random.normal(jax.random.key(5), (4, D_MODEL))  # [N, M]
  expert = jnp.asarray([3, 0, 3, 7], jnp.int32)
  cotangent = jax.random.normal(jax.random.key(6), x.shape)
  gathered = lambda x, w: experts_lib.gathered_expert_ffn(w, x, expert, activation="swiglu", tile_rows=tile_rows)
  rows = lambda x, w: reference.expert_rows(w, x, expert, activation="swiglu")
  loss = lambda fn, x, w: jnp.sum(fn(x, w) * cotangent)
  both = lambda x, w: [(fn(x, w), jax.grad(loss, argnums=(1, 2))(fn, x, w)) for fn in (gathered, rows)]
  ours, theirs = jax.jit(both)(x, weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=ATOL, rtol=0), ours, theirs)


def sparse_layer(shared_d_ff: int = 0) -> MoeFeedForward:
  """A top-2 layer of 8 SwiGLU experts as decoding runs it (dropless), reading only the chosen experts."""
  cfg = lm_cfg({"moe.router": "top_k", "moe.top_k.k": 2, "moe.num_experts": 8})
  layer = MoeFeedForward(D_MODEL, D_FF, decode.inference_moe_config(cfg.moe), shared_d_ff=shared_d_ff,
                         activation="swiglu", rngs=nnx.Rngs(0))
  layer.sparse_decode = True
  return layer


def reference_output(layer: MoeFeedForward, x: jax.Array) -> jax.Array:  # [B, L, M] -> [B, L, M]
  weights = experts_lib.ExpertWeights(wi_0=layer.wi_0[...], wo=layer.wo[...], wi_1=layer.wi_1[...])
  out = reference.moe(x, layer.route(x), weights, activation="swiglu")
  if layer.shared is not None:
    shared = experts_lib.ExpertWeights(wi_0=layer.shared.wi_0[...][None], wo=layer.shared.wo[...][None],
                                       wi_1=layer.shared.wi_1[...][None])
    out = out + reference.expert_ffn(shared, 0, x, "swiglu")
  return out


def test_a_sparse_decode_layer_with_shared_experts_equals_the_reference():
  layer = sparse_layer(shared_d_ff=D_FF)
  x = jax.random.normal(jax.random.key(2), (1, 1, D_MODEL))  # one token: N = 2 <= E
  assert dispatch.use_expert_gather(2, 8, False)
  np.testing.assert_allclose(layer(x)[0], reference_output(layer, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("expert_axis", [
    # ~30 s each; the Decoder under a mesh stays in the default tier (tests/test_decode.py's mesh test)
    pytest.param(1, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow),
], ids=["experts_whole", "experts_split"])
def test_under_a_mesh_a_sparse_decode_layer_equals_the_reference(expert_axis):
  """Whole experts on every device: each device gathers its own rows' experts; experts split over 'expert': the
  rule keeps the resolved backend (all-to-all of capacity buffers). Both equal the one-device reference."""
  x = jax.random.normal(jax.random.key(3), (8, 1, D_MODEL))  # a decode step of 8 rows, one per device
  with parallel.mesh_context(parallel.create_mesh(8 // expert_axis, expert_axis)):
    layer = sparse_layer()
    out = layer(x)[0]
  np.testing.assert_allclose(out, reference_output(layer, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("overrides", [{"moe.num_experts": 8},
                                       {"moe.router": "top_k", "moe.top_k.k": 2, "moe.num_experts": 8}],
                         ids=["top1", "top2"])
def test_a_batch1_decoder_reading_only_chosen_experts_equals_the_full_forward(overrides):
  model = build(lm_cfg(overrides))
  copy = decode.inference_copy(model)
  assert all(m.sparse_decode for _, m in nnx.iter_modules(copy) if isinstance(m, MoeFeedForward))
  assert_cached_equals_full(model, tokens_of(1, 6), lengths=[2])  # steps of 1 token: N = K <= E


def accessed_bytes(num_experts: int, k: int) -> float:
  """XLA's 'bytes accessed' of one expert_gather call on one token (float32 SwiGLU experts)."""
  weights = make_weights(num_experts, "swiglu")
  tokens = jnp.ones((1, 1, D_MODEL))
  logits = jnp.ones((1, 1, num_experts))
  run = lambda t, l, w: dispatch.expert_gather_dispatch(
      t, routing.top_k_route(l, k=k, dropless=True), experts_lib.StackedExperts(w, "swiglu"))
  analysis = jax.jit(run).lower(tokens, logits, weights).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["bytes accessed"])


def test_bytes_accessed_grow_with_the_choices_not_the_experts():
  expert_bytes = 3 * D_MODEL * D_FF * 4  # one expert's wi_0, wi_1, wo in float32
  few, many = accessed_bytes(8, 2), accessed_bytes(64, 2)
  assert many - few < expert_bytes  # 56 more experts: at most the router's few extra bytes
  assert many < 2 * 64 * expert_bytes / 8  # far below reading every expert once
  # Two more choices read two more experts (each slice read, copied, read by the matmul: up to 3x).
  assert 2 * expert_bytes <= accessed_bytes(64, 4) - many <= 2 * 3 * expert_bytes + expert_bytes


def test_the_rule_takes_small_calls_on_one_device_only():
  assert dispatch.use_expert_gather(8, 8, False) and dispatch.use_expert_gather(64, 64, False)
  assert not dispatch.use_expert_gather(9, 8, False)  # past E: the gather would read more than every expert
  assert not dispatch.use_expert_gather(1, 8, True)  # experts split over devices: the resolved backend runs
