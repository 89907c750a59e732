"""OLMoE (`OlmoeForCausalLM`, Muennighoff et al. 2024, arXiv:2409.02060): Llama blocks with 64 SwiGLU experts,
top-8 of a softmax over all experts, weights not renormalised (`norm_topk_prob` false), QK-norm: one RMSNorm over
the whole projected q [H*D] and k [K*D] (`self_attn.q_norm.weight`, `k_norm.weight`), optional `clip_qkv`."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "olmoe"
ARCHITECTURE = "OlmoeForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "clip_qkv": None,
            "eos_token_id": 50279, "initializer_range": 0.02, "output_router_logits": False, "pad_token_id": 1,
            "router_aux_loss_coef": 0.01, "use_cache": True}


def to_config(hf):
  if hf.get("attention_bias"):
    raise common.unsupported(MODEL_TYPE, "attention_bias", True, "OLMoE's biases are not mapped")
  model = decoder.model_fields(hf, MODEL_TYPE)
  model.update(moe_layer_interval=1, qk_norm="full")
  if hf.get("clip_qkv"):
    model["clip_qkv"] = float(hf["clip_qkv"])
  return common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_experts"), "router": "top_k",
      "top_k.k": common.get(hf, MODEL_TYPE, "num_experts_per_tok"),
      "top_k.renormalize": bool(hf.get("norm_topk_prob", False)), "dropless": True, "dispatch": "auto"})


def to_hf(cfg):
  if cfg.qk_norm != "full":
    raise ValueError(f"{MODEL_TYPE}: needs model.qk_norm='full' (got {cfg.qk_norm!r})")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "num_experts": cfg.moe.num_experts,
          "num_experts_per_tok": cfg.moe.router_options.k, "norm_topk_prob": cfg.moe.router_options.renormalize,
          "clip_qkv": cfg.clip_qkv or None}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
