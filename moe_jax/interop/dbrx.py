"""DBRX (`DbrxForCausalLM`, Databricks 2024): 16 SwiGLU experts, top-4 of a softmax with the weights divided by
their p-norm (p = `moe_normalize_expert_weights`; 1 is Mixtral's renormalisation, the only p implemented),
LayerNorm without bias (eps 1e-5), `clip_qkv` on the fused q|k|v projection, rotary base in `attn_config`.

Tensors (docs/interop_fixtures.md): `transformer.wte.weight`; per block `norm_attn_norm.norm_1/norm_2.weight`,
`norm_attn_norm.attn.Wqkv.weight` [(H + 2K) * D, M] (its transpose is moe_jax's `qkv`), `attn.out_proj.weight`,
`ffn.router.layer.weight` [E, M], `ffn.experts.mlp.w1` / `v1` [E * F, M] (gate, up) and `w2` [E * F, M] (down,
not transposed); `transformer.norm_f.weight`; `lm_head.weight` (never tied)."""

import copy

from moe_jax.interop import common, decoder, layout
from moe_jax.interop.layout import rule

MODEL_TYPE = "dbrx"
ARCHITECTURE = "DbrxForCausalLM"
EPS = 1e-5  # torch's LayerNorm default, which DBRX uses; not a config key
_SUB = {"_name_or_path": "", "architectures": None, "chunk_size_feed_forward": 0, "dtype": "float32",
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "model_type": "", "output_attentions": False,
        "output_hidden_states": False, "problem_type": None, "return_dict": True}
TEMPLATE = {
    "attn_config": {**_SUB, "attn_pdrop": 0.0, "clip_qkv": None, "kv_n_heads": 1, "rope_theta": 10000.0},
    "bos_token_id": None, "emb_pdrop": 0.0, "eos_token_id": None,
    "ffn_config": {**_SUB, "ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 3584, "hidden_size": 6144,
                   "moe_jitter_eps": None, "moe_loss_weight": 0.01, "moe_normalize_expert_weights": 1.0,
                   "moe_num_experts": 4, "moe_top_k": 1},
    "initializer_range": 0.02, "output_router_logits": False, "pad_token_id": None, "resid_pdrop": 0.0,
    "tie_word_embeddings": False, "use_cache": True}


def to_config(hf):
  attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
  act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name")
  if act != "silu":
    raise common.unsupported(MODEL_TYPE, "ffn_config.ffn_act_fn.name", act, "the experts here are SwiGLU")
  p = ffn.get("moe_normalize_expert_weights", 1.0)
  if p not in (None, 1, 1.0):
    raise common.unsupported(MODEL_TYPE, "ffn_config.moe_normalize_expert_weights", p,
                             "only 1 (weights divided by their sum) and null (not normalised) are implemented")
  if hf.get("tie_word_embeddings"):
    raise common.unsupported(MODEL_TYPE, "tie_word_embeddings", True, "DBRX's head is never tied")
  d_model, heads = common.get(hf, MODEL_TYPE, "d_model"), common.get(hf, MODEL_TYPE, "n_heads")
  model = dict(architecture="decoder", vocab_size=common.get(hf, MODEL_TYPE, "vocab_size"), d_model=d_model,
               num_heads=heads, num_kv_heads=attn.get("kv_n_heads") or hf.get("num_key_value_heads") or heads,
               head_dim=d_model // heads,
               d_ff=common.get(ffn, MODEL_TYPE, "ffn_hidden_size"), num_layers=common.get(hf, MODEL_TYPE, "n_layers"),
               max_seq_len=common.get(hf, MODEL_TYPE, "max_seq_len"), norm="layernorm_nobias", norm_eps=EPS,
               activation="swiglu", tie_embeddings=False, dtype=common.dtype(hf, MODEL_TYPE), moe_layer_interval=1,
               **common.rope_fields(hf, MODEL_TYPE, theta=attn.get("rope_theta", 10_000.0)))
  if attn.get("clip_qkv"):
    model["clip_qkv"] = float(attn["clip_qkv"])
  return common.experiment_config(model, {
      "num_experts": common.get(ffn, MODEL_TYPE, "moe_num_experts"), "router": "top_k",
      "top_k.k": common.get(ffn, MODEL_TYPE, "moe_top_k"), "top_k.renormalize": p is not None,
      "dropless": True, "dispatch": "auto"})


def to_hf(cfg):
  if cfg.norm != "layernorm_nobias" or cfg.norm_eps != EPS or cfg.tie_embeddings or cfg.activation != "swiglu":
    raise ValueError(f"{MODEL_TYPE}: needs model.norm='layernorm_nobias' with norm_eps={EPS}, SwiGLU experts and "
                     "an untied head")
  attn, ffn = copy.deepcopy(TEMPLATE["attn_config"]), copy.deepcopy(TEMPLATE["ffn_config"])
  attn.update(kv_n_heads=cfg.kv_heads, clip_qkv=cfg.clip_qkv or None, rope_theta=cfg.rope_theta)
  ffn.update(ffn_hidden_size=cfg.expert_d_ff, hidden_size=cfg.d_model, moe_num_experts=cfg.moe.num_experts,
             moe_top_k=cfg.moe.router_options.k,
             moe_normalize_expert_weights=1.0 if cfg.moe.router_options.renormalize else None)
  # transformers 5 also writes the kv heads at the top level (num_key_value_heads).
  return dict(attn_config=attn, ffn_config=ffn, d_model=cfg.d_model, n_heads=cfg.num_heads, n_layers=cfg.num_layers,
              num_key_value_heads=cfg.kv_heads,
              max_seq_len=cfg.max_seq_len, vocab_size=cfg.vocab_size, tie_word_embeddings=False,
              rope_parameters=common.rope_parameters(cfg))


def rules(cfg):
  heads, kv, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
  out = [rule(("embed", "embedding"), "transformer.wte.weight")]
  for i in range(cfg.num_layers):
    block, prefix = ("blocks", i), f"transformer.blocks.{i}."
    out += decoder.norm_rules(block + ("attention_norm",), prefix + "norm_attn_norm.norm_1", cfg.norm)
    out += decoder.norm_rules(block + ("ffn_norm",), prefix + "norm_attn_norm.norm_2", cfg.norm)
    out += [rule(block + ("attention", "qkv"), prefix + "norm_attn_norm.attn.Wqkv.weight",
                 layout.heads_in([heads + 2 * kv], d)),
            rule(block + ("attention", "out"), prefix + "norm_attn_norm.attn.out_proj.weight",
                 layout.heads_out(heads, d)),
            rule(block + ("ffn", "router"), prefix + "ffn.router.layer.weight", layout.TRANSPOSED),
            rule(block + ("ffn", "wi_0"), prefix + "ffn.experts.mlp.w1", layout.fused_experts(transpose=True)),
            rule(block + ("ffn", "wi_1"), prefix + "ffn.experts.mlp.v1", layout.fused_experts(transpose=True)),
            rule(block + ("ffn", "wo"), prefix + "ffn.experts.mlp.w2", layout.fused_experts(transpose=False))]
  out += decoder.norm_rules(("final_norm",), "transformer.norm_f", cfg.norm)
  out.append(rule(("unembed",), "lm_head.weight", layout.TRANSPOSED))
  return out
