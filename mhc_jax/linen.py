"""Flax Linen versions of the hyper-connection modules: the same math and parameter names
as the NNX modules (`mhc_jax.modules`), over the same configs.

    site = mhc_jax.linen.ManifoldHyperConnection(MHCConfig(num_streams=4, dim=512))
    variables = site.init(key, streams, branch_fn)
    streams = site.apply(variables, streams, branch_fn)

Coefficients are sown into the `intermediates` collection (`mutable=["intermediates"]`).
Existing arrays (e.g. DeepSeek-V4's, see `from_deepseek_v4`) go in the usual Linen way:
`site.apply({"params": params}, ...)`.
"""

import flax.linen as nn
import jax

from mhc_jax import deepseek_v4
from mhc_jax.mappings import HCConfig, HeadConfig, MHCConfig, StreamEmbedConfig, check_streams
from mhc_jax.site import SiteMixin
from mhc_jax.streams import aggregate


class _ParamsModule(nn.Module):
  config: HCConfig | MHCConfig | HeadConfig | StreamEmbedConfig

  def setup(self):
    names = jax.eval_shape(self.config.init_params, jax.random.key(0)).keys()
    self.values = {name: self.param(name, lambda key, name=name: self.config.init_params(key)[name])
                   for name in names}

  def _params(self):
    return self.values

  def _record(self, coefficients):
    self.sow("intermediates", "coefficients", coefficients)


class HyperConnection(SiteMixin, _ParamsModule):
  """Hyper-Connections (Zhu et al.) at one site, configured by an `HCConfig`."""

  config: HCConfig


class ManifoldHyperConnection(SiteMixin, _ParamsModule):
  """mHC (or mHC-lite, KromHC, orthostochastic H_res: `MHCConfig.res_mapping`), configured by
  an `MHCConfig`."""

  config: MHCConfig

  @staticmethod
  def from_deepseek_v4(fn, base, scale, *, hc_eps: float = 1e-6, norm_eps: float = 1e-6,
                       sinkhorn_iters: int = 20):
    """-> (module, params) reproducing DeepSeek-V4's site; use
    `module.apply({"params": params}, ...)`."""
    n, c, params = deepseek_v4.site_params(fn, base, scale)
    config = MHCConfig(n, c, pre_eps=hc_eps, sinkhorn_eps=hc_eps, norm_eps=norm_eps,
                       sinkhorn_iters=sinkhorn_iters)
    return ManifoldHyperConnection(config), params


class StreamEmbedding(_ParamsModule):
  """Learned per-stream offsets added as the embedding is expanded into streams, configured
  by a `StreamEmbedConfig`: `[..., C]` -> `[..., n, C]`."""

  config: StreamEmbedConfig

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.config.embed(self.values, x)


class HyperHead(_ParamsModule):
  """Learned sigmoid-weighted collapse of the streams, configured by a `HeadConfig`."""

  config: HeadConfig

  @staticmethod
  def from_deepseek_v4(hc_fn, hc_base, hc_scale, *, hc_eps: float = 1e-6,
                       norm_eps: float = 1e-6):
    """-> (module, params) reproducing DeepSeek-V4's head."""
    n, c, params = deepseek_v4.head_params(hc_fn, hc_base, hc_scale)
    return HyperHead(HeadConfig(n, c, eps=hc_eps, norm_eps=norm_eps)), params

  def __call__(self, streams: jax.Array) -> jax.Array:
    check_streams(streams, self.config.num_streams, self.config.dim)
    return aggregate(streams, self.config.weights(self.values, streams))
