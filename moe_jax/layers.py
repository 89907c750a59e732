"""Transformer building blocks other than feed-forward layers: norms, attention (rotary or T5 relative
positions, causal or not, self or cross), embeddings.

Axis legend: B batch · L sequence length (Lq queries, Lk keys) · M d_model · H heads · K key/value heads ·
D head dim · V vocabulary.
Parameters carry logical axis names; `moe_jax.parallel.LOGICAL_AXIS_RULES` maps them to the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.init import switch_init

_SCALE_INIT = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
_BIAS_INIT = nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",))

# Pre-norm layers by config name (model.norm), float32 statistics: RMSNorm (T5, Switch) or LayerNorm (GPT-2).
NORMS = {
    "rmsnorm": lambda d_model, rngs: nnx.RMSNorm(d_model, epsilon=1e-6, scale_init=_SCALE_INIT, rngs=rngs),
    "layernorm": lambda d_model, rngs: nnx.LayerNorm(
        d_model, epsilon=1e-6, scale_init=_SCALE_INIT, bias_init=_BIAS_INIT, rngs=rngs),
}


# Position schemes by config name (model.positions): rotary angles on queries and keys, or T5's learned bias per
# relative-position bucket (`RelativePositionBias`).
POSITIONS = ("rotary", "relative")


def make_norm(kind: str, d_model: int, *, rngs: nnx.Rngs) -> nnx.Module:
  return NORMS[kind](d_model, rngs)


def rotary_embedding(
    x: jax.Array,  # [B, L, H, D]
    positions: jax.Array,  # [B, L] int
    *,
    max_wavelength: float = 10_000.0,
) -> jax.Array:  # [B, L, H, D]
  """Rotary position embedding (Su et al. 2021, eq. 34): rotate feature pairs by position-dependent angles,
  so that q.k depends on relative position only. Computed in float32, returned in x.dtype."""
  half = x.shape[-1] // 2
  freq = max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
  angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [B, L, 1, D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def relative_position_bucket(
    relative_position: jax.Array,  # [Lq, Lk] int: key position - query position
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> jax.Array:  # [Lq, Lk] int32 in [0, num_buckets)
  """T5's relative position buckets (Raffel et al. 2020, Sec. 2.1; Mesh TF `_relative_position_bucket`).

  Half the buckets (all of them when causal) hold exact distances 0 .. n/2 - 1; the other half cover distances
  up to `max_distance` logarithmically, farther ones share the last bucket. Bidirectional (encoder): keys after
  the query get buckets of their own, [num_buckets / 2, num_buckets). Causal (decoder): keys after the query,
  which the mask hides anyway, fall into bucket 0.
  """
  n = -relative_position  # query position - key position: > 0 for keys in the past
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  # log-spaced buckets from max_exact to max_distance; float32 as in Mesh TF, clipped to the last bucket
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / jnp.log(max_distance / max_exact)
  large = jnp.minimum(max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype), num_buckets - 1)
  return (bucket + jnp.where(n < max_exact, n, large)).astype(jnp.int32)


class RelativePositionBias(nnx.Module):
  """T5's learned relative position bias: one scalar per (bucket, head), added to the attention logits.

  One instance per stack, shared by its layers (T5 computes it in the first layer and reuses it). Param
  `embedding` [num_buckets, H] ('unmodeled', 'heads').
  """

  def __init__(self, num_heads: int, *, num_buckets: int, max_distance: int, bidirectional: bool,
               init_scale: float, rngs: nnx.Rngs):
    init = nnx.with_partitioning(switch_init(init_scale, in_axis=0, out_axis=1), ("unmodeled", "heads"))
    self.embedding = nnx.Param(init(rngs.params(), (num_buckets, num_heads)))
    self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

  def __call__(self, query_length: int, key_length: int, *,
               query_positions: jax.Array | None = None) -> jax.Array:  # [1 or B, H, Lq, Lk] float32
    """The bias of queries at positions 0 .. Lq - 1 over keys at 0 .. Lk - 1: [1, H, Lq, Lk]; or, decoding, of
    queries at their own `query_positions` [B, Lq] over the cache's keys: [B, H, Lq, Lk]."""
    if query_positions is None:
      query_positions = jnp.arange(query_length)[None]  # [1, Lq]
    relative = jnp.arange(key_length)[None, None, :] - query_positions[:, :, None]  # [1 or B, Lq, Lk]
    buckets = relative_position_bucket(relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)
    return jnp.take(self.embedding[...], buckets, axis=0).transpose(0, 3, 1, 2)  # [1 or B, H, Lq, Lk]


