"""Phi-3.5-MoE (`PhimoeForCausalLM`, Abdin et al. 2024, arXiv:2404.14219): Mixtral's tensor names, LayerNorm with
bias everywhere (eps `rms_norm_eps`, despite the name), biases on q, k, v, o and on the LM head, longrope
rotary, and the sparsemixer router at evaluation (argmax, then the argmax of the rest, each weighted by a softmax
over the experts within 2 * `router_jitter_noise` relative gap of that stage's max; not renormalised)."""

from moe_jax.interop import common, decoder, mixtral

MODEL_TYPE = "phimoe"
ARCHITECTURE = "PhimoeForCausalLM"
NAMES = mixtral.NAMES
TEMPLATE = {"attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "initializer_range": 0.02, "input_jitter_noise": 0.0, "lm_head_bias": True,
            "original_max_position_embeddings": 4096, "output_router_logits": False, "pad_token_id": None,
            "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.01, "sliding_window": None, "use_cache": True}


def to_config(hf):
  k = hf.get("num_experts_per_tok", 2)
  if k != 2:
    raise common.unsupported(MODEL_TYPE, "num_experts_per_tok", k, "the sparsemixer router always picks 2")
  model = decoder.model_fields(hf, MODEL_TYPE, norm="layernorm")
  model.update(moe_layer_interval=1, attention_bias="qkvo" if hf.get("attention_bias", True) else "none",
               lm_head_bias=bool(hf.get("lm_head_bias", True)))
  return common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_local_experts"), "router": "sparsemixer",
      "sparsemixer.jitter_eps": float(common.get(hf, MODEL_TYPE, "router_jitter_noise")), "dropless": True,
      "dispatch": "auto"})


def to_hf(cfg):
  if cfg.moe.router != "sparsemixer" or cfg.norm != "layernorm":
    raise ValueError(f"{MODEL_TYPE}: needs moe.router='sparsemixer' and model.norm='layernorm'")
  rope = common.rope_parameters(cfg)
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "num_local_experts": cfg.moe.num_experts,
          "num_experts_per_tok": 2, "router_jitter_noise": cfg.moe.router_options.jitter_eps,
          "attention_bias": cfg.attention_bias == "qkvo", "lm_head_bias": cfg.lm_head_bias,
          "original_max_position_embeddings": rope.get("original_max_position_embeddings", 4096)}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
