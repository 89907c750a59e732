"""The Switch paper's ablations as one sweep per size, around one shared baseline (Fedus et al. 2021; ST-MoE).

  python experiments/sweep.py --sweep=configs/sweeps/ablations.py:<size>      sizes: cpu, gpu, paper

Every ablation changes one field of the baseline Switch run (E = 8, top-1, capacity factor 1.25, alpha 1e-2,
no z-loss, float32 router, init scale 0.1, no jitter); its other setting IS the baseline run, trained once per
seed and shared by all six ablations, so a comparison is always paired by seed with the same baseline run:

capacity    capacity factor 1.0 / 1.25 / 2.0 for top-1 and top-2 (Table 1). Top-2 sends each token through two
            experts: NOT FLOP-matched to the dense twin (flop_matched=False); its two gates are renormalised to
            sum to 1, as in GShard Algorithm 1.
aux_loss    load-balancing weight alpha 0 / 1e-3 / 1e-2 / 1e-1 (1e-2 chosen from a 1e-1..1e-5 sweep, Sec. 2.2).
z_loss      router z-loss off / beta = 1e-3 (ST-MoE, Sec. 3.1).
precision   router in float32 vs bfloat16: the whole router, softmax included (Table 2: a bfloat16 router
            diverged).
init_scale  init scale 0.1 vs 1.0, 3 seeds (Table 3: -2.72 +- 0.01 vs -3.60 +- 0.68).
jitter      multiplicative router-input jitter eps 0 vs 1e-2 (Table 11: argmax -1.471, input jitter -1.468).

At `cpu` size every run is the confirmatory Switch arm of results/PROTOCOL.md (its learning rate and routing
group, `confirm.SWITCH`) for 610 steps of 32 x 128 bytes = 2.5M fresh tokens (`diagnosis.SETTINGS`), seeds 0 and
1 (and 2 for the init-scale comparison). Expert choice (Zhou et al. 2022) is left out: it routes on future
tokens, which the causal LM objective forbids (config_lib.validate refuses it in the decoder).

The cpu runs are made with `experiments/study.sh configs/sweeps/ablations.py CORE RUNS WORKDIR_ROOT`, from the
model code of PINNED_COMMIT, the commit the first ablation runs were made at: later refactors of moe_jax/ (the
four-axis mesh, scanned blocks) must not change what the remaining runs of the same table compute.
"""

from configs.sweeps import common, confirm, diagnosis

PINNED_COMMIT = "2cea60e9f5a8d5887a589cba48d961e8ba773d21"  # the model code of the first 6 ablation runs

BASELINE = "baseline"
# setting -> (overrides of the baseline, FLOP-matched to the dense twin)
SETTINGS = {
    BASELINE: ({}, True),
    **{f"top{k}-cf{cf:g}": ({"moe.capacity_factor": cf, "moe.router": "top_k", "moe.top_k.k": 2,
                             "moe.top_k.renormalize": True} if k == 2 else {"moe.capacity_factor": cf}, k == 1)
       for k in (1, 2) for cf in (1.0, 1.25, 2.0) if (k, cf) != (1, 1.25)},
    **{f"alpha{a:g}": ({"train.aux_loss_weight": a}, True) for a in (0.0, 1e-3, 1e-1)},
    "beta0.001": ({"train.z_loss_weight": 1e-3}, True),
    "router-bfloat16": ({"moe.router_dtype": "bfloat16"}, True),
    "init1": ({"model.init_scale": 1.0}, True),
    "jitter0.01": ({"moe.jitter_eps": 1e-2}, True),
}
# ablation -> its settings in the order of the paper's table; the baseline takes the default value's place.
ABLATIONS = {
    "capacity": ("top1-cf1", BASELINE, "top1-cf2", "top2-cf1", "top2-cf1.25", "top2-cf2"),
    "aux_loss": ("alpha0", "alpha0.001", BASELINE, "alpha0.1"),
    "z_loss": (BASELINE, "beta0.001"),
    "precision": (BASELINE, "router-bfloat16"),
    "init_scale": (BASELINE, "init1"),
    "jitter": (BASELINE, "jitter0.01"),
}
SEEDS = (0, 1)
EXTRA_SEEDS = {"init_scale": (2,)}  # Table 3 reports 3 seeds
# cpu: the confirmatory Switch arm at the diagnosis budget (2.5M tokens); gpu and paper: configs/lm.py as is.
SIZE_OVERRIDES = {"cpu": dict({k: v for k, v in diagnosis.SETTINGS.items() if k != "moe.num_experts"},
                              **confirm.SWITCH, **{"moe.num_experts": 8})}


def setting_of(run_name: str) -> str:
  """'top2-cf1.25-s1' -> 'top2-cf1.25'."""
  return run_name.rpartition("-s")[0]


def get_config(arg: str = "cpu"):
  if arg not in common.SIZE_SETTINGS or arg.startswith("gpu-quick"):
    raise ValueError(f"ablation sweep size {arg!r} must be one of cpu, gpu, paper")
  if sorted({s for settings in ABLATIONS.values() for s in settings}) != sorted(SETTINGS):
    raise ValueError("every setting must belong to an ablation and every ablation's setting must be defined")
  sweep = common.new_sweep("ablations", arg)
  size_overrides = SIZE_OVERRIDES.get(arg, {})
  # Most informative first, so that a sweep stopped early has answered whole comparisons: the baseline, then the
  # paper's instability claims (router precision, init scale), then capacity, balance, z-loss, jitter, per seed.
  order = (BASELINE, "router-bfloat16", "init1", "top1-cf1", "top1-cf2", "top2-cf1", "top2-cf1.25", "top2-cf2",
           "alpha0", "alpha0.001", "alpha0.1", "beta0.001", "jitter0.01")
  runs = [(setting, seed) for seed in SEEDS for setting in order]
  runs += [(setting, seed) for ablation, seeds in EXTRA_SEEDS.items() for seed in seeds
           for setting in ABLATIONS[ablation]]
  for setting, seed in runs:
    overrides, flop_matched = SETTINGS[setting]
    common.add_run(sweep, f"{setting}-s{seed}", group=setting, base="switch", seed=seed,
                   overrides=dict(size_overrides, **overrides), flop_matched=flop_matched)
  return sweep
