"""FLOPs and parameter counts of a `ModelConfig`, analytic (a multiply-add counts 2 FLOPs).

Conventions
  * Per token, forward pass, sequence length L; training = 3 x forward (backward = 2 x forward,
    Kaplan et al. 2020, Sec. 2.1).
  * Attention scores QK^T and AV are counted over the full L x L square, not the causal half: that is what a
    masked dense attention executes (and what XLA's cost analysis counts).
  * "Active" FLOPs are the paper's notion (Switch Sec. 2): each token pays for the k experts it uses. The
    capacity-padded buffers of einsum/gather dispatch execute capacity_factor x that in the expert FFN;
    `executed=True` counts those (expert choice: capacity_factor = average experts per token).
  * Norms, softmax, activations, embedding look-ups are left out (O(M) per token, under 1% at these sizes).
  * Encoder-decoder (T5): FLOPs per *sequence* of `inputs_length` encoder tokens and `targets_length` decoder
    tokens (`flops_per_sequence`): each encoder block runs on the inputs, each decoder block on the targets, its
    cross-attention keys and values are projected from the inputs (once per decoder block) and its scores span
    Lo x Li; the logits run on the targets. T5 and Switch pre-train with span corruption at 512 / 114 tokens
    (`moe_jax.data.span_corruption.lengths(512, 0.15, 3)`), the lengths Switch Table 9's "FLOPs/seq" refer to.
"""

from __future__ import annotations

import dataclasses

from moe_jax import experts
from moe_jax.config_lib import ModelConfig

TRAIN_FLOPS_MULTIPLIER = 3



@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
  """Forward FLOPs per token, by component, summed over layers."""

  attention_projections: float
  attention_scores: float  # QK^T and AV
  dense_ffn: float
  expert_ffn: float
  router: float
  logits: float

  @property
  def forward(self) -> float:
    return sum(dataclasses.astuple(self))

  @property
  def train(self) -> float:
    return TRAIN_FLOPS_MULTIPLIER * self.forward


def ffn_flops(d_model: int, d_ff: int, activation: str) -> float:
  """One token through one FFN: two matmuls, three for gated units (GeGLU/SwiGLU have wi_0 and wi_1)."""
  matmuls = 3 if experts.is_gated(activation) else 2
  return 2.0 * matmuls * d_model * d_ff


def experts_per_token(cfg: ModelConfig, *, executed: bool, capacity_factor: float | None = None,
                      sequence_length: int | None = None) -> float:
  """How many expert FFNs one token costs, as its router family declares (`RouterFamily.experts_per_token`): k
  (active; expert choice: c on average); with `executed`, the rows of the capacity-padded buffers.

  `capacity_factor` defaults to the training one (pass moe.eval_capacity_factor for evaluation passes). With an
  absolute `moe.expert_capacity` the buffers hold E * C rows per routing group of S tokens whatever the factor,
  so the executed count needs the `sequence_length` that S derives from (moe.group_size, else the sequence).
  """
  moe = cfg.moe
  if executed and moe.expert_capacity and not moe.dropless:
    if sequence_length is None:
      raise ValueError(f"moe.expert_capacity={moe.expert_capacity}: the executed expert rows per token depend on "
                       "the tokens per routing group; pass sequence_length")
    tokens = moe.group_size or sequence_length
    return moe.num_experts * moe.capacity(tokens, training=True) / tokens
  factor = (capacity_factor or moe.capacity_factor) if executed else None
  return moe.family.experts_per_token(moe, moe.router_options, factor)


def shared_gate_params(cfg: ModelConfig) -> int:
  """The shared-expert gate w_gate [M, 1] of one MoE layer (`moe.shared_expert_gate`, Qwen2-MoE); 0 without."""
  return cfg.d_model if cfg.moe is not None and cfg.moe.shared_expert_gate else 0


