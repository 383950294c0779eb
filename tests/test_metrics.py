"""mhc_jax.metrics: the jsonl log (round trip, resume, torn lines), the hand-written
TensorBoard files (CRC32C vectors, bytes written by TensorFlow and protobuf, round trip) and
the progress bar's log-file output."""

import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import metrics


def test_crc32c_matches_published_vectors():
  assert metrics._crc32c(b"123456789") == 0xE3069283
  # RFC 3720 section B.4.
  assert metrics._crc32c(bytes(32)) == 0x8A9136AA
  assert metrics._crc32c(b"\xff" * 32) == 0x62A8AB43
  assert metrics._crc32c(bytes(range(32))) == 0x46DD794E
  assert metrics._crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_version_record_matches_one_written_by_tensorflow():
  # The file-version record of an event file from TensorBoard's gcs_file_loader_test.
  written = (b'\x18\x00\x00\x00\x00\x00\x00\x00\xa3\x7fK"\t\x00\x00\x00\'\xe6\xb3\xd5A'
             b'\x1a\rbrain.Event:2jM\x0b\x15')
  (wall_time,) = struct.unpack("<d", written[13:21])
  assert metrics._record(metrics._version_event(wall_time)) == written


def test_scalar_records_match_protobuf_encoding():
  # An event file written through generated protobuf code (tensorboard_logger's
  # test_serialization): wall time 256.5, v/1 = 1.5 at step 1, v/22 = 16.0 at step 2.
  written = (
      b'\x18\x00\x00\x00\x00\x00\x00\x00\xa3\x7fK"\t\x00\x00\x00\x00\x00\x08p@'
      b'\x1a\rbrain.Event:2\xbc\x98!+'
      b'\x19\x00\x00\x00\x00\x00\x00\x00\x8b\xf1\x08(\t\x00\x00\x00\x00\x00\x08p@'
      b'\x10\x01*\x0c\n\n\n\x03v/1\x15\x00\x00\xc0?,\xec\xc0\x87'
      b'\x1a\x00\x00\x00\x00\x00\x00\x00\x12\x9b\xd8-\t\x00\x00\x00\x00\x00\x08p@'
      b'\x10\x02*\r\n\x0b\n\x04v/22\x15\x00\x00\x80A\x8f\xa3\xb6\x88')
  ours = (metrics._record(metrics._version_event(256.5))
          + metrics._record(metrics._scalar_event(256.5, 1, {"v/1": 1.5}))
          + metrics._record(metrics._scalar_event(256.5, 2, {"v/22": 16.0})))
  assert ours == written


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


def test_tensorboard_file_holds_exactly_the_written_scalars(tmp_path):
  rng = np.random.default_rng(0)
  written = [(step, {"train/loss": float(rng.normal()), "lr": float(rng.uniform(0, 1e-3)),
                     "tokens/s": 123456.789, "nan": math.nan})
             for step in [0, 1, 5, 2**40]]
  with metrics.MetricsWriter(tmp_path) as writer:
    for step, scalars in written:
      writer.write(step, scalars)
  event_file, = (tmp_path / "tensorboard").iterdir()
  assert event_file.name.startswith("events.out.tfevents.")
  expected = [(step, tag, float(np.float32(value)))
              for step, scalars in written for tag, value in scalars.items()]
  got = metrics.read_tensorboard_scalars(event_file)
  assert len(got) == len(expected)
  for (step, tag, value), want in zip(got, expected):
    assert (step, tag) == want[:2]
    assert value == want[2] or (math.isnan(value) and math.isnan(want[2]))


def test_tensorboard_reader_checks_crcs(tmp_path):
  write_steps(tmp_path, [1])
  event_file, = (tmp_path / "tensorboard").iterdir()
  data = bytearray(event_file.read_bytes())
  data[-6] ^= 1  # inside the last record's float
  event_file.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="bad or truncated record data"):
    metrics.read_tensorboard_scalars(event_file)


def test_tensorboard_restart_marker_hides_the_orphaned_steps(tmp_path):
  write_steps(tmp_path, [1, 2, 3])
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  event_file.rename(event_file.with_name("events.out.tfevents.0.old"))  # sorts first
  write_steps(tmp_path, [3, 4], resume_step=2)
  scalars = metrics.read_tensorboard_scalars(tmp_path / "tensorboard")
  assert [(step, tag) for step, tag, _ in scalars] == [
      (1, "loss"), (1, "lr"), (2, "loss"), (2, "lr"), (3, "loss"), (3, "lr"), (4, "loss"),
      (4, "lr")]


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


def test_progress_bar_on_a_terminal_redraws_one_line():

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  stream, clock = Terminal(), FakeClock()
  bar = metrics.ProgressBar(4000, stream=stream, clock=clock)
  bar.update(0, loss=12.5, grad_norm=0.25)
  clock.now += 1.0
  bar.update(1, loss=1.0)
  bar.close()
  first = "step 0/4000 [....................]   0% | loss 12.5 | grad_norm 0.25 | eta --"
  second = "step 1/4000 [....................]   0% | loss 1 | eta 1h06m"
  # Padded with spaces over the tail of the longer line it replaces.
  assert stream.getvalue() == "\r" + first + "\r" + second.ljust(len(first)) + "\n"


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
def test_format_duration(seconds, text):
  assert metrics._format_duration(seconds) == text
