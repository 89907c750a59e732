"""The sweep runner: runs in sequence, skips finished runs, prints commands, aggregates honest summaries."""

import importlib
import json
import os
import shutil

import pytest

from configs.sweeps import ablations, common, scaling
from moe_jax import metrics as metrics_lib
from moe_jax import sweep as sweep_lib

TINY = {"model.d_model": 16, "model.num_heads": 2, "model.head_dim": 8, "model.num_layers": 2, "model.d_ff": 32,
        "train.seq_len": 16, "train.num_steps": 6, "train.eval_every": 2,
        "train.eval_batches": 1, "train.checkpoint_every": 0, "train.peak_tflops": 1.0, "train.batch_size": 8,
        "mesh.data": 2, "mesh.expert": 4}


def test_steps_to_reach_interpolates_between_evaluations():
  evals = {10: 3.0, 20: 2.0, 30: 1.5}
  assert sweep_lib.steps_to_reach(evals, 2.5) == pytest.approx(15.0)
  assert sweep_lib.steps_to_reach(evals, 3.0) == 10.0
  assert sweep_lib.steps_to_reach(evals, 1.0) is None


def test_scaling_sweep_lists_dense_and_every_expert_count_per_seed():
  sweep = scaling.get_config("cpu")
  groups = {run.group for run in sweep.runs}
  assert groups == {"dense"} | {f"switch-e{e}" for e in (2, 4, 8, 16, 32, 64)}
  assert len(sweep.runs) == 2 * 7
  for run in sweep.runs:
    config = common.build_config(run)
    assert config.seed == run.seed
    assert config.model.moe_layer_interval == (0 if run.group == "dense" else 2)


def test_only_top2_runs_are_not_flop_matched_and_every_setting_changes_one_baseline_field():
  sweep = ablations.get_config("cpu")
  baseline = common.flat_overrides(next(run for run in sweep.runs if run.group == ablations.BASELINE))
  for run in sweep.runs:
    assert run.flop_matched == (not run.group.startswith("top2")), run.name
    changed = {k for k, v in common.flat_overrides(run).items() if baseline.get(k) != v} - {"seed"}
    assert changed == set(ablations.SETTINGS[run.group][0]), run.name


def test_ablations_pair_every_setting_with_the_baseline_seed_and_train_on_2_5m_tokens():
  sweep = ablations.get_config("cpu")
  names = {run.name for run in sweep.runs}
  for run in sweep.runs:
    assert f"{ablations.BASELINE}-s{run.seed}" in names, run.name
    config = common.build_config(run)
    assert config.train.num_steps * config.train.batch_size * config.train.seq_len >= 2_500_000 - 2000
  init_seeds = {run.seed for run in sweep.runs if run.group == "init1"}
  assert init_seeds == {0, 1, 2}  # Table 3 reports 3 seeds


@pytest.mark.parametrize("module,size", [("scaling", "cpu"), ("ablations", "cpu"), ("routers", "cpu"),
                                         ("diagnosis", "cpu"), ("confirm", "cpu"),
                                         ("confirm", "replication")])
def test_every_run_of_the_cpu_sweeps_passes_validation(module, size):
  """Every run config of a sweep validates (both stacks of the encoder-decoder included) before it is launched."""
  from moe_jax import resolve

  sweep = importlib.import_module(f"configs.sweeps.{module}").get_config(size)
  for run in sweep.runs:
    resolve.resolve(common.build_config(run), device_count=1)


def test_unknown_ablation_size_and_sweep_size_are_refused():
  with pytest.raises(ValueError, match="size"):
    ablations.get_config("capacity-cpu")
  with pytest.raises(ValueError, match="size"):
    scaling.get_config("tpu")


def test_print_commands_gives_one_resumable_command_per_run():
  sweep = scaling.get_config("gpu")
  lines = sweep_lib.commands(sweep, "configs/sweeps/scaling.py:gpu", "/scratch/runs")
  assert len(lines) == len(sweep.runs)
  assert all(f"--only={run.name}" in line for run, line in zip(sweep.runs, lines))


@pytest.mark.slow  # trains every run of a sweep (~45 s); tests/test_faults_io.py covers the sweep with stand-in runs
def test_sweep_runs_skips_finished_runs_and_aggregates(tmp_path, capsys):
  sweep = common.new_sweep("unit", "cpu")
  overrides = dict(TINY, **{"data.data_dir": str(tmp_path / "tfds")})
  common.add_run(sweep, "dense-s0", group="dense", base="dense", seed=0, overrides=overrides)
  common.add_run(sweep, "switch-e4-s0", group="switch-e4", base="switch", seed=0,
                 overrides=dict(overrides, **{"moe.num_experts": 4}))
  workdirs, results = str(tmp_path / "work"), str(tmp_path / "results")

  sweep_lib.run_sweep(sweep, common.build_config, workdirs)
  sweep_lib.run_sweep(sweep, common.build_config, workdirs)
  assert capsys.readouterr().out.count("finished earlier, skipped") == 2

  rows = sweep_lib.aggregate(sweep, common.build_config, workdirs, results)
  by_run = {row["run"]: row for row in rows}
  assert by_run["dense-s0"]["num_experts"] == 0 and by_run["switch-e4-s0"]["num_experts"] == 4
  dense_loss = by_run["dense-s0"]["final_eval_loss"]
  assert by_run["switch-e4-s0"]["dense_final_eval_loss"] == dense_loss
  assert by_run["dense-s0"]["steps_to_dense_loss"] == pytest.approx(6.0)
  # Equal FLOPs per token up to the router's 2 * d_model * E per MoE layer.
  dense_flops, switch_flops = by_run["dense-s0"]["train_flops_per_token"], by_run["switch-e4-s0"]["train_flops_per_token"]
  assert switch_flops - dense_flops == pytest.approx(3 * 2 * 16 * 4)
  assert by_run["switch-e4-s0"]["params_total"] > by_run["dense-s0"]["params_total"]
  for name in ("summary.json", "summary.csv", "curves.json"):
    assert os.path.exists(os.path.join(results, "unit-cpu", name))
  curves = json.load(open(os.path.join(results, "unit-cpu", "curves.json")))
  assert [step for step, _ in curves["dense-s0"]["eval"]] == [2, 4, 6]
  assert [entry["block"] for entry in curves["switch-e4-s0"]["routing"]] == [1]
  at_end = curves["switch-e4-s0"]["routing"][0]["at_end"]  # per-expert vectors of the last training record
  assert at_end["step"] == 6 and sum(at_end["expert_selection"]) == pytest.approx(1.0, abs=1e-5)
  assert len(at_end["expert_load"]) == 4
  assert curves["dense-s0"]["routing"] == []

  # Continued on another machine: the dense run's workdir is gone; its committed row and curves stay.
  shutil.rmtree(sweep_lib.run_workdir(workdirs, sweep, sweep.runs[0]))
  again = {row["run"]: row for row in sweep_lib.aggregate(sweep, common.build_config, workdirs, results)}
  assert again == by_run
  assert json.load(open(os.path.join(results, "unit-cpu", "curves.json"))) == curves


