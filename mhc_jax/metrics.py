"""Training metrics: a JSON-lines log, TensorBoard event files and a console progress bar.

`MetricsWriter` appends every write to two places under the workdir:

  metrics.jsonl      one JSON object a line, `{"step": 120, "train_loss": 3.214, ...}`;
                     non-finite values are the strings "nan", "inf", "-inf" (bare NaN is
                     not JSON), and `read_metrics` turns them back into floats.
  tensorboard/       `events.out.tfevents.<time>.<hostname>`, TFRecord-framed `Event`
                     protobufs holding `simple_value` (float32) scalars, encoded here by
                     hand so that no TensorFlow, TensorBoard or protobuf package is needed.

Create it on one process only: two writers appending to one workdir interleave their lines.
"""

import json
import math
import numbers
import operator
import os
import pathlib
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_EVENT_FILE_PREFIX = "events.out.tfevents."


class MetricsWriter:
  """Appends scalars to `WORKDIR/metrics.jsonl` and to a TensorBoard event file.

  Every jsonl line is flushed and fsync'd before `write` returns, so a killed run keeps all
  it wrote. A line torn by such a kill is dropped when the next writer opens the file.

  resume_step: the step of the checkpoint a restarted run resumes from. Lines with a larger
    step are dropped (the run will write those steps again), and the new event file starts
    with a restart marker at `resume_step + 1`, which makes TensorBoard's event
    accumulator discard the old file's later steps. None appends to what is there.
  """

  def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
    resume_step = None if resume_step is None else operator.index(resume_step)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / METRICS_FILE
    _keep_complete_lines(self._path, resume_step)
    self._jsonl = open(self._path, "a", encoding="utf-8")
    self._events = _EventFile(workdir / TENSORBOARD_DIR)
    if resume_step is not None:
      self._events.write_restart(resume_step + 1)

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
    self._events.write_scalars(step, values)

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


def read_tensorboard_scalars(path: str | os.PathLike) -> list[tuple[int, str, float]]:
  """`(step, tag, value)` of the scalars in an event file, or in a directory's event files
  in name (= creation time) order, checking every CRC. Applies restart markers as
  TensorBoard does: a restart at step s discards the scalars read so far with step >= s."""
  path = pathlib.Path(path)
  files = sorted(path.glob(_EVENT_FILE_PREFIX + "*")) if path.is_dir() else [path]
  scalars = []
  for file in files:
    for record in _read_records(file.read_bytes()):
      step, restart, values = _decode_event(record)
      if restart:
        scalars = [s for s in scalars if s[0] < step]
      scalars.extend((step, tag, value) for tag, value in values)
  return scalars


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
    _replace_atomically(path, kept)


def _replace_atomically(path: pathlib.Path, data: bytes) -> None:
  # A kill part way through leaves either the old file or the new one, never a mix.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  dir_fd = os.open(path.parent, os.O_RDONLY)  # makes the rename itself survive a crash
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


# -- TensorBoard event files -----------------------------------------------------------------


class _EventFile:

  def __init__(self, logdir: pathlib.Path):
    logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    self.path = logdir / f"{_EVENT_FILE_PREFIX}{int(now)}.{socket.gethostname()}"
    # Append: a restart within the same second must not wipe the previous run's file.
    self._file = open(self.path, "ab")
    self._write(_version_event(now))

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    self._write(_scalar_event(time.time(), step, values))

  def write_restart(self, step: int) -> None:
    self._write(_restart_event(time.time(), step))

  def close(self) -> None:
    self._file.close()

  def _write(self, event: bytes) -> None:
    # Flushed (visible to TensorBoard) but not fsync'd: metrics.jsonl is the durable record.
    self._file.write(_record(event))
    self._file.flush()


def _version_event(wall_time: float) -> bytes:
  return _event(wall_time, 0, _bytes_field(3, b"brain.Event:2"))


def _scalar_event(wall_time: float, step: int, values: Mapping[str, float]) -> bytes:
  summary = b"".join(
      _bytes_field(1, _bytes_field(1, tag.encode()) + _float32_field(2, value))
      for tag, value in values.items())
  return _event(wall_time, step, _bytes_field(5, summary))


def _restart_event(wall_time: float, step: int) -> bytes:
  return _event(wall_time, step, _bytes_field(7, _varint_field(1, 1)))  # SessionLog START


def _event(wall_time: float, step: int, what: bytes) -> bytes:
  return _double_field(1, wall_time) + _varint_field(2, step) + what


# Protobuf wire format: a key varint (field number << 3 | wire type), then the value.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_UINT64 = (1 << 64) - 1


