"""Soft MoE, BASE layers and Hash layers: their invariants, their references, their layers and configs.

Axis legend (as in moe_jax.routing): G groups · S tokens per group · E experts · P slots per expert ·
M d_model · B batch · L sequence length.

  * Soft MoE (Puigcerver et al. 2023): dispatch columns and combine rows are distributions, the logits ignore
    the norms of tokens and slot parameters, the dense dispatch equals the slot-by-slot reference forward and
    backward; refused in causal layers and with any backend but 'einsum'.
  * BASE (Lewis et al. 2021): in training every expert takes exactly S / E tokens, the assignment equals the
    sequential greedy reference, Sinkhorn equals its numpy form; evaluation is greedy top-1 without drops.
  * Hash (Roller et al. 2021): the expert is a fixed function of the token id alone, equal to the integer
    reference; the layer needs token ids and the decoder passes them only to it.
Expert choice in an encoder layer (causal=False) and the shard_map equivalences are in tests/test_parallel.py.

Inputs come from numpy with fixed seeds; routers are jitted once per static configuration at module level.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import config_lib, dispatch, parallel, reference, routing, train
from moe_jax import experts as experts_lib
from moe_jax.model import TransformerLM
from moe_jax.moe_layer import MoeConfig, MoeFeedForward
from tests.helpers import tiny_config, train_losses

soft_jit = jax.jit(routing.soft_moe_route)
base_jit = jax.jit(routing.base_route, static_argnames=("balanced", "sinkhorn_iterations"))
balanced_jit = jax.jit(routing.balanced_assignment)
hash_jit = jax.jit(routing.hash_route, static_argnames=("num_experts", "capacity_factor", "dropless"))


def normal(shape, seed: int, scale: float = 1.0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def token_ids(shape, seed: int, vocab: int = 1000) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def expert_weights(num_experts: int, d_model: int, d_ff: int, seed: int) -> experts_lib.ExpertWeights:
  return experts_lib.ExpertWeights(wi_0=normal((num_experts, d_model, d_ff), seed, 0.3),
                                   wo=normal((num_experts, d_ff, d_model), seed + 1, 0.3))


def tokens_per_expert(route: routing.RoutingResult) -> jax.Array:  # [G, E] kept assignments
  onehot = jax.nn.one_hot(route.expert_index, route.num_experts) * route.kept[..., None]
  return jnp.sum(onehot, axis=(1, 2))


# ----------------------------------------------------------------------------------------------------------
# Soft MoE.

SOFT = [((2, 8, 6), 4, 1, 0), ((3, 5, 4), 2, 3, 1), ((1, 16, 8), 8, 2, 2)]  # (G, S, M), E, P, seed


def soft_case(shape, num_experts, slots, seed, scale=1.0):
  tokens = normal(shape, seed, 3.0)
  phi = normal((shape[-1], num_experts, slots), seed + 10)
  return tokens, phi, jnp.asarray(scale, jnp.float32)


@pytest.mark.parametrize("case", SOFT)
def test_soft_moe_dispatch_columns_and_combine_rows_sum_to_one(case):
  route = soft_jit(*soft_case(*case))
  g, _, e, p = route.dispatch_weight.shape
  chex.assert_trees_all_close(jnp.sum(route.dispatch_weight, axis=1), jnp.ones((g, e, p)), atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(route.combine_weight, axis=(2, 3)), jnp.ones(route.combine_weight.shape[:2]),
                              atol=1e-6)
  assert bool(jnp.all(route.dispatch_weight > 0)) and bool(jnp.all(route.combine_weight > 0))  # nothing dropped


@pytest.mark.parametrize("case", SOFT)
@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_soft_moe_weights_match_numpy_reference(case, scale):
  tokens, phi, s = soft_case(*case, scale=scale)
  route = soft_jit(tokens, phi, s)
  expected_dispatch, expected_combine = reference.soft_moe_weights(tokens, phi, scale)
  chex.assert_trees_all_close(route.dispatch_weight, expected_dispatch.astype(np.float32), atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(route.combine_weight, expected_combine.astype(np.float32), atol=1e-6, rtol=1e-5)


def test_soft_moe_logits_ignore_the_norms_of_tokens_and_slot_parameters():
  """Sec. 2.3: inputs and phi are l2-normalised, so only `scale` sets the logits' magnitude."""
  tokens, phi, scale = soft_case(*SOFT[0])
  rescale_tokens = jnp.asarray(np.random.default_rng(5).uniform(0.1, 10.0, tokens.shape[:2] + (1,)), jnp.float32)
  rescale_slots = jnp.asarray(np.random.default_rng(6).uniform(0.1, 10.0, (1,) + phi.shape[1:]), jnp.float32)
  chex.assert_trees_all_close(soft_jit(tokens * rescale_tokens, phi * rescale_slots, scale),
                              soft_jit(tokens, phi, scale), atol=1e-6, rtol=1e-5)


