"""Faults a pod or cluster run meets: kill -9, a corrupted checkpoint, a full disk. No data may be lost."""

import errno
import os
import random
import signal
import subprocess
import time

import chex
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoint, train
from tests.helpers import cpu_env, tiny_config, train_command, train_losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cli(workdir, data_dir, steps):
  return train_command("switch-cpu", workdir, data_dir, train__num_steps=steps, train__batch_size=4,
                       train__seq_len=16, model__d_model=16, model__num_heads=2, model__head_dim=8,
                       model__num_layers=2, model__d_ff=32, moe__num_experts=4, train__checkpoint_every=2,
                       train__eval_batches=1)


ONE_DEVICE = cpu_env(1)


@pytest.mark.slow  # three training processes: ~1 min on 2 cores; .ci/run runs the slow tier
def test_kill_9_at_a_random_step_then_restart_reproduces_the_uninterrupted_losses(data_dir, tmp_path):
  steps = 14
  straight = subprocess.run(_cli(tmp_path / "straight", data_dir, steps), env=ONE_DEVICE, capture_output=True,
                            text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]

  kill_after = random.Random(7).randint(3, steps - 3)  # fixed seed: a "random" step, reproducibly
  workdir = tmp_path / "killed"
  process = subprocess.Popen(_cli(workdir, data_dir, steps), env=ONE_DEVICE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

  restarted = subprocess.run(_cli(workdir, data_dir, steps), env=ONE_DEVICE, capture_output=True, text=True,
                             timeout=300)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "resumed from checkpoint at step" in restarted.stdout
  chex.assert_trees_all_equal(train_losses(str(workdir)), train_losses(str(tmp_path / "straight")))


def _corrupt(step_dir: str) -> None:
  """Truncate every data file of the checkpoint's array tree to half its size."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 64:
        with open(path, "r+b") as f:
          f.truncate(size // 2)


def test_corrupted_latest_checkpoint_is_reported_kept_and_the_previous_one_used(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, steps=8)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir), stop_at_step=6)  # checkpoints at 4 and 6
  checkpoints = workdir / "checkpoints"
  _corrupt(str(checkpoints / "6"))
  capsys.readouterr()

  result = train.train_and_evaluate(config, str(workdir))
  out = capsys.readouterr().out
  assert "checkpoint step 6 is corrupt" in out and "resumed from checkpoint at step 4" in out
  assert result.status == "completed" and result.step == 8
  quarantined = os.listdir(checkpoints / checkpoint.CORRUPT_DIR)
  assert len(quarantined) == 1 and quarantined[0].startswith("6-")  # moved aside, never deleted
  chex.assert_trees_all_equal(train_losses(str(workdir)), train_losses(str(tmp_path / "straight")))


def test_failed_save_is_reported_and_leaves_the_previous_checkpoint_intact(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, steps=8)
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = tmp_path / "run"
  real_save = ocp.CheckpointManager.save
  calls = []

  def save_until_the_disk_fills(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_fills)
  with pytest.raises(checkpoint.CheckpointError, match="step 8.*No space left on device"):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()

  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4]
  result = train.train_and_evaluate(config, str(workdir))  # the space is back: resume from step 4
  assert result.status == "completed" and result.step == 8
  chex.assert_trees_all_equal(train_losses(str(workdir)), train_losses(str(tmp_path / "straight")))
