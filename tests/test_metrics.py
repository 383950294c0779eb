"""mhc_jax.lm.metrics: the jsonl log (round trip, resume, torn lines), the TensorBoard files as
TensorBoard's own reader sees them (values, steps, a resumed run's purge) and the progress bar
in a log file and on a terminal."""

import io
import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mhc_jax.lm import metrics


def write_steps(workdir, steps, **kwargs):
  with metrics.MetricsWriter(workdir, **kwargs) as writer:
    for step in steps:
      writer.write(step, {"loss": 10.0 - step, "lr": 1e-3})


def test_jsonl_round_trip_of_numpy_jax_and_non_finite_values(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(np.int64(1), {"np32": np.float32(0.1), "np_int": np.int32(7),
                               "jax": jnp.asarray(2.5, jnp.bfloat16), "py": 3})
    writer.write(jnp.asarray(2), {"nan": float("nan"), "inf": np.inf, "ninf": -jnp.inf})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  strict = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # no bare NaN
  assert strict[1] == {"step": 2, "nan": "nan", "inf": "inf", "ninf": "-inf"}
  first, second = metrics.read_metrics(tmp_path)
  assert first == {"step": 1, "np32": float(np.float32(0.1)), "np_int": 7.0, "jax": 2.5,
                   "py": 3.0}
  assert type(first["step"]) is int and type(first["np32"]) is float
  assert math.isnan(second["nan"]) and second["inf"] == math.inf and second["ninf"] == -math.inf


def test_write_rejects_a_float_step_and_a_metric_named_step(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    with pytest.raises(TypeError):
      writer.write(1.5, {"loss": 1.0})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 1.0})
  assert metrics.read_metrics(tmp_path) == []


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path):
  write_steps(tmp_path, range(1, 8))
  write_steps(tmp_path, range(5, 7), resume_step=4)  # killed at step 7, checkpoint at 4
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]


def test_a_torn_last_line_is_ignored_then_dropped(tmp_path):
  write_steps(tmp_path, [1, 2])
  path = tmp_path / "metrics.jsonl"
  with open(path, "ab") as f:
    f.write(b'{"step": 3, "loss": 7.')  # killed part way through a write
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2]
  write_steps(tmp_path, [3])  # without resume_step: the torn line must not prefix step 3
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3]
  assert path.read_bytes().count(b"\n") == 3


def test_a_corrupt_line_before_the_last_is_an_error(tmp_path):
  write_steps(tmp_path, [1])
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b"garbage\n")
  with pytest.raises(ValueError):
    metrics.read_metrics(tmp_path)


def read_tensorboard(logdir):
  """`{tag: [(step, value)]}` as TensorBoard shows it, restart markers applied."""
  reader = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0})  # 0: keep every event
  reader.Reload()
  return {tag: [(e.step, e.value) for e in reader.Scalars(tag)]
          for tag in reader.Tags()["scalars"]}


def test_tensorboard_file_holds_exactly_the_written_scalars(tmp_path):
  rng = np.random.default_rng(0)
  written = [(step, {"train/loss": float(rng.normal()), "lr": float(rng.uniform(0, 1e-3)),
                     "tokens/s": 123456.789, "nan": math.nan, "huge": 1e300})
             for step in [0, 1, 5, 2**40]]
  with metrics.MetricsWriter(tmp_path) as writer:
    for step, scalars in written:
      writer.write(step, scalars)
  event_file, = (tmp_path / "tensorboard").iterdir()
  assert event_file.name.startswith("events.out.tfevents.")
  got = read_tensorboard(tmp_path / "tensorboard")
  assert sorted(got) == ["huge", "lr", "nan", "tokens/s", "train/loss"]
  for tag in got:
    with np.errstate(over="ignore"):  # float32 values: beyond its range they become inf
      want = [(step, float(np.float32(scalars[tag]))) for step, scalars in written]
    assert [step for step, _ in got[tag]] == [step for step, _ in want]
    for (_, value), (_, expected) in zip(got[tag], want):
      assert value == expected or (math.isnan(value) and math.isnan(expected))


