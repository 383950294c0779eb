"""The sharded train state and the compiled steps for one configuration.

A train state is a pytree `{"step", "params", "opt_state", "guard"}` sharded over the mesh.
`guard` records non-finite steps: an update whose loss, gradients or new parameters are not
all finite is not applied (the state keeps its last finite values), and the first such step
and what went bad are remembered so the loop can stop or warn (see `LoopConfig.nonfinite`).
"""

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mhc_jax.diagnostics import gain_summary
from mhc_jax.lm.model import SITES, ModelConfig, Transformer, count_params, per_layer
from mhc_jax.lm.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from mhc_jax.lm.sharding import MeshConfig, batch_sharding, make_mesh, named, param_specs
from mhc_jax.site import SiteMixin

if TYPE_CHECKING:  # the loop's config; Trainer reads its steps and seed
  from mhc_jax.lm.train import LoopConfig

NONFINITE_POLICIES = ("stop", "skip")
NONFINITE_KINDS = ("loss", "gradients", "parameters")  # bit 0, 1, 2 of guard["first_kind"]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token cross entropy in float32: `[B, L, V]`, `[B, L]` -> scalar."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logprobs, targets[..., None], axis=-1))


def nonfinite_kinds(mask: int) -> list[str]:
  return [kind for bit, kind in enumerate(NONFINITE_KINDS) if mask >> bit & 1]


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def logits_and_h_res(model: Transformer, inputs: jax.Array,
                     *args) -> tuple[jax.Array, jax.Array]:
  """`model(inputs, *args)`'s logits and the H_res its sites computed on the way,
  `[2 * num_layers, batch, seq, n, n]` (a model with streams; `model`'s sites sow from now on)."""
  for _, module in nnx.iter_modules(model):
    if isinstance(module, SiteMixin):
      module.sow_coefficients = True
  logits, intermediates = nnx.capture(model, nnx.Intermediate)(inputs, *args)
  return logits, _h_res_per_sublayer(model, intermediates)


def _h_res_per_sublayer(model: Transformer, intermediates) -> jax.Array:
  """Sown coefficients -> `[2 * num_layers, batch, seq, n, n]` H_res, in depth order."""
  sown = nnx.to_pure_dict(intermediates)["blocks"]
  h_res = jnp.stack([per_layer(model, sown, site, "coefficients", 0).h_res for site in SITES],
                    axis=1)  # [L, 2, ..., n, n]: sub-layers in depth order
  return h_res.reshape(-1, *h_res.shape[2:])


