"""Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088, Table 1; model card mistralai/Mixtral-8x7B-v0.1).

  variants: full | cpu      python experiments/model_stats.py --config=configs/mixtral.py:full

d_model 4096, 32 blocks, 32 query heads of 128 with 8 key/value heads (GQA), SwiGLU experts of width 14336,
8 experts on every block, top-2 with the softmax taken over the two chosen logits (= renormalised top-2),
dropless (MegaBlocks), vocabulary 32000, untied embeddings, RMSNorm, 32k context. Published: 46.7B parameters,
12.9B active per token.
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
  return moe_systems.get_config(SYSTEM, arg)
