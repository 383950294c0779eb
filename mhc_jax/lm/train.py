"""The training loop: SPMD over a (data, fsdp, tensor) mesh, resumable, configs as arguments.

    train(workdir, model=ModelConfig(...), data=DataConfig(...), optimizer=..., mesh=..., loop=...)

(`mhc-train`, in `cli.py`, builds the configs from gin presets and bindings.) Writes into
WORKDIR: `checkpoints/` (see `checkpoint.py`), `metrics.jsonl` and `tensorboard/` (see
`metrics.py`), `config.json` (the configs in force, and under "init_from" where the run
started: see `pretrained.py`), `schedule.json` (what defines the learning-rate schedule), and
once all `LoopConfig.steps` are done, `finished.json` (the last logged metrics). Evaluation:
`eval_loss` every `eval_every` steps on a fixed subset of `eval_batches` batches of validation
windows spread over every held-out document (`Corpus.eval_batches`), comparable over steps and
runs; at the last step also `final_eval_loss` over every validation window and the unigram /
bigram reference of those tokens (`unigram_loss`, `bigram_loss`). Started again
on the same WORKDIR it resumes from the latest complete checkpoint; once finished, it says so
and does nothing.
SIGTERM / SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and exit.
"""

import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mhc_jax.checks import check_int
from mhc_jax.lm import checkpoint, pretrained
from mhc_jax.lm.attention import check_platform
from mhc_jax.lm.data import Corpus, DataConfig
from mhc_jax.lm.files import write_atomically
from mhc_jax.lm.flops import model_flops_per_token, peak_flops_per_device, throughput
from mhc_jax.lm.metrics import MetricsWriter, ProgressBar
from mhc_jax.lm.model import DTYPES, ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sample import sample_text
from mhc_jax.lm.sharding import MeshConfig, make_mesh
from mhc_jax.lm.train_state import NONFINITE_POLICIES, Trainer, nonfinite_kinds

FINISHED = "finished.json"
SCHEDULE = "schedule.json"
CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """steps: total optimizer steps. *_every: in steps. diagnostics_every = 0: never.
  nonfinite: "stop" (end the run, non-zero exit) or "skip" (drop that update, go on).
  sample_tokens: at the end, that many tokens continuing `sample_prompt` are printed (0: none).
  stop_after_step: ends this invocation after that step, with a checkpoint, as a job with a
  time limit would; the schedule still spans `steps`, so a later start continues exactly.
  """

  steps: int = 1000
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 10
  diagnostics_every: int = 0
  nonfinite: str = "stop"
  seed: int = 0
  sample_tokens: int = 200
  sample_prompt: str = "ROMEO.\n"
  stop_after_step: int | None = None

  def __post_init__(self):
    for name in ("steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                 "log_every"):
      check_int(name, getattr(self, name))
    check_int("diagnostics_every", self.diagnostics_every, minimum=0)
    check_int("sample_tokens", self.sample_tokens, minimum=0)
    if self.stop_after_step is not None:
      check_int("stop_after_step", self.stop_after_step)
    if self.nonfinite not in NONFINITE_POLICIES:
      raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}; got "
                       f"{self.nonfinite!r}")



class NonFiniteError(RuntimeError):
  """A step produced a NaN or Inf and the policy is to stop."""


class StopRequests:
  """Turns SIGTERM / SIGINT into a flag (`signal_name`) checked between steps (main thread
  only). Nested ones share the outermost's flag: an experiment that trains runs one after
  another holds one across them, so a signal between two runs, or during a run's start-up,
  is seen rather than killing the process without a word."""

  _outermost = None

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if StopRequests._outermost is not None:
      return StopRequests._outermost
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
      StopRequests._outermost = self
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    if StopRequests._outermost is self:
      StopRequests._outermost = None
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)


def check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"  # one per process: hosts share workdirs
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise ValueError(f"workdir {workdir} is not writable: {err.strerror}") from None


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