def test_records_of_the_pinned_study_code_read_as_per_block_entries(tmp_path):
  # Commit febd857 (the model code of results/PROTOCOL.md) logs block b's statistics as flat "layer{b}/..." keys.
  legacy = {"step": 3, "kind": "train", "loss": 2.0, "layer3/mean_top_gate": 0.5, "layer1/mean_top_gate": 0.25,
            "layer1/dropped_token_fraction": 0.125}
  (tmp_path / "metrics.jsonl").write_text(json.dumps(legacy) + "\n")
  run = metrics_lib.read_metrics(str(tmp_path))
  assert run.moe_blocks() == [1, 3]
  assert run.block_series(1, "mean_top_gate") == {3: 0.25} and run.block_series(3, "mean_top_gate") == {3: 0.5}
  assert run.block_series(1, "dropped_token_fraction") == {3: 0.125}
  assert run.block_series(3, "dropped_token_fraction") == {}  # never logged by that block
  assert run.series("loss") == {3: 2.0}


def test_a_diverged_run_is_recorded_and_listed_not_dropped(tmp_path, monkeypatch):
  from moe_jax import train

  sweep = common.new_sweep("unit", "cpu")
  common.add_run(sweep, "init1-s0", group="init scale 1", base="switch", seed=0)

  def diverge(config, workdir):
    raise train.NonFiniteLossError("non-finite loss (nan) at step 7")

  monkeypatch.setattr(train, "train_and_evaluate", diverge)
  workdirs, results = str(tmp_path / "work"), str(tmp_path / "results")
  sweep_lib.run_sweep(sweep, common.build_config, workdirs)
  assert sweep_lib.is_finished(sweep_lib.run_workdir(workdirs, sweep, sweep.runs[0]))
  sweep_lib.aggregate(sweep, common.build_config, workdirs, results)
  summary = json.load(open(os.path.join(results, "unit-cpu", "summary.json")))
  assert summary["runs"] == []
  assert [row["run"] for row in summary["diverged"]] == ["init1-s0"]
  assert "step 7" in summary["diverged"][0]["error"]


def test_numerics_check_reports_equal_only_for_bitwise_identical_training_records(tmp_path):
  sweep = common.new_sweep("unit", "cpu")
  common.add_run(sweep, "dense-s0", group="dense", base="dense", seed=0, overrides=TINY)
  results, workdirs = tmp_path / "results", tmp_path / "work"
  (results / "unit-cpu").mkdir(parents=True)
  (results / "unit-cpu" / "summary.json").write_text(json.dumps({"sweep": "unit-cpu", "runs": [], "diverged": []}))
  committed = {"train_steps": [1, 6, 11], "train_loss": [5.5, 5.25, 5.0], "cross_entropy": [5.5, 5.25, 5.0]}
  (results / "unit-cpu" / "curves.json").write_text(json.dumps({"dense-s0": committed}))
  run_dir = workdirs / "unit-cpu" / "dense-s0"
  run_dir.mkdir(parents=True)
  records = [{"step": s, "kind": "train", "loss": loss, "cross_entropy": 5.5 if s == 1 else loss}
             for s, loss in [(1, 5.5), (2, 5.4), (6, 5.25), (11, 5.000001)]]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

  rows = sweep_lib.compare_with_committed(sweep, ("dense-s0",), str(workdirs), str(results), max_step=6)
  assert [(r["step"], r["key"]) for r in rows] == [(1, "loss"), (1, "cross_entropy"), (6, "loss"),
                                                   (6, "cross_entropy")]  # only committed steps <= max_step
  assert all(r["equal"] for r in rows)
  rows = sweep_lib.compare_with_committed(sweep, ("dense-s0",), str(workdirs), str(results), max_step=11)
  assert [r["equal"] for r in rows if r["step"] == 11] == [False, False]  # 1e-6 apart is a difference
  with pytest.raises(ValueError, match="no committed curves"):
    sweep_lib.compare_with_committed(sweep, ("switch-s0",), str(workdirs), str(results), max_step=6)
  with pytest.raises(ValueError, match="no metrics.jsonl"):
    sweep_lib.compare_with_committed(sweep, ("dense-s0",), str(tmp_path / "elsewhere"), str(results), max_step=6)
