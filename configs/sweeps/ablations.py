"""The Switch paper's ablations, one sweep each (Fedus et al. 2021; ST-MoE, Zoph et al. 2022).

  python experiments/sweep.py --sweep=configs/sweeps/ablations.py:<ablation>-<size>
  ablations: capacity, aux_loss, z_loss, precision, init_scale, jitter;  sizes: cpu, gpu, paper

capacity    capacity factor 1.0 / 1.25 / 2.0 for top-1 and top-2 (Table 1: within ~0.01 nats for Switch-Base).
            Top-2 sends each token through two experts: NOT FLOP-matched to the dense twin (flop_matched=False);
            its two gates are renormalised to sum to 1, as in GShard Algorithm 1.
aux_loss    load-balancing weight alpha 0 / 1e-3 / 1e-2 / 1e-1 (1e-2 chosen from a 1e-1..1e-5 sweep, Sec. 2.2).
z_loss      router z-loss off / beta = 1e-3 (ST-MoE, Sec. 3.1).
precision   router in float32 vs bfloat16 (Table 2, "selective precision": bf16 routers can diverge).
init_scale  init scale 0.1 vs 1.0 over 3 seeds (Table 3: -2.72 +- 0.01 vs -3.60 +- 0.68).
jitter      router input jitter eps 0 vs 1e-2.
Expert choice (Zhou et al. 2022) is left out: it routes on future tokens, which the causal LM objective forbids
(config_lib.validate refuses it in the decoder).
"""

from configs.sweeps import common

# ablation -> [(run name, group, overrides, flop_matched)]
ABLATIONS = {
    "capacity": [
        (f"top{k}-cf{cf}", f"top{k}-cf{cf}",
         {"moe.capacity_factor": cf, "moe.router": "switch" if k == 1 else "top_k", "moe.top_k": k,
          "moe.renormalize": k == 2}, k == 1)
        for k in (1, 2) for cf in (1.0, 1.25, 2.0)
    ],
    "aux_loss": [(f"alpha{a:g}", f"alpha={a:g}", {"train.aux_loss_weight": a}, True) for a in (0.0, 1e-3, 1e-2, 1e-1)],
    "z_loss": [(f"beta{b:g}", f"beta={b:g}", {"train.z_loss_weight": b}, True) for b in (0.0, 1e-3)],
    "precision": [(f"router-{d}", f"router {d}", {"moe.router_dtype": d}, True) for d in ("float32", "bfloat16")],
    "init_scale": [(f"init{s:g}", f"init scale {s:g}", {"model.init_scale": s}, True) for s in (0.1, 1.0)],
    "jitter": [(f"jitter{e:g}", f"jitter {e:g}", {"moe.jitter_eps": e}, True) for e in (0.0, 1e-2)],
}
SEEDS = {"init_scale": (0, 1, 2)}  # Table 3 reports 3 seeds
DEFAULT_SEEDS = (0,)


def get_config(arg: str = "capacity-cpu"):
  ablation, _, size = arg.rpartition("-")
  if ablation not in ABLATIONS:
    raise ValueError(f"ablation {ablation!r} must be one of {tuple(ABLATIONS)} (arg '<ablation>-<size>')")
  sweep = common.new_sweep(ablation, size)
  for seed in SEEDS.get(ablation, DEFAULT_SEEDS):
    for name, group, overrides, flop_matched in ABLATIONS[ablation]:
      common.add_run(sweep, f"{name}-s{seed}", group=group, base="switch", seed=seed, overrides=overrides,
                     flop_matched=flop_matched)
  return sweep
