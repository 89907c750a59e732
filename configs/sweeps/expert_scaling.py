"""Expert-scaling study, step 1: the diagnosis on reserved seeds 200 and 201 (results/SCALING.md, issue 35 item 4).

This file is "freeze 0" of SCALING.md: it names the model code every run of the study uses (PINNED_COMMIT), records
the evaluation set's fingerprints and size (EVAL_SET), and lists the diagnosis runs. After this commit it changes
only by "freeze 1" (the confirmatory runs and the settings the rule gives them).

  experiments/study.sh configs/sweeps/expert_scaling.py:diagnosis CORE RUN[,RUN...] WORKDIR_ROOT

runs the named runs from a `git archive` of PINNED_COMMIT with this file (and the committed results/) copied in,
one CPU core each. Before any training it calls `check_eval_sets`: a run whose evaluation set, built by the pinned
code from this machine's corpus, has another fingerprint than EVAL_SET records is refused (the pinned trainer
records the fingerprint but has no field to demand one).

Every run: 610 steps of 32 x 128 bytes (2,498,560 fresh tokens), warmup 61 steps (10%), cosine decay, checkpoint
every 122 steps; the evaluation subset every 245 steps and at step 610, the whole set at step 610 (its
cross-entropy is the run's number). Base settings of configs/sweeps/confirm.py: dense lr 6e-3; Switch lr 3e-3,
one routing group per batch (4096 tokens), capacity factor 1.25 (2.0 at evaluation), alpha 1e-2.

  D1  dense and Switch E = 8 at init scale (model.init_scale, the field the ablations varied) 0.1 and 1.0,
      seeds 200 and 201: 8 runs, listed always.
  D2  seed 200, each arm at the init scale rule 1 gives it from the committed D1 results (`init_choice`), one
      factor at a time around the centre: listed once all 8 D1 results are committed. An arm's learning-rate
      extension (a factor 2 beyond the edge its grid's best lies at, `lr_extension`) is listed once that grid's
      results are committed; Switch E = 128 at E = 32's choices (rule 6, `arm_choice`) once E = 32's are.

"Committed results" are, per run, `results/expert-scaling-diagnosis/runs/<run>/` holding the run's `result.json`,
`config.json` and `eval_set.json` as the pinned trainer wrote them in its workdir (`committed_losses` reads them and
refuses a set with another fingerprint or a score from another step). After a run finishes, from /work/main:

  mkdir -p results/expert-scaling-diagnosis/runs/RUN
  cp WORKDIR_ROOT/expert-scaling-diagnosis/RUN/{result,config,eval_set}.json results/expert-scaling-diagnosis/runs/RUN/
  python experiments/sweep.py --sweep=configs/sweeps/expert_scaling.py:diagnosis --workdir_root=WORKDIR_ROOT \
    --aggregate_only

(The aggregator's summary.json `final_eval_loss` is the last *subset* score, the unprefixed eval cross_entropy;
the rules read the whole set's score from eval_set.json.)

Evaluation set (EVAL_SET), computed for freeze 0 on 2026-12-07 with the pinned code on this machine's corpus
(the Python 3.11.7 standard library, prepared as TFDS in ~/.cache/moe_jax/tfds/moe_jax_stdlib/py3.11-val0.08-
7a6b479aca) by

  python -m moe_jax.evalset --validation_fraction=0.08 --subset_cap_tokens=640

and checked to equal `train.eval_sets` of the D1 runs' configs (`check_eval_sets`): 132 of 132 validation files,
1,279,687 bytes (targets, one EOS per file; 14 files windowed), largest file 2.56%; the subset (first 640 targets
of each file's window) 132 files, 69,858 bytes, largest file 0.92%. These are the numbers SCALING.md expects.
"""

from __future__ import annotations

import json
import math
import pathlib

from configs.sweeps import common

