"""OLMoE-1B-7B (Muennighoff et al. 2024, arXiv:2409.02060, Table 1; model card allenai/OLMoE-1B-7B-0924).

  variants: full | cpu

d_model 2048, 16 blocks, 16 heads of 128, 64 SwiGLU experts of width 1024 on every block, top-8 without
renormalisation, dropless, vocabulary 50304, untied embeddings, 4k context, QK-norm as one RMSNorm over the whole
projected q and one over k (two scales of d_model per block), RMSNorm eps 1e-5, rotary base 1e4. Published: 6.9B
parameters, 1.3B active per token.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="olmoe-1b-7b",
    model=dict(vocab_size=50304, d_model=2048, num_heads=16, head_dim=128, d_ff=1024, num_layers=16,
               max_seq_len=4096, moe_layer_interval=1, activation="swiglu"),
    moe=dict(num_experts=64, router="top_k", top_k=dict(k=8), dropless=True),
    published_total=6.9e9, published_active=1.3e9,
    # config.json of allenai/OLMoE-1B-7B-0924: "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "clip_qkv": null;
    # q_norm and k_norm are RMSNorms of the whole projection (transformers olmoe/modeling_olmoe.py, OlmoeAttention).
    architecture=dict(rope_theta=1e4, norm_eps=1e-5, qk_norm="full"),
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
