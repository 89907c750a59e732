"""Expert-scaling study (results/SCALING.md, issue 35 item 4): step 1, the diagnosis on reserved seeds 200 and 201
(`get_config("diagnosis")`, the default), and step 2, the confirmatory runs (`get_config("confirmatory")`).

"Freeze 0" of SCALING.md wrote this file: it names the model code every run of the study uses (PINNED_COMMIT),
records the evaluation set's fingerprints and size (EVAL_SET), and lists the diagnosis runs. After it the file
changes only by "freeze 1" (the confirmatory runs' settings, FROZEN and INCLUDE_E128; the end of this docstring).

  experiments/study.sh configs/sweeps/expert_scaling.py:diagnosis CORE RUN[,RUN...] WORKDIR_ROOT

runs the named runs from a `git archive` of PINNED_COMMIT with this file (and the committed results/) copied in,
one CPU core each. Before any training it calls `check_eval_sets`: a run whose evaluation set, built by the pinned
code from this machine's corpus, has another fingerprint than EVAL_SET records is refused (the pinned trainer
records the fingerprint but has no field to demand one).

Every diagnosis run: 610 steps of 32 x 128 bytes (2,498,560 fresh tokens), warmup 61 steps (10%), cosine decay,
checkpoint every 122 steps; the evaluation subset every 245 steps and at step 610, the whole set at step 610 (its
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

Freeze 1, one commit after every diagnosis run is committed and before any confirmatory run, sets FROZEN (each
confirmatory arm's settings: rules 1-6 applied to the complete diagnosis by `freeze1_choices`, written as literal
values and checked equal to the rule's by tests/test_expert_scaling_sweep.py) and INCLUDE_E128 (from budget alone),
and quotes in SCALING.md the numbers that decided them and each seed's reach into its training data. Both come from

  python -m configs.sweeps.expert_scaling --freeze1 --fresh_tokens

Then the confirmatory runs (Switch E = 8 and E = 32 on seeds 20-27; dense and E = 2, and E = 128 when included, on
seeds 20-22; 2450 steps of 32 x 128 bytes = 10,035,200 fresh tokens, warmup 245, the diagnosis settings otherwise)
run, into results/expert-scaling/runs/<run>/, by

  experiments/study.sh configs/sweeps/expert_scaling.py:confirmatory CORE RUN[,RUN...] WORKDIR_ROOT
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


def init_means(loss: dict[str, float]) -> dict[tuple[str, float], float]:
  """(arm, init scale) -> mean loss over seeds 200 and 201 of D1's runs; raises while D1 is incomplete."""
  _require(loss, d1_runs(), "D1")
  return {(arm, init): sum(loss[d1_name(arm, init, s)] for s in SEEDS) / len(SEEDS)
          for arm in ("dense", "switch-e8") for init in INIT_SCALES}


def init_choice(loss: dict[str, float]) -> dict[str, float]:
  """Rule 1: per arm ('dense', 'switch'), the init scale of lower mean loss over seeds 200 and 201 (Switch at
  E = 8, for every E); a tie keeps 0.1. `loss`: run name -> final cross-entropy on the whole set."""
  mean = init_means(loss)
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


def choice_candidates(arm: str, loss: dict[str, float], init: dict[str, float]) -> dict[str, dict[str, object]]:
  """What rules 2-4 compare for one diagnosed arm: field -> {run name: the value that run tried}, the centre's run
  included; the learning rate's grid with its extension when one is due, and for Switch the capacity factor and
  alpha at the centre learning rate. Raises while one of those runs is missing."""
  centre = centre_name(arm, init)
  grid = grid_names(arm, init)
  _require(loss, grid, f"D2 of {arm}")
  rates = _lr_candidates(arm, init)
  extension = lr_extension(arm, loss, init)
  if extension is not None:
    rates[f"{arm}-lr{extension:g}"] = extension
    _require(loss, rates, f"the learning-rate extension of {arm}")
  candidates = {"train.learning_rate": rates}
  if _kind(arm) == "switch":
    for field in ("moe.capacity_factor", "train.aux_loss_weight"):
      candidates[field] = {name: change[field] for name, change in grid.items() if field in change}
      candidates[field][centre] = CENTRE["switch"][field]
  return candidates