def test_soft_moe_zero_scale_gives_uniform_weights():
  tokens, phi, _ = soft_case(*SOFT[0])
  route = soft_jit(tokens, phi, jnp.zeros(()))
  g, s, e, p = route.dispatch_weight.shape
  chex.assert_trees_all_close(route.dispatch_weight, jnp.full((g, s, e, p), 1 / s), atol=1e-7)
  chex.assert_trees_all_close(route.combine_weight, jnp.full((g, s, e, p), 1 / (e * p)), atol=1e-7)


@pytest.mark.parametrize("case", SOFT[:2])
def test_soft_dispatch_equals_slot_by_slot_reference_forward_and_backward(case):
  tokens, phi, scale = soft_case(*case, scale=2.0)
  weights = expert_weights(case[1], case[0][-1], 8, seed=3)
  cotangent = normal(tokens.shape, seed=4)

  def loss(moe, tokens, phi, scale, weights):
    route = routing.soft_moe_route(tokens, phi, scale)
    return jnp.sum(moe(tokens, route, weights) * cotangent)

  fast = lambda tokens, route, weights: dispatch.soft_dispatch(
      tokens, route, experts_lib.StackedExperts(weights, "gelu", 0.0, None))
  slow = lambda tokens, route, weights: reference.soft_moe(tokens, route, weights, activation="gelu")
  grad = lambda moe: jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4)), static_argnums=0)(
      moe, tokens, phi, scale, weights)
  fast_value, fast_grads = grad(fast)
  slow_value, slow_grads = grad(slow)
  chex.assert_trees_all_close(fast_value, slow_value, atol=1e-4, rtol=1e-5)
  chex.assert_trees_all_close(fast_grads, slow_grads, atol=1e-4, rtol=1e-4)
  for g in jax.tree.leaves(fast_grads):  # fully differentiable: every input, the scale included, gets a gradient
    assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.any(g != 0))


def test_soft_moe_layer_is_refused_in_a_causal_layer_and_built_in_an_encoder():
  config = MoeConfig(num_experts=4, router="soft_moe", dispatch="einsum",
                     options={"soft_moe": dict(slots_per_expert=2)})
  with pytest.raises(ValueError, match=r"moe.router='soft_moe' is non-causal.*causal=False"):
    MoeFeedForward(8, 16, config, rngs=nnx.Rngs(0))
  layer = MoeFeedForward(8, 16, config, causal=False, rngs=nnx.Rngs(0))
  assert layer.router.shape == (8, 4, 2) and layer.router_scale[...] == 1.0
  out, aux = nnx.jit(lambda layer, x: layer(x))(layer, normal((2, 6, 8), seed=0))
  chex.assert_shape(out, (2, 6, 8))
  assert float(aux.metrics.dropped_token_fraction) == 0.0


@pytest.mark.parametrize("backend", ["gather", "dropless", "ragged_dot", "auto"])
def test_soft_moe_refuses_backends_other_than_einsum_naming_moe_dispatch(backend):
  with pytest.raises(ValueError, match=rf"moe.dispatch='{backend}'"):
    MoeConfig(router="soft_moe", dispatch=backend, dropless=backend != "gather")


