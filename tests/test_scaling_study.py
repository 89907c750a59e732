"""The expert-scaling study's statistics (results/SCALING.md) equal hand-computed numpy on synthetic committed runs,
the primary test withholds its verdict until all 8 pairs are in, and the notebook runs with none, some or all."""

import json
import math
import pathlib

import nbformat
import numpy as np
import pytest
import scipy.stats

from configs.sweeps import expert_scaling
from moe_jax import scaling_study as study
from tests.test_notebooks import NOTEBOOKS, execute

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIAGNOSIS_RUNS = ROOT / "results" / "expert-scaling-diagnosis" / "runs"
FILES = ("a.py", "b/c.py", "d.py", "e.py", "f/g.py", "h.py")
BYTES = np.array([100, 250, 40, 600, 75, 320], np.float64)  # [D]
FINGERPRINT = expert_scaling.EVAL_SET["full"]["fingerprint"]
EVAL_STEPS = tuple(range(245, study.STEPS + 1, 245))  # the subset's evaluations, the last at 2450
TRAIN_STEPS = (1, 1000, 2446, 2447, 2448, 2449, 2450)
BLOCKS = (1, 3)


def file_nats(experts: int, seed: int, level: float) -> np.ndarray:
  """float64 [D]: per-file nats of a run whose loss is about `level` nats per byte, each file its own offset."""
  noise = np.random.default_rng([experts, seed]).normal(0.0, 0.01, len(FILES))
  return BYTES * (level + noise)


def write_run(root: pathlib.Path, experts: int, seed: int, level: float, *, status: str = "completed",
              step: int = study.STEPS, fingerprint: str = FINGERPRINT) -> np.ndarray:
  """A committed run directory as experiments/study.sh leaves it (moe_jax/scaling_study.py docstring); returns
  its per-file nats. Its subset curve falls linearly from level + 1 to level + 0.1 over the run; its routing
  statistics and tokens/s depend on the training step."""
  name = f"dense-s{seed}" if experts == study.DENSE else f"switch-e{experts}-s{seed}"
  path = root / name
  path.mkdir(parents=True)
  nats = file_nats(experts, seed, level)
  (path / "result.json").write_text(json.dumps({"status": status, "step": step, "wall_time_s": 100.0 + experts}))
  resolved = {"seed": seed, "model": {"moe_layer_interval": 2 if experts else 0, "init_scale": 1.0},
              "moe": {"num_experts": experts or 8, "capacity_factor": 1.25},
              "train": {"learning_rate": 3e-3, "aux_loss_weight": 1e-2}}
  (path / "config.json").write_text(json.dumps({"resolved": resolved}))
  (path / "machine.json").write_text(json.dumps({"cpu": "AMD EPYC", "cpu_count": 2}))
  if status == "diverged":
    return nats
  documents = {name: [float(n), int(b), int(b)] for name, n, b in zip(FILES, nats, BYTES)}
  (path / "eval_set.json").write_text(json.dumps(
      {"step": step, "result": {"fingerprint": fingerprint, "mean": float(nats.sum() / BYTES.sum()),
                                "documents": documents}}))
  with open(path / "metrics.jsonl", "w") as f:
    for s in TRAIN_STEPS:
      record = {"step": s, "kind": "train", "loss": level, "cross_entropy": level, "tokens_per_s": 1000.0 + s}
      if experts:
        record["moe"] = [{"block": b, "dropped_token_fraction": s / 1e5 * b, "mean_top_gate": 1 / experts + s / 1e6,
                          "max_expert_load": 1.0, "mean_expert_load": 0.8, "load_balancing_loss": 1.0 + s / 1e4,
                          "router_entropy": math.log(experts),
                          "expert_selection": [2 / experts] + [1 / experts] * (experts - 2) + [0.0]}
                         for b in BLOCKS]
      f.write(json.dumps(record) + "\n")
    for s in EVAL_STEPS:
      f.write(json.dumps({"step": s, "kind": "eval", "subset/cross_entropy": subset_loss(level, s)}) + "\n")
  return nats


def subset_loss(level: float, step: int) -> float:
  return level + 1.0 - 0.9 * step / study.STEPS


def delta(a: np.ndarray, b: np.ndarray) -> float:
  return float((a.sum() - b.sum()) / BYTES.sum())


def t_interval(values) -> tuple[float, float, float]:
  values = np.asarray(values)
  half = scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
  return values.mean(), values.mean() - half, values.mean() + half


