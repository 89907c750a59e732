"""What the trainer survives and what it refuses: one section per fault (docs/faults.md has the same table).

Every fault is injected into a real training run (tiny configs). A fault that used to hang runs in a subprocess
with a hard timeout, so a regression fails instead of hanging CI. A refusal must come before anything compiles:
`_forbid_building_the_model` makes building the model an error, so a check that comes too late fails the test.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe_jax import checkpoint, models, train
from tests.helpers import REPO, cpu_env, tiny_config, train_command, train_losses


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _cli(workdir, data_dir, steps, **overrides):
  fields = dict(train__num_steps=steps, train__batch_size=4, train__seq_len=16, model__d_model=16,
                model__num_heads=2, model__head_dim=8, model__num_layers=2, model__d_ff=32, moe__num_experts=4,
                train__checkpoint_every=2, train__eval_batches=1)
  return train_command("switch-cpu", workdir, data_dir, **{**fields, **overrides})


ONE_DEVICE = dict(cpu_env(1), PYTHONPATH=REPO)


def _run_patched(patch: str, args: list[str], **kwargs) -> subprocess.Popen:
  """The CLI `args` in a subprocess that first runs `patch` (the fault), e.g. a save that fails."""
  code = f"import runpy, sys\n{patch}\nsys.argv = {args[1:]!r}\nrunpy.run_path({args[1]!r}, run_name='__main__')"
  return subprocess.Popen([sys.executable, "-c", code], env=ONE_DEVICE, **kwargs)


def _wait_for(predicate, timeout_s: float = 240) -> None:
  deadline = time.monotonic() + timeout_s
  while not predicate():
    if time.monotonic() > deadline:
      raise TimeoutError("the condition was not reached")
    time.sleep(0.05)


# A tqdm progress bar's line (tfds preparing the corpus): its elapsed time '[00:01', or the cursor moves of a bar.
_PROGRESS_BAR = re.compile(r"\[\d+:\d\d|\x1b\[A")


def _error_lines(stderr: str) -> list[str]:
  """stderr without absl's log lines (tfds warns about custom data configurations) and progress bars."""
  return [line for line in stderr.strip().splitlines()
          if line.strip() and not (line[0] in "IWE" and line[1:5].isdigit()) and not _PROGRESS_BAR.search(line)]


def _forbid_building_the_model(monkeypatch):
  def built(*args, **kwargs):
    raise AssertionError("the model was built (and compiled) before the bad input was refused")

  monkeypatch.setattr(models, "build", built)


def _trained_steps(workdir) -> int:
  """Training records in metrics.jsonl so far (the file itself is created at start-up, before the first step)."""
  path = os.path.join(workdir, "metrics.jsonl")
  return open(path).read().count('"kind": "train"') if os.path.exists(path) else 0


def _checkpoint_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


# ----------------------------------------------------------------------------------------------------------
# Killed processes and damaged checkpoints.


