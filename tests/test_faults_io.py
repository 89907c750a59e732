"""What the files around a run survive (docs/faults.md, issue 30): results written whole or not at all, torn
metrics lines, sweeps that survive their own failures, data sets that stay disjoint and intact, workdir entries
of the wrong type.

Faults are injected where they happen: a write that raises ENOSPC half-way (no test needs a real full disk), a
torn line left in metrics.jsonl, a symlink loop in text_dir, a prepared data set damaged on disk, a second
process holding a sweep's lock. Sweep tests train through a stand-in for `train.train_and_evaluate` that writes
what a finished run writes, except where the real trainer's refusal is the point.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from configs.sweeps import common
from moe_jax import fileio, train, workdir
from moe_jax import metrics as metrics_lib
from moe_jax import sweep as sweep_lib
from moe_jax.data import builders, pipeline
from tests.helpers import REPO, cpu_env, tiny_config
from tests.test_faults import DISK_FULL_FROM_STEP_4, _error_lines, _forbid_building_the_model

# ----------------------------------------------------------------------------------------------------------
# Helpers: a write that fills the disk half-way, a finished run without training, a sweep of two runs.


class _FullDisk:
  """A file whose write stores half the text, then raises ENOSPC: what a disk that fills up mid-write does."""

  def __init__(self, handle):
    self._handle = handle

  def write(self, text):
    self._handle.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")

  def __getattr__(self, name):
    return getattr(self._handle, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._handle.close()


def _fill_the_disk(monkeypatch):
  real_fdopen = os.fdopen
  monkeypatch.setattr(fileio.os, "fdopen", lambda *args, **kwargs: _FullDisk(real_fdopen(*args, **kwargs)))


def _record(step, kind="train", loss=3.0):
  return {"step": step, "kind": kind, "time": 0.0, "loss": loss, "cross_entropy": loss, "load_balancing_loss": 1.0,
          "tokens_per_s": 100.0}


def _write_metrics(run_dir, steps=(2, 4)):
  """A trained run's metrics.jsonl: a train and an eval record per step."""
  os.makedirs(run_dir, exist_ok=True)
  lines = [json.dumps(_record(s, kind, 4.0 - s / 4)) for s in steps for kind in ("train", "eval")]
  with open(os.path.join(run_dir, metrics_lib.METRICS_FILE), "w") as f:
    f.write("\n".join(lines) + "\n")


def _write_finished_run(run_dir, steps=(2, 4), status="completed", wall_time_s=10.0):
  """The files a run finished by the sweep leaves: metrics.jsonl and result.json."""
  _write_metrics(run_dir, steps)
  fileio.write_json(os.path.join(run_dir, sweep_lib.RESULT_FILE),
                    {"status": status, "step": steps[-1], "eval_loss": 3.0, "wall_time_s": wall_time_s})


def _sweep(*names, overrides=None):
  sweep = common.new_sweep("unit", "cpu")
  for name in names:
    common.add_run(sweep, name, group="dense", base="dense", seed=0, overrides=(overrides or {}).get(name))
  return sweep


def _stand_in_trainer(monkeypatch, statuses=None, calls=None):
  """train.train_and_evaluate replaced: writes a finished run's metrics and returns the next status of
  `statuses` (default 'completed'), each invocation taking wall_time_s 5."""
  statuses = list(statuses or [])

  def trained(config, run_dir):
    if calls is not None:
      calls.append(run_dir)
    _write_metrics(run_dir)
    status = statuses.pop(0) if statuses else "completed"
    return train.TrainResult(status=status, step=4, eval_loss=3.0, wall_time_s=5.0, workdir=run_dir)

  monkeypatch.setattr(train, "train_and_evaluate", trained)


# ----------------------------------------------------------------------------------------------------------
# Item 1: results written whole or not at all.


def test_a_result_write_that_fills_the_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / "curves.json"
  fileio.write_json(path, {"committed": [1, 2, 3]})
  _fill_the_disk(monkeypatch)
  with pytest.raises(fileio.EnvironmentFailure, match=f"cannot write {path}: No space left on device; the "
                                                      "previous version"):
    fileio.write_json(path, {"new": list(range(1000))})
  assert json.loads(path.read_text()) == {"committed": [1, 2, 3]}
  assert os.listdir(tmp_path) == ["curves.json"]