def router_params_per_layer(cfg: ModelConfig) -> int:
  """The router of one MoE layer as its family declares it (`RouterFamily.params`): e.g. the kernel [M, E]; Soft
  MoE's phi [M, E, P] and scale; none for hash layers."""
  moe = cfg.moe
  return moe.family.router_params(cfg.d_model, moe.num_experts, moe.router_options)


def _ffn_stack_flops(cfg: ModelConfig, num_blocks: int, num_moe: int, *, executed: bool,
                     capacity_factor: float | None, sequence_length: int) -> dict[str, float]:
  """Per token: the FFNs (dense, expert, router) of a stack of `num_blocks` blocks, `num_moe` of them MoE, on
  sequences of `sequence_length` tokens. The shared experts' gate counts with them."""
  moe_ffn = 0.0
  if num_moe:
    routed = ffn_flops(cfg.d_model, cfg.expert_d_ff, cfg.activation)
    per_token = experts_per_token(cfg, executed=executed, capacity_factor=capacity_factor,
                                  sequence_length=sequence_length)
    shared = ffn_flops(cfg.d_model, cfg.shared_d_ff, cfg.activation) + 2.0 * shared_gate_params(cfg)
    moe_ffn = num_moe * (routed * per_token + shared)
  return dict(dense_ffn=(num_blocks - num_moe) * ffn_flops(cfg.d_model, cfg.d_ff, cfg.activation),
              expert_ffn=moe_ffn, router=num_moe * 2.0 * router_params_per_layer(cfg) if num_moe else 0.0)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, executed: bool = False, capacity_factor: float | None = None
) -> FlopsBreakdown:
  """Forward FLOPs per token of the decoder LM at sequence length `seq_len` (see the module conventions)."""
  if cfg.architecture != "decoder":
    raise ValueError(f"model.architecture={cfg.architecture!r}: count it per sequence (flops_per_sequence)")
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  return FlopsBreakdown(
      # q and output projections over H heads, k and v over the K key/value heads.
      attention_projections=cfg.num_layers * 2.0 * cfg.d_model * (2 * q_dim + 2 * kv_dim),
      attention_scores=cfg.num_layers * 2.0 * 2 * seq_len * q_dim,
      **_ffn_stack_flops(cfg, cfg.num_layers, len(cfg.moe_layers), executed=executed,
                         capacity_factor=capacity_factor, sequence_length=seq_len),
      logits=2.0 * cfg.d_model * cfg.vocab_size,
  )


def flops_per_sequence(
    cfg: ModelConfig, inputs_length: int, targets_length: int | None = None, *, executed: bool = False,
    capacity_factor: float | None = None,
) -> FlopsBreakdown:
  """Forward FLOPs of one sequence: the decoder LM's `inputs_length` tokens, or the encoder-decoder's
  `inputs_length` encoder and `targets_length` decoder tokens (module conventions)."""
  if cfg.architecture == "decoder":
    per_token = flops_per_token(cfg, inputs_length, executed=executed, capacity_factor=capacity_factor)
    return FlopsBreakdown(*(inputs_length * v for v in dataclasses.astuple(per_token)))
  if targets_length is None:
    raise ValueError("an encoder-decoder sequence needs targets_length")
  li, lo, m = inputs_length, targets_length, cfg.d_model
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  enc, dec = cfg.num_layers, cfg.decoder_layers
  self_projections = 2.0 * m * (2 * q_dim + 2 * kv_dim)  # per token: q, k, v, out
  ffn = dict(executed=executed, capacity_factor=capacity_factor)
  enc_ffn = _ffn_stack_flops(cfg, enc, len(cfg.moe_layers), **ffn, sequence_length=li)
  dec_ffn = _ffn_stack_flops(decoder_stack(cfg), dec, len(cfg.moe_blocks(dec)), **ffn, sequence_length=lo)
  return FlopsBreakdown(
      attention_projections=(enc * li * self_projections + dec * lo * self_projections
                             + dec * (lo * 2.0 * m * 2 * q_dim + li * 2.0 * m * 2 * kv_dim)),  # cross: q, out; k, v
      # QK^T and AV: encoder Li x Li, decoder self Lo x Lo, cross Lo x Li.
      attention_scores=2.0 * 2 * q_dim * (enc * li * li + dec * (lo * lo + lo * li)),
      **{k: li * enc_ffn[k] + lo * dec_ffn[k] for k in enc_ffn},
      logits=lo * 2.0 * m * cfg.vocab_size,
  )