def train(workdir: str,
          model: ModelConfig = ModelConfig(),
          data: DataConfig = DataConfig(),
          optimizer: OptimizerConfig = OptimizerConfig(),
          mesh: MeshConfig = MeshConfig(),
          loop: LoopConfig = LoopConfig(),
          devices=None,
          progress: bool = True,
          record: str | None = None,
          presets: str | None = None,
          init_from: str | None = None) -> list[dict]:
  """Trains (or resumes) in `workdir`; returns this call's logged metrics.

  `progress`: a progress bar (periodic lines when not on a terminal).
  `record`: text saved as `config.gin` beside `config.json` (the CLI's gin bindings).
  `presets`: a line printed before the start-up line, once training starts (the CLI's: which
  gin files are in force).
  `init_from`: a Hugging Face folder or a workdir of this project whose weights a new run
  starts from (`pretrained.py`); a resumed run continues from its checkpoint instead.
  """
  workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
  lead = jax.process_index() == 0
  # Before anything is written or compiled: one line if the platform cannot run it, if the
  # pretrained weights or the workdir's model do not fit the config, or the data or the mesh
  # is wrong, so that a failed start leaves no workdir behind (nor changes one).
  check_platform(model.attention_for(data.seq_len), DTYPES[model.dtype], data.seq_len)
  params, recorded = None, {}
  if checkpoint.latest_step(workdir) is None:
    started_from = None
    if init_from is not None:
      # Over the run's mesh: each process reads only its devices' shards of a Hugging Face
      # checkpoint. A mesh that does not fit the devices is the Trainer's to report, after
      # what is wrong with init_from.
      try:
        run_mesh = make_mesh(mesh, devices)
      except ValueError:
        run_mesh = None
      params, started_from = pretrained.load_params(init_from, model, loop.seed, run_mesh)
  else:
    recorded = _recorded_config(workdir)
    started_from = _resumed_start(workdir, recorded, init_from)
  corpus = Corpus(data)
  if model.vocab_size != corpus.vocab_size:  # larger would train rows no token reaches
    raise ValueError(f"ModelConfig.vocab_size is {model.vocab_size}, the corpus {data.source!r} "
                     f"has {corpus.vocab_size} tokens: set ModelConfig.vocab_size = "
                     f"{corpus.vocab_size}")
  trainer = Trainer(model, optimizer, mesh, loop, data.batch_size, devices)
  flops_per_token = model_flops_per_token(model, data.seq_len)
  peak_flops = peak_flops_per_device(trainer.mesh.devices.flat[0].device_kind)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = corpus.train_iterator(**shard)
  _check_resumed_model(workdir, recorded.get("model"), model)  # after the config's own checks
  check_workdir(workdir)  # the first write into it
  manager = checkpoint.manager(workdir, loop.keep_checkpoints)
  start = manager.latest_step() or 0
  if start:
    state = checkpoint.restore(manager, start, trainer.abstract_state, train_iter)
  elif params is not None:
    state = trainer.state_from_params(params)
    del params  # else a whole copy would sit on one device for the whole run
  else:
    state = trainer.init_state()
  # Only now: a finished run whose config no longer fits its checkpoint, or whose checkpoint
  # is damaged, must still say so rather than report success.
  if is_finished(workdir, loop.steps):
    manager.close()
    if lead:
      print(f"mhc-train: {workdir} is finished ({_finished_step(workdir)} steps); nothing to "
            "do", file=sys.stderr, flush=True)
    return []
  if lead:
    _record_schedule(workdir, optimizer, loop, resuming=bool(start))
  has_validation = len(corpus.validation_windows) > 0
  # The same windows at every step, for every seed and variant; the last step scores them all.
  eval_subset = corpus.eval_batches(loop.eval_batches * data.batch_size, **shard)
  evaluate = weighted_evaluation(trainer)
  if lead and not has_validation:
    print("mhc-train: no validation data (too few or too short held-out documents): "
          "eval_loss is not computed", file=sys.stderr, flush=True)
  if lead:
    configs = dict(model=model, data=data, optimizer=optimizer, mesh=mesh, loop=loop)
    write_atomically(workdir / CONFIG, json.dumps(
        {**{name: dataclasses.asdict(config) for name, config in configs.items()},
         "init_from": started_from}, indent=2))
    if record is not None:
      write_atomically(workdir / "config.gin", record)
    if presets is not None:
      print(presets, flush=True)
    print(f"{model.residual} (n={model.num_streams}): "
          f"{trainer.num_params:,} parameters; {flops_per_token / 1e9:.3g} GFLOP/token; "
          f"mesh {dict(trainer.mesh.shape)}; "
          + (f"resuming at step {start}" if start else
             pretrained.describe(started_from, model) if started_from else
             "starting from scratch"), flush=True)

  writer = MetricsWriter(workdir, resume_step=start) if lead else None
  bar = ProgressBar(loop.steps) if progress and lead else None
  history, tokens_per_step = [], data.batch_size * data.seq_len
  last_time, last_step, last_saved = time.perf_counter(), start, start
  reported = int(jax.device_get(state["guard"]["skipped"]))
  last = loop.steps if loop.stop_after_step is None else min(loop.stop_after_step, loop.steps)

  with StopRequests() as stop:
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
          checkpoint.wait(manager)
          raise
      if logs:
        row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
        now = time.perf_counter()
        row["tokens_per_sec"] = tokens_per_step * (step - last_step) / (now - last_time)
        row.update(throughput(flops_per_token, row["tokens_per_sec"], trainer.mesh.size,
                              peak_flops))
        last_time, last_step = now, step
        if (step % loop.eval_every == 0 or step == loop.steps) and has_validation:
          row["eval_loss"] = evaluate(state["params"], eval_subset)
        if step == loop.steps and has_validation:
          row["final_eval_loss"] = evaluate(state["params"], corpus.eval_batches(**shard))
          row.update(corpus.reference_losses() or {})
        history.append(row)
        if writer:
          writer.write(step, {k: v for k, v in row.items() if k != "step"})
        if bar:
          bar.update(step, **{k: row[k] for k in ("train_loss", "eval_loss", "tokens_per_sec")
                              if k in row})
      if saves:
        checkpoint.save(manager, step, state, train_iter)
        last_saved = step
      if stopping:
        break
    checkpoint.wait(manager)
  manager.close()
  if bar:
    bar.close()
  if writer:
    writer.close()
  if stop.signal_name is not None and last_saved < loop.steps:
    if lead:
      print(f"mhc-train: {stop.signal_name} received; saved the checkpoint of step {last_saved} "
            f"in {workdir / 'checkpoints'}; run the same command to resume", file=sys.stderr,
            flush=True)
    return history
  if lead:
    if last == loop.steps:  # the marker `is_finished` reads, also when resumed at the end
      write_atomically(workdir / FINISHED, json.dumps(history[-1] if history else {"step": start}))
    if loop.sample_tokens and last == loop.steps and stop.signal_name is None:
      model_ = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
      text = sample_text(model_, loop.sample_prompt, num_tokens=loop.sample_tokens,
                         context=data.seq_len, encode=corpus.encode, decode=corpus.decode)
      print(f"sample after {last} steps:\n{text}", flush=True)
  return history


