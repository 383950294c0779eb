"""The arms of a comparison: one row each, named by a spec.

    prenorm                  a registered variant (`mhc_jax.lm.residuals.RESIDUALS`)
    hc(dynamic=False)        an ablation: the variant with some of its settings (the fields of
    mhc(sinkhorn_iters=1)    its settings class, `residuals.HC`, `residuals.MHC`, ...) given
    prenorm@flops(mhc)       compute-matched: trained for as many model FLOPs as the target
    prenorm@params(mhc)      parameter-matched: widened to the target's parameter count

A target is a variant, with or without settings. `arm_configs(arm, base, num_streams)` turns a
comparison's train configs (before a variant is set) into the arm's; `arm_facts` gives what
the report's compute table shows: parameters, model FLOPs per token, steps, tokens, total FLOPs.

Compute-matched (`@flops`): the same tokens per step, so steps = round(steps x the target's
model FLOPs per token (`mhc_jax.lm.flops`) / the arm's), and the total is within half a step's
FLOPs of the target's. Warm-up, evaluation, checkpoint and diagnostics cadences stretch by the
same factor: the arm is the base's schedule run longer, its learning rate at each fraction of
its compute what the target's is at the same fraction, its evaluations (as many as the
target's) at about the target's FLOPs. Logging stays per step: step-counted detectors keep
their meaning.

Parameter-matched (`@params`): d_model grows 2 x num_heads at a time (the head count fixed and
the head dim an even int, as RoPE needs), mlp_dim in proportion, to the widest model not over
the target; then mlp_dim alone moves to the count nearest the target. Parameters are affine in
mlp_dim (3 d_model per unit per layer), so that lands within 1.5 d_model x layers of it;
widening d_model first keeps the base's shape when the gap is large. Counts are the
instantiated model's (an abstract one: `nnx.eval_shape`), not a formula.
"""

import ast
import dataclasses
import functools
import re

from flax import nnx

from mhc_jax.checks import one_line
from mhc_jax.lm.flops import model_flops_per_token
from mhc_jax.lm.model import ModelConfig, Transformer, count_params
from mhc_jax.lm.residuals import RESIDUALS, with_residual

MATCHES = ("flops", "params")
PARAMS_TOLERANCE = 0.02  # the most a @params arm's count may differ from its target's
_MATCH_FORMS = " or ".join(f"VARIANT@{match}(ARM)" for match in MATCHES)
_FORMS = f"VARIANT, VARIANT(setting=value, ...), {_MATCH_FORMS}"


@dataclasses.dataclass(frozen=True)
class Arm:
  """variant: a name in RESIDUALS. settings: (name, value) pairs of its settings class's
  fields, kept in that class's order. match: None, or "flops" / "params" to match `target`
  (an arm without a match of its own) at the comparison's configs."""

  variant: str
  settings: tuple[tuple[str, object], ...] = ()
  match: str | None = None
  target: "Arm | None" = None

  def __post_init__(self):
    try:
      object.__setattr__(self, "settings", _ordered_settings(self.variant, self.settings))
      _check_match(self.match, self.target)
    except ValueError as err:
      raise ValueError(f"arm {self.spec!r}: {one_line(err, with_type=False)}") from None

  @property
  def spec(self) -> str:
    """The arm as `parse_arm` reads it."""
    settings = ", ".join(f"{name}={value!r}" for name, value in self.settings)
    own = f"{self.variant}({settings})" if settings else self.variant
    return f"{own}@{self.match}({self.target.spec})" if self.match and self.target else own


def _settings_text(variant: str) -> str:
  """What `variant` takes, for a message about its settings."""
  if variant not in RESIDUALS:
    return f"no variant {variant!r}; choose from {', '.join(RESIDUALS)}"
  cls = RESIDUALS[variant].settings
  if cls is None:
    return f"{variant} has no settings; give it as {variant!r}"
  fields = dataclasses.fields(cls)
  return f"{variant}'s settings: " + ", ".join(f"{f.name}: {f.type.__name__}" for f in fields)


