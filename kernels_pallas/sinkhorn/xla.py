"""Sinkhorn-Knopp in XLA with an exact, memory-light custom VJP.

Same semantics as `reference.sinkhorn_reference` (see there), with two differences in how it
is computed:

* Range. The first iteration runs in the log domain, so logits far apart (up to ±1e4, or
  `-inf` for masked entries) give finite values and gradients. After one full iteration every
  row holds an entry ≥ 1/n and every column one ≥ 1/n², so the remaining iterations cannot
  divide by an underflowed sum and run in the cheaper exp domain.
* Memory. The forward saves only the logits. The backward recomputes the iterates from them
  and walks the unrolled normalisations in reverse, exactly (not the implicit fixed-point
  gradient, which is exact only at convergence).

Backward of one normalisation `M' = M / (sum_axis(M) + eps)`, written for `ḡ = dLoss/dlog M`:
`ḡ_in = ḡ_out - M' * sum_axis(ḡ_out)`. It needs only the matrix after the step.
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.sinkhorn.reference import COLS_AXIS, ROWS_AXIS


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs; float64 stays float64 (for references)."""
  return jnp.promote_types(dtype, jnp.float32)


def _log_add_eps(log_x: jax.Array, eps: float) -> jax.Array:
  """log(exp(log_x) + eps) without leaving the log domain."""
  return jnp.logaddexp(log_x, jnp.log(eps)) if eps > 0 else log_x


def _first_iteration(logits: jax.Array, eps: float):
  """Softmax start (+eps) and the first row step, in the log domain.

  Returns (q, m1, m2): the column softmax, the matrix after the column step (q + eps) and
  after the row step.
  """
  log_q = jax.nn.log_softmax(logits, axis=COLS_AXIS)
  log_m1 = _log_add_eps(log_q, eps)
  log_rows = jax.nn.logsumexp(log_m1, axis=ROWS_AXIS, keepdims=True)
  log_m2 = log_m1 - _log_add_eps(log_rows, eps)
  return jnp.exp(log_q), jnp.exp(log_m1), jnp.exp(log_m2)


def _normalise(m: jax.Array, axis: int, eps: float) -> jax.Array:
  return m / (jnp.sum(m, axis=axis, keepdims=True) + eps)


def _iteration(m: jax.Array, eps: float):
  """One later iteration in the exp domain; returns (after column step, after row step)."""
  m_col = _normalise(m, COLS_AXIS, eps)
  return m_col, _normalise(m_col, ROWS_AXIS, eps)


def _back_through_step(g_log: jax.Array, m_after: jax.Array, axis: int) -> jax.Array:
  return g_log - m_after * jnp.sum(g_log, axis=axis, keepdims=True)


def _forward(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
  x = logits.astype(compute_dtype(logits.dtype))
  _, _, m = _first_iteration(x, eps)

  def body(_, m):
    return _iteration(m, eps)[1]

  return jax.lax.fori_loop(0, num_iters - 1, body, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sinkhorn_xla(logits: jax.Array, num_iters: int = 20, eps: float = 0.0) -> jax.Array:
  """`[..., n, n]` logits -> doubly-stochastic `[..., n, n]` in float32 (float64 stays).

  Arguments are not validated here: `mhc_jax.sinkhorn_knopp` is the checked entry point.
  """
  return _forward(logits, num_iters, eps)


def _fwd(logits, num_iters, eps):
  return _forward(logits, num_iters, eps), logits


def _bwd(num_iters, eps, logits, g):
  x = logits.astype(compute_dtype(logits.dtype))
  q, m1, m2 = _first_iteration(x, eps)

  def recompute(m, _):
    m_col, m_row = _iteration(m, eps)
    return m_row, (m_col, m_row)

  out, later_iterates = jax.lax.scan(recompute, m2, length=num_iters - 1)

  def reverse(g_log, iterate):
    m_col, m_row = iterate
    g_log = _back_through_step(g_log, m_row, ROWS_AXIS)
    return _back_through_step(g_log, m_col, COLS_AXIS), None

  g_log = g.astype(x.dtype) * out
  g_log, _ = jax.lax.scan(reverse, g_log, later_iterates, reverse=True)
  g_log = _back_through_step(g_log, m2, ROWS_AXIS)
  if eps > 0:  # through log(q + eps) back to log(q)
    g_log = g_log * (q / m1)
  g_logits = _back_through_step(g_log, q, COLS_AXIS)  # through the column log-softmax
  return (g_logits.astype(logits.dtype),)


sinkhorn_xla.defvjp(_fwd, _bwd)