@pytest.mark.slow  # three training processes: ~1 min on 2 cores; .ci/run runs the slow tier
def test_kill_9_at_a_random_step_then_restart_reproduces_the_uninterrupted_losses(data_dir, tmp_path):
  import random

  steps = 14
  straight = subprocess.run(_cli(tmp_path / "straight", data_dir, steps, train__log_every=1), env=ONE_DEVICE,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-3000:]

  kill_after = random.Random(7).randint(3, steps - 3)  # fixed seed: a "random" step, reproducibly
  workdir = tmp_path / "killed"
  process = subprocess.Popen(_cli(workdir, data_dir, steps, train__log_every=1), env=ONE_DEVICE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = workdir / "metrics.jsonl"
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

  restarted = subprocess.run(_cli(workdir, data_dir, steps, train__log_every=1), env=ONE_DEVICE,
                             capture_output=True, text=True, timeout=300)
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


@pytest.mark.slow  # 40-70 s: the longest of the default tier
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


# ----------------------------------------------------------------------------------------------------------
# Row 1: the checkpoint directory cannot be written.


@pytest.mark.slow  # 40-70 s: the longest of the default tier
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

  assert _checkpoint_steps(workdir) == [4]
  result = train.train_and_evaluate(config, str(workdir))  # the space is back: resume from step 4
  assert result.status == "completed" and result.step == 8
  chex.assert_trees_all_equal(train_losses(str(workdir)), train_losses(str(tmp_path / "straight")))


# The asynchronous save of step 4 cannot create its directory: what a full disk does in the background.
DISK_FULL_FROM_STEP_4 = """
import errno, os
_makedirs = os.makedirs
def _disk_full(path, *args, **kwargs):
  name = os.path.basename(str(path))
  step = name.split(".")[0]
  if ".orbax-checkpoint-tmp" in name and step.isdigit() and int(step) >= 4:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
  return _makedirs(path, *args, **kwargs)
os.makedirs = _disk_full
"""


@pytest.mark.slow  # 40-70 s: the longest of the default tier
def test_disk_full_during_an_async_save_exits_nonzero_naming_the_path_and_keeps_earlier_checkpoints(
    data_dir, tmp_path):
  workdir = tmp_path / "run"
  process = _run_patched(DISK_FULL_FROM_STEP_4, _cli(workdir, data_dir, 8, train__log_every=1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, stderr = process.communicate(timeout=180)  # it used to hang for ever at exit in orbax's save threads
  assert process.returncode == 1, stderr[-3000:]
  errors = _error_lines(stderr)
  assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]  # one line, not one traceback per thread
  assert f"{workdir}/checkpoints" in errors[0] and "No space left" in errors[0]
  assert _checkpoint_steps(workdir) == [2]
  resumed = subprocess.run(_cli(workdir, data_dir, 8), env=ONE_DEVICE, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from checkpoint at step 2" in resumed.stdout


# The metrics writer's file (metrics.jsonl from the record of step 3) or TensorBoard's event file (from its first
# scalar, after the file's header record) raises ENOSPC: what a full disk does to the writes between checkpoints.
METRICS_DISK_FULL = {
    "metrics.jsonl": """
import builtins, errno
from moe_jax import metrics
class _Full:
  def __init__(self, handle): self._handle = handle
  def __getattr__(self, name): return getattr(self._handle, name)
  def write(self, text):
    if '"step": 3,' in text: raise OSError(errno.ENOSPC, "No space left on device")
    return self._handle.write(text)
def _open(path, mode="r", *args, **kwargs):
  handle = builtins.open(path, mode, *args, **kwargs)
  return _Full(handle) if "a" in mode else handle
metrics.open = _open
""",
    "tensorboard": """
import builtins, errno
from tensorboardX import record_writer
class _Full:
  def __init__(self, handle): self._handle, self._writes = handle, 0
  def __getattr__(self, name): return getattr(self._handle, name)
  def write(self, data):
    self._writes += 1
    if self._writes > 4: raise OSError(errno.ENOSPC, "No space left on device")
    return self._handle.write(data)
record_writer.open_file = lambda path: _Full(builtins.open(path, "wb"))
""",
}


@pytest.mark.slow  # a training process per case: ~15 s each on 2 cores
@pytest.mark.parametrize("written", list(METRICS_DISK_FULL))
def test_a_full_disk_while_writing_metrics_stops_the_run_in_one_line_with_status_1(data_dir, tmp_path, written):
  workdir = tmp_path / "run"
  process = _run_patched(METRICS_DISK_FULL[written], _cli(workdir, data_dir, 6, train__log_every=1),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _, stderr = process.communicate(timeout=180)  # tensorboardX's writer thread used to die and its queue block
  assert process.returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr and _error_lines(stderr) == [
      f"training stopped: metrics: cannot write {workdir}/{written}: No space left on device"], stderr[-3000:]


def test_checkpoint_directory_that_is_a_file_is_refused_before_compiling(data_dir, tmp_path, monkeypatch):
  (tmp_path / "checkpoints").write_text("not a directory")
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=f"workdir: {tmp_path}/checkpoints is a file"):
    train.train_and_evaluate(tiny_config(data_dir, steps=2), str(tmp_path))


# ----------------------------------------------------------------------------------------------------------
# Row 2: a non-finite loss.


def _poison_steps(monkeypatch, bad_steps: set[int]) -> None:
  """Steps in `bad_steps` (1-based) get token ids beyond the vocabulary, which embed as NaN."""
  real = train.make_train_step

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def poisoned(state, batch, step):
      if int(step) + 1 in bad_steps:
        batch = dict(batch, inputs=batch["inputs"] * 0 + 10**6)
      return step_fn(state, batch, step)

    return poisoned

  monkeypatch.setattr(train, "make_train_step", make)


def test_nonfinite_loss_stops_naming_the_step_keeps_the_checkpoint_before_and_says_how_to_go_on(
    data_dir, tmp_path, monkeypatch):
  _poison_steps(monkeypatch, {6})
  config = tiny_config(data_dir, steps=8)
  with pytest.raises(train.NonFiniteLossError, match="at step 6.*Last good checkpoint: step 4.*"
                                                     "skip_nonfinite_batches.*resume_step"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [4]


@pytest.mark.slow  # two or more training runs: over 20 s on 2 cores
def test_resuming_with_skip_nonfinite_batches_discards_the_bad_batch_instead_of_looping_on_it(
    data_dir, tmp_path, monkeypatch):
  _poison_steps(monkeypatch, {6})
  config = tiny_config(data_dir, steps=8)
  with pytest.raises(train.NonFiniteLossError):
    train.train_and_evaluate(config, str(tmp_path))
  config.train.skip_nonfinite_batches = 1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "completed" and result.step == 8 and np.isfinite(result.eval_loss)
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  skipped = {r["step"] for r in records if r.get("skipped")}
  assert skipped == {6}
  assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train" and r["step"] > 6)


@pytest.mark.slow  # two or more training runs: over 20 s on 2 cores
def test_more_nonfinite_batches_than_allowed_stop_the_run_as_diverged(data_dir, tmp_path, monkeypatch):
  _poison_steps(monkeypatch, {3, 5})
  config = tiny_config(data_dir, steps=8)
  config.train.skip_nonfinite_batches = 1
  with pytest.raises(train.NonFiniteLossError, match=r"2 batches gave non-finite losses \(steps \[3, 5\]\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _checkpoint_steps(tmp_path) == [4]  # step 4's state never saw the skipped batch 3's update


@pytest.mark.slow  # two or more training runs: over 20 s on 2 cores
def test_resume_step_restores_an_earlier_checkpoint_and_sets_the_newer_ones_aside(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, steps=8)
  config.train.keep_checkpoints = 3
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))  # checkpoints at 4 and 8
  config.train.resume_step = 4
  config.train.num_steps = 8
  result = train.train_and_evaluate(config, str(workdir))
  assert "resumed from checkpoint at step 4" in capsys.readouterr().out
  assert result.status == "completed" and _checkpoint_steps(workdir) == [4, 8]
  assert [d.split("-")[0] for d in os.listdir(workdir / "checkpoints" / checkpoint.SUPERSEDED_DIR)] == ["8"]
  chex.assert_trees_all_equal(train_losses(str(workdir)), train_losses(str(tmp_path / "straight")))


# ----------------------------------------------------------------------------------------------------------
# Row 3: Adafactor, as the paper-size configs use.


@pytest.mark.slow  # two or more training runs: over 20 s on 2 cores
def test_adafactor_trains_on_an_eight_device_mesh(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=12)
  config.train.optimizer = "adafactor"
  config.train.learning_rate = 3e-2  # Adafactor scales steps by the parameters' RMS, small at init_scale 0.1
  result = train.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert result.status == "completed" and np.isfinite(result.eval_loss)
  assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])


@pytest.mark.slow  # two or more training runs: over 20 s on 2 cores
def test_adafactor_trains_on_one_device(data_dir, tmp_path):
  run = subprocess.run(_cli(tmp_path, data_dir, 4, train__optimizer="adafactor"), env=ONE_DEVICE,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "completed at step 4" in run.stdout


# ----------------------------------------------------------------------------------------------------------
# Rows 4 and 15: signals.


def test_sigint_saves_a_checkpoint_then_exits_like_sigterm(data_dir, tmp_path):
  process = subprocess.Popen(_cli(tmp_path, data_dir, 100000, train__checkpoint_every=0, train__log_every=2),
                             env=ONE_DEVICE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: _trained_steps(tmp_path) >= 2 or process.poll() is not None)
  process.send_signal(signal.SIGINT)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = int(stdout.split("SIGINT: checkpoint at step ")[1].split()[0])
  assert _checkpoint_steps(tmp_path) == [saved] and saved >= 2


SLOW_SAVE = """
import time, orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def _slow_save(self, *args, **kwargs):
  print("saving", flush=True)
  time.sleep(600)
  return _save(self, *args, **kwargs)
ocp.CheckpointManager.save = _slow_save
"""


@pytest.mark.slow  # a CLI run in a subprocess, ~13 s; the default tier keeps the SIGINT save (test_sigint_saves_...)
def test_second_ctrl_c_exits_at_once_during_the_save(data_dir, tmp_path):
  out = tmp_path / "out.txt"
  with open(out, "w") as stdout:
    process = _run_patched(SLOW_SAVE, _cli(tmp_path / "run", data_dir, 100000, train__checkpoint_every=0,
                                           train__log_every=2), stdout=stdout, stderr=subprocess.STDOUT)
    _wait_for(lambda: _trained_steps(tmp_path / "run") >= 2 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _wait_for(lambda: "saving" in out.read_text() or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)  # not the 600 s of the save
  assert process.returncode == 128 + signal.SIGINT, out.read_text()[-3000:]
  assert "second interrupt: exiting now without saving" in out.read_text()


SLOW_START = """
import time, moe_jax.train as train
_prepare = train._prepare
def _slow_prepare(*args, **kwargs):
  print("preparing", flush=True)
  time.sleep(600)
  return _prepare(*args, **kwargs)
train._prepare = _slow_prepare
"""


def test_sigterm_during_start_up_exits_with_a_clean_message(data_dir, tmp_path):
  out = tmp_path / "out.txt"
  with open(out, "w") as stdout:
    process = _run_patched(SLOW_START, _cli(tmp_path / "run", data_dir, 4), stdout=stdout, stderr=subprocess.PIPE,
                           text=True)
    _wait_for(lambda: "preparing" in out.read_text() or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
  assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert _error_lines(stderr) == ["SIGTERM during start-up: stopped before the first step; the workdir's "
                                  "checkpoints are unchanged"]


# ----------------------------------------------------------------------------------------------------------
# Rows 5 and 6: resuming with another config.


def test_resume_with_a_changed_architecture_is_refused_before_anything_is_written(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, steps=4)
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=2)
  written = (tmp_path / "config.json").read_text()
  config.moe.num_experts = 4
  config.model.d_ff = 128
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=r"different run.*model.d_ff: checkpoint 64, config 128; "
                                       r"moe.num_experts: checkpoint 8, config 4$"):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "config.json").read_text() == written
  assert _checkpoint_steps(tmp_path) == [2]


@pytest.mark.parametrize("field, value", [("train.learning_rate", 0.5), ("train.schedule", "constant"),
                                          ("data.validation_fraction", 0.1), ("train.num_steps", 6)])
def test_resume_with_a_changed_schedule_or_data_is_refused_unless_allowed(data_dir, tmp_path, monkeypatch, field,
                                                                          value):
  config = tiny_config(data_dir, steps=4)
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=2)
  section, name = field.split(".")
  config[section][name] = value
  with monkeypatch.context() as patch:
    _forbid_building_the_model(patch)
    with pytest.raises(ValueError, match=f"changed schedule or data.*{field}: checkpoint .*allow_changes=True"):
      train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "resume_log.jsonl").exists()


