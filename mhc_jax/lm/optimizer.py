"""AdamW with warm-up then cosine (or the mHC paper's step decay), clipping, a weight decay
mask that spares norms, biases and hyper-connection gates, and a learning-rate multiplier for
hyper-connection static maps and scales."""

import math

import dataclasses

import jax
import optax
from flax import nnx

from mhc_jax.checks import check_int
from mhc_jax.lm.model import LAYERS_AXIS

SCHEDULES = ("cosine", "step")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  schedule: str = "cosine"
  final_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  # The rate of the Variables tagged `static_map=True` (HC's static maps and scales), as a
  # multiple of the schedule's.
  static_map_lr_multiplier: float = 1.0

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
    if not self.learning_rate > 0:  # inf is a rate too: the tests' way to a non-finite update
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
    if not (self.static_map_lr_multiplier > 0 and math.isfinite(self.static_map_lr_multiplier)):
      raise ValueError("static_map_lr_multiplier must be > 0, got "
                       f"{self.static_map_lr_multiplier!r}")
    check_int("warmup_steps", self.warmup_steps, minimum=0)


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warm-up, then cosine to `final_lr_ratio`, or the mHC paper's step decay
  (x0.316 at 80% of training, x0.1 at 90%)."""
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  decay_steps = max(total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.final_lr_ratio)
  else:
    after = optax.piecewise_constant_schedule(
        cfg.learning_rate, {int(0.8 * total_steps) - cfg.warmup_steps: 0.316,
                            int(0.9 * total_steps) - cfg.warmup_steps: 0.1 / 0.316})
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def _per_variable(test, state):
  """`nnx.State` of Variables -> pure dict of `test(variable)`."""
  return nnx.to_pure_dict(jax.tree.map(test, state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def decay_mask(state):
  """`nnx.State` of the model's Variables -> pure dict, True for weight matrices; False for
  vectors and scalars (norm scales, biases, gates, alpha) and for Variables tagged
  `weight_decay=False` (a hyper-connection method's own exemptions, e.g. HC's static maps:
  see `mhc_jax.mappings`). A scanned stack's leading `layers` axis does not count: a stack
  of norm scales is still a vector per layer."""

  def decays(variable):
    metadata = variable.get_metadata()
    axes = metadata.get("logical_axes") or ()
    rank = variable.ndim - (axes[:1] == (LAYERS_AXIS,))
    return rank >= 2 and metadata.get("weight_decay", True)

  return _per_variable(decays, state)


def static_map_mask(state):
  """`nnx.State` of the model's Variables -> pure dict, True for the Variables tagged
  `static_map=True` (a hyper-connection method's static maps and scales: see
  `mhc_jax.mappings`)."""
  return _per_variable(lambda variable: variable.get_metadata().get("static_map", False), state)


def make_optimizer(cfg: OptimizerConfig, total_steps: int,
                   state) -> optax.GradientTransformation:
  """`state`: the model's `nnx.State` (abstract will do), whose Variables' tags say which
  parameters get weight decay (`decay_mask`) and the static maps' rate (`static_map_mask`)."""
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                      weight_decay=cfg.weight_decay, mask=decay_mask(state))
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      _scaled_where(adamw, cfg.static_map_lr_multiplier, static_map_mask(state)))


def _scaled_where(inner: optax.GradientTransformation, factor: float,
                  mask) -> optax.GradientTransformation:
  """`inner` with its updates times `factor` where `mask` (a pytree of bools) is True. Its
  state is `inner`'s, whatever the factor: a checkpoint restores under another multiplier,
  and those saved before the multiplier existed restore too."""

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    return jax.tree.map(lambda u, scaled: u * factor if scaled else u, updates, mask), state

  return optax.GradientTransformation(inner.init, update)
