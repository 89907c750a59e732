"""Expert parallelism on 8 emulated CPU devices: the sharded MoE layer equals the single-device layer.

Meshes are (data, expert), with 'fsdp' and 'tensor' of size 1, except in the four-axis tests below. The
default run covers every mesh with 8 experts (several experts per device on all but (1, 8)); `-m slow` runs the
whole grid of meshes x experts x dispatch backends.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

from moe_jax import parallel, routing
from moe_jax.moe_layer import MoeConfig, MoeFeedForward

BATCH, LENGTH, D_MODEL, D_FF = 8, 16, 16, 32
MESHES = ((1, 8), (2, 4), (4, 2), (8, 1))
NUM_EXPERTS = (8, 16, 32)


def config_for(dispatch: str, num_experts: int) -> MoeConfig:
  """One routing per backend, so that the grid also covers top-1 and top-2, capacity and dropless."""
  if dispatch == "einsum":
    return MoeConfig(num_experts=num_experts, capacity_factor=1.0, dispatch="einsum")
  if dispatch == "gather":
    return MoeConfig(num_experts=num_experts, router="top_k", capacity_factor=1.0, dispatch="gather",
                     options={"top_k": dict(k=2)})
  return MoeConfig(num_experts=num_experts, router="top_k", dropless=True, dispatch="dropless",
                   options={"top_k": dict(k=2)})


def inputs():
  k_x, k_cotangent = jax.random.split(jax.random.key(1))
  return jax.random.normal(k_x, (BATCH, LENGTH, D_MODEL)), jax.random.normal(k_cotangent, (BATCH, LENGTH, D_MODEL))


TOKEN_IDS = jax.random.randint(jax.random.key(2), (BATCH, LENGTH), 0, 1000)  # for the hash router


@functools.cache
def run(config: MoeConfig, mesh_shape: tuple[int, ...] | None, activation: str = "gelu", deterministic: bool = False):
  """(output, aux, grads wrt params, grad wrt x, router kernel) of a fresh layer (same init on every mesh),
  on one device (mesh_shape None) or sharded. The loss uses a random cotangent and both auxiliary losses,
  so every gradient path (experts, combine weights, aux losses through the router) is compared."""
  x, cotangent = inputs()

  def compute():
    causal = config.family.causal  # expert choice runs in an encoder layer
    layer = MoeFeedForward(D_MODEL, D_FF, config, activation=activation, causal=causal, rngs=nnx.Rngs(0))

    token_ids = TOKEN_IDS if config.needs_token_ids else None

    def loss(layer, x):
      out, aux = layer(x, deterministic=deterministic, token_ids=token_ids)
      return jnp.sum(out * cotangent) + aux.load_balancing_loss + aux.router_z_loss, (out, aux)

    (_, (out, aux)), (grad_params, grad_x) = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        layer, x
    )
    router = getattr(layer, "router", None)  # hash layers hold no router
    return out, aux, nnx.to_pure_dict(grad_params), grad_x, None if router is None else router[...]

  if mesh_shape is None:
    return compute()
  if len(mesh_shape) == 4:  # (data, fsdp, expert, tensor)
    data, fsdp, expert, tensor = mesh_shape
    mesh = parallel.create_mesh(data, expert, fsdp=fsdp, tensor=tensor)
  else:
    mesh = parallel.create_mesh(*mesh_shape)
  with parallel.mesh_context(mesh):
    return compute()


def assert_sharded_equals_single_device(config, mesh_shape, **kwargs):
  sharded = run(config, mesh_shape, **kwargs)
  single = run(config, None, **kwargs)
  chex.assert_shape(sharded[0], (BATCH, LENGTH, D_MODEL))  # no silent batch repeat
  chex.assert_trees_all_close(sharded, single, atol=1e-5, rtol=0)


# 8 experts already put several on a device ((2, 4): 2, (4, 2): 4, (8, 1): 8), so 16 and 32 add nothing the
# default tier needs (slow tier).
DEFAULT_GRID = {(mesh, 8, "gather") for mesh in MESHES}
# (8, 1): experts not split, so the tiled dropless backend itself runs under shard_map; (2, 4): it resolves
# to capacity buffers with C = S (dispatch.resolve_backend).
DEFAULT_GRID |= {((2, 4), 8, "einsum"), ((2, 4), 8, "dropless"), ((8, 1), 8, "dropless")}
GRID = [
    pytest.param(mesh, e, dispatch, marks=() if (mesh, e, dispatch) in DEFAULT_GRID else pytest.mark.slow)
    for mesh in MESHES
    for e in NUM_EXPERTS
    for dispatch in ("einsum", "gather", "dropless")
]


@pytest.mark.parametrize("mesh_shape, num_experts, dispatch", GRID)
def test_sharded_output_aux_and_gradients_equal_single_device(mesh_shape, num_experts, dispatch):
  assert_sharded_equals_single_device(config_for(dispatch, num_experts), mesh_shape)


@pytest.mark.parametrize(
    "config, activation, deterministic",
    [
        (MoeConfig(router="expert_choice", capacity_factor=1.0, dispatch="einsum"), "gelu", False),
        (
            MoeConfig(router="top_k", batch_prioritized=True, capacity_factor=1.0, group_size=8,
                      options={"top_k": dict(k=2, renormalize=True)}),
            "swiglu",
            False,
        ),
        (MoeConfig(eval_capacity_factor=1.0, group_size=4), "relu", True),
    ],
    ids=["expert_choice_einsum", "top2_renormalized_prioritized_group8_swiglu", "eval_group4"],
)
def test_router_options_sharded_equal_single_device(config, activation, deterministic):
  assert_sharded_equals_single_device(config, (4, 2), activation=activation, deterministic=deterministic)


@pytest.mark.parametrize(
    "config, mesh_shape, deterministic",
    [
        (MoeConfig(router="soft_moe", dispatch="einsum", options={"soft_moe": dict(slots_per_expert=2)}), (2, 4),
         False),
        (MoeConfig(router="soft_moe", dispatch="einsum", group_size=4), (1, 8), False),
        (MoeConfig(router="base", dispatch="gather"), (2, 4), False),
        (MoeConfig(router="base", dispatch="einsum", group_size=8), (4, 2), True),
        (MoeConfig(router="hash", capacity_factor=1.0, dispatch="gather"), (2, 4), False),
        (MoeConfig(router="hash", dropless=True, dispatch="dropless"), (8, 1), False),
    ],
    ids=["soft_moe_2_slots", "soft_moe_group4_1x8", "base_train_gather", "base_eval_einsum_group8",
         "hash_gather", "hash_dropless_8x1"],
)
def test_new_routers_sharded_equal_single_device_forward_and_backward(config, mesh_shape, deterministic):
  """Soft MoE (an encoder layer), BASE and Hash under shard_map expert parallelism = the single-device layer."""
  assert_sharded_equals_single_device(config, mesh_shape, deterministic=deterministic)


# (data, fsdp, expert, tensor): experts' hidden units split over 'tensor', groups over 'fsdp' too.
FOUR_AXIS_MESHES = ((1, 2, 2, 2), (2, 1, 2, 2), (1, 1, 1, 8), (2, 2, 2, 1))


# Each mesh once and each backend on two meshes in the default tier (dropless on (1, 1, 1, 8) runs the tiled
# ragged backend itself under shard_map with split hidden units); the rest of the grid in the slow tier.
FOUR_AXIS_DEFAULT = {((1, 2, 2, 2), "gather"), ((2, 2, 2, 1), "gather"), ((2, 1, 2, 2), "dropless"),
                     ((1, 1, 1, 8), "dropless")}


@pytest.mark.parametrize("mesh_shape, dispatch", [
    pytest.param(mesh, dispatch, marks=() if (mesh, dispatch) in FOUR_AXIS_DEFAULT else pytest.mark.slow)
    for dispatch in ("gather", "dropless") for mesh in FOUR_AXIS_MESHES])
def test_tensor_and_fsdp_sharded_layer_equals_single_device(mesh_shape, dispatch):
  """Top-2 routing with SwiGLU experts (gated: wi_0 and wi_1 both column-parallel)."""
  assert_sharded_equals_single_device(config_for(dispatch, 8), mesh_shape, activation="swiglu")


def test_backends_agree_with_each_other_under_shard_map():
  """Dropless top-2 routing runs on every backend (capacity C = S); sharded, all equal the single-device
  ragged (dropless) layer."""
  expected = run(config_for("dropless", 8), None)
  for dispatch in ("einsum", "gather", "dropless"):
    config = MoeConfig(router="top_k", dropless=True, dispatch=dispatch, options={"top_k": dict(k=2)})
    chex.assert_trees_all_close(run(config, (2, 4)), expected, atol=1e-5, rtol=0)


def test_expert_load_matches_routing_counts_under_shard_map():
  """Per-expert kept assignments reported by the sharded layer = those of routing the whole batch."""
  config = config_for("gather", 8)
  x, _ = inputs()
  _, aux, _, _, kernel = run(config, (2, 4))
  route = routing.top_k_route(routing.router_logits(x, kernel), k=2, capacity_factor=1.0)
  counts = jnp.sum(jax.nn.one_hot(route.expert_index, 8) * route.kept[..., None], axis=(1, 2))  # [G, E]
  chex.assert_trees_all_close(aux.metrics.expert_load * route.capacity, jnp.mean(counts, 0), atol=1e-5)


def test_dropped_tokens_give_exactly_zero_output_under_shard_map():
  config = MoeConfig(capacity_factor=1.0)
  x, _ = inputs()
  with parallel.mesh_context(parallel.create_mesh(2, 4)):
    layer = MoeFeedForward(D_MODEL, D_FF, config, rngs=nnx.Rngs(0))
    layer.router[...] = jnp.zeros_like(layer.router[...])  # ties: every token picks expert 0
    out, _ = nnx.jit(lambda layer, x: layer(x, deterministic=False))(layer, x)
  capacity = routing.compute_capacity(LENGTH, 8, 1.0)
  chex.assert_trees_all_equal(out[:, capacity:], jnp.zeros_like(out[:, capacity:]))
  assert bool(jnp.all(jnp.any(out[:, :capacity] != 0, axis=-1)))


def test_forward_compiles_to_two_all_to_alls_and_backward_to_two_more():
  x, _ = inputs()
  with parallel.mesh_context(parallel.create_mesh(2, 4)):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(layer, nnx.Param, ...)
    forward = lambda params, x: nnx.merge(graph, params, rest)(x)[0]
    hlo_forward = jax.jit(forward).lower(params, x).compile().as_text()
    loss = lambda params, x: jnp.sum(forward(params, x) * x)
    hlo_grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  assert hlo_forward.count("all-to-all(") == 2
  assert hlo_grad.count("all-to-all(") == 4
  assert hlo_grad.count("all-gather(") == 0


def test_train_step_keeps_experts_and_optimizer_state_sharded():
  x, cotangent = inputs()
  with parallel.mesh_context(parallel.create_mesh(2, 4)):
    # Created under nnx.jit, the way to build large sharded layers without replicated init temporaries.
    layer = nnx.jit(
        lambda: MoeFeedForward(D_MODEL, D_FF, MoeConfig(jitter_eps=0.01, expert_dropout=0.1), rngs=nnx.Rngs(0))
    )()
    optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(layer, optimizer, x):
      grads = nnx.grad(lambda layer: jnp.sum(layer(x, deterministic=False)[0] * cotangent))(layer)
      optimizer.update(layer, grads)

    before = layer.wi_0[...]
    for _ in range(2):
      train_step(layer, optimizer, x)
    assert not bool(jnp.allclose(before, layer.wi_0[...]))
    for array in (layer.wi_0[...], optimizer.opt_state[0].mu["wi_0"][...]):
      spec = tuple(array.sharding.spec)
      assert spec + (None,) * (array.ndim - len(spec)) == ("expert", None, None), spec


class TestValidation:

  def test_experts_not_multiple_of_expert_axis_raise_at_construction(self):
    with parallel.mesh_context(parallel.create_mesh(1, 8)):
      with pytest.raises(ValueError, match="num_experts=4 must be a multiple of the 'expert' mesh axis size 8"):
        MoeFeedForward(D_MODEL, D_FF, MoeConfig(num_experts=4), rngs=nnx.Rngs(0))

  def test_experts_not_multiple_of_expert_axis_raise_at_call(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(num_experts=12), rngs=nnx.Rngs(0))  # built without a mesh
    with parallel.mesh_context(parallel.create_mesh(1, 8)):
      with pytest.raises(ValueError, match="num_experts=12 must be a multiple of the 'expert' mesh axis size 8"):
        layer(inputs()[0])

  def test_groups_not_splitting_over_devices_raise(self):
    with parallel.mesh_context(parallel.create_mesh(2, 4)):
      layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
      with pytest.raises(ValueError, match="the 4 routing groups must split evenly over the 8 devices"):
        layer(jnp.zeros((4, LENGTH, D_MODEL)))

  def test_mesh_with_other_axis_names_raises(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"needs a mesh with axes \('data', 'fsdp', 'expert', 'tensor'\)"):
      layer(inputs()[0])

  def test_explicit_mesh_axes_raise(self):
    layer = MoeFeedForward(D_MODEL, D_FF, MoeConfig(), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((2, 1, 4, 1), parallel.MESH_AXES, axis_types=(AxisType.Explicit,) * 4)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="needs Auto mesh axes"):
      layer(inputs()[0])

  @pytest.mark.parametrize("data, expert, match", [(3, 3, "must be at most the number of devices"), (0, 8, "mesh.data=0")])
  def test_bad_mesh_shape_raises(self, data, expert, match):
    with pytest.raises(ValueError, match=match):
      parallel.create_mesh(data, expert)

  def test_no_mesh_or_one_device_mesh_means_single_device_path(self):
    assert parallel.moe_mesh() is None
    one_device = jax.make_mesh((1, 1, 1, 1), parallel.MESH_AXES, (AxisType.Auto,) * 4, devices=jax.devices()[:1])
    with jax.set_mesh(one_device):
      assert parallel.moe_mesh() is None
