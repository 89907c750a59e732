"""Qwen3-30B-A3B (Qwen team 2025, Qwen3 Technical Report arXiv:2505.09388, Table 2; model card
Qwen/Qwen3-30B-A3B and its config.json).

  variants: full | cpu

d_model 2048, 48 blocks, 32 query heads of 128 with 4 key/value heads (so attention is 4096 wide, twice
d_model), 128 SwiGLU experts of width 768 on every block, top-8 with normalised weights, no shared expert,
dropless, vocabulary 151936, untied embeddings, 32k context, RMSNorm QK-norm per head (two scales of head_dim per
block), no attention biases, rotary base 1e6, RMSNorm eps 1e-6. Published: 30.5B parameters, 3.3B active.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="qwen3-30b-a3b",
    model=dict(vocab_size=151936, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=128, d_ff=768,
               num_layers=48, max_seq_len=32768, moe_layer_interval=1, activation="swiglu"),
    moe=dict(num_experts=128, router="top_k", top_k=dict(k=8, renormalize=True), dropless=True),
    published_total=30.5e9, published_active=3.3e9,
    # config.json of Qwen/Qwen3-30B-A3B: "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "attention_bias": false;
    # q_norm and k_norm are RMSNorms of head_dim (transformers qwen3_moe/modeling_qwen3_moe.py, Qwen3MoeAttention).
    architecture=dict(rope_theta=1e6, norm_eps=1e-6, qk_norm="per_head"),
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
