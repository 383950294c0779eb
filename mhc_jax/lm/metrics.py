"""Training metrics: a JSON-lines log, TensorBoard event files and a console progress bar.

`MetricsWriter` appends every write to two places under the workdir:

  metrics.jsonl      one JSON object a line, `{"step": 120, "train_loss": 3.214, ...}`;
                     non-finite values are the strings "nan", "inf", "-inf" (bare NaN is
                     not JSON), and `read_metrics` turns them back into floats.
  tensorboard/       event files of `simple_value` (float32) scalars, written by tensorboardX.

Create it on one process only: two writers appending to one workdir interleave their lines.
"""

import json
import math
import numbers
import operator
import os
import pathlib
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from tensorboardX import SummaryWriter

from mhc_jax.lm.files import write_atomically

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# How often the event file is flushed: TensorBoard lags by up to this much, and a kill loses
# at most this much of it, which metrics.jsonl (the durable record) does not.
_TENSORBOARD_FLUSH_S = 10


class MetricsWriter:
  """Appends scalars to `WORKDIR/metrics.jsonl` and to a TensorBoard event file.

  Every jsonl line is flushed and fsync'd before `write` returns, so a killed run keeps all
  it wrote. A line torn by such a kill is dropped when the next writer opens the file.

  resume_step: the step of the checkpoint a restarted run resumes from. Lines with a larger
    step are dropped (the run will write those steps again), and the new event file starts
    with a restart marker (tensorboardX's `purge_step`) at `resume_step + 1`, which makes
    TensorBoard's reader discard the older files' later steps. None appends to what is there.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
    resume_step = None if resume_step is None else operator.index(resume_step)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / METRICS_FILE
    _keep_complete_lines(self._path, resume_step)
    self._jsonl = open(self._path, "a", encoding="utf-8")
    self._events = SummaryWriter(
        str(workdir / TENSORBOARD_DIR),
        purge_step=None if resume_step is None else resume_step + 1,
        flush_secs=_TENSORBOARD_FLUSH_S,
        # tensorboardX names files by the second and truncates an existing one: without a
        # finer suffix a restart within a second would wipe the previous run's file. The
        # suffix also keeps same-second files in creation order, the order the reader (and
        # so the restart marker) needs.
        filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (Python, numpy or jax scalars) at `step`."""
    step = operator.index(step)  # a float step is a caller bug, not something to round
    values = {name: float(value) for name, value in scalars.items()}
    if "step" in values:
      raise ValueError("'step' is reserved for the step number")
    record = {"step": step, **{name: _json_value(v) for name, v in values.items()}}
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    for name, value in values.items():
      self._events.add_scalar(name, value, step)

  def close(self) -> None:
    self._jsonl.close()
    self._events.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of `WORKDIR/metrics.jsonl`, a torn last line left out."""
  data = (pathlib.Path(workdir) / METRICS_FILE).read_bytes()
  return [_parse_line(line) for line in _complete_lines(data)]


# -- metrics.jsonl ---------------------------------------------------------------------------


def _json_value(value: float) -> float | str:
  return value if math.isfinite(value) else str(value)  # str gives "nan", "inf", "-inf"


def _parse_line(line: bytes) -> dict[str, Any]:
  record = json.loads(line)
  # float() reads back the "nan"/"inf"/"-inf" strings that stand in for non-finite values.
  return {name: int(v) if name == "step" else float(v) for name, v in record.items()}


def _complete_lines(data: bytes) -> list[bytes]:
  # Every write ends in a newline, so text after the last one is a write cut short.
  return data.split(b"\n")[:-1]


def _keep_complete_lines(path: pathlib.Path, resume_step: int | None) -> None:
  """Drops a torn last line and, given `resume_step`, the lines of later steps."""
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    return
  lines = _complete_lines(data)
  if resume_step is not None:
    lines = [line for line in lines if _parse_line(line)["step"] <= resume_step]
  kept = b"".join(line + b"\n" for line in lines)
  if kept != data:
    write_atomically(path, kept)


# -- Progress bar ----------------------------------------------------------------------------

_BAR_WIDTH = 20


class ProgressBar:
  """`step 120/1000 [##......]  12% | train_loss 3.214 | eta 3m12s`.

  On a terminal a `rich` progress display shows the step, a bar and the rest of that line,
  redrawn on every `update`; lines printed meanwhile appear above it. Elsewhere (a log file)
  each update that comes `min_interval_s` or more after the last printed one is printed as
  the line above, as are the first and the final step, and `close` prints the last update if
  it was held back. The ETA extrapolates the mean rate since the first update.

  stream: defaults to `sys.stderr` as it is when the bar is made (so test capture sees it).
  clock: monotonic seconds; replaceable for tests.
  """

  def __init__(self, total_steps: int, *, stream: TextIO | None = None,
               min_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
    if operator.index(total_steps) < 1:
      raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    self._total = total_steps
    self._stream = sys.stderr if stream is None else stream
    self._min_interval_s = min_interval_s
    self._clock = clock
    self._start = None  # (step, time) of the first update
    self._last_printed = -math.inf
    self._held_back = None  # the latest line, when it was not printed
    self._live, self._task = None, None
    if self._stream.isatty():
      # Refreshed by `update` only: updates come once per logged step, and without the
      # refresh thread nothing draws between them.
      self._live = Progress(
          TextColumn("step {task.fields[step]}/{task.total}"), BarColumn(),
          TextColumn("{task.fields[status]}"), console=Console(file=self._stream),
          auto_refresh=False)

  def update(self, step: int, **values: Any) -> None:
    step, now = operator.index(step), self._clock()
    if self._start is None:
      self._start = (step, now)
    done = min(max(step, 0), self._total)
    status = self._status(step, done, now, values)
    if self._live is not None:
      if self._task is None:
        # Started at the first update: the first frame then has values, and the terminal
        # is left alone while the first steps compile.
        self._task = self._live.add_task("", total=self._total, completed=done, step=step,
                                         status=status)
        self._live.start()
      else:
        self._live.update(self._task, completed=done, step=step, status=status, refresh=True)
      return
    filled = done * _BAR_WIDTH // self._total
    line = (f"step {step}/{self._total} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
            f"{status}")
    if step >= self._total or now - self._last_printed >= self._min_interval_s:
      self._stream.write(line + "\n")
      self._last_printed, self._held_back = now, None
    else:
      self._held_back = line
    self._stream.flush()

  def close(self) -> None:
    if self._live is not None:
      self._live.stop()  # leaves the last drawing on screen and the cursor below it
    elif self._held_back is not None:
      self._stream.write(self._held_back + "\n")
      self._held_back = None
      self._stream.flush()

  def _status(self, step: int, done: int, now: float, values: Mapping[str, Any]) -> str:
    # Integer division: 29/100 must not show 28%.
    parts = [f"{done * 100 // self._total:3d}%"]
    parts += [f"{name} {_format_value(value)}" for name, value in values.items()]
    parts.append(f"eta {self._eta(step, now)}")
    return " | ".join(parts)

  def _eta(self, step: int, now: float) -> str:
    start_step, start_time = self._start
    done, elapsed = step - start_step, now - start_time
    if done <= 0 or elapsed <= 0:
      return "--"
    return format_duration(max(self._total - step, 0) * elapsed / done)


def _format_value(value: Any) -> str:
  """4 significant digits; integers, and floats of 1000 or more, as grouped integers."""
  if isinstance(value, numbers.Integral):
    return f"{int(value):,}"
  value = float(value)
  if abs(value) >= 1000:  # throughputs: "12,345" reads better than "1.234e+04"
    return f"{value:,.0f}"
  return f"{value:.4g}"


def format_duration(seconds: float) -> str:
  """`45s`, `3m12s`, `27h05m`."""
  seconds = round(seconds)
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m"
