"""Llama 2/3 (`LlamaForCausalLM`): RMSNorm pre-norm blocks, GQA, SwiGLU FFN, rotary with the `llama3` frequency
scaling of Llama 3.1+, tied (Llama-3.2-1B/3B) or untied head; `attention_bias` puts biases on q, k, v and o."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
NAMES = decoder.Names()
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "head_dim": None, "initializer_range": 0.02, "mlp_bias": False, "pad_token_id": None,
            "pretraining_tp": 1, "use_cache": True}


def to_config(hf):
  if hf.get("mlp_bias"):
    raise common.unsupported(MODEL_TYPE, "mlp_bias", True, "moe_jax's FFNs have no biases")
  model = decoder.model_fields(hf, MODEL_TYPE)
  if hf.get("attention_bias"):
    model["attention_bias"] = "qkvo"
  return common.experiment_config(model)


def to_hf(cfg):
  bias = getattr(cfg, "attention_bias", "none")
  if bias == "qkv":
    raise ValueError(f"{MODEL_TYPE}: attention biases are on q, k, v and o or none (model.attention_bias='qkv')")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "attention_bias": bias == "qkvo", "mlp_bias": False}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