def arm_choice(arm: str, loss: dict[str, float], init: dict[str, float]) -> dict:
  """Rules 2-4 for one diagnosed arm: its learning rate (the grid and its extension when one is due), and for
  Switch its capacity factor and alpha at the centre learning rate, each on its own; a tie keeps the centre."""
  centre = centre_name(arm, init)
  return {field: _best(loss, candidates, centre)
          for field, candidates in choice_candidates(arm, loss, init).items()}


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


# Freeze 1 (SCALING.md, "Step 2: confirmatory runs"): the arms, seeds and budget, fixed by the protocol; the
# settings the rule gives each arm, written in FROZEN as literal values at freeze 1.
CONFIRM_NAME = "expert-scaling"  # results/<CONFIRM_NAME>/runs/<run>/
CONFIRM_STEPS = 2450  # 2450 * 32 * 128 = 10,035,200 fresh tokens
# The diagnosis settings but for the step counts: checkpoint every 122 steps, subset every 245, whole set at the end.
CONFIRM_SETTINGS = dict(SETTINGS, **{"train.num_steps": CONFIRM_STEPS, "train.warmup_steps": 245})
PRIMARY_SEEDS = tuple(range(20, 28))  # Switch E = 8 and E = 32: the primary test's 8 pairs
SECONDARY_SEEDS = (20, 21, 22)  # dense, Switch E = 2 (and E = 128 when included)
# Rule 6: each confirmatory arm -> the diagnosed arm whose choices it takes (the nearest diagnosed E in log2 E).
RULE_6 = {"dense": "dense", "switch-e2": "switch-e8", "switch-e8": "switch-e8", "switch-e32": "switch-e32",
          "switch-e128": "switch-e32"}

# ---- Set by the lead in the freeze 1 commit, and by nothing else. ----
# Whether Switch E = 128 runs on seeds 20-22: decided from budget alone (the wall time and memory of the E = 128
# diagnosis run and the CPU time granted), never from a loss. Freeze 1 (SCALING.md, "Freeze 1"): included, run last.
INCLUDE_E128 = True
# Each arm's settings, as `python -m configs.sweeps.expert_scaling --freeze1` prints them from the complete
# diagnosis (`freeze1_choices`); tests/test_expert_scaling_sweep.py checks they equal the rule's. Set at freeze 1.
FROZEN: dict[str, dict[str, float]] | None = {
    "dense": {"model.init_scale": 1.0, "train.learning_rate": 0.006},
    "switch-e2": {"model.init_scale": 1.0, "train.learning_rate": 0.006, "moe.capacity_factor": 2.0,
                  "train.aux_loss_weight": 0.01},
    "switch-e8": {"model.init_scale": 1.0, "train.learning_rate": 0.006, "moe.capacity_factor": 2.0,
                  "train.aux_loss_weight": 0.01},
    "switch-e32": {"model.init_scale": 1.0, "train.learning_rate": 0.006, "moe.capacity_factor": 2.0,
                   "train.aux_loss_weight": 0.1},
    "switch-e128": {"model.init_scale": 1.0, "train.learning_rate": 0.006, "moe.capacity_factor": 2.0,
                    "train.aux_loss_weight": 0.1},
}
# ----


