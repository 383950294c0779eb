"""Pure functions on residual streams, layout `[..., num_streams, dim]`.

The update of one site (attention or MLP), in the mHC paper's notation:

    X_out = H_res @ X + H_post^T * F(H_pre @ X)

`aggregate` is `H_pre @ X`, `merge` is the rest. Mixing runs in float32 (float64 streams stay
float64) and returns the streams' dtype.

Every contraction over the stream axis asks for HIGHEST precision explicitly. At DEFAULT, the
one `jax.default_matmul_precision` governs, TPUs multiply float32 in one bfloat16 pass (GPUs
in TF32): the identity path `H_res @ X` would then be rounded to 8 mantissa bits at every
sub-layer, and the rows of `H_res` would in effect no longer sum to 1. The contractions are
`n` deep, so full precision costs little; they stay dot_generals for XLA to fuse.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mhc_jax.checks import check_int

_HIGHEST = jax.lax.Precision.HIGHEST


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
  check_int("num_streams", num_streams)
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], num_streams, x.shape[-1]))


def reduce_streams(streams: jax.Array) -> jax.Array:
  """`[..., n, dim]` -> `[..., dim]`: the sum over streams (HC paper, mHC-lite)."""
  if streams.ndim < 2:
    raise ValueError(f"streams must have shape [..., num_streams, dim], got {streams.shape}")
  return jnp.sum(streams.astype(jnp.float32), axis=-2).astype(streams.dtype)


def _mixing_dtype(streams: jax.Array) -> jnp.dtype:
  return jnp.promote_types(streams.dtype, jnp.float32)


def aggregate(streams: jax.Array, h_pre: jax.Array) -> jax.Array:
  """`H_pre @ X`: `[..., n, dim]`, `[..., n]` -> `[..., dim]` (the branch input)."""
  out = jnp.einsum("...n,...nc->...c", h_pre, streams.astype(_mixing_dtype(streams)),
                   precision=_HIGHEST)
  return out.astype(streams.dtype)


def merge(streams: jax.Array, branch_output: jax.Array, coefficients: Coefficients) -> jax.Array:
  """`H_res @ X + H_post^T F`: `[..., n, dim]`, `[..., dim]` -> `[..., n, dim]`."""
  dtype = _mixing_dtype(streams)
  mixed = jnp.einsum("...kj,...jc->...kc", coefficients.h_res, streams.astype(dtype),
                     precision=_HIGHEST)
  spread = coefficients.h_post[..., :, None] * branch_output.astype(dtype)[..., None, :]
  return (mixed + spread).astype(streams.dtype)