def _ordered_settings(variant: str, settings) -> tuple:
  """`settings` checked against the variant's settings class, in its fields' order."""
  cls = RESIDUALS[variant].settings if variant in RESIDUALS else None
  if cls is None:
    if variant not in RESIDUALS or settings:
      raise ValueError(_settings_text(variant))
    return ()
  fields = {f.name: f for f in dataclasses.fields(cls)}
  names, given = [name for name, _ in settings], dict(settings)
  try:
    if len(given) < len(names):
      raise ValueError(f"{next(n for n in names if names.count(n) > 1)} is given twice")
    for name, value in given.items():
      if name not in fields:
        raise ValueError(f"no setting {name!r}")
      # `type is`: a bool is not an int here, as the settings' own checks have it.
      if type(value) is not fields[name].type:
        raise ValueError(f"{name} must be {fields[name].type.__name__}, got {value!r}")
    cls(**given)  # the settings' own checks (ranges, choices)
  except ValueError as err:
    raise ValueError(f"{one_line(err, with_type=False)}; {_settings_text(variant)}") from None
  return tuple((name, given[name]) for name in fields if name in given)


def _check_match(match: str | None, target: "Arm | None") -> None:
  if match is not None and match not in MATCHES:
    raise ValueError(f"no match {match!r}; give {_MATCH_FORMS}")
  if (match is None) != (target is None):
    raise ValueError("a match needs a target, and a target a match")
  if target is not None and target.match is not None:
    raise ValueError(f"the target of @{match} must be a variant, with or without settings; "
                     f"got {target.spec!r}")


def parse_arm(spec: str) -> Arm:
  """`hc(dynamic=False)`, `prenorm@flops(mhc)`, ... (the module's docstring) -> its Arm; one
  line naming the arm for anything else."""
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError:
    node = None
  arm = _arm(node, spec)
  if arm is None:
    raise ValueError(f"arm {spec!r}: not an arm; give {_FORMS}")
  return arm


def _arm(node: ast.expr | None, spec: str) -> Arm | None:
  """The Arm an expression of `spec` writes; None if it writes none."""
  if isinstance(node, ast.Name):
    return Arm(node.id)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    return Arm(node.func.id, _settings(node, spec))
  if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult)):
    return None
  match = node.right
  if not (isinstance(match, ast.Call) and isinstance(match.func, ast.Name)
          and len(match.args) == 1 and not match.keywords):
    return None
  own, target = _arm(node.left, spec), _arm(match.args[0], spec)
  if own is None or own.match is not None or target is None:
    return None
  return Arm(own.variant, own.settings, match.func.id, target)  # checks the target's form


def _settings(call: ast.Call, spec: str) -> tuple:
  """A variant's call (`hc(dynamic=False)`) -> its settings as (name, value) pairs."""
  try:
    if call.args:
      raise ValueError("settings are given as name=value")
    settings = []
    for keyword in call.keywords:
      try:
        settings.append((keyword.arg, ast.literal_eval(keyword.value)))
      except ValueError:
        raise ValueError(f"the value of {keyword.arg} must be a literal (2, False, 'auto': "
                         "strings need quotes)") from None
  except ValueError as err:
    raise ValueError(f"arm {spec!r}: {err}; {_settings_text(call.func.id)}") from None
  return tuple(settings)


def parse_arms(text: str) -> list[Arm]:
  """A comma list of specs (a command line's) -> its arms, each given once."""
  # A comma followed by a `)` before any `(` is inside an arm's settings, not between arms.
  arms = [parse_arm(spec) for spec in re.split(r",(?![^()]*\))", text)]
  for i, arm in enumerate(arms):
    if arm in arms[:i]:
      raise ValueError(f"arm {arm.spec!r} is given twice; give each arm once")
  return arms


def arm_dirname(arm: Arm) -> str:
  """A filesystem-safe name of the arm, one per arm: `hc+num_streams=2+dynamic=False`,
  `prenorm@flops-mhc`."""
  own = arm.variant + "".join(f"+{name}={value}" for name, value in arm.settings)
  return f"{own}@{arm.match}-{arm_dirname(arm.target)}" if arm.match else own


def variant_model(arm: Arm, model: ModelConfig, num_streams: int | None) -> ModelConfig:
  """`model` as the arm's variant and settings; a stream variant has `num_streams` streams
  (the comparison's; None: its default) unless the arm sets its own."""
  settings = dict(arm.settings)
  return with_residual(model, arm.variant, num_streams=settings.pop("num_streams", num_streams),
                       **settings)