class KVCache(nnx.Module):
  """The keys and values one attention layer has seen, for decoding a token at a time (Pope et al. 2022,
  "Efficiently Scaling Transformer Inference", Sec. 2): `key`, `value` [B, T, K, D] (K key/value heads only: a
  grouped-query layer caches H / K times less than its query heads) and `length` [B] int32, each sequence's
  tokens written so far, i.e. the position of its next token. Self-attention writes each new token at its
  position and reads positions 0 .. its own; cross-attention holds the encoder output's keys and values [B, Li,
  K, D], written once (`length` unused). `nnx.Cache` variables: never parameters, never checkpointed.
  moe_jax.decode attaches one to each attention layer of an inference copy of the model (`Attention.cache`)."""

  def __init__(self, batch: int, length: int, num_kv_heads: int, head_dim: int, *, dtype: jnp.dtype,
               sharding: jax.sharding.Sharding | None = None):
    zeros = lambda shape, dtype: jax.device_put(jnp.zeros(shape, dtype), sharding)  # noqa: E731
    self.key = nnx.Cache(zeros((batch, length, num_kv_heads, head_dim), dtype))
    self.value = nnx.Cache(zeros((batch, length, num_kv_heads, head_dim), dtype))
    self.length = nnx.Cache(zeros((batch,), jnp.int32))

  def positions(self, num_tokens: int) -> jax.Array:  # [B, Lq] int32
    """The absolute positions of the next `num_tokens` tokens of each sequence."""
    return self.length[...][:, None] + jnp.arange(num_tokens, dtype=jnp.int32)

  def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stores k, v [B, Lq, K, D] at `positions` [B, Lq] (each sequence at its own) and advances `length`; the
    whole cache [B, T, K, D] after the write. Positions must be < T (moe_jax.decode never passes the end)."""
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]
    self.key[...] = self.key[...].at[rows, positions].set(k.astype(self.key.dtype))
    self.value[...] = self.value[...].at[rows, positions].set(v.astype(self.value.dtype))
    self.length[...] = positions[:, -1] + 1
    return self.key[...], self.value[...]

  def visible(self, positions: jax.Array) -> jax.Array:  # [B, Lq] -> [B, 1, Lq, T] bool
    """Causal attention over the cache: each query reads the keys at positions up to its own."""
    keys = jnp.arange(self.key.shape[1])
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


class Attention(nnx.Module):
  """Multi-head or grouped-query dot-product attention with no bias terms (T5), in the variants a transformer
  needs: causal or bidirectional, rotary positions or none (then the caller passes T5's relative position
  `bias`), self-attention or cross-attention over a separate `context` (encoder-decoder).

  `num_kv_heads` K key/value heads are shared by groups of H / K query heads (grouped-query attention,
  Ainslie et al. 2023, arXiv:2305.13245; K = 1 is multi-query attention, Shazeer 2019; K = H is multi-head).
  Self-attention holds one projection parameter `qkv` [M, H + 2K, D]: query heads, then key heads, then value
  heads. Cross-attention projects queries and keys/values from different inputs, so holds `q` [M, H, D] and
  `kv` [M, 2K, D]. Scores are scaled by D^-1/2 (T5 leaves them unscaled and folds the factor into its query
  initialisation; with the Switch init of every projection the standard scaling keeps logits of unit order).
  """

  # Set on an inference copy of the model (moe_jax.decode) to decode with a cache; None: attend over the input.
  cache: KVCache | None = None

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      *,
      num_kv_heads: int | None = None,
      init_scale: float,
      causal: bool = True,
      rotary: bool = True,
      cross: bool = False,
      dropout: float = 0.0,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if cross and (causal or rotary):
      raise ValueError("cross-attention is neither causal nor rotary: queries and keys index different sequences")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    self.causal, self.rotary, self.cross = causal, rotary, cross
    in_init = nnx.with_partitioning(switch_init(init_scale, in_axis=0, out_axis=(1, 2)), ("embed", "heads", "kv"))
    out_init = switch_init(init_scale, in_axis=(0, 1), out_axis=2)
    kv_heads = 2 * self.num_kv_heads
    if cross:
      self.q = nnx.Param(in_init(rngs.params(), (d_model, num_heads, head_dim)))
      self.kv = nnx.Param(in_init(rngs.params(), (d_model, kv_heads, head_dim)))
    else:
      self.qkv = nnx.Param(in_init(rngs.params(), (d_model, num_heads + kv_heads, head_dim)))
    self.out = nnx.Param(
        nnx.with_partitioning(out_init, ("heads", "kv", "embed"))(rngs.params(), (num_heads, head_dim, d_model))
    )
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dtype = dtype

  def project(self, x: jax.Array, positions: jax.Array, rope_length: int):
    """Self-attention's projection of x [B, L, M]: (q [B, L, H, D], k, v [B, L, K, D]) in self.dtype, q and k
    rotated to `positions` [B, L] (absolute: a cached token keeps the rotation of its position). The one path
    of the full forward and of cached decoding; `rope_length` is the sequence length the rotary frequencies are
    chosen for (the input's, or the cache's)."""
    del rope_length  # no frequency scaling depends on it yet
    qkv = jnp.einsum("blm,mhd->blhd", x.astype(self.dtype), self.qkv[...].astype(self.dtype))  # [B, L, H + 2K, D]
    q, k, v = jnp.split(qkv, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
    if self.rotary:
      q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
    return q, k, v

  def project_context(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention's keys and values [B, Lk, K, D] of the context [B, Lk, M] (computed once when decoding)."""
    kv = jnp.einsum("blm,mhd->blhd", context.astype(self.dtype), self.kv[...].astype(self.dtype))
    k, v = jnp.split(kv, 2, axis=2)
    return k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None, mask: jax.Array | None,
             is_causal: bool, deterministic: bool) -> jax.Array:  # q [B, Lq, H, D], k, v [B, Lk, K, D] -> [B, Lq, M]
    """Scaled dot-product attention of the projected heads and the output projection."""
    if bias is not None:
      bias = bias.astype(self.dtype)
    # K heads shared by groups of H / K query heads; `mask` and `is_causal` combine.
    attended = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal)  # [B, Lq, H, D]
    y = jnp.einsum("blhd,hdm->blm", attended, self.out[...].astype(self.dtype))
    return self.dropout(y, deterministic=deterministic)

  def __call__(
      self,
      x: jax.Array,  # [B, Lq, M]
      *,
      context: jax.Array | None = None,  # [B, Lk, M], cross-attention only; None when decoding from the cache
      bias: jax.Array | None = None,  # [1 or B, H, Lq, Lk] added to the logits (relative positions)
      mask: jax.Array | None = None,  # [B, 1 or H, Lq, Lk] bool, True = may attend (padding)
      deterministic: bool = True,
  ) -> jax.Array:  # [B, Lq, M]
    """Attention over the input (self) or the context (cross); with a `cache` (decoding), over the cached keys
    and values: self-attention writes the input's at the sequences' next positions and reads every position up to
    each query's (Lk = the cache's length T, `bias` and `mask` given for [Lq, T]); cross-attention stores the
    context's when one is given (the first call) and reads them afterwards."""
    if self.cross:
      if context is None and self.cache is None:
        raise ValueError("cross-attention needs a context (or, when decoding, its cached keys and values)")
      q = jnp.einsum("blm,mhd->blhd", x.astype(self.dtype), self.q[...].astype(self.dtype))  # [B, Lq, H, D]
      if context is None:
        k, v = self.cache.key[...], self.cache.value[...]
      else:
        k, v = self.project_context(context)
        if self.cache is not None:
          self.cache.key[...], self.cache.value[...] = k, v
      return self.attend(q, k, v, bias=bias, mask=mask, is_causal=False, deterministic=deterministic)
    if context is not None:
      raise ValueError("self-attention takes no context")
    if self.cache is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q, k, v = self.project(x, positions, x.shape[1])
      return self.attend(q, k, v, bias=bias, mask=mask, is_causal=self.causal, deterministic=deterministic)
    positions = self.cache.positions(x.shape[1])  # [B, Lq]
    q, k, v = self.project(x, positions, self.cache.key.shape[1])
    k, v = self.cache.write(positions, k, v)  # [B, T, K, D]
    visible = self.cache.visible(positions)  # [B, 1, Lq, T]: each query's keys so far
    mask = visible if mask is None else visible & mask
    return self.attend(q, k, v, bias=bias, mask=mask, is_causal=False, deterministic=deterministic)


# The decoder LM's attention (model.Block): the defaults, causal self-attention with rotary positions.
CausalSelfAttention = Attention


class Embedding(nnx.Module):
  """Token embedding [V, M]; with `tied`, also the output projection (scaled by M^-1/2, as in T5)."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    # Unit-variance embeddings (T5/Mesh TF): the first pre-norm rescales them anyway.
    init = nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model)))
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, L] int -> [B, L, M]
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:  # [B, L, M] -> [B, L, V] float32
    scaled = x.astype(jnp.float32) * x.shape[-1] ** -0.5
    return jnp.einsum("blm,vm->blv", scaled, self.embedding[...])
