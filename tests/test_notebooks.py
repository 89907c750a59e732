"""The notebooks execute top to bottom and write their figures, on the committed results and on a fixture.

Each notebook runs in a fresh 'python3' kernel with cwd notebooks/ (as Jupyter runs it). Figures go to a
temporary folder through MOE_JAX_FIGURES_DIR, so the tests never touch results/figures/. The fixture is made
by the real aggregator (moe_jax/sweep.py) from fake run folders, so its schema is the committed one; it covers
what the committed results may not: one seed only, a Switch run that never reaches the dense loss, and
ablation sweeps present (the branches the CPU results alone would leave unexecuted).
"""

import json
import math
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from configs.sweeps import ablations, common, routers, scaling
from moe_jax import stats
from moe_jax import sweep as sweep_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SCALING_SUMMARY = ROOT / "results" / "scaling-cpu" / "summary.json"
CELL_TIMEOUT_S = 120

sys.path.insert(0, str(NOTEBOOKS))
import plotting  # noqa: E402

FIGURES_ON_REAL_RESULTS = {
    "scaling": ["scaling-cpu_eval_vs_step", "scaling-cpu_eval_vs_flops", "scaling-cpu_final_vs_experts",
                "scaling-cpu_speedup", "scaling-cpu_gap_vs_paper"],
    "routing": ["scaling-cpu_expert_load", "scaling-cpu_drop_rate", "scaling-cpu_router_entropy",
                "scaling-cpu_capacity_tradeoff"],
    "ablations": [],  # only for the ablation sweeps present; none need be
    "routers": [],  # only once results/routers-cpu/ exists
    "decode": ["decode_cost_per_token"],  # reads benchmarks/results/decode.json only
}
ROUTER_FIGURES = ["routers-cpu_eval_vs_tokens", "routers-cpu_drop_rate", "routers-cpu_expert_load"]
NOTEBOOKS_TESTED = ["scaling", "routing", "ablations", "routers", "decode"]


def execute(name: str, figures: pathlib.Path, monkeypatch, results: pathlib.Path | None = None) -> set[str]:
  """Run notebooks/<name>.ipynb in a fresh kernel; returns the names of the PNGs it wrote."""
  monkeypatch.setenv("MOE_JAX_FIGURES_DIR", str(figures))
  if results is None:
    monkeypatch.delenv("MOE_JAX_RESULTS_DIR", raising=False)
  else:
    monkeypatch.setenv("MOE_JAX_RESULTS_DIR", str(results))
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()  # raises CellExecutionError
  return {path.stem for path in figures.glob("*.png")}


@pytest.mark.parametrize("name", NOTEBOOKS_TESTED)
def test_notebooks_are_stored_without_outputs(name):
  notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, f"{name}.ipynb has stored outputs"


def test_kernel_runs_this_python(tmp_path):
  """The 'python3' kernelspec says `python`; jupyter_client must start it as the interpreter running pytest."""
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
  NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3").execute()
  assert notebook.cells[0].outputs[0]["text"].strip() == sys.executable


@pytest.mark.parametrize("name", NOTEBOOKS_TESTED)
def test_notebook_runs_on_committed_results(name, tmp_path, monkeypatch):
  if name not in ("ablations", "routers"):  # CI commits results/scaling-cpu/: missing is an error, not a skip
    assert SCALING_SUMMARY.exists(), (
        f"{SCALING_SUMMARY} is missing: run `{plotting.sweep_command('scaling-cpu')}` (or add --aggregate_only "
        "when its runs have finished) and commit results/scaling-cpu/")
  expected = set(FIGURES_ON_REAL_RESULTS[name])
  if name == "ablations" and (ROOT / "results" / "ablations-cpu" / "summary.json").exists():
    expected.add("ablations-cpu_precision_final_loss")
  routers_done = (ROOT / "results" / "routers-cpu" / "summary.json").exists()
  if name == "routers" and routers_done:
    expected |= set(ROUTER_FIGURES)
  assert expected <= execute(name, tmp_path, monkeypatch)
  if name == "ablations" and (ROOT / "results" / "ablations-cpu" / "summary.json").exists():
    table = (tmp_path / "ablations_table.md").read_text().strip()
    assert table in (ROOT / "results" / "README.md").read_text(), "results/README.md holds a stale ablations table"
  if name == "routers" and routers_done:
    table = (tmp_path / "routers_table.md").read_text().strip()
    assert table in (ROOT / "results" / "README.md").read_text(), "results/README.md holds a stale routers table"
  if name == "scaling":  # results/README.md pastes the notebook's table
    table = (tmp_path / "scaling-cpu_table.md").read_text().strip()
    assert table in (ROOT / "results" / "README.md").read_text(), "results/README.md holds a stale scaling table"


