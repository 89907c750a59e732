"""GLaM 64B/64E (Du et al. 2022, arXiv:2112.06905, Table 4 and Sec. 4).

  variants: full | cpu

d_model 8192, 64 blocks with 128 heads of 128, FFN hidden width 32768, MoE on every other block (32 MoE
blocks) with 64 experts and GShard top-2 routing (capacity, second expert by the GShard policy), vocabulary
256k. Published: 1.2T parameters, 96.6B activated per token. Not modelled: GLaM's per-layer relative position
bias (we use rotary positions).

The published pair is not reproduced by our count (tests/test_moe_systems.py states the figures): with plain
GELU FFNs of width 32768 we count 1.155T total / 90.1B active; with the gated GELU that Sec. 4 describes,
1.71T / 115.9B. Table 4's two figures imply 0.556B parameters per expert FFN and 43.2B outside the FFNs, more
than the attention and embeddings of these widths hold (38.6B), so some count of the paper's differs from ours.
This config uses plain GELU, the nearer of the two.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="glam-64b-64e",
    model=dict(vocab_size=256000, d_model=8192, num_heads=128, head_dim=128, d_ff=32768, num_layers=64,
               max_seq_len=1024, moe_layer_interval=2, activation="gelu"),
    moe=dict(num_experts=64, router="top_k", top_k=dict(k=2), capacity_factor=2.0),
    published_total=1.2e12, published_active=96.6e9, not_modelled="relative position bias",
)


def get_config(arg: str = "cpu"):
  return moe_systems.get_config(SYSTEM, arg)
