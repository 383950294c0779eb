"""Flax NNX hyper-connection modules: thin shells over `mhc_jax.mappings`.

Parameters are `nnx.Param` attributes named as in the configs' `init_params`. With
`sow_coefficients=True` each call also sows its `Coefficients` as `nnx.Intermediate`
`coefficients`, for diagnostics from the same forward pass, collected as Flax's own modules'
are (`sow_weights`): `out, intermediates = nnx.capture(model, nnx.Intermediate)(x)`. Outside
`nnx.capture` Flax deprecates sowing (it warns, and keeps the values on the module).
"""

import jax
from flax import nnx

from mhc_jax import deepseek_v4
from mhc_jax.mappings import HCConfig, HeadConfig, MHCConfig, StreamEmbedConfig, check_streams
from mhc_jax.site import SiteMixin
from mhc_jax.streams import aggregate


class _ParamsModule(nnx.Module):
  """Holds a config and its parameters as `nnx.Param` attributes."""

  def __init__(self, config, rngs: nnx.Rngs | None, params=None, sow_coefficients=False):
    self.config = config
    self.sow_coefficients = sow_coefficients
    if params is None:
      if rngs is None:
        raise ValueError("rngs must be given (nnx.Rngs) when params are not")
      params = config.init_params(rngs.params())
    self._param_names = tuple(params)
    for name, value in params.items():
      # Tagged for optimizers: `weight_decay=False` on what the method exempts (HC's
      # static maps), `static_map=True` on what has its own rate (HC's maps and scales);
      # `mhc_jax.lm.optimizer` reads the tags.
      tags = {"weight_decay": False} if name in config.no_weight_decay else {}
      tags |= {"static_map": True} if name in config.static_maps else {}
      setattr(self, name, nnx.Param(value, **tags))

  def _params(self):
    return {name: getattr(self, name)[...] for name in self._param_names}

  def _record(self, coefficients):
    if self.sow_coefficients:
      self.sow(nnx.Intermediate, "coefficients", coefficients)


class HyperConnection(SiteMixin, _ParamsModule):
  """Hyper-Connections (Zhu et al.) at one site; options: see `mappings.HCConfig`.

      hc = HyperConnection(num_streams=4, dim=512, layer_index=i, rngs=nnx.Rngs(0))
      streams = hc(streams, lambda x: attention(norm(x)))
  """

  def __init__(self, num_streams: int, dim: int, *, rngs: nnx.Rngs | None = None,
               sow_coefficients: bool = False, **options):
    # The paper's initialisation is deterministic: rngs is accepted for symmetry only.
    super().__init__(HCConfig(num_streams, dim, **options), rngs or nnx.Rngs(0),
                     sow_coefficients=sow_coefficients)


class ManifoldHyperConnection(SiteMixin, _ParamsModule):
  """mHC (DeepSeek) at one site; `res_mapping` picks H_res: "permutations" (mHC-lite),
  "kromhc", "orthostochastic" (see `mhc_jax.res_mappings`); options: `mappings.MHCConfig`.

      mhc = ManifoldHyperConnection(num_streams=4, dim=512, layer_index=i, rngs=nnx.Rngs(0))
      streams = mhc(streams, lambda x: mlp(norm(x)))
  """

  def __init__(self, num_streams: int, dim: int, *, rngs: nnx.Rngs | None = None,
               sow_coefficients: bool = False, params=None, **options):
    super().__init__(MHCConfig(num_streams, dim, **options), rngs, params, sow_coefficients)

  @classmethod
  def from_deepseek_v4(cls, fn, base, scale, *, hc_eps: float = 1e-6, norm_eps: float = 1e-6,
                       sinkhorn_iters: int = 20, sow_coefficients: bool = False):
    """A site from DeepSeek-V4's `fn [(2+n)n, nC]`, `base [(2+n)n]`, `scale [3]`, computing
    exactly what DeepSeek-V4 computes (see `mhc_jax.deepseek_v4`)."""
    n, c, params = deepseek_v4.site_params(fn, base, scale)
    return cls(n, c, params=params, sow_coefficients=sow_coefficients, pre_eps=hc_eps,
               sinkhorn_eps=hc_eps, norm_eps=norm_eps, sinkhorn_iters=sinkhorn_iters)


class StreamEmbedding(_ParamsModule):
  """Learned per-stream offsets added as the embedding is expanded into streams (lucidrains'
  `StreamEmbed`); see `mappings.StreamEmbedConfig`. `[..., C]` -> `[..., n, C]`.

      embed = StreamEmbedding(num_streams=4, dim=512)
      streams = embed(token_embedding)   # in place of expand_streams(token_embedding, 4)
  """

  def __init__(self, num_streams: int, dim: int, *, rngs: nnx.Rngs | None = None, params=None):
    # Zeros at the start: rngs is accepted for symmetry only.
    super().__init__(StreamEmbedConfig(num_streams, dim), rngs or nnx.Rngs(0), params)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.config.embed(self._params(), x)


class HyperHead(_ParamsModule):
  """Learned sigmoid-weighted collapse of the streams (DeepSeek-V4's head); options: see
  `mappings.HeadConfig`. `[..., n, C]` -> `[..., C]`; the model's final norm follows."""

  def __init__(self, num_streams: int, dim: int, *, rngs: nnx.Rngs | None = None,
               params=None, **options):
    super().__init__(HeadConfig(num_streams, dim, **options), rngs, params)

  @classmethod
  def from_deepseek_v4(cls, hc_fn, hc_base, hc_scale, *, hc_eps: float = 1e-6,
                       norm_eps: float = 1e-6):
    n, c, params = deepseek_v4.head_params(hc_fn, hc_base, hc_scale)
    return cls(n, c, params=params, eps=hc_eps, norm_eps=norm_eps)

  def __call__(self, streams: jax.Array) -> jax.Array:
    check_streams(streams, self.config.num_streams, self.config.dim)
    return aggregate(streams, self.config.weights(self._params(), streams))