ROUTING_FIGURES = {f"routing_analysis_{name}" for name in
                   ("load", "saturation", "coactivation", "source", "byte_class", "ablation")}


def test_routing_analysis_runs_on_the_committed_traces_and_the_reading_is_current(tmp_path, monkeypatch):
  """The committed traces of results/routing/ (no training: ~2 MB of files read); results/README.md pastes the
  notebook's reading verbatim."""
  monkeypatch.delenv("MOE_JAX_TRACES", raising=False)
  assert ROUTING_FIGURES <= execute("routing_analysis", tmp_path, monkeypatch)
  reading = (tmp_path / "routing_analysis_reading.md").read_text().strip()
  assert reading in (ROOT / "results" / "README.md").read_text(), "results/README.md holds a stale routing reading"


def test_missing_sweep_names_the_command_to_run(tmp_path, monkeypatch):
  monkeypatch.setenv("MOE_JAX_RESULTS_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu"):
    plotting.load_sweep("scaling-cpu")
  assert plotting.load_sweep("ablations-cpu", required=False) is None
  assert plotting.sweep_command("ablations-cpu") == "python experiments/sweep.py --sweep=configs/sweeps/ablations.py:cpu"


# ----------------------------------------------------------------------------------------------------------
# Fixture: fake finished runs aggregated by moe_jax/sweep.py.

FIXTURE_STEPS, FIXTURE_EVAL_EVERY = 40, 10


def _fake_run(workdir: pathlib.Path, floor: float, num_experts: int, drop: float) -> None:
  """A finished run whose eval loss decays to `floor`; MoE blocks 1 and 3 log routing metrics."""
  workdir.mkdir(parents=True)
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in range(1, FIXTURE_STEPS + 1):
      ce = floor + 3.0 * math.exp(-step / 8)
      record = {"step": step, "kind": "train", "loss": ce, "cross_entropy": ce, "load_balancing_loss": 1.0}
      if num_experts:  # the structured per-block records of moe_jax.metrics
        dropped = drop * (1 + math.exp(-step / 10))
        record["moe"] = [{"block": block, "dropped_token_fraction": dropped,
                          "max_expert_load": min(1.0, 0.9 + dropped), "mean_expert_load": 0.8 * (1 - dropped),
                          "router_entropy": math.log(num_experts) * (1 - 0.3 * math.exp(-step / 10)),
                          "mean_top_gate": 0.5,
                          "expert_selection": [2 * (e + 1) / (num_experts * (num_experts + 1))
                                               for e in range(num_experts)],
                          "expert_load": [min(1.0, 0.5 + e / num_experts) for e in range(num_experts)]}
                         for block in (1, 3)]
      f.write(json.dumps(record) + "\n")
      if step % FIXTURE_EVAL_EVERY == 0:
        f.write(json.dumps({"step": step, "kind": "eval", "cross_entropy": ce + 0.05}) + "\n")
  with open(workdir / sweep_lib.RESULT_FILE, "w") as f:
    json.dump({"status": "completed", "step": FIXTURE_STEPS, "eval_loss": floor, "wall_time_s": 1.0,
               "workdir": str(workdir)}, f)


def _aggregate(sweep, floors: dict[str, float], root: pathlib.Path) -> None:
  """Fake the runs named in `floors` (the rest stay unfinished) and aggregate the sweep into root/results."""
  for run in sweep.runs:
    if run.name in floors:
      num_experts = common.build_config(run).moe.num_experts if run.group != "dense" else 0
      capacity_factor = common.flat_overrides(run).get("moe.capacity_factor", 1.25)
      _fake_run(root / "work" / sweep.name / run.name, floors[run.name], num_experts,
                drop=0.1 / capacity_factor ** 4)
  sweep_lib.aggregate(sweep, common.build_config, str(root / "work"), str(root / "results"))