def test_aggregating_on_a_full_disk_keeps_the_committed_summaries_whole(tmp_path, monkeypatch):
  sweep = _sweep("dense-s0")
  workdirs, results = tmp_path / "work", tmp_path / "results"
  _write_finished_run(sweep_lib.run_workdir(str(workdirs), sweep, sweep.runs[0]))
  sweep_lib.aggregate(sweep, common.build_config, str(workdirs), str(results))
  committed = {name: (results / "unit-cpu" / name).read_bytes() for name in ("summary.json", "curves.json")}
  _fill_the_disk(monkeypatch)
  with pytest.raises(fileio.EnvironmentFailure, match="summary.json: No space left on device"):
    sweep_lib.aggregate(sweep, common.build_config, str(workdirs), str(results))
  assert {name: (results / "unit-cpu" / name).read_bytes() for name in committed} == committed


# ----------------------------------------------------------------------------------------------------------
# Item 1: metrics.jsonl, torn, deleted, replaced, full.


def test_a_torn_last_line_is_skipped_and_reported_and_the_next_writer_starts_a_fresh_line(tmp_path, capsys):
  whole = json.dumps(_record(1)) + "\n" + json.dumps(_record(2)) + "\n"
  (tmp_path / "metrics.jsonl").write_text(whole + json.dumps(_record(3))[:25])  # a stop mid-record
  assert metrics_lib.read_metrics(str(tmp_path)).damaged_lines == (3,)
  assert "skipped 1 damaged line(s) [3]" in capsys.readouterr().err

  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 2.5})
  writer.close()
  assert "cut short" in capsys.readouterr().out
  run = metrics_lib.read_metrics(str(tmp_path))
  assert sorted(run.train) == [1, 2, 3] and run.train[3]["loss"] == 2.5 and run.damaged_lines == (3,)


def test_a_line_that_older_code_appended_to_a_torn_record_does_not_break_aggregation(tmp_path, capsys):
  sweep = _sweep("dense-s0")
  run_dir = sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[0])
  _write_finished_run(run_dir, steps=(2, 4, 6))
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  lines[2] = lines[2][:20] + lines[3]  # step 4's train record cut short, step 4's eval record appended to it
  del lines[3]
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.write("\n".join(lines) + "\n")
  (row,) = sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert row["steps"] == 6 and "damaged line(s) [3]" in capsys.readouterr().err


def test_a_metrics_file_deleted_or_replaced_mid_run_is_recreated_with_a_warning(tmp_path, capsys):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  writer.write(1, "train", {"loss": 3.0})
  os.remove(tmp_path / "metrics.jsonl")
  writer.write(2, "train", {"loss": 2.0})
  assert "was deleted or replaced" in capsys.readouterr().out
  (tmp_path / "other.jsonl").write_text(json.dumps(_record(1)) + "\n")
  os.replace(tmp_path / "other.jsonl", tmp_path / "metrics.jsonl")
  writer.write(3, "train", {"loss": 1.0})
  assert "was deleted or replaced" in capsys.readouterr().out
  writer.close()
  assert sorted(metrics_lib.read_metrics(str(tmp_path)).train) == [1, 3]  # the replacement's record, then ours


def test_a_metrics_file_turned_into_a_directory_or_a_full_disk_stops_in_one_line(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path))
  real = writer._jsonl
  writer._jsonl = _FullDisk(real)
  with pytest.raises(fileio.EnvironmentFailure, match=f"^metrics: cannot write {tmp_path}/metrics.jsonl: No "
                                                      "space left on device$"):
    writer.write(1, "train", {"loss": 3.0})
  writer._jsonl = real
  os.remove(tmp_path / "metrics.jsonl")
  os.mkdir(tmp_path / "metrics.jsonl")
  with pytest.raises(fileio.EnvironmentFailure, match="metrics.jsonl is a directory, not a file"):
    writer.write(2, "train", {"loss": 3.0})
  writer.close()


# ----------------------------------------------------------------------------------------------------------
# Item 5: sweeps that survive their own failures.


def test_a_cut_short_result_json_counts_as_unfinished_and_the_rerun_completes_it(tmp_path, monkeypatch, capsys):
  sweep = _sweep("dense-s0")
  run_dir = sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[0])
  _write_finished_run(run_dir)
  with open(os.path.join(run_dir, "result.json"), "w") as f:
    f.write('{"status": "compl')  # written in place by older code when the disk filled
  assert not sweep_lib.is_finished(run_dir)
  assert "result.json is not valid JSON" in capsys.readouterr().err
  _stand_in_trainer(monkeypatch, statuses=["already_finished"])  # the trainer finds the checkpoint finished
  assert sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "work")) == {}
  assert sweep_lib.run_status(run_dir) == "completed"
  (row,) = sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert row["status"] == "completed"