# ----------------------------------------------------------------------------------------------------------
# BASE layers.

BASE = [((2, 16, 4), 0), ((3, 24, 8), 1), ((1, 12, 3), 2), ((2, 8, 8), 3)]  # (G, S, E), seed


@pytest.mark.parametrize("shape, seed", BASE)
@pytest.mark.parametrize("iterations", [0, 8])
def test_base_training_gives_every_expert_exactly_s_over_e_tokens(shape, seed, iterations):
  # Skewed logits: the argmax alone would overload a few experts.
  logits = normal(shape, seed, 2.0) + jnp.linspace(0.0, 3.0, shape[-1])
  route = base_jit(logits, balanced=True, sinkhorn_iterations=iterations)
  room = shape[1] // shape[2]
  assert route.capacity == room
  chex.assert_trees_all_equal(tokens_per_expert(route), jnp.full(shape[::2], float(room)))
  assert bool(jnp.all(route.kept))  # no drops


@pytest.mark.parametrize("shape, seed", BASE)
def test_balanced_assignment_equals_sequential_greedy_reference(shape, seed):
  scores = normal(shape, seed)
  chex.assert_trees_all_equal(np.asarray(balanced_jit(scores)), reference.balanced_assignment_greedy(scores))


def test_balanced_assignment_is_the_argmax_when_the_argmax_is_balanced():
  num_groups, tokens, num_experts = 2, 12, 4
  preferred = np.stack([np.random.default_rng(g).permutation(np.arange(tokens) % num_experts)
                        for g in range(num_groups)])  # each expert preferred by exactly S / E tokens
  scores = normal((num_groups, tokens, num_experts), 0) + 5.0 * jax.nn.one_hot(preferred, num_experts)
  chex.assert_trees_all_equal(np.asarray(balanced_jit(scores)), preferred.astype(np.int32))


@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_sinkhorn_matches_numpy_reference(iterations):
  logits = normal((2, 12, 4), 0, 2.0)
  chex.assert_trees_all_close(routing.sinkhorn(logits, iterations),
                              reference.sinkhorn_loop(logits, iterations).astype(np.float32), atol=1e-5)


def test_sinkhorn_balances_expert_columns_and_keeps_token_rows_normalised():
  logits = normal((2, 16, 4), 1, 2.0) + jnp.linspace(0.0, 3.0, 4)
  plan = jnp.exp(routing.sinkhorn(logits, 200))
  chex.assert_trees_all_close(jnp.sum(plan, axis=2), jnp.ones((2, 16)), atol=1e-5)
  chex.assert_trees_all_close(jnp.sum(plan, axis=1), jnp.full((2, 4), 4.0), atol=1e-3)


@pytest.mark.parametrize("shape, seed", BASE[:2])
def test_base_evaluation_is_greedy_top1_without_drops(shape, seed):
  logits = normal(shape, seed, 2.0) + jnp.linspace(0.0, 3.0, shape[-1])
  route = base_jit(logits, balanced=False)
  chex.assert_trees_all_equal(route.expert_index[..., 0], jnp.argmax(logits, axis=-1).astype(jnp.int32))
  assert route.capacity == shape[1] and bool(jnp.all(route.kept))


@pytest.mark.parametrize("balanced", [True, False])
def test_base_combine_weight_is_sigmoid_of_the_assigned_experts_logit(balanced):
  """Lewis et al. Sec. 2.3: the expert's output is scaled by sigma(h_t . w_{a_t}), the router's only gradient."""
  logits = normal((2, 16, 4), 0, 2.0)
  route = base_jit(logits, balanced=balanced)
  chosen = jnp.take_along_axis(logits, route.expert_index, axis=-1)
  chex.assert_trees_all_close(route.combine_weight, jax.nn.sigmoid(chosen), atol=1e-7)
  r = normal((2, 16, 1), 1)
  grad = jax.grad(lambda x: jnp.sum(base_jit(x, balanced=balanced).combine_weight * r))(logits)
  gate = jax.nn.sigmoid(chosen)
  expected = jax.nn.one_hot(route.expert_index[..., 0], 4) * (r * gate * (1 - gate))
  chex.assert_trees_all_close(grad, expected, atol=1e-6)


