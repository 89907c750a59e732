"""Flax NNX layers on one device: MoeConfig validation, the MoE layer against the reference MoE and the
dense FFN, randomness kept in module state, training under nnx.jit / nnx.Optimizer / split-merge."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import reference, routing
from moe_jax import experts as experts_lib
from moe_jax.moe_layer import FeedForward, MoeAux, MoeConfig, MoeFeedForward, group_tokens

BATCH, LENGTH, D_MODEL, D_FF = 4, 8, 16, 32


def inputs(seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (BATCH, LENGTH, D_MODEL))


def expert_weights(layer) -> experts_lib.ExpertWeights:
  return experts_lib.ExpertWeights(
      wi_0=layer.wi_0[...], wo=layer.wo[...], wi_1=None if layer.wi_1 is None else layer.wi_1[...]
  )


class TestMoeConfigValidation:

  @pytest.mark.parametrize(
      "fields, match",
      [
          (dict(num_experts=0), "num_experts=0"),
          (dict(router="lsh"), "router='lsh'"),
          (dict(options={"top_k": dict(k=2)}), "moe.top_k.k=2 is an option of router 'top_k'.*router='switch'"),
          (dict(router="expert_choice", options={"top_k": dict(k=2)}), "moe.top_k.k=2 is an option of router"),
          (dict(router="top_k", options={"top_k": dict(k=9)}), r"moe.top_k.k=9 must be in \[1, moe.num_experts=8\]"),
          (dict(router="top_k", options={"top_k": dict(k=0)}), "moe.top_k.k=0 must be >= 1"),
          (dict(options={"top_p": dict(p=0.5)}), "unknown config field 'moe.top_p'"),
          (dict(capacity_factor=0.0), r"capacity_factor=0.0 must be > 0"),
          (dict(capacity_factor=float("inf")), "capacity_factor=inf must be a finite number"),
          (dict(eval_capacity_factor=-1.0), r"eval_capacity_factor=-1.0 must be > 0"),
          (dict(dispatch="scatter"), "dispatch='scatter' must be one of"),
          (dict(dispatch="dropless"), "dispatch='dropless' needs dropless=True"),
          (dict(router="expert_choice", dropless=True), "moe.dropless=True is not read by moe.router='expert_choice'"),
          (dict(options={"top_k": dict(renormalize=True)}), "moe.top_k.renormalize=True is an option of router"),
          (dict(router="expert_choice", batch_prioritized=True), "batch_prioritized=True"),
          (dict(options={"top_k": dict(second_expert_policy="sometimes")}),
           "moe.top_k.second_expert_policy='sometimes' must be one of"),
          (dict(options={"top_k": dict(second_expert_policy="random")}),
           "moe.top_k.second_expert_policy='random' is an option of router 'top_k'"),
          (dict(options={"top_k": dict(second_expert_threshold=0.0)}),
           r"moe.top_k.second_expert_threshold=0.0 must be in \(0, 1\]"),
          (dict(jitter_eps=1.0), r"jitter_eps=1.0 must be in \[0, 1\)"),
          (dict(expert_dropout=-0.1), r"expert_dropout=-0.1 must be in \[0, 1\)"),
          (dict(group_size=-1), "group_size=-1 must be >= 0"),
          (dict(router_dtype="float16"), "router_dtype='float16' must be one of"),
      ],
  )
  def test_bad_value_raises_naming_the_field(self, fields, match):
    with pytest.raises(ValueError, match=match):
      MoeConfig(**fields)

  def test_dropless_needs_no_capacity_factor(self):
    MoeConfig(router="top_k", dropless=True, dispatch="dropless", capacity_factor=0.0, options={"top_k": dict(k=2)})


class TestLayerErrors:

  def test_unknown_activation_raises(self):
    with pytest.raises(ValueError, match="activation='tanh'"):
      MoeFeedForward(D_MODEL, D_FF, MoeConfig(), activation="tanh", rngs=nnx.Rngs(0))

  def test_wrong_d_model_raises(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_model=16"):
      layer(jnp.zeros((BATCH, LENGTH, D_MODEL + 1)))

  def test_group_size_not_dividing_tokens_raises(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(group_size=5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="group_size=5 must divide batch \\* length = 4 \\* 8 = 32"):
      layer(inputs())


@pytest.mark.parametrize(
    "config, activation, deterministic",
    [
        (MoeConfig(num_experts=4, capacity_factor=0.5), "relu", False),  # one group per sequence, drops
        (MoeConfig(num_experts=4, router="top_k", eval_capacity_factor=1.0, group_size=16,
                   options={"top_k": dict(k=2)}), "swiglu", True),
        (MoeConfig(num_experts=4, router="expert_choice", capacity_factor=1.0, dispatch="einsum"), "gelu", False),
        (MoeConfig(num_experts=4, router="top_k", dropless=True, dispatch="dropless", options={"top_k": dict(k=2)}),
         "geglu", False),
    ],
    ids=["switch_sequence_groups", "top2_group16_eval", "expert_choice_einsum", "top2_dropless"],
)
def test_layer_output_and_aux_equal_reference_moe_on_its_groups(config, activation, deterministic):
  """The layer = reference MoE on the documented routing groups, with the train or eval capacity factor."""
  causal = config.family.causal  # expert choice runs in an encoder layer
  layer = MoeFeedForward(D_MODEL, D_FF, config, activation=activation, causal=causal, rngs=nnx.Rngs(0))
  x = inputs()
  out, aux = nnx.jit(lambda layer, x: layer(x, deterministic=deterministic))(layer, x)

  @jax.jit
  def reference_layer(x, kernel, weights):
    groups = group_tokens(x, config.group_size)
    logits = routing.router_logits(groups, kernel)
    capacity_factor = config.eval_capacity_factor if deterministic else config.capacity_factor
    if config.router == "expert_choice":
      route = routing.expert_choice_route(logits, capacity_factor=capacity_factor)
    else:
      k = config.router_options.k if config.router == "top_k" else 1
      route = routing.top_k_route(logits, k=k, capacity_factor=capacity_factor, dropless=config.dropless)
    return reference.moe(groups, route, weights, activation=activation), route

  expected, route = reference_layer(x, layer.router[...], expert_weights(layer))

  chex.assert_shape(out, x.shape)
  chex.assert_trees_all_close(out, expected.reshape(x.shape), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(
      aux, MoeAux(route.load_balancing_loss, route.router_z_loss, route.metrics, jnp.zeros(())), atol=1e-6, rtol=0
  )
  chex.assert_shape(aux.metrics.expert_load, (config.num_experts,))


def test_dropped_tokens_give_exactly_zero_layer_output():
  """A zero router ties every expert, so top-1 sends each sequence to expert 0: positions >= C are dropped."""
  config = MoeConfig(num_experts=4, capacity_factor=1.0)
  layer = MoeFeedForward(D_MODEL, D_FF, config, rngs=nnx.Rngs(0))
  layer.router[...] = jnp.zeros_like(layer.router[...])
  out, aux = nnx.jit(lambda layer, x: layer(x, deterministic=False))(layer, inputs())
  capacity = routing.compute_capacity(LENGTH, 4, 1.0)
  chex.assert_trees_all_equal(out[:, capacity:], jnp.zeros_like(out[:, capacity:]))
  assert bool(jnp.all(jnp.any(out[:, :capacity] != 0, axis=-1)))
  chex.assert_trees_all_close(aux.metrics.dropped_token_fraction, 1 - capacity / LENGTH)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(
    "config", [MoeConfig(num_experts=1), MoeConfig(num_experts=1, dropless=True, dispatch="dropless")]
)
def test_single_expert_top1_without_drops_equals_dense_ffn(config, activation):
  """With one expert the router weight is softmax over one logit = 1, so the MoE is the dense FFN."""
  moe = MoeFeedForward(D_MODEL, D_FF, config, activation=activation, rngs=nnx.Rngs(0))
  dense = FeedForward(D_MODEL, D_FF, activation=activation, rngs=nnx.Rngs(1))
  dense.wi_0[...] = moe.wi_0[...][0]
  dense.wo[...] = moe.wo[...][0]
  if dense.wi_1 is not None:
    dense.wi_1[...] = moe.wi_1[...][0]
  x = inputs()
  out, aux = nnx.jit(lambda moe, x: moe(x, deterministic=False))(moe, x)
  chex.assert_trees_all_close(out, nnx.jit(lambda dense, x: dense(x))(dense, x), atol=1e-6, rtol=0)
  chex.assert_trees_all_equal(aux.metrics.dropped_assignment_fraction, jnp.float32(0))


class TestRandomness:
  CONFIG = MoeConfig(num_experts=4, router="top_k", jitter_eps=0.1, expert_dropout=0.3,
                     options={"top_k": dict(k=2, second_expert_policy="random")})

  def test_training_noise_comes_from_module_state(self):
    """Same init -> same noise; each call advances the stream; a saved state replays the next call."""
    first = MoeFeedForward(D_MODEL, D_FF, self.CONFIG, rngs=nnx.Rngs(0))
    second = MoeFeedForward(D_MODEL, D_FF, self.CONFIG, rngs=nnx.Rngs(0))
    train = nnx.jit(lambda layer, x: layer(x, deterministic=False)[0])
    x = inputs()
    call_1 = train(first, x)
    chex.assert_trees_all_equal(call_1, train(second, x))
    graph, saved = nnx.split(first)
    saved = jax.tree.map(jnp.copy, saved)
    call_2 = train(first, x)
    assert not np.allclose(call_1, call_2)
    chex.assert_trees_all_equal(train(nnx.merge(graph, saved), x), call_2)

  def test_deterministic_call_draws_no_noise(self):
    layer = MoeFeedForward(D_MODEL, D_FF, self.CONFIG, rngs=nnx.Rngs(0))
    before = nnx.state(layer, nnx.RngState)
    evaluate = nnx.jit(lambda layer, x: layer(x, deterministic=True)[0])
    x = inputs()
    chex.assert_trees_all_equal(evaluate(layer, x), evaluate(layer, x))
    chex.assert_trees_all_equal(nnx.state(layer, nnx.RngState), before)

  def test_feed_forward_dropout_only_when_not_deterministic(self):
    dense = FeedForward(D_MODEL, D_FF, dropout=0.5, rngs=nnx.Rngs(0))
    call = nnx.jit(lambda dense, x, deterministic: dense(x, deterministic=deterministic), static_argnums=2)
    x = inputs()
    chex.assert_trees_all_equal(call(dense, x, True), call(dense, x, True))
    assert not np.allclose(call(dense, x, False), call(dense, x, True))


def test_bfloat16_compute_and_router_close_to_float32():
  config = MoeConfig(num_experts=4, eval_capacity_factor=4.0)
  f32 = MoeFeedForward(D_MODEL, D_FF, config, rngs=nnx.Rngs(0))
  bf16 = MoeFeedForward(
      D_MODEL, D_FF, MoeConfig(num_experts=4, eval_capacity_factor=4.0, router_dtype="bfloat16"),
      dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
  )
  x = inputs()
  call = nnx.jit(lambda layer, x: layer(x)[0])
  out_bf16 = call(bf16, x)
  assert out_bf16.dtype == jnp.bfloat16
  assert bf16.wi_0[...].dtype == jnp.float32  # params stay float32
  chex.assert_trees_all_close(out_bf16.astype(jnp.float32), call(f32, x), atol=2e-2)


def test_training_with_optimizer_and_split_merge_jit():
  """nnx.value_and_grad + nnx.Optimizer lower a regression loss; split/merge inside jax.jit gives the same
  output as calling the module."""
  config = MoeConfig(num_experts=4, router="top_k", options={"top_k": dict(k=2)})
  layer = MoeFeedForward(D_MODEL, D_FF, config, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
  x = inputs()
  target = jnp.tanh(inputs(seed=2))

  @nnx.jit
  def train_step(layer, optimizer):
    def loss_fn(layer):
      out, aux = layer(x, deterministic=False)
      return jnp.mean((out - target) ** 2) + 1e-2 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss

    loss, grads = nnx.value_and_grad(loss_fn)(layer)
    optimizer.update(layer, grads)
    return loss

  losses = [float(train_step(layer, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0], losses

  graph, state = nnx.split(layer)
  functional = jax.jit(lambda state, x: nnx.merge(graph, state)(x)[0])
  chex.assert_trees_all_close(functional(state, x), nnx.jit(lambda layer, x: layer(x)[0])(layer, x), atol=1e-6, rtol=0)


class TestBoundaryChecks:

  @pytest.mark.parametrize("top_k", [2.0, True])
  def test_top_k_must_be_a_true_integer(self, top_k):
    with pytest.raises(ValueError, match=f"moe.top_k.k={top_k!r} has type"):
      MoeConfig(router="top_k", options={"top_k": dict(k=top_k)})

  def test_an_empty_batch_is_refused_before_routing(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one token"):
      layer(jnp.zeros((0, LENGTH, D_MODEL)))

  def test_debug_option_reports_nonfinite_router_inputs(self, capfd):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(check_router_inputs=True), rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda layer, x: layer(x))  # one compile for both inputs; eagerly the layer runs op by op
    x = inputs().at[0, 0, 0].set(jnp.nan)
    jax.block_until_ready(forward(layer, x))
    jax.effects_barrier()
    assert "non-finite router input: 1 token features" in capfd.readouterr().err
    jax.block_until_ready(forward(layer, inputs()))
    jax.effects_barrier()
    assert "non-finite" not in capfd.readouterr().err
