"""Checkpoints of a run: orbax for the train state, grain's handler for the data iterator.

A checkpoint of step s is `WORKDIR/checkpoints/s/{state,data}`; `restore` checks from the
metadata alone that it fits the config before reading any array; a failed write (a full
disk) is one line, and leaves only complete checkpoints behind.
"""

import contextlib
import inspect
import logging
import os
import pathlib
import re
import shlex
import shutil
import sys
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes step s here, then renames it to s


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints of `workdir` (absolute), saving asynchronously."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / CHECKPOINTS, options=options)


def latest_step(workdir: pathlib.Path) -> int | None:
  """The step of `workdir`'s latest complete checkpoint, None without one. Reads only: a
  manager would create the folder."""
  return max(ocp.utils.checkpoint_steps(workdir / CHECKPOINTS), default=None)


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  """Starts writing the checkpoint of `step` in the background, once the previous one is
  written; `CheckpointWriteError` if that one, or this one's start, failed."""
  with _failed_writes_in_one_line(checkpoints):
    checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))


def wait(checkpoints: ocp.CheckpointManager) -> None:
  """Returns once the checkpoint being written is complete; `CheckpointWriteError` if its
  write failed."""
  with _failed_writes_in_one_line(checkpoints):
    checkpoints.wait_until_finished()


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, an I/O error); the message is one line
  saying what failed, where, the space left and how to resume."""


@contextlib.contextmanager
def _failed_writes_in_one_line(checkpoints: ocp.CheckpointManager):
  """A write that fails for a reason of the operating system (ENOSPC, EIO, ...) is raised as
  one `CheckpointWriteError`, after the failed step's temporary directory is removed: what is
  left is the complete checkpoints, the newest of which a rerun resumes from."""
  try:
    yield
  except Exception as err:
    code = _os_error_code(err)
    if code is None:
      raise
    directory = pathlib.Path(checkpoints.directory)
    failed = sorted(int(path.name.removesuffix(TMP_SUFFIX))
                    for path in directory.glob(f"*{TMP_SUFFIX}"))
    for step in failed:
      shutil.rmtree(directory / f"{step}{TMP_SUFFIX}", ignore_errors=True)
    complete = max(ocp.utils.checkpoint_steps(directory), default=None)
    resume = ("to resume from step %d" % complete if complete is not None
              else "to start again (no complete checkpoint)")
    free = shutil.disk_usage(directory).free
    what = f"the checkpoint of step {failed[-1]}" if failed else "a checkpoint"
    raise CheckpointWriteError(code, (
        f"cannot write {what} in {directory}: {os.strerror(code)} ({free / 2**20:.1f} MiB "
        f"free there); partial checkpoints removed: free space and rerun the same command "
        f"{resume}")) from None


def hide_logged_write_failures() -> None:
  """orbax logs a failed write with its traceback from every thread and task it passed
  through, as it happens (hundreds of lines before the one that says what went wrong); `save`
  and `wait` raise the same failure as `CheckpointWriteError`. These records alone, those
  whose exception carries an OS error code, are dropped from orbax's (absl) and asyncio's
  loggers."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if _drop_os_error_records not in logger.filters:
      logger.addFilter(_drop_os_error_records)


def _drop_os_error_records(record: logging.LogRecord) -> bool:
  return not (record.exc_info and _os_error_code(record.exc_info[1]) is not None)


def _os_error_code(err: BaseException | None) -> int | None:
  """The errno behind a failed write: of an OSError, or as tensorstore writes it into the
  message of the ValueError orbax raises (`[os_error_code='28']`); None for other errors."""
  while err is not None:
    if isinstance(err, OSError) and err.errno:
      return err.errno
    match = re.search(r"os_error_code='(\d+)'", str(err))
    if match:
      return int(match.group(1))
    err = err.__cause__ or err.__context__
  return None


TREE_METADATA = "the metadata of its train state (state/_METADATA)"


def restore(checkpoints: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
  """The train state of `step` (the iterator is restored in place); one-line ValueError when
  the checkpoint does not fit `abstract_state`, or when it is damaged: then the line names
  the part that cannot be read and how to resume from the checkpoint before it."""
  directory = pathlib.Path(checkpoints.directory)
  step_dir = directory / str(step)
  part = TREE_METADATA
  try:
    check_fits(step_dir, abstract_state)
    part = "its train state (state/)"
    state = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state))).state
    part = "its data iterator's position (data/)"
    checkpoints.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
  except Mismatch as err:
    raise ValueError(f"cannot restore the checkpoint of step {step} in {directory} with this "
                     f"config: {err}") from None
  except Exception:  # of many types, their text full of tensorstore's specs: words instead
    earlier = _step_before(directory, step)
    then = f"resume from step {earlier}" if earlier is not None else "start from scratch"
    raise _damaged(step_dir, part, _delete_and_rerun(step_dir, then)) from None
  return state


def restore_params(workdir: pathlib.Path, step: int, abstract_params: dict) -> dict:
  """The `params` of the train state saved at `step` in `workdir` (absolute), as numpy
  arrays laid out as `abstract_params` (a pure dict of shapes and dtypes); the optimizer
  state and the data iterator are not read. One-line ValueError when they do not fit, or
  when they cannot be read."""
  step_dir = workdir / CHECKPOINTS / str(step)
  wanted = {"params": abstract_params}
  part = TREE_METADATA
  try:
    check_fits(step_dir, wanted)
    part = "its parameters (state/)"
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
          item=wanted, restore_args=restore_args, partial_restore=True))
  except Mismatch as err:
    raise ValueError(f"the checkpoint of step {step} in {workdir} does not fit the model its "
                     f"config.json describes: {err}") from None
  except Exception:  # of many types, their text full of tensorstore's specs: words instead
    earlier = _step_before(workdir / CHECKPOINTS, step)
    way_out = (_delete_and_rerun(step_dir, f"start from its step {earlier}") if earlier is not None
               else ", and it is the only one: start from another workdir")
    raise _damaged(step_dir, part, way_out) from None
  return restored["params"]


