"""`grpo.post_train`'s engine: google-tunix's GRPO learner (0.1.7) on the policy adapter.

What tunix does not do the way a run of this project must, done here:
- Draws: tunix's vanilla rollout draws every step with the one key of `RolloutConfig.seed`, so
  unchanged weights draw the same completions again; `StepSeededRollout` folds the step in.
- Steps: after a restart tunix restores the policy, its optimizer and the prompts' position,
  but its global step starts again at 0; the actor's step (`actor_trainer.train_steps`, the
  updates done) is restored, and everything here counts by it: step k is the k-th update and
  the rollout it learns from.
- Metrics: tunix's logger sends every scalar through `jax.monitoring`; `StepMetrics` takes the
  actor's (loss, KL, clip fraction, gradient norm) from there and the rollout's (rewards and
  their spread within groups, lengths, gains) from the learner's metric functions, and writes
  one line per step with the project's `MetricsWriter` before tunix checkpoints that step.
"""

import collections
import dataclasses
import functools
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from grain import python as grain
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout, vanilla_rollout
from tunix.sft import metrics_logger

from mhc_jax.diagnostics import gain_summary
from mhc_jax.lm import checkpoint, inference, rewards as rewards_lib
from mhc_jax.lm import grpo as grpo_lib
from mhc_jax.lm.grpo import TUNIX_CHECKPOINTS, GRPOConfig, Start
from mhc_jax.lm.metrics import MetricsWriter, ProgressBar
from mhc_jax.lm.optimizer import OptimizerConfig, make_optimizer
from mhc_jax.lm.policy import Policy, TunixTokenizer
from mhc_jax.lm.sharding import MeshConfig, make_mesh, named, param_specs
from mhc_jax.lm.tokenizer import PAD, ByteTokenizer
from mhc_jax.lm.train_state import logits_and_h_res

# tunix's actor scalars (`actor/train/<name>`) -> this project's names for them.
ACTOR_METRICS = {"loss": "loss", "kl": "kl", "pg_clipfrac": "clip_fraction",
                 "grad_norm": "grad_norm"}
ACTOR_EVENT = "actor/train/"


class StepSeededRollout(vanilla_rollout.VanillaRollout):
  """tunix's vanilla rollout, each step's draws from `seed` folded with the step (`step()`,
  set once the cluster exists)."""

  def __init__(self, rollout_actor, tokenizer, mesh, rollout_config, *, seed: int):
    del mesh  # the actor's, which it already lives on
    super().__init__(rollout_actor, tokenizer, cache_config_or_size=base_rollout.CacheConfig(
        cache_size=rollout_config.kv_cache_size, num_layers=rollout_actor.config.num_layers,
        num_kv_heads=rollout_actor.config.kv_heads, head_dim=rollout_actor.config.head_dim))
    self.seed = seed
    self.step = lambda: 0
    self.started, self.tokens_per_sec = time.perf_counter(), math.nan

  def generate(self, prompts, rollout_config, **kwargs):
    # A fresh key each call: tunix's sampler donates the one it is given.
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), self.step())
    self.started = time.perf_counter()
    out = super().generate(prompts, dataclasses.replace(rollout_config, seed=key), **kwargs)
    drawn = sum(len(tokens) for tokens in out.tokens)  # host arrays: the draws are done
    self.tokens_per_sec = drawn / (time.perf_counter() - self.started)
    return out


class StepMetrics:
  """One metrics line per step: the rollout's values (`add`, at the first step that learns from
  it) joined with the actor's scalars of the step (as a tunix logging backend: `log_scalar`),
  written once all have come, which is before tunix checkpoints the step."""

  def __init__(self, writer: MetricsWriter | None, bar: ProgressBar | None, actor: set[str]):
    self.writer, self.bar, self.actor = writer, bar, actor
    self.pending = collections.defaultdict(dict)
    self.rows, self.rollout, self.listening, self.started = [], {}, True, {}

  def add(self, step: int, values: dict, started: float) -> None:
    """The rollout's `values` for `step`, whose rollout began at `started` (perf_counter)."""
    self.pending[step].update(values)
    self.started[step] = started
    self._maybe_write(step)

  def log_scalar(self, event: str, value, **kwargs) -> None:
    step = kwargs.get("step")
    name = ACTOR_METRICS.get(event.removeprefix(ACTOR_EVENT)) if event.startswith(
        ACTOR_EVENT) else None
    if name is None or step is None:
      return
    self.pending[int(step)][name] = float(np.asarray(value))
    self._maybe_write(int(step))

  def _maybe_write(self, step: int) -> None:
    row = self.pending[step]
    if not self.actor <= row.keys():
      return
    if "reward" in row:
      self.rollout = {k: v for k, v in row.items() if k not in self.actor}
      row["step_time"] = time.perf_counter() - self.started.pop(step)
    else:  # a later iteration on the last rollout's completions (GRPOConfig.iterations > 1)
      row = {**self.rollout, **row}
    del self.pending[step]
    self.rows.append({"step": step, **row})
    if self.writer:
      self.writer.write(step, row)
    if self.bar:
      self.bar.update(step, reward=row["reward"], kl=row.get("kl", 0.0))

  def close(self) -> None:
    """Stops listening. tunix registers `log_scalar` with `jax.monitoring` and means to drop
    it with `clear_event_listeners`, which (JAX 0.10.2) leaves scalar listeners in place: a
    later run in the process would write this run's lines."""
    if self.listening:
      self.listening = False
      try:
        jax.monitoring.unregister_scalar_listener(self.log_scalar)
      except AssertionError:  # not registered: tunix registers on the first process only
        pass


