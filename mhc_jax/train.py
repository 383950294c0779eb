"""Training loop: gin-configured, SPMD over a (data, fsdp, tensor) mesh, resumable.

    mhc-train --gin_file gin_configs/shakespeare_tiny.gin --workdir workdirs/tiny
    python -m mhc_jax.train --gin_file ... --gin_param 'ModelConfig.residual = "mhc"' --workdir ...

Writes into WORKDIR: `checkpoints/` (orbax: params, optimizer state, step, grain iterator),
`metrics.jsonl` and `tensorboard/` (see `metrics.py`), `config.gin` (the bindings in force).
Started again on the same WORKDIR it resumes from the latest complete checkpoint.
"""

import argparse
import dataclasses
import logging
import math
import pathlib
import sys
import time

import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mhc_jax.data import Corpus, DataConfig
from mhc_jax.generate import sample_text
from mhc_jax.metrics import MetricsWriter, ProgressBar
from mhc_jax.model import ModelConfig, Transformer, count_params
from mhc_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from mhc_jax.sharding import MeshConfig, batch_sharding, make_mesh, named, param_specs

GIN_CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"
for _cls in (ModelConfig, DataConfig, OptimizerConfig, MeshConfig):
  gin.external_configurable(_cls, module="mhc_jax")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  steps: int = 1000
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                 "log_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


gin.external_configurable(LoopConfig, module="mhc_jax")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross entropy in float32: `[B, L, V]`, `[B, L]` -> scalar."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logprobs, targets[..., None], axis=-1))


class Trainer:
  """Builds the sharded train state and the compiled steps for one configuration."""

  def __init__(self, model: ModelConfig, optimizer: OptimizerConfig, mesh: MeshConfig,
               loop: LoopConfig, batch_size: int, devices=None):
    if batch_size % mesh.batch_shards:
      raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's data*fsdp = "
                       f"{mesh.batch_shards}")
    self.mesh = make_mesh(mesh, devices)
    self.model_config, self.loop = model, loop
    self.tx = make_optimizer(optimizer, loop.steps)
    self.schedule = learning_rate_schedule(optimizer, loop.steps)
    abstract_model = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(loop.seed)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    self.num_params = count_params(abstract_model)
    param_shardings = named(self.mesh, param_specs(abstract_params, self.mesh))
    replicated = NamedSharding(self.mesh, P())
    abstract_state = jax.eval_shape(self._init_state)
    self.state_shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            self.tx, lambda _, sharding: sharding, abstract_state["opt_state"], param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding)),
    }
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        self.state_shardings)
    self.batch_sharding = batch_sharding(self.mesh)
    batch_shardings = {"inputs": self.batch_sharding, "targets": self.batch_sharding}
    self.init_state = self._under_mesh(
        jax.jit(self._init_state, out_shardings=self.state_shardings))
    self._jit_train_step = jax.jit(self._train_step,
                                   in_shardings=(self.state_shardings, batch_shardings),
                                   out_shardings=(self.state_shardings, replicated),
                                   donate_argnums=0)
    self.train_step = self._under_mesh(self._jit_train_step)
    self.eval_step = self._under_mesh(jax.jit(
        self._loss, in_shardings=(param_shardings, batch_shardings), out_shardings=replicated))

  def _under_mesh(self, fn):
    """Traces and runs `fn` with the mesh set, so that Pallas kernels inside the model can
    split their work per shard (see `mhc_jax.sinkhorn`)."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return call

  def _init_state(self):
    model = Transformer(self.model_config, rngs=nnx.Rngs(self.loop.seed))
    params = nnx.to_pure_dict(nnx.state(model))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params)}

  def _loss(self, params, batch):
    logits = nnx.merge(self.graphdef, params)(batch["inputs"])
    return cross_entropy(logits, batch["targets"])

  def _train_step(self, state, batch):
    loss, grads = jax.value_and_grad(self._loss)(state["params"], batch)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "learning_rate": self.schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def global_batch(self, local_batch: dict) -> dict:
    """This process's rows of the global batch -> global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def lower_train_step(self, seq_len: int, batch_size: int):
    """Lowers the train step on abstract inputs: checks shapes and shardings of a config
    without allocating it (e.g. a pod-sized config on a few CPU devices)."""
    batch = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
    with jax.set_mesh(self.mesh):
      return self._jit_train_step.lower(self.abstract_state, {"inputs": batch, "targets": batch})

  def evaluate(self, params, batches) -> float:
    losses = [float(self.eval_step(params, self.global_batch(b))) for b in batches]
    return float(np.mean(losses))


def _checkpoint_manager(workdir: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True)
  return ocp.CheckpointManager(workdir / "checkpoints", options=options)


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as err:
    raise ValueError(f"workdir {workdir} is not writable: {err.strerror}") from None


