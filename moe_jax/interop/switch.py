"""Switch Transformers (`SwitchTransformersForConditionalGeneration`, Fedus et al. 2021, arXiv:2101.03961), onto
moe_jax's encoder-decoder (moe_jax.encdec): T5.1.1 blocks (RMSNorm, no biases, unscaled attention logits, learned
relative position buckets held by block 0 of each stack), ReLU FFNs, every `encoder_sparse_step`-th FFN a top-1
MoE whose output is the top probability times the expert's, with `expert_capacity` slots per expert and sequence
(later tokens beyond it are dropped); tied embeddings with the decoder output scaled by M^-1/2 before the head.

Tensors: `shared.weight` (the Hub's files may also hold `encoder.embed_tokens.weight`,
`decoder.embed_tokens.weight`, `lm_head.weight`, copies of it: accepted, not read); encoder block i
`encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`, `layer.0.layer_norm.weight`, `layer.1.layer_norm.weight`,
`layer.1.mlp.wi/wo.weight` or `layer.1.mlp.router.classifier.weight` and `layer.1.mlp.experts.expert_{e}.wi/wo.weight`;
decoder blocks add `layer.1.EncDecAttention.*` and move the FFN to `layer.2`.
"""

from moe_jax.interop import common, layout
from moe_jax.interop.layout import rule

MODEL_TYPE = "switch_transformers"
ARCHITECTURE = "SwitchTransformersForConditionalGeneration"
ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
TEMPLATE = {"add_cross_attention": False, "add_router_probs": False, "bos_token_id": None,
            "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "initializer_factor": 1.0,
            "is_decoder": False, "is_encoder_decoder": True, "pad_token_id": 0, "router_aux_loss_coef": 0.001,
            "router_bias": False, "router_dtype": "float32", "router_ignore_padding_tokens": False,
            "router_jitter_noise": 0.01, "router_z_loss_coef": 0.001, "use_cache": True}


def _sparse_step(hf, stack):
  """moe_jax's moe_layer_interval of HF's `{stack}_sparse_step` (block i is MoE iff i % step == 1, or every block
  for step 1): moe_jax's MoE blocks are the last of each period, the same blocks for steps 1 and 2 only."""
  layers = hf["num_layers"] if stack == "encoder" else hf.get("num_decoder_layers") or hf["num_layers"]
  sparse = hf.get(f"num_sparse_{stack}_layers")
  step = hf.get(f"{stack}_sparse_step") or (layers // sparse if sparse else 0)
  if step not in (1, 2):
    raise common.unsupported(MODEL_TYPE, f"{stack}_sparse_step", step, "moe_jax's MoE blocks match HF's for a "
                             "step of 1 or 2 only")
  return step


def to_config(hf):
  if hf.get("router_bias"):
    raise common.unsupported(MODEL_TYPE, "router_bias", True, "moe_jax's switch router has no bias")
  act = hf.get("dense_act_fn", "relu")
  if act != "relu" or hf.get("is_gated_act"):
    raise common.unsupported(MODEL_TYPE, "dense_act_fn", act, "Switch's FFNs are ReLU, not gated")
  step = _sparse_step(hf, "encoder")
  if _sparse_step(hf, "decoder") != step:
    raise common.unsupported(MODEL_TYPE, "decoder_sparse_step", hf.get("decoder_sparse_step"),
                             "moe_jax applies one interval to both stacks (encoder_sparse_step's)")
  tied = bool(hf.get("tie_word_embeddings", True))
  heads = common.get(hf, MODEL_TYPE, "num_heads")
  model = dict(architecture="encoder_decoder", vocab_size=common.get(hf, MODEL_TYPE, "vocab_size"),
               d_model=common.get(hf, MODEL_TYPE, "d_model"), num_heads=heads, num_kv_heads=heads,
               head_dim=common.get(hf, MODEL_TYPE, "d_kv"), d_ff=common.get(hf, MODEL_TYPE, "d_ff"),
               num_layers=common.get(hf, MODEL_TYPE, "num_layers"),
               num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
               max_seq_len=hf.get("n_positions", 512), norm="rmsnorm",
               norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), activation="relu", tie_embeddings=tied,
               positions="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
               relative_max_distance=hf.get("relative_attention_max_distance", 128), scale_attention=False,
               dtype=common.dtype(hf, MODEL_TYPE), moe_layer_interval=step)
  config = common.experiment_config(model, {
      "num_experts": common.get(hf, MODEL_TYPE, "num_experts"), "router": "switch",
      "expert_capacity": common.get(hf, MODEL_TYPE, "expert_capacity"), "group_size": 0,
      "jitter_eps": float(hf.get("router_jitter_noise", 0.0))})
  config.data.objective = "span_corruption"
  return config