def freeze1_choices(loss: dict[str, float]) -> dict[str, dict[str, float]]:
  """Rules 1-6 applied to the complete diagnosis `loss` (run name -> whole-set cross-entropy, `committed_losses`):
  confirmatory arm -> {'model.init_scale', 'train.learning_rate' and, for Switch, 'moe.capacity_factor',
  'train.aux_loss_weight'}. ValueError naming the missing runs while a run `diagnosis_runs` makes due (E = 128's
  included: freeze 1 comes after every diagnosis run) is not in `loss`, or naming runs it does not list."""
  due = diagnosis_runs(loss)
  missing = sorted(set(due) - set(loss))
  if missing:  # runs due only once others are committed (an extension, E = 128) are not named yet
    raise ValueError(f"the diagnosis is incomplete; missing runs (as far as the committed ones make them due): "
                     f"{missing}")
  stray = sorted(set(loss) - set(due))
  if stray:
    raise ValueError(f"committed runs the diagnosis does not list: {stray}")
  init = init_choice(loss)
  diagnosed = {arm: arm_choice(arm, loss, init) for arm in DIAGNOSED}
  return {arm: {"model.init_scale": init[_kind(arm)], **diagnosed[source]} for arm, source in RULE_6.items()}


def confirmatory_runs(choices: dict[str, dict[str, float]], include_e128: bool) -> dict[str, tuple[str, int, dict]]:
  """The confirmatory runs at `choices` (arm -> settings, as `freeze1_choices` gives them): name 'ARM-sSEED' ->
  (base, seed, overrides), in SCALING.md's execution order: the primary pairs (E = 8, E = 32) seed by seed, then
  dense and E = 2, then E = 128 when included."""
  if set(choices) != set(RULE_6):
    raise ValueError(f"the confirmatory choices must name the arms {sorted(RULE_6)}; got {sorted(choices)}")
  for arm, choice in choices.items():
    fields = {"model.init_scale", "train.learning_rate"} | (
        {"moe.capacity_factor", "train.aux_loss_weight"} if _kind(arm) == "switch" else set())
    if set(choice) != fields:
      raise ValueError(f"the confirmatory choice of {arm} must set {sorted(fields)}; got {sorted(choice)}")

  def spec(arm: str, seed: int) -> tuple[str, int, dict]:
    choice = choices[arm]
    return _spec(arm, choice["model.init_scale"], seed, **CONFIRM_SETTINGS, **choice)

  order = [(arm, seed) for seed in PRIMARY_SEEDS for arm in ("switch-e8", "switch-e32")]
  order += [(arm, seed) for seed in SECONDARY_SEEDS for arm in ("dense", "switch-e2")]
  order += [("switch-e128", seed) for seed in SECONDARY_SEEDS if include_e128]
  return {f"{arm}-s{seed}": spec(arm, seed) for arm, seed in order}


def stream_config(seed: int):
  """The training config whose data stream every confirmatory run on `seed` reads: the stream depends on the data
  section, the seed, batch size and sequence length only, never on an arm or its settings (a test checks that)."""
  sweep = common.new_sweep(CONFIRM_NAME, "cpu")
  base, seed, overrides = _spec("dense", DEFAULT_INIT, seed, **CONFIRM_SETTINGS)
  common.add_run(sweep, f"stream-s{seed}", group="stream", base=base, seed=seed, overrides=overrides)
  return common.build_config(sweep.runs[0])


