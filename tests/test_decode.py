"""moe_jax.decode: cached decoding (a right-padded prefill, then one token per step) gives at every position the
logits of the full-sequence forward pass (float32, 1e-5) for dense, Switch (top-1), top-k, shared-expert,
grouped-query and scanned decoder LMs and for the encoder-decoder (T5 relative bias, cross-attention cache), on one
device and on the 8-device CPU mesh; greedy generation is the argmax of the full forward pass re-run; stop tokens
end rows; capacity-limited MoE layers decode dropless; bad input is refused; the compiled step copies neither a KV
cache nor an attention output projection (issue 32)."""

import copy
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import config_lib, decode, encdec, models, parallel, sampling

VOCAB, LENGTH = 64, 10
ATOL = 1e-5


def lm_cfg(overrides=None):
  """A tiny decoder LM, dropless (the full forward pass then drops nothing either: the reference of dropless
  decoding); `overrides` by dotted config key."""
  config = config_lib.default_config()
  config.model.update(dict(d_model=32, num_heads=4, head_dim=8, d_ff=48, num_layers=2, max_seq_len=16))
  config.moe.num_experts = 4
  config.moe.dropless = True
  config.update_from_flattened_dict(overrides or {})
  return config_lib.model_config(config, vocab_size=VOCAB)


_forward = nnx.jit(models.forward)


def tokens_of(batch, length, seed=0):
  return np.array(jax.random.randint(jax.random.key(seed), (batch, length), 1, VOCAB), np.int32)


def build(cfg, seed=0):
  """The model of `cfg`, initialised under jit (eager initialisers run op by op: seconds on the CPU)."""
  return nnx.jit(lambda: models.build(cfg, rngs=nnx.Rngs(seed)))()


def assert_cached_equals_full(model, tokens, lengths):
  """Prefill of each row's first lengths[b] tokens, then its next tokens one by one: the logits of each equal the
  full forward pass's at that position."""
  batch, length = tokens.shape
  full = np.asarray(_forward(model, {"inputs": jnp.asarray(tokens)})[0])  # [B, L, V]
  lengths = np.asarray(lengths)
  prompts = np.where(np.arange(length)[None] < lengths[:, None], tokens, 0)  # right-padded, pad id 0
  decoder = decode.Decoder(model, batch_size=batch, max_length=length)
  logits, state = decoder.prefill(prompts[:, :lengths.max()], lengths)
  rows = np.arange(batch)
  for i in range(length - lengths.max() + 1):
    position = lengths - 1 + i  # each row's last token fed so far
    np.testing.assert_allclose(np.asarray(logits), full[rows, position], atol=ATOL, rtol=0)
    if i < length - lengths.max():
      logits, state = decoder.step(state, tokens[rows, position + 1])


TOP2_GQA = {"moe.router": "top_k", "moe.top_k.k": 2, "model.num_kv_heads": 2}


@pytest.mark.parametrize("overrides", [
    {"model.moe_layer_interval": 0},  # dense
    {},  # Switch, top-1, MoE on every other block
    TOP2_GQA,  # top-2, grouped-query attention (2 key/value heads for 4 query heads)
    {"moe.router": "top_k", "moe.top_k.k": 2, "moe.num_shared_experts": 1, "model.moe_layer_interval": 1},
    # The published families' attention and blocks (OLMo 2's post-norm and full QK-norm, Phi-3.5's biases, DBRX's
    # clipping, Llama 3.1's rotary scaling, unscaled logits), through the same projection when cached.
    {"model.norm_position": "post", "model.qk_norm": "full", "model.attention_bias": "qkvo", "model.clip_qkv": 1.0,
     "model.scale_attention": False, "model.rope_theta": 5e5, "model.rope_scaling": "llama3",
     "model.rope_original_max_len": 8, "model.lm_head_bias": True},
], ids=["dense", "switch", "top2_gqa", "shared_expert", "families"])
def test_cached_decoding_equals_the_full_forward_at_every_position(overrides):
  model = build(lm_cfg(overrides))
  assert_cached_equals_full(model, tokens_of(3, LENGTH), lengths=[1, 4, 2])


