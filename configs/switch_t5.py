"""T5 and Switch Transformer encoder-decoders at the sizes of Switch Table 9 (Fedus et al. 2021), and `cpu`
variants of the same structure that train on the embedded corpus.

  python experiments/train.py --config=configs/switch_t5.py:switch-base-cpu --workdir=/tmp/switch_t5
  python experiments/model_stats.py --config=configs/switch_t5.py:switch-base
  variants: {t5-base, switch-base, t5-large, switch-large, t5-xxl, switch-xxl, switch-c}[-cpu]

Table 9 (d_kv = 64 everywhere; "Num. Layers" per stack, T5's convention):
  model         d_model  d_ff         heads  layers  experts  expert freq.
  T5-Base       768      2048 GEGLU   12     12      -        -
  T5-Large      1024     2816 GEGLU   16     24      -        -
  T5-XXL        4096     10240 GEGLU  64     24      -        -
  Switch-Base   768      2048 GEGLU   12     12      128      1/2
  Switch-Large  1024     2816 GEGLU   16     24      128      1/2
  Switch-XXL    4096     10240 GEGLU  64     24      64 (*)   1/2
  Switch-C      2080     6144 ReLU    32     15      2048     1
Common: T5's 32k SentencePiece vocabulary (32128 rows with the 100 sentinels, padded), C4, span corruption at
15% noise and mean span 3 with 512 input tokens (114 targets), top-1 routing, capacity factor 1.25 (Switch-C
1.0, flaxformer switch_c.gin), evaluation capacity 2.0, aux loss 0.01, no router z-loss, Adafactor with
inverse-square-root decay (lr 1e-2, 10k warmup), 2^20 tokens per batch (2048 x 512).

Embeddings. The released Switch-Base and -Large reuse the token embedding for the logits (flaxformer
switch_classic_base.gin / switch_classic_large.gin: `output_logits_factory = None`); XXL and C have a separate
logits layer. Table 9's 223M for T5-Base is the tied count (untied, as in T5.1.1, it would be 248M), so base
and large are tied here and XXL and C untied.

(*) Switch-XXL: Table 9 prints 64 experts, but its 395B parameters are what 128 experts on every other FFN give
(flaxformer's switch_xxl.gin: NUM_EXPERTS = 128); 64 experts would give 201B. We use 128.

What the calculator gives against the table: `python experiments/model_stats.py --switch_table` (in the README).
Parameters reproduce for T5-Base, Switch-Base, Switch-XXL and Switch-C (and Table 7's series to its rounding);
Switch-Large's widths give 27.1B, not 26B; no reading of 512 / 114 tokens reproduces the FLOPs column.
tests/test_switch_t5.py asserts what reproduces and pins each gap.

cpu variants: the same structure (gated or not, tied or not, MoE on the same blocks of each stack, relative
positions) at d_model 64 with 4 heads of 16, 2 + 2 blocks (Switch-C: every FFN MoE), at most 8 experts, on the
stdlib corpus with the byte tokenizer and 100 sentinels (vocabulary 359), 128 input tokens (28 targets).
"""

from moe_jax import config_lib

# name -> model.* and moe.* fields at the published size (Table 9; see the module docstring for the sources).
SIZES = {
    "t5-base": dict(d_model=768, d_ff=2048, num_heads=12, num_layers=12, activation="geglu", tie_embeddings=True),
    "t5-large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24, activation="geglu", tie_embeddings=True),
    "t5-xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24, activation="geglu", tie_embeddings=False),
    "switch-c": dict(d_model=2080, d_ff=6144, num_heads=32, num_layers=15, activation="relu", tie_embeddings=False),
}
EXPERTS = {"switch-base": ("t5-base", 128, 2), "switch-large": ("t5-large", 128, 2),
           "switch-xxl": ("t5-xxl", 128, 2), "switch-c": ("switch-c", 2048, 1)}  # (dense size, E, interval)

# Published figures (Table 9): parameters and forward FLOPs per sequence.
TABLE9 = {
    "t5-base": (223e6, 124e9), "switch-base": (7.4e9, 124e9), "t5-large": (739e6, 425e9),
    "switch-large": (26e9, 425e9), "t5-xxl": (11e9, 6.3e12), "switch-xxl": (395e9, 6.3e12),
    "switch-c": (1571e9, 890e9),
}
# Table 7: Switch-Base parameters by expert count.
TABLE7 = {16: 1.1e9, 32: 2.0e9, 64: 3.8e9, 128: 7.4e9, 256: 14.7e9}

CPU = dict(d_model=64, num_heads=4, head_dim=16, max_seq_len=128)
CPU_LAYERS = 2
CPU_MAX_EXPERTS = 8


def get_config(arg: str = "switch-base-cpu"):
  name, cpu = (arg[: -len("-cpu")], True) if arg.endswith("-cpu") else (arg, False)
  if name not in TABLE9:
    raise ValueError(f"config variant {arg!r} must be one of {sorted(TABLE9)}, optionally with '-cpu'")
  dense, experts, interval = EXPERTS.get(name, (name, 0, 0))
  config = config_lib.default_config()
  # Norms: T5's RMSNorm at eps 1e-6 (layer_norm_epsilon of the released configs), moe_jax's default. Attention
  # logits: T5 and Switch leave them unscaled and fold d_kv^-1/2 into the query initialisation (Mesh TF, HF T5's
  # q init std (d_model * d_kv)^-1/2); moe_jax's Switch init does not fold it, so a from-scratch config keeps
  # model.scale_attention=True, the same logit scale at init. A checkpoint imported from T5 or Switch carries the
  # fold in its query weights and sets model.scale_attention=False.
  config.model.update(dict(SIZES[dense], architecture="encoder_decoder", positions="relative", head_dim=64,
                           num_decoder_layers=0, max_seq_len=512, vocab_size=32128, dropout=0.0,
                           moe_layer_interval=interval))
  config.moe.update(dict(num_experts=max(experts, 1), router="switch", capacity_factor=1.0 if name == "switch-c"
                         else 1.25, eval_capacity_factor=2.0, dispatch="gather"))
  config.data.update(dict(objective="span_corruption", noise_density=0.15, mean_noise_span_length=3.0,
                          num_sentinels=100))
  config.train.update(dict(aux_loss_weight=1e-2, z_loss_weight=0.0))
  if cpu:
    return _cpu(config, experts)
  config.model.dtype = "bfloat16"
  config.data.dataset = "c4/en"
  config.data.tokenizer = "/path/to/t5_spm_32k.model"  # set --config.data.tokenizer on the pod
  config.train.update(dict(batch_size=2048, seq_len=512, num_steps=500_000, optimizer="adafactor",
                           schedule="rsqrt", learning_rate=1e-2, warmup_steps=10_000, weight_decay=0.0,
                           eval_every=5_000, eval_batches=100, log_every=100, checkpoint_every=2_000,
                           keep_checkpoints=3))
  config.mesh.data, config.mesh.expert = 0, 8
  return config


def _cpu(config, experts: int):
  """The same structure at a tiny width: gated or not, tied or not, MoE interval, relative positions kept."""
  ratio = config.model.d_ff / config.model.d_model
  config.model.update(dict(CPU, d_ff=int(CPU["d_model"] * ratio), num_layers=CPU_LAYERS, vocab_size=0))
  config.moe.num_experts = min(max(experts, 1), CPU_MAX_EXPERTS)
  config.train.update(dict(batch_size=16, seq_len=128, num_steps=200, warmup_steps=20, learning_rate=3e-3,
                           eval_every=100, eval_batches=4, log_every=20, checkpoint_every=100))
  return config
