"""Mixtral 8x7B (Jiang et al. 2024, arXiv:2401.04088, Table 1; model card mistralai/Mixtral-8x7B-v0.1).

  variants: full | cpu      python experiments/model_stats.py --config=configs/mixtral.py:full

d_model 4096, 32 blocks, 32 query heads of 128 with 8 key/value heads (GQA), SwiGLU experts of width 14336,
8 experts on every block, top-2 with the softmax taken over the two chosen logits (= renormalised top-2),
dropless (MegaBlocks), vocabulary 32000, untied embeddings, RMSNorm (eps 1e-5), rotary base 1e6, 32k context. Published: 46.7B parameters,
12.9B active per token.

Pod mesh of the `full` variant: FSDP over every chip (mesh.fsdp = 0: all of them), experts not split (so the
dropless routing runs its grouped matmul, not capacity buffers of C = S rows), blocks scanned and rematerialised
(model.scan_layers, model.remat='full'). AdamW state in float32 is 16 bytes a parameter, 747 GB in all, and
'data' or 'expert' axes alone (parameters replicated outside the expert weights) need ~116 GB per chip at 8-way
expert parallelism: FSDP is what makes the state fit.

`python experiments/plan.py --config=configs/mixtral.py:full --mesh=1,256,1,1` (a v5p-256 slice; XLA:CPU on 256
emulated devices, all 32 blocks compiled as one scanned loop; per chip; 2026-12-02):

  batch       parameters  optimizer  temporaries  peak        fits
  1024x4096   0.68 GiB    1.36 GiB   48.96 GiB    51.00 GiB   TPU v5p 95 GiB, H100 80 GB, H200 141 GB (not v4, v5e, v6e)
  256x4096    0.68 GiB    1.36 GiB   20.88 GiB    22.92 GiB   also TPU v4 and v6e 32 GiB (not v5e 16 GiB)

Parameter and optimizer bytes are the compiled step's shards and equal flops.memory_estimate's; the analytical
activations (227.87 GiB at 1024x4096) count every block's activations as kept, i.e. no remat. The temporaries are
XLA:CPU's buffer assignment under its memory-minimising schedule, an estimate of a TPU compiler's (which also
reserves memory for itself). Unscanned, XLA:CPU does not reuse the recomputed blocks' buffers from one block to
the next: `--config.model.scan_layers=False --extrapolate` plans 837.72 GiB a chip at 1024x4096.
"""

from configs import moe_systems

SYSTEM = moe_systems.System(
    name="mixtral-8x7b",
    model=dict(vocab_size=32000, d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, d_ff=14336,
               num_layers=32, max_seq_len=32768, moe_layer_interval=1, activation="swiglu"),
    moe=dict(num_experts=8, router="top_k", top_k=dict(k=2, renormalize=True), dropless=True),
    published_total=46.7e9, published_active=12.9e9,
    # config.json of mistralai/Mixtral-8x7B-v0.1: "rope_theta": 1000000.0, "rms_norm_eps": 1e-05.
    architecture=dict(rope_theta=1e6, norm_eps=1e-5),
)


def get_config(arg: str = "cpu"):
  config = moe_systems.get_config(SYSTEM, arg)
  if arg == "full":
    config.mesh.update(dict(data=1, fsdp=0, expert=1, tensor=1))
    config.model.update(dict(remat="full", scan_layers=True))
  return config
