"""checkpoint.py's stderr filter for the tracebacks of orbax's abandoned restore reads (the
restores themselves are tested through the CLI in test_reliability.py)."""

import io
import sys
import threading

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
