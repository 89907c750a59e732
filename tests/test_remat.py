"""Rematerialised blocks (model.remat): the same loss and gradients as keeping every activation, and a compiled
step that recomputes the forward matmuls (its structure, no timing)."""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import config_lib, parallel, train
from moe_jax.model import TransformerLM

BATCH, LENGTH, VOCAB = 4, 64, 64


def model_config(remat: str) -> config_lib.ModelConfig:
  config = config_lib.default_config()
  config.model.update(dict(vocab_size=VOCAB, d_model=32, num_heads=4, head_dim=8, d_ff=128, num_layers=4,
                           max_seq_len=LENGTH, remat=remat))
  config.moe.update(dict(num_experts=4, capacity_factor=1.0))
  return config_lib.model_config(config, VOCAB)


def batch() -> dict:
  tokens = jax.random.randint(jax.random.key(3), (BATCH, LENGTH + 1), 0, VOCAB)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((BATCH, LENGTH), jnp.float32)}


@functools.cache
def loss_and_grad(remat: str):
  """(jitted value-and-grad of the training loss over the model, the model) for a fresh model with `remat`; as
  in the training step, nnx.value_and_grad (nnx.remat carries module state, which jax.grad over nnx.merge
  inside the differentiated function would refuse)."""
  with parallel.mesh_context(parallel.create_mesh(1, 1)):  # params carry logical axes
    model = TransformerLM(model_config(remat), rngs=nnx.Rngs(0))

  @nnx.jit
  def step(model, batch):
    return nnx.value_and_grad(lambda m: train.lm_loss(m, batch, deterministic=False, aux_loss_weight=1e-2,
                                                       z_loss_weight=1e-3)[0])(model)

  return step, model


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_rematerialised_blocks_give_the_same_loss_and_gradients(remat):
  step, model = loss_and_grad(remat)
  reference, ref_model = loss_and_grad("none")
  chex.assert_trees_all_equal(nnx.state(model, nnx.Param), nnx.state(ref_model, nnx.Param))  # the same init
  loss, grads = step(model, batch())
  ref_loss, ref_grads = reference(ref_model, batch())
  chex.assert_trees_all_close((loss, nnx.to_pure_dict(grads)), (ref_loss, nnx.to_pure_dict(ref_grads)),
                              atol=1e-6, rtol=1e-6)


def test_full_remat_recomputes_the_forward_matmuls_in_the_backward_pass():
  """The compiled step holds more dot products under remat='full' (the blocks' forward matmuls run again before
  their gradients). XLA:CPU's temp_size_in_bytes does not show the saving at this size (measured: equal within
  0.1%), so the test checks the program's structure, not a byte count."""
  def dots(remat):
    step, model = loss_and_grad(remat)
    return step.lower(model, batch()).compile().as_text().count(" dot(")

  assert dots("full") > dots("none")


def test_a_field_missing_from_an_older_checkpoint_config_is_no_change_at_its_default():
  """A checkpoint written before model.remat existed resumes with remat at its default; another value is a
  change of the model section (refused by check_resumable, as any model change)."""
  config = config_lib.default_config()
  saved = config_lib.to_dict(config)
  del saved["model"]["remat"]
  assert config_lib.config_changes(saved, config_lib.to_dict(config)) == {}
  config.model.remat = "full"
  assert config_lib.config_changes(saved, config_lib.to_dict(config)) == {"model.remat": (None, "full")}
