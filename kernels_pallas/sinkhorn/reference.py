"""The plain Sinkhorn-Knopp loop that defines the semantics every fast path must match.

Matrices are `H_res` as applied to the streams (`X_out = H_res @ X`), shape `[..., n, n]`.
One iteration is a column normalisation followed by a row normalisation, so after the last
step every row sums to 1 exactly and the columns approximately.

`eps` follows DeepSeek-V4's placement, which with `eps = 0` is exactly the mHC paper:

    M = softmax over each column of the logits, + eps       # the first column step
    M = M / (row sums + eps)                                # the first row step
    repeat num_iters - 1 times:
        M = M / (column sums + eps);  M = M / (row sums + eps)

The first column step is a softmax (`exp(L - column max)` normalised), which is the paper's
`exp(L - max)` followed by a column normalisation: exact, since a column normalisation
removes any per-column constant.

This loop is differentiated by plain autodiff and computed in the dtype it is given; tests
run it in float64. Written for clarity, not speed or range: with logits far apart (|L| of
hundreds) a row of `M` underflows to zero and the loop returns NaN, where `sinkhorn_xla`
stays finite.
"""

import jax
import jax.numpy as jnp

ROWS_AXIS = -1  # summing over it gives row sums
COLS_AXIS = -2  # summing over it gives column sums


def sinkhorn_reference(logits: jax.Array, num_iters: int = 20, eps: float = 0.0) -> jax.Array:
  """`[..., n, n]` logits -> `[..., n, n]` (approximately) doubly-stochastic matrices."""
  m = jax.nn.softmax(logits, axis=COLS_AXIS) + eps
  m = m / (jnp.sum(m, axis=ROWS_AXIS, keepdims=True) + eps)
  for _ in range(num_iters - 1):
    m = m / (jnp.sum(m, axis=COLS_AXIS, keepdims=True) + eps)
    m = m / (jnp.sum(m, axis=ROWS_AXIS, keepdims=True) + eps)
  return m