def _varint(value: int) -> bytes:
  value &= _UINT64  # negative int64s go out as their 10-byte two's complement
  out = bytearray()
  while value > 0x7F:
    out.append(value & 0x7F | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _varint_field(field: int, value: int) -> bytes:
  # proto3 leaves zero out, as protobuf's own encoder does, so the bytes match it exactly.
  return _key(field, _VARINT) + _varint(value) if value else b""


def _double_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


def _float32_field(field: int, value: float) -> bytes:
  try:
    packed = struct.pack("<f", value)
  except OverflowError:  # beyond float32's range: what a float32 cast would give
    packed = struct.pack("<f", math.copysign(math.inf, value))
  return _key(field, _FIXED32) + packed


def _bytes_field(field: int, payload: bytes) -> bytes:
  return _key(field, _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    if pos >= len(buf):
      raise ValueError("truncated varint")
    byte = buf[pos]
    value |= (byte & 0x7F) << shift
    pos, shift = pos + 1, shift + 7
    if not byte & 0x80:
      return value, pos


def _fields(buf: bytes):
  """Yields `(field number, value)`: an int for varints, the raw bytes otherwise."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value, pos = _read_varint(buf, pos)
    else:
      if wire_type == _LENGTH_DELIMITED:
        size, pos = _read_varint(buf, pos)
      elif wire_type in (_FIXED64, _FIXED32):
        size = 8 if wire_type == _FIXED64 else 4
      else:
        raise ValueError(f"unsupported wire type {wire_type}")
      if pos + size > len(buf):
        raise ValueError("truncated field")
      value, pos = buf[pos:pos + size], pos + size
    yield field, value


def _decode_event(event: bytes) -> tuple[int, bool, list[tuple[str, float]]]:
  """`(step, is a restart marker, [(tag, simple_value)])` of one `Event`."""
  step, restart, values = 0, False, []
  for field, value in _fields(event):
    if field == 2:
      step = value - (1 << 64) if value >> 63 else value
    elif field == 5:
      values.extend(_decode_summary_value(v) for f, v in _fields(value) if f == 1)
    elif field == 7:
      restart = dict(_fields(value)).get(1) == 1
  return step, restart, values


def _decode_summary_value(value: bytes) -> tuple[str, float]:
  fields = dict(_fields(value))
  return fields[1].decode(), struct.unpack("<f", fields[2])[0]


# TFRecord framing: uint64 length, masked CRC of those 8 bytes, data, masked CRC of data.


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc(header)) + data
          + struct.pack("<I", _masked_crc(data)))


def _read_records(data: bytes) -> list[bytes]:
  records, pos = [], 0
  while pos < len(data):
    header, header_crc = data[pos:pos + 8], data[pos + 8:pos + 12]
    if len(header_crc) < 4 or struct.unpack("<I", header_crc)[0] != _masked_crc(header):
      raise ValueError(f"bad or truncated record header at byte {pos}")
    (size,) = struct.unpack("<Q", header)
    start, end = pos + 12, pos + 12 + size
    record, crc = data[start:end], data[end:end + 4]
    if len(crc) < 4 or struct.unpack("<I", crc)[0] != _masked_crc(record):
      raise ValueError(f"bad or truncated record data at byte {start}")
    records.append(record)
    pos = end + 4
  return records


def _masked_crc(data: bytes) -> int:
  # TFRecord's mask: a CRC of data that itself holds CRCs is otherwise weak.
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli polynomial, reflected
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


# -- Progress bar ----------------------------------------------------------------------------

_BAR_WIDTH = 20


class ProgressBar:
  """One status line, `step 120/1000 [##......]  12% | train_loss 3.214 | eta 3m12s`.

  On a terminal the line is redrawn in place on every `update`. Elsewhere (a log file) each
  update that comes `min_interval_s` or more after the last printed one is printed as its own
  line, as are the first and the final step, and `close` prints the last update if it was held
  back. The ETA extrapolates the mean rate since the first update.

  stream: defaults to `sys.stderr` as it is when the bar is made (so test capture sees it).
  clock: monotonic seconds; replaceable for tests.
  """

  def __init__(self, total_steps: int, *, stream: TextIO | None = None,
               min_interval_s: float = 0.5, clock: Callable[[], float] = time.monotonic):
    if operator.index(total_steps) < 1:
      raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    self._total = total_steps
    self._stream = sys.stderr if stream is None else stream
    self._tty = self._stream.isatty()
    self._min_interval_s = min_interval_s
    self._clock = clock
    self._start = None  # (step, time) of the first update
    self._last_printed = -math.inf
    self._held_back = None  # the latest line, when it was not printed
    self._drawn = 0  # length of the line on screen (TTY)

  def update(self, step: int, **values: Any) -> None:
    step, now = operator.index(step), self._clock()
    if self._start is None:
      self._start = (step, now)
    line = self._line(step, now, values)
    if self._tty:
      # Pad over the tail of a longer line drawn before.
      self._stream.write("\r" + line.ljust(self._drawn))
      self._drawn = len(line)
    elif step >= self._total or now - self._last_printed >= self._min_interval_s:
      self._stream.write(line + "\n")
      self._last_printed, self._held_back = now, None
    else:
      self._held_back = line
    self._stream.flush()

  def close(self) -> None:
    if self._tty and self._drawn:
      self._stream.write("\n")
    elif self._held_back is not None:
      self._stream.write(self._held_back + "\n")
    self._drawn, self._held_back = 0, None
    self._stream.flush()

  def _line(self, step: int, now: float, values: Mapping[str, Any]) -> str:
    done = min(max(step, 0), self._total)  # integer division: 29/100 must not show 28%
    filled = done * _BAR_WIDTH // self._total
    parts = [f"step {step}/{self._total} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] "
             f"{done * 100 // self._total:3d}%"]
    parts += [f"{name} {_format_value(value)}" for name, value in values.items()]
    parts.append(f"eta {self._eta(step, now)}")
    return " | ".join(parts)

  def _eta(self, step: int, now: float) -> str:
    start_step, start_time = self._start
    done, elapsed = step - start_step, now - start_time
    if done <= 0 or elapsed <= 0:
      return "--"
    return _format_duration(max(self._total - step, 0) * elapsed / done)


def _format_value(value: Any) -> str:
  """4 significant digits; integers, and floats of 1000 or more, as grouped integers."""
  if isinstance(value, numbers.Integral):
    return f"{int(value):,}"
  value = float(value)
  if abs(value) >= 1000:  # throughputs: "12,345" reads better than "1.234e+04"
    return f"{value:,.0f}"
  return f"{value:.4g}"


def _format_duration(seconds: float) -> str:
  """`45s`, `3m12s`, `27h05m`."""
  seconds = round(seconds)
  if seconds < 60:
    return f"{seconds}s"
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f"{minutes}m{seconds:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m"
