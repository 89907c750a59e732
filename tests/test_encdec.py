"""The encoder-decoder (moe_jax.encdec) and the attention options it adds to layers.Attention: T5 relative
position buckets and bias equal their plain references, attention equals its reference with bias, mask and
cross inputs, the encoder reads both ways and the decoder only backwards, padding is invisible, and the built
model is counted exactly by moe_jax.flops, FLOPs included (XLA's cost analysis)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_lib, flops, layers, models, parallel, reference
from moe_jax.encdec import EncoderDecoder

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8


def tiny_cfg(vocab_size=64, **model):
  config = config_lib.default_config()
  config.model.update(dict(dict(architecture="encoder_decoder", positions="relative", d_model=D_MODEL,
                                num_heads=HEADS, head_dim=HEAD_DIM, d_ff=48, num_layers=2, num_decoder_layers=2,
                                max_seq_len=64, activation="geglu", relative_buckets=8, relative_max_distance=16),
                           **model))
  config.moe.num_experts = 4
  config.data.objective = "span_corruption"
  return config_lib.model_config(config, vocab_size=vocab_size)


@nnx.jit
def apply(model, inputs, decoder_inputs):
  """(logits, aux), deterministic; jitted: eager MoE layers run op by op, far slower on CPU."""
  return model(inputs, decoder_inputs)


def build(cfg, seed=0):
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    return EncoderDecoder(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_equal_t5s_scalar_formula(bidirectional):
  offsets = np.arange(-300, 301)
  fast = layers.relative_position_bucket(jnp.asarray(offsets)[None], bidirectional=bidirectional, num_buckets=32,
                                         max_distance=128)[0]
  slow = [reference.relative_position_bucket(int(o), bidirectional=bidirectional, num_buckets=32, max_distance=128)
          for o in offsets]
  np.testing.assert_array_equal(np.asarray(fast), slow)
  # Causal: every key after the query shares bucket 0 with the query itself.
  if not bidirectional:
    assert set(np.asarray(fast)[offsets >= 0].tolist()) == {0}


def test_relative_position_bias_looks_up_each_pairs_bucket():
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    table = layers.RelativePositionBias(HEADS, num_buckets=8, max_distance=16, bidirectional=True, init_scale=1.0,
                                        rngs=nnx.Rngs(0))
  bias = table(5, 7)  # [1, H, 5, 7]
  embedding = np.asarray(table.embedding[...])
  for q in range(5):
    for k in range(7):
      bucket = reference.relative_position_bucket(k - q, bidirectional=True, num_buckets=8, max_distance=16)
      np.testing.assert_allclose(np.asarray(bias[0, :, q, k]), embedding[bucket], rtol=1e-6)


@pytest.mark.parametrize("kind", ["encoder_self", "decoder_self", "cross"])
def test_attention_with_bias_and_mask_equals_its_reference(kind):
  causal, cross = kind == "decoder_self", kind == "cross"
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    layer = layers.Attention(D_MODEL, HEADS, HEAD_DIM, init_scale=1.0, causal=causal, rotary=False, cross=cross,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, D_MODEL))
  context = jax.random.normal(jax.random.key(2), (2, 9, D_MODEL)) if cross else x
  keys = context.shape[1]
  bias = None if cross else jax.random.normal(jax.random.key(3), (1, HEADS, 6, keys))
  mask = jnp.arange(keys)[None, None, None, :] < jnp.asarray([keys, keys - 3])[:, None, None, None]
  if cross:
    wq, (wk, wv) = layer.q[...], jnp.split(layer.kv[...], 2, axis=1)
  else:
    wq, wk, wv = jnp.split(layer.qkv[...], 3, axis=1)
  got = layer(x, context=context if cross else None, bias=bias, mask=mask)
  want = reference.attention_with_bias(x, context, wq, wk, wv, layer.out[...], bias, mask, causal)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_encoder_reads_both_ways_and_decoder_only_backwards():
  model = build(tiny_cfg(moe_layer_interval=0))
  inputs = jax.random.randint(jax.random.key(0), (1, 12), 3, 64)
  targets = jax.random.randint(jax.random.key(1), (1, 8), 3, 64)
  logits, _ = apply(model, inputs, targets)
  # A change at the last encoder position reaches every decoder position (bidirectional encoder, cross-attention).
  changed_input, _ = apply(model, inputs.at[0, -1].set(5), targets)
  assert np.all(np.abs(np.asarray(changed_input - logits)).max(axis=-1) > 1e-6)
  # A change at decoder position 5 leaves positions 0..4 unchanged (causal decoder).
  changed_target, _ = apply(model, inputs, targets.at[0, 5].set(7))
  np.testing.assert_allclose(np.asarray(changed_target[0, :5]), np.asarray(logits[0, :5]), atol=1e-6)
  assert np.abs(np.asarray(changed_target[0, 5:] - logits[0, 5:])).max() > 1e-6


def test_encoder_padding_changes_nothing():
  """Appending padding (id 0) to the inputs leaves the logits unchanged: padded keys are masked out of encoder
  self-attention and cross-attention (relative positions depend on offsets only, so real positions keep theirs)."""
  model = build(tiny_cfg())
  inputs = jax.random.randint(jax.random.key(0), (2, 10), 3, 64)
  targets = jax.random.randint(jax.random.key(1), (2, 6), 3, 64)
  logits, _ = apply(model, inputs, targets)
  padded, _ = apply(model, jnp.pad(inputs, ((0, 0), (0, 5))), targets)
  chex.assert_trees_all_close(padded, logits, atol=1e-5, rtol=1e-5)


def test_moe_sits_on_every_other_ffn_of_each_stack():
  model = build(tiny_cfg(num_layers=4, num_decoder_layers=2))
  kinds = [type(b.ffn).__name__ for b in [*model.encoder, *model.decoder]]
  assert kinds == ["FeedForward", "MoeFeedForward", "FeedForward", "MoeFeedForward", "FeedForward",
                   "MoeFeedForward"]
  # Which blocks route is structure, not values: traced abstractly, nothing compiled.
  _, aux = nnx.eval_shape(lambda m, x, y: m(x, y), model, jnp.ones((2, 8), jnp.int32), jnp.ones((2, 4), jnp.int32))
  assert sorted(aux.blocks) == [1, 3, 5]  # decoder block j is num_layers + j


@pytest.mark.parametrize("tied", [True, False])
def test_built_model_is_counted_exactly_params_and_flops(tied):
  # Wide enough that the matmuls dominate what XLA counts (norms, softmax, GELU, routing are left out).
  cfg = tiny_cfg(tie_embeddings=tied, d_model=128, num_heads=4, head_dim=32, d_ff=384, vocab_size=512)
  model = build(cfg)
  built = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.param_count(cfg).total == built
  inputs, targets = jnp.ones((2, 64), jnp.int32), jnp.ones((2, 16), jnp.int32)
  graph, state = nnx.split(model)
  forward = jax.jit(lambda s, x, y: nnx.merge(graph, s)(x, y)[0])
  xla = forward.lower(state, inputs, targets).compile().cost_analysis()["flops"]
  # Executed FLOPs: the capacity-padded expert buffers at the evaluation capacity factor.
  counted = 2 * flops.flops_per_sequence(cfg, 64, 16, executed=True,
                                         capacity_factor=cfg.moe.eval_capacity_factor).forward
  assert abs(xla - counted) <= 0.05 * counted, (xla, counted)


def test_models_build_picks_the_architecture():
  with parallel.mesh_context(parallel.create_mesh(1, 1)):
    assert isinstance(models.build(tiny_cfg(), rngs=nnx.Rngs(0)), EncoderDecoder)


@pytest.mark.parametrize("field, value, message", [
    ("positions", "relative", "model.positions='relative' must be 'rotary' for model.architecture='decoder'"),
    ("num_decoder_layers", 2, "model.num_decoder_layers=2 must be 0"),
])
def test_decoder_lm_refuses_encoder_decoder_fields(field, value, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.ModelConfig(**{field: value})


def test_objective_must_match_the_architecture():
  config = config_lib.default_config()
  config.model.architecture = "encoder_decoder"
  with pytest.raises(ValueError, match="data.objective='causal_lm' must be 'span_corruption'"):
    config_lib.validate(config)


def _routed_cfg(vocab_size=64, **moe):
  config = config_lib.default_config()
  config.model.update(dict(architecture="encoder_decoder", positions="relative", d_model=D_MODEL, num_heads=HEADS,
                           head_dim=HEAD_DIM, d_ff=48, num_layers=2, num_decoder_layers=2, max_seq_len=64,
                           activation="geglu", relative_buckets=8, relative_max_distance=16))
  config.moe.update(dict(num_experts=4, **moe))
  config.data.objective = "span_corruption"
  config.train.update(dict(seq_len=32, batch_size=4))
  config_lib.validate(config)  # the whole experiment, as the CLI checks it
  return config_lib.model_config(config, vocab_size=vocab_size)


@pytest.mark.parametrize("moe", [
    dict(router="expert_choice", decoder_router="switch"),
    dict(router="soft_moe", dispatch="einsum", soft_moe=dict(slots_per_expert=2), decoder_router="top_k"),
    dict(router="hash", decoder_router="switch"),
], ids=["expert_choice", "soft_moe", "hash"])
def test_a_non_causal_or_hash_encoder_router_routes_the_encoder_and_the_decoder_routes_causally(moe):
  cfg = _routed_cfg(**moe)
  model = build(cfg)
  encoder_ffn, decoder_ffn = model.encoder[1].ffn, model.decoder[1].ffn
  assert (encoder_ffn.config.router, encoder_ffn.causal) == (moe["router"], False)
  assert (decoder_ffn.config.router, decoder_ffn.causal) == (moe["decoder_router"], True)
  built = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert flops.param_count(cfg).total == built  # each stack's router counted as built
  inputs = jax.random.randint(jax.random.key(0), (2, 32), 3, 64)
  logits, aux = apply(model, inputs, inputs[:, :8])
  assert logits.shape == (2, 8, 64) and bool(jnp.all(jnp.isfinite(logits)))
  assert sorted(aux.blocks) == [1, 3]  # encoder block 1, decoder block 1 (= num_layers + 1)


def test_a_non_causal_router_needs_a_causal_decoder_router_and_the_decoder_lm_refuses_both():
  with pytest.raises(ValueError, match="set moe.decoder_router"):
    _routed_cfg(router="expert_choice")
  config = config_lib.default_config()
  config.moe.decoder_router = "switch"
  config.moe.router = "top_k"
  with pytest.raises(ValueError, match="moe.decoder_router='switch' is for model.architecture='encoder_decoder'"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="moe.decoder_router"):
    _routed_cfg(router="expert_choice", decoder_router="soft_moe")  # not a causal router: not a choice
