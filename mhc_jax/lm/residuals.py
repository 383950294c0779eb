"""The residual variants the LM compares: one table, read by the model, the train state's
diagnostics, the benchmarks and the reports. Adding a variant is one entry here (see the
README's "Adding a residual variant").

A variant says how a sub-layer `F` (attention or MLP, with its `norm`) joins the residual
path, whether the model carries `num_streams` streams, how to build a stream site, and the
colour its curves get in plots.
"""

import dataclasses
from collections.abc import Callable

from flax import nnx

from mhc_jax.modules import HyperConnection, ManifoldHyperConnection


@dataclasses.dataclass(frozen=True)
class Residual:
  """make_site(cfg, layer_index, rngs) -> the site module of one sub-layer (`layer_index`
  counts sub-layers, 2 per block), or None for a variant without streams.
  join(h, site, norm, fn) -> the sub-layer's output; `h` is `[batch, seq, d_model]`, or the
  streams `[batch, seq, n, d_model]` when `make_site` is given."""

  color: str
  join: Callable
  make_site: Callable[..., nnx.Module] | None = None

  @property
  def uses_streams(self) -> bool:
    return self.make_site is not None


def _prenorm(h, site, norm, fn):
  return h + fn(norm(h))


def _postnorm(h, site, norm, fn):
  return norm(h + fn(h))


def _through_site(h, site, norm, fn):
  return site(h, lambda x: fn(norm(x)))


def _hc_site(cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
  return HyperConnection(cfg.num_streams, cfg.d_model, layer_index=layer_index,
                         dynamic=cfg.hc_dynamic)


def _mhc_site(res_mapping: str):
  def make(cfg, layer_index: int, rngs: nnx.Rngs) -> nnx.Module:
    return ManifoldHyperConnection(
        cfg.num_streams, cfg.d_model, layer_index=layer_index, rngs=rngs,
        sinkhorn_iters=cfg.sinkhorn_iters, sinkhorn_backend=cfg.sinkhorn_backend,
        res_mapping=res_mapping)
  return make


RESIDUALS: dict[str, Residual] = {
    "prenorm": Residual("tab:blue", _prenorm),          # the baseline: h + F(norm(h))
    "postnorm": Residual("tab:orange", _postnorm),      # norm(h + F(h))
    "hc": Residual("tab:red", _through_site, _hc_site),  # static with hc_dynamic=False
    "mhc": Residual("tab:green", _through_site, _mhc_site("sinkhorn")),
    "mhc_lite": Residual("tab:purple", _through_site, _mhc_site("permutations")),
}