# model.norm -> parameters per normalised feature: scale (RMSNorm, LayerNorm without bias), scale and bias, none.
NORM_PARAMS = {"rmsnorm": 1, "layernorm": 2, "layernorm_nobias": 1, "layernorm_noparam": 0}


@dataclasses.dataclass(frozen=True)
class ParamBreakdown:
  """Parameters by component, summed over blocks; routed experts counted in full (total) and per token."""

  embeddings: int  # input embedding, the output projection unless tied, its bias (model.lm_head_bias)
  attention: int  # projections and their biases (model.attention_bias)
  position_bias: int  # T5 relative position buckets x heads, one table per stack (0 for rotary)
  norms: int  # block and final norms, QK-norm scales
  dense_ffn: int
  router: int
  shared_experts: int  # always active (DeepSeekMoE), with their gate (Qwen2-MoE) where there is one
  routed_experts: int  # all E experts of every MoE block
  routed_experts_active: float  # the experts one token uses (k; expert choice: c on average)

  @property
  def total(self) -> int:
    return (self.embeddings + self.attention + self.position_bias + self.norms + self.dense_ffn + self.router
            + self.shared_experts + self.routed_experts)

  @property
  def active(self) -> int:
    return int(self.total - self.routed_experts + self.routed_experts_active)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int  # every parameter
  active: int  # parameters one token touches: its k experts instead of all E


def ffn_params(d_model: int, d_ff: int, activation: str) -> int:
  return (3 if experts.is_gated(activation) else 2) * d_model * d_ff


@dataclasses.dataclass(frozen=True)
class _Stacks:
  """What the parameter and memory counts need of the architecture, summed over its stacks."""

  blocks: int
  moe_blocks: int
  attentions: int  # attention sublayers (a decoder block of the encoder-decoder has two)
  norms: int  # pre-norms and final norms
  position_tables: int  # relative position bias tables


def decoder_stack(cfg: ModelConfig) -> ModelConfig:
  """The config the encoder-decoder's decoder-stack MoE layers are built from (`MoeConfig.decoder_stack`)."""
  return cfg if cfg.moe is None else dataclasses.replace(cfg, moe=cfg.moe.decoder_stack())


def _moe_stacks(cfg: ModelConfig) -> list[tuple[ModelConfig, int]]:
  """(config its MoE layers are built from, number of MoE blocks) per stack: the decoder LM's one stack, or the
  encoder's and the decoder's (whose router may differ, `moe.decoder_router`)."""
  if cfg.architecture == "decoder":
    return [(cfg, len(cfg.moe_layers))]
  return [(cfg, len(cfg.moe_layers)), (decoder_stack(cfg), len(cfg.moe_blocks(cfg.decoder_layers)))]


def _stacks(cfg: ModelConfig) -> _Stacks:
  if cfg.architecture == "decoder":
    return _Stacks(blocks=cfg.num_layers, moe_blocks=len(cfg.moe_layers), attentions=cfg.num_layers,
                   norms=2 * cfg.num_layers + 1, position_tables=0)
  enc, dec = cfg.num_layers, cfg.decoder_layers
  return _Stacks(blocks=enc + dec, moe_blocks=len(cfg.moe_layers) + len(cfg.moe_blocks(dec)), attentions=enc + 2 * dec,
                 norms=2 * enc + 1 + 3 * dec + 1, position_tables=2 if cfg.positions == "relative" else 0)


