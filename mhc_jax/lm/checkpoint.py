"""Checkpoints of a run: orbax for the train state, grain's handler for the data iterator.

A checkpoint of step s is `WORKDIR/checkpoints/s/{state,data}`; `restore` checks from the
metadata alone that it fits the config before reading any array.
"""

import inspect
import pathlib
import sys
import threading

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints of `workdir` (absolute), saving asynchronously."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / CHECKPOINTS, options=options)


def latest_step(workdir: pathlib.Path) -> int | None:
  """The step of `workdir`'s latest complete checkpoint, None without one. Reads only: a
  manager would create the folder."""
  return max(ocp.utils.checkpoint_steps(workdir / CHECKPOINTS), default=None)


def save(checkpoints: ocp.CheckpointManager, step: int, state, data_iterator) -> None:
  checkpoints.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))


def restore(checkpoints: ocp.CheckpointManager, step: int, abstract_state, data_iterator):
  """The train state of `step` (the iterator is restored in place); one-line ValueError when
  the checkpoint does not fit `abstract_state` or is damaged."""
  directory = checkpoints.directory
  try:
    check_fits(pathlib.Path(directory) / str(step), abstract_state)
    restored = checkpoints.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
  except Exception as err:  # orbax raises many types for a checkpoint that does not fit
    raise ValueError(f"cannot restore the checkpoint of step {step} in {directory} with this "
                     f"config (another model, or a damaged file): "
                     f"{str(err).strip().splitlines()[0][:300]}") from None
  return restored.state


def restore_params(workdir: pathlib.Path, step: int, abstract_params: dict) -> dict:
  """The `params` of the train state saved at `step` in `workdir` (absolute), as numpy
  arrays laid out as `abstract_params` (a pure dict of shapes and dtypes); the optimizer
  state and the data iterator are not read. One-line ValueError when they do not fit."""
  step_dir = workdir / CHECKPOINTS / str(step)
  wanted = {"params": abstract_params}
  try:
    check_fits(step_dir, wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
          item=wanted, restore_args=restore_args, partial_restore=True))
  except Exception as err:  # orbax raises many types for a checkpoint that does not fit
    raise ValueError(f"the checkpoint of step {step} in {workdir} does not fit the model its "
                     f"config.json describes: {str(err).strip().splitlines()[0][:300]}") from None
  return restored["params"]


def check_fits(step_dir: pathlib.Path, abstract_state) -> None:
  """Raises naming the first array the checkpoint lays out otherwise than this config, from
  its metadata alone: a restore that fails part way leaves reads in flight, which print
  tracebacks as the process exits."""
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
    raise ValueError(f"it holds {layout[unrolled[0]]} layers, this config has "
                     f"{layout[unrolled[1]]} ones: set ModelConfig.scan_layers = "
                     f"{not unrolled[0]} to resume it")
  for name in sorted(wanted, key=lambda name: not name.startswith("params.")):  # clearest first
    want, have = wanted[name], stored.get(name)
    if have is None or tuple(have.shape) != tuple(want.shape) or have.dtype != want.dtype:
      held = "nothing" if have is None else f"{have.dtype}{list(have.shape)}"
      raise ValueError(f"it holds {held} for {name}, this config needs "
                       f"{want.dtype}{list(want.shape)}")


CLOSED_LOOP = "RuntimeError: Event loop is closed"


def hide_abandoned_restore_reads() -> None:
  """A restore that fails on one array (a damaged file) leaves orbax's other reads in
  flight. As each ends it reports to the event loop orbax has closed (RuntimeError), or dies
  as a coroutine nobody awaits, and Python prints each as a traceback: dozens of them around
  the one line that says what is wrong. These two kinds alone are dropped: the first from
  sys.stderr, whichever hook or native thread prints it, the second in the unraisable hook."""
  unraisablehook = sys.unraisablehook

  def on_unraisable(info):
    if not (inspect.iscoroutine(info.object) and isinstance(info.exc_value, Exception)):
      unraisablehook(info)

  sys.unraisablehook = on_unraisable
  if not isinstance(sys.stderr, ClosedLoopTracebackFilter):
    sys.stderr = ClosedLoopTracebackFilter(sys.stderr)


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
