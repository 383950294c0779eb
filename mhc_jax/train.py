"""Training loop: gin-configured, SPMD over a (data, fsdp, tensor) mesh, resumable.

    mhc-train --gin_file gin_configs/shakespeare_tiny.gin --workdir workdirs/tiny
    python -m mhc_jax.train --gin_file ... --gin_param 'ModelConfig.residual = "mhc"' --workdir ...

Writes into WORKDIR: `checkpoints/` (orbax: params, optimizer state, step, grain iterator),
`metrics.jsonl` and `tensorboard/` (see `metrics.py`), `config.gin` (the bindings in force),
`schedule.json` (what defines the learning-rate schedule), and once all `LoopConfig.steps` are
done, `finished.json` (the last logged metrics).
Started again on the same WORKDIR it resumes from the latest complete checkpoint; once finished,
it says so and does nothing.
SIGTERM / SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and exit 0.
"""

import argparse
import inspect
import json
import logging
import os
import pathlib
import re
import signal
import sys
import threading
import time

import gin
import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from mhc_jax.attention import check_platform
from mhc_jax.data import Corpus, DataConfig
from mhc_jax.flops import model_flops_per_token, peak_flops_per_device, throughput
from mhc_jax.generate import sample_text
from mhc_jax.metrics import MetricsWriter, ProgressBar
from mhc_jax.model import DTYPES, ModelConfig
from mhc_jax.optim import OptimizerConfig
from mhc_jax.sharding import MeshConfig
from mhc_jax.trainer import LoopConfig, Trainer, nonfinite_kinds

FINISHED = "finished.json"
SCHEDULE = "schedule.json"
DEFAULT_GIN_FILE = "shakespeare_tiny.gin"
GIN_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
# gin-aware constructors: a binding like `ModelConfig.d_model = 64` takes effect through these
# whether or not a config file also says `train.model = @ModelConfig()`.
_CONFIGURED = {cls: gin.external_configurable(cls, module="mhc_jax")
               for cls in (ModelConfig, DataConfig, OptimizerConfig, MeshConfig, LoopConfig)}


class NonFiniteError(RuntimeError):
  """A step produced a NaN or Inf and the policy is to stop."""


class _StopRequests:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"  # one per process: hosts share workdirs
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise ValueError(f"workdir {workdir} is not writable: {err.strerror}") from None


def _check_checkpoint_fits(step_dir: pathlib.Path, abstract_state) -> None:
  """Raises naming the first array the checkpoint lays out otherwise than this config, from
  its metadata alone: a restore that fails part way leaves reads in flight, which print
  tracebacks as the process exits."""
  handler = ocp.StandardCheckpointHandler()
  try:
    stored = {leaf.name: leaf for leaf in jax.tree.leaves(handler.metadata(step_dir / "state"))}
  finally:
    handler.close()
  # orbax's names: dict keys, list indices and field names joined by dots
  wanted = {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                     for k in path): leaf
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


def _check_guard(state, policy: str, reported: int, last_saved: int) -> int:
  """Raises (policy "stop") or warns (policy "skip") about non-finite steps; -> skips seen."""
  guard = jax.device_get(state["guard"])
  skipped = int(guard["skipped"])
  if skipped == reported:
    return skipped
  what = " and ".join(nonfinite_kinds(int(guard["first_kind"])))
  first = int(guard["first_step"])
  if policy == "stop":
    raise NonFiniteError(f"non-finite {what} at step {first}; that update was not applied and "
                         f"nothing after it was saved (last checkpoint: step {last_saved})")
  print(f"mhc-train: skipped {skipped} update(s) with non-finite values so far (first at step "
        f"{first}: {what})", file=sys.stderr, flush=True)
  return skipped


