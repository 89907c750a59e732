"""Multi-process training: 2 processes x 4 CPU devices on 127.0.0.1 reproduce a 1-process 8-device run, on a
(data, expert) mesh and on one whose 'expert' axis spans both processes; dry runs report the mesh each builds."""

import os
import socket
import subprocess

import numpy as np
import pytest

from tests.helpers import cpu_env, train_command, train_losses

STEPS = 6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, data_dir, *extra, mesh=(2, 1, 4, 1)):
  data, fsdp, expert, tensor = mesh
  return train_command(
      "switch-cpu", workdir, data_dir, train__num_steps=STEPS, train__batch_size=8, train__seq_len=32,
      model__d_model=32, model__num_layers=2, model__d_ff=64, train__eval_batches=2, train__checkpoint_every=3,
      mesh__data=data, mesh__fsdp=fsdp, mesh__expert=expert, mesh__tensor=tensor,
      moe__jitter_eps=0.01) + list(extra)


def _two_processes(workdir, data_dir, *extra, mesh=(2, 1, 4, 1), timeout=300):
  """Start processes 0 and 1 of a run on 127.0.0.1 (4 CPU devices each); [(returncode, stdout, stderr)]."""
  port = _free_port()
  processes = [
      subprocess.Popen(
          _command(workdir, data_dir, "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", *extra, mesh=mesh),
          env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  return [(p.returncode, *out) for p, out in ((p, p.communicate(timeout=timeout)) for p in processes)]


def _losses(workdir) -> list[float]:
  return list(train_losses(workdir).values())


@pytest.mark.slow  # three training processes: ~1.5 min on 2 cores; .ci/run runs the slow tier
@pytest.mark.parametrize("mesh", [(2, 1, 4, 1), (1, 1, 4, 2)], ids=["experts_within_a_process",
                                                                     "expert_axis_across_processes"])
def test_two_processes_reproduce_the_single_process_losses(tmp_path, mesh):
  """(1, 1, 4, 2): the 'expert' axis runs over devices 0-3 of process 0 and 4-7 of process 1 ('tensor' varies
  fastest), so the MoE all-to-alls cross processes."""
  data_dir = tmp_path / "tfds"
  single = subprocess.run(_command(tmp_path / "single", data_dir, mesh=mesh), env=cpu_env(8), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  for returncode, _, stderr in _two_processes(tmp_path / "multi", data_dir, mesh=mesh):
    assert returncode == 0, stderr[-3000:]

  single_losses, multi_losses = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
  assert len(single_losses) == len(multi_losses) == STEPS
  # Same data, parameters and randomness; only the collectives' summation order may differ.
  np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
  assert sorted(d for d in os.listdir(tmp_path / "multi" / "checkpoints") if d.isdigit()) == ["3", "6"]


def test_dry_run_prints_the_mesh_and_the_command_and_leaves_the_workdir_alone(tmp_path):
  run = subprocess.run(_command(tmp_path / "run", tmp_path / "tfds", "--dry_run", mesh=(0, 2, 2, 2)),
                       env=cpu_env(8), capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[process 0/1 on " in run.stdout
  assert "mesh data=1 fsdp=2 expert=2 tensor=2 (8 devices, 1 process)" in run.stdout
  assert "resolve: mesh.data 0 -> 1" in run.stdout and "--dry_run" in run.stdout
  assert not (tmp_path / "run").exists()


def test_two_process_dry_run_reports_the_expert_axis_across_processes(tmp_path):
  results = _two_processes(tmp_path / "run", tmp_path / "tfds", "--dry_run", mesh=(1, 1, 4, 2), timeout=120)
  for index, (returncode, stdout, stderr) in enumerate(results):
    assert returncode == 0, stderr[-3000:]
    assert f"[process {index}/2 on " in stdout
    assert "expert  size 4    spans 2 processes" in stdout and "tensor  size 2    within each process" in stdout
    assert "4 read by this process" in stdout
  assert not (tmp_path / "run").exists()


def test_a_missing_peer_gives_progress_lines_naming_it_then_a_one_line_timeout(tmp_path):
  """Process 0 of 2 alone: it reports whom it waits for, and gives up after train.startup_timeout_s."""
  port = _free_port()
  run = subprocess.run(
      _command(tmp_path / "run", tmp_path / "tfds", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
               "--num_processes=2", "--process_id=0", "--config.train.startup_timeout_s=8"),
      env=cpu_env(4), capture_output=True, text=True, timeout=120)  # it used to wait 300 s in silence
  assert run.returncode == 1, run.stderr[-3000:]
  assert "process 0: waiting for the other processes of 2 (ids [1]) to connect to 127.0.0.1" in run.stdout
  last = [line for line in run.stderr.strip().splitlines() if line.startswith("start-up failed")]
  assert last and "train.startup_timeout_s=8" in last[0], run.stderr[-3000:]
