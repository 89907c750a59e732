"""What the fast paths must equal: plain jax.numpy and numpy references, written for clarity, not speed.

Every equivalence test of `moe_jax` imports its ground truth from here, so a reader finds in one place the
definition that a router, a dispatch backend or the grouped matmul is checked against. Nothing here is used
by the model. Each function is the textbook form of an idea whose fast form lives in a lower module
(`moe_jax.routing`, `moe_jax.dispatch`, `moe_jax.experts`, `moe_jax.layers`, `moe_jax.model`); this module
imports only routing and experts.

Axis legend (as in `moe_jax.routing`):
  G groups · S tokens per group · E experts · C capacity per expert · K choices per token ·
  M d_model · F d_ff.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import experts as experts_lib
from moe_jax import routing

# ----------------------------------------------------------------------------------------------------------
# Routing.


def token_choice_slots(
    expert_index: jax.Array,  # [G, S, K] int32
    wanted: jax.Array,  # [G, S, K] bool
    capacity: int,
    order: jax.Array | None = None,  # [G, S] claim order of the tokens; None: position order
    *,
    num_experts: int,
) -> tuple[jax.Array, jax.Array]:  # slot [G, S, K] int32 (0 where dropped), kept [G, S, K] bool
  """`routing.token_choice_slots` as GShard and Mesh-TensorFlow write it: a running count per expert, the
  cumulative sum over the [S*K, E] one-hot of the claims taken in claim order (choice-major, tokens in
  `order`). O(S*K*E) work and memory."""
  num_groups, tokens_per_group, k = expert_index.shape
  assignment = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32) * wanted[..., None]  # [G,S,K,E]
  if order is not None:
    assignment = jnp.take_along_axis(assignment, order[:, :, None, None], axis=1)
  by_choice = jnp.swapaxes(assignment, 1, 2).reshape(num_groups, k * tokens_per_group, num_experts)
  position = jnp.cumsum(by_choice, axis=1) * by_choice  # 1-based position where claimed, else 0
  slot = jnp.swapaxes(jnp.sum(position, axis=-1).reshape(num_groups, k, tokens_per_group) - 1, 1, 2)
  if order is not None:
    slot = jnp.take_along_axis(slot, jnp.argsort(order, axis=1)[:, :, None], axis=1)
  kept = wanted & (slot >= 0) & (slot < capacity)
  return jnp.where(kept, slot, 0).astype(jnp.int32), kept


def token_choice_loop(probs, k: int, capacity: int, *, batch_prioritized: bool = False):
  """GShard Algorithm 1 generalised to k choices, as numpy loops: every first choice claims a slot before any
  second choice; within a choice, tokens go in position order (or by decreasing top gate: V-MoE BPR).
  Returns (expert_index, slot, kept), each [G, S, K]."""
  probs = np.asarray(probs)  # [G, S, E]
  num_groups, tokens, num_experts = probs.shape
  expert_index = np.argsort(-probs, axis=-1, kind="stable")[..., :k]  # [G, S, K]
  slot = np.zeros((num_groups, tokens, k), np.int32)
  kept = np.zeros((num_groups, tokens, k), bool)
  for g in range(num_groups):
    order = np.argsort(-probs[g].max(-1), kind="stable") if batch_prioritized else range(tokens)
    fill = [0] * num_experts
    for j in range(k):
      for s in order:
        e = expert_index[g, s, j]
        if fill[e] < capacity:
          slot[g, s, j], kept[g, s, j] = fill[e], True
          fill[e] += 1
  return expert_index.astype(np.int32), slot, kept


def expert_choice_loop(probs, capacity: int):
  """Zhou et al. eq. 1 as numpy loops: expert e keeps its `capacity` most probable tokens, slot = rank.
  Returns (expert_index, slot, kept), each [G, S, E]."""
  probs = np.asarray(probs)  # [G, S, E]
  num_groups, tokens, num_experts = probs.shape
  slot = np.zeros((num_groups, tokens, num_experts), np.int32)
  kept = np.zeros((num_groups, tokens, num_experts), bool)
  for g in range(num_groups):
    for e in range(num_experts):
      for rank, s in enumerate(np.argsort(-probs[g, :, e], kind="stable")[:capacity]):
        slot[g, s, e], kept[g, s, e] = rank, True
  expert_index = np.broadcast_to(np.arange(num_experts, dtype=np.int32), probs.shape)
  return expert_index, slot, kept


def balanced_assignment_greedy(scores) -> np.ndarray:
  """`routing.balanced_assignment` as the sequential greedy: take the (token, expert) pairs in order of decreasing
  score and keep each one whose token is still free and whose expert has fewer than S / E tokens.
  Returns the expert of each token [G, S]."""
  scores = np.asarray(scores, np.float64)  # [G, S, E]
  num_groups, tokens, num_experts = scores.shape
  assigned = np.full((num_groups, tokens), -1, np.int32)
  for g in range(num_groups):
    fill = [0] * num_experts
    for pair in np.argsort(-scores[g], axis=None, kind="stable"):
      s, e = divmod(int(pair), num_experts)
      if assigned[g, s] < 0 and fill[e] < tokens // num_experts:
        assigned[g, s], fill[e] = e, fill[e] + 1
  return assigned


def sinkhorn_loop(logits, num_iterations: int) -> np.ndarray:
  """`routing.sinkhorn` in probability space with numpy: rows to mass 1, then alternately columns to S / E and
  rows to 1. Returns the log of the plan [G, S, E]."""
  plan = np.exp(np.asarray(logits, np.float64))
  tokens, num_experts = plan.shape[1:]
  plan = plan / plan.sum(axis=2, keepdims=True)
  for _ in range(num_iterations):
    plan = plan / plan.sum(axis=1, keepdims=True) * (tokens / num_experts)
    plan = plan / plan.sum(axis=2, keepdims=True)
  return np.log(plan)


def hash_experts(token_ids, num_experts: int) -> np.ndarray:
  """`routing.hash_experts` on Python integers: h = id * 0x9E3779B1 mod 2^32, h ^= h >> 16, expert = h mod E."""
  def one(token: int) -> int:
    h = (int(token) * 0x9E3779B1) % 2**32
    return (h ^ (h >> 16)) % num_experts

  return np.vectorize(one, otypes=[np.int32])(np.asarray(token_ids))


def soft_moe_weights(tokens, phi, scale) -> tuple[np.ndarray, np.ndarray]:
  """Soft MoE's dispatch and combine weights (Puigcerver et al. 2023, Algorithm 1) written out in numpy:
  logits = scale * <x_s / |x_s|, phi_ep / |phi_ep|>; D = exp / sum over tokens, C = exp / sum over all slots.
  Returns (D, C), each [G, S, E, P]. (No eps in the norms: the inputs here are never zero.)"""
  x = np.asarray(tokens, np.float64)
  phi = np.asarray(phi, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  phi = phi / np.linalg.norm(phi, axis=0, keepdims=True)
  logits = float(scale) * np.einsum("gsm,mep->gsep", x, phi)
  weights = np.exp(logits - logits.max())
  return weights / weights.sum(axis=1, keepdims=True), weights / weights.sum(axis=(2, 3), keepdims=True)


def sparsemixer(logits, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
  """`routing.sparsemixer_route`'s choices and weights as `transformers`' `sparsemixer` (modeling_phimoe.py,
  evaluation) computes them, token by token in float64 numpy: stage 1 takes i1 = argmax s and
  w1 = softmax over {j : (max s - s_j) / max(|s_j|, max s) <= 2 eps} at i1; stage 2 the same on s without i1
  (|s_j| of the original logits). Returns (expert_index, weight), each [..., 2], unnormalised, order [i1, i2]."""
  logits = np.asarray(logits, np.float64)
  flat = logits.reshape(-1, logits.shape[-1])
  index = np.zeros((flat.shape[0], 2), np.int32)
  weight = np.zeros((flat.shape[0], 2))
  for t, s in enumerate(flat):
    candidates = s.copy()
    for stage in range(2):
      top = candidates.max()
      chosen = int(np.argmax(candidates))
      keep = [j for j in range(len(s)) if candidates[j] > -np.inf
              and not (top - s[j]) / max(abs(s[j]), top) > 2 * jitter_eps]
      total = sum(np.exp(candidates[j] - top) for j in keep)
      index[t, stage], weight[t, stage] = chosen, 1.0 / total  # exp(s_chosen - top) = 1
      candidates[chosen] = -np.inf
  return index.reshape(*logits.shape[:-1], 2), weight.reshape(*logits.shape[:-1], 2)


def per_sequence_capacity_kept(expert_index, num_experts: int, expert_capacity: int) -> np.ndarray:
  """Which tokens Hugging Face's `SwitchTransformersTop1Router` keeps: per sequence, a running count
  (`cumsum` over the sequence) of the tokens sent to each expert, in order; a token is kept while its expert's
  count is <= `expert_capacity`. expert_index [B, L] int -> kept [B, L] bool."""
  expert_index = np.asarray(expert_index)
  one_hot = np.eye(num_experts, dtype=np.int64)[expert_index]  # [B, L, E]
  position = np.cumsum(one_hot, axis=1) * one_hot  # 1-based position in the expert's queue where sent
  return np.sum(position, axis=-1) <= expert_capacity

# ----------------------------------------------------------------------------------------------------------
# The MoE layer.


def expert_ffn(weights: experts_lib.ExpertWeights, e: int, x: jax.Array, activation: str) -> jax.Array:
  """FFN of expert e on rows x [..., M] -> [..., M]: act(x W_i0) (* x W_i1 when gated) W_o, written out."""
  nonlinearity, gated = experts_lib.ACTIVATIONS[activation]
  hidden = nonlinearity(x @ weights.wi_0[e])
  if gated:
    hidden = hidden * (x @ weights.wi_1[e])
  return hidden @ weights.wo[e]


def expert_rows(
    weights: experts_lib.ExpertWeights,
    x: jax.Array,  # [N, M]
    expert: jax.Array,  # [N] int32 expert of each row
    *,
    activation: str,
) -> jax.Array:  # [N, M]
  """Row n through the FFN of expert[n], by a loop over experts of full-size dense FFNs (E times the work):
  the yardstick of the grouped matmul (`experts.blocked_expert_ffn`)."""
  out = jnp.zeros(x.shape, jnp.float32)
  for e in range(weights.num_experts):
    out = jnp.where((expert == e)[:, None], expert_ffn(weights, e, x, activation), out)
  return out.astype(x.dtype)


def moe(
    tokens: jax.Array,  # [G, S, M]
    route: routing.RoutingResult,
    weights: experts_lib.ExpertWeights,
    *,
    activation: str,
) -> jax.Array:  # [G, S, M]
  """The MoE output by definition: a loop over experts, every token through every expert's FFN written out
  in plain jax.numpy, weighted by its kept combine weights,
    out[g, s] = sum_k combine_weight[g, s, k] * FFN_{expert_index[g, s, k]}(tokens[g, s])   over kept k.
  No capacity buffers, no index tricks, no dropout; E times the FLOPs. The yardstick of every dispatch
  backend (`moe_jax.dispatch`), in tests and in the benchmark."""
  if tokens.ndim != 3 or tokens.shape[:2] != route.expert_index.shape[:2]:
    raise ValueError(f"tokens must be [G, S, M] with [G, S] = {route.expert_index.shape[:2]}; got {tokens.shape}")
  out = jnp.zeros(tokens.shape, jnp.float32)
  for e in range(route.num_experts):
    y = expert_ffn(weights, e, tokens, activation)  # [G, S, M]
    weight = jnp.sum(jnp.where((route.expert_index == e) & route.kept, route.combine_weight, 0.0), axis=-1)
    out = out + weight[..., None] * y
  return out.astype(tokens.dtype)


def soft_moe(
    tokens: jax.Array,  # [G, S, M]
    route: routing.SoftRoutingResult,
    weights: experts_lib.ExpertWeights,
    *,
    activation: str,
) -> jax.Array:  # [G, S, M]
  """The Soft MoE output by definition, slot by slot: slot (e, p) of group g takes x~ = sum_s D[g, s, e, p] x_s
  through expert e's FFN, and token s adds C[g, s, e, p] times that output. The yardstick of
  `dispatch.soft_dispatch`."""
  out = jnp.zeros(tokens.shape, jnp.float32)
  for e in range(route.num_experts):
    for p in range(route.slots_per_expert):
      slot = jnp.einsum("gs,gsm->gm", route.dispatch_weight[:, :, e, p], tokens)  # [G, M]
      y = expert_ffn(weights, e, slot, activation)  # [G, M]
      out = out + route.combine_weight[:, :, e, p, None] * y[:, None, :]
  return out.astype(tokens.dtype)


def gated_shared_experts(
    x: jax.Array,  # [B, L, M]
    gate: jax.Array,  # [M, 1]
    shared: experts_lib.ExpertWeights,  # one FFN (E = 1) of the shared experts' total width
    *,
    activation: str,
) -> jax.Array:  # [B, L, M]
  """Qwen1.5/Qwen2-MoE's gated shared expert (`Qwen2MoeSparseMoeBlock`): sigmoid(x . w_gate) * FFN_shared(x), the
  term `moe.shared_expert_gate` adds to the routed output, written out."""
  return jax.nn.sigmoid(x @ gate) * expert_ffn(shared, 0, x, activation)


# ----------------------------------------------------------------------------------------------------------
# Attention, norms, positions and the decoder LM.


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float) -> jax.Array:  # [..., N] -> [..., N] float32
  """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, over the last axis."""
  x = x.astype(jnp.float32)
  y = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return y if scale is None else y * scale


def layer_norm(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float) -> jax.Array:
  """LayerNorm (Ba et al. 2016): (x - mean) / sqrt(var + eps) * scale + bias over the last axis, var the mean
  squared deviation (torch's F.layer_norm); no scale / no bias where None."""
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  y = centred / jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  y = y if scale is None else y * scale
  return y if bias is None else y + bias


def norm(kind: str, x: jax.Array, params: dict, eps: float) -> jax.Array:
  """The norm `kind` (model.norm) with its parameters {'scale', 'bias'} as the model holds them."""
  if kind == "rmsnorm":
    return rms_norm(x, params.get("scale"), eps)
  return layer_norm(x, params.get("scale"), params.get("bias"), eps)


def rope_frequencies(head_dim: int, length: int, *, theta: float = 10_000.0, scaling: str = "none",
                     factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 0, short_factor=(), long_factor=(), short_mscale: float = 1.0,
                     long_mscale: float = 1.0) -> tuple[np.ndarray, float]:
  """The rotary angle per position of each feature pair [D/2] and the cos/sin factor, pair by pair in Python
  floats, as transformers' `modeling_rope_utils` defines them: default f_j = theta^(-2j/D); 'llama3'
  (`_compute_llama3_parameters`) keeps high frequencies (wavelength 2 pi / f_j < original_max / high_freq_factor),
  divides low ones (wavelength > original_max / low_freq_factor) by `factor` and interpolates between;
  'longrope' (`_compute_longrope_parameters`, Phi-3) divides f_j by the short or long factor of pair j and scales
  cos/sin by the short or long mscale, long beyond `original_max_len` tokens. The yardstick of `layers.Rope`."""
  frequencies, mscale = [], 1.0
  for j in range(head_dim // 2):
    f = theta ** (-2 * j / head_dim)
    if scaling == "llama3":
      wavelength = 2 * math.pi / f
      if wavelength > original_max_len / low_freq_factor:
        f = f / factor
      elif wavelength >= original_max_len / high_freq_factor:
        smooth = (original_max_len / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
        f = (1 - smooth) * f / factor + smooth * f
    elif scaling == "longrope":
      long = length > original_max_len
      f = f / (long_factor if long else short_factor)[j]
      mscale = long_mscale if long else short_mscale
    frequencies.append(f)
  return np.asarray(frequencies, np.float32), mscale


def rotary(x: jax.Array, frequencies, mscale: float = 1.0) -> jax.Array:  # [B, L, H, D] -> [B, L, H, D]
  """Rotary positions as transformers writes them: x cos + rotate_half(x) sin, with positions 0 .. L-1,
  cos = cos(pos f) and sin = sin(pos f) repeated over both halves of each head and multiplied by mscale."""
  angle = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * jnp.asarray(frequencies)  # [L, D/2]
  angle = jnp.concatenate([angle, angle], axis=-1)[None, :, None, :]  # [1, L, 1, D]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * (jnp.cos(angle) * mscale) + jnp.concatenate([-x2, x1], axis=-1) * (jnp.sin(angle) * mscale)


def attention(
    x: jax.Array,  # [B, L, M]
    qkv: jax.Array,  # [M, H + 2K, D]: query heads, then key heads, then value heads
    out: jax.Array,  # [H, D, M]
    num_heads: int,
    num_kv_heads: int,
    *,
    qkv_bias: jax.Array | None = None,  # [H + 2K, D]
    out_bias: jax.Array | None = None,  # [M]
    qk_norm: str = "none",
    q_norm: jax.Array | None = None,  # [D] per head or [H*D] full
    k_norm: jax.Array | None = None,  # [D] per head or [K*D] full
    norm_eps: float = 1e-6,
    clip_qkv: float = 0.0,
    frequencies=None,  # [D/2]; None: theta 1e4
    mscale: float = 1.0,
    scale_logits: bool = True,
) -> jax.Array:  # [B, L, M]
  """Causal softmax attention written out, the yardstick of `layers.CausalSelfAttention`: each group of H / K
  query heads reads its own key/value head (grouped-query attention; K = H is multi-head), the projection plus
  `qkv_bias`, QK-norm ('per_head': RMSNorm over each head's D; 'full': over the whole projected q and k),
  clamping to [-clip_qkv, clip_qkv], rotary positions on queries and keys, scores scaled by D^-1/2 unless
  `scale_logits` is False, and `out_bias` on the output projection."""
  batch, length, _ = x.shape
  proj = jnp.einsum("blm,mhd->blhd", x, qkv)
  if qkv_bias is not None:
    proj = proj + qkv_bias
  q, k, v = (proj[:, :, :num_heads], proj[:, :, num_heads:num_heads + num_kv_heads],
             proj[:, :, num_heads + num_kv_heads:])
  if qk_norm == "per_head":
    q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
  elif qk_norm == "full":
    q = rms_norm(q.reshape(batch, length, -1), q_norm, norm_eps).reshape(q.shape)
    k = rms_norm(k.reshape(batch, length, -1), k_norm, norm_eps).reshape(k.shape)
  if clip_qkv:
    q, k, v = jnp.clip(q, -clip_qkv, clip_qkv), jnp.clip(k, -clip_qkv, clip_qkv), jnp.clip(v, -clip_qkv, clip_qkv)
  if frequencies is None:
    frequencies, mscale = rope_frequencies(q.shape[-1], length)
  q, k = rotary(q, frequencies, mscale), rotary(k, frequencies, mscale)
  group = num_heads // num_kv_heads
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  if scale_logits:
    scores = scores / jnp.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((length, length), bool))
  probs = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
  y = jnp.einsum("bhqk,bkhd,hdm->bqm", probs, v, out)
  return y if out_bias is None else y + out_bias


def decoder_lm(cfg, params: dict, tokens: jax.Array) -> jax.Array:  # tokens [B, L] -> logits [B, L, V]
  """The dense decoder LM (`model.TransformerLM` with model.moe_layer_interval=0) written out from a ModelConfig
  `cfg` and its parameters as `nnx.to_pure_dict` gives them: embedding; per block pre-norm
  x + Attn(Norm(x)), x + FFN(Norm(x)) or post-norm x + Norm(Attn(x)), x + Norm(FFN(x)) (OLMo 2); final norm;
  the output projection, tied (x E^T, times M^-1/2 when model.scale_tied_head) or not, plus its bias."""
  frequencies, mscale = rope_frequencies(
      cfg.head_dim, tokens.shape[1], theta=cfg.rope_theta, scaling=cfg.rope_scaling, factor=cfg.rope_scaling_factor,
      low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
      original_max_len=cfg.rope_original_max_len, short_factor=cfg.rope_short_factor,
      long_factor=cfg.rope_long_factor, short_mscale=cfg.rope_short_mscale, long_mscale=cfg.rope_long_mscale)
  x = params["embed"]["embedding"][tokens]
  for i in range(cfg.num_layers):
    block = params["blocks"][i]
    a = block["attention"]

    def attend(h, a=a):
      return attention(
          h, a["qkv"], a["out"], cfg.num_heads, cfg.kv_heads,
          qkv_bias=a["qkv_bias"] if cfg.attention_bias != "none" else None,
          out_bias=a["out_bias"] if cfg.attention_bias == "qkvo" else None, qk_norm=cfg.qk_norm,
          q_norm=a["q_norm"]["scale"] if cfg.qk_norm != "none" else None,
          k_norm=a["k_norm"]["scale"] if cfg.qk_norm != "none" else None,
          norm_eps=cfg.norm_eps, clip_qkv=cfg.clip_qkv, frequencies=frequencies, mscale=mscale,
          scale_logits=cfg.scale_attention)

    f = block["ffn"]
    weights = experts_lib.ExpertWeights(wi_0=f["wi_0"][None], wo=f["wo"][None],
                                        wi_1=f["wi_1"][None] if "wi_1" in f else None)
    ffn = lambda h, weights=weights: expert_ffn(weights, 0, h, cfg.activation)  # noqa: E731
    if cfg.norm_position == "post":
      x = x + norm(cfg.norm, attend(x), block.get("attention_out_norm", {}), cfg.norm_eps)
      x = x + norm(cfg.norm, ffn(x), block.get("ffn_out_norm", {}), cfg.norm_eps)
    else:
      x = x + attend(norm(cfg.norm, x, block.get("attention_norm", {}), cfg.norm_eps))
      x = x + ffn(norm(cfg.norm, x, block.get("ffn_norm", {}), cfg.norm_eps))
  x = norm(cfg.norm, x, params.get("final_norm", {}), cfg.norm_eps)
  if cfg.tie_embeddings:
    head = params["embed"]["embedding"].T * (cfg.d_model ** -0.5 if cfg.scale_tied_head else 1.0)
  else:
    head = params["unembed"]
  logits = x @ head
  return logits + params["unembed_bias"] if cfg.lm_head_bias else logits


def relative_position_bucket(relative_position: int, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> int:
  """T5's bucket of one key - query offset, in scalar Python (Raffel et al. 2020, Sec. 2.1): the yardstick of
  `layers.relative_position_bucket`. Offsets below half the (per-direction) buckets are exact, farther ones
  share log-spaced buckets up to `max_distance`."""
  n = -relative_position
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      bucket += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return bucket + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  return bucket + min(large, num_buckets - 1)


def attention_with_bias(
    x: jax.Array,  # [B, Lq, M]
    context: jax.Array,  # [B, Lk, M]: x itself for self-attention
    wq: jax.Array,  # [M, H, D]
    wk: jax.Array,  # [M, H, D]
    wv: jax.Array,  # [M, H, D]
    out: jax.Array,  # [H, D, M]
    bias: jax.Array | None,  # [1, H, Lq, Lk]
    mask: jax.Array | None,  # [B, 1, Lq, Lk] bool
    causal: bool,
    *,
    scale_logits: bool = True,
) -> jax.Array:  # [B, Lq, M]
  """Multi-head softmax attention written out with an additive logit bias (T5's relative positions) and a
  padding mask, causal or not, scores scaled by D^-1/2 unless `scale_logits` is False (T5, Switch): the yardstick
  of `layers.Attention` in the encoder-decoder."""
  q, k, v = (jnp.einsum("blm,mhd->blhd", x, wq), jnp.einsum("blm,mhd->blhd", context, wk),
             jnp.einsum("blm,mhd->blhd", context, wv))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
  if scale_logits:
    scores = scores / jnp.sqrt(q.shape[-1])
  if bias is not None:
    scores = scores + bias
  allowed = jnp.ones(scores.shape, bool)
  if mask is not None:
    allowed &= mask
  if causal:
    allowed &= jnp.tril(jnp.ones(scores.shape[-2:], bool))
  probs = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd,hdm->bqm", probs, v, out)
