"""Every router family keeps what it declares (moe_jax.routers): the layer holds exactly its declared parameters
with their shapes and logical axes, the counts read them, and the capacity it declares is the one its routing
uses, in training and evaluation."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import config_lib, flops, routers, routing
from moe_jax.moe_layer import MoeFeedForward

D_MODEL, D_FF, EXPERTS, TOKENS = 8, 16, 4, 8
OPTIONS = {"top_k": {"top_k": {"k": 2, "balancing_bias_rate": 1e-3}}, "soft_moe": {"soft_moe": {"slots_per_expert": 2}}}


def moe_config(name: str) -> config_lib.MoeConfig:
  dispatch = "einsum" if name == "soft_moe" else "gather"
  return config_lib.MoeConfig(num_experts=EXPERTS, router=name, dispatch=dispatch, options=OPTIONS.get(name, {}))


@pytest.mark.parametrize("name", sorted(routers.FAMILIES))
def test_the_layer_holds_exactly_the_declared_router_arrays_and_the_counts_read_them(name):
  moe = moe_config(name)
  declared = moe.family.params(D_MODEL, EXPERTS, moe.router_options)
  layer = MoeFeedForward(D_MODEL, D_FF, moe, causal=moe.family.causal, rngs=nnx.Rngs(0))
  held = {str(path[0]): variable for path, variable in nnx.to_flat_state(nnx.state(layer))
          if str(path[0]).startswith("router")}
  assert set(held) == set(declared)
  for array_name, spec in declared.items():
    assert held[array_name].shape == spec.shape
    assert tuple(held[array_name].get_metadata()["out_sharding"]) == spec.axes
    assert isinstance(held[array_name], nnx.Param) == (spec.update is None)
  model = config_lib.ModelConfig(d_model=D_MODEL, d_ff=D_FF, moe=moe)
  trained = sum(v.size for n, v in held.items() if declared[n].update is None)
  assert flops.router_params_per_layer(model) == trained


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(routers.FAMILIES))
def test_the_declared_capacity_is_the_one_the_routing_uses(name, training):
  moe = moe_config(name)
  layer = MoeFeedForward(D_MODEL, D_FF, moe, causal=moe.family.causal, rngs=nnx.Rngs(0))
  params = {n: getattr(layer, n)[...] for n in moe.family.params(D_MODEL, EXPERTS, moe.router_options)}
  groups = jax.random.normal(jax.random.key(0), (2, TOKENS, D_MODEL))
  token_ids = jnp.arange(2 * TOKENS, dtype=jnp.int32).reshape(2, TOKENS) if moe.needs_token_ids else None
  # The capacity is a static field of the result: tracing the router abstractly gives it, nothing runs.
  result = jax.eval_shape(lambda groups, params, token_ids: moe.family.route(
      routers.RouterInputs(groups, params, token_ids, None, None), moe, moe.router_options, not training),
                          groups, params, token_ids)
  capacity = moe.capacity(TOKENS, training=training)
  if isinstance(result, routing.SoftRoutingResult):
    assert capacity is None  # Soft MoE drops nothing and has no buffer to size
  else:
    assert capacity == result.capacity


def test_only_the_hash_router_reads_token_ids_and_only_non_causal_routers_are_refused_in_a_decoder():
  assert [n for n, f in routers.FAMILIES.items() if f.needs_token_ids] == ["hash"]
  assert sorted(n for n, f in routers.FAMILIES.items() if not f.causal) == ["expert_choice", "soft_moe"]


def test_a_router_registered_twice_or_with_a_misnamed_section_is_refused():
  with pytest.raises(ValueError, match="router 'switch' is already registered"):
    routers.register(routers.get("switch"))
  with pytest.raises(ValueError, match="options section NAME must be 'moe.switch'"):
    routers.RouterFamily(**{**vars(routers.get("top_k")), "name": "switch"})
