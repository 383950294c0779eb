"""The checked public entry point for Sinkhorn-Knopp."""

import jax
import jax.numpy as jnp

from kernels_pallas.sinkhorn import sinkhorn_xla


def sinkhorn_knopp(logits: jax.Array, num_iters: int = 20, *, eps: float = 0.0) -> jax.Array:
  """Projects `[..., n, n]` logits onto (approximately) doubly-stochastic matrices.

  The mHC paper's algorithm: max-subtracted exp, then `num_iters` times a column
  normalisation followed by a row normalisation (rows sum to 1 exactly, columns
  approximately). `eps > 0` gives DeepSeek-V4's placement: `softmax + eps` as the first
  column step and `sum + eps` in every later denominator. Semantics are frozen in
  `kernels_pallas.sinkhorn.reference`.

  Math runs in float32 for float32/bfloat16/float16 input (float64 stays float64) and the
  result has that dtype. The gradient is the exact reverse of the unrolled iterations,
  recomputed from the saved logits. `-inf` logits are masked entries; every row and column
  must keep one finite entry.
  """
  if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
    raise ValueError(f"logits must be an array, got {type(logits).__name__}")
  if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
    raise ValueError(
        f"logits must have square last two axes [..., n, n], got shape {tuple(logits.shape)}")
  if logits.shape[-1] < 1:
    raise ValueError(f"logits must have n >= 1, got shape {tuple(logits.shape)}")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"logits must be a floating-point array, got dtype {logits.dtype}")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters must be an int >= 1, got {num_iters!r}")
  if not eps >= 0:
    raise ValueError(f"eps must be >= 0, got {eps!r}")
  return sinkhorn_xla(logits, num_iters, float(eps))