def param_breakdown(cfg: ModelConfig) -> ParamBreakdown:
  """Every parameter of the model `models.build(cfg)` makes, by component (tests check it against the built
  model)."""
  m = cfg.d_model
  norm = NORM_PARAMS[cfg.norm] * m
  stacks = _stacks(cfg)
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  # Per attention sublayer: the projection biases, the QK-norm scales ([D] each per head, [H*D] and [K*D] full).
  attention_bias = {"none": 0, "qkv": q_dim + 2 * kv_dim, "qkvo": q_dim + 2 * kv_dim + m}[cfg.attention_bias]
  qk_norm = {"none": 0, "per_head": 2 * cfg.head_dim, "full": q_dim + kv_dim}[cfg.qk_norm]
  num_moe = stacks.moe_blocks
  num_dense = stacks.blocks - num_moe
  routed = router = shared = 0
  active = 0.0
  if num_moe:
    one_expert = ffn_params(m, cfg.expert_d_ff, cfg.activation)
    routed = num_moe * cfg.moe.num_experts * one_expert
    for stack, moe_blocks in _moe_stacks(cfg):
      active += moe_blocks * experts_per_token(stack, executed=False) * one_expert
      router += moe_blocks * router_params_per_layer(stack)
    shared = num_moe * (ffn_params(m, cfg.shared_d_ff, cfg.activation) + shared_gate_params(cfg))
  return ParamBreakdown(
      embeddings=cfg.vocab_size * m * (1 if cfg.tie_embeddings else 2) + (cfg.vocab_size if cfg.lm_head_bias else 0),
      attention=stacks.attentions * (m * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.kv_heads) + attention_bias),
      position_bias=stacks.position_tables * cfg.relative_buckets * cfg.num_heads,
      norms=stacks.norms * norm + stacks.attentions * qk_norm,
      dense_ffn=num_dense * ffn_params(m, cfg.d_ff, cfg.activation),
      router=router, shared_experts=shared, routed_experts=routed, routed_experts_active=active,
  )


def param_count(cfg: ModelConfig) -> ParamCount:
  """Total vs active parameters (Switch Table 9 reports total; FLOPs follow active)."""
  breakdown = param_breakdown(cfg)
  return ParamCount(total=breakdown.total, active=breakdown.active)


