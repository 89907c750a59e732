"""Transformer building blocks other than feed-forward layers: norms, rotary attention, embeddings.

Axis legend: B batch · L sequence length · M d_model · H heads · D head dim · V vocabulary.
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


class CausalSelfAttention(nnx.Module):
  """Causal self-attention with rotary positions and no bias terms (T5), multi-head or grouped-query.

  `num_kv_heads` K key/value heads are shared by groups of H / K query heads (grouped-query attention,
  Ainslie et al. 2023, arXiv:2305.13245; K = 1 is multi-query attention, Shazeer 2019; K = H is multi-head).
  The projections are one parameter [M, H + 2K, D]: query heads, then key heads, then value heads.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      head_dim: int,
      *,
      num_kv_heads: int | None = None,
      init_scale: float,
      dropout: float = 0.0,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads or num_heads
    qkv_init = switch_init(init_scale, in_axis=0, out_axis=(1, 2))
    out_init = switch_init(init_scale, in_axis=(0, 1), out_axis=2)
    qkv_shape = (d_model, num_heads + 2 * self.num_kv_heads, head_dim)
    self.qkv = nnx.Param(nnx.with_partitioning(qkv_init, ("embed", "heads", "kv"))(rngs.params(), qkv_shape))
    self.out = nnx.Param(
        nnx.with_partitioning(out_init, ("heads", "kv", "embed"))(rngs.params(), (num_heads, head_dim, d_model))
    )
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:  # [B, L, M] -> [B, L, M]
    x = x.astype(self.dtype)
    qkv = jnp.einsum("blm,mhd->blhd", x, self.qkv[...].astype(self.dtype))  # [B, L, H + 2K, D]
    q, k, v = jnp.split(qkv, [self.num_heads, self.num_heads + self.num_kv_heads], axis=2)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
    attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, L, H, D]; K heads shared by groups
    y = jnp.einsum("blhd,hdm->blm", attended, self.out[...].astype(self.dtype))
    return self.dropout(y, deterministic=deterministic)


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