PINNED_COMMIT = "c610a98af4f0ba3f8507c06aecd42868d4ad01a4"  # main at freeze 0: the evaluation-set code of item 2
NAME = "expert-scaling-diagnosis"  # results/<NAME>/
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "results" / NAME
EVAL_SET = {
    "full": {"fingerprint": "6420018c185bde33a713df407e3ee6ae6092dfbf401117e592ed958545bc26df", "documents": 132,
             "bytes": 1_279_687},
    "subset": {"fingerprint": "b7c41d79ef3eae240801eb506cae71d5f472f5af44a3faf8f75d8aefaf09b248", "documents": 132,
               "bytes": 69_858},
}
STEPS = 610  # 610 * 32 * 128 = 2,498,560 tokens
SEEDS = (200, 201)  # reserved for the diagnosis (SCALING.md, "Seeds")
D2_SEED = 200
SETTINGS = {
    "train.num_steps": STEPS, "train.warmup_steps": 61, "train.checkpoint_every": 122, "train.log_every": 122,
    "train.eval_every": 245, "data.validation_fraction": 0.08, "train.eval_set_min_tokens": 1_000_000,
    "train.eval_file_cap_tokens": 32_768, "train.eval_subset_cap_tokens": 640,
}
DEFAULT_INIT, OTHER_INIT = 0.1, 1.0  # rule 1: a tie keeps DEFAULT_INIT
INIT_SCALES = (DEFAULT_INIT, OTHER_INIT)
TIE_NATS = 0.001  # "tie": within 0.001 nats; a tie keeps the centre value
# The centre of each arm (confirm.py's settings) and its one-factor grids (SCALING.md, D2).
CENTRE = {"dense": {"train.learning_rate": 6e-3},
          "switch": {"train.learning_rate": 3e-3, "moe.group_size": 4096, "moe.capacity_factor": 1.25,
                     "moe.eval_capacity_factor": 2.0, "train.aux_loss_weight": 1e-2}}
LR_GRID = {"dense": (3e-3, 6e-3, 1e-2), "switch": (1.5e-3, 3e-3, 6e-3)}
CAPACITY_FACTORS = (1.25, 2.0)
ALPHAS = (1e-3, 1e-2, 1e-1)
DIAGNOSED = ("dense", "switch-e8", "switch-e32")  # the arms rules 2-4 choose for (dense has rule 2 only)


def _experts(arm: str) -> int:
  return int(arm.removeprefix("switch-e"))


def _kind(arm: str) -> str:
  return "dense" if arm == "dense" else "switch"


def d1_name(arm: str, init: float, seed: int) -> str:
  return f"{arm}-init{init:g}-s{seed}"


def _spec(arm: str, init: float, seed: int, **changes) -> tuple[str, int, dict]:
  """(base, seed, overrides) of one run of `arm` ('dense' or 'switch-eE') at its centre with `changes`."""
  kind = _kind(arm)
  overrides = dict(SETTINGS, **CENTRE[kind], **{"model.init_scale": init})
  if kind == "switch":
    overrides["moe.num_experts"] = _experts(arm)
  return kind, seed, dict(overrides, **changes)


def d1_runs() -> dict[str, tuple[str, int, dict]]:
  """D1: name -> (base, seed, overrides); seed by seed, each seed's four runs together."""
  return {d1_name(arm, init, seed): _spec(arm, init, seed)
          for seed in SEEDS for arm in ("dense", "switch-e8") for init in INIT_SCALES}


def centre_name(arm: str, init: dict[str, float]) -> str:
  """The run at an arm's centre on seed 200: D1's run for dense and E = 8, its own D2 run for E = 32."""
  return d1_name(arm, init[_kind(arm)], D2_SEED) if arm != "switch-e32" else "switch-e32-centre"


def grid_names(arm: str, init: dict[str, float]) -> dict[str, dict]:
  """The one-factor runs of `arm` on seed 200, name -> the setting it changes (the centre: {})."""
  kind = _kind(arm)
  names = {centre_name(arm, init): {}}
  names.update({f"{arm}-lr{lr:g}": {"train.learning_rate": lr}
                for lr in LR_GRID[kind] if lr != CENTRE[kind]["train.learning_rate"]})
  if kind == "switch":
    names.update({f"{arm}-cf{cf:g}": {"moe.capacity_factor": cf}
                  for cf in CAPACITY_FACTORS if cf != CENTRE[kind]["moe.capacity_factor"]})
    names.update({f"{arm}-alpha{a:g}": {"train.aux_loss_weight": a}
                  for a in ALPHAS if a != CENTRE[kind]["train.aux_loss_weight"]})
  return names