def _step_before(directory: pathlib.Path, step: int) -> int | None:
  """The latest complete checkpoint in `directory` before `step`; None without one."""
  return max((s for s in ocp.utils.checkpoint_steps(directory) if s < step), default=None)


def _damaged(step_dir: pathlib.Path, part: str, way_out: str) -> ValueError:
  return ValueError(f"the checkpoint of step {step_dir.name} in {step_dir.parent} is damaged: "
                    f"{part} cannot be read{way_out}")


def _delete_and_rerun(step_dir: pathlib.Path, then: str) -> str:
  """The way out of a damaged checkpoint when one precedes it: a person deletes it, not the
  run (docs/reliability.md says why)."""
  return f"; rm -r {shlex.quote(str(step_dir))} and rerun the same command to {then}"


class Mismatch(ValueError):
  """A checkpoint lays out its arrays otherwise than the config asks: another model."""


def check_fits(step_dir: pathlib.Path, abstract_state) -> None:
  """Raises `Mismatch` naming the first array the checkpoint lays out otherwise than this
  config, from its metadata alone: a restore that fails part way leaves reads in flight,
  which print tracebacks as the process exits. Metadata that cannot be read raises what
  orbax raises."""
  handler = ocp.StandardCheckpointHandler()
  try:
    stored = {leaf.name: leaf for leaf in jax.tree.leaves(handler.metadata(step_dir / "state"))}
  finally:
    handler.close()
  wanted = {jax.tree_util.keystr(path, simple=True, separator="."): leaf  # orbax's names
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  unrolled = [any(name.startswith("params.blocks.0.") for name in names)
              for names in (stored, wanted)]
  if unrolled[0] != unrolled[1]:
    layout = {True: "unrolled", False: "scanned"}
    raise Mismatch(f"it holds {layout[unrolled[0]]} layers, this config has "
                   f"{layout[unrolled[1]]} ones: set ModelConfig.scan_layers = "
                   f"{not unrolled[0]} to resume it")
  for name in sorted(wanted, key=lambda name: not name.startswith("params.")):  # clearest first
    want, have = wanted[name], stored.get(name)
    if have is None or tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
      held = "nothing" if have is None else f"{have.dtype}{list(have.shape)}"
      raise Mismatch(f"it holds {held} for {name}, this config needs "
                     f"{want.dtype}{list(want.shape)}")


CLOSED_LOOP = "RuntimeError: Event loop is closed"


def hide_abandoned_restore_reads() -> None:
  """A restore that fails on one array (a damaged file) leaves orbax's other reads in
  flight. As each ends it reports to the event loop orbax has closed (RuntimeError), or dies
  as a coroutine nobody awaits, and Python prints each as a traceback: dozens of them around
  the one line that says what is wrong, or, when its task is collected first, as asyncio's
  "Task exception was never retrieved". These kinds alone are dropped: the first from
  sys.stderr, whichever hook or native thread prints it, the second in the unraisable hook,
  the third from the asyncio logger (only orbax runs an event loop in these commands)."""
  unraisablehook = sys.unraisablehook
  if _unretrieved_task_exception not in logging.getLogger("asyncio").filters:
    logging.getLogger("asyncio").addFilter(_unretrieved_task_exception)

  def on_unraisable(info):
    if not (inspect.iscoroutine(info.object) and isinstance(info.exc_value, Exception)):
      unraisablehook(info)

  sys.unraisablehook = on_unraisable
  if not isinstance(sys.stderr, ClosedLoopTracebackFilter):
    sys.stderr = ClosedLoopTracebackFilter(sys.stderr)


def _unretrieved_task_exception(record: logging.LogRecord) -> bool:
  """False (drop) for asyncio's report of a collected task whose exception was never read."""
  return not record.getMessage().startswith("Task exception was never retrieved")


class ClosedLoopTracebackFilter:
  """A text stream passing everything to `stream` except tracebacks whose exception line is
  "RuntimeError: Event loop is closed". A traceback is held, per thread (the abandoned reads
  print theirs concurrently), from its "Traceback (most recent call last):" line until its
  first unindented line decides; all other text passes at once."""

  def __init__(self, stream):
    self._stream = stream
    self._held = {}  # thread id -> text of the traceback being printed

  def write(self, text: str) -> int:
    thread = threading.get_ident()
    held = self._held.pop(thread, None)
    if held is None and not text.startswith("Traceback (most recent call last):"):
      return self._stream.write(text)
    held = (held or "") + text
    lines = held.split("\n")
    for i, line in enumerate(lines[1:-1], 1):  # complete lines after the header
      if line and not line[0].isspace():
        if line != CLOSED_LOOP:
          self._stream.write(held)
        elif lines[i + 1:] != [""]:
          self._stream.write("\n".join(lines[i + 1:]))
        return len(text)
    self._held[thread] = held
    return len(text)

  def __getattr__(self, name):  # flush, fileno, isatty, encoding, ...
    return getattr(self._stream, name)