def test_allowed_changes_are_recorded_in_the_resume_log(data_dir, tmp_path):
  config = tiny_config(data_dir, steps=4)
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=2)
  config.train.learning_rate = 5e-3
  config.train.log_every = 1  # free to change, recorded too
  config.train.allow_changes = True
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "completed"
  with open(tmp_path / "resume_log.jsonl") as f:
    (entry,) = [json.loads(line) for line in f]
  assert entry["resume_step"] == 2
  assert entry["changes"]["train.learning_rate"] == [1e-2, 5e-3]
  assert entry["changes"]["train.log_every"] == [4, 1]


def test_num_steps_below_the_finished_step_says_already_finished_and_writes_nothing(data_dir, tmp_path, capsys,
                                                                                    monkeypatch):
  config = tiny_config(data_dir, steps=4)
  train.train_and_evaluate(config, str(tmp_path))
  metrics = (tmp_path / "metrics.jsonl").read_text()
  config.train.num_steps = 2
  _forbid_building_the_model(monkeypatch)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.status == "already_finished" and result.step == 4
  assert "already finished" in capsys.readouterr().out
  assert (tmp_path / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------------------------------------------------------
# Row 7: two runs in one workdir.

HOLD_THE_LOCK = """
import sys, time
from moe_jax import workdir
lock = workdir.WorkdirLock(sys.argv[1]).__enter__()
print("locked", flush=True)
time.sleep(600)
"""


def test_second_run_in_a_workdir_is_refused_naming_the_first_and_a_killed_run_leaves_no_stale_lock(
    data_dir, tmp_path, monkeypatch):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path)], env=ONE_DEVICE,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with monkeypatch.context() as patch:
      _forbid_building_the_model(patch)
      with pytest.raises(ValueError, match=f"is in use by pid {holder.pid} on host {socket.gethostname()}"):
        train.train_and_evaluate(tiny_config(data_dir, steps=2), str(tmp_path))
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  result = train.train_and_evaluate(tiny_config(data_dir, steps=2), str(tmp_path))
  assert result.status == "completed"


