"""Switch vs dense at equal FLOPs per token, over the number of experts (Fedus et al. 2021, Fig. 4, Table 7).

  python experiments/sweep.py --sweep=configs/sweeps/scaling.py:cpu
  sizes: cpu (2 CPU cores, ~1 hour for the whole sweep), gpu (one GPU, hours), paper (Switch-Base, TPU pods),
         gpu-quick (dense vs E = 8, 16 on one H100/H200 in <= 8 minutes: experiments/gpu_quick.py)

Paper (Table 7, C4 neg. log perplexity at equal FLOPs, Switch-Base teachers): dense T5-Base -1.636; Switch with
16/32/64/128/256 experts -1.505/-1.474/-1.444/-1.432/-1.427 (~0.03 nats per doubling from 16 to 64).
Every run reads fresh tokens (under one epoch of the corpus): small models on repeated tokens show no MoE gain.
"""

from configs.sweeps import common

EXPERTS = {"cpu": (2, 4, 8, 16, 32, 64), "gpu": (2, 4, 8, 16, 32, 64), "paper": (2, 4, 8, 16, 32, 64, 128, 256),
           "gpu-quick": (8, 16), "gpu-quick-tiny": (8, 16)}
SEEDS = {"cpu": (0, 1), "gpu": (0, 1), "paper": (0,), "gpu-quick": (0,), "gpu-quick-tiny": (0,)}


def get_config(size: str = "cpu"):
  sweep = common.new_sweep("scaling", size)
  for seed in SEEDS[size]:
    common.add_run(sweep, f"dense-s{seed}", group="dense", base="dense", seed=seed)
    for experts in EXPERTS[size]:
      common.add_run(sweep, f"switch-e{experts}-s{seed}", group=f"switch-e{experts}", base="switch", seed=seed,
                     overrides={"moe.num_experts": experts})
  return sweep