def bootstrap_reference(a: np.ndarray, b: np.ndarray, resamples: int) -> tuple[float, float]:
  """a, b: [S, D] per-file nats; the percentile interval of the mean over seeds of the byte-weighted difference,
  the files resampled (the same for every seed) by a plain loop over resamples."""
  index = np.random.default_rng(study.BOOTSTRAP_SEED).integers(0, len(FILES), size=(resamples, len(FILES)))
  means = [np.mean([(a[s, i].sum() - b[s, i].sum()) / BYTES[i].sum() for s in range(len(a))]) for i in index]
  return tuple(np.percentile(means, [2.5, 97.5]))


def primary_runs(root: pathlib.Path, seeds, e32_level) -> tuple[np.ndarray, np.ndarray]:
  e8 = [write_run(root, 8, s, 1.5 + 0.01 * (s - 20)) for s in seeds]
  e32 = [write_run(root, 32, s, e32_level(s)) for s in seeds]
  return np.reshape(e32, (len(seeds), len(FILES))), np.reshape(e8, (len(seeds), len(FILES)))


def test_a_runs_number_is_its_byte_weighted_whole_set_score_as_committed():
  run = study.read_run(DIAGNOSIS_RUNS / "switch-e32-centre")
  scored = json.loads((DIAGNOSIS_RUNS / "switch-e32-centre" / "eval_set.json").read_text())["result"]
  assert (run.experts, run.seed, len(run.files)) == (32, 200, 132)
  assert run.cross_entropy == pytest.approx(scored["mean"], rel=1e-12)
  assert study.read_run(DIAGNOSIS_RUNS / "dense-lr0.003").experts == study.DENSE


def test_primary_delta_its_t_interval_and_verdict_equal_numpy_over_eight_pairs(tmp_path):
  e32, e8 = primary_runs(tmp_path, study.PRIMARY_SEEDS, lambda s: 1.45 + 0.003 * (s % 3))
  test = study.primary_test(study.read_runs(tmp_path, step=study.STEPS, fingerprint=FINGERPRINT))
  deltas = [delta(a, b) for a, b in zip(e32, e8)]
  mean, low, high = t_interval(deltas)
  assert test.delta.seeds == study.PRIMARY_SEEDS and test.planned == 8
  np.testing.assert_allclose(test.delta.t.differences, deltas, rtol=1e-12)
  np.testing.assert_allclose([test.delta.t.mean, *test.delta.t.interval], [mean, low, high], rtol=1e-10)
  assert high < 0 and test.status == "more experts better"


def test_the_file_bootstrap_recomputes_every_seeds_byte_weighted_delta_per_resample(tmp_path):
  e32, e8 = primary_runs(tmp_path, (20, 21, 22), lambda s: 1.49)
  resamples = 2000
  comparison = study.compare(study.read_runs(tmp_path), 32, 8, (20, 21, 22), resamples=resamples)
  assert comparison.files.mean == pytest.approx(np.mean([delta(a, b) for a, b in zip(e32, e8)]), rel=1e-12)
  np.testing.assert_allclose(comparison.files.interval, bootstrap_reference(e32, e8, resamples), rtol=1e-10)
  assert (comparison.files.n, comparison.files.resamples) == (len(FILES), resamples)
  assert study.compare(study.read_runs(tmp_path), 32, 8, (20,)).files.resamples == study.BOOTSTRAP_RESAMPLES == 10_000


@pytest.mark.parametrize("committed", [0, 1, 3, 7])
def test_fewer_than_eight_pairs_give_k_of_8_and_no_verdict(tmp_path, committed):
  primary_runs(tmp_path, study.PRIMARY_SEEDS[:committed], lambda s: 1.2)  # far below E = 8: would be "better"
  write_run(tmp_path, 32, 27, 1.2)  # E = 32 without its E = 8 partner: not a pair
  test = study.primary_test(study.read_runs(tmp_path))
  assert test.status == f"{committed} of 8, no verdict" and test.delta.n == committed
  assert not test.text_caveat


@pytest.mark.parametrize("e32_level, verdict", [(lambda s: 1.6 + 0.002 * (s % 2), "more experts worse"),
                                                (lambda s: 1.5 + 0.01 * (s - 20) + 0.02 * (-1) ** s, "inconclusive")])
def test_all_eight_pairs_give_the_rules_verdict(tmp_path, e32_level, verdict):
  primary_runs(tmp_path, study.PRIMARY_SEEDS, e32_level)
  assert study.primary_test(study.read_runs(tmp_path)).status == verdict