# ----------------------------------------------------------------------------------------------------------
# Rows 8 and 11: data that cannot be read, before anything compiles.


def _text_dir(root, files: dict[str, str]) -> str:
  for name, text in files.items():
    (root / name).write_text(text)
  return str(root)


def _set_up_data(case: str, root, monkeypatch) -> dict:
  texts = {f"doc{i}.txt": f"document {i} " * 50 for i in range(4)}
  if case == "empty text_dir":
    return dict(dataset="text_dir", text_dir=_text_dir(root, {}))
  if case == "glob matching nothing":
    return dict(dataset="text_dir", text_dir=_text_dir(root, texts), text_glob="**/*.md")
  if case == "unreadable file":
    text_dir = _text_dir(root, texts)
    os.chmod(root / "doc2.txt", 0)
    real_open = open

    def refusing_open(path, *args, **kwargs):  # root reads any file: refuse like a permission error would
      if str(path).endswith("doc2.txt"):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))
      return real_open(path, *args, **kwargs)

    monkeypatch.setattr("moe_jax.data.builders.open", refusing_open, raising=False)
    return dict(dataset="text_dir", text_dir=text_dir)
  if case == "unprepared TFDS dataset":
    return dict(dataset="lm1b", data_dir=str(root / "no-tfds-here"))
  assert case == "corpus of empty files"
  return dict(dataset="text_dir", text_dir=_text_dir(root, {name: "" for name in texts}))


