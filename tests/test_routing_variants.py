"""The routing variants of the published MoE systems, each against a plain numpy / jax.numpy reference.

Axis legend (as in moe_jax.routing): G groups · S tokens per group · E experts · C capacity per expert ·
K choices per token · B batch · L sequence length.

  * Switch / DeepSeekMoE: softmax over all experts, then top-k without renormalisation;
  * Mixtral: softmax over the top-k logits, which is renormalised top-k;
  * DeepSeek-V3: sigmoid scores, normalised top-k weights times a routed scaling factor; group-limited routing
    (DeepSeek-V2 and V3); the auxiliary-loss-free balancing bias; the sequence-wise balance loss.

Routers are jitted once per static configuration at module level (compiling dominates on two cores); logits
come from numpy with fixed seeds.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moe_jax import routing, train
from moe_jax.moe_layer import MoeConfig, MoeFeedForward, RouterBias
from tests.helpers import tiny_config, train_losses

STATIC = ("k", "dropless", "capacity_factor", "renormalize", "score_function", "routed_scaling",
          "num_expert_groups", "topk_expert_groups", "group_score")
top_k_jit = jax.jit(routing.top_k_route, static_argnames=STATIC)

SHAPE = (2, 6, 8)  # [G, S, E]


def random_logits(shape=SHAPE, seed: int = 0, scale: float = 2.0) -> jax.Array:
  """Gaussian logits: continuous, so no two scores tie."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def cotangent(shape, seed: int = 1) -> jax.Array:
  """A random cotangent for gradient checks (an all-ones one would let XLA drop terms)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def combine_gradient(route, logits, r):
  """d/d logits of sum(combine_weight * r)."""
  return jax.grad(lambda x: jnp.sum(route(x).combine_weight * r))(logits)


def top_k_np(selection, k: int) -> np.ndarray:  # [G, S, E] -> [G, S, K], by decreasing selection score
  return np.argsort(-np.asarray(selection, np.float64), axis=-1, kind="stable")[..., :k]


def assert_same_choices(result, expected_index):
  chex.assert_trees_all_equal(np.asarray(result.expert_index), expected_index.astype(np.int32))


# ----------------------------------------------------------------------------------------------------------
# Softmax routing: Switch / DeepSeekMoE and Mixtral.


def test_softmax_top_k_without_renormalisation_weights_are_the_full_softmax_probabilities():
  """Switch eq. 2 / DeepSeekMoE eq. 4: gate = softmax over all E experts, taken at the top-k, not renormalised."""
  logits, r = random_logits(), cotangent(SHAPE[:2] + (3,))
  route = lambda x: top_k_jit(x, k=3, dropless=True, renormalize=False)
  result = route(logits)
  index = top_k_np(logits, 3)
  reference = lambda x: jnp.take_along_axis(jax.nn.softmax(x, axis=-1), jnp.asarray(index), axis=-1)

  assert_same_choices(result, index)
  chex.assert_trees_all_close(result.combine_weight, reference(logits), atol=1e-6)
  assert float(jnp.max(jnp.sum(result.combine_weight, -1))) < 1.0  # the unchosen experts keep their share
  chex.assert_trees_all_close(combine_gradient(route, logits, r),
                              jax.grad(lambda x: jnp.sum(reference(x) * r))(logits), atol=1e-6)


def test_softmax_over_the_top_k_logits_equals_renormalised_top_k():
  """Mixtral (Jiang et al. 2024, eq. 1): G(x) = softmax(TopK(x W_g)), which is the softmax over all experts
  renormalised over the k chosen: the normaliser of the full softmax cancels."""
  logits, r = random_logits(seed=2), cotangent(SHAPE[:2] + (2,))
  route = lambda x: top_k_jit(x, k=2, dropless=True, renormalize=True)
  result = route(logits)
  index = top_k_np(logits, 2)
  mixtral = lambda x: jax.nn.softmax(jnp.take_along_axis(x, jnp.asarray(index), axis=-1), axis=-1)

  assert_same_choices(result, index)
  chex.assert_trees_all_close(result.combine_weight, mixtral(logits), atol=1e-6)
  chex.assert_trees_all_close(combine_gradient(route, logits, r),
                              jax.grad(lambda x: jnp.sum(mixtral(x) * r))(logits), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-V3 sigmoid scores, routed scaling, group limit, bias.


def sigmoid_np(x) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def v3_weights(logits, index, scaling: float):
  """DeepSeek-V3 eqs. 13-15 in jax.numpy: scaling * s_i / sum_topk s, s = sigmoid(logits)."""
  chosen = jnp.take_along_axis(jax.nn.sigmoid(logits), jnp.asarray(index), axis=-1)
  return scaling * chosen / jnp.sum(chosen, axis=-1, keepdims=True)


def test_sigmoid_weights_are_routed_scaling_times_normalised_top_k_scores():
  logits, r = random_logits(seed=3), cotangent(SHAPE[:2] + (2,))
  route = lambda x: top_k_jit(x, k=2, dropless=True, renormalize=True, score_function="sigmoid", routed_scaling=2.5)
  result = route(logits)
  index = top_k_np(sigmoid_np(logits), 2)

  assert_same_choices(result, index)
  chex.assert_trees_all_close(result.combine_weight, v3_weights(logits, index, 2.5), atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(result.combine_weight, -1), jnp.full(SHAPE[:2], 2.5), atol=1e-6)
  s = sigmoid_np(logits)
  chex.assert_trees_all_close(result.router_probs, s / s.sum(-1, keepdims=True), atol=1e-6)  # s' of eq. 19
  chex.assert_trees_all_close(combine_gradient(route, logits, r),
                              jax.grad(lambda x: jnp.sum(v3_weights(x, index, 2.5) * r))(logits), atol=1e-6)


def group_limited_np(selection, k: int, groups: int, topk_groups: int, group_score: str) -> np.ndarray:
  """DeepSeek-V2/V3 group-limited top-k as loops: per token, rank the groups, keep the best, top-k inside."""
  selection = np.asarray(selection, np.float64)
  *lead, num_experts = selection.shape
  per_group = num_experts // groups
  flat = selection.reshape(-1, num_experts)
  index = np.zeros((flat.shape[0], k), np.int64)
  for t, row in enumerate(flat):
    by_group = row.reshape(groups, per_group)
    score = by_group.max(-1) if group_score == "max" else np.sort(by_group, -1)[:, -2:].sum(-1)
    best = np.argsort(-score, kind="stable")[:topk_groups]
    allowed = np.full(num_experts, -np.inf)
    for g in best:
      allowed[g * per_group:(g + 1) * per_group] = row[g * per_group:(g + 1) * per_group]
    index[t] = np.argsort(-allowed, kind="stable")[:k]
  return index.reshape(*lead, k)


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited_routing_chooses_the_top_k_inside_the_best_groups(group_score):
  """E = 8 experts in 4 groups of 2, top-2 groups, k = 3; sigmoid scores plus a bias (V3) or softmax (V2)."""
  logits, r = random_logits(seed=4), cotangent(SHAPE[:2] + (3,))
  bias = jnp.asarray(np.random.default_rng(5).standard_normal(SHAPE[-1], np.float32) * 0.3)
  score_function = "softmax" if group_score == "max" else "sigmoid"
  route = lambda x: top_k_jit(x, k=3, dropless=True, renormalize=True, score_function=score_function,
                              selection_bias=bias, num_expert_groups=4, topk_expert_groups=2,
                              group_score=group_score)
  result = route(logits)
  scores = sigmoid_np(logits) if score_function == "sigmoid" else np.asarray(jax.nn.softmax(logits))
  index = group_limited_np(scores + np.asarray(bias), 3, 4, 2, group_score)

  assert_same_choices(result, index)
  assert np.all(np.asarray([len(set(row // 2)) for row in index.reshape(-1, 3)]) <= 2)  # at most 2 groups each
  chex.assert_trees_all_close(result.combine_weight, jnp.take_along_axis(
      jnp.asarray(scores, jnp.float32), jnp.asarray(index), -1) / np.take_along_axis(scores, index, -1).sum(
          -1, keepdims=True), atol=1e-6)
  if score_function == "sigmoid":
    chex.assert_trees_all_close(combine_gradient(route, logits, r),
                                jax.grad(lambda x: jnp.sum(v3_weights(x, index, 1.0) * r))(logits), atol=1e-6)


def test_group_limit_that_leaves_fewer_experts_than_k_is_refused():
  with pytest.raises(ValueError, match="k=5 must be <= topk_expert_groups \\* experts per group = 2 \\* 2"):
    routing.select_experts(random_logits(), k=5, num_expert_groups=4, topk_expert_groups=2)


def test_bias_changes_the_selection_but_not_the_combine_weight_formula():
  """DeepSeek-V3 eq. 16: b enters the top-k only; the weights are still scaling * s_i / sum_topk s, with s the
  unbiased sigmoid scores, and no gradient reaches b."""
  logits = random_logits(seed=6)
  plain = top_k_jit(logits, k=2, dropless=True, renormalize=True, score_function="sigmoid", routed_scaling=2.5)
  # Favour the experts each token ranks last: the bias must move choices.
  bias = jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
  route = lambda x, b: top_k_jit(x, k=2, dropless=True, renormalize=True, score_function="sigmoid",
                                 routed_scaling=2.5, selection_bias=b)
  biased = route(logits, bias)
  index = top_k_np(sigmoid_np(logits) + np.asarray(bias), 2)

  assert_same_choices(biased, index)
  assert np.any(np.asarray(biased.expert_index) != np.asarray(plain.expert_index))
  chex.assert_trees_all_close(biased.combine_weight, v3_weights(logits, index, 2.5), atol=1e-6)
  bias_gradient = jax.grad(lambda b: jnp.sum(route(logits, b).combine_weight * cotangent((2, 6, 2))))(bias)
  chex.assert_trees_all_equal(bias_gradient, jnp.zeros_like(bias))
  zero = route(logits, jnp.zeros_like(bias))
  chex.assert_trees_all_equal((zero.expert_index, zero.combine_weight), (plain.expert_index, plain.combine_weight))


def test_variants_claim_capacity_like_gshard_in_choice_then_token_order():
  """The variants feed the same capacity assignment: slots follow GShard's loop over the chosen experts."""
  logits = random_logits(seed=7)
  bias = jnp.asarray(np.linspace(-0.2, 0.2, SHAPE[-1], dtype=np.float32))
  result = top_k_jit(logits, k=2, capacity_factor=0.5, renormalize=True, score_function="sigmoid",
                     routed_scaling=2.5, selection_bias=bias, num_expert_groups=4, topk_expert_groups=2,
                     group_score="top2_sum")
  index = np.asarray(result.expert_index)
  capacity = result.capacity
  kept = np.zeros(index.shape, bool)
  for g in range(index.shape[0]):
    fill = np.zeros(SHAPE[-1], int)
    for j in range(index.shape[2]):
      for s in range(index.shape[1]):
        if fill[index[g, s, j]] < capacity:
          kept[g, s, j] = True
          fill[index[g, s, j]] += 1
  assert not kept.all()  # the point is tight: something is dropped
  chex.assert_trees_all_equal(np.asarray(result.kept), kept)
  chex.assert_trees_all_equal(np.asarray(result.combine_weight) == 0, ~kept)


