"""The Llama-style decoder layout shared by most families (`model.layers.{i}.self_attn.q_proj.weight`, ...):
the moe_jax parameters of the decoder LM (moe_jax.model) and the Hugging Face tensors that fill them.

Axis legend: M d_model · H query heads · K key/value heads · D head dim · F FFN width · E experts · V vocabulary.

A family states its tensor names as a `Names` (the defaults are Llama's) and gets its rules from `rules`. What
moe_jax holds, per block i (`blocks.{i}.`): `attention_norm` and `ffn_norm` (nnx RMSNorm / LayerNorm: `scale`,
and `bias` for LayerNorm with bias), `attention.qkv` [M, H + 2K, D] and `attention.out` [H, D, M], the dense
`ffn.wi_0` (gate, activated) / `ffn.wi_1` (up) [M, F] and `ffn.wo` [F, M], or the MoE `ffn.router` [M, E] and
experts `ffn.wi_0` / `ffn.wi_1` [E, M, F], `ffn.wo` [E, F, M] (`ffn.shared.*` the shared expert); then
`final_norm`, `embed.embedding` [V, M], `unembed` [M, V] when untied. Settings add: `attention.qkv_bias`
[H + 2K, D] and `attention.out_bias` [M] (model.attention_bias), `attention.q_norm` / `k_norm` scales
(model.qk_norm), post-norm blocks' `attention_out_norm` / `ffn_out_norm` in place of the pre-norms
(model.norm_position='post'), `unembed_bias` [V] (model.lm_head_bias), MoE `ffn.shared_gate` [M, 1].
"""

from __future__ import annotations

import dataclasses

from moe_jax.config_lib import ModelConfig
from moe_jax.interop import common, layout
from moe_jax.interop.layout import rule

# HF tensor suffixes of a norm by model.norm: moe_jax's nnx param name -> HF's.
NORM_PARAMS = {
    "rmsnorm": {"scale": "weight"},
    "layernorm": {"scale": "weight", "bias": "bias"},
    "layernorm_nobias": {"scale": "weight"},
    "layernorm_noparam": {},
}


@dataclasses.dataclass(frozen=True)
class Names:
  """A Llama-style family's tensor names (Llama's by default); None where the family has no such tensor."""

  embed: str = "model.embed_tokens.weight"
  layer: str = "model.layers.{i}."
  attention_norm: str | None = "input_layernorm"
  ffn_norm: str | None = "post_attention_layernorm"
  post_attention_norm: str | None = None  # OLMo 2's post-norm blocks: norm after attention
  post_ffn_norm: str | None = None  # and after the FFN
  attention: str = "self_attn."
  q: str = "q_proj"
  k: str = "k_proj"
  v: str = "v_proj"
  o: str = "o_proj"
  q_norm: str = "q_norm"
  k_norm: str = "k_norm"
  mlp: str = "mlp."  # the dense FFN's prefix
  gate: str = "gate_proj"
  up: str = "up_proj"
  down: str = "down_proj"
  moe: str = "mlp."  # the MoE block's prefix
  router: str = "gate.weight"
  expert: str = "experts.{e}."
  expert_gate: str = "gate_proj"
  expert_up: str = "up_proj"
  expert_down: str = "down_proj"
  shared: str = "shared_expert."  # Qwen2-MoE's shared expert
  shared_gate: str = "shared_expert_gate.weight"
  final_norm: str = "model.norm"
  lm_head: str = "lm_head"


def norm_rules(param: tuple, prefix: str, norm: str) -> list[layout.Rule]:
  return [rule(param + (ours,), f"{prefix}.{theirs}") for ours, theirs in NORM_PARAMS[norm].items()]


def attention_rules(cfg: ModelConfig, block: tuple, prefix: str, names: Names) -> list[layout.Rule]:
  """qkv, out, their biases (model.attention_bias) and the QK-norm scales (model.qk_norm)."""
  heads, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
  a = prefix + names.attention
  qkv = [a + names.q, a + names.k, a + names.v]
  attention = block + ("attention",)
  rules = [rule(attention + ("qkv",), [f"{t}.weight" for t in qkv], layout.heads_in([heads, kv, kv], d)),
           rule(attention + ("out",), f"{a}{names.o}.weight", layout.heads_out(heads, d))]
  bias = getattr(cfg, "attention_bias", "none")
  if bias in ("qkv", "qkvo"):
    rules.append(rule(attention + ("qkv_bias",), [f"{t}.bias" for t in qkv], layout.heads_bias([heads, kv, kv], d)))
  if bias == "qkvo":
    rules.append(rule(attention + ("out_bias",), f"{a}{names.o}.bias"))
  if getattr(cfg, "qk_norm", "none") != "none":
    rules += [rule(attention + ("q_norm", "scale"), f"{a}{names.q_norm}.weight"),
              rule(attention + ("k_norm", "scale"), f"{a}{names.k_norm}.weight")]
  return rules


def ffn_rules(block: tuple, prefix: str, gate: str, up: str, down: str) -> list[layout.Rule]:
  """A dense SwiGLU FFN: wi_0 = gate.T (activated), wi_1 = up.T, wo = down.T."""
  return [rule(block + ("wi_0",), f"{prefix}{gate}.weight", layout.TRANSPOSED),
          rule(block + ("wi_1",), f"{prefix}{up}.weight", layout.TRANSPOSED),
          rule(block + ("wo",), f"{prefix}{down}.weight", layout.TRANSPOSED)]


