"""A DeepSeek-V3-style decoder (DeepSeek-AI 2024, arXiv:2412.19437, Sec. 4.2 and Table 1 of the hyper-
parameters; model card deepseek-ai/DeepSeek-V3 config.json), with our attention in place of MLA.

  variants: full | cpu

d_model 7168, 61 blocks; blocks 0-2 keep a dense SwiGLU FFN of width 18432, blocks 3-60 are MoE with 256
routed experts of width 2048 (top-8) and 1 shared expert of the same width; vocabulary 129280, untied.
Published: 671B parameters, 37B active per token (the multi-token-prediction module's 14B excluded).

Replaced, so excluded from the figures explicitly:
  * attention: DeepSeek-V3's multi-head latent attention (low-rank compressed keys/values, decoupled rotary
    dims) is replaced by our multi-head attention with 128 heads of 128; its parameter count differs.
  * routing: sigmoid affinity scores with normalised top-8 weights and a routed scaling factor of 2.5, routing
    limited to 4 of 8 expert groups, and the auxiliary-loss-free balancing bias are not implemented yet; the
    config routes with softmax top-8 (renormalised). Parameter counts and FLOPs do not depend on the router.
The calculator's figures for this config are reported in the README, not asserted.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="deepseek-v3-style",
    model=dict(vocab_size=129280, d_model=7168, num_heads=128, head_dim=128, d_ff=18432, num_layers=61,
               max_seq_len=4096, moe_layer_interval=1, moe_start_block=3, activation="swiglu"),
    moe=dict(num_experts=256, router="top_k", top_k=8, renormalize=True, expert_d_ff=2048, num_shared_experts=1,
             dropless=True),
    published_total=671e9, published_active=37e9, not_modelled="multi-head latent attention; sigmoid, "
                                                              "group-limited and bias-balanced routing",
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
