"""T5's encoder-decoder transformer with Switch (or any MoE) feed-forward layers, from the decoder LM's parts.

Axis legend: B batch · Li encoder input length · Lo decoder length · M d_model · V vocabulary.

Architecture (T5.1.1, Raffel et al. 2020 and its v1.1 release; Switch Transformer, Fedus et al. 2021, Sec. 2 and
Table 9): a shared token embedding; an encoder of `model.num_layers` pre-norm blocks x + SelfAttn(Norm(x)),
x + FFN(Norm(x)) with bidirectional attention; a decoder of `model.num_decoder_layers` blocks that add
x + CrossAttn(Norm(x), encoder output) between causal self-attention and the FFN; RMSNorm, no biases, logits
untied (T5.1.1) or tied (`model.tie_embeddings`, as the Switch-Base/Large checkpoints). Positions are T5's
learned relative position buckets (`layers.RelativePositionBias`, one per stack, bidirectional in the encoder,
causal in the decoder, shared by the stack's layers; none in cross-attention), or rotary. In each stack the FFN
of every `moe_layer_interval`-th block (from `moe_start_block`) is a `MoeFeedForward`, the others dense
`FeedForward`s (Switch: every other FFN, in the encoder and in the decoder).

Padding (id `PAD_ID` in the encoder inputs) is masked out of encoder self-attention and cross-attention; the
decoder's padding only follows its real tokens, which causal attention already keeps from reading it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import layers
from moe_jax.config_lib import ModelConfig
from moe_jax.init import switch_init
from moe_jax.model import LmAux, rope_of, sum_aux
from moe_jax.moe_layer import DTYPES, FeedForward, MoeFeedForward

PAD_ID = 0  # the tokenizers' pad id (moe_jax.data.tokenizers), also T5's decoder start id


def _make_ffn(cfg: ModelConfig, use_moe: bool, *, decoder: bool, rngs: nnx.Rngs) -> nnx.Module:
  """The block's FFN. An encoder MoE layer is non-causal (it may route with expert choice or Soft MoE); the
  decoder stack's route causally, with `moe.decoder_router` when one is set."""
  dtype = DTYPES[cfg.dtype]
  if use_moe:
    moe = cfg.moe.decoder_stack() if decoder else cfg.moe
    return MoeFeedForward(cfg.d_model, cfg.expert_d_ff, moe, shared_d_ff=cfg.shared_d_ff, causal=decoder,
                          activation=cfg.activation, init_scale=cfg.init_scale, dtype=dtype, rngs=rngs)
  return FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dropout=cfg.dropout,
                     init_scale=cfg.init_scale, dtype=dtype, rngs=rngs)


def _attention(cfg: ModelConfig, *, causal: bool, cross: bool, rngs: nnx.Rngs) -> layers.Attention:
  return layers.Attention(cfg.d_model, cfg.num_heads, cfg.head_dim, num_kv_heads=cfg.kv_heads,
                          init_scale=cfg.init_scale, causal=causal, rotary=cfg.positions == "rotary" and not cross,
                          rope=rope_of(cfg), cross=cross, scale_logits=cfg.scale_attention, dropout=cfg.dropout,
                          dtype=DTYPES[cfg.dtype], rngs=rngs)


class EncoderDecoderBlock(nnx.Module):
  """One pre-norm block: self-attention (bidirectional in the encoder, causal in the decoder), cross-attention
  over the encoder output (decoder only), then a dense or MoE FFN; each sublayer a residual branch."""

  def __init__(self, cfg: ModelConfig, *, decoder: bool, use_moe: bool, rngs: nnx.Rngs):
    self.attention_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attention = _attention(cfg, causal=decoder, cross=False, rngs=rngs)
    if decoder:
      self.cross_attention_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
      self.cross_attention = _attention(cfg, causal=False, cross=True, rngs=rngs)
    self.decoder = decoder
    self.ffn_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.use_moe = use_moe
    self.ffn = _make_ffn(cfg, use_moe, decoder=decoder, rngs=rngs)
    self.residual_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,  # [B, L, M]
      *,
      bias: jax.Array | None,  # [1, H, L, L] relative position bias, or None (rotary)
      mask: jax.Array | None,  # [B, 1, L, L] self-attention mask, or None (causal only)
      encoded: jax.Array | None = None,  # [B, Li, M] decoder only
      cross_mask: jax.Array | None = None,  # [B, 1, 1, Li] decoder only: encoder padding
      token_ids: jax.Array,  # [B, L] this stack's tokens, which hash routing reads
      deterministic: bool,
  ):  # -> ([B, L, M], MoeAux | None)
    drop = lambda y: self.residual_dropout(y, deterministic=deterministic)  # noqa: E731
    x = x + drop(self.attention(self.attention_norm(x), bias=bias, mask=mask, deterministic=deterministic))
    if self.decoder:
      x = x + drop(self.cross_attention(self.cross_attention_norm(x), context=encoded, mask=cross_mask,
                                        deterministic=deterministic))
    h = self.ffn_norm(x)
    if self.use_moe:
      ids = token_ids if self.ffn.config.needs_token_ids else None
      y, aux = self.ffn(h, deterministic=deterministic, token_ids=ids)
    else:
      y, aux = self.ffn(h, deterministic=deterministic), None
    return x + drop(y), aux


