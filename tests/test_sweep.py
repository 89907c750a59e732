"""The sweep runner: runs in sequence, skips finished runs, prints commands, aggregates honest summaries."""

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs.sweeps import ablations, common, scaling
from moe_jax import metrics as metrics_lib
from moe_jax import sweep as sweep_lib
from tests.helpers import REPO, cpu_env

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


# Numerics check (experiments/check_numerics.sh): synthetic committed results and a synthetic run trained again.
# All values are exact in binary, so every difference below is exact.
CURVE = {"train_steps": [1, 6, 11], "train_loss": [5.5, 5.25, 5.0], "cross_entropy": [5.5, 5.25, 5.0],
         "load_balancing_loss": [1.0, 1.0, 1.0],
         "routing": [{"block": 1, "router_entropy": [2.0, 1.5, 0.25],
                      "at_end": {"step": 12, "expert_load": [0.5, 1.5]}}],
         "eval": [[6, 4.0], [12, 3.0]]}


def _committed_switch_run(tmp_path, *, skip_step=None, status="completed"):
  """(sweep, results root, workdir root): committed curves and summary of a 12-step run 'switch-s0', and its
  records as trained again, which differ at step 11 (loss by 0.125, router entropy 0.25 -> 0.375) and step 12
  (expert_load[1] by 0.5, the last evaluation by 0.0625); tokens_per_s and time differ at every step."""
  sweep = common.new_sweep("unit", "cpu")
  common.add_run(sweep, "switch-s0", group="switch", base="switch", seed=0, overrides=TINY)
  results, workdirs = tmp_path / "results", tmp_path / "work"
  (results / "unit-cpu").mkdir(parents=True)
  summary = {"run": "switch-s0", "status": "completed", "steps": 12, "final_eval_loss": 3.0}
  (results / "unit-cpu" / "summary.json").write_text(json.dumps({"sweep": "unit-cpu", "runs": [summary],
                                                                 "diverged": []}))
  (results / "unit-cpu" / "curves.json").write_text(json.dumps({"switch-s0": CURVE}))
  records = []
  for step in range(1, 13):
    loss = {1: 5.5, 6: 5.25, 11: 5.125}.get(step, 4.5)
    moe = {"block": 1, "router_entropy": {1: 2.0, 6: 1.5, 11: 0.375}.get(step, 1.0),
           "expert_load": [0.5, 2.0 if step == 12 else 1.5]}
    records.append({"step": step, "kind": "train", "time": 1e9 + step, "tokens_per_s": 100.0 + step,
                    "loss": loss, "cross_entropy": 5.0 if step == 11 else loss, "load_balancing_loss": 1.0,
                    "moe": [moe]})
    if step in (6, 12):
      records.append({"step": step, "kind": "eval", "time": 1e9 + step, "cross_entropy": 4.0 if step == 6 else 3.0625})
  run_dir = workdirs / "unit-cpu" / "switch-s0"
  run_dir.mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records
                                                 if not (r["step"] == skip_step and r["kind"] == "train")))
  (run_dir / "result.json").write_text(json.dumps({"status": status, "step": 12 if status == "completed" else 11,
                                                   "eval_loss": 3.0625}))
  return sweep, str(results), str(workdirs)


def test_a_whole_run_check_compares_every_committed_value_and_the_final_evaluation(tmp_path):
  sweep, results, workdirs = _committed_switch_run(tmp_path)
  rows = sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=12)
  keys = [(r["step"], r["kind"], r["key"]) for r in rows]
  per_train_step = ["loss", "cross_entropy", "load_balancing_loss", "block1/router_entropy"]
  assert keys == ([(1, "train", k) for k in per_train_step] + [(6, "train", k) for k in per_train_step]
                  + [(6, "eval", "cross_entropy")] + [(11, "train", k) for k in per_train_step]
                  + [(12, "train", "block1/expert_load[0]"), (12, "train", "block1/expert_load[1]"),
                     (12, "eval", "cross_entropy"), (12, "final", "final_eval_loss")])
  differing = {(r["step"], r["key"]): (r["abs_diff"], r["rel_diff"]) for r in rows if not r["equal"]}
  assert differing == {(11, "loss"): (0.125, 0.025), (11, "block1/router_entropy"): (0.125, 0.5),
                       (12, "block1/expert_load[1]"): (0.5, 0.5 / 1.5), (12, "cross_entropy"): (0.0625, 0.0625 / 3),
                       (12, "final_eval_loss"): (0.0625, 0.0625 / 3)}
  assert all(r["abs_diff"] == 0.0 and r["rel_diff"] == 0.0 for r in rows if r["equal"])


