"""The `pre` / `post` / `__call__` protocol shared by every hyper-connection module."""

from typing import Callable, NamedTuple

import jax

from mhc_jax import streams as streams_lib
from mhc_jax.mappings import check_streams


class SiteContext(NamedTuple):
  """What `pre` hands to `post`: the streams it read and the site's coefficients."""

  streams: jax.Array
  coefficients: streams_lib.Coefficients


class SiteMixin:
  """Expects `self.config` (with num_streams, dim, num_fracs), `self._params()` and
  `self._record`."""

  def compute_coefficients(self, streams: jax.Array) -> streams_lib.Coefficients:
    check_streams(streams, self.config.num_streams, self.config.dim)
    return self.config.coefficients(self._params(), streams)

  def pre(self, streams: jax.Array) -> tuple[jax.Array, SiteContext]:
    """`[..., n, C]` -> (branch input `[..., C]`, context for `post`)."""
    coefficients = self.compute_coefficients(streams)
    self._record(coefficients)
    branch_input = streams_lib.aggregate(streams, coefficients.h_pre, self.config.num_fracs)
    return branch_input, SiteContext(streams, coefficients)

  def post(self, branch_output: jax.Array, ctx: SiteContext) -> jax.Array:
    """Branch output `[..., C]` and the context from `pre` -> new streams `[..., n, C]`."""
    expected = ctx.streams.shape[:-2] + ctx.streams.shape[-1:]
    if tuple(branch_output.shape) != tuple(expected):
      raise ValueError(f"branch_output must have shape {tuple(expected)} (the streams' "
                       f"batch shape and dim), got {tuple(branch_output.shape)}")
    return streams_lib.merge(ctx.streams, branch_output, ctx.coefficients, self.config.num_fracs)

  def __call__(self, streams: jax.Array, branch_fn: Callable[[jax.Array], jax.Array]):
    """One residual site: `H_res X + H_post^T branch_fn(H_pre X)`."""
    branch_input, ctx = self.pre(streams)
    return self.post(branch_fn(branch_input), ctx)
