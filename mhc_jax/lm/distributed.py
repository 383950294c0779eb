"""Several processes training one run (`--multihost`): starting them, and leaving at once
when one of them dies.

When a process dies, the others' next collective fails within a fraction of a second. Left
alone, the error then ends the process the normal way, and that way runs
`jax.distributed.shutdown()`, whose barrier waits until the coordination service gives the
dead process up (a heartbeat timeout) and then aborts with a C++ stack trace. `exit_if_peer_lost`
turns that error into one line on stderr and exit code `PEER_LOST` instead, so a job manager
restarts the slice at once; the restart resumes from the latest checkpoint.
"""

import argparse
import contextlib
import os
import pathlib
import re
import sys

import jax

from mhc_jax.checks import one_line
from mhc_jax.lm import checkpoint

PEER_LOST = 3  # the exit code: distinct from bad input (2), so a job manager can just restart

# How long the coordination service waits for a silent process before declaring it dead (and
# aborting the others). Heartbeats come from a C++ thread, so a host busy compiling or stuck
# in Python still sends them; 30 s instead of JAX's 100 s bounds the wait where no collective
# fails to tell (a process that hangs instead of dying, or one that dies during a checkpoint).
HEARTBEAT_TIMEOUT_S = 30
# How long a finished process waits at exit for the others to finish too. Process 0 alone
# writes the run's records and samples text after the last step (compare_residuals: the whole
# report), so this is generous; a process that died meanwhile is found by the heartbeat.
SHUTDOWN_TIMEOUT_S = 300

# An XLA status naming a failed collective transport or the coordination service:
# "UNKNOWN: Gloo all-reduce failed: [...] Read error [127.0.0.1]:36589: Connection reset by peer".
# Errors of a bad config or a damaged file name neither.
_PEER_LOST_ERROR = re.compile(
    r"\b(UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|CANCELLED|DATA_LOSS): .*"
    r"(gloo|nccl|connection (reset|refused|closed)|broken pipe|socket closed|heartbeat"
    r"|coordination ?service|unhealthy|barrier)", re.IGNORECASE | re.DOTALL)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags of the commands every host of a pod runs (`mhc-train`, the sweep)."""
  group = parser.add_argument_group("multi-host (every host runs the same command)")
  group.add_argument("--multihost", action="store_true",
                     help="call jax.distributed.initialize() first: auto-detected on TPU pods "
                          "(and SLURM), or from the three flags below; WORKDIR / OUT must then "
                          f"be storage every host sees; exit {PEER_LOST} when another process "
                          "dies (rerun all of them to resume)")
  group.add_argument("--coordinator", help="host:port of process 0 (not needed on TPU pods)")
  group.add_argument("--num_processes", type=int, help="with --coordinator")
  group.add_argument("--process_id", type=int, help="with --coordinator: 0 .. num_processes-1")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Rejects (exit 2) the flags that would otherwise fail in JAX's cluster detection."""
  given = [args.coordinator is not None, args.num_processes is not None,
           args.process_id is not None]
  if any(given) and not args.multihost:
    parser.error("--coordinator, --num_processes and --process_id go with --multihost")
  if any(given) and not all(given):
    parser.error("--coordinator, --num_processes and --process_id go together")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """`jax.distributed.initialize` with this module's timeouts; with a coordinator, also CPU
  collectives across processes (gloo), which accelerators ignore. Before any backend starts."""
  if coordinator:
    # Asking which platform runs would start the backend, too early: set it unconditionally.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)


def is_peer_lost(err: BaseException) -> bool:
  """Whether `err` (or an error it was raised from) says another process is gone. JAX raises
  these as ValueError or JaxRuntimeError; orbax and the data loader may wrap them."""
  while err is not None:
    if isinstance(err, (RuntimeError, ValueError)) and _PEER_LOST_ERROR.search(str(err)):
      return True
    err = err.__cause__ or err.__context__
  return False


def peer_lost_message(err: BaseException, step: int | None) -> str:
  detail = one_line(err, limit=300, with_type=False)
  rerun = (f"rerun to resume from step {step}" if step is not None
           else "rerun to start again (no checkpoint yet)")
  return f"lost contact with another process ({detail}): exiting so the job can restart; {rerun}"


@contextlib.contextmanager
def exit_if_peer_lost(workdir, prog: str):
  """Around training in `workdir` with several processes: an error saying another process is
  gone prints one line and ends this one with `PEER_LOST` at once. `os._exit`, because the
  normal exit waits in JAX's shutdown barrier for the dead process (see the module doc)."""
  try:
    yield
  except Exception as err:
    if jax.process_count() == 1 or not is_peer_lost(err):
      raise
    # From the folder alone: a checkpoint manager would wait on the lost process.
    step = checkpoint.latest_step(pathlib.Path(workdir).absolute())
    print(f"{prog}: {peer_lost_message(err, step)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(PEER_LOST)