def test_base_refuses_groups_that_experts_do_not_divide():
  with pytest.raises(ValueError, match="tokens_per_group=10 must be a multiple of num_experts=4"):
    routing.base_route(jnp.zeros((1, 10, 4)), balanced=True)


# ----------------------------------------------------------------------------------------------------------
# Hash layers.


def test_hash_expert_depends_only_on_the_token_id():
  ids = token_ids((4, 16), seed=0, vocab=50)
  experts = routing.hash_experts(ids, 8)
  permutation = np.random.default_rng(1).permutation(ids.size)
  shuffled = routing.hash_experts(ids.reshape(-1)[permutation].reshape(8, 8), 8)  # other positions and groups
  chex.assert_trees_all_equal(shuffled.reshape(-1), experts.reshape(-1)[permutation])
  chex.assert_trees_all_equal(routing.hash_experts(ids, 8), experts)  # deterministic: no state, no key


@pytest.mark.parametrize("num_experts", [1, 3, 8, 64])
def test_hash_matches_the_integer_reference(num_experts):
  ids = jnp.concatenate([jnp.arange(512, dtype=jnp.int32), token_ids((512,), 0, vocab=2**31 - 1)]).reshape(4, 256)
  chex.assert_trees_all_equal(np.asarray(routing.hash_experts(ids, num_experts)),
                              reference.hash_experts(ids, num_experts))


@pytest.mark.parametrize("num_experts", [4, 8, 32])
def test_hash_spreads_a_range_of_ids_evenly_over_experts(num_experts):
  """A fixed hash stands in for a random table: over 256 ids per expert every expert gets 256 +- 20%."""
  counts = np.bincount(np.asarray(routing.hash_experts(jnp.arange(256 * num_experts)[None], num_experts))[0],
                       minlength=num_experts)
  assert counts.min() >= 0.8 * 256 and counts.max() <= 1.2 * 256, counts


@pytest.mark.parametrize("capacity_factor, dropless", [(1.0, False), (0.5, False), (None, True)])
def test_hash_route_keeps_switch_capacity_with_weight_one(capacity_factor, dropless):
  ids = token_ids((3, 16), seed=2, vocab=20)
  route = hash_jit(ids, num_experts=4, capacity_factor=capacity_factor, dropless=dropless)
  expected_index, expected_slot, expected_kept = reference.token_choice_loop(
      jax.nn.one_hot(reference.hash_experts(ids, 4), 4), 1, route.capacity)
  chex.assert_trees_all_equal(np.asarray(route.expert_index), expected_index)
  chex.assert_trees_all_equal(np.asarray(route.kept), expected_kept)
  chex.assert_trees_all_equal(np.asarray(jnp.where(route.kept, route.slot, 0)),
                              np.where(expected_kept, expected_slot, 0))
  chex.assert_trees_all_equal(route.combine_weight, route.kept.astype(jnp.float32))
  if dropless:
    assert bool(jnp.all(route.kept))


def test_hash_layer_needs_token_ids_and_learns_no_router():
  layer = MoeFeedForward(8, 16, MoeConfig(num_experts=4, router="hash"), rngs=nnx.Rngs(0))
  assert not any("router" in str(path) for path, _ in nnx.to_flat_state(nnx.state(layer)))
  x, ids = normal((2, 8, 8), 0), token_ids((2, 8), 1)
  with pytest.raises(ValueError, match="token_ids must be given exactly when the router reads them"):
    layer(x)
  out, _ = nnx.jit(lambda layer, x, ids: layer(x, token_ids=ids))(layer, x, ids)  # eager: op by op
  chex.assert_shape(out, x.shape)
  switch = MoeFeedForward(8, 16, MoeConfig(num_experts=4), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="token_ids must be given exactly when the router reads them"):
    switch(x, token_ids=ids)


