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
"""

from __future__ import annotations

import dataclasses

from moe_jax import experts
from moe_jax.model import ModelConfig

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


def experts_per_token(cfg: ModelConfig, *, executed: bool, capacity_factor: float | None = None) -> float:
  """How many expert FFNs one token costs: k (active); capacity_factor * k with padded buffers.

  `capacity_factor` defaults to the training one (pass moe.eval_capacity_factor for evaluation passes).
  """
  moe = cfg.moe
  k = 1 if moe.router == "expert_choice" else moe.top_k
  if executed and not moe.dropless:
    return (capacity_factor or moe.capacity_factor) * k
  if moe.router == "expert_choice":
    return moe.capacity_factor  # Zhou et al.: c experts per token on average
  return float(k)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, executed: bool = False, capacity_factor: float | None = None
) -> FlopsBreakdown:
  """Forward FLOPs per token of the decoder LM at sequence length `seq_len` (see the module conventions)."""
  attn_dim = cfg.num_heads * cfg.head_dim
  num_moe = len(cfg.moe_layers)
  num_dense = cfg.num_layers - num_moe
  one_ffn = ffn_flops(cfg.d_model, cfg.d_ff, cfg.activation)
  return FlopsBreakdown(
      attention_projections=cfg.num_layers * 2.0 * 4 * cfg.d_model * attn_dim,
      attention_scores=cfg.num_layers * 2.0 * 2 * seq_len * attn_dim,
      dense_ffn=num_dense * one_ffn,
      expert_ffn=(num_moe * one_ffn * experts_per_token(cfg, executed=executed, capacity_factor=capacity_factor)
                  if num_moe else 0.0),
      router=num_moe * 2.0 * cfg.d_model * cfg.moe.num_experts if num_moe else 0.0,
      logits=2.0 * cfg.d_model * cfg.vocab_size,
  )


@dataclasses.dataclass(frozen=True)
class ParamCount:
  total: int  # every parameter
  active: int  # parameters one token touches: its k experts instead of all E


def param_count(cfg: ModelConfig) -> ParamCount:
  """Total vs active parameters (Switch Table 9 reports total; FLOPs follow active)."""
  m, f = cfg.d_model, cfg.d_ff
  norm = m if cfg.norm == "rmsnorm" else 2 * m
  ffn = (3 if experts.is_gated(cfg.activation) else 2) * m * f
  attention = 4 * m * cfg.num_heads * cfg.head_dim
  embeddings = cfg.vocab_size * m * (1 if cfg.tie_embeddings else 2)
  num_moe = len(cfg.moe_layers)
  num_dense = cfg.num_layers - num_moe
  shared = embeddings + cfg.num_layers * (attention + 2 * norm) + norm + num_dense * ffn
  if not num_moe:
    return ParamCount(total=shared, active=shared)
  e = cfg.moe.num_experts
  router = m * e
  total = shared + num_moe * (router + e * ffn)
  active = shared + num_moe * (router + experts_per_token(cfg, executed=False) * ffn)
  return ParamCount(total=total, active=int(active))


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
  m, f = cfg.d_model, cfg.d_ff
  matmuls = 3 if experts.is_gated(cfg.activation) else 2
  num_moe = len(cfg.moe_layers)
  experts_total = num_moe * cfg.moe.num_experts if num_moe else 0
  return [
      (1 if cfg.tie_embeddings else 2, cfg.vocab_size, m),
      (4 * cfg.num_layers, m, cfg.num_heads * cfg.head_dim),
      (matmuls * (cfg.num_layers - num_moe), m, f),
      (matmuls * experts_total, m, f),
      (num_moe, m, cfg.moe.num_experts if num_moe else 0),
  ]


def memory_estimate(cfg: ModelConfig, *, batch_size: int, seq_len: int, optimizer: str, data_devices: int,
                    expert_devices: int, min_dim_to_factor: int = 128) -> MemoryEstimate:
  """Training memory per device from the parameter counts: float32 parameters, gradients and optimizer state
  (AdamW: two moments; Adafactor: factored second moments, rows + columns per matrix of both sides
  >= `min_dim_to_factor` as in optax), experts split over `expert_devices`, and the activations the backward
  pass keeps for this device's share of the batch.

  Activations per token and block: the block input, two norm outputs, q, k, v and the attention output, the
  attention probabilities (heads x L), and the FFN's input, hidden and output (hidden twice for gated units);
  an MoE FFN holds capacity_factor x k expert rows per token. Plus float32 logits, their softmax and gradient.
  """
  bytes_f32 = 4
  act_bytes = 2 if cfg.dtype == "bfloat16" else 4
  counts = param_count(cfg)
  num_moe = len(cfg.moe_layers)
  matmuls = 3 if experts.is_gated(cfg.activation) else 2
  expert_params = num_moe * cfg.moe.num_experts * matmuls * cfg.d_model * cfg.d_ff if num_moe else 0
  local_params = counts.total - expert_params + expert_params / expert_devices
  if optimizer == "adafactor":
    factored = sum(n * ((r + c) if min(r, c) >= min_dim_to_factor else r * c) for n, r, c in _weight_matrices(cfg))
    optimizer_fraction = factored / max(counts.total, 1)
  else:
    optimizer_fraction = 2.0
  m, f, hd = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim
  hidden = (2 if experts.is_gated(cfg.activation) else 1) * f
  attention = 3 * m + 4 * hd + cfg.num_heads * seq_len
  ffn = 2 * m + hidden
  rows = experts_per_token(cfg, executed=True) if num_moe else 0.0
  per_token = (cfg.num_layers * attention + (cfg.num_layers - num_moe) * ffn
               + num_moe * (rows * ffn + cfg.moe.num_experts if num_moe else 0))
  tokens = batch_size * seq_len / (data_devices * expert_devices)
  activations = tokens * (per_token * act_bytes + 3 * cfg.vocab_size * bytes_f32)
  return MemoryEstimate(
      params=local_params * bytes_f32, gradients=local_params * bytes_f32,
      optimizer=local_params * optimizer_fraction * bytes_f32, activations=activations,
      checkpoint=counts.total * (1 + optimizer_fraction) * bytes_f32)
