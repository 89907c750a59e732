"""A process of a 2-process run killed mid-training (docs/faults.md, issue 30): the other one ends with one line
naming the cause and exit status 1, not JAX's fatal abort (SIGABRT, a C++ check failure and a Python thread dump).

A peer (any process but 0): process 0's watch of the peers notices it within train.peer_timeout_s. Process 0,
which hosts JAX's coordination service: JAX aborts the others from C++ at once; their supervisor
(experiments/train.py `_supervise`) turns the abort into the line."""

import signal
import subprocess
import time

import pytest

from tests.helpers import cpu_env
from tests.test_faults import _error_lines
from tests.test_multiprocess import _command, _free_port


@pytest.mark.slow  # two training processes on 2 cores: ~2 min to the first steps
@pytest.mark.parametrize("killed", [1, 0], ids=["a peer", "the coordinator"])
def test_a_process_killed_mid_run_stops_the_other_in_one_line_with_status_1(tmp_path, killed):
  port = _free_port()
  processes = [
      subprocess.Popen(
          _command(tmp_path / "run", tmp_path / "tfds", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", "--config.train.peer_timeout_s=5",
                   "--config.train.num_steps=100000", "--config.train.log_every=1"),
          env=cpu_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  survivor = processes[1 - killed]
  try:
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
      assert time.monotonic() < deadline and all(p.poll() is None for p in processes), "no training steps"
      time.sleep(0.2)
    processes[killed].send_signal(signal.SIGKILL)
    _, stderr = survivor.communicate(timeout=120)  # JAX alone would abort after its heartbeat timeout
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
      process.wait()
  assert survivor.returncode == 1, stderr[-3000:]
  lines = _error_lines(stderr)
  expected = ("training stopped: process 1 stopped responding: no heartbeat for " if killed == 1 else
              "training stopped: JAX's coordination service ended this process (")
  assert lines[-1].startswith(expected), stderr[-3000:]
  assert "Check failure" not in stderr and "Fatal Python error" not in stderr, stderr[-3000:]
