"""Transformer building blocks other than feed-forward layers: norms (RMSNorm, LayerNorm with or without its
parameters), rotary positions (base and the llama3 / longrope scalings), attention (rotary or T5 relative
positions, causal or not, self or cross; the published families' biases, QK-norm, qkv clipping and unscaled
logits), the key/value cache attention decodes with, embeddings (the tied output projection scaled or not).

Axis legend: B batch · L sequence length (Lq queries, Lk keys) · M d_model · H heads · K key/value heads ·
D head dim · V vocabulary · T cache length.
Parameters carry logical axis names; `moe_jax.parallel.LOGICAL_AXIS_RULES` maps them to the mesh.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.init import switch_init

_SCALE_INIT = nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",))
_BIAS_INIT = nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",))


def _layer_norm(*, scale: bool, bias: bool):
  """LayerNorm (Ba et al. 2016) with or without its learned scale and bias. The variance is the mean of the
  squared deviations (torch's and the published checkpoints' form), not E[x^2] - E[x]^2."""
  return lambda d_model, eps, rngs: nnx.LayerNorm(
      d_model, epsilon=eps, use_scale=scale, use_bias=bias, scale_init=_SCALE_INIT, bias_init=_BIAS_INIT,
      use_fast_variance=False, rngs=rngs)


# Norm layers by config name (model.norm), float32 statistics, epsilon model.norm_eps; (d_model, eps, rngs) ->
# module. Parameters: `scale` [M] ('embed',) where learned, `bias` [M] ('embed',) for 'layernorm' only.
NORMS = {
    # T5, Switch, Llama, Mixtral, Qwen, OLMoE, OLMo 2: x / rms(x) * scale.
    "rmsnorm": lambda d_model, eps, rngs: nnx.RMSNorm(d_model, epsilon=eps, scale_init=_SCALE_INIT, rngs=rngs),
    # GPT-2, Phi-3.5-MoE: (x - mean) / std * scale + bias.
    "layernorm": _layer_norm(scale=True, bias=True),
    # DBRX (torch LayerNorm with bias=False): scale only.
    "layernorm_nobias": _layer_norm(scale=True, bias=False),
    # OLMo (`OlmoLayerNorm`: F.layer_norm with neither weight nor bias): no parameters at all.
    "layernorm_noparam": _layer_norm(scale=False, bias=False),
}

# Position schemes by config name (model.positions): rotary angles on queries and keys, or T5's learned bias per
# relative-position bucket (`RelativePositionBias`).
POSITIONS = ("rotary", "relative")


def make_norm(kind: str, d_model: int, *, eps: float, rngs: nnx.Rngs) -> nnx.Module:
  """The norm layer `kind` (a name of `NORMS`) over the last axis of width `d_model`, with epsilon `eps`."""
  return NORMS[kind](d_model, eps, rngs)


def rotary_frequencies(head_dim: int, *, max_wavelength: float = 10_000.0) -> jax.Array:  # [D/2] float32
  """The rotary angle per position of each feature pair j: theta^(-2j/D), theta = `max_wavelength`."""
  half = head_dim // 2
  return max_wavelength ** (-jnp.arange(half, dtype=jnp.float32) / half)


def rotary_embedding(
    x: jax.Array,  # [B, L, H, D]
    positions: jax.Array,  # [B, L] int
    *,
    max_wavelength: float = 10_000.0,
    frequencies: jax.Array | None = None,  # [D/2] float32: the angle per position of each pair (`Rope`)
    mscale: float = 1.0,
) -> jax.Array:  # [B, L, H, D]
  """Rotary position embedding (Su et al. 2021, eq. 34): rotate feature pairs by position-dependent angles,
  so that q.k depends on relative position only. Pair j is (x_j, x_{j + D/2}), the two halves of each head (the
  published Llama-family layout, transformers' `rotate_half`). `frequencies` default to
  `rotary_frequencies(D, max_wavelength)`; cos and sin are multiplied by `mscale` (LongRoPE's attention factor).
  Computed in float32, returned in x.dtype."""
  if frequencies is None:
    frequencies = rotary_frequencies(x.shape[-1], max_wavelength=max_wavelength)
  angle = positions.astype(jnp.float32)[:, :, None, None] * frequencies  # [B, L, 1, D/2]
  sin, cos = jnp.sin(angle) * mscale, jnp.cos(angle) * mscale
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _llama3_frequencies(rope: "Rope", frequencies: jax.Array, length: int) -> tuple[jax.Array, float]:
  """Llama 3.1's frequency scaling (transformers `_compute_llama3_parameters`): with wavelength w_j = 2 pi / f_j,
  lo = original_max_len / low_freq_factor and hi = original_max_len / high_freq_factor, pairs with w_j < hi keep
  f_j, pairs with w_j > lo take f_j / factor, and those between interpolate with
  s = (original_max_len / w_j - low_freq_factor) / (high_freq_factor - low_freq_factor):
  (1 - s) f_j / factor + s f_j. Independent of the sequence length; no attention factor."""
  del length
  wavelength = 2 * jnp.pi / frequencies
  low_wavelength = rope.original_max_len / rope.low_freq_factor
  high_wavelength = rope.original_max_len / rope.high_freq_factor
  scaled = jnp.where(wavelength > low_wavelength, frequencies / rope.factor, frequencies)
  smooth = (rope.original_max_len / wavelength - rope.low_freq_factor) / (rope.high_freq_factor
                                                                           - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
  return jnp.where(medium, smoothed, scaled), 1.0


def _longrope_frequencies(rope: "Rope", frequencies: jax.Array, length: int) -> tuple[jax.Array, float]:
  """LongRoPE (Ding et al. 2024, arXiv:2402.13753; Phi-3): each pair's frequency divided by its own factor and
  cos/sin multiplied by an attention factor, the `short_*` ones for sequences up to `original_max_len` tokens,
  the `long_*` ones beyond (the length is static, so the choice is made when tracing)."""
  long = length > rope.original_max_len
  factors = jnp.asarray(rope.long_factor if long else rope.short_factor, jnp.float32)  # [D/2]
  return frequencies / factors, rope.long_mscale if long else rope.short_mscale


# Rotary scalings by config name (model.rope_scaling): (rope, base frequencies [D/2], sequence length) ->
# (frequencies [D/2], mscale).
ROPE_SCALINGS = {
    "none": lambda rope, frequencies, length: (frequencies, 1.0),
    "llama3": _llama3_frequencies,
    "longrope": _longrope_frequencies,
}


@dataclasses.dataclass(frozen=True)
class Rope:
  """The rotary embedding's frequencies: base `theta` (model.rope_theta) and a long-context `scaling`
  (model.rope_scaling and its model.rope_* fields, same names without the prefix; `factor` is
  model.rope_scaling_factor). Frozen and hashable: a static attribute of `Attention`."""

  theta: float = 10_000.0
  scaling: str = "none"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 0
  short_factor: tuple[float, ...] = ()
  long_factor: tuple[float, ...] = ()
  short_mscale: float = 1.0
  long_mscale: float = 1.0

  def frequencies(self, head_dim: int, length: int) -> tuple[jax.Array, float]:
    """(the angle per position of each pair [D/2] float32, the cos/sin factor) for a sequence of `length`."""
    base = rotary_frequencies(head_dim, max_wavelength=self.theta)
    return ROPE_SCALINGS[self.scaling](self, base, length)


def relative_position_bucket(
    relative_position: jax.Array,  # [..., Lq, Lk] int: key position - query position
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> jax.Array:  # [..., Lq, Lk] int32 in [0, num_buckets)
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
  "Efficiently Scaling Transformer Inference", Sec. 2): `key`, `value` [B·K, D, T] (K key/value heads only: a
  grouped-query layer caches H / K times less than its query heads; row b·K + k is head k of sequence b) and
  `length` [B] int32, each sequence's tokens written so far, i.e. the position of its next token.
  Self-attention writes each new token at its position and reads positions 0 .. its own; cross-attention holds
  the encoder output's keys and values (T = Li), written once (`length` unused). Callers see keys and values as
  attention takes them, [B, T, K, D] (`write`, `read`, `store`). `nnx.Cache` variables: never parameters, never
  checkpointed. moe_jax.decode attaches one to each attention layer of an inference copy of the model
  (`Attention.cache`).

  Why this layout (the optimised HLO of `moe_jax.decode`'s step; tests/test_decode.py checks that the cache is
  never copied): XLA:CPU hands a batched matmul row-major operands, batch axes first, and takes the cache in both
  of attention's matmuls as (B, K) batches of D x T matrices (q.k contracts D; the values' product is computed
  transposed, contracting T). A cache [B, T, K, D] was transposed whole before each matmul, every step. Heads
  merged with rows: with [B, K, D, T] at B = 1 the matmuls read the cache through a reshape that drops the
  unit batch axis, and XLA duplicated the in-place write into a second, copied buffer for them; merged, the
  cache reaches the matmuls as written (unless B·K = 1: one sequence, multi-query attention)."""

  def __init__(self, batch: int, length: int, num_kv_heads: int, head_dim: int, *, dtype: jnp.dtype,
               sharding: jax.sharding.NamedSharding | None = None,
               length_sharding: jax.sharding.NamedSharding | None = None):
    """`sharding`: of key and value [B·K, D, T] on a mesh, `length_sharding` of `length` [B]; None: the default
    device."""
    shape = (batch * num_kv_heads, head_dim, length)
    self.key = nnx.Cache(jax.device_put(jnp.zeros(shape, dtype), sharding))
    self.value = nnx.Cache(jax.device_put(jnp.zeros(shape, dtype), sharding))
    self.length = nnx.Cache(jax.device_put(jnp.zeros((batch,), jnp.int32), length_sharding))

  @property
  def max_length(self) -> int:
    """T, the positions the cache holds."""
    return self.key.shape[2]

  def positions(self, num_tokens: int) -> jax.Array:  # [B, Lq] int32
    """The absolute positions of the next `num_tokens` tokens of each sequence."""
    return self.length[...][:, None] + jnp.arange(num_tokens, dtype=jnp.int32)

  def write(self, positions: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Stores k, v [B, Lq, K, D] at `positions` [B, Lq] (each sequence at its own) and advances `length`; the
    whole cache after the write, [B, T, K, D] (`read`). Positions must be < T (moe_jax.decode never passes the
    end)."""
    batch, _, num_kv_heads, _ = k.shape
    rows = jnp.arange(batch)[:, None, None] * num_kv_heads + jnp.arange(num_kv_heads)  # [B, 1, K]: b·K + k
    # Index arrays split by a slice index the result's leading axes (numpy's rule): the update is [B, Lq, K, D].
    self.key[...] = self.key[...].at[rows, :, positions[:, :, None]].set(k.astype(self.key.dtype))
    self.value[...] = self.value[...].at[rows, :, positions[:, :, None]].set(v.astype(self.value.dtype))
    self.length[...] = positions[:, -1] + 1
    return self.read()

  def read(self) -> tuple[jax.Array, jax.Array]:  # ([B, T, K, D], [B, T, K, D])
    """The cached keys and values, as attention takes them (a reshape and a transpose XLA folds into its
    matmuls)."""
    batch = self.length.shape[0]
    as_attended = lambda cache: cache.reshape(batch, -1, *cache.shape[1:]).transpose(0, 3, 1, 2)
    return as_attended(self.key[...]), as_attended(self.value[...])

  def store(self, k: jax.Array, v: jax.Array) -> None:
    """Replaces the whole cache by k, v [B, T, K, D] (cross-attention: the encoder output's, once)."""
    as_cached = lambda x: x.transpose(0, 2, 3, 1).reshape(self.key.shape)
    self.key[...] = as_cached(k).astype(self.key.dtype)
    self.value[...] = as_cached(v).astype(self.value.dtype)

  def visible(self, positions: jax.Array) -> jax.Array:  # [B, Lq] -> [B, 1, Lq, T] bool
    """Causal attention over the cache: each query reads the keys at positions up to its own."""
    keys = jnp.arange(self.max_length)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


# QK-norm by config name (model.qk_norm): none; RMSNorm over each head's D features with one [D] scale shared by
# the heads (Qwen3); RMSNorm over the whole projected q [H*D] and k [K*D] before the head split (OLMoE, OLMo 2).
QK_NORMS = ("none", "per_head", "full")

# Attention biases by config name (model.attention_bias): none (T5, Llama); on the q/k/v projections (Qwen2);
# on q/k/v and the output projection (Phi-3.5-MoE).
ATTENTION_BIASES = ("none", "qkv", "qkvo")


def _unmodeled_rms_norm(width: int, eps: float, rngs: nnx.Rngs) -> nnx.RMSNorm:
  """An RMSNorm whose scale [width] is never sharded (QK-norm: D or a projection's H*D, not d_model)."""
  init = nnx.with_partitioning(nnx.initializers.ones_init(), ("unmodeled",))
  return nnx.RMSNorm(width, epsilon=eps, scale_init=init, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head or grouped-query dot-product attention, in the variants a transformer needs: causal or
  bidirectional, rotary positions or none (then the caller passes T5's relative position `bias`),
  self-attention or cross-attention over a separate `context` (encoder-decoder).

  `num_kv_heads` K key/value heads are shared by groups of H / K query heads (grouped-query attention,
  Ainslie et al. 2023, arXiv:2305.13245; K = 1 is multi-query attention, Shazeer 2019; K = H is multi-head).
  Self-attention holds one projection parameter `qkv` [M, H + 2K, D]: query heads, then key heads, then value
  heads. Cross-attention projects queries and keys/values from different inputs, so holds `q` [M, H, D] and
  `kv` [M, 2K, D]. The output projection is `out` [H, D, M].

  Scores are scaled by D^-1/2 (`scale_logits`; T5 and Switch leave them unscaled, `scale_logits=False`, and fold
  the factor into the query initialisation). The published decoder families add, to self-attention only:
  `bias` 'qkv' (parameter `qkv_bias` [H + 2K, D], added to the projection; Qwen2) or 'qkvo' (also `out_bias`
  [M]; Phi-3.5-MoE); `qk_norm` (RMSNorm modules `q_norm` and `k_norm` with epsilon `norm_eps`, scales [D] for
  'per_head' (Qwen3), [H*D] and [K*D] for 'full' (OLMoE, OLMo 2)); `clip_qkv` c > 0 clamps q, k and v to
  [-c, c] after the projection, its bias and the QK-norm (DBRX, OLMo; OLMoE clamps after its norms); then
  rotary positions with the frequencies of `rope`.

  Every call is `project` (all of the above) then `attend` (the attention and the output projection), over the
  input, or, when `cache` is set (`KVCache`, by moe_jax.decode), over the keys and values cached so far: the full
  forward pass and cached decoding share one implementation.
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
      rope: Rope = Rope(),
      cross: bool = False,
      scale_logits: bool = True,
      bias: str = "none",
      qk_norm: str = "none",
      clip_qkv: float = 0.0,
      norm_eps: float = 1e-6,
      dropout: float = 0.0,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if cross and (causal or rotary):
      raise ValueError("cross-attention is neither causal nor rotary: queries and keys index different sequences")
    if cross and (bias != "none" or qk_norm != "none" or clip_qkv):
      raise ValueError("attention biases, QK-norm and clip_qkv are implemented for self-attention only")
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    self.causal, self.rotary, self.cross = causal, rotary, cross
    self.rope, self.scale_logits = rope, scale_logits
    self.bias, self.qk_norm, self.clip_qkv = bias, qk_norm, clip_qkv
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
    zeros = nnx.initializers.zeros_init()
    if bias in ("qkv", "qkvo"):
      self.qkv_bias = nnx.Param(nnx.with_partitioning(zeros, ("heads", "kv"))(
          rngs.params(), (num_heads + kv_heads, head_dim)))
    if bias == "qkvo":
      self.out_bias = nnx.Param(nnx.with_partitioning(zeros, ("embed",))(rngs.params(), (d_model,)))
    if qk_norm != "none":
      per_head = qk_norm == "per_head"
      self.q_norm = _unmodeled_rms_norm(head_dim if per_head else num_heads * head_dim, norm_eps, rngs)
      self.k_norm = _unmodeled_rms_norm(head_dim if per_head else self.num_kv_heads * head_dim, norm_eps, rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dtype = dtype

  def _normalized(self, norm: nnx.RMSNorm, heads: jax.Array) -> jax.Array:  # [B, L, H, D] -> same, self.dtype
    """QK-norm of query or key heads: over D per head, or over the whole projection (all heads together)."""
    if self.qk_norm == "per_head":
      return norm(heads).astype(self.dtype)
    flat = heads.reshape(*heads.shape[:2], -1)  # [B, L, H*D]: heads are contiguous blocks of D
    return norm(flat).reshape(heads.shape).astype(self.dtype)

  def project(self, x: jax.Array, positions: jax.Array, rope_length: int):
    """Self-attention's projection of x [B, L, M]: (q [B, L, H, D], k, v [B, L, K, D]) in self.dtype, with the
    bias, QK-norm and clipping, and q and k rotated to `positions` [B, L] (absolute: a cached token keeps the
    rotation of its position). The one path of the full forward pass and of cached decoding; `rope_length` is the
    sequence length the rotary frequencies are chosen for (the input's, or the cache's: LongRoPE)."""
    qkv = jnp.einsum("blm,mhd->blhd", x.astype(self.dtype), self.qkv[...].astype(self.dtype))  # [B, L, H + 2K, D]
    if self.bias != "none":
      qkv = qkv + self.qkv_bias[...].astype(self.dtype)
    q, k, v = jnp.split(qkv, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
    if self.qk_norm != "none":
      q, k = self._normalized(self.q_norm, q), self._normalized(self.k_norm, k)
    if self.clip_qkv:
      q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
    if self.rotary:
      frequencies, mscale = self.rope.frequencies(q.shape[-1], rope_length)
      q = rotary_embedding(q, positions, frequencies=frequencies, mscale=mscale)
      k = rotary_embedding(k, positions, frequencies=frequencies, mscale=mscale)
    return q, k, v

  def project_context(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-attention's keys and values [B, Lk, K, D] of the context [B, Lk, M] (computed once when decoding)."""
    kv = jnp.einsum("blm,mhd->blhd", context.astype(self.dtype), self.kv[...].astype(self.dtype))
    k, v = jnp.split(kv, 2, axis=2)
    return k, v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, *, bias: jax.Array | None, mask: jax.Array | None,
             is_causal: bool, deterministic: bool) -> jax.Array:  # q [B, Lq, H, D], k, v [B, Lk, K, D] -> [B, Lq, M]
    """Dot-product attention of the projected heads, then the output projection (and its bias)."""
    if bias is not None:
      bias = bias.astype(self.dtype)
    # K heads shared by groups of H / K query heads; `mask` and `is_causal` combine.
    attended = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=is_causal,
                                            scale=None if self.scale_logits else 1.0)  # [B, Lq, H, D]
    # The output projection [B, Lq, M], contracting (H, D) in the order `out` [H, D, M] stores them:
    # jnp.einsum("blhd,hdm->blm") lists them (D, H), and XLA:CPU then copied `out` into [D, H, M] order before
    # the matmul, every call (tests/test_decode.py checks the decode step's HLO).
    y = jax.lax.dot_general(attended, self.out[...].astype(self.dtype), (((2, 3), (0, 1)), ((), ())))
    if self.bias == "qkvo":
      y = y + self.out_bias[...].astype(self.dtype)
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
        k, v = self.cache.read()
      else:
        k, v = self.project_context(context)
        if self.cache is not None:
          self.cache.store(k, v)
      return self.attend(q, k, v, bias=bias, mask=mask, is_causal=False, deterministic=deterministic)
    if context is not None:
      raise ValueError("self-attention takes no context")
    if self.cache is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
      q, k, v = self.project(x, positions, x.shape[1])
      return self.attend(q, k, v, bias=bias, mask=mask, is_causal=self.causal, deterministic=deterministic)
    positions = self.cache.positions(x.shape[1])  # [B, Lq]
    q, k, v = self.project(x, positions, self.cache.max_length)
    k, v = self.cache.write(positions, k, v)  # [B, T, K, D]
    visible = self.cache.visible(positions)  # [B, 1, Lq, T]: each query's keys so far
    mask = visible if mask is None else visible & mask
    return self.attend(q, k, v, bias=bias, mask=mask, is_causal=False, deterministic=deterministic)


# The decoder LM's attention (model.Block): the defaults, causal self-attention with rotary positions.
CausalSelfAttention = Attention


class Embedding(nnx.Module):
  """Token embedding [V, M]; with `tied`, also the output projection (`attend`)."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    # Unit-variance embeddings (T5/Mesh TF): the first pre-norm rescales them anyway.
    init = nnx.with_partitioning(nnx.initializers.normal(stddev=1.0), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model)))
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, L] int -> [B, L, M]
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array, *, scaled: bool = True) -> jax.Array:  # [B, L, M] -> [B, L, V] float32
    """The tied output projection x E^T; `scaled` first multiplies x by M^-1/2 (T5, Switch: Mesh TF's tied
    logits), unscaled is the Llama/Qwen/OLMo tied head."""
    x = x.astype(jnp.float32)
    if scaled:
      x = x * x.shape[-1] ** -0.5
    return jnp.einsum("blm,vm->blv", x, self.embedding[...])
