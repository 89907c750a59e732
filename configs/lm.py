"""Switch Transformer and its FLOP-matched dense twin, at CPU size and at the paper's sizes.

  python experiments/train.py --config=configs/lm.py:switch-cpu --workdir=/tmp/switch
  variants: {switch,dense}-{cpu,gpu,base,large}

cpu    4 blocks, d_model 128, 8 experts on blocks 2 and 4, 200 steps on the embedded stdlib corpus with the
       byte tokenizer (32 x 128 tokens a step, under one epoch); step times are in benchmarks/README.md.
gpu    8 blocks, d_model 512, d_ff 2048, 8 experts, 32 x 512 bytes of lm1b a step, 10k steps.
base   Switch-Base (Fedus et al. 2021, Table 9): d_model 768, d_ff 2048, 12 heads of 64, 12 blocks, 128 experts
       on every other block, GEGLU, capacity factor 1.25, dropout 0.1; T5's 32k SentencePiece vocabulary on C4,
       Adafactor with inverse-sqrt decay (lr 1e-2, 10k warmup). Decoder-only here (the paper uses T5's
       encoder-decoder). Paper: neg. log perplexity -1.561 at 100k steps vs -1.731 for T5-Base (Table 1).
large  Switch-Large (Table 9): d_model 1024, d_ff 2816, 16 heads of 64, 24 blocks, 128 experts.

The dense twin is derived from the Switch config (`config_lib.dense_twin`): same widths, every FFN dense, so
FLOPs per token match up to the router (top-1: one expert of the same d_ff per token).
"""

from moe_jax import config_lib

PAPER_SIZES = {
    "base": dict(d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_layers=12),
    "large": dict(d_model=1024, num_heads=16, head_dim=64, d_ff=2816, num_layers=24),
}
GPU_SIZE = dict(d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_layers=8, max_seq_len=512)


def get_config(arg: str = "switch-cpu"):
  kind, _, size = arg.partition("-")
  if kind not in ("switch", "dense") or size not in ("cpu", "gpu", "base", "large"):
    raise ValueError(f"config variant {arg!r} must be {{switch,dense}}-{{cpu,gpu,base,large}}")
  config = config_lib.default_config()  # the cpu size
  if size == "gpu":
    config.model.update(GPU_SIZE)
    config.data.dataset = "lm1b"
    config.train.update(dict(batch_size=32, seq_len=512, num_steps=10_000, warmup_steps=500, learning_rate=1e-3,
                             eval_every=500, eval_batches=50, log_every=100, checkpoint_every=1000))
  elif size in PAPER_SIZES:
    config.model.update(PAPER_SIZES[size])
    config.model.activation = "geglu"  # T5.1.1 gated GELU, as in Switch (d_ff counts each gated branch)
    config.model.max_seq_len = 512
    config.model.dropout = 0.1
    config.model.vocab_size = 32128
    config.moe.num_experts = 128
    config.moe.capacity_factor = 1.25
    config.data.dataset = "c4/en"
    config.data.tokenizer = "/path/to/t5_spm_32k.model"  # set --config.data.tokenizer on the pod
    config.train.batch_size = 256
    config.train.seq_len = 512
    config.train.num_steps = 100_000
    config.train.optimizer = "adafactor"
    config.train.schedule = "rsqrt"
    config.train.learning_rate = 1e-2
    config.train.warmup_steps = 10_000
    config.train.weight_decay = 0.0
    config.train.eval_every = 5_000
    config.train.eval_batches = 100
    config.train.log_every = 100
    config.train.checkpoint_every = 2_000
    config.train.keep_checkpoints = 3
    config.mesh.expert = 8
    config.mesh.data = 0  # all remaining devices
  return config_lib.dense_twin(config) if kind == "dense" else config
