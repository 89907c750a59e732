"""The MoE settings of the published families (issue 31): Qwen1.5/Qwen2-MoE's gated shared expert
(`moe.shared_expert_gate`), Phi-3.5-MoE's sparsemixer router (`moe.router='sparsemixer'`) and Hugging Face Switch
Transformers' absolute expert capacity (`moe.expert_capacity`), each against a plain reference (forward and
gradients), counted by moe_jax.flops and refused when misconfigured; and the `full` configs routing as their
published models do."""

import functools
import importlib
import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_lib, flops, parallel, reference, routers, routing
from moe_jax import experts as experts_lib
from moe_jax.moe_layer import MoeConfig, MoeFeedForward
from tests.helpers import built_param_count

BATCH, LENGTH, D_MODEL, D_FF = 2, 12, 16, 24
# What `transformers` recorded (docs/interop_fixtures.md): per MoE layer the router logits of 2 x 12 tokens,
# flattened batch-major, and the experts, weights (and Switch's kept tokens) it derived from them.
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "interop"


def _fixture(family: str) -> tuple[dict, list[dict[str, np.ndarray]]]:
  """The family's config.json and, per MoE layer, its recorded routing {router_logits, topk_index, ...}."""
  config = json.loads((FIXTURES / family / "config.json").read_text())
  with np.load(FIXTURES / family / "reference.npz", allow_pickle=False) as npz:
    layers = [{key.split(".", 2)[2]: npz[key] for key in npz.files if key.startswith(f"moe.{n}.")}
              for n in range(len(npz["moe_layers"]))]
  return config, layers


def inputs(seed: int = 1, shape=(BATCH, LENGTH, D_MODEL)) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), shape)


def expert_weights(layer) -> experts_lib.ExpertWeights:
  return experts_lib.ExpertWeights(wi_0=layer.wi_0[...], wo=layer.wo[...],
                                   wi_1=None if layer.wi_1 is None else layer.wi_1[...])


# ----------------------------------------------------------------------------------------------------------
# The gated shared expert.


def _gated_layer(seed: int = 0, gate: bool = True) -> MoeFeedForward:
  moe = MoeConfig(num_experts=4, router="top_k", dropless=True, num_shared_experts=1,
                  shared_expert_gate=gate, options={"top_k": dict(k=2)})
  with parallel.mesh_context(parallel.create_mesh(1, 1)):  # the shared FFN's params carry logical axes
    return MoeFeedForward(D_MODEL, D_FF, moe, shared_d_ff=2 * D_FF, activation="swiglu", init_scale=1.0,
                          rngs=nnx.Rngs(seed))


def test_gated_shared_expert_equals_its_reference_forward_and_backward():
  """y = routed(x) + sigmoid(x . w_gate) * shared(x) (Qwen2MoeSparseMoeBlock), value and every gradient."""
  layer = _gated_layer()
  assert layer.shared_gate.shape == (D_MODEL, 1) and layer.shared.wi_0.shape == (D_MODEL, 2 * D_FF)
  x = inputs()
  cotangent = inputs(2)
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def fast(p, x):
    out, _ = nnx.merge(graph, p, rest)(x)
    return jnp.sum(out * cotangent)

  def slow(p, x):
    route = routing.top_k_route(routing.router_logits(x, p["router"][...]), k=2, dropless=True)
    routed = reference.moe(x, route, expert_weights(nnx.merge(graph, p, rest)), activation="swiglu")
    shared = experts_lib.ExpertWeights(*(p["shared"][name][...][None] for name in ("wi_0", "wo", "wi_1")))
    gated = reference.gated_shared_experts(x, p["shared_gate"][...], shared, activation="swiglu")
    return jnp.sum((routed + gated) * cotangent)

  value, grads = jax.jit(jax.value_and_grad(fast, argnums=(0, 1)))(params, x)
  expected, expected_grads = jax.jit(jax.value_and_grad(slow, argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close((value, grads), (expected, expected_grads), atol=1e-4, rtol=1e-4)
  assert float(jnp.max(jnp.abs(grads[0]["shared_gate"][...]))) > 0  # the gate learns


def test_gate_is_a_new_parameter_and_leaves_the_others_as_they_were():
  """Created last and only when asked for: an ungated config's parameters draw the same keys as before."""
  gated, plain = _gated_layer(gate=True), _gated_layer(gate=False)
  assert plain.shared_gate is None
  gated_params = dict(nnx.to_flat_state(nnx.state(gated, nnx.Param)))
  assert gated_params.pop(("shared_gate",))[...].shape == (D_MODEL, 1)
  plain_params = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
  chex.assert_trees_all_equal({k: v[...] for k, v in plain_params.items()},
                              {k: v[...] for k, v in gated_params.items()})


def test_shared_expert_gate_needs_shared_experts():
  with pytest.raises(ValueError, match="moe.shared_expert_gate=True .* moe.num_shared_experts >= 1"):
    MoeConfig(shared_expert_gate=True)
  moe = MoeConfig(num_shared_experts=1, shared_expert_gate=True)
  with pytest.raises(ValueError, match="shared_expert_gate=True needs shared experts"):
    MoeFeedForward(D_MODEL, D_FF, moe, shared_d_ff=0, rngs=nnx.Rngs(0))


def _model_config(**moe_fields):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=4, max_seq_len=32,
                           activation="swiglu", moe_layer_interval=1))
  config.moe.update(moe_fields)
  return config_lib.model_config(config, vocab_size=64)


