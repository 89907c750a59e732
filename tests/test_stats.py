"""The paired t-interval of results/PROTOCOL.md: its numbers, its verdicts and its refusals."""

import math

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
