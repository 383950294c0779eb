"""The residual variants the LM compares: one table, and each entry says everything the rest
of the code asks of its variant. The model, FLOPs, the optimizer's weight decay, retrofitting,
`--init_from`, the train state's diagnostics, the benchmarks and the reports read it and never
name a variant. Adding one is one entry here (see the README's "Adding a residual variant").

A variant says how a sub-layer `F` (attention or MLP, with its `norm`) joins the residual
path and the colour its curves get in plots; a variant with streams also has its own settings
(a small frozen dataclass below, `ModelConfig.residual_settings`, bound in gin as
`MHC.sinkhorn_iters = 20`), says how to configure the site of one sub-layer from them (a
config of `mhc_jax.mappings`, which knows its own FLOPs, its parameters exempt from weight
decay and its pass-through start for retrofitting) and the module class that runs it. Every
setting fixes the model's function (a run started from a checkpoint must agree on it) unless
its field says `runtime` (how it runs, not what it computes).
"""

import dataclasses
from collections.abc import Callable

from flax import nnx

from mhc_jax.checks import check_int, one_line
from mhc_jax.mappings import HCConfig, MHCConfig
from mhc_jax.modules import HyperConnection, ManifoldHyperConnection
from mhc_jax.res_mappings import NEWTON_SCHULZ_SCHEDULES
from mhc_jax.sinkhorn import BACKENDS


def _runtime(default):
  """A setting that changes how the site runs, not what it computes."""
  return dataclasses.field(default=default, metadata={"runtime": True})


@dataclasses.dataclass(frozen=True)
class Streams:
  """What every stream variant sets: num_streams, the n of the streams `[..., n, d_model]`."""

  num_streams: int = 4

  def __post_init__(self):
    check_int(f"{type(self).__name__}.num_streams", self.num_streams)


@dataclasses.dataclass(frozen=True)
class HC(Streams):
  """Hyper-Connections: dynamic (token-dependent coefficients) or static; num_fracs: each
  stream's d_model split into that many fractions, mixed as num_streams * num_fracs units
  (Frac-connections; 1: none)."""

  dynamic: bool = True
  num_fracs: int = 1

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.dynamic, bool):
      raise ValueError(f"{type(self).__name__}.dynamic must be True or False, got "
                       f"{self.dynamic!r}")
    check_int(f"{type(self).__name__}.num_fracs", self.num_fracs)


@dataclasses.dataclass(frozen=True)
class Frac(HC):
  """Frac-connections (Zhu et al., 2025): one stream of d_model split into 4 fractions, the
  dynamic HC of those fractions (lucidrains' `num_fracs=4`)."""

  num_streams: int = 1
  num_fracs: int = 4


@dataclasses.dataclass(frozen=True)
class MHC(Streams):
  """mHC: Sinkhorn's iterations shape H_res; its backend does not (same values); num_fracs
  as HC's."""

  sinkhorn_iters: int = 20
  sinkhorn_backend: str = _runtime("auto")
  num_fracs: int = 1

  def __post_init__(self):
    super().__post_init__()
    check_int(f"{type(self).__name__}.sinkhorn_iters", self.sinkhorn_iters)
    check_int(f"{type(self).__name__}.num_fracs", self.num_fracs)
    if self.sinkhorn_backend not in BACKENDS:
      raise ValueError(f"{type(self).__name__}.sinkhorn_backend must be one of "
                       f"{', '.join(BACKENDS)}; got {self.sinkhorn_backend!r}")


@dataclasses.dataclass(frozen=True)
class MHCFrac(MHC):
  """mHC over Frac-connections: one stream of 4 fractions, H_res a 4 x 4 Sinkhorn mapping."""

  num_streams: int = 1
  num_fracs: int = 4


@dataclasses.dataclass(frozen=True)
class MHCLite(Streams):
  """mHC-lite: H_res a convex combination of the n! permutation matrices."""


@dataclasses.dataclass(frozen=True)
class KromHC(Streams):
  """KromHC: H_res a Kronecker product of 2x2 doubly stochastic factors (n a power of two)."""


@dataclasses.dataclass(frozen=True)
class MHCOrtho(Streams):
  """Orthostochastic H_res: schedule "converged" (to float32 rounding) or "tokenbender"."""

  schedule: str = "converged"

  def __post_init__(self):
    super().__post_init__()
    if self.schedule not in NEWTON_SCHULZ_SCHEDULES:
      raise ValueError(f"MHCOrtho.schedule must be one of {', '.join(NEWTON_SCHULZ_SCHEDULES)}"
                       f"; got {self.schedule!r}")


def function_settings(settings: Streams) -> dict[str, object]:
  """The settings that fix the function of the model, by field name."""
  return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
          if not field.metadata.get("runtime")}


