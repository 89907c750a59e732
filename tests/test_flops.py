"""FLOPs accounting: analytic counts agree with XLA's cost analysis; Switch configs match their dense twins."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import lm
from configs.sweeps import common, scaling
from moe_jax import config_lib, flops, parallel
from moe_jax.model import TransformerLM
from tests.helpers import built_param_count

# XLA also counts softmax, norms, activations, routing and the optimizer-free backward's elementwise ops,
# which the analytic count leaves out (< 1.5% at these sizes).
XLA_TOLERANCE = 0.03


def _small_model_config(moe_layer_interval: int, activation: str):
  config = config_lib.default_config()
  config.model.update(dict(d_model=256, num_heads=4, head_dim=64, d_ff=1024, num_layers=4, max_seq_len=128,
                           moe_layer_interval=moe_layer_interval, activation=activation, vocab_size=1024))
  return config_lib.model_config(config, vocab_size=259)


# (2, "geglu") holds gated dense blocks beside its gated MoE blocks, and flops.py counts every gated unit alike
# (experts.is_gated), so the all-dense SwiGLU model adds nothing the default tier needs (slow tier).
@pytest.mark.parametrize("moe_layer_interval,activation", [(0, "gelu"), (2, "gelu"),
                                                           pytest.param(0, "swiglu", marks=pytest.mark.slow),
                                                           (2, "geglu")])
def test_analytic_flops_agree_with_xla_cost_analysis(moe_layer_interval, activation):
  cfg = _small_model_config(moe_layer_interval, activation)
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  batch, length = 8, 128
  tokens = jnp.zeros((batch, length), jnp.int32)

  def forward(p, t):
    return nnx.merge(graph, p, rest)(t, deterministic=True)[0]

  # Random cotangent: an all-ones one lets XLA drop matmuls (PLATFORM-NOTES).
  cotangent = jax.random.normal(jax.random.key(0), (batch, length, cfg.vocab_size))
  train_fn = jax.grad(lambda p, t: jnp.sum(forward(p, t) * cotangent))
  # The deterministic pass routes with the evaluation capacity factor; the padded buffers execute it.
  expected = flops.flops_per_token(cfg, length, executed=True,
                                   capacity_factor=cfg.moe.eval_capacity_factor if cfg.moe else None)
  xla_forward = jax.jit(forward).lower(params, tokens).compile().cost_analysis()["flops"]
  xla_train = jax.jit(train_fn).lower(params, tokens).compile().cost_analysis()["flops"]
  assert xla_forward / (expected.forward * batch * length) == pytest.approx(1.0, abs=XLA_TOLERANCE)
  assert xla_train / (expected.train * batch * length) == pytest.approx(1.0, abs=XLA_TOLERANCE)


def _router_flops(cfg) -> float:
  return len(cfg.moe_layers) * 2.0 * cfg.d_model * cfg.moe.num_experts


def _flops_and_router(config):
  cfg = config_lib.model_config(config, vocab_size=config.model.vocab_size or 259)
  return flops.flops_per_token(cfg, config.train.seq_len).forward, cfg


@pytest.mark.parametrize("size", ["cpu", "gpu", "base", "large"])
def test_switch_configs_match_their_dense_twin_up_to_the_router(size):
  switch_flops, switch_cfg = _flops_and_router(lm.get_config(f"switch-{size}"))
  dense_flops, _ = _flops_and_router(lm.get_config(f"dense-{size}"))
  assert switch_flops - dense_flops == pytest.approx(_router_flops(switch_cfg))
  assert _router_flops(switch_cfg) / dense_flops < 0.01


def test_every_scaling_sweep_run_is_flop_matched_to_dense_up_to_the_router():
  sweep = scaling.get_config("cpu")
  dense_flops = None
  for run in sweep.runs:
    run_flops, cfg = _flops_and_router(common.build_config(run))
    if run.group == "dense":
      dense_flops = run_flops
    else:
      assert run_flops - dense_flops == pytest.approx(_router_flops(cfg)), run.name


def test_total_params_grow_with_experts_while_active_params_stay():
  counts = {}
  for experts in (1, 8, 64):
    config = lm.get_config("switch-cpu")
    config.moe.num_experts = experts
    counts[experts] = flops.param_count(config_lib.model_config(config, vocab_size=259))
  assert counts[1].total < counts[8].total < counts[64].total
  ffn = 2 * 128 * 512
  assert counts[64].total - counts[8].total == 2 * 56 * (ffn + 128)  # 2 MoE layers, 56 more experts + router
  assert counts[64].active - counts[8].active == 2 * 56 * 128  # only the router grows


def test_param_count_matches_the_model():
  config = lm.get_config("switch-cpu")
  cfg = config_lib.model_config(config, vocab_size=259)
  assert flops.param_count(cfg).total == built_param_count(cfg)
