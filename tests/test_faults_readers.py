"""Tools that read another run never move or alter its files (docs/faults.md, issue 30): upcycling from a run whose
config.json was edited by hand names the edited field and leaves every checkpoint where it was, so the run's own
command resumes from them; planning, tracing, converting and evaluating leave the source workdir byte for byte as
it was.

One tiny dense run, stopped at step 2 (a checkpoint at 2, config.json, metrics), is trained once per module; a
test that changes it works on a copy.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import lm
from moe_jax import train, upcycle
from tests.helpers import REPO, cpu_env, tiny_config, train_losses
from tests.test_faults import _error_lines
from tests.test_faults_workdir import _snapshot

ONE_DEVICE = dict(cpu_env(1), PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _dense_config(data_dir: str):
  config = tiny_config(data_dir, steps=4, mesh=(0, 1))  # mesh.data: every device there is
  config.model.update(moe_layer_interval=0, activation="swiglu")  # a Llama: experiments/convert.py exports it
  config.train.log_every = 1
  return config


@pytest.fixture(scope="module")
def dense_run(data_dir, tmp_path_factory):
  """A tiny dense run of 4 steps stopped at step 2: resumable, and a source for upcycling."""
  run = str(tmp_path_factory.mktemp("dense") / "run")
  train.train_and_evaluate(_dense_config(data_dir), run, stop_at_step=2)
  return run


def _tool(script: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *flags], capture_output=True,
                        text=True, timeout=300, env=ONE_DEVICE)


def _edit_config_json(run: str, **model_fields) -> None:
  """config.json edited by hand: `model_fields` changed in the requested and the resolved config."""
  path = os.path.join(run, "config.json")
  with open(path) as f:
    record = json.load(f)
  for key in ("requested", "resolved"):
    record[key]["model"].update(model_fields)
  with open(path, "w") as f:
    json.dump(record, f)


@pytest.mark.slow  # an upcycle subprocess and a resumed run: ~30 s on 2 cores
def test_upcycling_from_an_edited_config_json_names_the_field_moves_nothing_and_the_run_resumes(
    data_dir, dense_run, tmp_path):
  run = str(tmp_path / "dense")
  shutil.copytree(dense_run, run)
  _edit_config_json(run, d_ff=96)  # the checkpoint's FFN kernels are [32, 64]
  before = _snapshot(run)
  upcycle = _tool("upcycle.py", f"--dense_workdir={run}", f"--config={REPO}/configs/from_run.py:{run}",
                  "--config.model.moe_layer_interval=2", "--config.moe.num_experts=4", f"--workdir={tmp_path / 'moe'}")
  assert upcycle.returncode == 2, upcycle.stderr[-3000:]
  errors = _error_lines(upcycle.stderr)
  assert len(errors) == 1 and "Traceback" not in upcycle.stderr, upcycle.stderr[-3000:]
  assert f"{run}/config.json disagrees with the config its checkpoint at step 2 was saved with" in errors[0]
  assert "model.d_ff: config.json 96, checkpoint 64" in errors[0]
  assert _snapshot(run) == before  # no checkpoint moved to checkpoints/corrupt, nothing written
  assert not os.path.exists(tmp_path / "moe")
  # The dense run's own command resumes from its checkpoint at step 2 (not step 0) and writes config.json again.
  result = train.train_and_evaluate(_dense_config(data_dir), run)
  assert result.status == "completed" and result.step == 4
  assert sorted(train_losses(run)) == [1, 2, 3, 4]
  assert open(os.path.join(run, "metrics.jsonl")).read().count('"kind": "train"') == 4  # steps 1-2, then 3-4 once
  with open(os.path.join(run, "config.json")) as f:
    assert json.load(f)["resolved"]["model"]["d_ff"] == 64


def test_upcycle_refuses_an_empty_workdir_in_one_line_with_status_2(tmp_path):
  run = _tool("upcycle.py", f"--config={REPO}/configs/lm.py:switch-cpu", f"--dense_workdir={tmp_path / 'dense'}",
              "--workdir=")
  assert run.returncode == 2, run.stderr[-3000:]
  assert _error_lines(run.stderr) == ["cannot upcycle: --workdir='' is empty: name the run's directory (an unset "
                                      "shell variable?)"], run.stderr[-3000:]
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="^--dense_workdir='' is empty"):  # the CLI prints it as above
    upcycle.upcycle_checkpoint("", lm.get_config("switch-cpu"), str(tmp_path / "moe"))


# Each tool that opens another run, as its command line: (flags, the exit status expected). A dense run has no
# router to trace: the tracer loads the checkpoint, then refuses (status 2), so it read the run all the same.
READERS = {
    "plan": (lambda run, out: ["plan.py", f"--config={REPO}/configs/from_run.py:{run}", "--mesh=1,1,1,1"], 0),
    "trace": (lambda run, out: ["trace.py", f"--workdir={run}", f"--output={out}/trace.npz", "--max_tokens=256"], 2),
    "convert": (lambda run, out: ["convert.py", f"--from={run}", f"--to=hf:{out}/hf", "--family=llama"], 0),
    "evaluate": (lambda run, out: ["evaluate.py", f"--workdir={run}", f"--text_glob={REPO}/docs/faults.md"], 0),
}


@pytest.mark.slow  # a subprocess per tool, ~10-20 s each on 2 cores
@pytest.mark.parametrize("tool", list(READERS))
def test_a_tool_that_reads_a_run_leaves_its_workdir_byte_for_byte_as_it_was(dense_run, tmp_path, tool):
  flags, status = READERS[tool]
  before = _snapshot(dense_run)
  script, *args = flags(dense_run, tmp_path)
  run = _tool(script, *args)
  assert run.returncode == status, run.stderr[-3000:]
  assert _snapshot(dense_run) == before
