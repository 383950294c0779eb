"""experiments/report/significance.py against scipy's tests, and the detectable effect against
the rejection rate of simulated experiments."""

import math

import numpy as np
import pytest
from scipy import stats

from experiments.report import significance


def test_welch_interval_is_scipys():
  rng = np.random.default_rng(0)
  a, b = rng.normal(2.0, 0.3, 5), rng.normal(1.8, 0.1, 7)
  ours = significance.welch_difference(a, b, alpha=0.05)
  low, high = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert math.isclose(ours["mean"] - ours["ci"], low, rel_tol=1e-12)
  assert math.isclose(ours["mean"] + ours["ci"], high, rel_tol=1e-12)
  assert ours["df"] < a.size + b.size - 2  # Welch's df, not the pooled test's


@pytest.mark.parametrize("shift, equivalent", [(0.001, True), (0.03, False)])
def test_tost_is_the_larger_of_two_one_sided_tests(shift, equivalent):
  deltas = np.random.default_rng(1).normal(shift, 0.004, 8)
  ours = significance.tost(deltas, margin=0.01)
  lower = stats.ttest_1samp(deltas, -0.01, alternative="greater").pvalue
  upper = stats.ttest_1samp(deltas, 0.01, alternative="less").pvalue
  assert math.isclose(ours["p"], max(lower, upper), rel_tol=1e-10)
  assert ours["equivalent"] is equivalent


@pytest.mark.parametrize("paired", [True, False])
def test_detectable_effect_is_detected_at_the_stated_power(paired):
  std, n = 0.02, 6
  effect = significance.minimal_detectable_effect(std, n, paired=paired)
  rng = np.random.default_rng(2)
  trials = 20_000

  def rejection_rate(true_effect):
    if paired:
      p = stats.ttest_1samp(rng.normal(true_effect, std, (trials, n)), 0.0, axis=1).pvalue
    else:
      a, b = rng.normal(true_effect, std, (trials, n)), rng.normal(0.0, std, (trials, n))
      p = stats.ttest_ind(a, b, axis=1).pvalue
    return float(np.mean(p < 0.05))

  # 20,000 trials: the rate's standard error is 0.003.
  assert abs(rejection_rate(effect) - 0.8) < 0.012
  assert rejection_rate(0.8 * effect) < 0.75
  assert effect > (2.8 if paired else 2.8 * math.sqrt(2)) * std / math.sqrt(n)  # t, not z


def test_seeds_for_an_effect_are_the_fewest_that_detect_it():
  std, effect = 0.02, 0.02
  n = significance.seeds_for_effect(std, effect)
  assert significance.minimal_detectable_effect(std, n) <= effect
  assert significance.minimal_detectable_effect(std, n - 1) > effect


def test_bad_arguments_are_one_line():
  with pytest.raises(ValueError, match="margin must be > 0, got 0"):
    significance.tost([0.1, 0.2], margin=0)
  with pytest.raises(ValueError, match="at least 2 seeds, got 1"):
    significance.minimal_detectable_effect(0.1, 1)


@pytest.mark.parametrize("n", [2, 3, 5, 40])
def test_detectable_effect_is_finite_for_any_number_of_seeds(n):
  # scipy's noncentral t cdf is NaN at (df 1, noncentrality 8), which a bisection crosses.
  effect = significance.minimal_detectable_effect(0.01, n)
  assert 0 < effect < 1 and math.isclose(significance.power(effect, 0.01, n), 0.8, rel_tol=1e-6)


def test_fisher_exact_of_failure_counts():
  # 4 of 5 failed against 0 of 5: the tables as or more extreme hold 4 or 0 failures of the
  # first arm, each of probability C(5, 4) C(5, 0) / C(10, 4) = 5 / 210.
  ours = significance.fisher_exact(4, 5, 0, 5)
  assert math.isclose(ours["p"], 10 / 210, rel_tol=1e-12) and ours["odds_ratio"] == math.inf
  expected = stats.fisher_exact([[3, 7], [9, 1]], alternative="two-sided")
  ours = significance.fisher_exact(3, 10, 9, 10)
  assert ours == {"p": expected.pvalue, "odds_ratio": expected.statistic}
  assert significance.fisher_exact(2, 10, 2, 10)["p"] == 1.0


@pytest.mark.parametrize("counts", [(6, 5, 0, 5), (1, 5, -1, 5)])
def test_fisher_exact_refuses_impossible_counts(counts):
  with pytest.raises(ValueError, match=r"failures must be between 0 and the runs, got "):
    significance.fisher_exact(*counts)