class RecordedRewards:
  """The reward functions as tunix calls them (through `rewards.checked`), keeping each one's
  last values for the step's metrics."""

  def __init__(self, fns):
    self.last = {}
    self.fns = [self._recording(fn) for fn in fns]

  def _recording(self, fn):
    checked = rewards_lib.checked(fn)

    @functools.wraps(fn)
    def call(prompts, completions, **batch):
      self.last[fn.__name__] = values = checked(prompts, completions, **batch)
      return values

    return call


@functools.partial(jax.jit, static_argnums=0)
def _gains(graphdef, state, tokens, mask):
  """The max over real tokens of each sub-layer's gains (`gain_summary`) on `tokens`."""
  model = nnx.merge(graphdef, state)
  _, h_res = logits_and_h_res(model, tokens, None, mask)
  if h_res.ndim == 5:  # per token: the padding takes the first token's, changing no maximum
    h_res = jnp.where(mask[None, :, :, None, None], h_res, h_res[:, :1, :1])
  return {name: jnp.max(gains) for name, gains in gain_summary(h_res).items()}


def rollout_gains(model, tokenizer, texts: list[str], width: int) -> dict[str, float]:
  """H_res gains of `model` on `texts` (prompt + completion each), right-padded to `width`."""
  tokens = np.full((len(texts), width), pad_id(tokenizer), np.int32)
  mask = np.zeros((len(texts), width), bool)
  for i, text in enumerate(texts):
    ids = np.asarray(tokenizer.encode(text))[-width:]
    tokens[i, :len(ids)], mask[i, :len(ids)] = ids, True
  graphdef, state = nnx.split(model)
  return {f"{name}/max": float(v) for name, v in _gains(graphdef, state, tokens, mask).items()}