@pytest.mark.slow  # one more model and its programs; scanned_to_blocks is tested in tests/test_scan.py
def test_a_scanned_model_decodes_through_its_unscanned_blocks():
  model = build(lm_cfg({"model.scan_layers": True}))
  assert_cached_equals_full(model, tokens_of(2, LENGTH), lengths=[2, 3])
  assert hasattr(model, "scanned") and not hasattr(model, "blocks")  # the model itself is unchanged


def test_cached_decoding_equals_the_full_forward_on_the_8_device_mesh():
  cfg = lm_cfg(TOP2_GQA)
  with parallel.mesh_context(parallel.create_mesh(2, 4)):  # experts split over 'expert', rows over all 8
    model = build(cfg)
    assert model.blocks[1].ffn.wi_0[...].sharding.shard_shape(model.blocks[1].ffn.wi_0.shape)[0] == 1
    assert_cached_equals_full(model, tokens_of(8, LENGTH), lengths=[1, 2, 3, 4, 5, 1, 2, 3])
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of the 8 devices"):
      decode.Decoder(model, batch_size=4, max_length=LENGTH)


@pytest.mark.slow  # two more meshes' programs
def test_cached_decoding_equals_the_full_forward_with_heads_split_and_for_the_encoder_decoder_on_a_mesh():
  with parallel.mesh_context(parallel.create_mesh(2, 2, tensor=2)):  # key/value heads (and caches) over 'tensor'
    model = build(lm_cfg(TOP2_GQA))
    decoder = decode.Decoder(model, batch_size=4, max_length=LENGTH)
    cache = decoder.prefill(tokens_of(4, 2), [1, 2, 2, 1])[1].cache
    key = jax.tree.leaves(cache)[0]  # [B·K, D, T]: a row's 2 heads split over 'tensor'
    assert key.sharding.shard_shape(key.shape) == (1, 8, LENGTH)
    assert_cached_equals_full(model, tokens_of(4, LENGTH), lengths=[1, 2, 3, 4])
  with parallel.mesh_context(parallel.create_mesh(2, 4)):
    model = build(encdec_cfg(num_kv_heads=2))
    assert_encoder_decoder_cached_equals_full(model, batch=8)


def test_capacity_limited_moe_layers_decode_dropless():
  limited = lm_cfg({"moe.dropless": False, "moe.capacity_factor": 0.5, "moe.eval_capacity_factor": 0.5})
  model = build(limited)
  copy = decode.inference_copy(model)
  assert copy.blocks[1].ffn.config.dropless and not model.blocks[1].ffn.config.dropless  # the model unchanged
  assert_cached_equals_full(copy, tokens_of(2, LENGTH), lengths=[3, 1])  # the dropless copy is the reference


def test_greedy_generation_is_the_argmax_of_the_full_forward_rerun_and_stop_tokens_end_rows():
  model = build(lm_cfg(), seed=1)
  prompts, lengths = tokens_of(2, 4, seed=5), np.array([4, 2])
  decoder = decode.Decoder(model, batch_size=2, max_length=12)
  steps = np.stack(list(decoder.generate(prompts, lengths, max_new_tokens=8)))  # [8, B]
  for b in range(2):
    sequence = np.concatenate([prompts[b, :lengths[b]], steps[:, b]])
    full = np.asarray(_forward(model, {"inputs": jnp.asarray(sequence[None])})[0])[0]  # [L, V]
    np.testing.assert_array_equal(steps[:, b], np.argmax(full[lengths[b] - 1:-1], axis=-1))
  stop = int(steps[2, 0])
  stopped = np.stack(list(decoder.generate(prompts, lengths, max_new_tokens=8, stop_tokens=[stop], pad_id=0)))
  first = {b: int(np.flatnonzero(steps[:, b] == stop)[0]) if (steps[:, b] == stop).any() else None for b in range(2)}
  for b in range(2):
    end = first[b] if first[b] is not None else len(steps)
    np.testing.assert_array_equal(stopped[:end + 1, b], steps[:end + 1, b])
    assert (stopped[end + 1:, b] == 0).all()
  assert len(stopped) == (max(first.values()) + 1 if None not in first.values() else len(steps))


