"""experiments/plan.py: the training step compiles ahead of time for a mesh from abstract inputs, and the
per-device parameter and optimizer bytes it reports are those the analytical estimate predicts."""

import json
import os
import subprocess
import sys

import pytest

from moe_jax import plan
from moe_jax import config_lib
from tests.helpers import REPO, cpu_env


def tiny_switch():
  config = config_lib.default_config()
  config.model.update(dict(vocab_size=64, d_model=32, num_heads=2, head_dim=8, d_ff=64, num_layers=4,
                           max_seq_len=16))
  config.moe.num_experts = 4
  config.train.update(dict(batch_size=8, seq_len=16))
  return config


# (1, 2, 2, 2) splits parameters over every axis that splits them (fsdp, expert, tensor) in the default tier;
# (2, 2, 2, 1), where 'data' only replicates, in the slow tier.
@pytest.mark.parametrize("sizes", [pytest.param((2, 2, 2, 1), marks=pytest.mark.slow), (1, 2, 2, 2)])
def test_compiled_parameter_and_adam_bytes_per_device_equal_the_analytical_estimate(sizes):
  """Every dimension divides its mesh axes here, so the shards are exact: parameters as flops.memory_estimate
  splits them (fsdp, tensor, expert), AdamW's two moments twice that (plus its step counts)."""
  result = plan.plan(tiny_switch(), sizes)
  xla, analytical = result["xla"], result["analytical"]
  assert xla["params"] == pytest.approx(analytical["params"], rel=1e-9)
  assert xla["optimizer"] == pytest.approx(analytical["optimizer"], rel=1e-3)
  assert 0 < xla["temporaries"] and xla["peak"] >= xla["arguments"] + xla["temporaries"]
  assert all(chip["fits"] for chip in result["fits"].values())


@pytest.mark.slow  # two full compiles (~20 s); the encoder-decoder and CLI plans stay in the default tier
def test_extrapolated_state_bytes_equal_the_full_depth_compile():
  """--extrapolate compiles 2 and 4 blocks (Switch: a [dense, MoE] pattern) and extends to 6: parameter and
  optimizer bytes are per block, so they match compiling all 6."""
  config = tiny_switch()
  config.model.num_layers = 6
  full = plan.plan(config, (2, 2, 2, 1))["xla"]
  extended = plan.plan(config, (2, 2, 2, 1), extrapolate=True)["xla"]
  for key in ("params", "optimizer", "arguments"):
    assert extended[key] == pytest.approx(full[key], rel=1e-9), key


def test_an_encoder_decoder_plans_with_its_span_corruption_batch():
  """Any architecture plans: the encoder-decoder's step compiles with decoder inputs of the span-corruption
  targets length, and its parameter bytes per device are near the analytical estimate's (which, on this mesh,
  counts 512 bytes fewer: as many as the two stacks' relative-position biases, 2 x 32 buckets x 2 heads)."""
  config = tiny_switch()
  config.model.update(dict(architecture="encoder_decoder", positions="relative", num_layers=2, num_decoder_layers=2))
  config.data.objective = "span_corruption"
  result = plan.plan(config, (2, 1, 2, 1))
  assert result["xla"]["params"] == pytest.approx(result["analytical"]["params"], rel=1e-2)
  assert result["xla"]["temporaries"] > 0


@pytest.mark.slow  # two CLI plans in subprocesses, ~26 s; the default tier keeps the in-process plans
def test_cli_plans_less_temporary_memory_with_remat_and_refuses_a_bad_mesh(tmp_path):
  script = os.path.join(REPO, "experiments", "plan.py")
  args = [sys.executable, script, f"--config={REPO}/configs/lm.py:switch-cpu", "--config.model.num_layers=4",
          "--config.model.d_model=32", "--config.model.d_ff=64", "--config.train.batch_size=8",
          "--config.train.seq_len=128"]
  results = {}
  for remat in ("none", "full"):
    ran = subprocess.run(args + ["--mesh=2,1,2,1", "--json", f"--config.model.remat={remat}"], env=cpu_env(1),
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    results[remat] = json.loads(ran.stdout)
  assert results["none"]["devices"] == 4
  assert results["none"]["mesh"] == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 1}
  # Under the memory-minimising schedule plan.py asks of XLA:CPU, recomputing blocks keeps fewer bytes.
  assert results["full"]["xla"]["temporaries"] < results["none"]["xla"]["temporaries"]
  bad = subprocess.run(args + ["--mesh=2,2"], env=cpu_env(1), capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "--mesh='2,2' must be four integers" in bad.stderr