def run(workdir: pathlib.Path, start: Start, loaded: inference.Loaded, prompts: list[dict],
        fns, grpo: GRPOConfig, optimizer: OptimizerConfig, mesh_config: MeshConfig,
        progress: bool, devices=None) -> list[dict]:
  """`grpo.post_train`'s run from `loaded` (`start`'s model, tokenizer), after its checks."""
  mesh = make_mesh(mesh_config, devices)
  policy = Policy(_placed(loaded.model, mesh))
  reference = (Policy(_placed(inference.load(start.source.path).model, mesh))
               if grpo.kl_coeff > 0 else None)
  tokenizer = loaded.tokenizer
  resumed = max(ocp.utils.checkpoint_steps(workdir / TUNIX_CHECKPOINTS / "actor"), default=0)
  lead = jax.process_index() == 0
  writer = MetricsWriter(workdir, resume_step=resumed) if lead else None
  bar = ProgressBar(grpo.steps) if progress and lead else None
  actor = {"loss", "clip_fraction", "grad_norm"} | ({"kl"} if grpo.kl_coeff > 0 else set())
  metrics = StepMetrics(writer, bar, actor)
  recorded = RecordedRewards(fns)
  rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=grpo.max_new_tokens, max_prompt_length=grpo.max_prompt_length,
      kv_cache_size=grpo.max_prompt_length + grpo.max_new_tokens, temperature=grpo.temperature,
      eos_tokens=[tokenizer.eos_id])
  roles = (rl_cluster_lib.Role.ACTOR, rl_cluster_lib.Role.REFERENCE, rl_cluster_lib.Role.ROLLOUT)
  cluster = rl_cluster_lib.RLCluster(
      actor=policy, reference=reference,
      tokenizer=TunixTokenizer(tokenizer, pad_id(tokenizer)),
      cluster_config=rl_cluster_lib.ClusterConfig(
          role_to_mesh={role: mesh for role in roles},
          rollout_engine=functools.partial(StepSeededRollout, seed=grpo.seed),
          offload_to_cpu=False, rollout_config=rollout,
          training_config=rl_cluster_lib.RLTrainingConfig(
              actor_optimizer=on_pure_dicts(make_optimizer(optimizer, grpo.steps,
                                                           nnx.state(policy))),
              eval_every_n_steps=grpo.steps + 1, max_steps=grpo.steps,
              checkpoint_root_directory=str(workdir / TUNIX_CHECKPOINTS),
              checkpointing_options=ocp.CheckpointManagerOptions(
                  save_interval_steps=grpo.checkpoint_every, max_to_keep=2),
              metrics_logging_options=metrics_logger.MetricsLoggerOptions(
                  log_dir=str(workdir / "tensorboard"),
                  backend_kwargs={"custom_backend": [lambda: metrics]}),
              pbar_description=None)))
  updates_done = lambda: cluster.actor_trainer.train_steps
  cluster.rollout.step = updates_done
  width = grpo.max_prompt_length + grpo.max_new_tokens

  def rollout_metrics(prompts, completions, rewards, advantages, **batch):
    del advantages, batch
    values = {"reward": float(np.mean(rewards)),
              "reward_group_std": grpo_lib.group_std(rewards, grpo.group_size),
              "response_length": float(np.mean([len(tokenizer.encode(c)) for c in completions])),
              **{f"reward/{name}": float(np.mean(v)) for name, v in recorded.last.items()}}
    if policy.model.cfg.uses_streams:
      values |= rollout_gains(cluster.actor_trainer.model.model, tokenizer,
                              [p + c for p, c in zip(prompts, completions)], width)
    values["rollout_tokens_per_sec"] = cluster.rollout.tokens_per_sec
    metrics.add(updates_done() + 1, values, started=cluster.rollout.started)
    return {}

  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, reward_fns=recorded.fns, metric_fns=[rollout_metrics],
      algo_config=grpo_learner.GRPOConfig(
          num_generations=grpo.group_size, num_iterations=grpo.iterations, beta=grpo.kl_coeff,
          epsilon=grpo.clip_epsilon, kl_loss_mode=grpo.kl_estimator))
  try:
    learner.train(prompt_batches(prompts, grpo))
  finally:
    metrics.close()  # also when tunix stopped before closing it
    if bar:
      bar.close()
    if writer:
      writer.close()
  save_policy(workdir, grpo.steps, cluster.actor_trainer.model.model)
  return metrics.rows


def on_pure_dicts(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx`, whose masks are pure dicts (`make_optimizer`'s), on the `nnx.State` trees tunix's
  optimizer hands it: it sees pure dicts, and its updates come back in the given tree."""

  def update(updates, state, params=None):
    pure = None if params is None else nnx.to_pure_dict(params)
    new, state = tx.update(nnx.to_pure_dict(updates), state, pure)
    out = jax.tree.map(lambda x: x, updates)  # a copy of the tree to fill
    nnx.replace_by_pure_dict(out, new)
    return out, state

  return optax.GradientTransformation(lambda params: tx.init(nnx.to_pure_dict(params)), update)


def prompt_batches(prompts: list[dict], grpo: GRPOConfig) -> grain.MapDataset:
  """The prompts in a seeded order, as many passes as the steps take, `prompts_per_step` a
  batch: `{"prompts": [...], <field>: [...]}` (a prompt's other fields, for the rewards)."""
  passes = -(-grpo.steps * grpo.prompts_per_step // len(prompts))
  # Arrays, not lists: tunix repeats every column's rows for the groups with np.repeat.
  columns = lambda batch: {"prompts": batch["prompt"],
                           **{k: v for k, v in batch.items() if k != "prompt"}}
  return (grain.MapDataset.source(prompts).repeat(passes).shuffle(seed=grpo.seed)
          .batch(grpo.prompts_per_step, drop_remainder=True).map(columns))


def pad_id(tokenizer) -> int:
  """What fills prompts and completions: the byte tokenizer's PAD; a Hugging Face tokenizer's
  end-of-text token (it has no padding token of its own here)."""
  return PAD if isinstance(tokenizer, ByteTokenizer) else tokenizer.eos_id


def _placed(model, mesh):
  """`model` with its parameters laid out over `mesh` as training lays them out."""
  graphdef, state = nnx.split(model)
  shardings = named(mesh, param_specs(state, mesh))
  pure = jax.device_put(nnx.to_pure_dict(state), shardings)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def save_policy(workdir: pathlib.Path, step: int, model) -> None:
  """The trained policy's parameters as `mhc-train` saves a train state's (only them), so the
  project's readers (`pretrained.read_source`) load the workdir."""
  manager = checkpoint.manager(workdir, keep=1)
  params = nnx.to_pure_dict(nnx.state(model))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
  manager.wait_until_finished()
  manager.close()