def fresh_tokens(config, steps: int) -> dict:
  """How far the training stream of `config` reaches in `steps` steps (SCALING.md, "Fresh tokens").

  Iterates the trainer's own data iterator (`runstate.train_batches`) for `steps` batches and reads its state:
  per packing stream, the index of its current document in the global (shuffled, repeated) order and the tokens
  of it already emitted. Stream r reads documents r, r + B, r + 2B, ... (B = batch size) up to that one, itself
  included when a token of it was read. An index below the split's document count is the first epoch; whether
  a document of the second epoch was already read in the first is decided by the source records themselves, in
  the pipeline's order (`pipeline.tokenized_documents` over records whose text is their own index).

  Returns {'seed', 'documents' (in the training split), 'largest_index' (read by any stream), 'stream' (the one
  that reads it), 'read' (documents read, counted by position), 'read_twice' (records read at two positions)}.
  """
  from moe_jax import config_lib, runstate  # heavy: only when asked
  from moe_jax.data import pipeline, tokenizers

  exp = config_lib.typed(config)
  batches = runstate.train_batches(exp)
  try:
    for _ in range(steps):
      next(batches)
    state = batches.get_state()
  finally:
    batches.close()
  streams = len(state["doc"])
  last = [doc if offset else doc - streams for doc, offset in zip(state["doc"], state["offset"])]
  read = [index for stream in range(streams) for index in range(stream, last[stream] + 1, streams)]
  source, _ = pipeline.document_source(exp.data, "train")
  byte = tokenizers.ByteTokenizer()
  order = pipeline.tokenized_documents([{"text": str(i)} for i in range(len(source))], text_key="text",
                                       tokenizer=byte, seed=exp.seed, streams_per_shard=streams)
  records = [int(byte.decode(order[index]["tokens"][:-1])) for index in read]  # drop the EOS
  largest = max(range(streams), key=lambda stream: last[stream])
  return {"seed": exp.seed, "documents": len(source), "largest_index": last[largest], "stream": largest,
          "read": len(read), "read_twice": len(records) - len(set(records))}


def _frozen_literal(choices: dict[str, dict[str, float]], width: int = 120) -> str:
  """`choices` as the Python statement that sets FROZEN: one arm a line, wrapped at `width` columns."""
  lines = ["FROZEN = {"]
  for arm, settings in choices.items():
    head = f'    "{arm}": {{'
    line = head
    for i, (field, value) in enumerate(settings.items()):
      item = f'"{field}": {value!r}' + ("}," if i == len(settings) - 1 else ",")
      if line != head and len(line) + 1 + len(item) > width:
        lines.append(line)
        line = " " * len(head) + item
      else:
        line += ("" if line == head else " ") + item
    lines.append(line)
  return "\n".join([*lines, "}"])


def freeze1_report(loss: dict[str, float]) -> str:
  """The text freeze 1 pastes: FROZEN as a literal for this file, then markdown lines for SCALING.md quoting the
  diagnosis numbers (whole-set cross-entropy, nats per byte) that decided each choice."""
  choices = freeze1_choices(loss)  # raises while the diagnosis is incomplete
  init = init_choice(loss)
  mean = init_means(loss)
  label = {"dense": "dense", "switch-e8": "Switch E = 8", "switch-e32": "Switch E = 32"}

  def runs(candidates: dict[str, object], centre: str, extension: str | None) -> str:
    """Each candidate's value, loss and run, by value."""
    role = {centre: " centre", extension: " extension"}
    return ", ".join(f"{candidates[name]:g} {loss[name]:.4f} (`{name}`{role.get(name, '')})"
                     for name in sorted(candidates, key=lambda name: candidates[name]))

  def verdict(candidates: dict[str, object], chosen: object) -> str:
    lowest = min(candidates, key=lambda name: loss[name])
    tie = " (the lowest is within 0.001 of the centre: a tie, the centre stays)" if candidates[lowest] != chosen else ""
    return f"**{chosen:g}**{tie}"

  parts = []
  for arm in ("dense", "switch-e8"):
    scores = ", ".join(f"{scale:g} {mean[(arm, scale)]:.4f} ("
                       + ", ".join(f"{loss[d1_name(arm, scale, seed)]:.4f}" for seed in SEEDS) + ")"
                       for scale in INIT_SCALES)
    tie = mean[(arm, OTHER_INIT)] < mean[(arm, DEFAULT_INIT)] and init[_kind(arm)] == DEFAULT_INIT
    parts.append(f"{label[arm]}: {scores} -> **{init[_kind(arm)]:g}**" + (" (a tie, 0.1 stays)" if tie else ""))
  lines = ["- **Rule 1, init scale** (mean over seeds 200 and 201, then each seed, at the centre): "
           + "; ".join(parts) + " (Switch's for every E)."]
  titles = {"train.learning_rate": "Rule 2, learning rate (seed 200, the grid and its extension when one ran)",
            "moe.capacity_factor": "Rule 3, capacity factor (seed 200, at the centre learning rate)",
            "train.aux_loss_weight": "Rule 4, alpha (seed 200, at the centre learning rate)"}
  per_field = {field: [] for field in titles}
  for arm in DIAGNOSED:
    centre = centre_name(arm, init)
    rate = lr_extension(arm, loss, init)
    extension = None if rate is None else f"{arm}-lr{rate:g}"
    for field, candidates in choice_candidates(arm, loss, init).items():
      per_field[field].append(f"{label[arm]}: {runs(candidates, centre, extension)} -> "
                              f"{verdict(candidates, choices[arm][field])}")
  lines += [f"- **{titles[field]}**: " + "; ".join(parts) + "." for field, parts in per_field.items()]
  lines.append("- **Rule 6**: Switch E = 2 takes E = 8's choices, E = 128 takes E = 32's; dense takes dense's. "
               f"The E = 128 diagnosis run (`switch-e128`, its loss in no rule) scored {loss['switch-e128']:.4f}.")
  return "\n".join([_frozen_literal(choices), "", *lines])


