"""moe_jax.sampling against plain numpy references: the filters keep exactly the tokens of their definitions on
constructed logits (ties included), combine as temperature -> top-k -> top-p, draws follow the filtered
distribution and repeat for a key, greedy is the argmax, and bad settings are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import sampling


def reference_filter(row, temperature, top_k, top_p):
  """One row, by the definitions: numpy, token by token."""
  row = np.asarray(row, np.float64) / temperature
  if 0 < top_k < len(row):
    kth = sorted(row, reverse=True)[top_k - 1]
    row = np.where(row < kth, -np.inf, row)
  if top_p < 1:
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = sorted(range(len(row)), key=lambda i: -row[i])
    kept, mass = [], 0.0
    for i in order:
      if mass >= top_p:
        break
      kept.append(i)
      mass += probs[i]
    threshold = min(row[i] for i in kept)
    row = np.where(row < threshold, -np.inf, row)
  return row


# Rows built to hit the edge cases: ties at the k-th value, a nucleus boundary exactly between tokens, one dominant
# token, uniform logits.
LOGITS = np.array([
    [3.0, 1.0, 2.0, 2.0, 0.0, -1.0],
    [np.log(0.5), np.log(0.25), np.log(0.125), np.log(0.0625), np.log(0.03125), np.log(0.03125)],
    [10.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
], np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 2, 1.0), (1.0, 3, 1.0), (0.5, 0, 0.5), (1.0, 0, 0.75), (1.0, 0, 0.8),
    (2.0, 0, 0.9), (1.0, 3, 0.6), (0.7, 4, 0.95), (1.0, 6, 0.01), (1.0, 10, 1.0)])
def test_filtered_logits_keep_the_tokens_of_the_numpy_reference(temperature, top_k, top_p):
  config = sampling.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  got = np.asarray(sampling.filtered_logits(jnp.asarray(LOGITS), config))
  want = np.stack([reference_filter(row, temperature, top_k, top_p) for row in LOGITS])
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_allclose(got[~np.isinf(got)], want[~np.isinf(want)], rtol=1e-6)


def test_ties_at_the_threshold_are_kept_and_the_top_token_always_stays():
  top2 = np.asarray(sampling.top_k_filter(jnp.asarray(LOGITS[:1]), 2))[0]
  assert np.isfinite(top2).tolist() == [True, False, True, True, False, False]  # 2.0 is tied: three tokens
  nucleus = np.asarray(sampling.top_p_filter(jnp.asarray(LOGITS[2:3]), 0.01))[0]
  assert np.isfinite(nucleus).tolist() == [True] + [False] * 5
  # Exactly on the boundary: 0.5 + 0.25 reaches p = 0.75, so the third token is out.
  boundary = np.asarray(sampling.top_p_filter(jnp.asarray(LOGITS[1:2]), 0.75))[0]
  assert np.isfinite(boundary).sum() == 2


def test_draws_follow_the_filtered_distribution():
  config = sampling.SamplingConfig(temperature=0.8, top_k=4, top_p=0.9)
  logits = jnp.asarray(np.repeat(LOGITS[:1], 20_000, axis=0))
  tokens = np.asarray(sampling.sample(logits, jax.random.key(0), config))
  want = reference_filter(LOGITS[0], 0.8, 4, 0.9)
  probs = np.exp(want - want.max())
  probs /= probs.sum()
  frequencies = np.bincount(tokens, minlength=LOGITS.shape[1]) / len(tokens)
  assert set(np.flatnonzero(frequencies)) <= set(np.flatnonzero(probs))  # never a filtered token
  np.testing.assert_allclose(frequencies, probs, atol=0.015)  # 4 sd of a frequency at n = 20,000


def test_draws_repeat_for_a_key_and_differ_across_keys():
  config = sampling.SamplingConfig(temperature=1.0)
  logits = jnp.zeros((64, 32))
  a, b = (np.asarray(sampling.sample(logits, jax.random.key(3), config)) for _ in range(2))
  c = np.asarray(sampling.sample(logits, jax.random.key(4), config))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()


def test_greedy_is_the_argmax_and_top_k_one_samples_it():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(8, 50)), jnp.float32)
  want = np.argmax(np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(sampling.sample(logits, None, sampling.SamplingConfig(temperature=0.0)), want)
  np.testing.assert_array_equal(
      sampling.sample(logits, jax.random.key(1), sampling.SamplingConfig(temperature=5.0, top_k=1)), want)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature=-0.1"), (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_k=-1), "top_k=-1"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=0.0, top_k=5), "temperature=0")])
def test_bad_settings_are_refused_naming_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampling.SamplingConfig(**kwargs)


def test_sampling_without_a_key_is_refused():
  with pytest.raises(ValueError, match="PRNG key"):
    sampling.sample(jnp.zeros((1, 4)), None, sampling.SamplingConfig(temperature=1.0))