def arm_configs(arm: Arm, base: dict, num_streams: int | None = None) -> dict:
  """`base`, train's keyword arguments as a comparison's preset gives them (`model`, `data`,
  `optimizer`, `mesh`, `loop`), -> the arm's: its variant and settings, widened (@params) or
  trained longer with the schedule stretched (@flops). Set the seed and anything else that
  depends on the steps afterwards."""
  configs = dict(base, model=variant_model(arm, base["model"], num_streams))
  if arm.match is None:
    return configs
  target = arm_configs(arm.target, base, num_streams)
  if arm.match == "flops":
    steps = round(base["loop"].steps * _flops_per_token(target) / _flops_per_token(configs))
    return _stretched(configs, max(1, steps))
  return dict(configs, model=_params_matched(arm, configs["model"], num_params(target["model"])))


def _flops_per_token(configs: dict) -> float:
  return model_flops_per_token(configs["model"], configs["data"].seq_len)


def _stretched(configs: dict, steps: int) -> dict:
  """`configs` trained for `steps`, warm-up and cadences (but logging) scaled alike."""
  loop, optimizer = configs["loop"], configs["optimizer"]
  stretch = steps / loop.steps
  scaled = lambda every: max(1, round(every * stretch))
  return dict(
      configs,
      optimizer=dataclasses.replace(optimizer,
                                    warmup_steps=round(optimizer.warmup_steps * stretch)),
      loop=dataclasses.replace(
          loop, steps=steps, eval_every=scaled(loop.eval_every),
          checkpoint_every=scaled(loop.checkpoint_every),
          diagnostics_every=loop.diagnostics_every and scaled(loop.diagnostics_every)))


@functools.cache
def num_params(model: ModelConfig) -> int:
  """The parameters of `model` as instantiated (abstractly: nothing is computed)."""
  return count_params(nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0))))


def _params_matched(arm: Arm, model: ModelConfig, target: int) -> ModelConfig:
  """`model` widened to the count nearest `target` (the module's docstring); one line if
  none is within PARAMS_TOLERANCE."""
  matched = _mlp_filled(_widest_under(model, target), target)
  ratio = num_params(matched) / target
  if abs(ratio - 1) > PARAMS_TOLERANCE:
    raise ValueError(
        f"arm {arm.spec!r}: no width of {arm.variant} within {PARAMS_TOLERANCE:.0%} of "
        f"{arm.target.spec}'s {target:,} parameters (closest: d_model {matched.d_model}, "
        f"mlp_dim {matched.mlp_dim}, {num_params(matched):,} parameters, {ratio:.3f}x); "
        f"match {arm.target.spec} by @flops, or give a target nearer {arm.variant}'s size")
  return matched


def _widest_under(model: ModelConfig, target: int) -> ModelConfig:
  """The widest `model` (d_model up 2 x num_heads at a time, mlp_dim in proportion) with at
  most `target` parameters; `model` itself when the first step is over."""
  widest = model
  while True:
    d_model = widest.d_model + 2 * model.num_heads
    wider = dataclasses.replace(model, d_model=d_model,
                                mlp_dim=round(d_model * model.mlp_dim / model.d_model))
    if num_params(wider) > target:
      return widest
    widest = wider


def _mlp_filled(model: ModelConfig, target: int) -> ModelConfig:
  """`model` with the mlp_dim (at least 1) whose parameter count is nearest `target`."""
  per_unit = num_params(dataclasses.replace(model, mlp_dim=model.mlp_dim + 1)) - num_params(model)
  mlp_dim = model.mlp_dim + round((target - num_params(model)) / per_unit)
  return dataclasses.replace(model, mlp_dim=max(1, mlp_dim))


def arm_facts(arm: Arm, base: dict, num_streams: int | None = None) -> dict:
  """What the report's compute table gives of the arm at `base` (as `arm_configs`):
  parameters, model FLOPs per token, steps, tokens, total FLOPs, its width; for a matched arm
  also its target and `ratio`, the matched quantity's (total FLOPs or parameters) to the
  target's."""
  facts = {"arm": arm.spec, **_facts(arm_configs(arm, base, num_streams))}
  if arm.match is not None:
    target = _facts(arm_configs(arm.target, base, num_streams))
    matched = "total_flops" if arm.match == "flops" else "parameters"
    facts.update(target=arm.target.spec, ratio=facts[matched] / target[matched])
  return facts


def _facts(configs: dict) -> dict:
  model, data, steps = configs["model"], configs["data"], configs["loop"].steps
  flops_per_token = _flops_per_token(configs)
  tokens = steps * data.batch_size * data.seq_len
  return {"variant": model.residual, "d_model": model.d_model, "mlp_dim": model.mlp_dim,
          "parameters": num_params(model), "flops_per_token": flops_per_token, "steps": steps,
          "tokens": tokens, "total_flops": flops_per_token * tokens}