def test_gated_shared_expert_is_counted_by_flops_and_params():
  """w_gate adds M parameters and 2M forward FLOPs per token to each MoE layer; the count matches the model."""
  shared = dict(num_shared_experts=2, shared_expert_d_ff=16)
  gated, plain = _model_config(**shared, shared_expert_gate=True), _model_config(**shared)
  assert flops.param_count(gated).total == built_param_count(gated)
  assert flops.param_count(gated).total - flops.param_count(plain).total == 4 * 32
  assert flops.param_count(gated).active - flops.param_count(plain).active == 4 * 32
  assert flops.flops_per_token(gated, 32).forward - flops.flops_per_token(plain, 32).forward == 4 * 2 * 32


# ----------------------------------------------------------------------------------------------------------
# Sparsemixer: the pure function on logits whose answer is worked out by hand.

SIGMOID_01 = 1 / (1 + math.exp(-0.1))
# (logits of one token, jitter_eps, expected [i1, i2], expected [w1, w2]).
SPARSEMIXER_CASES = {
    # Every other expert beyond 2 eps = 0.2 (relative) of each stage's max: both weights 1.
    "all_masked": ([4.0, 1.0, 0.5, -2.0], 0.1, [0, 1], [1.0, 1.0]),
    # Stage 1 keeps expert 1 (0.1 / 2 = 0.05 <= 0.2): w1 = softmax([2, 1.9])[0]; stage 2 keeps only its own.
    "stage1_keeps_a_neighbour": ([2.0, 1.9, 1.0, -1.0], 0.1, [0, 1], [SIGMOID_01, 1.0]),
    # Stage 1 keeps 3 experts, stage 2 (max 2.9) keeps expert 2 (0.1 / 2.9); expert 3 is 1 away in relative terms.
    "both_stages_keep": ([3.0, 2.9, 2.8, 0.0], 0.1, [0, 1],
                         [1 / (1 + math.exp(-0.1) + math.exp(-0.2)), SIGMOID_01]),
    # Negative logits: the gap is relative to |s_j| (max(|s_j|, max s) = |s_j|): 0.05 / 1.05 and 0.1 / 1.1 kept.
    "negative_logits": ([-1.0, -1.05, -3.0, -1.1], 0.1, [0, 1],
                        [1 / (1 + math.exp(-0.05) + math.exp(-0.1)), 1 / (1 + math.exp(-0.05))]),
    # The order is the stages', not the experts': [i1, i2] = [3, 1]; a smaller eps keeps less.
    "order_is_by_stage": ([0.0, 2.0, -1.0, 2.02], 0.001, [3, 1], [1.0, 1.0]),
    "order_is_by_stage_wide_eps": ([0.0, 2.0, -1.0, 2.02], 0.01, [3, 1],
                                   [1 / (1 + math.exp(-0.02)), 1.0]),
}


