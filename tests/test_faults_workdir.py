"""A run and the workdir it stands in (docs/faults.md, issue 30): a run that refuses leaves the workdir byte for
byte as it was, whatever the refusal; a file the running trainer relies on (the lock, config.json) that vanishes or
changes type mid-run is restored with a warning or stops the run in one line, never silently.

Refusals are checked on a copy of one tiny run stopped at step 2 (every refusal comes before anything is built, so
each case is quick); the mid-run faults are injected into a real short run between two steps.
"""

import fcntl
import hashlib
import json
import os
import shutil

import pytest

from moe_jax import fileio, train, workdir
from tests.helpers import tiny_config, train_losses
from tests.test_faults import _forbid_building_the_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def stopped_run(data_dir, tmp_path_factory):
  """A tiny run of 4 steps stopped at step 2 (a checkpoint at 2, config.json, lock, metrics): resumable."""
  run = str(tmp_path_factory.mktemp("stopped") / "run")
  train.train_and_evaluate(tiny_config(data_dir, steps=4), run, stop_at_step=2)
  return run


def _snapshot(path) -> dict[str, str] | None:
  """Every entry under `path`: relative path -> 'dir' or the sha256 of the file's bytes; None if absent."""
  if not os.path.exists(path):
    return None
  entries = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      entries[os.path.relpath(os.path.join(root, name), path)] = "dir"
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        entries[os.path.relpath(os.path.join(root, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return entries


def _set_processes_in_meta(run: str, step: int, count: int) -> None:
  """Make the checkpoint of `step` look written by `count` processes (one data-iterator state each)."""
  meta_file = os.path.join(run, "checkpoints", str(step), "meta", "metadata")  # orbax's JsonSave
  with open(meta_file) as f:
    meta = json.load(f)
  meta["data_state"] = meta["data_state"] * count
  with open(meta_file, "w") as f:
    json.dump(meta, f)


def _stale_lock(run: str) -> None:
  os.makedirs(run)
  with open(os.path.join(run, "lock"), "w") as f:
    f.write("pid 1 on host elsewhere since 2026-01-01 00:00:00 UTC\n")


# Each case: (how the config or the workdir is changed, the refusal expected). 'fresh' cases start in a workdir
# that does not exist yet (it must not exist after) or that the change makes, the others resume the stopped run.
REFUSALS = {
    "changed architecture": (lambda c, run: c.moe.update(num_experts=4), "different run.*moe.num_experts"),
    "changed schedule": (lambda c, run: c.train.update(learning_rate=0.5), "changed schedule or data"),
    "resume_step not a checkpoint": (lambda c, run: c.train.update(resume_step=3), "train.resume_step=3 is not"),
    "written by another number of processes": (lambda c, run: _set_processes_in_meta(run, 2, 2),
                                               "written by 2 processes"),
    "model too big": (lambda c, run: c.model.update(d_model=10**6), "does not fit"),
    "fresh: bad data, a stale lock of a killed run": (lambda c, run: _stale_lock(run) or c.data.update(
        dataset="text_dir", text_dir=os.path.dirname(run)), "has no files matching"),
    "fresh: bad data": (lambda c, run: c.data.update(dataset="text_dir", text_dir=os.path.dirname(run)),
                        "has no files matching"),
    "fresh: model too big": (lambda c, run: c.model.update(d_model=10**6), "does not fit"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_run_leaves_the_workdir_byte_for_byte_as_it_was(data_dir, stopped_run, tmp_path, monkeypatch,
                                                                   case):
  change, message = REFUSALS[case]
  run = str(tmp_path / "run")
  if not case.startswith("fresh"):
    shutil.copytree(stopped_run, run)
  config = tiny_config(data_dir, steps=4)
  change(config, run)
  before = _snapshot(run)
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, run)
  assert _snapshot(run) == before  # None for a fresh workdir: not even created


def test_an_already_finished_run_leaves_the_workdir_byte_for_byte_as_it_was(data_dir, stopped_run, tmp_path,
                                                                             monkeypatch):
  run = str(tmp_path / "run")
  shutil.copytree(stopped_run, run)
  config = tiny_config(data_dir, steps=1)  # below the checkpoint's step 2
  before = _snapshot(run)
  _forbid_building_the_model(monkeypatch)
  assert train.train_and_evaluate(config, run).status == "already_finished"
  assert _snapshot(run) == before


def test_a_lock_file_removed_by_a_refused_run_is_not_a_lock_two_starts_can_both_take(tmp_path):
  """The refused run removes `lock` under its lock; a process that opened the old file just before locks the file
  at the path, not the removed one, so it and a third process cannot both hold the workdir."""
  run = str(tmp_path / "run")
  refused = workdir.WorkdirLock(run).__enter__()
  stale = open(os.path.join(run, "lock"), "a+")  # opened before the removal, locked after it
  refused.__exit__(ValueError, None, None)
  assert not os.path.exists(run)  # the refused run created the workdir: removed with its lock
  os.makedirs(run)
  with workdir.WorkdirLock(run) as first:
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file: free, and worthless
    with pytest.raises(ValueError, match="is in use by pid"):
      workdir.WorkdirLock(run).__enter__()
    first.commit()
  stale.close()


# ----------------------------------------------------------------------------------------------------------
# Files the running trainer relies on, changed between two steps of a real run.


def _between_steps(monkeypatch, at_step: int, fault) -> list:
  """Run `fault(step)` before step `at_step` (1-based) and every later step; the list collects what it returns."""
  real = train.make_train_step
  seen = []

  def make(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def step_with_fault(state, batch, step):
      if int(step) + 1 >= at_step:
        seen.append(fault(int(step) + 1))
      return step_fn(state, batch, step)

    return step_with_fault

  monkeypatch.setattr(train, "make_train_step", make)
  return seen


def _lock_is_held(run: str) -> bool:
  try:
    workdir.WorkdirLock(run).__enter__()
  except ValueError:
    return True
  raise AssertionError("a second run could take the lock")


def test_a_lock_file_deleted_mid_run_is_locked_again_with_a_warning(data_dir, tmp_path, monkeypatch, capsys):
  run = str(tmp_path / "run")
  config = tiny_config(data_dir, steps=4)
  config.train.log_every = 1
  held = _between_steps(monkeypatch, 2, lambda step: os.remove(os.path.join(run, "lock")) if step == 2
                        else _lock_is_held(run))
  result = train.train_and_evaluate(config, run)
  assert result.status == "completed"
  assert f"WARNING: {run}/lock was deleted or replaced while the run held it; locked again" in capsys.readouterr().out
  assert held[1:] == [True, True]  # steps 3 and 4: a second run would have been refused
  assert sorted(train_losses(run)) == [1, 2, 3, 4]


def test_config_json_deleted_or_edited_mid_run_is_written_again_with_a_warning(data_dir, tmp_path, monkeypatch,
                                                                                capsys):
  run = str(tmp_path / "run")
  config = tiny_config(data_dir, steps=4)
  config.train.log_every = 1
  recorded = []

  def fault(step):
    path = os.path.join(run, "config.json")
    if step == 2:
      recorded.append(open(path).read())
      os.remove(path)
    if step == 3:
      with open(path, "a") as f:
        f.write("edited")

  _between_steps(monkeypatch, 2, fault)
  assert train.train_and_evaluate(config, run).status == "completed"
  out = capsys.readouterr().out
  assert f"WARNING: {run}/config.json was deleted during the run; written again" in out
  assert f"WARNING: {run}/config.json was replaced or edited during the run; written again" in out
  assert open(os.path.join(run, "config.json")).read() == recorded[0]


@pytest.mark.parametrize("entry", ["lock", "config.json"])
def test_a_run_file_turned_into_a_directory_mid_run_stops_the_run_in_one_line(data_dir, tmp_path, monkeypatch,
                                                                              entry):
  run = str(tmp_path / "run")
  config = tiny_config(data_dir, steps=4)
  config.train.log_every = 1

  def fault(step):
    if step == 2:
      os.remove(os.path.join(run, entry))
      os.mkdir(os.path.join(run, entry))

  _between_steps(monkeypatch, 2, fault)
  with pytest.raises(fileio.EnvironmentFailure, match=f"^workdir: {run}/{entry} became a directory") as error:
    train.train_and_evaluate(config, run)
  assert "\n" not in str(error.value)


def test_metrics_jsonl_deleted_or_replaced_mid_run_is_written_again_with_a_warning_and_no_later_record_is_lost(
    data_dir, tmp_path, monkeypatch, capsys):
  run = str(tmp_path / "run")
  path = os.path.join(run, "metrics.jsonl")
  config = tiny_config(data_dir, steps=4)
  config.train.log_every = 1
  replaced = []

  def fault(step):
    if step == 2:
      os.remove(path)
    if step == 4:
      replaced.append(open(path).read())  # what the writer wrote after the deletion
      with open(os.path.join(run, "other.jsonl"), "w"):
        pass
      os.replace(os.path.join(run, "other.jsonl"), path)

  _between_steps(monkeypatch, 2, fault)
  assert train.train_and_evaluate(config, run).status == "completed"
  out = capsys.readouterr().out
  assert out.count(f"WARNING: {path} was deleted or replaced while the run wrote it; later records go to the file "
                   "now at that path") == 2
  after_deletion = [json.loads(line)["step"] for line in replaced[0].splitlines() if '"kind": "train"' in line]
  after_replacement = sorted(train_losses(run))
  assert set(after_deletion) | set(after_replacement) >= {2, 3, 4}  # every record written after step 1 is kept
  assert after_replacement and min(after_replacement) > max(after_deletion)