def test_the_summary_wall_time_adds_up_every_invocation_of_a_run(tmp_path, monkeypatch):
  sweep = _sweep("dense-s0")
  _stand_in_trainer(monkeypatch, statuses=["preempted", "completed"])
  for _ in range(2):
    sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "work"))
  result = sweep_lib.read_result(sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[0]))
  assert [i["status"] for i in result["invocations"]] == ["preempted", "completed"]
  (row,) = sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert row["wall_time_s"] == 10.0


def test_a_run_with_an_invalid_config_is_reported_in_one_line_and_the_other_runs_go_on(tmp_path, monkeypatch,
                                                                                        capsys):
  sweep = _sweep("bad-s0", "good-s0", overrides={"bad-s0": {"mesh.data": 8, "moe.top_k.k": 0}})
  real_trainer, trained = train.train_and_evaluate, []
  _stand_in_trainer(monkeypatch, calls=trained)
  stand_in = train.train_and_evaluate
  monkeypatch.setattr(train, "train_and_evaluate",  # the bad run meets the real trainer's validation
                      lambda config, run_dir: (real_trainer if "bad" in run_dir else stand_in)(config, run_dir))
  refused = sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "work"))
  assert list(refused) == ["bad-s0"] and "moe.top_k.k" in refused["bad-s0"]
  assert [line for line in capsys.readouterr().out.splitlines() if "refused" in line] == [
      f"  bad-s0 refused: {refused['bad-s0']}"]
  assert [os.path.basename(d) for d in trained] == ["good-s0"]
  assert not os.path.exists(os.path.join(tmp_path, "work", "unit-cpu", "bad-s0", "result.json"))


def test_a_full_disk_during_a_sweep_stops_it_in_one_line(tmp_path, monkeypatch):
  sweep = _sweep("a-s0", "b-s0")
  calls = []
  _stand_in_trainer(monkeypatch, calls=calls)
  _fill_the_disk(monkeypatch)  # result.json of the first run cannot be written
  with pytest.raises(fileio.EnvironmentFailure, match="a-s0/result.json: No space left on device"):
    sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "work"))
  assert len(calls) == 1  # stopped there, rather than failing the same way on every later run


def test_a_finished_run_whose_metrics_are_missing_is_listed_as_incomplete_in_one_line(tmp_path, capsys):
  sweep = _sweep("dense-s0", "gone-s0")
  for run in sweep.runs:
    _write_finished_run(sweep_lib.run_workdir(str(tmp_path / "work"), sweep, run))
  os.remove(os.path.join(sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[1]), "metrics.jsonl"))
  rows = sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert [row["run"] for row in rows] == ["dense-s0"]
  (line,) = capsys.readouterr().err.strip().splitlines()
  assert line.startswith("WARNING: run gone-s0 finished but its metrics.jsonl cannot be read")
  summary = json.loads((tmp_path / "results" / "unit-cpu" / "summary.json").read_text())
  assert [row["run"] for row in summary["incomplete"]] == ["gone-s0"]

  _write_metrics(sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[1]))  # aggregated once whole,
  sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  os.remove(os.path.join(sweep_lib.run_workdir(str(tmp_path / "work"), sweep, sweep.runs[1]), "metrics.jsonl"))
  rows = sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert [row["run"] for row in rows] == ["dense-s0", "gone-s0"]  # then lost: its committed row stays
  assert "its committed row is kept" in capsys.readouterr().err


def test_damaged_committed_summaries_are_refused_not_overwritten(tmp_path):
  sweep = _sweep("dense-s0")
  (tmp_path / "results" / "unit-cpu").mkdir(parents=True)
  (tmp_path / "results" / "unit-cpu" / "summary.json").write_text('{"sweep": "unit-cpu", "ru')
  (tmp_path / "results" / "unit-cpu" / "curves.json").write_text("{}")
  with pytest.raises(ValueError, match="summary.json is not valid JSON.*git checkout"):
    sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "results"))
  assert (tmp_path / "results" / "unit-cpu" / "summary.json").read_text() == '{"sweep": "unit-cpu", "ru'


HOLD_THE_SWEEP = """
import sys
from configs.sweeps import common
from moe_jax import sweep as sweep_lib
sweep = common.new_sweep("unit", "cpu")
for name in sys.argv[2:]:
  common.add_run(sweep, name, group="dense", base="dense", seed=0)
with sweep_lib._lock_runs(sys.argv[1], sweep, list(sweep.runs)):
  print("locked", flush=True)
  sys.stdin.read()
"""


