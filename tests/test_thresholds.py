"""experiments/report/thresholds.py on hand-built float64 curves: surges counted from step 1,
at their margin's boundary, around non-finite points; collapse at its margin; the failure
reasons of a run."""

import math

import numpy as np
import pytest

from experiments.report.thresholds import (Thresholds, collapsed, failed, moving_average,
                                           surges, surges_of_run)


def steps_of(curve) -> np.ndarray:
  return np.arange(1, len(curve) + 1)


def test_moving_average_starts_at_step_1_with_the_points_so_far():
  curve = np.array([4.0, 2.0, 6.0, 8.0])
  np.testing.assert_array_equal(moving_average(steps_of(curve), curve, 2), [4, 3, 4, 7])
  np.testing.assert_array_equal(moving_average(steps_of(curve), curve, 20), [4, 3, 4, 5])
  # The window is in steps: logged every 10 steps, a 20-step window holds two points.
  np.testing.assert_array_equal(moving_average([10, 20, 30], [4.0, 2.0, 6.0], 20), [4, 3, 4])


def test_a_surge_at_step_3_is_found():
  # Averages over the first points: 3, 2.5, 14/3; the running minimum 2.5, so 2.17 above it.
  curve = np.concatenate([[3.0, 2.0, 9.0], np.full(40, 2.0)])
  assert surges(steps_of(curve), curve, window=20, margin=1.0) == [3]
  # Counted from `after` on: at step 5 the average is still 1.1 above its minimum, at 6 0.83.
  assert surges(steps_of(curve), curve, window=20, margin=1.0, after=5) == [5]
  assert surges(steps_of(curve), curve, window=20, margin=1.0, after=6) == []


def test_a_curve_that_only_decreases_has_no_surge():
  curve = 5.5 * np.exp(-np.linspace(0, 3, 300)) + 2.0
  assert surges(steps_of(curve), curve, window=20, margin=1e-9) == []


def test_the_margin_itself_is_not_a_surge():
  # window 1: the average is the curve; 2.5 - 1.5 is exactly 1 in float64.
  curve = np.array([2.0, 1.5, 2.5, 1.5, 2.5])
  assert surges(steps_of(curve), curve, window=1, margin=1.0) == []
  assert surges(steps_of(curve), curve, window=1, margin=np.nextafter(1.0, 0)) == [3, 5]


def test_a_run_of_surging_steps_counts_once():
  curve = np.array([1.0, 3.0, 3.0, 3.0, 1.0, 3.0])
  assert surges(steps_of(curve), curve, window=1, margin=1.0) == [2, 6]


def test_non_finite_points_are_left_out_of_the_average():
  # A NaN would make every later average NaN and hide the surge at step 4.
  curve = np.array([2.0, math.nan, 2.0, 5.0, 5.0])
  np.testing.assert_array_equal(moving_average(steps_of(curve), curve, 2), [2, 2, 2, 3.5, 5])
  assert surges(steps_of(curve), curve, window=2, margin=1.0) == [4]
  assert surges(steps_of(curve[1:]), curve[1:], window=1, margin=1.0) == [3]  # NaN first


def test_collapse_is_within_the_margin_of_unigram_or_above():
  assert collapsed(3.25, 3.5, 0.25)  # exactly at the margin: within it
  assert not collapsed(np.nextafter(3.25, 0), 3.5, 0.25)
  assert collapsed(4.0, 3.5, 0.25) and collapsed(math.nan, 3.5, 0.25)
  assert not collapsed(2.4, 3.5, 0.25)


def rows_of(losses, grad_norms, final_eval_loss, skipped=0) -> list[dict]:
  rows = [{"step": s, "train_loss": loss, "grad_norm": g, "skipped_steps": 0}
          for s, (loss, g) in enumerate(zip(losses, grad_norms), 1)]
  rows[-1].update(final_eval_loss=final_eval_loss, skipped_steps=skipped)
  return rows


def test_failure_reasons_name_each_rule():
  learning = np.linspace(5.5, 2.4, 60)
  calm = np.full(60, 0.5)
  assert failed(rows_of(learning, calm, 2.45), 3.5, Thresholds()) is None
  assert failed(rows_of(learning, calm, 3.3), 3.5, Thresholds()) == \
      "final eval loss 3.3 not below unigram 3.5 - 0.25"
  surging = learning.copy()
  # +2 nats from step 31: the 20-step average gains 0.1 - 0.053 a step over its minimum (at
  # step 30), 0.28 at step 36 and 0.33 at 37.
  surging[30:] += 2.0
  assert failed(rows_of(surging, calm, 2.45), 3.5, Thresholds()) == \
      "train-loss surge at step 37"
  broken = learning.copy()
  broken[9] = math.inf
  assert failed(rows_of(broken, calm, 2.45, skipped=1), 3.5, Thresholds()) == \
      "non-finite train_loss at step 10; 1 skipped update(s)"


def test_gradient_surges_are_a_ratio_and_no_failure():
  norms = np.concatenate([np.full(20, 2.0), np.full(40, 2.0 * 3.5)])  # 3.5x, sustained
  rows = rows_of(np.linspace(5.5, 2.4, 60), norms, 2.45)
  # The geometric average passes 3x its minimum at step 38: 18 of its 20 points are 3.5x the
  # minimum, and 0.9 ln 3.5 > ln 3 > 0.85 ln 3.5.
  assert surges_of_run(rows, Thresholds()) == {"train_loss": [], "grad_norm": [38]}
  assert surges_of_run(rows, Thresholds(grad_surge_ratio=3.6))["grad_norm"] == []
  assert failed(rows, 3.5, Thresholds()) is None


@pytest.mark.parametrize("field, value, message", [
    ("loss_surge_margin", 0.0, "loss_surge_margin must be a finite number > 0, got 0.0"),
    ("grad_surge_ratio", 1.0, "grad_surge_ratio must be a finite number > 1, got 1.0"),
    ("collapse_margin", -0.1, "collapse_margin must be a finite number >= 0, got -0.1"),
    ("collapse_margin", math.inf, "collapse_margin must be a finite number >= 0, got inf"),
    ("surge_window", 0, r"Thresholds.surge_window must be an int >= 1, got 0"),
])
def test_bad_thresholds_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    Thresholds(**{field: value})