# ----------------------------------------------------------------------------------------------------------
# Memory: what must sit on a device to train or serve a config.


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes one device holds while training (a lower bound: XLA's temporaries and fragmentation come on top)."""

  params: float
  gradients: float
  optimizer: float
  activations: float  # saved for the backward pass
  checkpoint: float  # bytes of one checkpoint on disk: all parameters and optimizer state, every device's

  @property
  def total(self) -> float:
    return self.params + self.gradients + self.optimizer + self.activations


def _weight_matrices(cfg: ModelConfig) -> list[tuple[int, int, int]]:
  """(how many, rows, columns) of the model's 2-d weights; the 1-d norm scales are left out (O(M))."""
  m = cfg.d_model
  matmuls = 3 if experts.is_gated(cfg.activation) else 2
  stacks = _stacks(cfg)
  num_moe = stacks.moe_blocks
  e = cfg.moe.num_experts if num_moe else 0
  return [
      (1 if cfg.tie_embeddings else 2, cfg.vocab_size, m),
      (stacks.attentions, m, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim),  # q, k, v
      (stacks.attentions, cfg.num_heads * cfg.head_dim, m),  # output projection
      (matmuls * (stacks.blocks - num_moe), m, cfg.d_ff),
      (matmuls * num_moe * e, m, cfg.expert_d_ff if num_moe else 0),
      (matmuls * num_moe, m, cfg.shared_d_ff if num_moe else 0),
      (num_moe, m, 1 if num_moe and shared_gate_params(cfg) else 0),  # the shared experts' gate
      (num_moe, m, e),
  ]


def activation_bytes_per_token(cfg: ModelConfig, seq_len: int, dtype_bytes: int, tensor_devices: int = 1) -> float:
  """Activations one token keeps for the backward pass: per block the block input and two norm outputs (3M),
  q, k, v and the attention output ((2H + 2K) D), the attention probabilities (H L, materialised by a dense
  attention), and each FFN's input, hidden units (twice for gated units) and output for every expert row it
  executes (an MoE FFN: capacity_factor x k rows, plus its shared experts); and the float32 logits, their
  softmax and gradient (3 V). With tensor parallelism over `tensor_devices`, a device keeps its share of the
  heads and hidden units (the terms in H, K and F). The encoder-decoder is counted as if every block ran on
  `seq_len` tokens (its decoder runs on fewer: an upper bound of its share)."""
  gated = 2 if experts.is_gated(cfg.activation) else 1
  t = tensor_devices
  attention = 3 * cfg.d_model + ((2 * cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim + cfg.num_heads * seq_len) / t
  stacks = _stacks(cfg)
  num_moe = stacks.moe_blocks
  per_token = stacks.attentions * attention + (stacks.blocks - num_moe) * (2 * cfg.d_model + gated * cfg.d_ff / t)
  for stack, moe_blocks in _moe_stacks(cfg) if num_moe else ():
    rows = experts_per_token(stack, executed=True, sequence_length=seq_len)
    per_token += moe_blocks * (rows * (2 * cfg.d_model + gated * cfg.expert_d_ff / t) + gated * cfg.shared_d_ff / t
                               + cfg.moe.num_experts)  # + the router's probabilities
  return dtype_bytes * per_token + 4 * 3 * cfg.vocab_size


def memory_estimate(cfg: ModelConfig, *, batch_size: int, seq_len: int, optimizer: str, data_devices: int,
                    expert_devices: int, fsdp_devices: int = 1, tensor_devices: int = 1,
                    min_dim_to_factor: int = 128) -> MemoryEstimate:
  """Training memory per device from the parameter counts: float32 parameters, gradients and optimizer state
  (AdamW: two moments; Adafactor: factored second moments, rows + columns per matrix of both sides
  >= `min_dim_to_factor` as in optax), and the activations the backward pass keeps for this device's share of
  the batch (split over data, fsdp and expert devices). Parameters are split as `moe_jax.parallel`'s rules say:
  every one over `fsdp_devices` (along d_model), attention and FFN weights (dense, shared and routed experts)
  also over `tensor_devices`, routed experts also over `expert_devices`; the vocabulary is not split."""
  breakdown = param_breakdown(cfg)
  f, t = fsdp_devices, tensor_devices
  local_params = ((breakdown.embeddings + breakdown.norms + breakdown.router) / f
                  + (breakdown.attention + breakdown.dense_ffn + breakdown.shared_experts) / (f * t)
                  + breakdown.routed_experts / (expert_devices * f * t))
  if optimizer == "adafactor":
    factored = sum(n * ((r + c) if min(r, c) >= min_dim_to_factor else r * c) for n, r, c in _weight_matrices(cfg))
    optimizer_fraction = factored / max(breakdown.total, 1)
  else:
    optimizer_fraction = 2.0
  act_bytes = 2 if cfg.dtype == "bfloat16" else 4
  tokens = batch_size * seq_len / (data_devices * f * expert_devices)
  return MemoryEstimate(
      params=4 * local_params, gradients=4 * local_params, optimizer=4 * optimizer_fraction * local_params,
      activations=tokens * activation_bytes_per_token(cfg, seq_len, act_bytes, t),
      checkpoint=4 * breakdown.total * (1 + optimizer_fraction))


def kv_cache_bytes(cfg: ModelConfig, *, batch_size: int, context: int, dtype_bytes: int = 2) -> float:
  """Keys and values of every block for `batch_size` sequences of `context` tokens (grouped-query attention
  keeps K heads, not H). The encoder-decoder caches them in its decoder blocks only, twice: self-attention over
  `context` generated tokens and cross-attention over `context` encoder tokens."""
  if cfg.architecture == "encoder_decoder":
    return 2.0 * cfg.decoder_layers * 2 * cfg.kv_heads * cfg.head_dim * batch_size * context * dtype_bytes
  return 2.0 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * batch_size * context * dtype_bytes