def test_a_diverged_run_is_listed_not_paired_and_withholds_the_verdict(tmp_path):
  primary_runs(tmp_path, study.PRIMARY_SEEDS[:7], lambda s: 1.4)
  write_run(tmp_path, 8, 27, 1.5)
  write_run(tmp_path, 32, 27, math.nan, status="diverged")
  runs = study.read_runs(tmp_path, step=study.STEPS, fingerprint=FINGERPRINT)
  test = study.primary_test(runs)
  assert test.delta.n == 7 and test.delta.diverged == (27,)
  assert test.status.startswith("7 of 8, no verdict (diverged: seed 27")
  analysis = study.analyse(runs, {})
  assert analysis["runs"]["switch-e32-s27"]["cross_entropy"] is None
  assert analysis["primary"]["diverged_seeds"] == [27]


def test_a_score_from_another_step_or_evaluation_set_is_refused(tmp_path):
  write_run(tmp_path / "step", 8, 20, 1.5, step=610)
  with pytest.raises(ValueError, match="scored at step 610"):
    study.read_runs(tmp_path / "step", step=study.STEPS)
  write_run(tmp_path / "set", 8, 20, 1.5)
  write_run(tmp_path / "set", 32, 20, 1.5, fingerprint="0" * 64)
  with pytest.raises(ValueError, match="evaluation set"):
    study.read_runs(tmp_path / "set", fingerprint=FINGERPRINT)
  with pytest.raises(ValueError, match="2 different evaluation sets"):
    study.compare(study.read_runs(tmp_path / "set"), 32, 8, (20,))


def test_two_runs_of_one_arm_and_seed_are_refused(tmp_path):
  write_run(tmp_path, 8, 20, 1.5)
  (tmp_path / "switch-e8-s20-rerun").mkdir()
  for name in ("result.json", "config.json", "eval_set.json"):
    (tmp_path / "switch-e8-s20-rerun" / name).write_text((tmp_path / "switch-e8-s20" / name).read_text())
  with pytest.raises(ValueError, match="both E = 8, seed 20"):
    study.primary_test(study.read_runs(tmp_path))


def test_log2_slope_is_least_squares_and_over_2_8_32_is_the_end_to_end_difference_over_4():
  experts, ce = [2, 8, 32], [1.52, 1.47, 1.50]
  assert study.log2_slope(experts, ce) == pytest.approx(np.polyfit(np.log2(experts), ce, 1)[0], rel=1e-12)
  assert study.log2_slope(experts, ce) == pytest.approx((ce[2] - ce[0]) / 4, rel=1e-12)
  assert study.log2_slope([2, 8, 32, 128], [1.5, 1.4, 1.45, 1.3]) == pytest.approx(
      np.polyfit([1, 3, 5, 7], [1.5, 1.4, 1.45, 1.3], 1)[0], rel=1e-12)
  with pytest.raises(ValueError, match="two or more distinct E"):
    study.log2_slope([8, 8], [1.5, 1.4])


def secondary_runs(root: pathlib.Path) -> dict[tuple[int, int], np.ndarray]:
  """Dense and E = 2, 8, 32 on seeds 20-22, E = 2 missing on seed 22; E = 8 also on seed 23."""
  levels = {study.DENSE: 1.55, 2: 1.53, 8: 1.50, 32: 1.51}
  nats = {(e, s): write_run(root, e, s, level + 0.004 * (s - 20) * (1 + e / 32))
          for e, level in levels.items() for s in study.SECONDARY_SEEDS if (e, s) != (2, 22)}
  nats[(8, 23)] = write_run(root, 8, 23, 1.5)
  return nats