def test_hash_layer_output_depends_on_token_ids_through_the_hash_only():
  """Two ids with the same hash give the same output; the layer equals the reference MoE on hash routing."""
  layer = MoeFeedForward(8, 16, MoeConfig(num_experts=4, router="hash", dropless=True, dispatch="dropless"),
                         rngs=nnx.Rngs(0))
  x, ids = normal((2, 8, 8), 0), token_ids((2, 8), 1)
  forward = nnx.jit(lambda layer, x, ids: layer(x, token_ids=ids)[0])  # one compile for both id sets
  out = forward(layer, x, ids)
  route = routing.hash_route(ids, num_experts=4, dropless=True)
  weights = experts_lib.ExpertWeights(wi_0=layer.wi_0[...], wo=layer.wo[...])
  chex.assert_trees_all_close(out, reference.moe(x, route, weights, activation="gelu"), atol=1e-5)
  pool = np.arange(1000, 3000)  # ids not in `ids`, each replaced by one of the same hash
  pool_expert = reference.hash_experts(pool, 4)
  same_expert = jnp.asarray([pool[pool_expert == e][i] for i, e in enumerate(reference.hash_experts(ids, 4).ravel())],
                            jnp.int32).reshape(ids.shape)
  chex.assert_trees_all_equal(routing.hash_experts(same_expert, 4), routing.hash_experts(ids, 4))
  chex.assert_trees_all_close(forward(layer, x, same_expert), out, atol=0)


# ----------------------------------------------------------------------------------------------------------
# The layers: expert choice in an encoder, every backend for BASE and hash.


def test_expert_choice_is_refused_in_a_causal_layer_and_each_expert_takes_exactly_c_tokens_in_an_encoder():
  config = MoeConfig(num_experts=4, router="expert_choice", capacity_factor=1.0, dispatch="einsum")
  with pytest.raises(ValueError, match=r"moe.router='expert_choice' is non-causal.*causal=False"):
    MoeFeedForward(8, 16, config, rngs=nnx.Rngs(0))
  layer = MoeFeedForward(8, 16, config, causal=False, rngs=nnx.Rngs(0))
  assert not layer.causal
  x = normal((2, 8, 8), 0)
  out, aux = nnx.jit(lambda layer, x: layer(x, deterministic=False))(layer, x)
  route = routing.expert_choice_route(routing.router_logits(x, layer.router[...]), capacity_factor=1.0)
  chex.assert_trees_all_equal(tokens_per_expert(route), jnp.full((2, 4), float(route.capacity)))
  chex.assert_trees_all_equal(aux.metrics.expert_load, jnp.ones(4))
  weights = experts_lib.ExpertWeights(wi_0=layer.wi_0[...], wo=layer.wo[...])
  chex.assert_trees_all_close(out, reference.moe(x, route, weights, activation="gelu"), atol=1e-5)


BACKENDS = [("einsum", False), ("gather", False), ("dropless", True), ("ragged_dot", True)]


@pytest.mark.parametrize("router, deterministic", [("base", False), ("base", True), ("hash", False)])
def test_base_and_hash_layers_equal_the_reference_moe_on_every_backend(router, deterministic):
  """BASE never drops and hash drops like Switch, so every backend computes the reference MoE of their routing."""
  x, ids = normal((2, 8, 8), 0), token_ids((2, 8), 1, vocab=30)
  for backend, dropless in BACKENDS:
    capacity = {"capacity_factor": 1.0} if router == "hash" else {}  # BASE has no capacity factor
    config = MoeConfig(num_experts=4, router=router, dispatch=backend, dropless=dropless, **capacity)
    layer = MoeFeedForward(8, 16, config, rngs=nnx.Rngs(0))
    extra = dict(token_ids=ids) if router == "hash" else {}
    out, aux = nnx.jit(lambda layer, x: layer(x, deterministic=deterministic, **extra))(layer, x)
    if router == "base":
      route = routing.base_route(routing.router_logits(x, layer.router[...]), balanced=not deterministic)
    else:
      route = routing.hash_route(ids, num_experts=4, capacity_factor=1.0, dropless=dropless)
    weights = experts_lib.ExpertWeights(wi_0=layer.wi_0[...], wo=layer.wo[...])
    chex.assert_trees_all_close(out, reference.moe(x, route, weights, activation="gelu"), atol=1e-5)
    chex.assert_trees_all_close(aux.load_balancing_loss, route.load_balancing_loss, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Config and the decoder LM.


def lm_config(router: str, **moe):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=16,
                           vocab_size=64))
  config.moe.update(dict(num_experts=4, router=router, **moe))
  config.train.update(dict(batch_size=4, seq_len=16))
  return config


