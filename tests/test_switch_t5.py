"""Switch Transformer Table 9 / Table 7 configs (configs/switch_t5.py): what the calculator reproduces, the gaps
it reports, the cpu variants' structure and exact counts, and end-to-end training of the encoder-decoder from
the CLI with checkpoints and resume reused from train.py.

FLOPs per sequence convention (moe_jax.flops): forward, 2 FLOPs per multiply-add, encoder on 512 input tokens and
decoder on the 114 targets span corruption makes of them; cross-attention keys/values projected from the 512
encoder tokens in every decoder block; attention scores over the full squares (Li^2, Lo^2, Lo*Li); logits; router.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import switch_t5
from moe_jax import config_lib, flops, models, parallel, train
from moe_jax.data import span_corruption
from moe_jax.metrics import read_metrics
from tests.helpers import REPO, cpu_env


def _counts(name: str, **moe):
  config = switch_t5.get_config(name)
  config.moe.update(moe)
  cfg = config_lib.model_config(config, vocab_size=0)
  lengths = span_corruption.lengths(config.train.seq_len, config.data.noise_density,
                                    config.data.mean_noise_span_length)
  assert (lengths.inputs, lengths.targets) == (512, 114)
  return flops.param_count(cfg).total, flops.flops_per_sequence(cfg, lengths.inputs, lengths.targets)


@pytest.mark.parametrize("name", ["t5-base", "switch-base", "switch-xxl", "switch-c"])
def test_calculator_reproduces_table9_parameters_within_one_percent(name):
  total, _ = _counts(name)
  published = switch_t5.TABLE9[name][0]
  assert abs(total - published) <= 0.01 * published, (name, total)


@pytest.mark.parametrize("name, ours", [
    # Table 9's widths (GEGLU d_ff 2816, 128 experts on every other FFN, tied embeddings) give 27.12B; the
    # released ReLU d_ff 4096 variant (flaxformer switch_classic_large.gin) would give 26.31B, still +1.2%.
    ("switch-large", 27.121e9),
    ("t5-large", 0.7503e9),  # T5's own 739M is the ReLU d_ff 4096 model; GEGLU 2816 is +1.5%
])
def test_table9_parameter_gaps_are_as_reported(name, ours):
  total, _ = _counts(name)
  assert total == pytest.approx(ours, rel=1e-4)


@pytest.mark.parametrize("experts", sorted(switch_t5.TABLE7))
def test_table7_parameters_round_to_the_published_figures(experts):
  """Table 7 gives one decimal in billions: every count rounds to it; within 1% for 64, 128, 256 experts, while
  16 (1.072B vs 1.1B, -2.5%) and 32 (1.979B vs 2.0B, -1.1%) match only to that rounding."""
  total, _ = _counts("switch-base", num_experts=experts)
  published = switch_t5.TABLE7[experts]
  assert round(total / 1e8) == round(published / 1e8), total
  if experts >= 64:
    assert abs(total - published) <= 0.01 * published


@pytest.mark.parametrize("name, ours", [
    ("t5-base", 142.0e9), ("switch-base", 142.7e9), ("t5-large", 489.3e9), ("switch-large", 491.2e9),
    ("t5-xxl", 6.967e12), ("switch-xxl", 6.975e12), ("switch-c", 1096.2e9),
])
def test_table9_flops_per_sequence_gap_is_as_reported(name, ours):
  """Not reproduced: our executed count is 10-23% above Table 9 (124B / 425B / 6.3T / 890B). Dropping the
  attention scores, logits and router brings T5-Base to 124.1B (+0.05%) but leaves Large +5.6%, XXL +8.0%,
  C +7.9%; charging cross-attention keys/values per decoder token (2 x params x tokens) gives -4.5% / -2.0% /
  -1.7% / -1.9% with logits. No single reading of 512 / 114 tokens puts all four within 1%."""
  _, per_sequence = _counts(name)
  assert per_sequence.forward == pytest.approx(ours, rel=1e-3)
  # FLOP-matched pairs (Switch's design): the router is all a Switch model adds per sequence.
  if name.startswith("switch") and name != "switch-c":
    _, dense = _counts(switch_t5.EXPERTS[name][0])
    assert per_sequence.forward - per_sequence.router == pytest.approx(dense.forward, rel=1e-9)


@pytest.mark.parametrize("name", sorted(switch_t5.TABLE9))
def test_cpu_variant_keeps_the_structure_and_is_counted_exactly(name):
  full = config_lib.model_config(switch_t5.get_config(name), vocab_size=0)
  config = switch_t5.get_config(f"{name}-cpu")
  cfg = config_lib.model_config(config, vocab_size=359)
  for field in ("architecture", "positions", "activation", "tie_embeddings", "moe_layer_interval"):
    assert getattr(cfg, field) == getattr(full, field), field
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    model = nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))
  built = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.param_count(cfg).total == built


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="config variant 'switch-huge' must be one of"):
    switch_t5.get_config("switch-huge")


def _tiny(config, tmp_path, steps):
  config.model.update(dict(d_model=32, num_heads=2, head_dim=16, d_ff=64))
  config.train.update(dict(batch_size=8, seq_len=64, num_steps=steps, warmup_steps=2, learning_rate=1e-2,
                           eval_every=0, eval_batches=1, log_every=5, checkpoint_every=5, peak_tflops=1.0))
  config.mesh.data = jax.device_count()
  return config


@pytest.mark.slow  # ~1 min: compiles the 8-device MoE step
def test_encoder_decoder_trains_with_decreasing_loss(tmp_path):
  config = _tiny(switch_t5.get_config("switch-base-cpu"), tmp_path, steps=20)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.status == "completed" and np.isfinite(result.eval_loss)
  losses = read_metrics(str(tmp_path / "run")).series("cross_entropy")
  assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5


@pytest.mark.slow
def test_encoder_decoder_resumes_bitwise_from_its_checkpoint(tmp_path):
  config = _tiny(switch_t5.get_config("switch-base-cpu"), tmp_path, steps=10)
  train.train_and_evaluate(config, str(tmp_path / "whole"))
  train.train_and_evaluate(config, str(tmp_path / "split"), stop_at_step=5)
  train.train_and_evaluate(config, str(tmp_path / "split"))
  whole, split = (read_metrics(str(tmp_path / d)).series("loss") for d in ("whole", "split"))
  assert [whole[s] for s in range(6, 11)] == [split[s] for s in range(6, 11)]


@pytest.mark.slow
def test_switch_base_cpu_trains_from_the_cli(tmp_path):
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, "experiments", "train.py"), f"--config={REPO}/configs/switch_t5.py:"
       "switch-base-cpu", f"--workdir={tmp_path}", "--config.train.num_steps=30", "--config.train.log_every=10",
       "--config.train.eval_every=0", "--config.train.eval_batches=1", "--config.train.peak_tflops=1.0"],
      capture_output=True, text=True, timeout=900, env=cpu_env(1))
  assert run.returncode == 0, run.stderr[-3000:]
  losses = read_metrics(str(tmp_path)).series("cross_entropy")
  assert np.mean([losses[s] for s in range(26, 31)]) < np.mean([losses[s] for s in range(1, 6)]) - 1.0


@pytest.mark.slow  # one short run per variant
@pytest.mark.parametrize("name", sorted(switch_t5.TABLE9))
def test_every_cpu_variant_trains_on_the_embedded_corpus(name, tmp_path):
  config = switch_t5.get_config(f"{name}-cpu")
  config.train.update(dict(num_steps=12, warmup_steps=2, eval_every=0, eval_batches=1, log_every=4,
                           checkpoint_every=0, peak_tflops=1.0))
  config.mesh.data = jax.device_count()
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "completed" and np.isfinite(result.eval_loss)
  losses = read_metrics(str(tmp_path)).series("cross_entropy")
  assert np.mean([losses[s] for s in range(10, 13)]) < np.mean([losses[s] for s in range(1, 4)]) - 0.3


def test_readme_table_is_the_calculators():
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import model_stats

  assert model_stats.switch_table() in open(os.path.join(REPO, "README.md")).read(), (
      "README.md's Switch table is stale: python experiments/model_stats.py --switch_table")


def test_calculator_cli_counts_an_encoder_decoder_per_sequence():
  run = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "model_stats.py"),
                        f"--config={REPO}/configs/switch_t5.py:switch-c", "--json"],
                       capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]
  import json

  stats = json.loads(run.stdout.strip().splitlines()[-1])
  sequence = stats["flops_per_sequence"]
  assert (sequence["inputs_length"], sequence["targets_length"]) == (512, 114)
  assert stats["flops_per_token"]["forward"] == pytest.approx(sequence["forward"] / 512)
  # Decoder blocks cache self- and cross-attention keys/values: 2 x 15 x 2 x 32 x 64 x 512 x 2 bytes.
  assert stats["inference"]["kv_cache_bf16"] == 2 * 15 * 2 * 32 * 64 * 512 * 2