def to_hf(cfg):
  if cfg.architecture != "encoder_decoder" or cfg.activation != "relu" or cfg.positions != "relative":
    raise ValueError(f"{MODEL_TYPE}: exports T5's encoder-decoder with ReLU FFNs and relative positions")
  if cfg.moe_layer_interval not in (1, 2) or cfg.moe_start_block or cfg.moe.router != "switch":
    raise ValueError(f"{MODEL_TYPE}: needs moe.router='switch' on every first or second block")
  sparse = lambda layers: layers // cfg.moe_layer_interval  # noqa: E731
  return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
              num_heads=cfg.num_heads, num_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
              num_experts=cfg.moe.num_experts, expert_capacity=cfg.moe.expert_capacity,
              encoder_sparse_step=cfg.moe_layer_interval, decoder_sparse_step=cfg.moe_layer_interval,
              num_sparse_encoder_layers=sparse(cfg.num_layers),
              num_sparse_decoder_layers=sparse(cfg.decoder_layers), layer_norm_epsilon=cfg.norm_eps,
              relative_attention_num_buckets=cfg.relative_buckets,
              relative_attention_max_distance=cfg.relative_max_distance, dense_act_fn="relu",
              tie_word_embeddings=cfg.tie_embeddings, router_jitter_noise=cfg.moe.jitter_eps,
              dropout_rate=cfg.dropout)


def _ffn(cfg, param, prefix, use_moe):
  if not use_moe:
    return [rule(param + ("wi_0",), prefix + "wi.weight", layout.TRANSPOSED),
            rule(param + ("wo",), prefix + "wo.weight", layout.TRANSPOSED)]
  count = cfg.moe.num_experts
  expert = lambda name: [f"{prefix}experts.expert_{e}.{name}.weight" for e in range(count)]  # noqa: E731
  return [rule(param + ("router",), prefix + "router.classifier.weight", layout.TRANSPOSED),
          rule(param + ("wi_0",), expert("wi"), layout.experts(count)),
          rule(param + ("wo",), expert("wo"), layout.experts(count))]


def rules(cfg):
  heads, d = cfg.num_heads, cfg.head_dim
  out = [rule(("embed", "embedding"), "shared.weight")]
  for stack, count, moe_blocks in (("encoder", cfg.num_layers, set(cfg.moe_layers)),
                                   ("decoder", cfg.decoder_layers, set(cfg.moe_blocks(cfg.decoder_layers)))):
    for i in range(count):
      block, prefix = (stack, i), f"{stack}.block.{i}.layer."
      self_attn = prefix + "0.SelfAttention."
      out += [rule(block + ("attention_norm", "scale"), prefix + "0.layer_norm.weight"),
              rule(block + ("attention", "qkv"), [self_attn + f"{t}.weight" for t in "qkv"],
                   layout.heads_in([heads, heads, heads], d)),
              rule(block + ("attention", "out"), self_attn + "o.weight", layout.heads_out(heads, d))]
      ffn = 1
      if stack == "decoder":
        cross, ffn = prefix + "1.EncDecAttention.", 2
        out += [rule(block + ("cross_attention_norm", "scale"), prefix + "1.layer_norm.weight"),
                rule(block + ("cross_attention", "q"), cross + "q.weight", layout.heads_in([heads], d)),
                rule(block + ("cross_attention", "kv"), [cross + "k.weight", cross + "v.weight"],
                     layout.heads_in([heads, heads], d)),
                rule(block + ("cross_attention", "out"), cross + "o.weight", layout.heads_out(heads, d))]
      out.append(rule(block + ("ffn_norm", "scale"), f"{prefix}{ffn}.layer_norm.weight"))
      out += _ffn(cfg, block + ("ffn",), f"{prefix}{ffn}.mlp.", i in moe_blocks)
    out += [rule((f"{stack}_norm", "scale"), f"{stack}.final_layer_norm.weight"),
            rule((f"{stack}_position_bias", "embedding"),
                 f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")]
  if not cfg.tie_embeddings:
    out.append(rule(("unembed",), "lm_head.weight", layout.TRANSPOSED))
  return out
