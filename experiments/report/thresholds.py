"""When a run failed, by thresholds a preset states before its runs (`Thresholds.*` in gin),
each counting from step 1:

  non-finite  any logged value (loss, gradient norm, evaluation, gain) is NaN or infinite,
              or an update was skipped (`LoopConfig.nonfinite = "skip"` drops and counts it)
  surge       the train loss's `surge_window`-step moving average rises more than
              `loss_surge_margin` nats above its running minimum at a step >= `surge_after`
  collapse    the final full-validation loss is within `collapse_margin` nats of (or above)
              the unigram loss of the same tokens: the run learned no more than token counts

The moving average at step s is the mean of the values logged at steps (s - window, s]: over
the first steps the mean of those logged so far, so a surge at step 3 counts. Gradient-norm
surges are counted too (`surges_of_run`), by the geometric moving average (of the logs)
rising more than `grad_surge_ratio` times above its running minimum: a gradient norm's scale
is the model's, so only a ratio means the same at every size. They are reported, not failures:
a run whose gradients surged and whose loss did not still trains.
"""

import dataclasses
import math

import gin
import numpy as np

from mhc_jax.checks import check_int


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Thresholds:
  """The failure rule's numbers (see the module's docstring); steps count from 1."""

  surge_window: int = 20
  loss_surge_margin: float = 0.3
  grad_surge_ratio: float = 3.0
  surge_after: int = 1
  collapse_margin: float = 0.25

  def __post_init__(self):
    check_int("Thresholds.surge_window", self.surge_window)
    check_int("Thresholds.surge_after", self.surge_after)
    _check_above("loss_surge_margin", self.loss_surge_margin, 0.0, strictly=True)
    _check_above("grad_surge_ratio", self.grad_surge_ratio, 1.0, strictly=True)
    _check_above("collapse_margin", self.collapse_margin, 0.0, strictly=False)


def _check_above(name: str, value, lowest: float, strictly: bool) -> None:
  above = isinstance(value, (int, float)) and (value > lowest if strictly else value >= lowest)
  if not (above and math.isfinite(value)):
    raise ValueError(f"Thresholds.{name} must be a finite number {'>' if strictly else '>='} "
                     f"{lowest:g}, got {value!r}")


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (steps `[T]`, values `[T]`) of the rows that logged `key`."""
  kept = [row for row in rows if key in row]
  return np.array([r["step"] for r in kept], int), np.array([r[key] for r in kept], float)


def moving_average(steps: np.ndarray, values: np.ndarray, window: int) -> np.ndarray:
  """At each logged step s `[T]`, the mean of the finite values logged at steps
  (s - window, s] (NaN where there are none): non-finite values count as failures of their
  own, and left in they would hide every later surge."""
  steps, values = np.asarray(steps), np.asarray(values, np.float64)
  finite = np.isfinite(values)
  sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
  counts = np.concatenate([[0], np.cumsum(finite)])
  starts = np.searchsorted(steps, steps - window, side="right")
  ends = np.arange(1, len(steps) + 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (sums[ends] - sums[starts]) / (counts[ends] - counts[starts])


def surges(steps, values, window: int, margin: float, after: int = 1) -> list[int]:
  """The steps at which the `window`-step moving average of `values` (logged at `steps`,
  increasing) starts to exceed its running minimum by more than `margin`, at steps >=
  `after`; a run of such steps counts once, at its first."""
  steps = np.asarray(steps)
  average = moving_average(steps, values, window)
  # fmin: a step with no finite value so far leaves the running minimum as it was.
  excess = average - np.fmin.accumulate(average)
  above = (excess > margin) & (steps >= after)
  onsets = above & ~np.concatenate([[False], above[:-1]])
  return [int(s) for s in steps[onsets]]


def collapsed(final_loss: float, unigram_loss: float, margin: float) -> bool:
  """Whether the final loss is within `margin` nats of the unigram loss or above it (NaN
  counts: it is no better)."""
  return not final_loss < unigram_loss - margin


def surges_of_run(rows: list[dict], thresholds: Thresholds) -> dict[str, list[int]]:
  """The surge steps of a run's train loss and of its gradient norm (see the docstring)."""
  t = thresholds
  loss_steps, losses = series(rows, "train_loss")
  grad_steps, norms = series(rows, "grad_norm")
  with np.errstate(divide="ignore", invalid="ignore"):  # log(0) or log(NaN): not finite
    log_norms = np.log(norms)
  return {"train_loss": surges(loss_steps, losses, t.surge_window, t.loss_surge_margin,
                               t.surge_after),
          "grad_norm": surges(grad_steps, log_norms, t.surge_window,
                              math.log(t.grad_surge_ratio), t.surge_after)}


def first_nonfinite(rows: list[dict]) -> str | None:
  """'KEY at step S' of the first non-finite number logged, or None."""
  for row in rows:
    for key, value in row.items():
      if isinstance(value, float) and not math.isfinite(value):
        return f"{key} at step {row['step']}"
  return None


def failed(rows: list[dict], unigram_loss: float, thresholds: Thresholds) -> str | None:
  """Why a run failed, from its metrics rows (the last one holding `final_eval_loss` and
  `skipped_steps`) and the unigram loss of its validation tokens; None when it did not."""
  reasons = []
  nonfinite = first_nonfinite(rows)
  if nonfinite:
    reasons.append(f"non-finite {nonfinite}")
  skipped = int(rows[-1]["skipped_steps"])
  if skipped:
    reasons.append(f"{skipped} skipped update(s)")
  loss_surges = surges_of_run(rows, thresholds)["train_loss"]
  if loss_surges:
    reasons.append(f"train-loss surge at step {', '.join(map(str, loss_surges))}")
  final = rows[-1]["final_eval_loss"]
  # Without the unigram loss of the tokens (NaN: a corpus with no reference) no collapse rule.
  if not math.isnan(unigram_loss) and collapsed(final, unigram_loss, thresholds.collapse_margin):
    reasons.append(f"final eval loss {final:.4g} not below unigram {unigram_loss:.4g} - "
                   f"{thresholds.collapse_margin:g}")
  return "; ".join(reasons) or None