def _best(loss: dict[str, float], candidates: dict[str, object], centre: str) -> object:
  """The candidate of lowest loss, unless it is within TIE_NATS of the centre's: then the centre's."""
  winner = min(candidates, key=lambda name: loss[name])
  return candidates[winner if loss[winner] < loss[centre] - TIE_NATS else centre]


def _require(loss: dict[str, float], names, what: str) -> None:
  missing = sorted(set(names) - set(loss))
  if missing:
    raise ValueError(f"{what} is incomplete; missing runs: {missing}")


def init_choice(loss: dict[str, float]) -> dict[str, float]:
  """Rule 1: per arm ('dense', 'switch'), the init scale of lower mean loss over seeds 200 and 201 (Switch at
  E = 8, for every E); a tie keeps 0.1. `loss`: run name -> final cross-entropy on the whole set."""
  _require(loss, d1_runs(), "D1")
  mean = {(arm, init): sum(loss[d1_name(arm, init, s)] for s in SEEDS) / len(SEEDS)
          for arm in ("dense", "switch-e8") for init in INIT_SCALES}
  return {_kind(arm): OTHER_INIT if mean[(arm, OTHER_INIT)] < mean[(arm, DEFAULT_INIT)] - TIE_NATS else DEFAULT_INIT
          for arm in ("dense", "switch-e8")}


def _lr_candidates(arm: str, init: dict[str, float]) -> dict[str, float]:
  """Name -> learning rate of the grid runs of `arm` (the centre's included)."""
  centre = CENTRE[_kind(arm)]["train.learning_rate"]
  return {name: change.get("train.learning_rate", centre) for name, change in grid_names(arm, init).items()
          if not change or "train.learning_rate" in change}


def lr_extension(arm: str, loss: dict[str, float], init: dict[str, float]) -> float | None:
  """The extension's learning rate (a factor 2 beyond the grid's edge) when rule 2 applied to the grid alone picks
  an edge, else None. Raises while the grid's runs are missing."""
  candidates = _lr_candidates(arm, init)
  _require(loss, candidates, f"the learning-rate grid of {arm}")
  best = _best(loss, candidates, centre_name(arm, init))
  grid = LR_GRID[_kind(arm)]
  return best / 2 if best == min(grid) else best * 2 if best == max(grid) else None


def arm_choice(arm: str, loss: dict[str, float], init: dict[str, float]) -> dict:
  """Rules 2-4 for one diagnosed arm: its learning rate (the grid and its extension when one is due), and for
  Switch its capacity factor and alpha at the centre learning rate, each on its own; a tie keeps the centre."""
  centre = centre_name(arm, init)
  grid = grid_names(arm, init)
  _require(loss, grid, f"D2 of {arm}")
  rates = _lr_candidates(arm, init)
  extension = lr_extension(arm, loss, init)
  if extension is not None:
    rates[f"{arm}-lr{extension:g}"] = extension
    _require(loss, rates, f"the learning-rate extension of {arm}")
  choice = {"train.learning_rate": _best(loss, rates, centre)}
  if _kind(arm) == "switch":
    for field, values in (("moe.capacity_factor", CAPACITY_FACTORS), ("train.aux_loss_weight", ALPHAS)):
      candidates = {name: change[field] for name, change in grid.items() if field in change}
      candidates[centre] = CENTRE["switch"][field]
      choice[field] = _best(loss, candidates, centre)
  return choice


