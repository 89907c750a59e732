"""The paired t-interval of results/PROTOCOL.md: its numbers, its verdicts and its refusals."""

import math

import numpy as np
import pytest

from moe_jax import stats


def test_three_pairs_give_the_protocols_interval_with_t_4_303():
  a, b = [1.50, 1.50, 1.47], [1.55, 1.54, 1.53]  # differences -0.05, -0.04, -0.06: sd 0.01
  gap = stats.paired_difference(a, b)
  sd = 0.01
  assert gap.n == 3 and gap.mean == pytest.approx(-0.05)
  assert gap.standard_error == pytest.approx(sd / math.sqrt(3))
  assert gap.half_width == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)
  assert gap.verdict("Switch better", "dense better") == "Switch better"


def test_an_interval_across_zero_is_inconclusive_and_one_above_is_the_other_arm():
  assert stats.paired_difference([1.0, 1.2], [1.1, 1.1]).verdict("lo", "hi") == "inconclusive"
  assert stats.paired_difference([1.2, 1.3, 1.25], [1.0, 1.1, 1.06]).verdict("lo", "hi") == "hi"


def test_one_pair_has_no_interval_and_unpaired_samples_are_refused():
  single = stats.paired_difference([1.0], [0.5])
  assert single.mean == 0.5 and math.isnan(single.half_width)
  assert single.verdict("lo", "hi") == "inconclusive"
  with pytest.raises(ValueError, match="paired samples"):
    stats.paired_difference([1.0, 2.0], [1.0])
  with pytest.raises(ValueError, match="confidence"):
    stats.paired_difference([1.0, 2.0], [1.0, 1.0], confidence=1.5)


def test_power_with_no_true_difference_is_the_tests_false_positive_rate():
  for n in (2, 3, 5, 10):
    assert stats.paired_t_power(0.0, 0.01, n) == pytest.approx(0.05, abs=1e-9)


def test_power_matches_the_rate_at_which_simulated_studies_exclude_zero():
  rng = np.random.default_rng(0)
  difference, sd = -0.02, 0.012
  for n in (3, 5):
    trials = rng.normal(difference, sd, size=(4000, n))
    excluded = [stats.paired_difference(row, np.zeros(n)).verdict("lo", "hi") != "inconclusive" for row in trials]
    assert stats.paired_t_power(difference, sd, n) == pytest.approx(np.mean(excluded), abs=0.025)


def test_power_of_ten_pairs_at_effect_size_one_is_the_textbook_0_803():
  assert stats.paired_t_power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=1e-4)  # Cohen (1988), G*Power


def test_power_rises_with_pairs_and_refuses_a_study_without_an_interval():
  powers = [stats.paired_t_power(0.02, 0.012, n) for n in (3, 4, 5, 8)]
  assert powers == sorted(powers) and powers[-1] > 0.95
  with pytest.raises(ValueError, match="n >= 2"):
    stats.paired_t_power(0.02, 0.012, 1)
  with pytest.raises(ValueError, match="sd"):
    stats.paired_t_power(0.02, 0.0, 3)


# ---------------------------------------------------------------------------------------------
# The bootstrap over documents (results/SCALING.md: intervals over the text).


def test_identical_documents_give_a_zero_width_interval_at_their_mean():
  # Dyadic values: every resampled sum is exact, so every resample's ratio is exactly 2.5 / 8.
  interval = stats.document_bootstrap(np.full(40, 2.5), np.full(40, 8.0))
  assert interval.mean == interval.low == interval.high == 2.5 / 8
  assert interval.n == 40 and interval.resamples == stats.DEFAULT_RESAMPLES


def test_the_mean_is_the_token_weighted_ratio_of_sums_and_lies_in_its_interval():
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 500, size=60).astype(float)
  nats = tokens * rng.uniform(1.0, 2.0, size=60)
  interval = stats.document_bootstrap(nats, tokens)
  assert interval.mean == pytest.approx(nats.sum() / tokens.sum())
  assert interval.low < interval.mean < interval.high


def test_a_shift_of_every_document_by_c_nats_per_token_is_a_paired_difference_of_exactly_c():
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, 300, size=50).astype(float)
  b = np.round(tokens * rng.uniform(1.0, 3.0, size=50) * 64) / 64  # multiples of 1/64: sums are exact
  a = b + 0.25 * tokens
  gap = stats.paired_document_bootstrap(a, b, tokens)
  assert gap.mean == gap.low == gap.high == 0.25
  assert gap.verdict("lower", "higher") == "higher"


def test_paired_pairs_of_runs_average_their_differences_and_share_the_resampled_documents():
  rng = np.random.default_rng(3)
  tokens = rng.integers(10, 100, size=30).astype(float)
  a = tokens * rng.uniform(1.0, 2.0, size=(4, 30))
  b = tokens * rng.uniform(1.0, 2.0, size=(4, 30))
  gap = stats.paired_document_bootstrap(a, b, tokens, resamples=200)
  assert gap.mean == pytest.approx(np.mean((a - b).sum(axis=1) / tokens.sum()))
  index = stats.resample_indices(30, 200)  # the same documents for all four pairs in each resample
  by_hand = np.mean([(a[s][index] - b[s][index]).sum(axis=1) / tokens[index].sum(axis=1) for s in range(4)], axis=0)
  assert (gap.low, gap.high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))


def test_the_interval_covers_the_true_mean_at_about_its_confidence():
  # 300 evaluation sets of 60 documents with a per-document effect (tokens of one document share a mean): the 95%
  # percentile interval of the ratio should cover the population ratio in about 95% of them (fixed seeds).
  rng = np.random.default_rng(4)
  covered = 0
  for trial in range(300):
    tokens = rng.integers(50, 2000, size=60).astype(float)
    per_token = 1.5 + 0.3 * rng.standard_normal(60)  # the population mean of nats per token is 1.5
    interval = stats.document_bootstrap(per_token * tokens, tokens, resamples=400, seed=trial)
    covered += interval.low <= 1.5 <= interval.high
  assert 0.90 <= covered / 300 <= 0.98


def test_resampling_is_a_pure_function_of_its_seed():
  nats, tokens = np.arange(1.0, 21.0), np.arange(2.0, 22.0)
  assert stats.document_bootstrap(nats, tokens, seed=7) == stats.document_bootstrap(nats, tokens, seed=7)
  assert stats.document_bootstrap(nats, tokens, seed=7) != stats.document_bootstrap(nats, tokens, seed=8)


@pytest.mark.parametrize("call, message", [
    (lambda: stats.document_bootstrap([1.0, 2.0], [1.0]), "two 1-d arrays of one length"),
    (lambda: stats.document_bootstrap([1.0], [0.0]), "denominator must be >= 0 per document and > 0 in total"),
    (lambda: stats.document_bootstrap([1.0], [1.0], resamples=0), "resamples=0 must be >= 1"),
    (lambda: stats.document_bootstrap([1.0], [1.0], confidence=1.0), r"confidence=1.0 must be in \(0, 1\)"),
    (lambda: stats.paired_document_bootstrap([[1.0, 2.0]], [1.0, 2.0], [1.0, 1.0]), "of one shape"),
    (lambda: stats.paired_document_bootstrap([1.0, 2.0], [1.0, 2.0], [1.0]), "denominator \\[n\\]"),
    (lambda: stats.resample_indices(0), "n=0 documents"),
])
def test_bootstraps_refuse_unmatched_or_empty_inputs_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()
