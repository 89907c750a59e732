"""Every router family on the span-corruption encoder-decoder at equal FLOPs per token (issue 17.5).

  python experiments/sweep.py --sweep=configs/sweeps/routers.py:cpu

The model is `configs/switch_t5.py:switch-base-cpu` (a T5.1.1-style encoder-decoder with MoE on every other FFN
of each stack, 8 experts, byte tokens with 100 sentinels, span corruption at 15% noise and mean span 3 on the
stdlib corpus), 1000 steps of 16 x 104 input tokens (24 targets), seeds 0 and 1. One field set per router:

  switch         top-1 token choice, capacity factor 1.25 (Fedus et al. 2021)                   FLOP-matched
  top2           top-2 token choice, renormalised gates (GShard, Lepikhin et al. 2020)            2x expert FLOPs
  expert-choice  each expert takes its top C = S / E tokens (Zhou et al. 2022), in the encoder    FLOP-matched
  soft-moe       P = S / E slots per expert, each a softmax mixture of the group's tokens
                 (Puigcerver et al. 2023), in the encoder                                         FLOP-matched
  base           balanced assignment, exactly S / E tokens per expert (Lewis et al. 2021)         FLOP-matched
  hash           a fixed hash of the token id, no learned router (Roller et al. 2021)             FLOP-matched
  aux-free       top-1 with DeepSeek-V3's auxiliary-loss-free balancing bias instead of the
                 load-balancing loss (Wang et al. 2024, gamma 1e-3)                              FLOP-matched

Expert choice and Soft MoE route on the whole group, later tokens included, so they route the encoder only;
the decoder stack's MoE layers route with Switch (`moe.decoder_router`) in those two arms. Hash and the
aux-loss-free run train without the load-balancing loss (alpha 0): hash has no router to balance, and the bias
replaces the loss by design.
"""

from configs.sweeps import common

# Routing groups of S = 64 tokens in both stacks, a multiple of the number of experts (BASE gives every expert exactly
# S / E tokens of a group) that tiles the encoder's 16 x 104 inputs and the decoder's 16 x 24 targets. 104 inputs, not
# the config's 128: 128 give 29 targets, and no such S tiles 16 x 29.
INPUT_TOKENS = 104
TOKENS_PER_GROUP = 64
EXPERTS = 8
ROUTERS = {  # name -> (overrides of switch-base-cpu, FLOP-matched to Switch)
    "switch": ({}, True),
    "top2": ({"moe.router": "top_k", "moe.top_k.k": 2, "moe.top_k.renormalize": True}, False),
    "expert-choice": ({"moe.router": "expert_choice", "moe.capacity_factor": 1.0, "moe.decoder_router": "switch"},
                      True),
    "soft-moe": ({"moe.router": "soft_moe", "moe.dispatch": "einsum", "moe.decoder_router": "switch",
                  "moe.soft_moe.slots_per_expert": TOKENS_PER_GROUP // EXPERTS}, True),
    "base": ({"moe.router": "base"}, True),
    "hash": ({"moe.router": "hash", "train.aux_loss_weight": 0.0}, True),
    "aux-free": ({"moe.router": "top_k", "moe.top_k.balancing_bias_rate": 1e-3, "train.aux_loss_weight": 0.0}, True),
}
SEEDS = (0, 1)
SETTINGS = {"train.num_steps": 1000, "train.warmup_steps": 100, "train.eval_every": 100, "train.eval_batches": 8,
            "train.checkpoint_every": 100, "train.log_every": 100, "moe.num_experts": EXPERTS,
            "moe.group_size": TOKENS_PER_GROUP, "train.seq_len": INPUT_TOKENS}


def get_config(arg: str = "cpu"):
  if arg != "cpu":
    raise ValueError(f"the router comparison is CPU-sized only; got size {arg!r}")
  sweep = common.new_sweep("routers", arg)
  for seed in SEEDS:
    for name, (overrides, flop_matched) in ROUTERS.items():
      common.add_run(sweep, f"{name}-s{seed}", group=name, base="switch-base", seed=seed, config_file="switch_t5",
                     overrides=dict(SETTINGS, **overrides), flop_matched=flop_matched)
  return sweep