class EncoderDecoder(nnx.Module):
  """(inputs [B, Li], decoder_inputs [B, Lo]) -> logits [B, Lo, V] (float32) and the MoE auxiliary outputs.

  `LmAux.blocks` keys encoder block i as i and decoder block j as num_layers + j.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    self.embed = layers.Embedding(cfg.vocab_size, cfg.d_model, dtype=DTYPES[cfg.dtype], rngs=rngs)
    encoder_moe, decoder_moe = set(cfg.moe_layers), set(cfg.moe_blocks(cfg.decoder_layers))
    self.encoder = nnx.List([EncoderDecoderBlock(cfg, decoder=False, use_moe=i in encoder_moe, rngs=rngs)
                             for i in range(cfg.num_layers)])
    self.encoder_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.decoder = nnx.List([EncoderDecoderBlock(cfg, decoder=True, use_moe=i in decoder_moe, rngs=rngs)
                             for i in range(cfg.decoder_layers)])
    self.decoder_norm = layers.make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.relative = cfg.positions == "relative"
    if self.relative:
      bias = lambda bidirectional: layers.RelativePositionBias(  # noqa: E731
          cfg.num_heads, num_buckets=cfg.relative_buckets, max_distance=cfg.relative_max_distance,
          bidirectional=bidirectional, init_scale=cfg.init_scale, rngs=rngs)
      self.encoder_position_bias, self.decoder_position_bias = bias(True), bias(False)
    self.input_dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    if not cfg.tie_embeddings:
      init = nnx.with_partitioning(switch_init(cfg.init_scale), ("embed", "vocab"))
      self.unembed = nnx.Param(init(rngs.params(), (cfg.d_model, cfg.vocab_size)))

  def __call__(self, inputs: jax.Array, decoder_inputs: jax.Array, *,
               deterministic: bool = True) -> tuple[jax.Array, LmAux]:
    for name, tokens in (("inputs", inputs), ("decoder_inputs", decoder_inputs)):
      if tokens.shape[1] > self.config.max_seq_len:
        raise ValueError(f"{name} length {tokens.shape[1]} exceeds model.max_seq_len={self.config.max_seq_len}")
    encoded, padding, auxes = self.encode(inputs, deterministic=deterministic)
    logits, decoder_auxes = self.decode(decoder_inputs, encoded, padding, deterministic=deterministic)
    return logits, sum_aux({**auxes, **decoder_auxes})

  def encode(self, inputs: jax.Array, *, deterministic: bool = True):
    """The encoder: inputs [B, Li] -> (its output [B, Li, M], the padding mask [B, 1, 1, Li] (True: a token
    attention may read), its MoE blocks' aux by block index)."""
    auxes = {}
    padding = (inputs != PAD_ID)[:, None, None, :]  # [B, 1, 1, Li]: keys a query may read
    x = self.input_dropout(self.embed(inputs), deterministic=deterministic)
    bias = self.encoder_position_bias(inputs.shape[1], inputs.shape[1]) if self.relative else None
    for index, block in enumerate(self.encoder):
      x, aux = block(x, bias=bias, mask=padding, token_ids=inputs, deterministic=deterministic)
      if aux is not None:
        auxes[index] = aux
    return self.input_dropout(self.encoder_norm(x), deterministic=deterministic), padding, auxes

  def decode(self, decoder_inputs: jax.Array, encoded: jax.Array | None, padding: jax.Array, *,
             deterministic: bool = True):
    """The decoder over the encoder's output: decoder_inputs [B, Lo] -> (logits [B, Lo, V] float32, its MoE
    blocks' aux keyed num_layers + j). With KV caches (moe_jax.decode), the tokens are each row's next ones, at
    the positions its caches hold, and `encoded` is None once the cross-attention caches hold its keys and
    values."""
    y = self.input_dropout(self.embed(decoder_inputs), deterministic=deterministic)
    length = decoder_inputs.shape[1]
    bias = None
    if self.relative:
      cache = self.decoder[0].attention.cache
      if cache is None:
        bias = self.decoder_position_bias(length, length)
      else:  # each row's queries at its own positions, over the whole cache
        bias = self.decoder_position_bias(length, cache.max_length, query_positions=cache.positions(length))
    auxes = {}
    for index, block in enumerate(self.decoder):
      y, aux = block(y, bias=bias, mask=None, encoded=encoded, cross_mask=padding, token_ids=decoder_inputs,
                     deterministic=deterministic)
      if aux is not None:
        auxes[self.config.num_layers + index] = aux
    y = self.decoder_norm(y)
    if self.config.tie_embeddings:
      logits = self.embed.attend(y, scaled=self.config.scale_tied_head)
    else:
      logits = jnp.einsum("blm,mv->blv", y.astype(jnp.float32), self.unembed[...])
    return logits, auxes