class Trainer:
  """Builds the sharded train state and the compiled steps for one configuration."""

  def __init__(self, model: ModelConfig, optimizer: OptimizerConfig, mesh: MeshConfig,
               loop: "LoopConfig", batch_size: int, devices=None):
    if batch_size % mesh.batch_shards:
      raise ValueError(f"batch_size {batch_size} must be divisible by the mesh's data*fsdp = "
                       f"{mesh.batch_shards}")
    self.mesh = make_mesh(mesh, devices)
    self.model_config, self.loop = model, loop
    abstract_model = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(loop.seed)))
    self.graphdef, abstract_params = nnx.split(abstract_model)
    self.tx = make_optimizer(optimizer, loop.steps, abstract_params)
    self.schedule = learning_rate_schedule(optimizer, loop.steps)
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
        "guard": jax.tree.map(lambda _: replicated, abstract_state["guard"]),
    }
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        self.state_shardings)
    self.batch_sharding = batch_sharding(self.mesh)
    batch_shardings = {"inputs": self.batch_sharding, "targets": self.batch_sharding}
    self.init_state = self._under_mesh(
        jax.jit(self._init_state, out_shardings=self.state_shardings))
    self._jit_fresh_state = self._under_mesh(
        jax.jit(self._fresh_state, out_shardings=self.state_shardings))
    self._jit_train_step = {
        diagnostics: jax.jit(lambda s, b, d=diagnostics: self._train_step(s, b, d),
                             in_shardings=(self.state_shardings, batch_shardings),
                             out_shardings=(self.state_shardings, replicated),
                             donate_argnums=0)
        for diagnostics in (False, True)}
    self.eval_step = self._under_mesh(jax.jit(
        lambda p, b: self._loss(p, b, False)[0],
        in_shardings=(param_shardings, batch_shardings), out_shardings=replicated))

  def _under_mesh(self, fn):
    """Traces and runs `fn` with the mesh set, so that Pallas kernels inside the model can
    split their work per shard (see `kernels_pallas/sinkhorn/api.py`)."""
    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)
    return call

  def train_step(self, state, batch, diagnostics: bool = False):
    """One update; with `diagnostics`, also the per-sub-layer H_res gains of this very
    forward pass (only for models with streams)."""
    diagnostics = diagnostics and self.model_config.uses_streams
    return self._under_mesh(self._jit_train_step[diagnostics])(state, batch)

  def state_from_params(self, params: dict):
    """The train state of step 0 holding `params` (a pure dict laid out as the model's, e.g.
    pretrained weights), with a fresh optimizer state, sharded as `init_state`'s."""
    # device_put lays the one copy out over the mesh, across hosts too; the jit then only
    # adds the optimizer state and the counters.
    return self._jit_fresh_state(jax.device_put(params, self.state_shardings["params"]))

  def _init_state(self):
    model = Transformer(self.model_config, rngs=nnx.Rngs(self.loop.seed))
    return self._fresh_state(nnx.to_pure_dict(nnx.state(model)))

  def _fresh_state(self, params: dict):
    guard = {"first_step": jnp.full((), -1, jnp.int32), "first_kind": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32)}
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "guard": guard}

  def _loss(self, params, batch, capture: bool):
    """-> (loss, H_res per sub-layer or None)."""
    model = nnx.merge(self.graphdef, params)
    if not capture:
      return cross_entropy(model(batch["inputs"]), batch["targets"]), None
    logits, h_res = logits_and_h_res(model, batch["inputs"])
    return cross_entropy(logits, batch["targets"]), jax.lax.stop_gradient(h_res)

  def _train_step(self, state, batch, diagnostics: bool):
    (loss, h_res), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state["params"], batch, diagnostics)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    bad = jnp.stack([~jnp.isfinite(loss), ~jnp.isfinite(grad_norm), ~_all_finite(params)])
    ok = ~jnp.any(bad)
    # One branch on the whole update, not a select per leaf: XLA would copy the computation
    # of `ok` into every leaf's select, and the program would grow with leaves squared.
    params, opt_state = jax.lax.cond(ok, lambda: (params, opt_state),
                                     lambda: (state["params"], state["opt_state"]))
    step = state["step"] + 1
    guard = state["guard"]
    first = ~ok & (guard["first_step"] < 0)
    guard = {"first_step": jnp.where(first, step, guard["first_step"]),
             "first_kind": jnp.where(first, jnp.sum(bad * jnp.array([1, 2, 4])),
                                     guard["first_kind"]),
             "skipped": guard["skipped"] + (~ok).astype(jnp.int32)}
    metrics = {"train_loss": loss, "grad_norm": grad_norm,
               "learning_rate": self.schedule(state["step"]),
               "skipped_steps": guard["skipped"]}
    if diagnostics:
      for name, gains in gain_summary(h_res).items():  # [2 * num_layers] each
        metrics[f"{name}/max"] = jnp.max(gains)
        metrics.update({f"{name}/{i:02d}": v for i, v in enumerate(gains)})
    new_state = {"step": step, "params": params, "opt_state": opt_state, "guard": guard}
    return new_state, metrics

  def global_batch(self, local_batch: dict) -> dict:
    """This process's rows of the global batch -> global arrays sharded over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def lower_train_step(self, seq_len: int, batch_size: int):
    """Lowers the train step on abstract inputs: checks shapes and shardings of a config
    without allocating it (e.g. a pod-sized config on a few CPU devices)."""
    batch = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
    with jax.set_mesh(self.mesh):
      return self._jit_train_step[False].lower(self.abstract_state,
                                               {"inputs": batch, "targets": batch})

  def evaluate(self, params, batches) -> float:
    """Mean loss over `batches` (at least one)."""
    losses = [float(self.eval_step(params, self.global_batch(b))) for b in batches]
    return float(np.mean(losses))
