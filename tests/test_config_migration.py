"""Saved configs keep loading: `config_lib.migrate` moves every field of `config_lib.RENAMED` to its new path, the
committed results' overrides validate after it, and a checkpoint's config of the old schema resumes as the same
run."""

import glob
import json
import os

import ml_collections
import pytest

from configs.sweeps import ablations, common, routers
from moe_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARIES = sorted(glob.glob(os.path.join(REPO, "results", "*", "summary.json")))


def _old_schema(config: dict) -> dict:
  """`config` (plain data) written as the schema before the fields of RENAMED moved: the inverse of migrate."""
  old = json.loads(json.dumps(config))
  values = {}
  for old_path, new_path in config_lib.RENAMED.items():  # all out first: moe.top_k is a section and an old field
    *parents, leaf = new_path.split(".")
    node = old
    for part in parents:
      node = node[part]
    values[old_path] = node.pop(leaf)
  for old_path, value in values.items():
    *parents, leaf = old_path.split(".")
    node = old
    for part in parents:
      node = node[part]
    node[leaf] = value
  for section in config_lib.MoeConfig.option_sections():  # emptied by the moves (top_k is the old int now)
    if old["moe"].get(section) == {}:
      del old["moe"][section]
  return old


def _committed_runs():
  for path in SUMMARIES:
    summary = json.load(open(path))
    for row in summary["runs"] + summary["diverged"]:
      yield os.path.basename(os.path.dirname(path)), row


def test_migrate_moves_every_renamed_field_and_leaves_a_current_config_alone():
  config = config_lib.default_config()
  config.moe.router = "top_k"
  config.moe.top_k.update(dict(k=2, renormalize=True, balancing_bias_rate=1e-3))
  current = config_lib.to_dict(config)
  old = _old_schema(current)
  assert old["moe"]["top_k"] == 2 and old["moe"]["renormalize"] is True and "soft_moe" not in old["moe"]
  assert config_lib.migrate(old) == current
  assert config_lib.migrate(current) == current
  assert config_lib.migrate({"moe": {"top_k": 2, "slots_per_expert": 4}}) == {
      "moe": {"top_k": {"k": 2}, "soft_moe": {"slots_per_expert": 4}}}


def test_every_old_path_moves_into_a_section_that_exists():
  sections = config_lib.default_config().moe
  for old, new in config_lib.RENAMED.items():
    _, section, leaf = new.split(".")
    assert leaf in sections[section], (old, new)


def test_committed_results_exist():
  assert len(SUMMARIES) >= 6 and sum(1 for _ in _committed_runs()) > 90


@pytest.mark.parametrize("results, row", list(_committed_runs()), ids=lambda v: v if isinstance(v, str) else v["run"])
def test_committed_run_overrides_validate_after_migration(results, row):
  """Each committed run's config: its base config of configs/ and its recorded overrides, old field names
  included, migrated and then typed and checked."""
  config_file = "switch_t5" if row["base"].startswith("switch-base") else "lm"
  overrides = config_lib.migrate(json.loads(row["overrides"]))
  run = ml_collections.ConfigDict({"name": row["run"], "base": row["base"], "config_file": config_file,
                                   "overrides": overrides})
  config_lib.typed(common.build_config(run))


@pytest.mark.parametrize("sweep", [routers.get_config("cpu"), ablations.get_config("cpu")], ids=lambda s: s.name)
def test_migrated_committed_overrides_equal_the_sweep_that_made_them(sweep):
  """The sweep files now name the new fields; migrated, the overrides recorded with the committed results are
  exactly those the sweep defines today."""
  committed = {row["run"]: row for name, row in _committed_runs() if name == sweep.name}
  assert committed
  for run in sweep.runs:
    if run.name in committed:
      assert config_lib.migrate(json.loads(committed[run.name]["overrides"])) == run.overrides.to_dict(), run.name


def test_a_checkpoint_config_of_the_old_schema_resumes_as_the_same_run():
  config = config_lib.default_config()
  config.moe.router = "top_k"
  config.moe.top_k.k = 2
  saved = _old_schema(config_lib.to_dict(config))
  assert config_lib.config_changes(saved, config_lib.to_dict(config)) == {}
  config.moe.top_k.k = 1
  assert config_lib.config_changes(saved, config_lib.to_dict(config)) == {"moe.top_k.k": (2, 1)}


def test_a_run_saved_before_fields_were_added_reads_them_at_their_defaults(tmp_path):
  """runstate.run_config of a config.json written before model.norm_eps and model.rope_theta existed (runs of
  issue 31's predecessors): the fields read as their defaults, the values the code then hard-coded."""
  from moe_jax import runstate

  saved = config_lib.to_dict(config_lib.default_config())
  saved["model"]["d_model"] = 48
  del saved["model"]["norm_eps"], saved["model"]["rope_theta"]
  (tmp_path / "config.json").write_text(json.dumps({"resolved": saved}))
  loaded = runstate.run_config(str(tmp_path))
  assert loaded.model.norm_eps == 1e-6 and loaded.model.rope_theta == 1e4 and loaded.model.d_model == 48
  config_lib.typed(loaded)