def _diverge(sweep, run_name: str, root: pathlib.Path) -> None:
  """Mark one run as diverged (as the runner records a non-finite loss) and re-aggregate the sweep."""
  run = next(run for run in sweep.runs if run.name == run_name)
  workdir = root / "work" / sweep.name / run.name
  workdir.mkdir(parents=True)
  with open(workdir / sweep_lib.RESULT_FILE, "w") as f:
    json.dump({"status": "diverged", "error": "non-finite loss (nan) at step 123"}, f)
  sweep_lib.aggregate(sweep, common.build_config, str(root / "work"), str(root / "results"))


@pytest.fixture(scope="module")
def fixture_results(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("notebook_fixture")
  _aggregate(scaling.get_config("cpu"), {
      "dense-s0": 2.0, "dense-s1": 2.02,
      "switch-e2-s0": 1.97, "switch-e2-s1": 1.99,
      "switch-e8-s0": 1.9,                          # one seed only
      "switch-e64-s0": 2.1, "switch-e64-s1": 2.12,  # never reaches the dense loss
  }, root)
  # Ablations: every capacity setting on both seeds, init scale 1.0 worse with a seed spread, and a diverged
  # bfloat16-router run: the branches the committed results may not have.
  sweep = ablations.get_config("cpu")
  floors = {run.name: 2.0 + 0.01 * list(ablations.SETTINGS).index(run.group) + 0.003 * run.seed
            for run in sweep.runs if run.group in ablations.ABLATIONS["capacity"]}
  floors.update({f"init1-s{seed}": 2.3 + 0.1 * seed for seed in (0, 1, 2)})
  floors.update({f"baseline-s{seed}": 2.0 + 0.003 * seed for seed in (0, 1, 2)})
  _aggregate(sweep, floors, root)
  _diverge(sweep, "router-bfloat16-s0", root)
  # Routers: Switch on both seeds, most routers on one or two, BASE diverged, hash not run.
  sweep = routers.get_config("cpu")
  floors = {f"{name}-s{seed}": 2.0 + 0.01 * i + 0.002 * seed for i, name in enumerate(routers.ROUTERS)
            for seed in (0, 1) if name not in ("base", "hash") and (seed == 0 or name != "soft-moe")}
  _aggregate(sweep, floors, root)
  _diverge(sweep, "base-s0", root)
  return root / "results"


@pytest.mark.parametrize("name", NOTEBOOKS_TESTED)
def test_notebook_runs_on_fixture(name, fixture_results, tmp_path, monkeypatch):
  expected = set(FIGURES_ON_REAL_RESULTS[name])
  if name == "routers":
    expected = set(ROUTER_FIGURES)
  if name == "ablations":
    expected = {f"ablations-cpu_{ablation}_{kind}" for ablation in ("capacity", "init_scale")
                for kind in ("final_loss", "eval_curves")}
  assert expected <= execute(name, tmp_path, monkeypatch, results=fixture_results)
  if name == "ablations":
    table = (tmp_path / "ablations_table.md").read_text()
    init = next(line for line in table.splitlines() if "| init1 |" in line)
    gap = stats.paired_difference([2.3, 2.4, 2.5], [2.0, 2.003, 2.006])
    assert f"{gap.mean:+.4f}" in init and "| agrees |" in init  # worse, as Table 3
    assert "diverged: seed 0" in next(line for line in table.splitlines() if "| router-bfloat16 |" in line)
    assert "(not run yet)" in next(line for line in table.splitlines() if "| jitter0.01 |" in line)
  if name == "routers":
    table = (tmp_path / "routers_table.md").read_text()
    top2 = next(line for line in table.splitlines() if line.startswith("| top2 |"))
    gap = stats.paired_difference([2.01, 2.012], [2.0, 2.002])
    assert f"{gap.mean:+.4f}" in top2 and "| no |" in top2  # paired with Switch; not FLOP-matched
    assert "(one pair)" in next(line for line in table.splitlines() if line.startswith("| soft-moe |"))
    assert "(diverged: seeds 0)" in next(line for line in table.splitlines() if line.startswith("| base |"))
    assert "(not run yet)" in next(line for line in table.splitlines() if line.startswith("| hash |"))
