"""Pure functions on residual streams, layout `[..., num_streams, dim]`.

The update of one site (attention or MLP), in the mHC paper's notation:

    X_out = H_res @ X + H_post^T * F(H_pre @ X)

`aggregate` is `H_pre @ X`, `merge` is the rest. Mixing runs in float32 and returns the
streams' dtype.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Coefficients(NamedTuple):
  """The three mappings of one site. Leading axes are the tokens' (or absent if static).

  h_pre:  [..., n]     weights that collapse the streams into the branch input.
  h_post: [..., n]     weights that spread the branch output back over the streams.
  h_res:  [..., n, n]  stream mixing, applied as `H_res @ X` (row k = output stream k).
  """

  h_pre: jax.Array
  h_post: jax.Array
  h_res: jax.Array


def expand_streams(x: jax.Array, num_streams: int) -> jax.Array:
  """`[..., dim]` -> `[..., num_streams, dim]`: the input copied into every stream."""
  if isinstance(num_streams, bool) or not isinstance(num_streams, int) or num_streams < 1:
    raise ValueError(f"num_streams must be an int >= 1, got {num_streams!r}")
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], num_streams, x.shape[-1]))


def reduce_streams(streams: jax.Array) -> jax.Array:
  """`[..., n, dim]` -> `[..., dim]`: the sum over streams (HC paper, mHC-lite)."""
  if streams.ndim < 2:
    raise ValueError(f"streams must have shape [..., num_streams, dim], got {streams.shape}")
  return jnp.sum(streams.astype(jnp.float32), axis=-2).astype(streams.dtype)


def aggregate(streams: jax.Array, h_pre: jax.Array) -> jax.Array:
  """`H_pre @ X`: `[..., n, dim]`, `[..., n]` -> `[..., dim]` (the branch input)."""
  out = jnp.einsum("...n,...nc->...c", h_pre, streams.astype(jnp.float32))
  return out.astype(streams.dtype)


def merge(streams: jax.Array, branch_output: jax.Array, coefficients: Coefficients) -> jax.Array:
  """`H_res @ X + H_post^T F`: `[..., n, dim]`, `[..., dim]` -> `[..., n, dim]`."""
  mixed = jnp.einsum("...kj,...jc->...kc", coefficients.h_res, streams.astype(jnp.float32))
  spread = coefficients.h_post[..., :, None] * branch_output.astype(jnp.float32)[..., None, :]
  return (mixed + spread).astype(streams.dtype)
