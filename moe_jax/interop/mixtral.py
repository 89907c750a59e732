"""Mixtral (`MixtralForCausalLM`, Jiang et al. 2024, arXiv:2401.04088): Llama blocks with 8 SwiGLU experts per
block, top-2 of a softmax over all experts, weights renormalised over the two, no capacity (dropless).
Tensors: `model.layers.{i}.block_sparse_moe.gate.weight` [E, M] and `.experts.{e}.w1/w3/w2.weight` (gate, up,
down); the rest Llama's (docs/interop_fixtures.md)."""

from moe_jax.interop import common, decoder

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
NAMES = decoder.Names(moe="block_sparse_moe.", expert_gate="w1", expert_up="w3", expert_down="w2")
TEMPLATE = {"attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": None,
            "initializer_range": 0.02, "output_router_logits": False, "pad_token_id": None,
            "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "sliding_window": None, "use_cache": True}


def to_config(hf):
  model = decoder.model_fields(hf, MODEL_TYPE)
  model.update(moe_layer_interval=1)
  return common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_local_experts"), "router": "top_k",
      "top_k.k": common.get(hf, MODEL_TYPE, "num_experts_per_tok"), "top_k.renormalize": True,
      "dropless": True, "dispatch": "auto"})


def to_hf(cfg):
  return {**decoder.hf_fields(cfg, MODEL_TYPE, TEMPLATE), "num_local_experts": cfg.moe.num_experts,
          "num_experts_per_tok": cfg.moe.router_options.k}


def rules(cfg):
  return decoder.rules(cfg, NAMES)
