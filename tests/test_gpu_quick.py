"""The quick GPU sweep script, at toy size on CPU: three runs, results like the CPU sweep's, commit recorded."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, cpu_env


@pytest.mark.slow  # three tiny training runs in a subprocess: ~1.5 min on 2 cores
def test_gpu_quick_tiny_trains_dense_and_two_switch_runs_and_writes_results(tmp_path):
  args = [sys.executable, os.path.join(REPO, "experiments", "gpu_quick.py"), "--size=gpu-quick-tiny",
          f"--workdir_root={tmp_path / 'work'}", f"--results_root={tmp_path / 'results'}",
          f"--data_dir={tmp_path / 'tfds'}"]
  done = subprocess.run(args, env=cpu_env(1), capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "of an epoch" in done.stdout and "budget" in done.stdout
  with open(tmp_path / "results" / "scaling-gpu-quick-tiny" / "summary.json") as f:
    summary = json.load(f)
  rows = {row["run"]: row for row in summary["runs"]}
  assert sorted(rows) == ["dense-s0", "switch-e16-s0", "switch-e8-s0"]
  assert [rows[name]["num_experts"] for name in ("dense-s0", "switch-e8-s0", "switch-e16-s0")] == [0, 8, 16]
  assert all(row["commit"] and row["tokens_per_s"] > 0 for row in rows.values())
  assert os.path.exists(tmp_path / "results" / "scaling-gpu-quick-tiny" / "curves.json")
