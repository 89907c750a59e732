"""Reproducibility: the same config and seed on the same machine logs bitwise-identical metrics, Switch included.

Every value of metrics.jsonl is compared exactly except the wall-clock ones (time, tokens/s, MFU). What may
still differ on another machine (results/diagnosis/README.md): the number of CPU threads XLA uses, the CPU
instruction set and the XLA version change the summation order of large float32 contractions; a different
device count or mesh splits the gradient sums differently.
"""

import subprocess

import pytest

from moe_jax import config_lib, train
from moe_jax.metrics import read_metrics
from tests.helpers import cpu_env, tiny_config, train_command

WALL_CLOCK_KEYS = ("time", "tokens_per_s", "mfu")
# Each run compiles its programs itself, as two separate launches would (tests/conftest.py's shared cache off).
pytestmark = pytest.mark.fresh_compile


def logged_values(workdir) -> list[dict]:
  """Every record of metrics.jsonl (train, then eval, by step), without the wall-clock fields."""
  run = read_metrics(str(workdir))
  records = [*run.train.values(), *run.eval.values()]
  return [{k: v for k, v in record.items() if k not in WALL_CLOCK_KEYS} for record in records]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


# Switch runs every layer the dense twin has (its odd blocks are dense), so the dense arm is slow-tier only.
@pytest.mark.parametrize("arm", ["switch", pytest.param("dense", marks=pytest.mark.slow)])
def test_same_config_and_seed_log_identical_metrics(data_dir, tmp_path, arm):
  config = tiny_config(data_dir, steps=6)  # 8 devices, expert-parallel Switch with router jitter
  config.train.eval_every = 3
  if arm == "dense":
    config = config_lib.dense_twin(config)
  for run in ("a", "b"):
    train.train_and_evaluate(config, str(tmp_path / run))
  first, second = logged_values(tmp_path / "a"), logged_values(tmp_path / "b")
  assert [r["kind"] for r in first].count("eval") == 2
  if arm == "switch":
    assert first[0]["moe"][0]["block"] == 1 and "dropped_token_fraction" in first[0]["moe"][0]
  assert first == second


@pytest.mark.slow
def test_switch_cpu_config_logs_identical_metrics_in_separate_processes(data_dir, tmp_path):
  """The shipped Switch config on one device, as `make run` trains it, twice from scratch."""
  for run in ("a", "b"):
    args = train_command("switch-cpu", tmp_path / run, data_dir, train__num_steps=30, train__eval_every=15,
                         train__checkpoint_every=15)
    done = subprocess.run(args, env=cpu_env(1), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
  assert logged_values(tmp_path / "a") == logged_values(tmp_path / "b")