def moe_rules(cfg: ModelConfig, block: tuple, prefix: str, names: Names) -> list[layout.Rule]:
  """Router [E, M] -> [M, E], experts stacked, and Qwen2-MoE's gated shared expert when the config has one."""
  m = prefix + names.moe
  count = cfg.moe.num_experts
  per_expert = lambda name: [f"{m}{names.expert.format(e=e)}{name}.weight" for e in range(count)]  # noqa: E731
  ffn = block + ("ffn",)
  rules = [rule(ffn + ("router",), m + names.router, layout.TRANSPOSED),
           rule(ffn + ("wi_0",), per_expert(names.expert_gate), layout.experts(count)),
           rule(ffn + ("wi_1",), per_expert(names.expert_up), layout.experts(count)),
           rule(ffn + ("wo",), per_expert(names.expert_down), layout.experts(count))]
  if cfg.moe.num_shared_experts:
    rules += ffn_rules(ffn + ("shared",), m + names.shared, names.gate, names.up, names.down)
  if cfg.moe.shared_expert_gate:
    rules.append(rule(ffn + ("shared_gate",), m + names.shared_gate, layout.TRANSPOSED))
  return rules


def rules(cfg: ModelConfig, names: Names = Names()) -> list[layout.Rule]:
  """The whole decoder LM's table."""
  out = [rule(("embed", "embedding"), names.embed)]
  moe_layers = set(cfg.moe_layers)
  norms = (("attention_norm", names.attention_norm), ("ffn_norm", names.ffn_norm),
           ("attention_out_norm", names.post_attention_norm), ("ffn_out_norm", names.post_ffn_norm))
  for i in range(cfg.num_layers):
    block, prefix = ("blocks", i), names.layer.format(i=i)
    for ours, theirs in norms:
      if theirs is not None:
        out += norm_rules(block + (ours,), prefix + theirs, cfg.norm)
    out += attention_rules(cfg, block, prefix, names)
    if i in moe_layers:
      out += moe_rules(cfg, block, prefix, names)
    else:
      out += ffn_rules(block + ("ffn",), prefix + names.mlp, names.gate, names.up, names.down)
  out += norm_rules(("final_norm",), names.final_norm, cfg.norm)
  if not cfg.tie_embeddings:
    out.append(rule(("unembed",), f"{names.lm_head}.weight", layout.TRANSPOSED))
  if getattr(cfg, "lm_head_bias", False):
    out.append(rule(("unembed_bias",), f"{names.lm_head}.bias"))
  return out


# ----------------------------------------------------------------------------------------------------------
# config.json <-> moe_jax fields, the keys every Llama-style family shares.


def model_fields(hf: dict, family: str, *, norm: str = "rmsnorm", eps_key: str | None = "rms_norm_eps",
                 eps: float | None = None) -> dict:
  """moe_jax model fields of a Llama-style config.json: widths, heads (`head_dim` when given, else M / H),
  SwiGLU FFN (hidden_act 'silu'), the norm and its epsilon, rotary settings, tied or untied head (a tied head is
  unscaled in these families), compute dtype."""
  d_model, heads = common.get(hf, family, "hidden_size"), common.get(hf, family, "num_attention_heads")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise common.unsupported(family, "hidden_act", act, "moe_jax's gated FFN here is SwiGLU ('silu')")
  common.sliding_window(hf, family)
  tied = bool(hf.get("tie_word_embeddings", False))
  fields = dict(
      architecture="decoder", vocab_size=common.get(hf, family, "vocab_size"), d_model=d_model, num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or d_model // heads,
      d_ff=common.get(hf, family, "intermediate_size"), num_layers=common.get(hf, family, "num_hidden_layers"),
      max_seq_len=common.get(hf, family, "max_position_embeddings"), norm=norm,
      norm_eps=float(eps if eps is not None else common.get(hf, family, eps_key)), activation="swiglu",
      tie_embeddings=tied, dtype=common.dtype(hf, family), **common.rope_fields(hf, family))
  if tied:
    fields["scale_tied_head"] = False
  return fields


def hf_fields(cfg: ModelConfig, family: str, template: dict, *, eps_key: str | None = "rms_norm_eps") -> dict:
  """The Llama-style config.json keys of `cfg` (the inverse of `model_fields`); ValueError for what the family
  cannot express."""
  if cfg.architecture != "decoder" or cfg.activation != "swiglu":
    raise ValueError(f"{family}: exports a decoder with SwiGLU FFNs; this model is model.architecture="
                     f"{cfg.architecture!r}, model.activation={cfg.activation!r}")
  out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.num_layers,
             max_position_embeddings=cfg.max_seq_len, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
             rope_parameters=common.rope_parameters(cfg))
  if eps_key is not None:
    out[eps_key] = cfg.norm_eps
  if "head_dim" in template:
    out["head_dim"] = cfg.head_dim
  return out


def moe_layer_fields(hf: dict, family: str) -> dict:
  """model.moe_layer_interval / moe_start_block of Qwen's `decoder_sparse_step` and `mlp_only_layers` (layer i is
  MoE iff i is not in mlp_only_layers and (i + 1) % step == 0); refuses an mlp_only_layers that is not a prefix."""
  step = hf.get("decoder_sparse_step", 1) or 1
  dense = sorted(hf.get("mlp_only_layers") or [])
  if dense != list(range(len(dense))) or (dense and step != 1):
    raise common.unsupported(family, "mlp_only_layers", dense, "moe_jax's dense blocks are the first "
                             "model.moe_start_block ones (with decoder_sparse_step 1)")
  return dict(moe_layer_interval=step, moe_start_block=len(dense))
