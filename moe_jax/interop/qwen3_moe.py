"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Llama blocks with QK-norm per head (RMSNorm over D after the head split,
`self_attn.q_norm.weight` [D]), `head_dim` independent of M / H, routed SwiGLU experts (`moe_intermediate_size`),
top-k of a softmax renormalised (`norm_topk_prob` true), no shared expert. transformers 5 writes the expert
count as `num_local_experts`, the Hub's configs as `num_experts`: both are read."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
            "head_dim": 128, "initializer_range": 0.02, "output_router_logits": False, "pad_token_id": None,
            "router_aux_loss_coef": 0.001, "sliding_window": None, "use_cache": True, "use_sliding_window": False,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def to_config(hf):
  if hf.get("attention_bias"):
    raise common.unsupported(MODEL_TYPE, "attention_bias", True, "Qwen3-MoE's biases are not mapped")
  model = decoder.model_fields(hf, MODEL_TYPE)
  model.update(decoder.moe_layer_fields(hf, MODEL_TYPE), qk_norm="per_head")
  return common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_experts", "num_local_experts"), "router": "top_k",
      "top_k.k": common.get(hf, MODEL_TYPE, "num_experts_per_tok"),
      "top_k.renormalize": bool(hf.get("norm_topk_prob", False)), "dropless": True, "dispatch": "auto",
      "expert_d_ff": common.get(hf, MODEL_TYPE, "moe_intermediate_size")})


def to_hf(cfg):
  if cfg.qk_norm != "per_head":
    raise ValueError(f"{MODEL_TYPE}: needs model.qk_norm='per_head' (got {cfg.qk_norm!r})")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "num_local_experts": cfg.moe.num_experts,
          "num_experts_per_tok": cfg.moe.router_options.k, "norm_topk_prob": cfg.moe.router_options.renormalize,
          "moe_intermediate_size": cfg.expert_d_ff, "decoder_sparse_step": cfg.moe_layer_interval,
          "mlp_only_layers": list(range(cfg.moe_start_block))}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