# ----------------------------------------------------------------------------------------------------------
# Auxiliary-loss-free balancing and the sequence-wise balance loss.


def test_bias_update_raises_underloaded_and_lowers_overloaded_experts_by_gamma():
  load = jnp.asarray([0.5, 0.25, 0.25, 0.0])  # mean 0.25
  updated = routing.balancing_bias_update(jnp.asarray([0.1, 0.0, -0.1, 0.0]), load, 1e-3)
  chex.assert_trees_all_close(updated, jnp.asarray([0.1 - 1e-3, 0.0, -0.1, 1e-3]), atol=0)


def load_imbalance(result) -> float:
  """max_i load_i / mean load: 1.0 when balanced."""
  load = np.asarray(result.metrics.expert_selection)
  return float(load.max() / load.mean())


def test_bias_update_moves_the_load_toward_balance_on_a_skewed_input():
  """Logits favouring the low-index experts (a fixed ramp on top of noise); 300 steps of rate 0.01."""
  logits = random_logits((4, 32, 8), seed=8, scale=0.5) + jnp.linspace(2.0, -2.0, 8)
  route = jax.jit(lambda b: top_k_jit(logits, k=2, dropless=True, renormalize=True, score_function="sigmoid",
                                      selection_bias=b))
  bias = jnp.zeros(8)
  before = load_imbalance(route(bias))
  for _ in range(300):
    bias = routing.balancing_bias_update(bias, route(bias).metrics.expert_selection, 0.01)
  after = load_imbalance(route(bias))
  assert before > 2.5, before
  assert after < 1.3, (before, after)
  assert np.all(np.diff(np.asarray(bias)) > -0.02)  # the bias rises toward the experts the ramp disfavours


