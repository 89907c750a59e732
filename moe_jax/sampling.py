"""Choosing the next token from a model's logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Axis legend: B batch · V vocabulary.

Pure functions with explicit PRNG keys: the same logits and key give the same tokens, on any device. The filters
compose in the order researchers expect from `transformers`' `generate` (its logits warpers: temperature, then
top-k, then top-p): the logits are divided by the temperature, the tokens outside the k most likely are removed,
and of those left the smallest most-likely set whose probability (renormalised after top-k) reaches p is kept
(Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", Sec. 3.1). Ties at a threshold are kept
(every token whose logit equals the k-th largest stays, as in `transformers`' TopKLogitsWarper), so a filter never
breaks a tie by vocabulary order. Temperature 0 means greedy decoding (argmax, the lowest id among equal maxima).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each next token. temperature 0: greedy (the other fields must stay off); top_k 0 and top_p 1:
  no filter."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:  # also refuses NaN
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1: off)")
    if self.temperature == 0 and (self.top_k or self.top_p < 1):
      raise ValueError(f"temperature=0 is greedy decoding; top_k={self.top_k} and top_p={self.top_p} would be "
                       "ignored: leave them at 0 and 1")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def greedy(logits: jax.Array) -> jax.Array:  # [B, V] -> [B] int32
  """The most likely token of each row (the lowest id among equal maxima)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:  # [B, V] float32 -> [B, V]
  """-inf on every token whose logit is below the k-th largest of its row (ties at it kept); k = 0 or >= V: as
  is."""
  if k == 0 or k >= logits.shape[-1]:
    return logits
  threshold = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1] the k-th largest
  return jnp.where(logits < threshold, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:  # [B, V] float32 -> [B, V]
  """-inf outside the nucleus: the most likely tokens whose probabilities sum to at least p, i.e. each token
  whose more likely predecessors (in descending order) hold less than p; the most likely token always stays, and
  a token tied with the least likely kept one stays too. p = 1: as is."""
  if p >= 1:
    return logits
  descending = jnp.sort(logits, axis=-1)[..., ::-1]  # [B, V]
  probs = jax.nn.softmax(descending, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] probability of the more likely tokens
  kept = before < p  # a prefix of the descending order, never empty (before[0] = 0 < p)
  threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
  return jnp.where(logits < threshold, -jnp.inf, logits)


def filtered_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:  # [B, V] -> [B, V] float32
  """The logits `sample` draws from (temperature > 0): scaled by 1 / temperature, then top-k, then top-p; -inf on
  the removed tokens."""
  if config.greedy:
    raise ValueError("temperature=0 is greedy decoding: there is no distribution to filter")
  scaled = logits.astype(jnp.float32) / config.temperature
  return top_p_filter(top_k_filter(scaled, config.top_k), config.top_p)


def sample(logits: jax.Array, key: jax.Array | None, config: SamplingConfig) -> jax.Array:  # [B, V] -> [B] int32
  """The next token of each row: greedy at temperature 0 (`key` unused, may be None), else one draw per row from
  the softmax of `filtered_logits` with `key`."""
  if config.greedy:
    return greedy(logits)
  if key is None:
    raise ValueError(f"temperature={config.temperature} samples: a PRNG key is needed")
  return jax.random.categorical(key, filtered_logits(logits, config), axis=-1).astype(jnp.int32)