@pytest.mark.parametrize("case, message", [
    ("empty text_dir", "data.text_dir=.* has no files matching data.text_glob='\\*\\*/\\*.txt'"),
    ("glob matching nothing", "has no files matching data.text_glob='\\*\\*/\\*.md'"),
    ("unreadable file", "1 of the 4 files matching data.text_glob=.* cannot be read, e.g. \\['doc2.txt'\\]"),
    ("unprepared TFDS dataset", "data.dataset='lm1b' is not prepared"),
    ("corpus of empty files", "the train split has no tokens to train on"),
])
def test_bad_data_is_refused_naming_the_field_before_compiling(data_dir, tmp_path, monkeypatch, case, message):
  (tmp_path / "corpus").mkdir()
  config = tiny_config(data_dir, steps=2)
  config.data.update(_set_up_data(case, tmp_path / "corpus", monkeypatch))
  _forbid_building_the_model(monkeypatch)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_validation_split_of_empty_documents_is_refused_as_no_evaluation_tokens(data_dir, tmp_path, monkeypatch):
  """Training text but a validation split of empty files: it would report eval cross-entropy 0.0000."""
  from moe_jax.data import builders

  names = [f"doc{i:02d}.txt" for i in range(20)]
  held_out = set(builders.split_files(names, 0.2)["validation"])
  text_dir = _text_dir(tmp_path, {n: "" if n in held_out else f"text {n} " * 100 for n in names})
  config = tiny_config(data_dir, steps=2)
  config.data.update(dict(dataset="text_dir", text_dir=text_dir, validation_fraction=0.2))
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match="the validation split has no tokens to evaluate on"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------
# Row 9 and the config boundary of rows 14 and 15: one line naming the argument, from the command line.


