"""The study's sweep configs keep their promises (reserved seed, LR spans, token budgets) and the diagnosis
notebook regenerates the committed diagnosis table from the committed results."""

import pathlib

import nbformat

from configs.sweeps import common, confirm, diagnosis
from tests.test_notebooks import NOTEBOOKS, execute

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIAGNOSIS = ROOT / "results" / "diagnosis"


def tokens(config) -> int:
  return config.train.num_steps * config.train.batch_size * config.train.seq_len


def test_diagnosis_uses_only_the_reserved_seed_and_sweeps_each_arms_rate_over_10x():
  sweep = diagnosis.get_config()
  configs = [common.build_config(run) for run in sweep.runs]
  assert {config.seed for config in configs} == {diagnosis.SEED}
  assert {tokens(config) for config in configs} == {2_498_560}
  for arm in ("dense", "switch"):
    rates = {config.train.learning_rate for run, config in zip(sweep.runs, configs) if run.group.startswith(f"{arm} lr")}
    assert len(rates) >= 4 and max(rates) / min(rates) >= 10, (arm, rates)


def test_confirmatory_runs_never_use_the_reserved_seed_and_read_at_least_10m_tokens():
  sweep = confirm.get_config()
  configs = [common.build_config(run) for run in sweep.runs]
  assert diagnosis.SEED not in {config.seed for config in configs}
  assert min(tokens(config) for config in configs) >= 10_000_000
  assert len(confirm.PINNED_COMMIT) == 40


def test_diagnosis_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOKS / "diagnosis.ipynb", as_version=4)
  nbformat.validate(notebook)
  assert all(not cell.outputs for cell in notebook.cells if cell.cell_type == "code")


def test_diagnosis_notebook_regenerates_the_committed_table(tmp_path, monkeypatch):
  figures = execute("diagnosis", tmp_path, monkeypatch)
  assert {"diagnosis_lr", "diagnosis_routing"} <= figures
  table = (tmp_path / "diagnosis_table.md").read_text().strip()
  assert table in (DIAGNOSIS / "README.md").read_text(), "results/diagnosis/README.md holds a stale table"