def test_difference_statistics_say_where_bitwise_equality_ends_and_the_largest_differences(tmp_path):
  sweep, results, workdirs = _committed_switch_run(tmp_path)
  rows = sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=12)
  check = sweep_lib.numerics_check(rows, ("switch-s0",))
  stats = check["statistics"]
  assert not check["all_equal"] and check["per_run"]["switch-s0"] == stats
  assert (stats["values"], stats["bitwise_equal"], stats["not_measured"]) == (17, 12, 0)
  assert (stats["equal_through_step"], stats["first_differing_step"], stats["last_step"]) == (6, 11, 12)
  assert (stats["first_difference"]["step"], stats["first_difference"]["key"]) == (11, "loss")
  largest_abs, largest_rel = stats["largest_abs_difference"], stats["largest_rel_difference"]
  assert (largest_abs["step"], largest_abs["key"], largest_abs["abs_diff"]) == (12, "block1/expert_load[1]", 0.5)
  assert (largest_rel["step"], largest_rel["key"], largest_rel["rel_diff"]) == (11, "block1/router_entropy", 0.5)
  final = check["final_evaluation"]
  assert [(r["key"], r["committed"], r["measured"], r["abs_diff"]) for r in final["rows"]] == [
      ("final_eval_loss", 3.0, 3.0625, 0.0625)]
  assert final["statistics"]["largest_abs_difference"]["abs_diff"] == 0.0625
  steps = {(e["step"], e["values"], e["bitwise_equal"], e["max_abs_diff"], e["max_abs_key"]) for e in check["per_step"]}
  assert steps == {(1, 4, 4, 0.0, None), (6, 5, 5, 0.0, None), (11, 4, 2, 0.125, "loss"),
                   (12, 4, 1, 0.5, "block1/expert_load[1]")}
  lines = sweep_lib.numerics_check_lines(check)
  assert lines[0].startswith("12 of 17 values bitwise equal") and "equal through step 6" in lines[0]
  assert any(line.startswith("final evaluation switch-s0 step 12 final final_eval_loss") for line in lines)


def test_a_short_check_stops_at_its_step_and_all_equal_values_have_no_difference(tmp_path):
  sweep, results, workdirs = _committed_switch_run(tmp_path, status="preempted")  # SIGTERMed at step 11
  check = sweep_lib.numerics_check(
      sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=6), ("switch-s0",))
  stats = check["statistics"]
  assert check["all_equal"] and (stats["values"], stats["bitwise_equal"]) == (9, 9)
  assert (stats["equal_through_step"], stats["first_differing_step"], stats["last_step"]) == (6, None, 6)
  assert stats["largest_abs_difference"] is None and check["final_evaluation"]["rows"] == []
  rows = sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=11)
  assert not any(r["kind"] == "final" for r in rows)  # step 11 is not the last: no final evaluation asked for
  with pytest.raises(ValueError, match="'preempted' at step 11: let it finish"):
    sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=12)


def test_a_committed_value_the_run_did_not_log_is_a_difference_not_skipped(tmp_path):
  sweep, results, workdirs = _committed_switch_run(tmp_path, skip_step=6)
  rows = sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=11)
  missing = [(r["step"], r["key"]) for r in rows if r["measured"] is None]
  assert missing == [(6, "loss"), (6, "cross_entropy"), (6, "load_balancing_loss"), (6, "block1/router_entropy")]
  stats = sweep_lib.difference_statistics(rows)
  assert (stats["not_measured"], stats["first_differing_step"], stats["equal_through_step"]) == (4, 6, 1)


def test_committed_run_files_are_compared_record_by_record_without_wall_clock_values(tmp_path):
  sweep = common.new_sweep("unit", "cpu")
  common.add_run(sweep, "switch-s0", group="switch", base="switch", seed=0, overrides=TINY)
  committed_dir = tmp_path / "results" / "unit-cpu" / "runs" / "switch-s0"
  run_dir = tmp_path / "work" / "unit-cpu" / "switch-s0"
  for directory, time, upper in ((committed_dir, 1.0, 3.0), (run_dir, 2.0, 3.5)):
    directory.mkdir(parents=True)
    records = [{"step": 1, "kind": "train", "time": time, "tokens_per_s": time, "mfu": time, "skipped": False,
                "loss": 2.0, "moe": [{"block": 1, "expert_load": [0.5, 1.5]}]},
               {"step": 1, "kind": "eval", "time": time, "cross_entropy": 2.5, "full/cross_entropy": 2.5,
                "full/cross_entropy_interval": [2.0, upper], "full/tokens": 10}]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "result.json").write_text(json.dumps({"status": "completed", "step": 1, "eval_loss": 2.5}))
  rows = sweep_lib.compare_with_committed(sweep, ("switch-s0",), str(tmp_path / "work"), str(tmp_path / "results"),
                                          max_step=1)
  assert [(r["kind"], r["key"], r["equal"]) for r in rows] == [
      ("train", "loss", True), ("train", "block1/expert_load[0]", True), ("train", "block1/expert_load[1]", True),
      ("eval", "cross_entropy", True), ("eval", "full/cross_entropy", True),
      ("eval", "full/cross_entropy_interval[0]", True), ("eval", "full/cross_entropy_interval[1]", False),
      ("eval", "full/tokens", True), ("final", "eval_loss", True)]