def test_secondary_statistics_equal_numpy_and_report_their_n(tmp_path):
  nats = secondary_runs(tmp_path / "runs")
  output = tmp_path / "analysis.json"
  study.main([f"--runs={tmp_path / 'runs'}", f"--output={output}", f"--fingerprint={FINGERPRINT}"])
  analysis = json.loads(output.read_text())
  ce = {key: float(n.sum() / BYTES.sum()) for key, n in nats.items()}
  seeds = study.SECONDARY_SEEDS
  # (b) d_E against dense, with the gain as a fraction of the dense loss.
  for e in (2, 8, 32):
    paired = [s for s in seeds if (e, s) in ce]
    row = analysis["secondary"]["b_vs_dense"][str(e)]
    d = [ce[(e, s)] - ce[(0, s)] for s in paired]
    mean, low, high = t_interval(d)
    assert row["seeds"] == paired and row["t"]["n"] == len(paired)
    np.testing.assert_allclose([row["t"]["mean"], *row["t"]["interval"]], [mean, low, high], rtol=1e-10)
    assert row["gain_fraction_of_b"] == pytest.approx(-mean / np.mean([ce[(0, s)] for s in paired]), rel=1e-10)
    assert row["files_bootstrap"]["mean"] == pytest.approx(mean, rel=1e-10)
  # (a) slopes only where E = 2, 8, 32 are all there; (c) E = 2 - E = 8 on 2 pairs; (g) the primary on 20-22.
  slope_row = analysis["secondary"]["a_slopes"]["2,8,32"]
  expected = [np.polyfit([1, 3, 5], [ce[(e, s)] for e in (2, 8, 32)], 1)[0] for s in (20, 21)]
  assert slope_row["seeds"] == [20, 21]
  np.testing.assert_allclose(slope_row["values"], expected, rtol=1e-10)
  np.testing.assert_allclose([slope_row["mean"], *slope_row["interval"]], t_interval(expected), rtol=1e-10)
  assert "2,8,32,128" not in analysis["secondary"]["a_slopes"]
  c = analysis["secondary"]["c_e2_minus_e8"]
  assert c["t"]["n"] == 2 and c["t"]["mean"] == pytest.approx(np.mean([ce[(2, s)] - ce[(8, s)] for s in (20, 21)]))
  g = analysis["secondary"]["g_primary_on_seeds_20_22"]
  assert g["seeds"] == [20, 21, 22] and g["t"]["mean"] == pytest.approx(
      np.mean([ce[(32, s)] - ce[(8, s)] for s in seeds]), rel=1e-10)
  # The primary: 3 of 8 (seed 23 has E = 8 only).
  assert analysis["primary"]["status"] == "3 of 8, no verdict" and analysis["primary"]["seeds"] == [20, 21, 22]
  # (d) steps to the paired dense run's final subset loss, interpolated between the evaluations of a linear curve.
  reached = analysis["secondary"]["d_steps_to_dense"]["switch-e8-s20"]
  target = subset_loss(1.55, study.STEPS)
  steps = (1.5 + 1.0 - target) / 0.9 * study.STEPS  # where level + 1 - 0.9 t / T reaches the target
  assert reached["dense_run"] == "dense-s20" and reached["target"] == pytest.approx(target)
  assert reached["steps"] == pytest.approx(steps, rel=1e-9)
  assert reached["speedup"] == pytest.approx(study.STEPS / steps) and reached["fraction_saved"] == pytest.approx(
      1 - steps / study.STEPS)
  assert "switch-e8-s23" not in analysis["secondary"]["d_steps_to_dense"]  # no dense run on seed 23
  # (e) per block, the mean of the last 5 training records; (f) median tokens/s and wall time.
  blocks = analysis["secondary"]["e_routing_at_end"]["switch-e32-s21"]
  last = TRAIN_STEPS[-study.END_TAIL:]
  assert [b["block"] for b in blocks] == list(BLOCKS)
  assert blocks[1]["dropped_token_fraction"] == pytest.approx(np.mean([s / 1e5 * 3 for s in last]))
  assert blocks[0]["mean_top_gate"] == pytest.approx(np.mean([1 / 32 + s / 1e6 for s in last]))
  assert blocks[0]["max_selection_vs_uniform"] == pytest.approx(2.0)
  assert "dense-s20" not in analysis["secondary"]["e_routing_at_end"]
  throughput = analysis["secondary"]["f_throughput"]["dense-s21"]
  assert throughput == {"tokens_per_s": float(np.median([1000.0 + s for s in TRAIN_STEPS])), "wall_time_s": 100.0,
                        "cpu": "AMD EPYC"}


def test_the_committed_analysis_is_current():
  """results/expert-scaling/analysis.json, once written (`python -m moe_jax.scaling_study`), holds what the committed
  runs give now: it is regenerated with every committed run."""
  path = ROOT / study.ANALYSIS_FILE
  runs = study.read_runs(ROOT / study.RUNS_DIR, step=study.STEPS, fingerprint=FINGERPRINT)
  if not runs:
    pytest.skip("no confirmatory run committed yet: analysis.json is written with the first one")
  assert path.exists(), "confirmatory runs are committed without results/expert-scaling/analysis.json"
  committed = json.loads(path.read_text())
  primary = study.primary_test(runs)
  assert sorted(committed["runs"]) == sorted(runs), "stale analysis.json: python -m moe_jax.scaling_study"
  assert committed["primary"]["status"] == primary.status
  assert committed["primary"]["t"]["values"] == pytest.approx(list(primary.delta.t.differences), rel=1e-9)


