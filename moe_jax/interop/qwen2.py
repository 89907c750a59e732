"""Qwen2 / Qwen2.5 (`Qwen2ForCausalLM`): Llama blocks with biases on q, k, v (always: no config flag), rope_theta
1e6, RMSNorm eps 1e-6, tied head in the small models; sliding-window attention, when enabled, is refused."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "initializer_range": 0.02,
            "layer_types": None, "max_window_layers": 28, "pad_token_id": None, "sliding_window": None,
            "use_cache": True, "use_sliding_window": False}


def to_config(hf):
  model = decoder.model_fields(hf, MODEL_TYPE)
  model["attention_bias"] = "qkv"
  return common.experiment_config(model)


def to_hf(cfg):
  if cfg.attention_bias != "qkv":
    raise ValueError(f"{MODEL_TYPE}: needs model.attention_bias='qkv' (got {cfg.attention_bias!r})")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "layer_types": ["full_attention"] * cfg.num_layers}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
