"""train.init_from: a run that starts from another run's checkpoint (fine-tuning, or an imported checkpoint's
workdir). Its first loss is the source's model's, not a fresh initialisation's, and it trains on from there; the
source's workdir is only read; a model with other parameters is refused naming the differing fields before
anything is written; a resume uses the run's own checkpoints."""

import os
import shutil

import pytest

from moe_jax import train
from tests.helpers import tiny_config, train_losses
from tests.test_faults import _forbid_building_the_model
from tests.test_faults_workdir import _snapshot


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def source(data_dir, tmp_path_factory):
  """A tiny run of 8 steps: the source."""
  run = str(tmp_path_factory.mktemp("source") / "run")
  train.train_and_evaluate(tiny_config(data_dir, steps=8), run)
  return run


def _fine_tune(data_dir, source, **train_fields):
  config = tiny_config(data_dir, steps=6)
  config.seed = 1  # another data order than the source's: its first batch is new to both models
  config.train.update(dict(init_from=source, **train_fields))
  return config


@pytest.mark.slow  # two training runs besides the source: over 20 s on 2 cores
def test_a_run_started_from_another_runs_checkpoint_starts_at_its_loss_and_leaves_it_untouched(
    data_dir, source, tmp_path, capsys):
  before = _snapshot(source)
  fresh = str(tmp_path / "fresh")
  fresh_config = _fine_tune(data_dir, source)
  fresh_config.train.init_from = ""
  train.train_and_evaluate(fresh_config, fresh)
  tuned = str(tmp_path / "tuned")
  result = train.train_and_evaluate(_fine_tune(data_dir, source), tuned)
  assert result.status == "completed"
  assert f"init_from: parameters of {source} at step 8; fresh optimizer state, step 0" in capsys.readouterr().out
  assert _snapshot(source) == before

  source_losses, fresh_losses, tuned_losses = train_losses(source), train_losses(fresh), train_losses(tuned)
  # Step 1 is the same batch and randomness for the fresh and the tuned run: only the parameters differ.
  assert tuned_losses[1] < fresh_losses[1] - 0.3
  assert abs(tuned_losses[1] - source_losses[8]) < abs(tuned_losses[1] - fresh_losses[1]) / 4
  assert min(tuned_losses[s] for s in (5, 6)) < tuned_losses[1]


def test_a_resume_uses_its_own_checkpoint_and_a_changed_init_from_is_refused(data_dir, source, tmp_path,
                                                                              monkeypatch, capsys):
  run = str(tmp_path / "run")
  train.train_and_evaluate(_fine_tune(data_dir, source), run, stop_at_step=2)
  capsys.readouterr()
  other = str(tmp_path / "other")
  shutil.copytree(source, other)
  before = _snapshot(run)
  with monkeypatch.context() as patch:
    _forbid_building_the_model(patch)
    with pytest.raises(ValueError, match=r"different run.*train.init_from: checkpoint '.*/run', config '.*/other'"):
      train.train_and_evaluate(_fine_tune(data_dir, other), run)
  assert _snapshot(run) == before
  shutil.rmtree(other)
  result = train.train_and_evaluate(_fine_tune(data_dir, source), run)
  out = capsys.readouterr().out
  assert result.status == "completed" and "resumed from checkpoint at step 2" in out and "init_from:" not in out


@pytest.mark.parametrize("case, change, message", [
    ("another architecture", lambda c, src: c.model.update(d_ff=128),
     r"its model has other parameters than this run's; model.d_ff: source 64, config 128\. Set those fields"),
    ("not a run", lambda c, src: c.train.update(init_from=os.path.dirname(src)), r"config.json does not exist"),
])
def test_a_source_that_cannot_start_the_run_is_refused_naming_why_before_anything_is_written(
    data_dir, source, tmp_path, monkeypatch, case, change, message):
  run = str(tmp_path / "run")
  config = _fine_tune(data_dir, source)
  change(config, source)
  before = _snapshot(run)
  with pytest.raises(ValueError, match=f"train.init_from=.*{message}"):
    train.train_and_evaluate(config, run)
  assert _snapshot(run) == before
