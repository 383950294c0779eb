"""What the Sinkhorn tests share: inputs, the error measure, the float64 references, and the
comparison of a kernel with XLA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sinkhorn import IMPLEMENTATIONS, sinkhorn_reference


def rel_err(out, ref) -> float:
  """Relative error in the Frobenius norm, computed in float64."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_logits(seed, shape, scale=3.0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape) * scale


def value_and_vjp(fn, logits, cotangent):
  """(fn(logits), d<fn(logits), cotangent>/dlogits) in one compiled call."""
  def both(x, c):
    out, vjp = jax.vjp(fn, x)
    return out, vjp(c)[0]
  return jax.jit(both)(logits, cotangent)


def xla(num_iters=20, eps=0.0):
  """The XLA implementation as `logits -> output`, what the kernels are compared against."""
  return lambda x: IMPLEMENTATIONS["xla"].fn(x, num_iters, eps)


TOL = 1e-5  # relative error of a kernel against XLA: float32 rounding of the same steps


def check_against_xla(fn, logits, cotangent, num_iters=20, eps=0.0):
  """`fn`'s output and gradient: finite (in interpret mode: every element written), float32
  and the input's dtype, and within TOL of XLA's. Returns them."""
  out, grad = value_and_vjp(fn, logits, cotangent)
  ref_out, ref_grad = value_and_vjp(xla(num_iters, eps), logits, cotangent)
  assert out.shape == logits.shape and out.dtype == jnp.float32
  assert grad.shape == logits.shape and grad.dtype == logits.dtype
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  assert rel_err(out, ref_out) <= TOL and rel_err(grad, ref_grad) <= TOL
  return out, grad


def reference64(logits, cotangent=None, num_iters=20, eps=0.0):
  """The plain loop's output, and its VJP of `cotangent` if given, in float64 (numpy).
  Eager: compiling the unrolled loop would take seconds."""
  with jax.enable_x64(True):
    out, vjp = jax.vjp(lambda x: sinkhorn_reference(x, num_iters, eps),
                       jnp.asarray(logits, jnp.float64))
    if cotangent is None:
      return np.asarray(out)
    return np.asarray(out), np.asarray(vjp(jnp.asarray(cotangent, jnp.float64))[0])


@functools.lru_cache
def reference_case(n, eps, num_iters):
  """Logits of 129 tokens (a ragged count for the kernels), a cotangent, the float64
  reference's output and VJP, and XLA's; cached so every implementation shares them."""
  logits = random_logits(n * 100 + num_iters, (3, 43, n, n))
  cotangent = random_logits(n + 1, (3, 43, n, n), 1.0)
  xla_out, xla_grad = value_and_vjp(xla(num_iters, eps), jnp.asarray(logits, jnp.float32),
                                    jnp.asarray(cotangent, jnp.float32))
  return logits, cotangent, reference64(logits, cotangent, num_iters, eps), (xla_out, xla_grad)
