"""The trainer on the fixed evaluation set (issue 35, results/SCALING.md, docs/evaluation.md): the subset at every
evaluation and the whole set at the last step, each with its bootstrap interval over documents; the set's
fingerprint recorded in config.json and every checkpoint, and a resume on another set refused before anything is
written."""

import json
import os
import shutil

import numpy as np
import pytest

from moe_jax import data as data_lib, evalset, train
from moe_jax.metrics import read_metrics
from tests.helpers import tiny_config
from tests.test_faults import _forbid_building_the_model
from tests.test_faults_workdir import _snapshot

EVAL_FIELDS = dict(eval_every=2, eval_set_min_tokens=1000, eval_file_cap_tokens=64, eval_subset_cap_tokens=16,
                   eval_bootstrap_resamples=200)


def _config(data_dir, **train_fields):
  config = tiny_config(data_dir, steps=4)
  config.train.update({**EVAL_FIELDS, **train_fields})
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def at_two(data_dir, tmp_path_factory):
  """A run of 4 steps stopped at step 2 (after its first evaluation and checkpoint)."""
  run = str(tmp_path_factory.mktemp("evalset_runs") / "at_two")
  train.train_and_evaluate(_config(data_dir), run, stop_at_step=2)
  return run


def test_the_subset_is_scored_at_every_evaluation_and_the_whole_set_at_the_last_step(data_dir, at_two, tmp_path):
  run = str(tmp_path / "run")
  shutil.copytree(at_two, run)
  result = train.train_and_evaluate(_config(data_dir), run)  # resumed at step 2
  evals = read_metrics(run).eval
  assert sorted(evals) == [2, 4]
  for step, record in evals.items():
    low, high = record["subset/cross_entropy_interval"]
    assert low <= record["subset/cross_entropy"] <= high and low < high
    assert record["cross_entropy"] == record["subset/cross_entropy"]  # the curve sweeps read
    assert ("full/cross_entropy" in record) == (step == 4)
  final = evals[4]
  low, high = final["full/cross_entropy_interval"]
  assert low <= final["full/cross_entropy"] <= high
  assert result.eval_loss == final["full/cross_entropy"]

  full = evalset.validation_eval_set(_config(data_dir).data, seq_len=32, cap_tokens=64, min_tokens=1000)
  subset = evalset.eval_subset(full, tokenizer=data_lib.get_tokenizer(_config(data_dir).data), cap_tokens=16)
  assert final["full/tokens"] == full.num_tokens and final["subset/tokens"] == subset.num_tokens
  with open(os.path.join(run, "config.json")) as f:
    recorded = json.load(f)["eval_set"]
  assert recorded["full"]["fingerprint"] == full.fingerprint
  assert recorded["subset"]["fingerprint"] == subset.fingerprint
  with open(os.path.join(run, train.EVAL_SET_FILE)) as f:
    kept = json.load(f)
  assert kept["step"] == 4 and kept["manifest"]["fingerprint"] == full.fingerprint
  sums = np.array([nats for nats, _, _ in kept["result"]["documents"].values()])
  np.testing.assert_allclose(sums.sum() / full.num_tokens, final["full/cross_entropy"], rtol=1e-12)


def test_a_resume_on_another_evaluation_set_is_refused_and_writes_nothing(data_dir, at_two, tmp_path, monkeypatch):
  run = str(tmp_path / "run")
  shutil.copytree(at_two, run)
  before = _snapshot(run)
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=r"fixed evaluation set differs from the one the checkpoint at step 2 was "
                                       r"scored on \(full: checkpoint \w+, now \w+; subset: "):
    train.train_and_evaluate(_config(data_dir, eval_file_cap_tokens=48), run)
  assert _snapshot(run) == before


def test_an_evaluation_set_below_its_minimum_is_refused_naming_the_field(data_dir, tmp_path, monkeypatch):
  _forbid_building_the_model(monkeypatch)
  with pytest.raises(ValueError, match=r"train.eval_set_min_tokens=100000000: the evaluation set has \d+ targets"):
    train.train_and_evaluate(_config(data_dir, eval_set_min_tokens=10**8), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")