def test_difference_is_bitwise_and_relative_to_the_committed_value():
  assert sweep_lib.difference(1.0, 1.0) == {"equal": True, "abs_diff": 0.0, "rel_diff": 0.0}
  assert sweep_lib.difference(2.0, 2.5) == {"equal": False, "abs_diff": 0.5, "rel_diff": 0.25}
  assert sweep_lib.difference(0.0, 0.5) == {"equal": False, "abs_diff": 0.5, "rel_diff": None}
  assert sweep_lib.difference(float("nan"), float("nan"))["equal"]
  assert sweep_lib.difference(1.0, float("inf")) == {"equal": False, "abs_diff": None, "rel_diff": None}
  assert sweep_lib.difference(1.0, None) == {"equal": False, "abs_diff": None, "rel_diff": None}
  assert not sweep_lib.difference(1.0, 1.0 + 2**-52)["equal"]  # one unit in the last place is a difference


def test_check_files_are_named_by_their_steps_and_never_overwrite_the_committed_check(tmp_path):
  assert sweep_lib.numerics_check_paths("results", "replication", 2450) == (
      os.path.join("results", "replication", "numerics_check_2450.json"),
      os.path.join("results", "replication", "numerics_check_2450.rows.jsonl"))
  assert sweep_lib.numerics_check_paths("results", "replication", 11, "numerics_check_11_machine-b")[0] == \
      os.path.join("results", "replication", "numerics_check_11_machine-b.json")
  for name in ("numerics_check", "../summary", "a/b", ".hidden"):
    with pytest.raises(ValueError, match="--check_name"):
      sweep_lib.numerics_check_paths("results", "replication", 11, name)


def test_check_file_records_the_machine_and_every_installed_package_and_reads_back(tmp_path):
  machine = sweep_lib.machine_record()
  assert machine["cpu"] and machine["cpu_count"] == os.cpu_count() and machine["cores_allowed"] >= 1
  assert machine["packages"]["jax"] == importlib.metadata.version("jax")
  assert machine["packages"]["numpy"] == importlib.metadata.version("numpy")
  sweep, results, workdirs = _committed_switch_run(tmp_path)
  check = sweep_lib.numerics_check(
      sweep_lib.compare_with_committed(sweep, ("switch-s0",), workdirs, results, max_step=12), ("switch-s0",))
  text = sweep_lib.check_json_text({"sweep": "unit-cpu", "machine": machine, **check})
  assert json.loads(text) == json.loads(json.dumps({"sweep": "unit-cpu", "machine": machine, **check}))
  assert sum(line.startswith('  {"run": "switch-s0", "step":') for line in text.splitlines()) == 4  # per_step


def test_the_check_command_exits_1_on_a_difference_unless_differences_are_tolerated(tmp_path):
  _, results, workdirs = _committed_switch_run(tmp_path)
  config = tmp_path / "unit_sweep.py"
  config.write_text(f"""
from configs.sweeps import common
def get_config():
  sweep = common.new_sweep("unit", "cpu")
  common.add_run(sweep, "switch-s0", group="switch", base="switch", seed=0, overrides={TINY!r})
  return sweep
""")

  def check(*flags):
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", "sweep.py"), f"--sweep={config}",
                           f"--workdir_root={workdirs}", f"--results_root={results}", "--only=switch-s0",
                           "--compare_steps=12", *flags], env=dict(cpu_env(1), PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)

  strict = check()
  assert strict.returncode == 1, strict.stderr[-3000:]
  assert "12 of 17 values bitwise equal" in strict.stdout
  report = json.load(open(os.path.join(results, "unit-cpu", "numerics_check_12.json")))
  assert report["statistics"]["equal_through_step"] == 6 and report["rows_file"] == "numerics_check_12.rows.jsonl"
  assert report["machine"]["packages"]["jax"] and report["compare_steps"] == 12
  with open(os.path.join(results, "unit-cpu", "numerics_check_12.rows.jsonl")) as f:
    assert len(f.readlines()) == 17
  tolerant = check("--tolerate_differences", "--check_name=numerics_check_12_b")
  assert tolerant.returncode == 0, tolerant.stderr[-3000:]
  assert os.path.exists(os.path.join(results, "unit-cpu", "numerics_check_12_b.json"))
