"""DBRX (Databricks 2024, model card databricks/dbrx-base and its config.json).

  variants: full | cpu

d_model 6144, 40 blocks, 48 query heads of 128 with 8 key/value heads, GLU (SiLU) experts of width 10752,
16 experts on every block, top-4 with normalised weights, dropless (MegaBlocks), vocabulary 100352, untied
embeddings, 32k context. Published: 132B parameters, 36B active per token. DBRX's LayerNorms have no bias; ours
do (2 * d_model per norm: under 0.001 % of the total).
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="dbrx",
    model=dict(vocab_size=100352, d_model=6144, num_heads=48, num_kv_heads=8, head_dim=128, d_ff=10752,
               num_layers=40, max_seq_len=32768, moe_layer_interval=1, activation="swiglu", norm="layernorm"),
    moe=dict(num_experts=16, router="top_k", top_k=dict(k=4, renormalize=True), dropless=True),
    published_total=132e9, published_active=36e9,
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
