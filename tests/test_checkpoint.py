"""checkpoint.py's stderr filter for the tracebacks of orbax's abandoned restore reads, and
its one-line failed writes (restores and a real full disk are tested through the CLI in
test_reliability.py)."""

import errno
import gc
import io
import logging
import shutil
import sys
import threading

import pytest

from mhc_jax.lm import checkpoint
from mhc_jax.lm.checkpoint import ClosedLoopTracebackFilter, hide_abandoned_restore_reads

CLOSED = ("Traceback (most recent call last):\n",
          '  File "asyncio/base_events.py", line 806, in call_soon_threadsafe\n',
          "    self._check_closed()\n", "RuntimeError: Event loop is closed\n")
OTHER = ("Traceback (most recent call last):\n", '  File "x.py", line 1, in f\n',
         "ValueError: something else\n")


def test_drops_closed_loop_tracebacks_of_concurrent_threads_and_keeps_the_rest():
  out = io.StringIO()
  stderr = ClosedLoopTracebackFilter(out)
  barrier = threading.Barrier(4)

  def print_closed():
    for chunk in CLOSED:
      barrier.wait()  # interleave the four threads' chunks
      stderr.write(chunk)

  threads = [threading.Thread(target=print_closed) for _ in range(4)]
  for t in threads:
    t.start()
  stderr.write("mhc-train: ValueError: the one line\n")
  for t in threads:
    t.join()
  for chunk in OTHER:
    stderr.write(chunk)
  stderr.write("progress 10%\r")
  assert out.getvalue() == "mhc-train: ValueError: the one line\n" + "".join(OTHER) + \
      "progress 10%\r"


def test_a_traceback_in_one_write_and_text_after_it():
  out = io.StringIO()
  stderr = ClosedLoopTracebackFilter(out)
  stderr.write("".join(CLOSED) + "after\n")
  stderr.write("".join(OTHER))
  assert out.getvalue() == "after\n" + "".join(OTHER)
  assert stderr.getvalue() == out.getvalue()  # other attributes are the stream's


def test_installed_filter_drops_the_closed_loop_error_python_prints_itself(monkeypatch):
  out = io.StringIO()
  monkeypatch.setattr(sys, "stderr", out)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  hide_abandoned_restore_reads()
  for error in (RuntimeError("Event loop is closed"), KeyError("kept")):
    try:
      raise error
    except Exception:  # what Python does with an uncaught exception
      sys.excepthook(*sys.exc_info())
  printed = sys.stderr.getvalue()
  assert "Event loop is closed" not in printed and printed.endswith("KeyError: 'kept'\n")


def test_installed_filter_drops_asyncios_report_of_an_unretrieved_task_exception(caplog):
  import asyncio
  hide_abandoned_restore_reads()

  async def failing_read():
    raise ValueError("FAILED_PRECONDITION: Error reading \"params.embed/0.0\"")

  loop = asyncio.new_event_loop()
  task = loop.create_task(failing_read())
  loop.run_until_complete(asyncio.sleep(0))  # the task fails; nobody reads its exception
  loop.close()
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    del task
    gc.collect()  # asyncio reports the lost exception as the task is collected
    logging.getLogger("asyncio").error("Unclosed connection")  # other errors still pass
  assert [r.getMessage() for r in caplog.records] == ["Unclosed connection"]


# --- a failed write (the full disk itself is in test_reliability.py) ------------------------

# What tensorstore raises through orbax when a write hits a full disk (its text, shortened).
ENOSPC_FROM_ORBAX = ("RESOURCE_EXHAUSTED: Error writing \"params.embed/0\" in OCDBT database: "
                     "Failed to write 15697 bytes to file 8: No space left on device "
                     "[os_error_code='28']")


class FailingManager:
  """Starts step `step`'s temporary directory, then fails the way orbax does."""

  def __init__(self, directory, error):
    self.directory, self.error = directory, error

  def save(self, step, args):
    (self.directory / f"{step}{checkpoint.TMP_SUFFIX}" / "state").mkdir(parents=True)
    raise self.error


def test_a_failed_write_is_one_line_and_leaves_only_complete_checkpoints(tmp_path):
  (tmp_path / "4" / "state").mkdir(parents=True)  # a complete checkpoint stays as it is
  manager = FailingManager(tmp_path, ValueError(ENOSPC_FROM_ORBAX))
  with pytest.raises(checkpoint.CheckpointWriteError) as raised:
    checkpoint.save(manager, 6, state={}, data_iterator=None)
  assert raised.value.errno == errno.ENOSPC
  free = shutil.disk_usage(tmp_path).free / 2**20
  assert str(raised.value.strerror) == (
      f"cannot write the checkpoint of step 6 in {tmp_path}: No space left on device "
      f"({free:.1f} MiB free there); partial checkpoints removed: free space and rerun the "
      f"same command to resume from step 4")
  assert sorted(path.name for path in tmp_path.iterdir()) == ["4"]


def test_other_failures_pass_through_unchanged(tmp_path):
  error = ValueError("a checkpoint of another model")
  with pytest.raises(ValueError) as raised:
    checkpoint.save(FailingManager(tmp_path, error), 6, state={}, data_iterator=None)
  assert raised.value is error
  assert (tmp_path / f"6{checkpoint.TMP_SUFFIX}").exists()  # not ours to remove


def test_orbax_logged_write_failures_are_dropped_and_nothing_else(caplog):
  checkpoint.hide_logged_write_failures()
  logger = logging.getLogger("absl")
  for error in (ValueError(ENOSPC_FROM_ORBAX), OSError(errno.EIO, "I/O error"),
                ValueError("another failure")):
    try:
      raise error
    except Exception:
      logger.error("background save failed", exc_info=True)
  logger.error("a plain error")
  kept = [(record.getMessage(), record.exc_info and record.exc_info[1])
          for record in caplog.records]
  assert [(message, str(exc)) for message, exc in kept if exc] == [
      ("background save failed", "another failure")]
  assert ("a plain error", None) in kept