def diagnosis_runs(loss: dict[str, float]) -> dict[str, tuple[str, int, dict]]:
  """Every diagnosis run the committed results `loss` (name -> whole-set cross-entropy) make due, in order: D1;
  once D1 is complete, D2 at rule 1's init scales; then each due extension and, at E = 32's choices, E = 128."""
  runs = d1_runs()
  if set(runs) - set(loss):
    return runs
  init = init_choice(loss)
  for arm in DIAGNOSED:
    for name, change in grid_names(arm, init).items():
      runs.setdefault(name, _spec(arm, init[_kind(arm)], D2_SEED, **change))
  for arm in DIAGNOSED:
    if set(_lr_candidates(arm, init)) <= set(loss):
      extension = lr_extension(arm, loss, init)
      if extension is not None:
        runs[f"{arm}-lr{extension:g}"] = _spec(arm, init[_kind(arm)], D2_SEED, **{"train.learning_rate": extension})
  try:
    e32 = arm_choice("switch-e32", loss, init)
  except ValueError:  # E = 32's runs are not all committed yet
    return runs
  runs["switch-e128"] = _spec("switch-e128", init["switch"], D2_SEED, **e32)
  return runs


def committed_losses(results: pathlib.Path = RESULTS) -> dict[str, float]:
  """Run name -> final cross-entropy on the whole evaluation set, from each committed run's files (module docstring):
  eval_set.json's score at step 610 on the recorded set, or +inf for a run whose result.json says it diverged (it
  then loses every comparison). ValueError for a score on another set or at another step."""
  losses = {}
  for run in sorted(p for p in (results / "runs").glob("*") if p.is_dir()):
    status = json.loads((run / "result.json").read_text()).get("status")
    if status == "diverged":
      losses[run.name] = math.inf
      continue
    if status != "completed":
      raise ValueError(f"{run}/result.json says {status!r}: commit a run once it has finished")
    scored = json.loads((run / "eval_set.json").read_text())
    fingerprint = scored["result"]["fingerprint"]
    if fingerprint != EVAL_SET["full"]["fingerprint"] or scored["step"] != STEPS:
      raise ValueError(f"{run}/eval_set.json: scored at step {scored['step']} on set {fingerprint[:16]}; the study's "
                       f"is step {STEPS} on {EVAL_SET['full']['fingerprint'][:16]}")
    losses[run.name] = scored["result"]["mean"]
  return losses


def get_config(arg: str = "diagnosis", results: pathlib.Path = RESULTS):
  if arg != "diagnosis":
    raise ValueError(f"the expert-scaling sweep lists the diagnosis only until freeze 1; got {arg!r}")
  sweep = common.new_sweep(NAME, "cpu")
  sweep.name = NAME
  for name, (base, seed, overrides) in diagnosis_runs(committed_losses(results)).items():
    common.add_run(sweep, name, group=name.removesuffix(f"-s{seed}"), base=base, seed=seed, overrides=overrides)
  return sweep


def eval_set_fingerprints(config) -> dict[str, str | None]:
  """{'full', 'subset'} fingerprints of the evaluation sets the pinned trainer builds for `config` on this machine
  (`train.eval_sets`: the run's validation split, caps and seq_len)."""
  from moe_jax import config_lib, train  # heavy: only when a study starts

  sets = train.eval_sets(config_lib.typed(config))
  return sets.fingerprints() if sets else {"full": None, "subset": None}


def check_eval_sets(sweep_arg: str, names: list[str]) -> None:
  """Refuse (ValueError) unless every named run's evaluation sets have the fingerprints EVAL_SET records. Called by
  experiments/study.sh in the pinned tree before the runs start; `sweep_arg` is its 'file.py[:ARG]'."""
  arg = sweep_arg.partition(":")[2] or "diagnosis"
  recorded = {name: EVAL_SET[name]["fingerprint"] for name in ("full", "subset")}
  for run in get_config(arg).runs:
    if run.name in names:
      found = eval_set_fingerprints(common.build_config(run))
      if found != recorded:
        raise ValueError(f"run {run.name}: its evaluation sets here are {found}, not the study's {recorded} "
                         "(another corpus, Python or evaluation setting on this machine)")
      print(f"{run.name}: evaluation set {found['full'][:16]}, subset {found['subset'][:16]} (as recorded)",
            flush=True)