@pytest.mark.parametrize("router, match", [("soft_moe", "moe.router='soft_moe' is non-causal"),
                                           ("expert_choice", "moe.router='expert_choice' is non-causal")])
def test_decoder_config_refuses_non_causal_routers(router, match):
  config = lm_config(router)
  config.moe.dispatch = "einsum"
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


@pytest.mark.parametrize("fields, match", [
    (dict(router="hash", jitter_eps=0.1), r"moe.jitter_eps=0.1 is not read by moe.router='hash'"),
    (dict(router="soft_moe", dispatch="einsum", router_dtype="bfloat16"),
     r"moe.router_dtype='bfloat16' is not read by moe.router='soft_moe'"),
    (dict(router="soft_moe", dispatch="einsum", dropless=True), r"moe.dropless=True is not read by"),
    (dict(options={"soft_moe": dict(slots_per_expert=2)}),
     r"moe.soft_moe.slots_per_expert=2 is an option of router 'soft_moe'.*moe.router='switch'"),
    (dict(router="hash", options={"base": dict(sinkhorn_iterations=3)}),
     r"moe.base.sinkhorn_iterations=3 is an option of router 'base'"),
    (dict(router="base", batch_prioritized=True), r"moe.batch_prioritized=True is not read by moe.router='base'"),
    (dict(router="base", options={"top_k": dict(k=2)}), r"moe.top_k.k=2 is an option of router 'top_k'"),
])
def test_bad_router_combinations_raise_naming_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    MoeConfig(**fields)


def test_base_config_needs_groups_that_experts_divide():
  config = lm_config("base", group_size=6)
  config.train.batch_size = 3
  with pytest.raises(ValueError, match=r"tokens per group S=6 must be a multiple of moe.num_experts=4"):
    config_lib.validate(config)


@pytest.mark.parametrize("router", ["hash", "base"])
def test_tiny_decoder_lm_trains_with_router(router):
  """A few AdamW steps on one fixed batch lower the loss; the hash router gets the token ids from the model."""
  exp = config_lib.validate(lm_config(router))
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    model = TransformerLM(config_lib.model_config(exp, vocab_size=64), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
  tokens = token_ids((4, 17), seed=3, vocab=64)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits, aux = model(inputs, deterministic=False)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets)) + 1e-2 * aux.load_balancing_loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    losses = [float(step(model, optimizer)) for _ in range(8)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow  # a whole training run with evaluation on the 8-device mesh: ~1 min per router on 2 cores
@pytest.mark.parametrize("router", ["hash", "base"])
def test_training_loop_runs_hash_and_base_with_expert_parallelism(router, tmp_path):
  """`--config.moe.router=hash|base` through `train.train_and_evaluate`: loss decreases, evaluation (BASE: greedy
  top-1) is finite."""
  config = tiny_config(str(tmp_path / "tfds"), steps=16)
  config.moe.router, config.moe.jitter_eps = router, 0.0  # hash has no router logits to jitter
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  losses = train_losses(str(tmp_path / "run"))
  assert result.status == "completed" and result.step == 16
  assert np.mean([losses[s] for s in (13, 14, 15, 16)]) < np.mean([losses[s] for s in (1, 2, 3, 4)]) - 0.5
  assert np.isfinite(result.eval_loss)
