"""OLMo 2 (`Olmo2ForCausalLM`, OLMo et al. 2024, arXiv:2501.00656): post-norm blocks h = x + RMSNorm(attn(x)),
y = h + RMSNorm(mlp(h)) (`post_attention_layernorm`, `post_feedforward_layernorm`; no norm before attention or
MLP), QK-norm over the whole projected q and k (as OLMoE), untied head."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "olmo2"
ARCHITECTURE = "Olmo2ForCausalLM"
NAMES = decoder.Names(attention_norm=None, ffn_norm=None, post_attention_norm="post_attention_layernorm",
                      post_ffn_norm="post_feedforward_layernorm")
TEMPLATE = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": 100257,
            "initializer_range": 0.02, "pad_token_id": 100277, "use_cache": True}


def to_config(hf):
  if hf.get("attention_bias"):
    raise common.unsupported(MODEL_TYPE, "attention_bias", True, "OLMo 2's biases are not mapped")
  model = decoder.model_fields(hf, MODEL_TYPE)
  model.update(norm_position="post", qk_norm="full")
  return common.experiment_config(model)


def to_hf(cfg):
  if cfg.norm_position != "post" or cfg.qk_norm != "full":
    raise ValueError(f"{MODEL_TYPE}: needs model.norm_position='post' and model.qk_norm='full'")
  return decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE)


def rules(cfg):
  return decoder.rules(cfg, NAMES)