def test_a_second_sweep_on_the_same_runs_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path, monkeypatch):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_SWEEP, str(tmp_path), "a-s0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(cpu_env(1), PYTHONPATH=REPO))
  calls = []
  _stand_in_trainer(monkeypatch, calls=calls)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ValueError, match=f"run a-s0 of sweep unit-cpu under --workdir_root={tmp_path} is in use "
                                         f"by pid {holder.pid} on host"):
      sweep_lib.run_sweep(_sweep("a-s0", "b-s0"), common.build_config, str(tmp_path))
    assert calls == []  # refused before any run
    sweep_lib.run_sweep(_sweep("a-s0", "b-s0"), common.build_config, str(tmp_path), only=("b-s0",))
    assert len(calls) == 1  # another run of the sweep (a cluster's --only command) is not blocked
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  sweep_lib.run_sweep(_sweep("a-s0", "b-s0"), common.build_config, str(tmp_path))
  assert len(calls) == 2


def _sweep_config_file(tmp_path, overrides: dict) -> str:
  """A sweep config file of one tiny run, for the command line."""
  path = tmp_path / "tiny_sweep.py"
  path.write_text(f"""
from configs.sweeps import common
def get_config(arg="cpu"):
  sweep = common.new_sweep("tiny", "cpu")
  common.add_run(sweep, "dense-s0", group="dense", base="dense", seed=0, overrides={overrides!r})
  return sweep
""")
  return f"{path}:cpu"


def test_the_sweep_command_line_reports_a_refused_run_in_one_line_with_status_2(tmp_path):
  sweep_arg = _sweep_config_file(tmp_path, {"moe.top_k.k": 0})
  run = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "sweep.py"), f"--sweep={sweep_arg}",
                        f"--workdir_root={tmp_path}/work", f"--results_root={tmp_path}/results"],
                       env=dict(cpu_env(1), PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  lines = _error_lines(run.stderr)
  assert run.returncode == 2, run.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("sweep refused: 1 run(s) refused: dense-s0:") and "moe.top_k.k" in \
      lines[0], run.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Item 4: data integrity.


def _corpus(root, count=20) -> str:
  root.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    (root / f"doc{i:02d}.txt").write_text(f"document {i} " * 40)
  return str(root)


def test_a_symlink_loop_in_text_dir_is_walked_once_and_the_splits_stay_disjoint(tmp_path):
  text_dir = _corpus(tmp_path / "corpus")
  (tmp_path / "corpus" / "sub").mkdir()
  os.symlink("..", tmp_path / "corpus" / "sub" / "loop")  # sub/loop/sub/loop/... the whole corpus again
  os.symlink(tmp_path / "corpus" / "doc00.txt", tmp_path / "corpus" / "sub" / "alias.txt")
  config = builders.text_dir_config(text_dir, "**/*.txt", validation_fraction=0.3)
  assert len(config.relative_paths) == 20
  data_cfg = dict(dataset="text_dir", text_dir=text_dir, data_dir=str(tmp_path / "tfds"), validation_fraction=0.3)
  texts = {split: [r["text"] for r in pipeline.document_source(data_cfg, split)[0]]
           for split in ("train", "validation")}
  assert len(texts["train"]) + len(texts["validation"]) == 20
  assert not set(texts["train"]) & set(texts["validation"])


def test_files_with_the_same_content_are_one_document_in_one_split(tmp_path):
  text_dir = _corpus(tmp_path / "corpus")
  for i in range(20):  # a copy of every file under another name: by path, half would land in both splits
    (tmp_path / "corpus" / f"copy{i:02d}.txt").write_text(f"document {i} " * 40)
  config = builders.text_dir_config(text_dir, "**/*.txt", validation_fraction=0.5)
  assert config.relative_paths == tuple(f"copy{i:02d}.txt" for i in range(20))  # the first path of each content
  builders.check_disjoint(config, builders.split_files(config.relative_paths, 0.5))
  leaky = builders.FilesConfig(name="leaky", root=text_dir, relative_paths=("doc00.txt", "doc01.txt"),
                               content_hashes=("same", "same"))
  with pytest.raises(ValueError, match="splits of .* share 1 document"):  # the check a preparation makes
    builders.check_disjoint(leaky, {"train": ["doc00.txt"], "validation": ["doc01.txt"]})


def test_the_walk_matches_what_glob_matches_where_there_is_no_loop(tmp_path):
  import glob

  for rel in ["a.txt", "b.md", ".hidden.txt", "x/c.txt", "x/.h/d.txt", "x/y/e1.txt", "z/f2.txt", "[a].txt"]:
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(rel)
  files = builders.walk_files(str(tmp_path))
  for pattern in ["**/*.txt", "*.txt", "x/**/*.txt", "**/?1.txt", "**/[!e]*.txt", "**", "**/.*", "[a].txt"]:
    expected = sorted(p for p in glob.glob(pattern, root_dir=tmp_path, recursive=True) if (tmp_path / p).is_file())
    assert [p for p in files if builders._glob_regex(pattern).fullmatch(p)] == expected, pattern


def test_a_file_too_large_to_prepare_in_memory_is_refused_with_its_size_before_compiling(tmp_path, monkeypatch):
  text_dir = _corpus(tmp_path / "corpus", count=3)
  with open(tmp_path / "corpus" / "huge.txt", "wb") as f:  # sparse: no disk used, nothing read
    f.truncate(builders.MAX_FILE_BYTES + 2**20)
  config = tiny_config(str(tmp_path / "tfds"), steps=2)
  config.data.update(dict(dataset="text_dir", text_dir=text_dir))
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=r"1 file\(s\) over 256 MiB, e.g. 'huge.txt' \(257.0 MiB\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_damaged_prepared_data_set_is_detected_and_prepared_again(tmp_path, capsys):
  files = builders.text_dir_config(_corpus(tmp_path / "corpus"), "**/*.txt", 0.3)
  builder = builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "tfds"))
  expected = sorted(r["text"] for r in builder.as_data_source(split="train"))
  record = next(name for name in os.listdir(builder.data_dir) if "train.array_record" in name)
  with open(os.path.join(builder.data_dir, record), "r+b") as f:  # a bit flipped on disk
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 0xFF]))
  builder = builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "tfds"))
  assert "is damaged (1 of its files are missing or changed" in capsys.readouterr().err
  assert sorted(r["text"] for r in builder.as_data_source(split="train")) == expected
  builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "tfds"))
  assert "damaged" not in capsys.readouterr().err  # prepared again and recorded: intact from now on


