"""Checkpoints of a run: orbax for the train state, grain's handler for the data iterator.

A checkpoint of step s is `WORKDIR/checkpoints/s/{state,data}`; `restore` checks from the
metadata alone that it fits the config before reading any array.
"""

import inspect
import pathlib
import sys

import grain
import jax
import orbax.checkpoint as ocp


def manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """Keeps the latest `keep` checkpoints of `workdir` (absolute), saving asynchronously."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


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


def hide_abandoned_restore_reads() -> None:
  """A restore that fails on one array (a damaged file) leaves orbax's other reads in
  flight. As each ends it reports to the event loop orbax has closed (RuntimeError), or dies
  as a coroutine nobody awaits, and Python prints each as a traceback: dozens of them around
  the one line that says what is wrong. These two kinds alone are dropped."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(kind, value, tb):
    if not (kind is RuntimeError and str(value) == "Event loop is closed"):
      excepthook(kind, value, tb)

  def on_unraisable(info):
    if not (inspect.iscoroutine(info.object) and isinstance(info.exc_value, Exception)):
      unraisablehook(info)

  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
