"""Sparse upcycling (moe_jax.upcycle): with renormalised top-k weights and no drops the upcycled model's loss at
step 0 is the dense model's (decoder LM and encoder-decoder), training continues from it, and models that do not
correspond are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_lib, models, optim, parallel, train, upcycle

VOCAB = 64
# Every token's combine weights sum to 1 and none is dropped: the condition under which upcycling is exact.
EXACT_MOE = dict(num_experts=4, router="top_k", top_k=dict(k=2, renormalize=True), dropless=True, dispatch="gather")


def _config(architecture: str, moe_interval: int):
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, num_layers=2, max_seq_len=32,
                           moe_layer_interval=moe_interval, activation="geglu"))
  if architecture == "encoder_decoder":
    config.model.update(dict(architecture="encoder_decoder", positions="relative", num_decoder_layers=2))
    config.data.objective = "span_corruption"
  config.moe.update(EXACT_MOE)
  config.train.update(dict(learning_rate=1e-2, warmup_steps=0, num_steps=20, schedule="constant"))
  return config


def _build(config, seed: int):
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    return models.build(config_lib.model_config(config, vocab_size=VOCAB), rngs=nnx.Rngs(seed))


def _batch(architecture: str) -> dict:
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 3, VOCAB)
  if architecture == "decoder":
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((4, 16))}
  targets = jax.random.randint(jax.random.key(1), (4, 8), 3, VOCAB)
  return {"inputs": tokens, "decoder_inputs": jnp.pad(targets[:, :-1], ((0, 0), (1, 0))), "targets": targets,
          "weights": jnp.ones((4, 8))}


@nnx.jit
def _forward(model, batch):
  """(logits, aux, cross-entropy), deterministic."""
  logits, aux = models.forward(model, batch, deterministic=True)
  _, (ce, _) = train.lm_loss(model, batch, deterministic=True, aux_loss_weight=0.0, z_loss_weight=0.0)
  return logits, aux, ce


@pytest.mark.parametrize("architecture", ["decoder", pytest.param("encoder_decoder", marks=pytest.mark.slow)])
def test_upcycled_model_starts_at_the_dense_models_loss(architecture):
  dense = _build(_config(architecture, 0), seed=0)
  moe = _build(_config(architecture, 2), seed=1)
  block = moe.blocks[1] if architecture == "decoder" else moe.encoder[1]
  fresh_router = np.asarray(block.ffn.router[...])
  upcycle.upcycle_model(dense, moe)
  batch = _batch(architecture)
  dense_logits, _, dense_ce = _forward(dense, batch)
  moe_logits, aux, moe_ce = _forward(moe, batch)
  assert aux.blocks  # the MoE blocks did route
  np.testing.assert_allclose(np.asarray(moe_logits), np.asarray(dense_logits), atol=1e-5, rtol=1e-5)
  assert float(moe_ce) == pytest.approx(float(dense_ce), abs=1e-5)
  # Each expert is the dense FFN; the router is the MoE model's own fresh one.
  dense_block = dense.blocks[1] if architecture == "decoder" else dense.encoder[1]
  for name in ("wi_0", "wi_1", "wo"):
    experts, ffn = getattr(block.ffn, name)[...], getattr(dense_block.ffn, name)[...]
    np.testing.assert_array_equal(np.asarray(experts), np.broadcast_to(np.asarray(ffn), experts.shape))
  np.testing.assert_array_equal(np.asarray(block.ffn.router[...]), fresh_router)


@pytest.mark.slow  # ~25 s on 2 shared cores: two models built, a train step compiled
def test_training_continues_from_the_upcycled_model():
  config = _config("decoder", 2)
  moe = upcycle.upcycle_model(_build(_config("decoder", 0), seed=0), _build(config, seed=1))
  router_before = np.asarray(moe.blocks[1].ffn.router[...])
  with parallel.mesh_context(parallel.create_mesh(1, 1)):  # the optimizer state inherits the params' axes
    optimizer = nnx.Optimizer(moe, optim.make_optimizer(config.train), wrt=nnx.Param)
  graphdef, state = nnx.split((moe, optimizer))
  step = train.make_train_step(graphdef, config.train, seed=0, skip_nonfinite=False)
  batch = _batch("decoder")
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, np.int32(i))
    losses.append(float(metrics["cross_entropy"]))
  assert losses[-1] < losses[0] - 0.1, losses
  trained, _ = nnx.merge(graphdef, state)
  assert not np.allclose(np.asarray(trained.blocks[1].ffn.router[...]), router_before)  # the router learns


def test_models_that_do_not_correspond_are_refused():
  dense = _build(_config("decoder", 0), seed=0)
  narrower = _config("decoder", 2)
  narrower.moe.expert_d_ff = 32
  with pytest.raises(ValueError, match=r"blocks.1.ffn.wi_0 has shape \(4, 32, 32\) in the MoE model but \(32, 64\)"):
    upcycle.upcycle_model(dense, _build(narrower, seed=1))
  deeper = _config("decoder", 0)
  deeper.model.num_layers = 3
  with pytest.raises(ValueError, match="the dense model's .*blocks.2"):
    upcycle.upcycle_model(_build(deeper, seed=0), _build(_config("decoder", 2), seed=1))


@pytest.mark.slow  # three short runs
def test_a_dense_checkpoint_upcycles_into_a_moe_run_that_trains_on(tmp_path):
  from moe_jax.metrics import read_metrics
  from tests.helpers import tiny_config

  dense = tiny_config(None, steps=8, mesh=(jax.device_count(), 1))
  dense.data.data_dir = None  # the embedded corpus in the default cache
  dense.model.moe_layer_interval = 0
  dense.moe.jitter_eps = 0.0
  train.train_and_evaluate(dense, str(tmp_path / "dense"))
  moe = tiny_config(None, steps=12, mesh=(jax.device_count(), 1), experts=4)
  moe.data.data_dir = None
  moe.moe.update(dict(EXACT_MOE, jitter_eps=0.0))
  assert upcycle.upcycle_checkpoint(str(tmp_path / "dense"), moe, str(tmp_path / "moe")) == 8
  result = train.train_and_evaluate(moe, str(tmp_path / "moe"))
  assert result.status == "completed" and result.step == 12
  dense_ce = read_metrics(str(tmp_path / "dense")).series("cross_entropy")
  moe_ce = read_metrics(str(tmp_path / "moe")).series("cross_entropy")
  # The MoE run's first step is scored by the upcycled model: near the dense run's last losses, far below a
  # fresh model's first (~ln 259 = 5.6 nats on bytes).
  assert abs(moe_ce[1] - dense_ce[8]) < 0.5 < dense_ce[1] - moe_ce[1], (dense_ce, moe_ce)


def test_cli_refuses_a_workdir_that_is_not_a_run(tmp_path):
  import os
  import subprocess
  import sys

  from tests.helpers import REPO, cpu_env

  run = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "upcycle.py"),
                        f"--config={REPO}/configs/lm.py:switch-cpu", f"--dense_workdir={tmp_path / 'none'}",
                        f"--workdir={tmp_path / 'moe'}"], capture_output=True, text=True, timeout=120,
                       env=cpu_env(1))
  assert run.returncode == 2 and "config.json does not exist" in run.stderr, run.stderr[-2000:]