def test_an_edited_corpus_file_is_a_new_data_set_prepared_again_with_the_new_text(tmp_path):
  corpus = _corpus(tmp_path / "corpus")
  before = builders.text_dir_config(corpus, "**/*.txt", 0.3)
  builder = builders.prepare(builders.TextDirBuilder, before, str(tmp_path / "tfds"))
  old_texts = {r["text"] for split in ("train", "validation") for r in builder.as_data_source(split=split)}
  with open(os.path.join(corpus, "doc07.txt"), "r+") as f:  # edited in place, same size: only its content says
    f.write("DOCUMENT")
  after = builders.text_dir_config(corpus, "**/*.txt", 0.3)
  assert after.name != before.name  # the config name fingerprints every file's sha256
  builder = builders.prepare(builders.TextDirBuilder, after, str(tmp_path / "tfds"))
  new_texts = {r["text"] for split in ("train", "validation") for r in builder.as_data_source(split=split)}
  edited = ("DOCUMENT" + ("document 7 " * 40)[8:]).encode()
  assert new_texts - old_texts == {edited} and len(new_texts) == len(old_texts)


# The trainer's data_dir a file (bad input: exit 2) or full while preparing (the machine: exit 1).
DATA_DIR_FULL = """
import errno
from moe_jax.data import builders
def _disk_full(self, *args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")
builders.TextDirBuilder.download_and_prepare = _disk_full
"""


# Each a subprocess (~6 s); the full data_dir in the slow tier: the default tier checks it in-process (below).
@pytest.mark.parametrize("case, status", [("a file", 2), pytest.param("full", 1, marks=pytest.mark.slow)])
def test_the_train_command_stops_on_an_unusable_or_full_data_dir_in_one_line_naming_it(tmp_path, case, status):
  (tmp_path / "a-file").write_text("")
  data_dir = tmp_path / "a-file" / "tfds" if case == "a file" else tmp_path / "tfds"
  args = [os.path.join(REPO, "experiments", "train.py"), f"--config={REPO}/configs/lm.py:switch-cpu",
          f"--workdir={tmp_path / 'run'}", "--config.data.dataset=text_dir",
          f"--config.data.text_dir={_corpus(tmp_path / 'corpus')}", f"--config.data.data_dir={data_dir}"]
  patch = DATA_DIR_FULL if case == "full" else ""
  code = f"import runpy, sys\n{patch}\nsys.argv = {args!r}\nrunpy.run_path({args[0]!r}, run_name='__main__')"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(cpu_env(1), PYTHONPATH=REPO))
  assert run.returncode == status, run.stderr[-3000:]
  errors = _error_lines(run.stderr)
  assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert f"data.data_dir='{data_dir}'" in errors[0]
  expected = "cannot be used for preparing" if case == "a file" else "No space left on device while preparing"
  assert expected in errors[0]