@pytest.mark.slow  # the sampling functions are tested in tests/test_sampling.py; this adds generate's keys
def test_sampled_generation_repeats_for_a_key():
  model = build(lm_cfg({"model.moe_layer_interval": 0}))
  decoder = decode.Decoder(model, batch_size=2, max_length=12)
  config = sampling.SamplingConfig(temperature=1.5, top_k=20, top_p=0.9)
  runs = [np.stack(list(decoder.generate(tokens_of(2, 3), [3, 3], max_new_tokens=6, config=config,
                                          key=jax.random.key(seed)))) for seed in (7, 7, 8)]
  np.testing.assert_array_equal(runs[0], runs[1])
  assert (runs[0] != runs[2]).any()


def encdec_cfg(**model):
  config = config_lib.default_config()
  config.model.update(dict(architecture="encoder_decoder", positions="relative", d_model=32, num_heads=4,
                           head_dim=8, d_ff=48, num_layers=2, num_decoder_layers=2, max_seq_len=16,
                           relative_buckets=8, relative_max_distance=16, moe_layer_interval=1))
  config.model.update(model)
  config.moe.num_experts = 4
  config.moe.dropless = True
  config.data.objective = "span_corruption"
  return config_lib.model_config(config, vocab_size=VOCAB)


# Rotary positions in the slow tier: the decoder LM's tests cover the rotary cache; T5's bias is the new part here.
@pytest.mark.parametrize("positions", ["relative", pytest.param("rotary", marks=pytest.mark.slow)])
def test_encoder_decoder_cached_decoding_equals_the_full_forward(positions):
  assert_encoder_decoder_cached_equals_full(build(encdec_cfg(positions=positions, num_kv_heads=2)), batch=2)


def assert_encoder_decoder_cached_equals_full(model, batch):
  """As `assert_cached_equals_full`, the decoder's tokens after padded encoder inputs (rows alternately 1 and 3
  decoder prompt tokens, the odd rows' inputs padded after 5 tokens)."""
  inputs = tokens_of(batch, 7, seed=3)
  inputs[1::2, 5:] = encdec.PAD_ID  # padding the cross-attention must not read
  targets = tokens_of(batch, LENGTH, seed=4)
  targets[:, 0] = encdec.PAD_ID  # T5's decoder start token
  full = np.asarray(_forward(model, {"inputs": jnp.asarray(inputs), "decoder_inputs": jnp.asarray(targets)})[0])
  decoder = decode.Decoder(model, batch_size=batch, max_length=LENGTH, encoder_length=7)
  lengths = np.tile([1, 3], batch // 2)
  logits, state = decoder.prefill(np.where(np.arange(3) < lengths[:, None], targets[:, :3], 0), lengths,
                                  encoder_inputs=inputs)
  rows = np.arange(batch)
  for i in range(LENGTH - 3 + 1):
    position = lengths - 1 + i
    np.testing.assert_allclose(np.asarray(logits), full[rows, position], atol=ATOL, rtol=0)
    if i < LENGTH - 3:
      logits, state = decoder.step(state, targets[rows, position + 1])


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0, max_length=8), "batch_size=0"),
    (dict(batch_size=1, max_length=17), r"max_length=17 must be in \[1, model.max_seq_len=16\]"),
    (dict(batch_size=1, max_length=8, encoder_length=4), "encoder_length=4"),
])
def test_bad_decoder_settings_are_refused(kwargs, message):
  model = nnx.eval_shape(lambda: models.build(lm_cfg(), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=message):
    decode.Decoder(model, **kwargs)


def test_bad_prompts_are_refused():
  decoder = decode.Decoder(build(lm_cfg({"model.moe_layer_interval": 0})), batch_size=2,
                           max_length=8)
  with pytest.raises(ValueError, match="lengths must be in"):
    decoder.prefill(np.ones((2, 3)), [0, 3])
  with pytest.raises(ValueError, match="max_new_tokens=6 exceed"):
    next(decoder.generate(np.ones((2, 4)), [4, 4], max_new_tokens=6))


def copies_as_large_as(hlo: str, shape: tuple[int, ...]) -> list[str]:
  """The copy and transpose instructions of an optimised HLO module (fused computations included) whose result
  holds as many elements as an array of `shape`: a copy of such an array whole, in whatever layout or reshape
  (callers pick sizes that no other intermediate of the program shares)."""
  size = math.prod(shape)
  found = []
  for line in hlo.splitlines():
    match = re.search(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", line)
    if match and math.prod(int(d) for d in match.group(1).split(",") if d) == size:
      found.append(line.strip())
  return found


def test_the_copy_finder_sees_the_copies_the_decode_step_was_rid_of():
  """The two per-step copies of issue 32 in isolation, as the decode step had them: a contraction over (H, D)
  that jnp.einsum lists as (D, H) copies the output projection [H, D, M]; attention over a cache [B, T, K, D]
  transposes it whole."""
  out = jax.ShapeDtypeStruct((4, 8, 32), jnp.float32)  # [H, D, M]
  attended = jax.ShapeDtypeStruct((1, 1, 4, 8), jnp.float32)  # [B, Lq, H, D]
  hlo = jax.jit(lambda a, w: jnp.einsum("blhd,hdm->blm", a, w)).lower(attended, out).compile().as_text()
  assert copies_as_large_as(hlo, out.shape)
  cache = jax.ShapeDtypeStruct((1, 12, 2, 8), jnp.float32)  # [B, T, K, D]
  hlo = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)).lower(attended, cache, cache).compile()
  assert copies_as_large_as(hlo.as_text(), cache.shape)