@pytest.mark.parametrize("case", sorted(SPARSEMIXER_CASES))
def test_sparsemixer_matches_the_worked_answer(case):
  logits, eps, index, weight = SPARSEMIXER_CASES[case]
  route = routing.sparsemixer_route(jnp.asarray([[logits]], jnp.float32), jitter_eps=eps, dropless=True)
  np.testing.assert_array_equal(route.expert_index[0, 0], index)
  np.testing.assert_allclose(route.combine_weight[0, 0], weight, rtol=1e-6)
  ref_index, ref_weight = reference.sparsemixer(np.asarray([logits]), eps)
  np.testing.assert_array_equal(ref_index[0], index)
  np.testing.assert_allclose(ref_weight[0], weight, rtol=1e-12)


def _spread_logits(seed: int, shape=(3, 32, 6)) -> jax.Array:
  """Logits whose softmax stages keep neighbours for some tokens and not for others at eps = 0.1."""
  return 0.5 * jax.random.normal(jax.random.key(seed), shape)


def test_sparsemixer_reproduces_transformers_on_the_phimoe_fixture():
  """The experts in their order and the unnormalised weights PhimoeForCausalLM computed (jitter_eps 0.1: 39 % of
  its stages keep more than their own expert)."""
  config, layers = _fixture("phimoe")
  route_fn = jax.jit(functools.partial(routing.sparsemixer_route, jitter_eps=config["router_jitter_noise"],
                                       dropless=True))
  for recorded in layers:
    route = route_fn(recorded["router_logits"][None])  # one group of the 24 tokens: dropless, groups do not matter
    np.testing.assert_array_equal(route.expert_index[0], recorded["topk_index"])
    np.testing.assert_allclose(route.combine_weight[0], recorded["topk_weight"], rtol=1e-5, atol=1e-6)
    assert np.any(recorded["topk_weight"] < 0.999)


def test_sparsemixer_equals_the_numpy_reference_on_random_logits():
  logits = _spread_logits(0)
  route = jax.jit(functools.partial(routing.sparsemixer_route, jitter_eps=0.1, dropless=True))(logits)
  index, weight = reference.sparsemixer(logits, 0.1)
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_allclose(route.combine_weight, weight, rtol=1e-5, atol=1e-6)
  kept_neighbours = weight < 1 - 1e-6
  assert 0.1 < kept_neighbours.mean() < 0.9, kept_neighbours.mean()  # both masked and unmasked stages occur
  assert np.all(route.kept) and route.capacity == 32  # dropless
  chex.assert_trees_all_close(route.router_probs, jax.nn.softmax(logits, axis=-1))


def _threshold_margin(logits: np.ndarray, eps: float) -> np.ndarray:
  """[..] per token: how far its routing is from changing, the smallest distance of a relative gap from the
  threshold 2 eps in either stage, or of a stage's two best logits from a tie."""
  flat = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  margin = np.full(len(flat), np.inf)
  for t, s in enumerate(flat):
    candidates = s.copy()
    for _ in range(2):
      top = candidates.max()
      live = candidates > -np.inf
      gaps = (top - s[live]) / np.maximum(np.abs(s[live]), top)
      margin[t] = min(margin[t], np.min(np.abs(gaps - 2 * eps)), np.diff(np.sort(candidates[live]))[-1])
      candidates[np.argmax(candidates)] = -np.inf
  return margin.reshape(logits.shape[:-1])


def test_sparsemixer_gradient_is_the_softmax_gradient_over_the_kept_experts():
  """d w / d s_j = w (delta_{j, chosen} - p_j) over the experts the stage kept, 0 elsewhere; checked by central
  differences on the tokens whose masks and choices a step of h cannot move."""
  logits = _spread_logits(1, (1, 32, 6))
  cotangent = jax.random.normal(jax.random.key(3), (1, 32, 2))
  loss = jax.jit(lambda l: jnp.sum(routing.sparsemixer_route(l, jitter_eps=0.1, dropless=True).combine_weight
                                   * cotangent))
  grad = np.asarray(jax.grad(loss)(logits))
  h = 1e-3
  safe = np.flatnonzero(_threshold_margin(np.asarray(logits), 0.1)[0] > 0.05)
  assert len(safe) >= 16, len(safe)
  for s in safe:
    for e in range(logits.shape[2]):
      step = jnp.zeros(logits.shape).at[0, s, e].set(h)
      numeric = (loss(logits + step) - loss(logits - step)) / (2 * h)
      np.testing.assert_allclose(grad[0, s, e], numeric, atol=2e-3, err_msg=f"token {s}, expert {e}")
  _, weight = reference.sparsemixer(logits, 0.1)
  assert np.any(weight[0, safe] < 1 - 1e-6) and np.any(weight[0, safe] == 1)  # kept neighbours and none