@dataclasses.dataclass(frozen=True)
class Residual:
  """color: of its curves. join(h, site, norm, fn) -> the sub-layer's output; `h` is
  `[batch, seq, d_model]`, or the streams `[batch, seq, n, d_model]` for a stream variant.
  settings: its settings' class (None for a variant without streams).
  site_config(cfg, settings, layer_index) -> the `mhc_jax.mappings` config of one sub-layer's
  site (`layer_index` counts sub-layers, 2 per block); site_module: the module class running
  it (any `mhc_jax.site.SiteMixin` whose constructor takes the config's fields).
  retrofits: whether its site has a start at which equal streams pass as a pre-norm residual
  (`passthrough_params`), so that a pre-norm checkpoint can be retrofitted to it."""

  color: str
  join: Callable
  settings: type | None = None
  site_config: Callable | None = None
  site_module: type | None = None
  retrofits: bool = True

  @property
  def uses_streams(self) -> bool:
    return self.settings is not None

  def site(self, cfg, layer_index: int):
    """The site config of sub-layer `layer_index` of a model of `cfg` (a `ModelConfig`)."""
    return self.site_config(cfg, cfg.residual_settings, layer_index)

  def make_site(self, cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
    return self.site_module(**dataclasses.asdict(self.site(cfg, layer_index)), rngs=rngs)


def _prenorm(h, site, norm, fn):
  return h + fn(norm(h))


def _postnorm(h, site, norm, fn):
  return norm(h + fn(h))


def _through_site(h, site, norm, fn):
  return site(h, lambda x: fn(norm(x)))


def _hc(cfg, settings: HC, layer_index: int):
  return HCConfig(settings.num_streams, cfg.d_model, layer_index=layer_index,
                  dynamic=settings.dynamic, num_fracs=settings.num_fracs)


def _mhc(res_mapping: str):
  def site_config(cfg, settings: Streams, layer_index: int):
    return MHCConfig(settings.num_streams, cfg.d_model, layer_index=layer_index,
                     res_mapping=res_mapping, **_mhc_options(settings))
  return site_config


def _mhc_options(settings: Streams) -> dict:
  if isinstance(settings, MHC):
    return dict(sinkhorn_iters=settings.sinkhorn_iters,
                sinkhorn_backend=settings.sinkhorn_backend, num_fracs=settings.num_fracs)
  if isinstance(settings, MHCOrtho):
    return dict(orthostochastic_schedule=settings.schedule)
  return {}


RESIDUALS: dict[str, Residual] = {
    "prenorm": Residual("tab:blue", _prenorm),  # the baseline: h + F(norm(h))
    "postnorm": Residual("tab:orange", _postnorm),  # norm(h + F(h))
    "hc": Residual("tab:red", _through_site, HC, _hc, HyperConnection),
    "mhc": Residual("tab:green", _through_site, MHC, _mhc("sinkhorn"), ManifoldHyperConnection),
    "mhc_lite": Residual("tab:purple", _through_site, MHCLite, _mhc("permutations"),
                         ManifoldHyperConnection),
    "kromhc": Residual("tab:brown", _through_site, KromHC, _mhc("kromhc"),
                       ManifoldHyperConnection),
    "mhc_ortho": Residual("tab:cyan", _through_site, MHCOrtho, _mhc("orthostochastic"),
                          ManifoldHyperConnection),
    "frac": Residual("tab:olive", _through_site, Frac, _hc, HyperConnection),
    # A doubly stochastic H_res over fractions always mixes some channels across them: no
    # start passes equal streams as a pre-norm residual exactly.
    "mhc_frac": Residual("tab:pink", _through_site, MHCFrac, _mhc("sinkhorn"),
                         ManifoldHyperConnection, retrofits=False),
}


def resolve_settings(residual: str, settings):
  """`ModelConfig.residual_settings` as given -> the settings in force: None is the
  variant's defaults, a dict (a config.json record) its fields; one line for another
  variant's settings, or settings on a variant without streams."""
  cls = RESIDUALS[residual].settings
  if cls is None:
    if settings not in (None, {}):
      raise ValueError(f"residual {residual!r} has no settings; got residual_settings "
                       f"{settings!r}: leave it None")
    return None
  if settings is None:
    return cls()
  if isinstance(settings, dict):
    try:
      return cls(**settings)
    except TypeError as err:
      raise ValueError(f"residual_settings {settings!r} are not {cls.__name__}'s: "
                       f"{one_line(err, with_type=False)}") from None
  if type(settings) is not cls:
    raise ValueError(
        f"residual_settings is {settings!r}, but residual {residual!r} takes {cls.__name__}"
        f"(...): give that or None (its defaults), e.g. with_residual(cfg, {residual!r})")
  return settings


def with_residual(cfg, residual: str, *, num_streams: int | None = None, **settings):
  """`cfg` (a `ModelConfig`) as variant `residual` with its default settings but those
  given (`with_residual(cfg, "mhc", num_streams=2, sinkhorn_iters=4)`). `num_streams` is
  ignored by a variant without streams, so one call serves every variant of a comparison."""
  cls = RESIDUALS[residual].settings if residual in RESIDUALS else None
  if settings and cls is None:
    raise ValueError(f"residual {residual!r} has no settings; got {', '.join(settings)}")
  if cls is not None and num_streams is not None:
    settings["num_streams"] = num_streams
  return dataclasses.replace(cfg, residual=residual,
                             residual_settings=cls(**settings) if cls else None)