@pytest.mark.parametrize("case, overrides, flags, expected", [
    ("unknown config variant", {}, ["--config=" + os.path.join(REPO, "configs/lm.py:switch-huge")],
     "config variant 'switch-huge'"),
    ("missing config file", {}, ["--config=/no/such/config.py"], "--config='/no/such/config.py'"),
    ("coordinator address without a port", {}, ["--distributed", "--coordinator_address=10.0.0.1"],
     "--coordinator_address='10.0.0.1' must be HOST:PORT"),
    ("workdir that is a file", {}, ["--workdir=/etc/hostname"], "workdir: /etc/hostname is a file"),
    ("non-SentencePiece tokenizer file", {"data__tokenizer": "/etc/hostname"}, [],
     "data.tokenizer='/etc/hostname': '/etc/hostname' is not a SentencePiece .model file"),
    ("new option out of range", {"train__skip_nonfinite_batches": "-1"}, [], "train.skip_nonfinite_batches=-1"),
    ("unknown config field", {"moe__top_kk": "2"}, [], "unknown config field 'top_kk'"),
    ("non-integer top_k", {"moe__top_k__k": "2.0"}, [], "moe.top_k.k"),
    ("boolean top_k", {"moe__top_k__k": "True"}, [], "moe.top_k.k"),
])
def test_bad_command_line_is_one_line_naming_the_argument(data_dir, tmp_path, case, overrides, flags, expected):
  args = _cli(tmp_path / "run", data_dir, 1, **overrides)
  replacements = {flag.split("=")[0]: flag for flag in flags}
  args = [replacements.pop(a.split("=")[0], a) for a in args] + list(replacements.values())
  run = subprocess.run(args, env=ONE_DEVICE, capture_output=True, text=True, timeout=120)
  lines = _error_lines(run.stderr)
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and expected in lines[0], run.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Rows 12 and 13: lost metrics, absurd sizes.


@pytest.mark.slow  # two training runs: ~1 min on 2 cores
def test_deleted_metrics_file_gives_a_warning_and_metrics_continue(data_dir, tmp_path, capsys):
  config = tiny_config(data_dir, steps=4)
  train.train_and_evaluate(config, str(tmp_path), stop_at_step=2)
  os.remove(tmp_path / "metrics.jsonl")
  capsys.readouterr()
  result = train.train_and_evaluate(config, str(tmp_path))
  assert "WARNING: " in capsys.readouterr().out
  assert result.status == "completed" and sorted(train_losses(str(tmp_path))) == [3, 4]


def test_absurd_model_size_is_refused_with_the_memory_estimate_before_compiling(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, steps=2)
  config.model.d_model = 10**6
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=r"does not fit: about [\d.]+ GiB per device \(parameters [\d.]+, "
                                       r"gradients .* activations [\d.]+\) but a device has [\d.]+ GiB"):
    train.train_and_evaluate(config, str(tmp_path))


def test_memory_estimate_counts_sharded_experts_once_per_device():
  from moe_jax import config_lib, flops

  model_cfg = config_lib.model_config(tiny_config("/unused"), 259)
  one = flops.memory_estimate(model_cfg, batch_size=8, seq_len=32, optimizer="adamw", data_devices=1,
                              expert_devices=1)
  split = flops.memory_estimate(model_cfg, batch_size=8, seq_len=32, optimizer="adamw", data_devices=2,
                                expert_devices=4)
  counts = flops.param_count(model_cfg)
  assert one.params == 4 * counts.total and one.optimizer == 2 * one.params
  assert split.params < one.params and split.activations == pytest.approx(one.activations / 8)
  assert split.checkpoint == one.checkpoint == 3 * 4 * counts.total