def test_sparsemixer_with_capacity_claims_slots_as_top2_does():
  """Capacity is top-k's with k = 2: every first choice before any second, tokens in order (GShard)."""
  logits = _spread_logits(2)
  capacity = routing.compute_capacity(32, 6, 1.0, 2)
  route = jax.jit(functools.partial(routing.sparsemixer_route, jitter_eps=0.1, capacity_factor=1.0))(logits)
  index, slot, kept = reference.token_choice_loop(jax.nn.softmax(logits), 2, capacity)
  assert route.capacity == capacity
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_array_equal(route.kept, kept)
  np.testing.assert_array_equal(route.slot, slot)
  _, weight = reference.sparsemixer(logits, 0.1)
  np.testing.assert_allclose(route.combine_weight, np.where(kept, weight, 0), rtol=1e-5, atol=1e-6)
  assert 0 < np.mean(~kept) < 0.5


@pytest.mark.parametrize("eps", [0.0, 1.0])
def test_sparsemixer_refuses_bad_options(eps):
  with pytest.raises(ValueError, match=rf"moe.sparsemixer.jitter_eps={eps} must be in \(0, 1\)"):
    MoeConfig(router="sparsemixer", options={"sparsemixer": dict(jitter_eps=eps)})
  with pytest.raises(ValueError, match="jitter_eps"):
    routing.sparsemixer_route(_spread_logits(0), jitter_eps=eps, dropless=True)


def test_sparsemixer_needs_two_experts():
  with pytest.raises(ValueError, match="moe.num_experts=1 must be >= 2 for moe.router='sparsemixer'"):
    MoeConfig(router="sparsemixer", num_experts=1)


# ----------------------------------------------------------------------------------------------------------
# Sparsemixer: the family and the layer.

PHI = MoeConfig(num_experts=4, router="sparsemixer", dropless=True,
                options={"sparsemixer": dict(jitter_eps=0.1)})


def _phi_layer(moe=PHI) -> MoeFeedForward:
  return MoeFeedForward(D_MODEL, D_FF, moe, activation="swiglu", init_scale=1.0, rngs=nnx.Rngs(0))


