"""Grouped-query attention, fine-grained and shared experts, dense first blocks: each equal to a plain-jnp
reference (forward and gradients), counted exactly by moe_jax.flops, and refused when misconfigured."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import config_lib, flops, layers, parallel, reference
from moe_jax import experts as experts_lib
from moe_jax.model import TransformerLM
from moe_jax.moe_layer import FeedForward, MoeConfig, MoeFeedForward
from tests.helpers import built_param_count

D_MODEL, HEADS, HEAD_DIM, BATCH, LENGTH = 32, 4, 8, 2, 16


# One grouped case (2 query heads per key/value head) in the default tier; multi-query (1) and plain multi-head
# attention (4) run the same grouping code with other group sizes: slow tier.
@pytest.mark.parametrize("num_kv_heads", [pytest.param(1, marks=pytest.mark.slow), 2,
                                          pytest.param(4, marks=pytest.mark.slow)])
def test_grouped_query_attention_equals_its_reference_forward_and_backward(num_kv_heads):
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    layer = layers.CausalSelfAttention(D_MODEL, HEADS, HEAD_DIM, num_kv_heads=num_kv_heads, init_scale=1.0,
                                       rngs=nnx.Rngs(0))
  assert layer.qkv.shape == (D_MODEL, HEADS + 2 * num_kv_heads, HEAD_DIM)
  x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, D_MODEL))
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def fast(p, x):
    return jnp.sum(nnx.merge(graph, p, rest)(x) * cotangent)

  def slow(p, x):
    return jnp.sum(reference.attention(x, p["qkv"][...], p["out"][...], HEADS, num_kv_heads) * cotangent)

  chex.assert_trees_all_close(jax.value_and_grad(fast, argnums=(0, 1))(params, x),
                              jax.value_and_grad(slow, argnums=(0, 1))(params, x), atol=1e-4, rtol=1e-4)


def test_shared_experts_add_a_dense_ffn_of_their_total_width_forward_and_backward():
  moe = MoeConfig(num_experts=4, router="top_k", capacity_factor=1.0, options={"top_k": dict(k=2)})
  with parallel.mesh_context(parallel.create_mesh(1, 1)):  # the shared FFN's params carry logical axes
    layer = MoeFeedForward(D_MODEL, 24, moe, shared_d_ff=2 * 12, activation="swiglu", rngs=nnx.Rngs(0))
  assert layer.wi_0.shape == (4, D_MODEL, 24) and layer.shared.wi_0.shape == (D_MODEL, 24)
  x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL))
  cotangent = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, D_MODEL))
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def fast(p):
    out, _ = nnx.merge(graph, p, rest)(x)
    return jnp.sum(out * cotangent)

  def slow(p):
    from moe_jax import routing

    logits = routing.router_logits(x, p["router"][...], jitter_eps=0.0, key=None)
    route = routing.top_k_route(logits, k=2, capacity_factor=2.0)  # deterministic calls use eval capacity
    weights = experts_lib.ExpertWeights(wi_0=p["wi_0"][...], wo=p["wo"][...], wi_1=p["wi_1"][...])
    routed = reference.moe(x, route, weights, activation="swiglu")
    shared = experts_lib.ExpertWeights(wi_0=p["shared"]["wi_0"][...][None], wo=p["shared"]["wo"][...][None],
                                       wi_1=p["shared"]["wi_1"][...][None])
    dense = experts_lib.expert_ffn(shared, x.reshape(1, -1, D_MODEL), activation="swiglu").reshape(x.shape)
    return jnp.sum((routed + dense) * cotangent)

  # Jitted: run op by op, the two sides dispatch hundreds of small programs (~30 s on 2 cores).
  chex.assert_trees_all_close(jax.jit(jax.value_and_grad(fast))(params), jax.jit(jax.value_and_grad(slow))(params),
                              atol=1e-5, rtol=1e-5)


def _config(**model_fields):
  config = config_lib.default_config()
  config.model.update(dict(d_model=64, num_heads=4, head_dim=16, d_ff=128, num_layers=4, max_seq_len=64,
                           vocab_size=300))
  moe_fields = model_fields.pop("moe", {})
  config.model.update(model_fields)
  config.moe.update(moe_fields)
  return config_lib.model_config(config, vocab_size=259)


FEATURES = {
    "switch": {},
    "gqa": dict(num_kv_heads=2),
    "multi-query, tied": dict(num_kv_heads=1, tie_embeddings=True),
    "deepseekmoe-like": dict(moe_layer_interval=1, moe_start_block=1, activation="swiglu",
                             moe=dict(num_experts=8, router="top_k", top_k=dict(k=2), expert_d_ff=32,
                                      num_shared_experts=2)),
    "layernorm, shared of own width": dict(norm="layernorm", moe=dict(num_shared_experts=1, shared_expert_d_ff=48)),
    "hash layers, no router": dict(moe=dict(router="hash")),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_parameter_count_equals_the_instantiated_model(name):
  cfg = _config(**FEATURES[name])
  assert flops.param_count(cfg).total == built_param_count(cfg)


def test_moe_blocks_start_after_the_dense_first_blocks():
  assert _config(moe_layer_interval=1, moe_start_block=1).moe_layers == (1, 2, 3)
  assert _config(moe_layer_interval=2, moe_start_block=1).moe_layers == (2,)
  assert _config(moe_layer_interval=2).moe_layers == (1, 3)  # Switch: every other block


def test_analytic_flops_of_the_new_features_agree_with_xla():
  cfg = _config(**FEATURES["deepseekmoe-like"], num_kv_heads=2)
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.zeros((8, 64), jnp.int32)
  compiled = jax.jit(lambda p, t: nnx.merge(graph, p, rest)(t, deterministic=True)[0]).lower(params, tokens).compile()
  expected = flops.flops_per_token(cfg, 64, executed=True, capacity_factor=cfg.moe.eval_capacity_factor)
  assert compiled.cost_analysis()["flops"] / (expected.forward * 8 * 64) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("field,value,message", [
    ("model.num_kv_heads", 3, "model.num_kv_heads=3 must divide model.num_heads=4"),
    ("model.moe_start_block", 3, "model.moe_layer_interval=2 must be <= model.num_layers=4 - model.moe_start_block=3"),
    ("moe.expert_d_ff", -1, "moe.expert_d_ff=-1 must be >= 0"),
    ("moe.num_shared_experts", 1.5, "moe.num_shared_experts=1.5 has type float"),
])
def test_bad_feature_values_name_the_field(field, value, message):
  config = config_lib.default_config()
  section, name = field.split(".")
  with config[section].ignore_type():
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)