def step_hlo(decoder: decode.Decoder, state: decode.DecodeState) -> str:
  """The optimised HLO of `decoder.step` from `state` as `Decoder.step` runs it: weights and cache arguments (closed
  over, the weights would be constants, and XLA may fold a copy of a constant away), the cache donated."""
  tokens = np.ones(decoder.batch_size, np.int32)

  def step(params, cache, padding):
    traced = copy.copy(decoder)
    traced.params = params
    logits, after = traced.step(decode.DecodeState(cache, padding, state.lengths), tokens)
    return logits, after.cache

  return jax.jit(step, donate_argnums=1).lower(decoder.params, state.cache, state.padding).compile().as_text()


@pytest.mark.parametrize("batch", [1, 3])
def test_the_decode_step_copies_neither_a_kv_cache_nor_an_output_projection(batch):
  """Issue 32: a decode step reads every weight and cache once; XLA:CPU used to copy each attention layer's
  output projection and transpose its whole key and value caches before the matmuls, every step. Sizes: the
  cache B x K x D x T = B x 2 x 8 x 12 and `out` H x D x M = 4 x 8 x 32 elements, shared by no other
  intermediate (top-2 MoE blocks, grouped-query attention)."""
  model = build(lm_cfg(TOP2_GQA))
  decoder = decode.Decoder(model, batch_size=batch, max_length=12)
  state = decoder.prefill(tokens_of(batch, 2), np.full(batch, 2))[1]
  hlo = step_hlo(decoder, state)
  assert copies_as_large_as(hlo, (batch, 2, 8, 12)) == []
  assert copies_as_large_as(hlo, model.blocks[0].attention.out.shape) == []


def test_the_encoder_decoder_step_copies_no_kv_cache():
  """As above for T5: the decoder's self-attention caches [B, K, D, T] and the cross-attention caches of the
  encoder output (T = Li = 7 positions) are read where they lie."""
  model = build(encdec_cfg(num_kv_heads=2))
  decoder = decode.Decoder(model, batch_size=2, max_length=12, encoder_length=7)
  state = decoder.prefill(tokens_of(2, 1), [1, 1], encoder_inputs=tokens_of(2, 7, seed=3))[1]
  hlo = step_hlo(decoder, state)
  assert copies_as_large_as(hlo, (2, 2, 8, 12)) == []
  assert copies_as_large_as(hlo, (2, 2, 8, 7)) == []
  assert copies_as_large_as(hlo, model.decoder[0].attention.out.shape) == []