def sequence_loss_np(router_probs, expert_index, length: int) -> float:
  """DeepSeek-V3 eqs. 17-20 (alpha = 1) as loops over sequences, averaged over them."""
  probs = np.asarray(router_probs, np.float64)
  index = np.asarray(expert_index)
  num_experts, k = probs.shape[-1], index.shape[-1]
  probs, index = probs.reshape(-1, length, num_experts), index.reshape(-1, length, k)
  losses = []
  for p, chosen in zip(probs, index):
    f = np.array([num_experts / (k * length) * np.sum(np.any(chosen == i, axis=-1)) for i in range(num_experts)])
    losses.append(np.sum(f * p.mean(0)))
  return float(np.mean(losses))


@pytest.mark.parametrize("groups_per_sequence", [1, 2])
def test_sequence_balance_loss_is_eqs_17_to_20_per_sequence(groups_per_sequence):
  """One or two routing groups per sequence of L = 12 tokens: the loss is per sequence either way."""
  length = 12
  logits = random_logits((4 * groups_per_sequence, length // groups_per_sequence, 8), seed=9)
  route = lambda x: top_k_jit(x, k=2, dropless=True, renormalize=True, score_function="sigmoid")
  result = route(logits)
  loss = lambda x: routing.sequence_balance_loss(route(x).router_probs, route(x).expert_index, length)

  chex.assert_trees_all_close(loss(logits), sequence_loss_np(result.router_probs, result.expert_index, length),
                              rtol=1e-5)
  if groups_per_sequence == 1:  # groups are sequences: Switch's loss on the same choices, to rounding
    chex.assert_trees_all_close(loss(logits), result.load_balancing_loss, rtol=1e-6)

  def reference(x):  # P_i through s' = sigmoid / sum, f fixed by the choices
    s = jax.nn.sigmoid(x)
    p = (s / jnp.sum(s, -1, keepdims=True)).reshape(-1, length, 8).mean(1)  # [B, E]
    counts = jax.nn.one_hot(jnp.asarray(result.expert_index).reshape(-1, length, 2), 8).sum((1, 2))  # [B, E]
    return jnp.mean(jnp.sum(8 / (2 * length) * counts * p, -1))

  chex.assert_trees_all_close(jax.grad(loss)(logits), jax.grad(reference)(logits), atol=1e-6)


def test_sequence_balance_loss_is_one_when_every_sequence_is_balanced():
  """Uniform scores and each expert chosen equally often in every sequence."""
  index = jnp.asarray(np.arange(2 * 4 * 2).reshape(2, 4, 2) % 4, jnp.int32)  # [B=2, L=4, K=2] over E=4
  probs = jnp.full((2, 4, 4), 0.25)
  chex.assert_trees_all_close(routing.sequence_balance_loss(probs, index, 4), 1.0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The bias in the layer and across a resumed run.

V3_TOP_K = dict(k=2, renormalize=True, score_function="sigmoid", routed_scaling=2.5, num_expert_groups=4,
                topk_expert_groups=2, group_score="top2_sum", balancing_bias_rate=0.01)


def test_layer_moves_its_bias_after_training_calls_only_and_outside_the_gradient():
  config = MoeConfig(num_experts=8, router="top_k", dropless=True, dispatch="dropless", options={"top_k": V3_TOP_K})
  layer = MoeFeedForward(16, 32, config, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(10).standard_normal((2, 8, 16), np.float32))
  zeros = jnp.zeros(8, jnp.float32)

  nnx.jit(lambda layer, x: layer(x, deterministic=True))(layer, x)
  chex.assert_trees_all_equal(layer.router_bias[...], zeros)
  _, aux = nnx.jit(lambda layer, x: layer(x, deterministic=False))(layer, x)
  expected = routing.balancing_bias_update(zeros, aux.metrics.expert_selection, 0.01)
  chex.assert_trees_all_equal(layer.router_bias[...], expected)
  assert float(jnp.max(jnp.abs(expected))) == pytest.approx(0.01)

  grads = nnx.jit(nnx.grad(lambda layer: jnp.sum(layer(x, deterministic=True)[0])))(layer)  # eager: op by op
  assert not jax.tree.leaves(nnx.state(grads, RouterBias))  # not differentiated, so not optimised either


@pytest.mark.slow  # three short training runs on 8 emulated devices: minutes on two shared cores
def test_resumed_run_continues_with_the_same_bias_bitwise(tmp_path):
  """tests/helpers tiny config (8 devices, expert parallelism) with DeepSeek-V3 routing and the sequence-wise loss:
  stopped at step 3 and resumed, it ends with the bias and losses of an uninterrupted run."""
  config = tiny_config(str(tmp_path / "tfds"), steps=6)
  config.moe.update(dict(router="top_k", top_k=dict(V3_TOP_K, sequence_aux_loss_weight=1e-3)))
  config.train.checkpoint_every = 3
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  train.train_and_evaluate(config, str(tmp_path / "resumed"), stop_at_step=3)
  train.train_and_evaluate(config, str(tmp_path / "resumed"))

  def final_bias(run):
    state = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, run, "checkpoints", "6", "state"))
    (bias,) = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
               if "router_bias" in jax.tree_util.keystr(path)]
    return np.asarray(bias)

  chex.assert_trees_all_equal(train_losses(str(tmp_path / "straight")), train_losses(str(tmp_path / "resumed")))
  chex.assert_trees_all_equal(final_bias("straight"), final_bias("resumed"))
  assert np.any(final_bias("straight") != 0)