@gin.configurable
def train(workdir: str,
          model: ModelConfig = ModelConfig(),
          data: DataConfig = DataConfig(),
          optimizer: OptimizerConfig = OptimizerConfig(),
          mesh: MeshConfig = MeshConfig(),
          loop: LoopConfig = LoopConfig(),
          devices=None,
          progress: bool = True,
          stop_after_step: int | None = None,
          sample_tokens: int = 200,
          sample_prompt: str = "ROMEO.\n") -> list[dict]:
  """Trains (or resumes) in `workdir`; returns this call's logged metrics.

  `stop_after_step` ends this invocation early, with a checkpoint, as a job with a time
  limit would; the schedule still spans `loop.steps`, so a later call continues exactly.
  At the end, `sample_tokens` bytes continuing `sample_prompt` are printed (0: none).
  """
  workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
  _check_workdir(workdir)
  corpus = Corpus(data)
  trainer = Trainer(model, optimizer, mesh, loop, data.batch_size, devices)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  train_iter = corpus.train_iterator(**shard)
  manager = _checkpoint_manager(workdir, loop.keep_checkpoints)
  start = manager.latest_step() or 0
  if start:
    restored = manager.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    state = restored.state
  else:
    state = trainer.init_state()
  if jax.process_index() == 0:
    (workdir / "config.gin").write_text(gin.config_str())
    print(f"{model.residual} (n={model.num_streams if model.uses_streams else 1}): "
          f"{trainer.num_params:,} parameters; mesh {dict(trainer.mesh.shape)}; "
          + (f"resuming at step {start}" if start else "starting from scratch"), flush=True)

  writer = MetricsWriter(workdir, resume_step=start) if jax.process_index() == 0 else None
  bar = ProgressBar(loop.steps) if progress and jax.process_index() == 0 else None
  history, tokens_per_step = [], data.batch_size * data.seq_len
  last_time, last_step = time.perf_counter(), start
  last = loop.steps if stop_after_step is None else min(stop_after_step, loop.steps)
  for step in range(start + 1, last + 1):
    state, metrics = trainer.train_step(state, trainer.global_batch(next(train_iter)))
    final = step == last
    if step % loop.log_every == 0 or step % loop.eval_every == 0 or final:
      row = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
      now = time.perf_counter()
      row["tokens_per_sec"] = tokens_per_step * (step - last_step) / (now - last_time)
      last_time, last_step = now, step
      if step % loop.eval_every == 0 or step == loop.steps:
        row["eval_loss"] = trainer.evaluate(
            state["params"], corpus.validation_batches(loop.eval_batches, **shard))
      if not math.isfinite(row["train_loss"]):
        raise FloatingPointError(f"train_loss is {row['train_loss']} at step {step}")
      history.append(row)
      if writer:
        writer.write(step, {k: v for k, v in row.items() if k != "step"})
      if bar:
        bar.update(step, **{k: row[k] for k in ("train_loss", "eval_loss", "tokens_per_sec")
                            if k in row})
    if step % loop.checkpoint_every == 0 or final:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)))
  manager.wait_until_finished()
  manager.close()
  if bar:
    bar.close()
  if jax.process_index() == 0:
    (workdir / "config.gin").write_text(gin.operative_config_str())
    if sample_tokens and last == loop.steps:
      model_ = nnx.merge(trainer.graphdef, jax.device_get(state["params"]))
      text = sample_text(model_, sample_prompt, num_tokens=sample_tokens, context=data.seq_len)
      print(f"sample after {last} steps:\n{text}", flush=True)
  return history


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="mhc-train", description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable); looked up in gin_configs/ too")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. 'ModelConfig.residual = \"mhc\"' (repeatable)")
  parser.add_argument("--workdir", required=True)
  return parser.parse_args(argv)


def _one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if GIN_CONFIG_DIR.is_dir():
    gin.add_config_file_search_path(str(GIN_CONFIG_DIR))
  # gin's package-resource reader logs an error for every file it later finds on the search
  # path; a file found nowhere still raises, so nothing is lost by hiding these.
  logging.getLogger().addFilter(lambda record: not record.getMessage().startswith("Path not found"))
  # One at a time, so the message names the file or binding at fault.
  for kind, items, parse in (("file", args.gin_file, gin.parse_config_file),
                             ("binding", args.gin_param, gin.parse_config)):
    for item in items:
      try:
        parse(item)
      except Exception as err:  # gin raises many types; every one means a bad config
        print(f"mhc-train: bad gin {kind} {item!r}: {_one_line(err)}", file=sys.stderr)
        return 2
  try:
    train(args.workdir)
  except ValueError as err:
    print(f"mhc-train: {_one_line(err)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