def fresh_tokens_report(steps: int = CONFIRM_STEPS) -> str:
  """Markdown lines for SCALING.md: per confirmatory seed, how far its training stream reaches in `steps` steps."""
  lines = []
  for seed in sorted({*PRIMARY_SEEDS, *SECONDARY_SEEDS}):
    found = fresh_tokens(stream_config(seed), steps)
    twice = (f"**{found['read_twice']} documents read twice**" if found["read_twice"]
             else "no training token read twice")
    lines.append(f"- seed {seed}: largest document index read {found['largest_index']} of {found['documents']} "
                 f"(0-based; stream {found['stream']}), {found['read']} documents read (partly or whole) in "
                 f"{steps} steps: {twice}.")
  return "\n".join(lines)


def get_config(arg: str = "diagnosis", results: pathlib.Path = RESULTS):
  """'diagnosis' (step 1, results/expert-scaling-diagnosis/; D2 and after from the committed results in `results`)
  or 'confirmatory' (step 2, results/expert-scaling/; at FROZEN's settings, so only after freeze 1)."""
  if arg == "diagnosis":
    name, runs = NAME, diagnosis_runs(committed_losses(results))
  elif arg == "confirmatory":
    if FROZEN is None:
      raise ValueError("FROZEN is None: the confirmatory runs are listed from freeze 1 on, once the complete "
                       "diagnosis has chosen their settings (python -m configs.sweeps.expert_scaling --freeze1)")
    name, runs = CONFIRM_NAME, confirmatory_runs(FROZEN, INCLUDE_E128)
  else:
    raise ValueError(f"the expert-scaling sweep is 'diagnosis' or 'confirmatory'; got {arg!r}")
  sweep = common.new_sweep(name, "cpu")
  sweep.name = name
  for run, (base, seed, overrides) in runs.items():
    common.add_run(sweep, run, group=run.removesuffix(f"-s{seed}"), base=base, seed=seed, overrides=overrides)
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


def main(argv=None) -> None:
  """Prints what freeze 1 pastes (SCALING.md, "Freeze 1 ..."): `--freeze1`, FROZEN and the deciding numbers of the
  committed diagnosis; `--fresh_tokens`, each confirmatory seed's reach into its training stream."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--freeze1", action="store_true", help="FROZEN and the diagnosis numbers that decided it")
  parser.add_argument("--fresh_tokens", action="store_true", help="the largest document index of every seed")
  args = parser.parse_args(argv)
  if not (args.freeze1 or args.fresh_tokens):
    parser.error("ask for --freeze1, --fresh_tokens or both")
  if args.freeze1:
    print(freeze1_report(committed_losses()), flush=True)
  if args.fresh_tokens:
    print(fresh_tokens_report(), flush=True)


if __name__ == "__main__":
  main()
