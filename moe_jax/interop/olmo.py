"""OLMo (`OlmoForCausalLM`, Groeneveld et al. 2024, arXiv:2402.00838): Llama blocks with non-parametric LayerNorm
(no weight, no bias, eps fixed at 1e-5 in transformers' code: no norm tensor is stored), optional `clip_qkv`
clamping q, k, v after their projections, tied head (OLMo-1B)."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "olmo"
ARCHITECTURE = "OlmoForCausalLM"
NAMES = decoder.Names()
EPS = 1e-5  # OlmoLayerNorm's, not a config key
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "clip_qkv": None,
            "eos_token_id": 50279, "initializer_range": 0.02, "pad_token_id": 1, "use_cache": True}


def to_config(hf):
  if hf.get("attention_bias"):
    raise common.unsupported(MODEL_TYPE, "attention_bias", True, "OLMo's biases are not mapped")
  model = decoder.model_fields(hf, MODEL_TYPE, norm="layernorm_noparam", eps=EPS)
  if hf.get("clip_qkv"):
    model["clip_qkv"] = float(hf["clip_qkv"])
  return common.experiment_config(model)


def to_hf(cfg):
  if cfg.norm != "layernorm_noparam" or cfg.norm_eps != EPS:
    raise ValueError(f"{MODEL_TYPE}: needs model.norm='layernorm_noparam' with model.norm_eps={EPS}")
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE, eps_key=None), "clip_qkv": cfg.clip_qkv or None}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
