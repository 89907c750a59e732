"""Qwen1.5-MoE / Qwen2-MoE (`Qwen2MoeForCausalLM`): Llama blocks with biases on q, k, v; routed SwiGLU experts
(width `moe_intermediate_size`), top-k of a softmax, not renormalised (`norm_topk_prob` false), plus one shared
expert (width `shared_expert_intermediate_size`) gated by sigmoid(x . shared_expert_gate) (`mlp.shared_expert.*`,
`mlp.shared_expert_gate.weight` [1, M]); `decoder_sparse_step` / `mlp_only_layers` choose the MoE blocks."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.02,
            "layer_types": None, "max_window_layers": 28, "output_router_logits": False, "pad_token_id": None,
            "qkv_bias": True, "router_aux_loss_coef": 0.001, "sliding_window": None, "use_cache": True,
            "use_sliding_window": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


def to_config(hf):
  if hf.get("qkv_bias") is False:
    raise common.unsupported(MODEL_TYPE, "qkv_bias", False, "Qwen2-MoE checkpoints carry q/k/v biases")
  model = decoder.model_fields(hf, MODEL_TYPE)
  model.update(decoder.moe_layer_fields(hf, MODEL_TYPE), attention_bias="qkv")
  return common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_experts"), "router": "top_k",
      "top_k.k": common.get(hf, MODEL_TYPE, "num_experts_per_tok"),
      "top_k.renormalize": bool(hf.get("norm_topk_prob", False)), "dropless": True, "dispatch": "auto",
      "expert_d_ff": common.get(hf, MODEL_TYPE, "moe_intermediate_size"), "num_shared_experts": 1,
      "shared_expert_d_ff": common.get(hf, MODEL_TYPE, "shared_expert_intermediate_size"),
      "shared_expert_gate": True})


def to_hf(cfg):
  if cfg.attention_bias != "qkv" or cfg.moe.num_shared_experts != 1 or not cfg.moe.shared_expert_gate:
    raise ValueError(f"{MODEL_TYPE}: needs model.attention_bias='qkv' and one sigmoid-gated shared expert")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "num_experts": cfg.moe.num_experts,
          "num_experts_per_tok": cfg.moe.router_options.k, "norm_topk_prob": cfg.moe.router_options.renormalize,
          "moe_intermediate_size": cfg.expert_d_ff, "shared_expert_intermediate_size": cfg.shared_d_ff,
          "decoder_sparse_step": cfg.moe_layer_interval, "mlp_only_layers": list(range(cfg.moe_start_block)),
          "layer_types": ["full_attention"] * cfg.num_layers}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