def test_an_unusable_data_dir_is_refused_naming_the_field_and_a_full_one_is_an_environment_failure(
    tmp_path, monkeypatch):
  files = builders.text_dir_config(_corpus(tmp_path / "corpus"), "**/*.txt", 0.3)
  (tmp_path / "a-file").write_text("")
  with pytest.raises(ValueError, match=f"data.data_dir='{tmp_path}/a-file/tfds' cannot be used for preparing"):
    builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "a-file" / "tfds"))

  def read_only(path):  # what opening the lock file does on a read-only mount (root ignores chmod)
    raise OSError(errno.EROFS, "Read-only file system", path)

  with monkeypatch.context() as patch:
    patch.setattr(builders, "_file_lock", read_only)
    with pytest.raises(ValueError, match="cannot be used for preparing .*Read-only file system"):
      builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "shared"))
  builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "shared"))  # prepared while it was writable,
  with monkeypatch.context() as patch:  # then read from the read-only mount as it is
    patch.setattr(builders, "_file_lock", read_only)
    assert builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "shared")).is_prepared()

  def disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(builders.TextDirBuilder, "download_and_prepare", disk_full)
  with pytest.raises(fileio.EnvironmentFailure, match=f"^data.data_dir='{tmp_path}/tfds': No space left on device "
                                                      "while preparing moe_jax_text_dir/"):
    builders.prepare(builders.TextDirBuilder, files, str(tmp_path / "tfds"))


# ----------------------------------------------------------------------------------------------------------
# Items 3 and 7: every path a workdir holds, of the wrong type; an empty --workdir.


def _wrong_type(path: str, wanted: str, case: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)  # a nested entry's folder (checkpoints/corrupt)
  if case == "wrong type":
    if wanted == workdir.FILE:
      os.mkdir(path)
    else:
      open(path, "w").close()
    return f"is a {'directory' if wanted == workdir.FILE else 'file'}, not a {wanted}"
  if case == "symlink loop":
    os.symlink(os.path.basename(path), path)
    return "is a symlink loop"
  os.symlink("/no/such/target", path)
  return "is a dangling symlink"


# Every path a workdir holds: its entries, nested ones included, and a saved checkpoint step's directory.
EVERY_PATH = {**workdir.ENTRIES, "checkpoints/2": workdir.DIRECTORY}


def test_the_workdir_entries_name_the_folders_the_checkpointer_and_an_import_write():
  from moe_jax import checkpoint
  from moe_jax.interop import transfer

  assert {f"checkpoints/{checkpoint.CORRUPT_DIR}", f"checkpoints/{checkpoint.SUPERSEDED_DIR}",
          transfer.TOKENIZER_DIR} <= set(workdir.ENTRIES)


@pytest.mark.parametrize("case", ["wrong type", "symlink loop", "dangling symlink"])
@pytest.mark.parametrize("entry", sorted(EVERY_PATH))
def test_every_workdir_entry_that_cannot_be_used_is_refused_naming_its_path(tmp_path, entry, case):
  expected = _wrong_type(str(tmp_path / entry), EVERY_PATH[entry], case)
  with pytest.raises(ValueError, match=f"^workdir: {tmp_path}/{entry} {expected}"):
    workdir.check_workdir(str(tmp_path))


@pytest.mark.parametrize("entry", sorted(set(EVERY_PATH) - set(workdir.READ_ONLY_ENTRIES)))
def test_every_workdir_entry_the_run_writes_is_refused_when_it_cannot_be_written(tmp_path, monkeypatch, entry):
  path = str(tmp_path / entry)
  os.makedirs(path if EVERY_PATH[entry] == workdir.DIRECTORY else os.path.dirname(path), exist_ok=True)
  if EVERY_PATH[entry] == workdir.FILE:
    open(path, "w").close()
  access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (p == path and mode & os.W_OK))
  with pytest.raises(ValueError, match=f"^workdir: {path} is not writable"):  # root may write anything: patched
    workdir.check_workdir(str(tmp_path))


