"""Every mesh (data, fsdp, expert, tensor) trains the same model: losses, gradients and updated parameters of
a few training steps on 8 emulated CPU devices equal those of one device.

float32 tolerance: sharded matmuls and all-reduces sum in another order than one device, so values differ in
the last bits. Measured on the default tier: losses <= 2.3e-7 relative, gradients <= 2.3e-8 absolute,
parameters after 2 AdamW steps <= 4.9e-6 absolute (Adam's normalisation magnifies gradient rounding where a
moment is near 0). The checks allow rtol 1e-5 on losses and gradient norms and atol 2e-5 on gradients and
parameters (whose entries are O(0.1)). The default tier runs a Switch and a dense
mesh (~30 s each on 2 shared cores: two compilations per mesh); `-m slow` the whole grid and Adafactor.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from moe_jax import config_lib, optim, parallel, runstate, train
from moe_jax.checkpoint import Checkpointer
from moe_jax.model import TransformerLM

STEPS, BATCH, LENGTH, VOCAB = 2, 8, 8, 64
MESHES = ((8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 2, 2))  # (data, fsdp, expert, tensor)
KINDS = ("switch", "top2", "dense")


def config_for(kind: str, optimizer: str = "adamw"):
  config = config_lib.default_config()
  # d_model 16 splits over 8 fsdp devices; 2 heads and the widths split over 2 tensor devices.
  config.model.update(dict(vocab_size=VOCAB, d_model=16, num_heads=2, head_dim=8, d_ff=32, num_layers=2,
                           max_seq_len=LENGTH, activation="swiglu" if kind == "top2" else "gelu",
                           moe_layer_interval=0 if kind == "dense" else 2))
  config.moe.update(dict(num_experts=4, capacity_factor=1.0))
  if kind == "top2":
    config.moe.update(dict(router="top_k", top_k=dict(k=2)))
  config.train.update(dict(batch_size=BATCH, seq_len=LENGTH, num_steps=STEPS, warmup_steps=1, learning_rate=1e-2,
                           optimizer=optimizer))
  return config


def batch() -> dict:
  tokens = jax.random.randint(jax.random.key(7), (BATCH, LENGTH + 1), 0, VOCAB)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((BATCH, LENGTH), jnp.float32)}


@functools.cache
def run(kind: str, mesh_shape: tuple[int, int, int, int], optimizer: str = "adamw"):
  """(losses [STEPS], grad norms [STEPS], gradients at initialisation, parameters after STEPS) as numpy."""
  config = config_for(kind, optimizer)
  model_cfg = config_lib.model_config(config, VOCAB)
  mesh = mesh_of(mesh_shape)
  with parallel.mesh_context(mesh):
    model = nnx.jit(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(params=0, dropout=1)))()
    optimizer_ = nnx.Optimizer(model, optim.make_optimizer(config.train), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer_))
    sharding = runstate.stable_shardings(state, mesh)
    state = jax.device_put(state, sharding)
    inputs = jax.device_put(batch(), NamedSharding(mesh, runstate.BATCH_SPEC))

    def loss_fn(params, rest):
      model, _ = nnx.merge(graphdef, params, rest)
      return train.lm_loss(model, inputs, deterministic=False, aux_loss_weight=1e-2, z_loss_weight=1e-3)[0]

    params, rest = nnx.split_state(state, nnx.Param, ...)
    grads = jax.jit(jax.grad(loss_fn))(params, rest)
    step = train.make_train_step(graphdef, config.train, seed=0, skip_nonfinite=False, state_sharding=sharding)
    losses, norms = [], []
    for i in range(STEPS):
      state, metrics = step(state, inputs, np.int32(i))
      losses.append(metrics["loss"])
      norms.append(metrics["grad_norm"])
    final = nnx.to_pure_dict(nnx.filter_state(state, nnx.Param))
    return jax.device_get((losses, norms, nnx.to_pure_dict(grads), final))


def assert_mesh_equals_single_device(kind, mesh_shape, optimizer="adamw"):
  losses, norms, grads, params = run(kind, mesh_shape, optimizer)
  ref_losses, ref_norms, ref_grads, ref_params = run(kind, (1, 1, 1, 1), optimizer)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-5)
  chex.assert_trees_all_close(grads, ref_grads, atol=2e-5, rtol=0)
  chex.assert_trees_all_close(params, ref_params, atol=2e-5, rtol=0)


# Switch on (fsdp, expert, tensor), dense on (data, expert, tensor): every axis in two runs. Top-2 (its
# sharding is Switch's, test_parallel checks its layer) and the other meshes run in the slow tier.
DEFAULT = {("switch", (1, 2, 2, 2)), ("dense", (2, 1, 2, 2))}
GRID = [pytest.param(kind, mesh, marks=() if (kind, mesh) in DEFAULT else pytest.mark.slow)
        for kind in KINDS for mesh in MESHES]


@pytest.mark.parametrize("kind, mesh_shape", GRID)
def test_training_steps_on_a_mesh_equal_one_device(kind, mesh_shape):
  assert_mesh_equals_single_device(kind, mesh_shape)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(1, 8, 1, 1), (1, 2, 2, 2)])
def test_adafactor_with_sharded_factored_moments_equals_one_device(mesh_shape):
  assert_mesh_equals_single_device("switch", mesh_shape, "adafactor")


def test_fsdp_and_tensor_axes_split_parameters_and_optimizer_state():
  """Under (1, 2, 2, 2): an expert kernel [E, M, F] is split E/expert, M/fsdp, F/tensor, and so are its Adam
  moments; a dense attention kernel [M, H, D] is split over fsdp and tensor."""
  config = config_for("switch")
  model_cfg = config_lib.model_config(config, VOCAB)
  with parallel.mesh_context(parallel.create_mesh(1, 2, fsdp=2, tensor=2)):
    # run()'s initialisation on this mesh: the same program, loaded from the compilation cache after it.
    model = nnx.jit(lambda: TransformerLM(model_cfg, rngs=nnx.Rngs(params=0, dropout=1)))()
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config.train), wrt=nnx.Param)
  expert = model.blocks[1].ffn.wi_0[...]
  moment = optimizer.opt_state[1][0].mu["blocks"][1]["ffn"]["wi_0"][...]
  for array in (expert, moment):
    assert tuple(array.sharding.spec) == ("expert", "fsdp", "tensor")
    assert array.addressable_shards[0].data.shape == (2, 8, 16)
  assert tuple(model.blocks[0].attention.qkv[...].sharding.spec)[:2] == ("fsdp", "tensor")


def mesh_of(mesh_shape):
  data, fsdp, expert, tensor = mesh_shape
  return parallel.create_mesh(data, expert, fsdp=fsdp, tensor=tensor)


@pytest.fixture(scope="module")
def saved_on_eight_devices(tmp_path_factory):
  """(checkpointer, the saved tree) of a Switch model and its AdamW state saved at step 1 on 8 devices as
  (2, 2, 2, 1); both targets restore the one checkpoint (restoring writes nothing)."""
  config = config_for("switch")
  with parallel.mesh_context(mesh_of((2, 2, 2, 1))):
    model = nnx.jit(lambda: TransformerLM(config_lib.model_config(config, VOCAB), rngs=nnx.Rngs(0)))()
    optimizer = nnx.Optimizer(model, optim.make_optimizer(config.train), wrt=nnx.Param)
  saved = runstate.checkpoint_tree(model, optimizer)
  checkpointer = Checkpointer(str(tmp_path_factory.mktemp("checkpoint")), keep=1, async_save=False)
  checkpointer.save(1, saved, {"step": 1})
  checkpointer.wait()
  yield checkpointer, saved
  checkpointer.close()


@pytest.mark.parametrize("target", [(1, 1, 2, 2), (1, 1, 1, 1)], ids=["4_devices", "1_device"])
def test_checkpoint_saved_on_one_mesh_restores_exactly_on_another(saved_on_eight_devices, target):
  """Saved on 8 devices as (2, 2, 2, 1), restored on 4 devices (1, 1, 2, 2) or on one: orbax reads each array
  into the target mesh's shardings (`runstate.checkpoint_tree`, the tree a run saves); every value is equal.
  The target is abstract (`runstate.abstract`: each leaf's shape, dtype and sharding on the target mesh, as a
  run's model and optimizer have them there): a restore needs no values to read into."""
  checkpointer, saved = saved_on_eight_devices
  mesh = mesh_of(target)
  config = config_for("switch")
  model, optimizer = nnx.merge(*runstate.abstract(config_lib.typed(config), config_lib.model_config(config, VOCAB),
                                                  mesh))
  abstract = runstate.checkpoint_tree(model, optimizer)
  step, restored, _ = checkpointer.restore_latest(abstract)
  assert step == 1
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(saved))
  for array, like in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
    assert array.sharding.is_equivalent_to(like.sharding, array.ndim)
  assert jax.tree.leaves(restored)[0].sharding.mesh.size == mesh.size
