"""The residual variants the LM compares: one table, and each entry says everything the rest
of the code asks of its variant. The model, FLOPs, the optimizer's weight decay, retrofitting,
`--init_from`, the train state's diagnostics, the benchmarks and the reports read it and never
name a variant. Adding one is one entry here (see the README's "Adding a residual variant").

A variant says how a sub-layer `F` (attention or MLP, with its `norm`) joins the residual
path and the colour its curves get in plots; a variant with `num_streams` streams also says
how to configure the site of one sub-layer (a config of `mhc_jax.mappings`, which knows its
own FLOPs, its parameters exempt from weight decay and its pass-through start for
retrofitting), the module class that runs it, and which `ModelConfig` fields beyond the
shared ones fix its function (for `--init_from`).
"""

import dataclasses
from collections.abc import Callable

from flax import nnx

from mhc_jax.mappings import HCConfig, MHCConfig
from mhc_jax.modules import HyperConnection, ManifoldHyperConnection


@dataclasses.dataclass(frozen=True)
class Residual:
  """color: of its curves. join(h, site, norm, fn) -> the sub-layer's output; `h` is
  `[batch, seq, d_model]`, or the streams `[batch, seq, n, d_model]` for a stream variant.
  site_config(cfg, layer_index) -> the `mhc_jax.mappings` config of one sub-layer's site
  (`layer_index` counts sub-layers, 2 per block), None for a variant without streams;
  site_module: the module class running it (any `mhc_jax.site.SiteMixin` whose constructor
  takes the config's fields). function_fields: the `ModelConfig` fields its site reads that
  fix the model's function (a run started from a checkpoint must agree on them)."""

  color: str
  join: Callable
  site_config: Callable | None = None
  site_module: type | None = None
  function_fields: tuple[str, ...] = ()

  @property
  def uses_streams(self) -> bool:
    return self.site_config is not None

  def make_site(self, cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
    config = self.site_config(cfg, layer_index)
    return self.site_module(**dataclasses.asdict(config), rngs=rngs)


def _prenorm(h, site, norm, fn):
  return h + fn(norm(h))


def _postnorm(h, site, norm, fn):
  return norm(h + fn(h))


def _through_site(h, site, norm, fn):
  return site(h, lambda x: fn(norm(x)))


def _hc(cfg, layer_index: int):
  return HCConfig(cfg.num_streams, cfg.d_model, layer_index=layer_index, dynamic=cfg.hc_dynamic)


def _mhc(res_mapping: str):
  def site_config(cfg, layer_index: int):
    return MHCConfig(
        cfg.num_streams, cfg.d_model, layer_index=layer_index, res_mapping=res_mapping,
        sinkhorn_iters=cfg.sinkhorn_iters, sinkhorn_backend=cfg.sinkhorn_backend)
  return site_config


_STREAMS = ("num_streams",)
RESIDUALS: dict[str, Residual] = {
    "prenorm": Residual("tab:blue", _prenorm),  # the baseline: h + F(norm(h))
    "postnorm": Residual("tab:orange", _postnorm),  # norm(h + F(h))
    # Static with hc_dynamic=False.
    "hc": Residual("tab:red", _through_site, _hc, HyperConnection, _STREAMS + ("hc_dynamic",)),
    # Sinkhorn's iterations shape H_res; its backend does not (same values).
    "mhc": Residual("tab:green", _through_site, _mhc("sinkhorn"), ManifoldHyperConnection,
                    _STREAMS + ("sinkhorn_iters",)),
    "mhc_lite": Residual("tab:purple", _through_site, _mhc("permutations"),
                         ManifoldHyperConnection, _STREAMS),
    "kromhc": Residual("tab:brown", _through_site, _mhc("kromhc"), ManifoldHyperConnection,
                       _STREAMS),
    "mhc_ortho": Residual("tab:cyan", _through_site, _mhc("orthostochastic"),
                          ManifoldHyperConnection, _STREAMS),
}