def test_no_committed_run_is_zero_of_eight_and_an_analysis_without_numbers(tmp_path):
  runs = study.read_runs(tmp_path / "absent")
  analysis = study.analyse(runs, {})
  assert runs == {} and analysis["primary"]["status"] == "0 of 8, no verdict"
  assert analysis["primary"]["t"]["mean"] is None and analysis["primary"]["files_bootstrap"] is None
  assert analysis["secondary"]["b_vs_dense"] == {} and analysis["secondary"]["a_slopes"] == {}
  json.dumps(analysis, allow_nan=False)  # strict JSON: no NaN anywhere


# ----------------------------------------------------------------------------------------------------------
# The notebook: none, some or all of the confirmatory runs committed.


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOKS / "expert_scaling.ipynb", as_version=4)
  nbformat.validate(notebook)
  assert all(not cell.outputs and cell.execution_count is None for cell in notebook.cells if cell.cell_type == "code")


def test_notebook_runs_on_the_committed_results_with_or_without_confirmatory_runs(tmp_path, monkeypatch):
  figures = execute("expert_scaling", tmp_path, monkeypatch)
  confirmatory = study.read_runs(ROOT / study.RUNS_DIR)
  if DIAGNOSIS_RUNS.is_dir():
    assert "expert_scaling_diagnosis" in figures
    table = (tmp_path / "expert_scaling_diagnosis.md").read_text()
    assert "| switch-e32-centre | Switch E=32 | 200 |" in table
    assert table.strip() in (ROOT / "results" / "README.md").read_text(), "results/README.md: stale diagnosis table"
  assert ("expert_scaling_loss_vs_experts" in figures) == bool(confirmatory)
  assert (tmp_path / "expert_scaling_table.md").exists() == bool(confirmatory)


def primary_row(figures: pathlib.Path) -> str:
  return (figures / "expert_scaling_primary.md").read_text().strip().splitlines()[-1]


def test_notebook_shows_k_of_8_then_the_verdict_beside_table_7(tmp_path, monkeypatch):
  runs = tmp_path / "results" / "expert-scaling" / "runs"
  _, e8 = primary_runs(runs, study.PRIMARY_SEEDS[:3], lambda s: 1.45)
  dense = [write_run(runs, study.DENSE, s, 1.56) for s in (20, 21)]
  write_run(runs, 2, 20, 1.53)
  figures = execute("expert_scaling", tmp_path / "figures", monkeypatch, results=tmp_path / "results")
  assert {"expert_scaling_loss_vs_experts", "expert_scaling_primary", "expert_scaling_subset_curves"} <= figures
  assert "expert_scaling_diagnosis" not in figures  # none committed in this results folder
  assert "3 of 8, no verdict" in primary_row(tmp_path / "figures")
  reading = (tmp_path / "figures" / "expert_scaling_reading.md").read_text()
  assert "over 3 seed pairs" in reading and "3 of 8, no verdict" in reading
  table = (tmp_path / "figures" / "expert_scaling_table.md").read_text()
  d8 = [delta(e8[i], dense[i]) for i in range(2)]
  gain = -np.mean(d8) / np.mean([n.sum() / BYTES.sum() for n in dense])
  e8_row = next(line for line in table.splitlines() if line.startswith("| Switch E=8 |"))
  assert f"{np.mean(d8):+.4f} (n = 2)" in e8_row and f"{100 * gain:+.2f}%" in e8_row and "(not reported)" in e8_row
  e32_row = next(line for line in table.splitlines() if line.startswith("| Switch E=32 |"))
  assert "-1.474 | +0.162 | +9.90%" in e32_row  # Table 7: 32 experts against T5-Base's -1.636
  assert next(line for line in table.splitlines() if line.startswith("| Switch E=64 |")).count("(not run)") == 6

  primary_runs(runs, study.PRIMARY_SEEDS[3:], lambda s: 1.45)  # the other five pairs are committed
  execute("expert_scaling", tmp_path / "figures", monkeypatch, results=tmp_path / "results")
  arms = study.by_arm(study.read_runs(runs))
  deltas = [arms[(32, s)].cross_entropy - arms[(8, s)].cross_entropy for s in study.PRIMARY_SEEDS]
  mean, low, high = t_interval(deltas)
  row = primary_row(tmp_path / "figures")
  assert f"| 8 of 8 | {mean:+.4f} | {low:+.4f} .. {high:+.4f} |" in row and row.endswith("| more experts better |")
  reading = (tmp_path / "figures" / "expert_scaling_reading.md").read_text()
  assert f"{mean:+.4f} nats/byte, 95% t-interval over 8 seed pairs {low:+.4f} .. {high:+.4f}" in reading
  assert "More experts better: the t-interval lies below 0" in reading
