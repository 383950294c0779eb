"""Not a benchmark: the progress lines the long benchmarks print on stderr (their tables go to
stdout), so that a run of many minutes says how far it is and how long the rest should take.
"""

import sys
import time
from collections.abc import Callable

from mhc_jax.lm.metrics import format_duration


class RowProgress:
  """`[3/18] mhc minimal took 52s; about 13m00s left` after each of `total` rows.

  Up front: how many rows, with `what` each does. After the first row: the estimated total
  (rows x the first row's time); then the time left at the mean row time so far. Rows that
  cost more than the first (wider variants, deeper models) make the first estimate low.
  """

  def __init__(self, total: int, what: str, *, clock: Callable[[], float] = time.perf_counter):
    self._total, self._done, self._clock = total, 0, clock
    self._start = self._last = clock()
    self._print(f"{total} rows ({what}); the time they take is estimated after the first")

  def row_done(self, label: str) -> None:
    now = self._clock()
    self._done += 1
    mean = (now - self._start) / self._done
    if self._done == 1:
      outlook = f"estimated total {format_duration(mean * self._total)}"
    elif self._done < self._total:
      outlook = f"about {format_duration(mean * (self._total - self._done))} left"
    else:
      outlook = f"all done in {format_duration(now - self._start)}"
    self._print(f"[{self._done}/{self._total}] {label} took {format_duration(now - self._last)}; "
                f"{outlook}")
    self._last = now

  @staticmethod
  def _print(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
