"""Paired differences with a t-interval: the statistics of results/PROTOCOL.md and of `make run`.

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