# ----------------------------------------------------------------------------------------------------------
# The config fields.


@pytest.mark.parametrize("experts, top_k, message", [
    (16, dict(num_expert_groups=3), "moe.top_k.num_expert_groups=3 must divide moe.num_experts=16"),
    (16, dict(num_expert_groups=4, topk_expert_groups=5),
     "moe.top_k.topk_expert_groups=5 must be in \\[1, num_expert_groups=4\\]"),
    (16, dict(k=9, num_expert_groups=4, topk_expert_groups=2),
     "moe.top_k.k=9 must be <= topk_expert_groups \\* experts per group = 2 \\* 4"),
    (8, dict(k=2, group_score="top2_sum"), "moe.top_k.group_score='top2_sum' needs moe.top_k.num_expert_groups > 1"),
    (8, dict(k=2, num_expert_groups=8, topk_expert_groups=2, group_score="top2_sum"), ">= 2 experts per group"),
    (8, dict(score_function="tanh"), "moe.top_k.score_function='tanh' must be one of 'softmax', 'sigmoid'"),
    (8, dict(routed_scaling=0.0), "moe.top_k.routed_scaling=0.0 must be > 0"),
    (8, dict(balancing_bias_rate=-1e-3), "moe.top_k.balancing_bias_rate=-0.001 must be >= 0"),
])
def test_bad_routing_variant_fields_are_refused_with_the_field_named(experts, top_k, message):
  with pytest.raises(ValueError, match=message):
    MoeConfig(num_experts=experts, router="top_k", options={"top_k": top_k})


