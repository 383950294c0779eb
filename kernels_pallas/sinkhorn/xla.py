"""Sinkhorn-Knopp in XLA with an exact, memory-light custom VJP.

Same semantics as `reference.sinkhorn_reference` (see there), computed by the steps in
`iterations.py` on `[..., n, n]` arrays, with two differences from the plain loop:

* Range. The first iteration runs in the log domain, so logits far apart (up to ±1e4, or
  `-inf` for masked entries) give finite values and gradients.
* Memory. The forward saves only the logits. The backward recomputes the iterates from them
  and walks the unrolled normalisations in reverse, exactly (not the implicit fixed-point
  gradient, which is exact only at convergence).
"""

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.sinkhorn import iterations
from kernels_pallas.sinkhorn.iterations import MATRICES_LAST


def compute_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs; float64 stays float64 (for references)."""
  return jnp.promote_types(dtype, jnp.float32)


def _forward(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
  return iterations.forward(logits.astype(compute_dtype(logits.dtype)), num_iters, eps,
                            MATRICES_LAST)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sinkhorn_xla(logits: jax.Array, num_iters: int = 20, eps: float = 0.0) -> jax.Array:
  """`[..., n, n]` logits -> doubly-stochastic `[..., n, n]` in float32 (float64 stays).

  Arguments are not validated here: `api.sinkhorn_knopp` is the checked entry point.
  """
  return _forward(logits, num_iters, eps)


def _fwd(logits, num_iters, eps):
  return _forward(logits, num_iters, eps), logits


def _bwd(num_iters, eps, logits, g):
  x = logits.astype(compute_dtype(logits.dtype))
  q, m2 = iterations.first_iteration(x, eps, MATRICES_LAST)

  def recompute(m, _):
    m_col, m_row = iterations.iteration(m, eps, MATRICES_LAST)
    return m_row, (m_col, m_row)

  # XLA keeps every later iterate (2 (num_iters - 1) matrices per token) for the reverse walk:
  # the kernels, short of on-chip memory, recompute them instead (see tpu.py, gpu.py).
  out, later_iterates = jax.lax.scan(recompute, m2, length=num_iters - 1)

  def reverse(g_log, iterate):
    return iterations.back_through_iteration(g_log, *iterate, MATRICES_LAST), None

  g_log = g.astype(x.dtype) * out  # the cotangent of log(out)
  g_log, _ = jax.lax.scan(reverse, g_log, later_iterates, reverse=True)
  g_logits = iterations.back_through_first(g_log, q, m2, eps, MATRICES_LAST)
  return (g_logits.astype(logits.dtype),)


sinkhorn_xla.defvjp(_fwd, _bwd)
