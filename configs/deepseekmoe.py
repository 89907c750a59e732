"""DeepSeekMoE 16B (Dai et al. 2024, arXiv:2401.06066, Sec. 5 and Appendix; model card
deepseek-ai/deepseek-moe-16b-base).

  variants: full | cpu

d_model 2048, 28 blocks, 16 heads of 128 (multi-head), vocabulary 102400, 4k context. Block 0 keeps a dense
SwiGLU FFN of width 10944; blocks 1..27 are fine-grained MoE: 64 routed experts of width 1408, top-6 with the
softmax over all 64 experts and no renormalisation, plus 2 shared experts of the same width that every token
uses, dropless: no capacity, every token reaches its 6 experts. Published: 16.4B parameters, 2.8B active per token.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="deepseekmoe-16b",
    model=dict(vocab_size=102400, d_model=2048, num_heads=16, head_dim=128, d_ff=10944, num_layers=28,
               max_seq_len=4096, moe_layer_interval=1, moe_start_block=1, activation="swiglu"),
    # Dropless: DeepSeekMoE's gate has no capacity (Sec. 2-3: g_{i,t} = s_{i,t} for each of a token's top-mK
    # experts, whatever their load; balance comes from the expert- and device-level losses of Sec. 3.3), and the
    # released model's MoEGate (deepseek-ai/deepseek-moe-16b-base, modeling_deepseek.py) drops nothing.
    moe=dict(num_experts=64, router="top_k", top_k=dict(k=6), expert_d_ff=1408, num_shared_experts=2,
             dropless=True),
    published_total=16.4e9, published_active=2.8e9,
    # config.json of deepseek-ai/deepseek-moe-16b-base: "rms_norm_eps": 1e-06, "rope_theta": 10000.
    architecture=dict(rope_theta=1e4, norm_eps=1e-6),
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
