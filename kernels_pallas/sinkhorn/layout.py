"""The Pallas kernels' lane-dense layout: `[..., n, n]` -> `(n, n, B)`, tokens last.

With the B = prod(...) tokens last, a matrix is a stack of token vectors and a row or column
sum is an add across a leading axis: `n - 1` whole-vector adds, never a cross-lane
reduction, never a block that fills 4 of 128 lanes. Each platform module pads B to its block
size with `pad_to` and slices the padding off again.
"""

import jax
import jax.numpy as jnp


def to_lanes(x: jax.Array) -> jax.Array:
  """`[..., n, n]` (any float dtype) -> `(n, n, B)` float32, tokens on the last axis."""
  n = x.shape[-1]
  return jnp.moveaxis(x.reshape(-1, n, n).astype(jnp.float32), 0, -1)


def from_lanes(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`(n, n, B)` -> `shape` (`[..., n, n]`), the inverse of `to_lanes` up to dtype."""
  return jnp.moveaxis(y, -1, 0).reshape(shape)


def pad_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads every axis at its end up to `shape`. Zero logits make a uniform matrix
  (finite), and tokens never mix, so padded tokens cannot reach the real ones."""
  return jnp.pad(x, [(0, size - dim) for dim, size in zip(x.shape, shape)])


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple
