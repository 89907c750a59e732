"""Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088, Table 1; model card mistralai/Mixtral-8x7B-v0.1).

  variants: full | cpu      python experiments/model_stats.py --config=configs/mixtral.py:full

d_model 4096, 32 blocks, 32 query heads of 128 with 8 key/value heads (GQA), SwiGLU experts of width 14336,
8 experts on every block, top-2 with the softmax taken over the two chosen logits (= renormalised top-2),
dropless (MegaBlocks), vocabulary 32000, untied embeddings, RMSNorm, 32k context. Published: 46.7B parameters,
12.9B active per token.

Pod mesh of the `full` variant: FSDP over every chip (mesh.fsdp = 0: all of them), experts not split (so the
dropless routing runs its grouped matmul, not capacity buffers of C = S rows), remat='full'. AdamW state in
float32 is 16 bytes a parameter, 747 GB in all: no slice short of ~8 chips of 95 GiB holds it, and
'data' or 'expert' axes alone (parameters replicated outside the expert weights) need ~116 GB per chip at 8-way
expert parallelism, so FSDP is what makes the model's state fit.

`python experiments/plan.py --config=configs/mixtral.py:full --mesh=1,256,1,1 --extrapolate` (XLA:CPU, 256
emulated devices, 1 and 2 blocks compiled and extended to 32; per device; 2026-12-02):

  batch       parameters  optimizer  temporaries (XLA)  peak (XLA)   analytical total   fits v5p 95 GiB
  1024x4096   0.68 GiB    1.36 GiB   835.68 GiB         837.72 GiB   230.59 GiB         no
  256x4096    0.68 GiB    1.36 GiB   304.25 GiB         306.29 GiB    59.69 GiB         no (XLA) / yes (analytical)

Parameter and optimizer bytes per chip are exact (the compiled step's shards; equal to flops.memory_estimate).
The temporaries are XLA:CPU's and do not show remat's saving at this size (on --mesh=1,32,8,1 at 1024x4096,
remat='full' planned 1325 GiB and 'none' 1233 GiB; here each extra block adds ~5.5 GiB per sequence per chip,
3x the analytical count of a block's activations without remat): whether a TPU compiler keeps that much is not settled by this plan, so the config
does not claim to fit; the analytical estimate at 256 x 4096 tokens does fit a v5p-256 slice.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="mixtral-8x7b",
    model=dict(vocab_size=32000, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, d_ff=14336,
               num_layers=32, max_seq_len=32768, moe_layer_interval=1, activation="swiglu"),
    moe=dict(num_experts=8, router="top_k", top_k=2, renormalize=True, dropless=True),
    published_total=46.7e9, published_active=12.9e9,
)


def get_config(arg: str = "cpu"):
  config = moe_systems.get_config(SYSTEM, arg)
  if arg == "full":
    config.mesh.update(dict(data=1, fsdp=0, expert=1, tensor=1))
    config.model.remat = "full"
  return config
