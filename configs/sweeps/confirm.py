"""Confirmatory study: Switch vs its FLOP-matched dense twin on fresh tokens, as pre-registered in results/PROTOCOL.md.

  python experiments/sweep.py --sweep=configs/sweeps/confirm.py --workdir_root=... --results_root=results

Run it from a copy of the commit that holds this file (e.g. `git archive`, with $MOE_JAX_COMMIT naming it):
every result.json records its commit, and the model code there (moe_jax/, configs/lm.py) must equal
PINNED_COMMIT's (`git diff --stat PINNED_COMMIT <run commit> -- moe_jax configs/lm.py` shows nothing but
moe_jax/sweep.py, the runner). Every setting below is fixed by the protocol from the diagnosis on seed 100
(results/diagnosis/); changing one after a confirmatory result is a deviation and is reported as one.

Primary: dense vs Switch E = 8, seeds 0, 1, 2, paired by seed. Secondary: E = 2, 4, 16, seeds 0, 1. Each run:
2450 steps of 32 x 128 bytes = 10.04M tokens, 32% of the 31.07M-token training split (no packing stream reaches
a second epoch for seeds 0-2: the largest document index read is 1186 of 1752), evaluated every 122 steps and at
the end on the fixed 16 validation batches (65,536 tokens of the file-disjoint validation split).
"""

from configs.sweeps import common

PINNED_COMMIT = "febd857ecc83c3600b39a9a8e30aa27e1416f193"  # the model code of the diagnosis runs
RESERVED_SEED = 100  # diagnosis only: never a confirmatory seed
STEPS = 2450
SETTINGS = {"train.num_steps": STEPS, "train.warmup_steps": 245, "train.eval_every": 122, "train.eval_batches": 16,
            "train.checkpoint_every": 122, "train.log_every": 122}
# Each arm's own learning rate and the Switch routing, chosen from the diagnosis by the rule of PROTOCOL.md
# (applied to the 7 diagnosis runs finished when the protocol was written; the "freeze" commit re-applies it to
# all 14 before the first confirmatory run).
DENSE = {"train.learning_rate": 3e-3}
SWITCH = {"train.learning_rate": 3e-3, "moe.group_size": 4096}
PRIMARY_EXPERTS, PRIMARY_SEEDS = 8, (0, 1, 2)
SECONDARY_EXPERTS, SECONDARY_SEEDS = (16, 4, 2), (0, 1)


def get_config(arg: str = "cpu"):
  if arg != "cpu":
    raise ValueError(f"the confirmatory sweep is CPU-sized only; got size {arg!r}")
  if RESERVED_SEED in PRIMARY_SEEDS + SECONDARY_SEEDS:
    raise ValueError(f"seed {RESERVED_SEED} is reserved for the diagnosis")
  sweep = common.new_sweep("confirm", arg)
  sweep.name = "confirm"  # results/confirm/

  def switch(experts: int, seed: int) -> None:
    common.add_run(sweep, f"switch-e{experts}-s{seed}", group=f"switch-e{experts}", base="switch", seed=seed,
                   overrides=dict(SETTINGS, **SWITCH, **{"moe.num_experts": experts}))

  for seed in PRIMARY_SEEDS:  # pairs first: a stopped sweep has whole pairs
    common.add_run(sweep, f"dense-s{seed}", group="dense", base="dense", seed=seed, overrides=dict(SETTINGS, **DENSE))
    switch(PRIMARY_EXPERTS, seed)
  for seed in SECONDARY_SEEDS:
    for experts in SECONDARY_EXPERTS:
      switch(experts, seed)
  return sweep
