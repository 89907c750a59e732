"""Scanned blocks (model.scan_layers): the [dense, MoE] pattern runs as one loop body, computes what the
unscanned model computes (its parameters converted with `model.blocks_to_scanned`), and checkpoint trees
convert both ways."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import config_lib, optim, parallel, train
from moe_jax.model import TransformerLM, blocks_to_scanned, scanned_to_blocks

LAYERS, PERIOD, VOCAB, BATCH, LENGTH = 4, 2, 64, 8, 16


def model_config(scan: bool, remat: str = "none", interval: int = PERIOD) -> config_lib.ModelConfig:
  config = config_lib.default_config()
  config.model.update(dict(vocab_size=VOCAB, d_model=32, num_heads=2, head_dim=8, d_ff=64, num_layers=LAYERS,
                           max_seq_len=LENGTH, scan_layers=scan, remat=remat, moe_layer_interval=interval))
  config.moe.update(dict(num_experts=4, capacity_factor=1.0))
  return config_lib.model_config(config, VOCAB)


def batch() -> dict:
  tokens = jax.random.randint(jax.random.key(3), (BATCH, LENGTH + 1), 0, VOCAB)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((BATCH, LENGTH), jnp.float32)}


def loss_fn(model):
  return train.lm_loss(model, batch(), deterministic=False, aux_loss_weight=1e-2, z_loss_weight=1e-3)


@functools.cache
def one_device_models(remat: str = "none", interval: int = PERIOD):
  """An unscanned model and a scanned one holding the same parameters (converted), on one device. Initialised
  once per module under jit (an eager initialisation takes ~20 s per model, one on the 8-device mesh ~10 s):
  the tests place them on their meshes (`on_mesh`) or only read them, never change them."""
  kwargs = dict(remat=remat, interval=interval)
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    flat = nnx.jit(lambda: TransformerLM(model_config(False, **kwargs), rngs=nnx.Rngs(0)))()
    scanned = nnx.jit(lambda: TransformerLM(model_config(True, **kwargs), rngs=nnx.Rngs(1)))()
  period = interval or 1
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, blocks_to_scanned(nnx.to_pure_dict(nnx.state(flat, nnx.Param)), LAYERS, period))
  nnx.update(scanned, state)
  return flat, scanned, period


def on_mesh(model: TransformerLM, mesh) -> TransformerLM:
  """A copy of `model` on `mesh`, every parameter in the sharding its logical axes give there (as
  `runstate.create` places a model it initialised). Copies (may_alias=False): the two models share their
  unstacked leaves (embeddings, final norm), the cached ones must stay intact, and a training step donates its
  input state."""
  with parallel.mesh_context(mesh):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TransformerLM(model.config, rngs=nnx.Rngs(0))))
    shardings = nnx.get_named_sharding(abstract, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda s: s if isinstance(s, jax.sharding.NamedSharding) else replicated, shardings)
  return nnx.merge(graphdef, jax.device_put(nnx.state(model), shardings, may_alias=False))


def models(mesh, **kwargs):
  """The unscanned and scanned models of `one_device_models(**kwargs)` placed on `mesh`, and the period."""
  flat, scanned, period = one_device_models(**kwargs)
  return on_mesh(flat, mesh), on_mesh(scanned, mesh), period


# The default tier keeps the four-axis mesh (its single-device reference is the unscanned model on that mesh);
# one device, remat and the one-block pattern (~30-60 s each) are slow.
@pytest.mark.parametrize("mesh_shape, kwargs", [
    pytest.param((1, 1, 1, 1), {}, marks=pytest.mark.slow),
    ((1, 2, 2, 2), {}),
    pytest.param((1, 1, 1, 1), {"remat": "full"}, marks=pytest.mark.slow),
    pytest.param((2, 1, 1, 2), {"interval": 0}, marks=pytest.mark.slow),  # dense: a pattern of one block
], ids=["switch_one_device", "switch_1x2x2x2", "switch_remat", "dense_2x1x1x2"])
def test_scanned_model_equals_the_unscanned_one_forward_and_backward(mesh_shape, kwargs):
  data, fsdp, expert, tensor = mesh_shape
  mesh = parallel.create_mesh(data, expert, fsdp=fsdp, tensor=tensor)
  flat, scanned, period = models(mesh, **kwargs)
  step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  with parallel.mesh_context(mesh):
    (loss, (ce, aux)), grads = step(flat)
    (s_loss, (s_ce, s_aux)), s_grads = step(scanned)
  chex.assert_trees_all_close((s_loss, s_ce), (loss, ce), rtol=1e-6)
  assert sorted(s_aux.blocks) == sorted(aux.blocks)  # MoE blocks by index: 1, 3 for Switch
  chex.assert_trees_all_close(s_aux.blocks, aux.blocks, atol=1e-6)
  chex.assert_trees_all_close(scanned_to_blocks(nnx.to_pure_dict(s_grads), LAYERS, period),
                              nnx.to_pure_dict(grads), atol=1e-6)


@pytest.mark.slow  # ~40 s; the default tier keeps forward and gradients equal on (1, 2, 2, 2)
def test_training_steps_of_the_scanned_model_equal_the_unscanned_ones():
  """`train.make_train_step` (which reseeds the stacked RNG streams of scanned blocks) on both layouts, from
  the same parameters: the same losses, and parameters that convert into each other after the steps."""
  mesh = parallel.create_mesh(1, 1)
  flat, scanned, period = models(mesh)
  config = config_lib.default_config().train
  results = []
  with parallel.mesh_context(mesh):
    for model in (flat, scanned):
      optimizer = nnx.Optimizer(model, optim.make_optimizer(config), wrt=nnx.Param)
      graphdef, state = nnx.split((model, optimizer))
      step = train.make_train_step(graphdef, config, seed=0, skip_nonfinite=False)
      losses = []
      for i in range(2):
        state, metrics = step(state, batch(), jnp.int32(i))
        losses.append(metrics["loss"])
      results.append((losses, nnx.to_pure_dict(nnx.filter_state(state[0], nnx.Param))))
  chex.assert_trees_all_close(results[1][0], results[0][0], rtol=1e-6)
  chex.assert_trees_all_close(scanned_to_blocks(results[1][1], LAYERS, period), results[0][1], atol=1e-6)


def test_checkpoint_trees_convert_both_ways():
  """The tree a run checkpoints (params and AdamW state, whose moments nest parameter trees) of the unscanned
  model -> scanned -> unscanned is the same tree, and the scanned one has the scanned model's structure."""
  tx = optim.make_optimizer(config_lib.default_config().train)
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    trees = [nnx.to_pure_dict(nnx.state(nnx.Optimizer(m, tx, wrt=nnx.Param))) | {"params": nnx.to_pure_dict(
        nnx.state(m, nnx.Param))} for m in one_device_models()[:2]]
  converted = blocks_to_scanned(trees[0], LAYERS, PERIOD)
  assert jax.tree.structure(converted) == jax.tree.structure(trees[1])
  chex.assert_trees_all_equal_shapes(converted, trees[1])
  chex.assert_trees_all_equal(scanned_to_blocks(converted, LAYERS, PERIOD), trees[0])


def test_scanned_step_compiles_one_loop_body_instead_of_a_copy_per_block():
  """4 blocks as 2 repetitions of [dense, MoE]: the scanned program holds a while loop, and its matmuls are
  those of one pattern (half the unscanned program's), not one copy per block. The programs of the four-axis
  mesh case above (loaded from the compilation cache when it ran first)."""
  mesh = parallel.create_mesh(1, 2, fsdp=2, tensor=2)
  step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  with parallel.mesh_context(mesh):
    flat, scanned = (step.lower(m).compile().as_text() for m in models(mesh)[:2])
  assert " while(" in scanned
  dots, flat_dots = scanned.count(" dot("), flat.count(" dot(")
  assert dots < 0.75 * flat_dots, (dots, flat_dots)


def test_scan_needs_a_whole_number_of_patterns():
  with pytest.raises(ValueError, match=r"model.scan_layers=True needs model.moe_start_block=0 .* model.num_layers=5"):
    config_lib.ModelConfig(num_layers=5, moe_layer_interval=2, scan_layers=True)
