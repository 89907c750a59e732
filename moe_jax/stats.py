"""Paired differences with a t-interval (over seeds) and bootstrap intervals over documents (over the text).

The t-interval is the statistics of results/PROTOCOL.md and of `make run`; the bootstrap over documents is the
interval over the evaluation text of results/SCALING.md.

Used wherever two arms are compared on matched units (seeds that share a data order, or evaluation batches
that both models score), so the interval is computed one way everywhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """mean(a - b) over n pairs, its standard error and the half-width of the two-sided t-interval."""

  mean: float
  standard_error: float
  half_width: float  # t(1 - (1 - confidence) / 2, n - 1) * standard_error; nan for n < 2
  n: int
  differences: tuple[float, ...]

  @property
  def interval(self) -> tuple[float, float]:
    return self.mean - self.half_width, self.mean + self.half_width

  def verdict(self, below: str, above: str) -> str:
    """`below` when the whole interval is below 0, `above` when above, else 'inconclusive' (PROTOCOL.md)."""
    low, high = self.interval
    if high < 0:
      return below
    if low > 0:
      return above
    return "inconclusive"


def t_critical(n: int, confidence: float = 0.95) -> float:
  """t(0.5 + confidence / 2, n - 1): the multiplier of the standard error in the two-sided interval of n pairs."""
  return float(scipy.stats.t.ppf(0.5 + confidence / 2, df=n - 1))


def paired_difference(a, b, confidence: float = 0.95) -> PairedDifference:
  """Paired t-interval of a - b (Student 1908): mean +- t(0.5 + confidence / 2, n - 1) * sd / sqrt(n)."""
  a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired samples must be two 1-d arrays of one length, got shapes {a.shape} and {b.shape}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must be in (0, 1)")
  differences = a - b
  n = len(differences)
  if n < 2:
    return PairedDifference(float(np.mean(differences)) if n else float("nan"), float("nan"), float("nan"), n,
                            tuple(differences.tolist()))
  standard_error = float(np.std(differences, ddof=1) / np.sqrt(n))
  half_width = t_critical(n, confidence) * standard_error
  return PairedDifference(float(np.mean(differences)), standard_error, half_width, n, tuple(differences.tolist()))


def paired_t_power(difference: float, sd: float, n: int, confidence: float = 0.95) -> float:
  """Probability that n pairs give a t-interval excluding 0 when the true mean difference is `difference`.

  The power of the two-sided paired t-test that `paired_difference(...).verdict` applies: with df = n - 1 and the
  noncentrality difference * sqrt(n) / sd, P(|T| > t(0.5 + confidence / 2, df)) for T ~ noncentral t. Used to plan
  a replication's seed count from a study's observed spread, never to re-read that study's own verdict.
  """
  if n < 2:
    raise ValueError(f"n={n} pairs: a t-interval needs n >= 2")
  if not sd > 0:
    raise ValueError(f"sd={sd} must be > 0")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must be in (0, 1)")
  df, critical = n - 1, t_critical(n, confidence)
  noncentrality = difference * np.sqrt(n) / sd
  return float(scipy.stats.nct.sf(critical, df, noncentrality) + scipy.stats.nct.cdf(-critical, df, noncentrality))


# ---------------------------------------------------------------------------------------------
# Intervals over the text: a bootstrap over documents (Efron 1979; percentile interval, Efron & Tibshirani 1993,
# ch. 13). The t-intervals above cover the seeds; these cover the choice of evaluation text. Both read per-document
# sums (nats and tokens of each document of a fixed evaluation set, `moe_jax.evalset`), so a document's tokens are
# resampled together: tokens of one document are correlated, and resampling them one by one would understate the
# spread.

DEFAULT_RESAMPLES = 1000
BOOTSTRAP_SEED = 0  # fixed: two readers of the same per-document sums get the same interval


@dataclasses.dataclass(frozen=True)
class BootstrapInterval:
  """A ratio of sums over n documents (e.g. nats per token) and its percentile bootstrap interval."""

  mean: float  # sum(numerator) / sum(denominator) over all documents (or its mean over runs, paired)
  low: float   # the (1 - confidence) / 2 quantile of the resampled means
  high: float  # the (1 + confidence) / 2 quantile
  n: int       # documents resampled
  resamples: int
  confidence: float

  @property
  def interval(self) -> tuple[float, float]:
    return self.low, self.high

  def verdict(self, below: str, above: str) -> str:
    """`below` when the whole interval is below 0, `above` when above, else 'inconclusive' (as PairedDifference)."""
    if self.high < 0:
      return below
    if self.low > 0:
      return above
    return "inconclusive"


def _bootstrap_arguments(resamples: int, confidence: float) -> None:
  if resamples < 1:
    raise ValueError(f"resamples={resamples} must be >= 1")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence} must be in (0, 1)")


def resample_indices(n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
  """int64 [resamples, n]: document indices drawn with replacement, a pure function of (n, resamples, seed)."""
  if n < 1:
    raise ValueError(f"n={n} documents: a bootstrap needs at least one")
  return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
  low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
  return float(low), float(high)


def document_bootstrap(numerator, denominator, *, resamples: int = DEFAULT_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       confidence: float = 0.95) -> BootstrapInterval:
  """sum(numerator) / sum(denominator) and its percentile interval over documents resampled with replacement.

  Args:
    numerator: [n] per-document sums, e.g. the nats of each document's targets.
    denominator: [n] per-document weights, > 0 in total, e.g. its target count (nats per token) or its bytes.
    resamples, seed: `resample_indices`; the seed is fixed so the interval is reproducible.
  Each resample recomputes the ratio of sums (the token-weighted mean, as the point estimate is), not a mean of
  per-document ratios, so a long document counts for its length in every resample as in the estimate.
  """
  _bootstrap_arguments(resamples, confidence)
  numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
  if numerator.shape != denominator.shape or numerator.ndim != 1:
    raise ValueError(f"numerator and denominator must be two 1-d arrays of one length, got shapes "
                     f"{numerator.shape} and {denominator.shape}")
  if np.any(denominator < 0) or not np.sum(denominator) > 0:
    raise ValueError("denominator must be >= 0 per document and > 0 in total")
  index = resample_indices(len(numerator), resamples, seed)  # [R, n]
  ratios = numerator[index].sum(axis=1) / np.maximum(denominator[index].sum(axis=1), np.finfo(np.float64).tiny)
  return BootstrapInterval(float(np.sum(numerator) / np.sum(denominator)), *_percentiles(ratios, confidence),
                           n=len(numerator), resamples=resamples, confidence=confidence)


def paired_document_bootstrap(a, b, denominator, *, resamples: int = DEFAULT_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                              confidence: float = 0.95) -> BootstrapInterval:
  """The weighted mean difference of a - b over documents scored by both, with its bootstrap interval over documents.

  Args:
    a, b: [n] or [S, n] per-document sums (nats) of two arms scored on the same n documents; with a leading S axis,
      S pairs of runs (seeds), each row of `a` paired with the same row of `b`.
    denominator: [n] per-document weights shared by both arms (target counts or bytes): the set is the same.
  Returns the mean over pairs of sum(a_s - b_s) / sum(denominator), and the percentile interval of that quantity
  when the n documents are resampled with replacement, the same documents for every pair in one resample (the text
  is drawn once; the seeds are not resampled: `paired_difference` covers them). This is the "paired bootstrap over
  files" of results/SCALING.md.
  """
  _bootstrap_arguments(resamples, confidence)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denominator = np.asarray(denominator, np.float64)
  if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1:] != denominator.shape or denominator.ndim != 1:
    raise ValueError(f"a and b must be [n] or [S, n] of one shape and denominator [n], got shapes {a.shape}, "
                     f"{b.shape} and {denominator.shape}")
  if np.any(denominator < 0) or not np.sum(denominator) > 0:
    raise ValueError("denominator must be >= 0 per document and > 0 in total")
  differences = (a - b).reshape(-1, a.shape[-1])  # [S, n]: per-document differences of each pair
  index = resample_indices(differences.shape[1], resamples, seed)  # [R, n]
  resampled = differences[:, index].sum(axis=2) / np.maximum(
      denominator[index].sum(axis=1), np.finfo(np.float64).tiny)  # [S, R]
  mean = float(np.mean(differences.sum(axis=1) / np.sum(denominator)))
  return BootstrapInterval(mean, *_percentiles(resampled.mean(axis=0), confidence), n=differences.shape[1],
                           resamples=resamples, confidence=confidence)
