"""A DeepSeek-V3-style decoder (DeepSeek-AI 2024, arXiv:2412.19437, Sec. 4.2 and Table 1 of the hyper-
parameters; model card deepseek-ai/DeepSeek-V3 config.json), with our attention in place of MLA.

  variants: full | cpu

d_model 7168, 61 blocks; blocks 0-2 keep a dense SwiGLU FFN of width 18432, blocks 3-60 are MoE with 256
routed experts of width 2048 (top-8) and 1 shared expert of the same width; vocabulary 129280, untied.
Published: 671B parameters, 37B active per token (the multi-token-prediction module's 14B excluded).

Routing (Sec. 2.1.2, eqs. 12-20; Sec. 4.2): sigmoid affinity scores (eq. 15), the top-8 weights normalised over the
chosen experts (eq. 13) and multiplied by the routed scaling factor 2.5 (model card routed_scaling_factor); each
token limited to 4 of 8 expert groups ranked by the sum of their two best scores (model card n_group 8,
topk_group 4; the paper's node-limited routing, M = 4 nodes); the auxiliary-loss-free balancing bias with update
speed gamma = 0.001 (Sec. 4.2, the value of the first 14.3T tokens); the sequence-wise balance loss with alpha =
0.0001 (Sec. 4.2) and no other balance loss. The cpu variant keeps it on its 16 experts as 4 groups of 4, top-2
groups (half the experts reachable, as 4 of 8 groups are at full size).

Replaced, so excluded from the figures explicitly:
  * attention: DeepSeek-V3's multi-head latent attention (low-rank compressed keys/values, decoupled rotary
    dims) is replaced by our multi-head attention with 128 heads of 128; its parameter count differs.
The calculator's figures for this config are reported in the README, not asserted.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="deepseek-v3-style",
    model=dict(vocab_size=129280, d_model=7168, num_heads=128, head_dim=128, d_ff=18432, num_layers=61,
               max_seq_len=4096, moe_layer_interval=1, moe_start_block=3, activation="swiglu"),
    moe=dict(num_experts=256, router="top_k", expert_d_ff=2048, num_shared_experts=1, dropless=True,
             top_k=dict(k=8, renormalize=True, score_function="sigmoid", routed_scaling=2.5, num_expert_groups=8,
                        topk_expert_groups=4, group_score="top2_sum", balancing_bias_rate=1e-3,
                        sequence_aux_loss_weight=1e-4)),
    published_total=671e9, published_active=37e9, not_modelled="multi-head latent attention",
    train=dict(aux_loss_weight=0.0),  # auxiliary-loss-free: the bias balances, the sequence-wise loss complements
    cpu_moe=dict(top_k=dict(num_expert_groups=4, topk_expert_groups=2)),
    # config.json of deepseek-ai/DeepSeek-V3: "rms_norm_eps": 1e-06, "rope_theta": 10000. Its YaRN extension
    # ("rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}) acts only beyond
    # 4096 tokens, this config's max_seq_len; it is not implemented.
    architecture=dict(rope_theta=1e4, norm_eps=1e-6),
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