def test_a_read_only_tokenizer_of_an_imported_run_is_fine(tmp_path, monkeypatch):
  os.mkdir(tmp_path / "tokenizer")
  access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not (p.endswith("tokenizer") and
                                                                              mode & os.W_OK))
  assert workdir.check_workdir(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("case", ["wrong type", "symlink loop", "dangling symlink"])
def test_a_workdir_that_cannot_be_used_is_refused_and_a_new_one_is_fine(tmp_path, case):
  expected = _wrong_type(str(tmp_path / "run"), workdir.DIRECTORY, case)
  with pytest.raises(ValueError, match=f"^workdir: {tmp_path}/run {expected.replace('not a directory', '')}"):
    workdir.check_workdir(str(tmp_path / "run"))
  assert workdir.check_workdir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")
  assert not os.path.exists(tmp_path / "new")  # checking writes nothing


@pytest.mark.parametrize("value", ["", "  ", None])
def test_an_empty_workdir_is_refused_rather_than_meaning_the_current_directory(value):
  with pytest.raises(ValueError, match="--workdir=.* is empty"):
    workdir.check_workdir(value)


@pytest.mark.parametrize("value", ["", "  "])
def test_the_trainer_refuses_an_empty_workdir_before_building_anything(tmp_path, monkeypatch, value):
  monkeypatch.chdir(tmp_path)
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match="--workdir=.* is empty"):
    train.train_and_evaluate(tiny_config(str(tmp_path / "data")), value)
  assert os.listdir(tmp_path) == []  # nothing trained into (or written in) the current directory


@pytest.mark.parametrize("entry", ["config.json", "metrics.jsonl", "checkpoints"])
def test_the_trainer_refuses_a_workdir_entry_of_the_wrong_type_before_building_anything(tmp_path, monkeypatch,
                                                                                      entry):
  run_dir = tmp_path / "run"
  wrong = run_dir / entry
  if workdir.ENTRIES[entry] == workdir.DIRECTORY:
    run_dir.mkdir()
    wrong.write_text("not a directory")
  else:
    wrong.mkdir(parents=True)
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=f"^workdir: {wrong} is "):
    train.train_and_evaluate(tiny_config(str(tmp_path / "data")), str(run_dir))
  assert sorted(os.listdir(run_dir)) == [entry]  # refused before the lock or anything else was written


def test_the_train_command_refuses_a_nested_workdir_entry_of_the_wrong_type_in_one_line_with_status_2(tmp_path):
  quarantine = tmp_path / "run" / "checkpoints" / "corrupt"
  quarantine.parent.mkdir(parents=True)
  quarantine.write_text("not a directory")
  run = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "train.py"),
                        f"--config={REPO}/configs/lm.py:switch-cpu", f"--workdir={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=120, env=cpu_env(1))
  assert run.returncode == 2, run.stderr[-3000:]
  assert _error_lines(run.stderr) == [f"invalid configuration or input: workdir: {quarantine} is a file, not a "
                                      "directory; move it away or use another --workdir"], run.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]


# ----------------------------------------------------------------------------------------------------------
# The same faults in real runs (slow tier: each trains).


