"""Qwen3 (`Qwen3ForCausalLM`): Llama blocks with QK-norm per head (`self_attn.q_norm.weight` [D]), `head_dim`
independent of M / H, `attention_bias` putting biases on q, k, v and o, rope_theta 1e6, tied head in the small
models."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None,
            "head_dim": 128, "initializer_range": 0.02, "layer_types": None, "max_window_layers": 28,
            "pad_token_id": None, "sliding_window": None, "use_cache": True, "use_sliding_window": False}


def to_config(hf):
  model = decoder.model_fields(hf, MODEL_TYPE)
  model["qk_norm"] = "per_head"
  if hf.get("attention_bias"):
    model["attention_bias"] = "qkvo"
  return common.experiment_config(model)


def to_hf(cfg):
  if cfg.qk_norm != "per_head" or cfg.attention_bias == "qkv":
    raise ValueError(f"{MODEL_TYPE}: needs model.qk_norm='per_head' and attention biases on q, k, v, o or none")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "attention_bias": cfg.attention_bias == "qkvo",
          "layer_types": ["full_attention"] * cfg.num_layers}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
