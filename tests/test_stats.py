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
