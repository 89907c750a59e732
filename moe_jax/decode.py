"""Autoregressive decoding with a KV cache: a jitted prefill of the prompts and a jitted one-token step, batched,
for the decoder LM and the encoder-decoder, on one device or under a training mesh.

Axis legend: B batch · Lp prompt length (padded) · T cache length (prompt + new tokens, at most
model.max_seq_len) · Li encoder input length · K key/value heads · D head dim · V vocabulary.

How. `Decoder(model, batch_size=B, max_length=T)` makes an inference copy of the model (sharing its arrays) and
attaches a `layers.KVCache` to each attention layer: causal self-attention caches K heads of keys and values
of T positions per row (a grouped-query layer caches H / K times less than it has query heads; stored [B·K, D,
T], the layout the attention's matmuls read without a copy), and the encoder-decoder's cross-attention the
encoder output's Li positions, computed once by the prefill. Every call goes through the model's own forward
code (`Attention.project` / `attend`, the blocks, the head), so cached decoding computes what the full-sequence
forward pass computes, position by position (tests/test_decode.py, float32 to 1e-5).

Prompts are right-padded: row b holds its `lengths[b]` tokens first, then anything (the pad id). The prefill
runs the padded prompts in one causal pass (a real token never reads the padding after it), takes the logits at
each row's last real token and sets each row's next position to its length, so a token keeps the absolute
position it would have in the unpadded sequence (its rotary angle, its T5 relative bias), and each row's padding
in the cache is overwritten by its generated tokens before any query can read it (a query reads keys up to its
own position only). Right padding keeps positions equal to columns, so the prefill is the model's unchanged
forward pass.

Mixture-of-experts layers never drop a token at inference: the inference copy sets every causal stack's MoE layers
(the decoder LM's, the encoder-decoder's decoder) to `moe.dropless=True` with one routing group per sequence, so
a token's expert outputs depend on that token alone (a capacity-limited layer would let the padding and the
other rows of the batch take its slots) and equal the full forward pass of a dropless model. The encoder runs
once over the whole input, routed as in the full forward pass (its routers, e.g. expert choice, are non-causal).
Under a mesh (`parallel.mesh_context`), build or load the model and decode inside the same context: experts
stay split over 'expert', and the batch (the MoE layers' routing groups) over the token axes, so B must be a
multiple of their devices; a cache's rows lie with the batch, its heads over 'tensor' where they divide. Scanned
models (`model.scan_layers`) decode through their unscanned layout (`model.scanned_to_blocks`); the rotary
frequencies of a long-context scaling that depends on the sequence length (LongRoPE) are those of the cache's
length T.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moe_jax import layers, models, parallel, sampling
from moe_jax.encdec import EncoderDecoder
from moe_jax.model import TransformerLM, scanned_to_blocks
from moe_jax.moe_layer import MoeFeedForward


def inference_moe_config(moe):
  """The MoE config a causal stack decodes with: dropless (no capacity, so no token is dropped), one routing group
  per sequence (a one-token step cannot fill a group of several tokens; dropless routing is per token anyway). An
  absolute capacity (moe.expert_capacity, HF Switch's) goes with the capacity: transformers' `generate` decodes
  one token at a time, so its decoder never drops either."""
  return dataclasses.replace(moe, dropless=True, group_size=0, expert_capacity=0)


def inference_copy(model: nnx.Module) -> nnx.Module:
  """`model` for inference, sharing its arrays: causal MoE layers dropless (`inference_moe_config`) and reading only
  the chosen experts' weights in small calls (`MoeFeedForward.sparse_decode`, `dispatch.use_expert_gather`), no
  rematerialisation, blocks unscanned. The model itself is left unchanged."""
  cfg = model.config
  if cfg.scan_layers:  # a cache per block: decode the blocks one by one
    period = cfg.moe_layer_interval or 1
    flat = dataclasses.replace(cfg, scan_layers=False)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build(flat, rngs=nnx.Rngs(0))))
    pure = scanned_to_blocks(nnx.to_pure_dict(nnx.state(model)), cfg.num_layers, period)
    nnx.replace_by_pure_dict(state, pure)
    copy = nnx.merge(graphdef, state)
  else:
    copy = nnx.merge(*nnx.split(model))
  copy.config = dataclasses.replace(copy.config, remat="none", scan_layers=False)
  for _, module in nnx.iter_modules(copy):
    if isinstance(module, MoeFeedForward) and module.causal:
      module.config = inference_moe_config(module.config)
      module.sparse_decode = True
  return copy


def _cache_sharding(mesh, num_kv_heads: int) -> tuple[NamedSharding | None, NamedSharding | None]:
  """Where a cache [B·K, D, T] and its lengths [B] lie on `mesh` (None: no mesh): lengths over the token axes as
  the batch; the cache's rows b·K + k over the token axes, then 'tensor' when it divides K (with one sequence per
  token device, its key/value heads split over 'tensor' as the attention's heads)."""
  if mesh is None:
    return None, None
  rows = parallel.TOKEN_AXES + (("tensor",) if num_kv_heads % mesh.shape["tensor"] == 0 else ())
  return NamedSharding(mesh, P(rows, None, None)), NamedSharding(mesh, parallel.logical_to_spec(("batch",)))


def _set_lengths(model: nnx.Module, lengths: jax.Array) -> None:
  """Every self-attention cache's next position := `lengths` [B] (after a right-padded prefill)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, layers.Attention) and not module.cross and module.cache is not None:
      module.cache.length[...] = lengths.astype(jnp.int32)


def _last(logits: jax.Array, lengths: jax.Array) -> jax.Array:  # [B, L, V], [B] -> [B, V]
  """Each row's logits at its last real token."""
  return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill(graphdef, params, cache, prompts, lengths, encoder_inputs):
  model = nnx.merge(graphdef, params, cache)
  if isinstance(model, EncoderDecoder):
    encoded, padding, _ = model.encode(encoder_inputs)
    logits, _ = model.decode(prompts, encoded, padding)  # the cross-attention caches store the encoder's k, v
  else:
    logits, padding = model(prompts)[0], None
  _set_lengths(model, lengths)
  return _last(logits, lengths), nnx.state(model, nnx.Cache), padding


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _step(graphdef, params, cache, tokens, padding):
  model = nnx.merge(graphdef, params, cache)
  if isinstance(model, EncoderDecoder):
    logits, _ = model.decode(tokens[:, None], None, padding)
  else:
    logits, _ = model(tokens[:, None])
  return logits[:, 0], nnx.state(model, nnx.Cache)


@functools.partial(jax.jit, static_argnums=2)
def _sample(logits, key, config: sampling.SamplingConfig):
  return sampling.sample(logits, key, config)


GREEDY = sampling.SamplingConfig(temperature=0.0)


@dataclasses.dataclass
class DecodeState:
  """Where a batch's decoding stands: every cache, and the encoder's padding mask (encoder-decoder)."""

  cache: nnx.State  # the KVCache variables of every attention layer
  padding: jax.Array | None  # [B, 1, 1, Li] bool: encoder tokens cross-attention may read; None for a decoder LM
  lengths: np.ndarray  # [B] int: tokens of each row so far (prompt + generated)


class Decoder:
  """A model made ready to decode B sequences of up to T tokens: `prefill`, then one `step` per token.

  model: a `TransformerLM` or `EncoderDecoder` (`runstate.build` / `runstate.load(...).model`), left unchanged.
  batch_size: B, rows decoded together (under a mesh: a multiple of the devices of its token axes).
  max_length: T, tokens of a row at most, prompt included (<= model.max_seq_len).
  encoder_length: Li, the encoder inputs' length (encoder-decoder only).
  """

  def __init__(self, model: nnx.Module, *, batch_size: int, max_length: int, encoder_length: int = 0):
    if not isinstance(model, (TransformerLM, EncoderDecoder)):
      raise ValueError(f"cannot decode a {type(model).__name__}: a TransformerLM or an EncoderDecoder")
    cfg = model.config
    self.encoder_decoder = isinstance(model, EncoderDecoder)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 1 <= max_length <= cfg.max_seq_len:
      raise ValueError(f"max_length={max_length} must be in [1, model.max_seq_len={cfg.max_seq_len}]")
    if self.encoder_decoder != (encoder_length > 0):
      raise ValueError(f"encoder_length={encoder_length}: an encoder-decoder needs its inputs' length (>= 1), a "
                       "decoder LM none")
    if encoder_length > cfg.max_seq_len:
      raise ValueError(f"encoder_length={encoder_length} exceeds model.max_seq_len={cfg.max_seq_len}")
    mesh = jax.sharding.get_mesh()
    mesh = None if mesh.empty or mesh.size == 1 else mesh
    if mesh is not None and batch_size % parallel.token_devices(mesh):
      raise ValueError(f"batch_size={batch_size} must be a multiple of the {parallel.token_devices(mesh)} devices "
                       f"of the mesh axes {parallel.TOKEN_AXES}: the rows are split over them")
    self.batch_size, self.max_length, self.encoder_length = batch_size, max_length, encoder_length
    copy = inference_copy(model)
    for _, module in nnx.iter_modules(copy):
      if isinstance(module, layers.Attention) and (module.causal or module.cross):  # not the encoder's
        length = encoder_length if module.cross else max_length
        sharding, length_sharding = _cache_sharding(mesh, module.num_kv_heads)
        module.cache = layers.KVCache(batch_size, length, module.num_kv_heads, module.out.shape[1], dtype=module.dtype,
                                      sharding=sharding, length_sharding=length_sharding)
    self.graphdef, self._empty_cache, self.params = nnx.split(copy, nnx.Cache, ...)

  def prefill(self, prompts, lengths, *, encoder_inputs=None) -> tuple[jax.Array, DecodeState]:
    """The logits of each row's next token [B, V] float32 after its prompt, and the state to `step` from.

    prompts: int [B, Lp] right-padded (row b's tokens are prompts[b, :lengths[b]]); encoder-decoder: the
      decoder's prompt (T5: its start token, `encdec.PAD_ID`, first).
    lengths: int [B], each in [1, Lp].
    encoder_inputs: int [B, Li] (encoder-decoder only), padded with `encdec.PAD_ID`, which is masked.
    """
    prompts, lengths = np.asarray(prompts, np.int32), np.asarray(lengths, np.int32)
    if prompts.ndim != 2 or prompts.shape[0] != self.batch_size or lengths.shape != (self.batch_size,):
      raise ValueError(f"prompts must be [batch_size={self.batch_size}, Lp] and lengths [{self.batch_size}]; got "
                       f"{prompts.shape} and {lengths.shape}")
    if not 1 <= prompts.shape[1] <= self.max_length:
      raise ValueError(f"the prompts' length {prompts.shape[1]} must be in [1, max_length={self.max_length}]")
    if lengths.min() < 1 or lengths.max() > prompts.shape[1]:
      raise ValueError(f"lengths must be in [1, {prompts.shape[1]}] (every row needs a token); got {lengths.tolist()}")
    if self.encoder_decoder:
      if encoder_inputs is None or np.shape(encoder_inputs) != (self.batch_size, self.encoder_length):
        raise ValueError(f"encoder_inputs must be [{self.batch_size}, encoder_length={self.encoder_length}]; got "
                         f"{None if encoder_inputs is None else np.shape(encoder_inputs)}")
      encoder_inputs = np.asarray(encoder_inputs, np.int32)
    elif encoder_inputs is not None:
      raise ValueError("a decoder LM takes no encoder_inputs")
    cache = jax.tree.map(jnp.copy, self._empty_cache)  # the prefill donates it
    logits, cache, padding = _prefill(self.graphdef, self.params, cache, prompts, lengths, encoder_inputs)
    return logits, DecodeState(cache, padding, lengths.astype(np.int64))

  def step(self, state: DecodeState, tokens) -> tuple[jax.Array, DecodeState]:
    """Feeds each row one token, int [B], at its next position: the logits of the token after it [B, V]. The
    state passed in is consumed (its cache donated); use the one returned."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.shape != (self.batch_size,):
      raise ValueError(f"tokens must be [batch_size={self.batch_size}]; got {tokens.shape}")
    if state.lengths.max() >= self.max_length:
      raise ValueError(f"a row already holds max_length={self.max_length} tokens: its cache is full")
    logits, cache = _step(self.graphdef, self.params, state.cache, tokens, state.padding)
    return logits, DecodeState(cache, state.padding, state.lengths + 1)

  def generate(self, prompts, lengths, *, max_new_tokens: int, config: sampling.SamplingConfig = GREEDY,
               key: jax.Array | None = None, stop_tokens: Sequence[int] = (), pad_id: int = 0,
               encoder_inputs=None) -> Iterator[np.ndarray]:
    """Yields each step's new tokens, int [B], as they are chosen (at most `max_new_tokens` steps): a row that
    has emitted one of `stop_tokens` (which it emits) yields `pad_id` afterwards, and generation ends when every
    row has stopped. Sampling by `config` (`sampling.sample`), the key of step i being fold_in(key, i):
    deterministic for a key. Rows must fit: max(lengths) + max_new_tokens <= max_length."""
    lengths_array = np.asarray(lengths)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if lengths_array.max() + max_new_tokens > self.max_length + 1:  # the last token is never fed back
      raise ValueError(f"the longest prompt ({lengths_array.max()} tokens) + max_new_tokens={max_new_tokens} exceed "
                       f"max_length={self.max_length} + 1")
    if not config.greedy and key is None:
      raise ValueError(f"temperature={config.temperature} samples: a PRNG key is needed")
    stops = np.asarray(sorted(stop_tokens), np.int32)
    logits, state = self.prefill(prompts, lengths, encoder_inputs=encoder_inputs)
    done = np.zeros(self.batch_size, bool)
    for i in range(max_new_tokens):
      step_key = None if config.greedy else jax.random.fold_in(key, i)
      tokens = np.where(done, pad_id, np.asarray(_sample(logits, step_key, config)))
      done |= np.isin(tokens, stops)
      yield tokens
      if done.all() or i == max_new_tokens - 1:
        return
      logits, state = self.step(state, tokens)
