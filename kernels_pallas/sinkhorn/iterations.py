"""The Sinkhorn-Knopp steps and their exact backward, on whichever axes hold the matrix.

One implementation of the arithmetic for every fast path: the XLA custom VJP runs it on
`[..., n, n]` arrays (`MATRICES_LAST`), the Pallas kernels on lane-dense `(n, n, *tokens)`
blocks (`TOKENS_LAST`). What differs between them is only the schedule around these steps
(which iterates the backward keeps, and where).

* The first iteration runs in the log domain (column log-softmax, `+ eps` as a log-add-exp,
  row log-sum-exp), so logits far apart (up to +-1e4, or `-inf` for masked entries) give
  finite values. After it every row holds an entry >= 1/n and every column one >= 1/n^2, so
  the later iterations cannot divide by an underflowed sum and run in the exp domain,
  dividing by `sum + eps` through one reciprocal per row/column and multiplies.
* Backward of one normalisation `M' = M / (sum_axis(M) + eps)`, written for
  `g = dLoss/dlog M`: `g_in = g_out - M' * sum_axis(g_out)`. It needs only the matrix
  after the step, so a backward recomputes the iterates from the logits.

`off`, where given, marks entries outside the real matrix (the GPU kernel pads n to a power
of two; see `gpu.py`). They must stay exactly 0, which only the `+ eps` step would break.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.sinkhorn.reference import COLS_AXIS, ROWS_AXIS


class Axes(NamedTuple):
  """Where a matrix's two indices are in an array."""
  rows: int  # summing over it gives row sums: the column index j
  cols: int  # summing over it gives column sums: the row index i


MATRICES_LAST = Axes(rows=ROWS_AXIS, cols=COLS_AXIS)  # [..., n, n], as in reference.py
TOKENS_LAST = Axes(rows=1, cols=0)  # (n, n, *tokens), the kernels' lane-dense layout


def _sum(m: jax.Array, axis: int) -> jax.Array:
  return jnp.sum(m, axis=axis, keepdims=True)


def _log_add_eps(log_x: jax.Array, eps: float) -> jax.Array:
  """log(exp(log_x) + eps), stable for log_x = -inf and for |log_x| large."""
  if eps == 0:
    return log_x
  log_eps = math.log(eps)
  return jnp.maximum(log_x, log_eps) + jnp.log1p(jnp.exp(-jnp.abs(log_x - log_eps)))


def _log_sum_exp(x: jax.Array, axis: int) -> jax.Array:
  top = jnp.max(x, axis=axis, keepdims=True)  # finite: every row/column has a finite entry
  return top + jnp.log(_sum(jnp.exp(x - top), axis))


def first_iteration(x: jax.Array, eps: float, axes: Axes,
                    off: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Logits -> (column softmax `q`, `m2` = the matrix after the first row step)."""
  shifted = x - jnp.max(x, axis=axes.cols, keepdims=True)  # this order keeps |x| ~ 1e4 exact
  log_q = shifted - jnp.log(_sum(jnp.exp(shifted), axes.cols))
  log_m1 = _log_add_eps(log_q, eps)
  if off is not None and eps > 0:
    log_m1 = jnp.where(off, -jnp.inf, log_m1)
  log_m2 = log_m1 - _log_add_eps(_log_sum_exp(log_m1, axes.rows), eps)
  return jnp.exp(log_q), jnp.exp(log_m2)


def _normalise(m: jax.Array, axis: int, eps: float) -> jax.Array:
  return m * (1.0 / (_sum(m, axis) + eps))  # n reciprocals, n^2 multiplies


def iteration(m: jax.Array, eps: float, axes: Axes) -> tuple[jax.Array, jax.Array]:
  """One later (exp-domain) iteration: (after the column step, after the row step)."""
  m_col = _normalise(m, axes.cols, eps)
  return m_col, _normalise(m_col, axes.rows, eps)


def advance(m: jax.Array, num_iters, eps: float, axes: Axes) -> jax.Array:
  """`num_iters` (static or traced) later iterations from `m`."""
  return jax.lax.fori_loop(0, num_iters, lambda _, m: iteration(m, eps, axes)[1], m)


def forward(x: jax.Array, num_iters: int, eps: float, axes: Axes,
            off: jax.Array | None = None) -> jax.Array:
  """Logits -> the Sinkhorn output after all `num_iters` iterations."""
  return advance(first_iteration(x, eps, axes, off)[1], num_iters - 1, eps, axes)


def _back(g: jax.Array, m_after: jax.Array, axis: int) -> jax.Array:
  """Backward of one normalisation on log-gradients: `g - M_after * sum_axis(g)`."""
  return g - m_after * _sum(g, axis)


def back_through_iteration(g: jax.Array, m_col: jax.Array, m_row: jax.Array,
                           axes: Axes) -> jax.Array:
  """Log-gradient after a later iteration -> before it, from that iteration's two iterates."""
  return _back(_back(g, m_row, axes.rows), m_col, axes.cols)


def back_through_first(g: jax.Array, q: jax.Array, m2: jax.Array, eps: float,
                       axes: Axes) -> jax.Array:
  """Log-gradient after the first iteration -> gradient of the logits, from
  `first_iteration`'s `(q, m2)`."""
  g = _back(g, m2, axes.rows)
  if eps > 0:  # through log(q + eps) back to log(q); 0 (not 0/0) where q = 0
    g = g * (q / (q + eps))
  return _back(g, q, axes.cols)  # through the column log-softmax