@gin.configurable
def train(workdir: str,
          model: ModelConfig | None = None,
          data: DataConfig | None = None,
          optimizer: OptimizerConfig | None = None,
          mesh: MeshConfig | None = None,
          loop: LoopConfig | None = None,
          devices=None,
          progress: bool = True,
          stop_after_step: int | None = None,
          sample_tokens: int = 200,
          sample_prompt: str = "ROMEO.\n") -> list[dict]:
  """Trains (or resumes) in `workdir`; returns this call's logged metrics.

  `stop_after_step` ends this invocation early, with a checkpoint, as a job with a time
  limit would; the schedule still spans `loop.steps`, so a later call continues exactly.
  At the end, `sample_tokens` bytes continuing `sample_prompt` are printed (0: none).
  A config not given is built from the gin bindings in force (defaults without gin).
  """
  model = model or _CONFIGURED[ModelConfig]()
  data = data or _CONFIGURED[DataConfig]()
  optimizer = optimizer or _CONFIGURED[OptimizerConfig]()
  mesh = mesh or _CONFIGURED[MeshConfig]()
  loop = loop or _CONFIGURED[LoopConfig]()
  workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
  lead = jax.process_index() == 0
  # Before anything is written or compiled: one line if the platform cannot run it.
  check_platform(model.attention_for(data.seq_len), DTYPES[model.dtype], data.seq_len)
  _check_workdir(workdir)
  corpus = Corpus(data)
  trainer = Trainer(model, optimizer, mesh, loop, data.batch_size, devices)
  flops_per_token = model_flops_per_token(model, data.seq_len)
  peak_flops = peak_flops_per_device(trainer.mesh.devices.flat[0].device_kind)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = corpus.train_iterator(**shard)
  manager = _checkpoint_manager(workdir, loop.keep_checkpoints)
  start = manager.latest_step() or 0
  if start:
    try:
      _check_checkpoint_fits(workdir / "checkpoints" / str(start), trainer.abstract_state)
      restored = manager.restore(start, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(trainer.abstract_state),
          data=grain.checkpoint.CheckpointRestore(train_iter)))
    except Exception as err:  # orbax raises many types for a checkpoint that does not fit
      raise ValueError(f"cannot restore the checkpoint of step {start} in {workdir / 'checkpoints'}"
                       f" with this config (another model, or a damaged file): "
                       f"{str(err).strip().splitlines()[0][:300]}") from None
    state = restored.state
  else:
    state = trainer.init_state()
  # Only now: a finished run whose config no longer fits its checkpoint, or whose checkpoint
  # is damaged, must still say so rather than report success. Finished means the marker and
  # a checkpoint of the last step: with that checkpoint removed, the run redoes the step.
  done = _finished_step(workdir)
  if done is not None and done >= loop.steps and start >= loop.steps:
    manager.close()
    if lead:
      print(f"mhc-train: {workdir} is finished ({done} steps); nothing to do",
            file=sys.stderr, flush=True)
    return []
  if lead:
    _record_schedule(workdir, optimizer, loop, resuming=bool(start))
  has_validation = len(corpus.validation_batches(1, **shard)) > 0
  if lead and not has_validation:
    print("mhc-train: no validation data (too few or too short held-out documents): "
          "eval_loss is not computed", file=sys.stderr, flush=True)
  if lead:
    (workdir / "config.gin").write_text(gin.config_str())
    print(f"{model.residual} (n={model.num_streams if model.uses_streams else 1}): "
          f"{trainer.num_params:,} parameters; {flops_per_token / 1e9:.3g} GFLOP/token; "
          f"mesh {dict(trainer.mesh.shape)}; "
          + (f"resuming at step {start}" if start else "starting from scratch"), flush=True)

  writer = MetricsWriter(workdir, resume_step=start) if lead else None
  bar = ProgressBar(loop.steps) if progress and lead else None
  history, tokens_per_step = [], data.batch_size * data.seq_len
  last_time, last_step, last_saved = time.perf_counter(), start, start
  reported = int(jax.device_get(state["guard"]["skipped"]))
  last = loop.steps if stop_after_step is None else min(stop_after_step, loop.steps)

  def save(step):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))

  with _StopRequests() as stop:
    for step in range(start + 1, last + 1):
      diagnostics = loop.diagnostics_every and step % loop.diagnostics_every == 0
      state, metrics = trainer.train_step(state, trainer.global_batch(next(train_iter)),
                                          diagnostics=bool(diagnostics))
      # Read once: a signal that lands later in this iteration (most do, while it waits on
      # the device) must not skip the save below and then break; it stops the next one.
      stopping = stop.signal_name is not None
      final = step == last or stopping
      logs = step % loop.log_every == 0 or step % loop.eval_every == 0 or diagnostics or final
      saves = step % loop.checkpoint_every == 0 or final
      if logs or saves:
        try:
          reported = _check_guard(state, loop.nonfinite, reported, last_saved)
        except NonFiniteError:  # names last_saved as the checkpoint: let its save finish
          manager.wait_until_finished()
          raise
      if logs:
        row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        now = time.perf_counter()
        row["tokens_per_sec"] = tokens_per_step * (step - last_step) / (now - last_time)
        row.update(throughput(flops_per_token, row["tokens_per_sec"], trainer.mesh.size,
                              peak_flops))
        last_time, last_step = now, step
        if (step % loop.eval_every == 0 or step == loop.steps) and has_validation:
          row["eval_loss"] = trainer.evaluate(
              state["params"], corpus.validation_batches(loop.eval_batches, **shard))
        history.append(row)
        if writer:
          writer.write(step, {k: v for k, v in row.items() if k != "step"})
        if bar:
          bar.update(step, **{k: row[k] for k in ("train_loss", "eval_loss", "tokens_per_sec")
                              if k in row})
      if saves:
        save(step)
        last_saved = step
      if stopping:
        break
    manager.wait_until_finished()
  manager.close()
  if bar:
    bar.close()
  if writer:
    writer.close()
  if stop.signal_name is not None:
    if lead:
      print(f"mhc-train: {stop.signal_name} received; saved the checkpoint of step {last_saved} "
            f"in {workdir / 'checkpoints'}; run the same command to resume", file=sys.stderr,
            flush=True)
    return history
  if lead:
    (workdir / "config.gin").write_text(gin.operative_config_str())
    if last == loop.steps and history:  # the marker sweeps and reports use to skip runs
      (workdir / FINISHED).write_text(json.dumps(history[-1]))
    if sample_tokens and last == loop.steps:
      model_ = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
      text = sample_text(model_, sample_prompt, num_tokens=sample_tokens, context=data.seq_len)
      print(f"sample after {last} steps:\n{text}", flush=True)
  return history