# tests/test_faults.py's full disk from step 4 on, around the sweep's command line.
SWEEP_ON_A_DISK_FULL_FROM_STEP_4 = DISK_FULL_FROM_STEP_4 + """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

TINY_RUN = {"model.d_model": 16, "model.num_heads": 2, "model.head_dim": 8, "model.num_layers": 2, "model.d_ff": 32,
            "train.seq_len": 16, "train.batch_size": 4, "train.num_steps": 8, "train.eval_every": 4,
            "train.eval_batches": 1, "train.checkpoint_every": 2, "train.log_every": 1, "train.peak_tflops": 1.0}


@pytest.mark.slow  # trains until the disk fills: ~40 s on 2 cores
def test_a_full_disk_during_a_real_sweep_is_one_line_with_status_1(tmp_path):
  data_dir = str(tmp_path / "tfds")
  pipeline.document_source({"dataset": "stdlib", "data_dir": data_dir}, "train")  # prepared: no progress bars
  sweep_arg = _sweep_config_file(tmp_path, dict(TINY_RUN, **{"data.data_dir": data_dir}))
  run = subprocess.run(
      [sys.executable, "-c", SWEEP_ON_A_DISK_FULL_FROM_STEP_4, os.path.join(REPO, "experiments", "sweep.py"),
       f"--sweep={sweep_arg}", f"--workdir_root={tmp_path}/work", f"--results_root={tmp_path}/results"],
      env=dict(cpu_env(1), PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  (line,) = _error_lines(run.stderr)
  assert line.startswith("sweep tiny-cpu stopped at run dense-s0: saving checkpoint at step") and \
      "No space left on device" in line, run.stderr[-3000:]


@pytest.mark.slow  # two training invocations: ~30 s on 2 cores
def test_a_run_resumed_after_a_torn_metrics_record_keeps_every_later_record_readable(tmp_path, capsys):
  config = tiny_config(str(tmp_path / "tfds"), steps=4)
  config.train.log_every = 1
  train.train_and_evaluate(config, str(tmp_path / "run"), stop_at_step=2)
  path = tmp_path / "run" / "metrics.jsonl"
  text = path.read_text()
  path.write_text(text[:-40])  # the disk filled in the middle of step 2's record
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result.status == "completed"
  run = metrics_lib.read_metrics(str(tmp_path / "run"))
  # Step 2's record is the torn one (its checkpoint resumes at step 3); every record after it is whole.
  assert sorted(run.train) == [1, 3, 4] and len(run.damaged_lines) == 1
  assert "cut short" in capsys.readouterr().out


def test_sweep_roots_and_run_entries_of_the_wrong_type_are_refused_naming_the_path(tmp_path, monkeypatch, capsys):
  (tmp_path / "a-file").write_text("")
  sweep = _sweep("a-s0", "b-s0")
  calls = []
  _stand_in_trainer(monkeypatch, calls=calls)
  with pytest.raises(ValueError, match=f"--workdir_root='{tmp_path}/a-file': cannot create"):
    sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "a-file"))
  with pytest.raises(ValueError, match=f"--results_root='{tmp_path}/a-file': cannot create"):
    sweep_lib.aggregate(sweep, common.build_config, str(tmp_path / "work"), str(tmp_path / "a-file"))
  os.makedirs(tmp_path / "work" / "unit-cpu" / "a-s0" / "result.json")
  refused = sweep_lib.run_sweep(sweep, common.build_config, str(tmp_path / "work"))
  assert "a-s0/result.json is a directory, not a file" in refused["a-s0"]
  assert [os.path.basename(d) for d in calls] == ["b-s0"]


# ----------------------------------------------------------------------------------------------------------
# Results are written through moe_jax.fileio only.

# Files opened for writing in place on purpose, (file, what it opens): a probe created and removed at once; a
# tokenizer model written where its training run is the only reader (tokenizer training is rerun whole after a
# stop); docs/config.md regenerated by a developer and checked by git; the kernel's peak-memory reset that the
# import benchmark writes to (not a file).
WRITTEN_IN_PLACE = {("moe_jax/train.py", "probe"), ("moe_jax/data/tokenizers.py", "model_path"),
                    ("benchmarks/interop_import.py", "'/proc/self/clear_refs'"),
                    ("moe_jax/config_lib.py",
                     "os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), DOCS_PATH)")}


def _in_place_writes(path: str) -> list[str]:
  """`json.dump(...)` calls and `open(x, "w"/"wb"/"a"...)` with a literal writing mode in the file at `path`:
  'line: what' for each, except `WRITTEN_IN_PLACE`."""
  import ast

  with open(path) as f:
    tree = ast.parse(f.read(), path)
  relative = os.path.relpath(path, REPO)
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    if isinstance(func, ast.Attribute) and func.attr == "dump" and getattr(func.value, "id", None) == "json":
      found.append(f"{node.lineno}: json.dump")
    if isinstance(func, ast.Name) and func.id == "open" and len(node.args) > 1:
      mode = node.args[1]
      target = ast.unparse(node.args[0])
      if (isinstance(mode, ast.Constant) and isinstance(mode.value, str) and mode.value[:1] in "wx"
          and (relative, target) not in WRITTEN_IN_PLACE):
        found.append(f"{node.lineno}: open({target}, {mode.value!r})")
  return found


def test_no_result_file_is_written_in_place():
  """Every JSON, CSV or text result of the package, the experiments and the benchmarks goes through
  `fileio.atomic_write` (a stopped writer never leaves half a file); appending to logs is not covered here."""
  offenders = {}
  for folder in ("moe_jax", "experiments", "benchmarks"):
    for root, _, names in os.walk(os.path.join(REPO, folder)):
      for name in names:
        path = os.path.join(root, name)
        if name.endswith(".py") and os.path.relpath(path, REPO) != "moe_jax/fileio.py":
          found = _in_place_writes(path)
          if found:
            offenders[os.path.relpath(path, REPO)] = found
  assert offenders == {}