def test_tensorboard_resume_purges_the_orphaned_steps(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in [1, 2, 3]:
      writer.write(step, {"loss": 10.0 + step})
  with metrics.MetricsWriter(tmp_path, resume_step=2) as writer:  # checkpoint at 2
    for step in [3, 4]:
      writer.write(step, {"loss": 20.0 + step})
  # The first run's file is kept (a restart within the same second must not truncate it).
  assert len(list((tmp_path / "tensorboard").iterdir())) == 2
  # Without the restart marker the reader would show step 3 twice.
  assert read_tensorboard(tmp_path / "tensorboard") == {
      "loss": [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]}


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_bar_in_a_log_prints_rate_limited_lines():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(1000, stream=stream, min_interval_s=0.5, clock=clock)
  bar.update(100, train_loss=3.21449, **{"tokens/s": 12345.6})
  clock.now += 0.2
  bar.update(110, train_loss=3.1)  # within min_interval_s of the last printed line
  clock.now += 0.4
  bar.update(120, train_loss=3.0, **{"tokens/s": 12001})
  clock.now += 0.1
  bar.update(130, train_loss=2.9)
  bar.close()  # prints the held-back step 130
  lines = stream.getvalue().split("\n")
  assert "\r" not in stream.getvalue() and lines[-1] == ""
  assert lines[:-1] == [
      "step 100/1000 [##..................]  10% | train_loss 3.214 | tokens/s 12,346 | eta --",
      "step 120/1000 [##..................]  12% | train_loss 3 | tokens/s 12,001 | eta 26s",
      "step 130/1000 [##..................]  13% | train_loss 2.9 | eta 20s",
  ]


def test_progress_bar_prints_the_final_step_at_once():
  stream, clock = io.StringIO(), FakeClock()
  bar = metrics.ProgressBar(29, stream=stream, clock=clock)
  bar.update(0)
  clock.now += 0.1
  bar.update(29)
  assert stream.getvalue().split("\n") == [
      "step 0/29 [....................]   0% | eta --",
      "step 29/29 [####################] 100% | eta 0s",
      ""]
  bar.close()
  assert stream.getvalue().count("\n") == 2  # nothing held back to print twice


def test_progress_bar_percentage_rounds_down():
  stream = io.StringIO()
  metrics.ProgressBar(100, stream=stream).update(jnp.asarray(29))  # a jax step counter
  assert "[#####...............]  29% |" in stream.getvalue()


def test_progress_bar_on_a_terminal_redraws_one_line(monkeypatch):

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  # What rich reads to decide whether, and how wide, to draw.
  for name in ["TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR", "FORCE_COLOR"]:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TERM", "xterm-256color")
  monkeypatch.setenv("COLUMNS", "120")
  stream, clock = Terminal(), FakeClock()
  bar = metrics.ProgressBar(4000, stream=stream, clock=clock)
  bar.update(0, loss=12.5, grad_norm=0.25)
  clock.now += 1.0
  bar.update(1000, loss=1.0)
  bar.close()
  out = stream.getvalue()
  assert out.startswith("\x1b[?25l") and out.endswith("\n\x1b[?25h")  # cursor hidden, shown
  frames = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out).strip().split("\r")  # no escapes
  assert len(frames) == 3  # the first update, the second, and the final drawing on close
  bar_chars = r" [━╸╺]{10,} "
  assert re.fullmatch(r"step 0/4000" + bar_chars + r"  0% \| loss 12\.5 \| grad_norm 0\.25 "
                      r"\| eta --", frames[0])
  for frame in frames[1:]:
    assert re.fullmatch(r"step 1000/4000" + bar_chars + r" 25% \| loss 1 \| eta 3s", frame)


@pytest.mark.parametrize("value, text", [
    (3.21449, "3.214"), (0.000123456, "0.0001235"), (1e-9, "1e-09"), (999.4, "999.4"),
    (12345.6, "12,346"), (np.int64(1234567), "1,234,567"), (7, "7"), (math.nan, "nan"),
    (jnp.asarray(-2.5), "-2.5"),
])
def test_format_value(value, text):
  assert metrics._format_value(value) == text


@pytest.mark.parametrize("seconds, text", [
    (0.4, "0s"), (59.4, "59s"), (192, "3m12s"), (3599, "59m59s"), (3600, "1h00m"),
    (97500, "27h05m"),
])
def testformat_duration(seconds, text):
  assert metrics.format_duration(seconds) == text