@pytest.mark.parametrize("top_k, message", [
    (dict(score_function="sigmoid"), "moe.top_k.score_function='sigmoid' is an option of router 'top_k'"),
    (dict(balancing_bias_rate=1e-3), "moe.top_k.balancing_bias_rate=0.001 is an option of router 'top_k'"),
])
def test_deepseek_options_are_refused_outside_the_top_k_router(top_k, message):
  with pytest.raises(ValueError, match=message):
    MoeConfig(router="switch", options={"top_k": top_k})


def test_bfloat16_router_rounds_the_softmax_itself():
  """The precision ablation (Switch Table 2) must differ from selective precision in the softmax, not only in
  its inputs: bf16 probabilities are the bf16 softmax of the bf16 logits, exactly."""
  logits = jax.random.normal(jax.random.key(7), (2, 16, 8)) * 3.0
  low = routing.top_k_route(logits, k=1, capacity_factor=8.0, dtype=jnp.bfloat16)
  expected = jax.nn.softmax(logits.astype(jnp.bfloat16), axis=-1).astype(jnp.float32)
  np.testing.assert_array_equal(low.router_probs, expected)
  high = routing.top_k_route(logits.astype(jnp.bfloat16).astype(jnp.float32), k=1, capacity_factor=8.0)
  assert not np.array_equal(high.router_probs, low.router_probs)  # float32 softmax of the same bf16 logits
  tokens, kernel = jax.random.normal(jax.random.key(8), (2, 16, 32)), jax.random.normal(jax.random.key(9), (32, 8))
  assert routing.router_logits(tokens, kernel, dtype=jnp.bfloat16).dtype == jnp.bfloat16