def weighted_evaluation(trainer: Trainer):
  """-> `evaluate(params, batches) -> float`: the token-weighted mean loss over `batches` of
  `data.WeightedBatches` (padding rows weigh 0), one compiled step for all of them. Each
  batch's sums come back in float32 and add up in float64, so the mean over a whole split
  is as exact as one batch's."""
  batch_shardings = {key: trainer.batch_sharding for key in ("inputs", "targets", "weights")}
  step = jax.jit(functools.partial(_weighted_loss_sums, trainer.graphdef),
                 in_shardings=(trainer.state_shardings["params"], batch_shardings),
                 out_shardings=NamedSharding(trainer.mesh, P()))

  def evaluate(params, batches) -> float:
    with jax.set_mesh(trainer.mesh):  # as the Trainer's steps: Pallas kernels split per shard
      sums = [jax.device_get(step(params, trainer.global_batch(b))) for b in batches]
    loss_sum, weight_sum = np.sum(np.array(sums, np.float64), axis=0)
    return float(loss_sum / weight_sum)
  return evaluate


def _weighted_loss_sums(graphdef, params, batch):
  """-> (sum over tokens of weight x cross entropy, sum of weights), float32 math."""
  logits = nnx.merge(graphdef, params)(batch["inputs"]).astype(jnp.float32)
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  return jnp.sum(token_loss * batch["weights"]), jnp.sum(batch["weights"])


def _recorded_config(workdir: pathlib.Path) -> dict:
  """What config.json of the run in `workdir` records, {} without one; one line when it is
  damaged."""
  path = workdir / CONFIG
  if not path.exists():
    return {}
  damaged = lambda why: ValueError(f"{path} is damaged ({why}); delete it to resume the run")
  try:
    recorded = json.loads(path.read_text())
  except ValueError as err:
    raise damaged(f"{type(err).__name__}: {err}") from None
  if not isinstance(recorded, dict):
    raise damaged("it holds no JSON object")
  return recorded


def _check_resumed_model(workdir: pathlib.Path, fields, model: ModelConfig) -> None:
  """One line when config.json's model section (`fields`) is of another function than
  `model`: the checkpoints hold that model's weights. Without a section this version can
  read, the restore compares the arrays instead."""
  if not isinstance(fields, dict):
    return
  try:
    have = ModelConfig.from_record(fields)
  except (TypeError, ValueError):  # a field this version does not know, or a value it refuses
    return
  differ = pretrained.difference(have, model)
  if differ:
    raise ValueError(f"workdir {workdir} holds {differ[0]}; this run asks {differ[1]}: resume "
                     "it with its own settings (its config.json), or start this run in "
                     "another workdir")


def _resumed_start(workdir: pathlib.Path, recorded: dict, init_from: str | None) -> dict | None:
  """Where the run in `workdir` started, as its config.json (`recorded`) says; one line when
  `init_from` names another start: its checkpoint holds weights trained from that one."""
  started = recorded.get("init_from")
  wanted = init_from and str(pathlib.Path(init_from).expanduser().resolve())
  if wanted and wanted != (started or {}).get("path"):
    where = started["path"] if started else "scratch"
    raise ValueError(f"{workdir} started from {where}, not from {wanted}: resume it without "
                     f"--init_from, or start the new run in another workdir")
  return started


def is_finished(workdir: pathlib.Path, steps: int) -> bool:
  """Whether the run in `workdir` has trained `steps` steps: its `finished.json` says so and a
  checkpoint of that step is there (without it, the run redoes its last steps). What sweeps
  and comparisons reuse; one line when finished.json is damaged."""
  done = _finished_step(workdir)
  return done is not None and done >= steps and (checkpoint.latest_step(workdir) or 0) >= steps


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
  this one. A JSON of its own, not `config.json`: that one is rewritten at every start, so
  it cannot say what the previous start used."""
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
  write_atomically(path, json.dumps(now))