def test_sparsemixer_layer_equals_the_reference_forward():
  """The layer's output is sum_k w_k FFN_{i_k}(x) with the numpy reference's choices and weights."""
  layer = _phi_layer()
  x = inputs()
  out, _ = nnx.jit(lambda layer, x: layer(x))(layer, x)
  logits = np.asarray(x) @ np.asarray(layer.router[...])  # [B, L, E]
  index, weight = reference.sparsemixer(logits, 0.1)
  assert 0 < np.mean(weight < 1 - 1e-6) < 1  # masked and unmasked stages both occur
  weights = expert_weights(layer)
  expected = sum(np.where((index[..., k] == e)[..., None], weight[..., k, None], 0.0)
                 * np.asarray(reference.expert_ffn(weights, e, x, "swiglu"))
                 for k in range(2) for e in range(4))
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("deterministic", [True, False])
def test_sparsemixer_layer_gradients_equal_the_reference(deterministic):
  """Training routes as evaluation (no estimator of the choice): the same value and the plain gradients through
  the two softmax weights, in both modes."""
  layer = _phi_layer()
  x = inputs()
  cotangent = inputs(2)
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def fast(p, x):
    out, _ = nnx.merge(graph, p, rest)(x, deterministic=deterministic)
    return jnp.sum(out * cotangent)

  def slow(p, x):
    route = routing.sparsemixer_route(x @ p["router"][...], jitter_eps=0.1, dropless=True)
    return jnp.sum(reference.moe(x, route, expert_weights(nnx.merge(graph, p, rest)), activation="swiglu")
                   * cotangent)

  got = jax.jit(jax.value_and_grad(fast, argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close(got, jax.jit(jax.value_and_grad(slow, argnums=(0, 1)))(params, x),
                              atol=1e-4, rtol=1e-4)
  assert float(jnp.max(jnp.abs(got[1][0]["router"][...]))) > 0


def test_sparsemixer_family_declares_two_experts_a_kernel_and_its_capacity():
  family = routers.get("sparsemixer")
  assert family.causal and family.options.NAME == "moe.sparsemixer"
  assert family.router_params(D_MODEL, 4, PHI.router_options) == D_MODEL * 4
  cfg = _model_config(router="sparsemixer", num_experts=4, dropless=True, dispatch="dropless")
  assert flops.experts_per_token(cfg, executed=False) == 2
  assert flops.param_count(cfg).total == built_param_count(cfg)
  capped = MoeConfig(num_experts=4, router="sparsemixer", capacity_factor=1.0, eval_capacity_factor=2.0)
  assert capped.capacity(12, training=True) == routing.compute_capacity(12, 4, 1.0, 2) == 6
  assert capped.capacity(12, training=False) == 12
  assert PHI.capacity(12, training=True) == 12


def test_sparsemixer_capacity_is_the_one_the_layer_uses():
  """With capacity (dropless=False) the layer drops as `sparsemixer_route` with that capacity does."""
  moe = MoeConfig(num_experts=4, router="sparsemixer", eval_capacity_factor=0.5,
                  options={"sparsemixer": dict(jitter_eps=0.1)})
  layer = _phi_layer(moe)
  x = inputs()
  out, aux = nnx.jit(lambda layer, x: layer(x))(layer, x)
  route = jax.jit(functools.partial(routing.sparsemixer_route, jitter_eps=0.1, capacity_factor=0.5))(
      x @ layer.router[...])
  assert route.capacity == moe.capacity(LENGTH, training=False) == 3
  np.testing.assert_allclose(out, reference.moe(x, route, expert_weights(layer), activation="swiglu"),
                             atol=1e-5, rtol=1e-5)
  assert float(aux.metrics.dropped_assignment_fraction) > 0


# ----------------------------------------------------------------------------------------------------------
# The absolute expert capacity.


def test_expert_capacity_drops_what_a_per_sequence_cumsum_drops():
  """Switch routing with one group per sequence and expert_capacity = C keeps exactly the tokens Hugging Face's
  SwitchTransformersTop1Router keeps: per sequence, in order, while the expert holds fewer than C."""
  logits = inputs(4, (4, 24, 4))
  for capacity in (1, 3, 5, 30):
    route = jax.jit(functools.partial(routing.switch_route, expert_capacity=capacity))(logits)
    expected = reference.per_sequence_capacity_kept(np.argmax(logits, -1), 4, capacity)
    np.testing.assert_array_equal(route.kept[..., 0], expected)
    assert route.capacity == min(24, capacity)
  assert not np.all(reference.per_sequence_capacity_kept(np.argmax(logits, -1), 4, 3))  # some tokens dropped


def test_expert_capacity_reproduces_transformers_on_the_switch_fixture():
  """SwitchTransformersForConditionalGeneration's kept tokens and weights, encoder and decoder MoE layer, from
  expert_capacity = 3 with one routing group per sequence of 12."""
  config, layers = _fixture("switch")
  route_fn = jax.jit(functools.partial(routing.switch_route, expert_capacity=config["expert_capacity"]))
  for recorded in layers:
    route = route_fn(recorded["router_logits"].reshape(2, 12, -1))
    kept = recorded["kept"].reshape(2, 12)
    assert 0 < np.mean(~kept)
    np.testing.assert_array_equal(route.kept[..., 0], kept)
    np.testing.assert_array_equal(route.expert_index.reshape(24, 1), recorded["topk_index"])
    np.testing.assert_allclose(route.combine_weight.reshape(24, 1), np.where(kept.reshape(24, 1),
                               recorded["topk_weight"], 0), rtol=1e-5, atol=1e-6)


def test_expert_capacity_applies_to_top_k_choice_by_choice():
  logits = inputs(5, (2, 16, 4))
  route = jax.jit(functools.partial(routing.top_k_route, k=2, expert_capacity=5))(logits)
  index, slot, kept = reference.token_choice_loop(jax.nn.softmax(logits), 2, 5)
  np.testing.assert_array_equal(route.expert_index, index)
  np.testing.assert_array_equal(route.kept, kept)
  np.testing.assert_array_equal(route.slot, slot)


@pytest.mark.parametrize("deterministic", [True, False])
def test_switch_layer_with_expert_capacity_equals_the_numpy_reference(deterministic):
  """The whole layer, in training and evaluation alike (Hugging Face applies expert_capacity in both): a kept
  token gets p_max * FFN_argmax(x), a dropped one exactly 0."""
  moe = MoeConfig(num_experts=4, expert_capacity=3)
  layer = MoeFeedForward(D_MODEL, D_FF, moe, activation="relu", init_scale=1.0, rngs=nnx.Rngs(0))
  x = inputs()
  out, aux = nnx.jit(lambda layer, x: layer(x, deterministic=deterministic))(layer, x)
  logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert = np.argmax(logits, -1)
  kept = reference.per_sequence_capacity_kept(expert, 4, 3)
  assert 0 < np.mean(~kept) < 1
  weights = expert_weights(layer)
  ffn = np.stack([np.asarray(reference.expert_ffn(weights, e, x, "relu")) for e in range(4)], axis=-2)  # [B,L,E,M]
  expected = np.where(kept[..., None], probs.max(-1)[..., None], 0) * np.take_along_axis(
      ffn, expert[..., None, None], axis=-2)[..., 0, :]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(aux.metrics.dropped_token_fraction, np.mean(~kept), rtol=1e-6)


def test_expert_capacity_is_the_capacity_in_training_and_evaluation():
  moe = MoeConfig(num_experts=4, router="top_k", expert_capacity=64, options={"top_k": dict(k=2)})
  assert moe.capacity(512, training=True) == moe.capacity(512, training=False) == 64
  assert moe.capacity(16, training=True) == 16  # more slots than tokens could never fill
  assert MoeConfig(num_experts=4, router="hash", expert_capacity=2).capacity(8, training=False) == 2


@pytest.mark.parametrize("fields, match", [
    (dict(expert_capacity=-1), "moe.expert_capacity=-1 must be >= 0"),
    (dict(expert_capacity=8, dropless=True), "moe.expert_capacity=8 needs moe.dropless=False"),
    (dict(router="soft_moe", dispatch="einsum", expert_capacity=8), "moe.expert_capacity=8 is not read by "
     "moe.router='soft_moe'"),
    (dict(router="expert_choice", expert_capacity=8), "moe.expert_capacity=8 is not read by "
     "moe.router='expert_choice'"),
    (dict(router="base", expert_capacity=8), "moe.expert_capacity=8 is not read by moe.router='base'"),
])
def test_expert_capacity_needs_a_capacity_router_without_dropless(fields, match):
  with pytest.raises(ValueError, match=match):
    MoeConfig(**fields)


def test_executed_expert_rows_follow_the_absolute_capacity():
  """E * C buffer rows per group of S tokens, whatever the capacity factor: 4 * 3 / 32 rows per token."""
  cfg = _model_config(num_experts=4, expert_capacity=3)
  assert flops.experts_per_token(cfg, executed=True, sequence_length=32) == 4 * 3 / 32
  assert flops.experts_per_token(cfg, executed=False) == 1
  with pytest.raises(ValueError, match="pass sequence_length"):
    flops.experts_per_token(cfg, executed=True)
  grouped = _model_config(num_experts=4, expert_capacity=3, group_size=8)
  assert flops.experts_per_token(grouped, executed=True, sequence_length=32) == 4 * 3 / 8


# ----------------------------------------------------------------------------------------------------------
# The `full` configs route as their published models.


@pytest.mark.parametrize("module, router, renormalize", [
    ("deepseekmoe", "top_k", False),  # DeepSeekMoE: softmax over all experts, top-6, no renormalisation
    ("olmoe", "top_k", False),  # norm_topk_prob false
    ("qwen3_moe", "top_k", True),  # norm_topk_prob true
    ("mixtral", "top_k", True),
    ("dbrx", "top_k", True),  # moe_normalize_expert_weights 1
])
def test_full_configs_route_dropless_as_the_published_models(module, router, renormalize):
  config = importlib.import_module(f"configs.{module}").get_config("full")
  moe = config_lib.model_config(config, vocab_size=0).moe
  assert moe.router == router and moe.router_options.renormalize == renormalize
  assert moe.dropless and moe.dispatch in ("dropless", "ragged_dot", "auto")
  assert moe.capacity(4096, training=True) == 4096  # no token is ever dropped
