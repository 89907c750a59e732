"""DBRX (Databricks 2024, model card databricks/dbrx-base and its config.json).

  variants: full | cpu

d_model 6144, 40 blocks, 48 query heads of 128 with 8 key/value heads, GLU (SiLU) experts of width 10752,
16 experts on every block, top-4 with normalised weights, dropless (MegaBlocks), vocabulary 100352, untied
embeddings, 32k context, LayerNorm without bias (eps 1e-5), rotary base 5e5, q/k/v clamped to [-8, 8].
Published: 132B parameters, 36B active per token.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="dbrx",
    model=dict(vocab_size=100352, d_model=6144, num_heads=48, num_kv_heads=8, head_dim=128, d_ff=10752,
               num_layers=40, max_seq_len=32768, moe_layer_interval=1, activation="swiglu", norm="layernorm_nobias"),
    moe=dict(num_experts=16, router="top_k", top_k=dict(k=4, renormalize=True), dropless=True),
    published_total=132e9, published_active=36e9,
    # config.json of databricks/dbrx-base: "attn_config": {"clip_qkv": 8, "rope_theta": 500000}; its norms are
    # torch.nn.LayerNorm(d_model, bias=False) at torch's default eps 1e-5 (modeling_dbrx.py, NormAttentionNorm).
    architecture=dict(rope_theta=5e5, clip_qkv=8.0, norm_eps=1e-5),
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