def _finished_step(workdir: pathlib.Path) -> int | None:
  """The step `finished.json` records, or None while the run has not finished."""
  path = workdir / FINISHED
  if not path.exists():
    return None
  try:
    return int(json.loads(path.read_text())["step"])
  except (ValueError, KeyError, TypeError) as err:
    raise ValueError(f"{path} is damaged ({type(err).__name__}: {err}); delete it to resume "
                     f"the run") from None


def _record_schedule(workdir: pathlib.Path, optimizer: OptimizerConfig, loop: LoopConfig,
                     resuming: bool) -> None:
  """Warns when a resumed run's schedule differs from the previous start's, then records
  this one. A JSON of its own, not `config.gin`: that file is rewritten at every start and
  misses configs passed to `train` directly."""
  now = {"LoopConfig.steps": loop.steps,
         **{f"OptimizerConfig.{name}": getattr(optimizer, name)
            for name in ("learning_rate", "warmup_steps", "schedule", "final_lr_ratio")}}
  path = workdir / SCHEDULE
  if resuming and path.exists():
    before = json.loads(path.read_text())
    changed = [f"{name} {before[name]!r} -> {value!r}" for name, value in now.items()
               if name in before and before[name] != value]
    if changed:
      print(f"mhc-train: warning: the learning-rate schedule changes on resume "
            f"({', '.join(changed)})", file=sys.stderr, flush=True)
  # Whole or not at all: a half-written file would stop every later resume.
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(now))
  tmp.replace(path)


def _presets() -> str:
  names = sorted(str(path.relative_to(GIN_CONFIG_DIR)) for path in GIN_CONFIG_DIR.rglob("*.gin"))
  return "\n".join(f"  {name}" for name in names)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="mhc-train", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"presets in gin_configs/ (name them relative to it; residual/ ones add a variant "
             f"to a run,\ncompare/ and sweeps/ ones configure experiments/compare_residuals.py "
             f"and experiments/sweep.py):\n{_presets()}")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable); looked up in gin_configs/ too "
                           f"(default: {DEFAULT_GIN_FILE})")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. 'ModelConfig.residual = \"mhc\"' (repeatable)")
  parser.add_argument("--workdir", required=True,
                      help="holds the run: checkpoints, metrics, config.gin, finished.json; "
                           "re-running on it resumes from the latest checkpoint, and does "
                           "nothing once the run has finished")
  return parser.parse_args(argv)


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


def _quote_hint(err: BaseException, item: str) -> str | None:
  """For gin's error on a bare word (`= mhc`), nearly always a string left unquoted: says so,
  with the binding quoted where `item` is one."""
  match = re.search(r"<ast\.Name object .*Failed to parse token '(\w+)'", str(err), re.S)
  if not isinstance(err, SyntaxError) or match is None:
    return None
  word = match.group(1)
  fixed, found = re.subn(rf"=\s*{word}\b", f'= "{word}"', item, count=1)
  example = fixed if found else f'"{word}"'
  return f"{word!r} is not a value gin can read; strings need quotes, e.g. {example}"


def use_gin_config_dir() -> None:
  """Lets gin files and their includes be named relative to `gin_configs/`."""
  if GIN_CONFIG_DIR.is_dir():
    gin.add_config_file_search_path(str(GIN_CONFIG_DIR))
  # gin's package-resource reader logs an error for every file it later finds on the search
  # path; a file found nowhere still raises, so nothing is lost by hiding these.
  logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Path not found"))


def _hide_abandoned_restore_reads() -> None:
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


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  use_gin_config_dir()
  # Without a file gin would leave the 6M-parameter ModelConfig defaults: far too slow for a
  # first try on a CPU, and nothing the user chose.
  default = not args.gin_file
  if default:
    args.gin_file = [DEFAULT_GIN_FILE]
  # One at a time, so the message names the file or binding at fault.
  for kind, items, parse in (("file", args.gin_file, gin.parse_config_file),
                             ("binding", args.gin_param, gin.parse_config)):
    for item in items:
      try:
        parse(item)
      except Exception as err:  # gin raises many types; every one means a bad config
        why = _quote_hint(err, item) or _one_line(err)
        print(f"mhc-train: bad gin {kind} {item!r}: {why}", file=sys.stderr)
        return 2
  if default:  # after parsing, so a bad binding still reads as one line
    print(f"mhc-train: no --gin_file given: using {DEFAULT_GIN_FILE}", file=sys.stderr,
          flush=True)
  _hide_abandoned_restore_reads()
  try:
    train(args.workdir)
  except ValueError as err:
    print(f"mhc-train: {_one_line(err)}", file=sys.stderr)
    return 2
  except NonFiniteError as err:  # first line only: gin appends where it was called from
    print(f"mhc-train: {str(err).splitlines()[0]}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
