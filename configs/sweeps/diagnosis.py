"""Diagnosis on the reserved seed 100: why Switch E = 8 does not beat its dense twin at CPU size (issue 11.2).

  python experiments/sweep.py --sweep=configs/sweeps/diagnosis.py --workdir_root=/work/runs --results_root=results

Seed 100 is for diagnosis and tuning only; no confirmatory result uses it (results/PROTOCOL.md). Every run:
configs/lm.py:{dense,switch}-cpu at E = 8, 610 steps of 32 x 128 bytes (2.5M fresh tokens, ~1/12 epoch of the
stdlib corpus), warmup 60 steps, cosine decay to 0.1x, evaluated every 61 steps on 16 fixed validation batches.

Runs (a run takes ~13-16 minutes on 2 shared cores, so the whole sweep ~3.5 hours):
  lr*         a learning-rate sweep for EACH arm: 1e-3, 3e-3 (today's default), 6e-3, 1e-2 (spans 10x).
              Each arm gets its own best rate in the protocol: equal FLOPs, not equal hyper-parameters.
  group-*     routing group size at lr 3e-3: 1024 tokens, the whole batch (4096) vs one sequence (128, switch-lr0.003)
  cap-*       capacity factor at lr 3e-3: 2.0, and no drops (capacity factor E = 8, so C = S, with the gather
              backend: the ragged_dot dropless path is ~9x a dense FFN on CPU, see PLATFORM-NOTES) vs 1.25
  aux-*       load-balancing weight alpha at lr 3e-3: 1e-3, 1e-1 vs 1e-2
Execution order (`ORDER`), the most informative first so that a sweep stopped early has answered the most: both
arms at 3e-3, 1e-2, 1e-3 (already 10x), then the two routing settings that remove drops (batch-wide groups, no
capacity limit), then the fourth rate 6e-3, then the rest.
"""

from configs.sweeps import common

SEED = 100  # reserved for diagnosis
EXPERTS = 8
STEPS = 610  # 610 * 32 * 128 = 2.50M tokens
SETTINGS = {"train.num_steps": STEPS, "train.warmup_steps": 60, "train.eval_every": 61, "train.eval_batches": 16,
            "train.checkpoint_every": 61, "train.log_every": 61, "moe.num_experts": EXPERTS}
BASE_LR = 3e-3
LEARNING_RATES = (1e-3, 3e-3, 6e-3, 1e-2)
# name -> (group, overrides) of the Switch ablations at BASE_LR (each differs from switch-lr3e-3 in one field)
ABLATIONS = {
    "group-1024": ("group size 1024", {"moe.group_size": 1024}),
    "group-4096": ("group size 4096 (batch)", {"moe.group_size": 4096}),
    "cap-2": ("capacity factor 2.0", {"moe.capacity_factor": 2.0}),
    "cap-none": ("no drops (cf = E)", {"moe.capacity_factor": float(EXPERTS),
                                        "moe.eval_capacity_factor": float(EXPERTS)}),
    "aux-1e-3": ("alpha 1e-3", {"train.aux_loss_weight": 1e-3}),
    "aux-1e-1": ("alpha 1e-1", {"train.aux_loss_weight": 1e-1}),
}
ORDER = ("dense-lr0.003", "switch-lr0.003", "dense-lr0.01", "switch-lr0.01", "dense-lr0.001", "switch-lr0.001",
         "switch-group-4096", "switch-cap-none", "dense-lr0.006", "switch-lr0.006", "switch-group-1024", "switch-cap-2",
         "switch-aux-1e-1", "switch-aux-1e-3")


def get_config(arg: str = "cpu"):
  if arg != "cpu":
    raise ValueError(f"the diagnosis sweep is CPU-sized only; got size {arg!r}")
  runs = {}
  for lr in LEARNING_RATES:
    for base in ("dense", "switch"):
      runs[f"{base}-lr{lr:g}"] = (base, f"{base} lr {lr:g}", {"train.learning_rate": lr})
  for name, (group, overrides) in ABLATIONS.items():
    runs[f"switch-{name}"] = ("switch", group, dict({"train.learning_rate": BASE_LR}, **overrides))
  if sorted(runs) != sorted(ORDER):
    raise ValueError(f"ORDER must list every run once: {sorted(set(runs) ^ set(ORDER))}")
  sweep = common.new_sweep("diagnosis", arg)
  sweep.name = "diagnosis"  # results/diagnosis/
  for name in ORDER:
    base, group, overrides = runs[name]
    common.add_run(sweep, name, group=group, base=base, seed=SEED, overrides=dict(SETTINGS, **overrides))
  return sweep


# The rule of results/PROTOCOL.md that turns the diagnosis into the confirmatory settings (configs/sweeps/confirm.py
# holds its outcome; tests/test_diagnosis.py checks the two agree on the committed results).
TIE_NATS = 0.001  # a setting must beat the default by more than this to replace it
DEFAULT_ROUTING = "switch-lr0.003"  # one group per sequence, capacity factor 1.25
ROUTING_CANDIDATES = (DEFAULT_ROUTING, "switch-group-1024", "switch-group-4096", "switch-cap-2", "switch-cap-none")
ALPHA_CANDIDATES = {"switch-aux-1e-3": 1e-3, DEFAULT_ROUTING: 1e-2, "switch-aux-1e-1": 1e-1}


def protocol_choice(final_loss: dict[str, float]) -> tuple[dict, dict]:
  """(dense overrides, Switch overrides) chosen from {run name: final eval loss} by the protocol's rule: each
  arm's best learning rate, the best Switch routing at BASE_LR and the best alpha at BASE_LR, each on its own;
  a candidate replaces the default only when it is better by more than TIE_NATS. Raises while runs are missing."""
  missing = sorted(set(ORDER) - set(final_loss))
  if missing:
    raise ValueError(f"the diagnosis is incomplete; missing runs: {missing}")

  def best(candidates: dict[str, object], default: str):
    winner = min(candidates, key=lambda name: final_loss[name])
    return candidates[winner if final_loss[winner] < final_loss[default] - TIE_NATS else default]

  rate = {arm: best({f"{arm}-lr{lr:g}": lr for lr in LEARNING_RATES}, f"{arm}-lr{BASE_LR:g}")
          for arm in ("dense", "switch")}
  routing = best({name: ABLATIONS[name[len("switch-"):]][1] if name != DEFAULT_ROUTING else {}
                  for name in ROUTING_CANDIDATES}, DEFAULT_ROUTING)
  alpha = best(ALPHA_CANDIDATES, DEFAULT_ROUTING)
  switch = {"train.learning_rate": rate["switch"], **routing}
  if alpha != ALPHA_CANDIDATES[DEFAULT_ROUTING]:
    switch["train.aux_loss_weight"] = alpha
  return {"train.learning_rate": rate["dense"]}, switch
