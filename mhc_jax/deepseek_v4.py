"""DeepSeek-V4's per-site mHC arrays -> this library's configs and parameters.

DeepSeek-V4 keeps, per site, `fn [(2+n)n, nC]` (row blocks pre, post, comb), `base [(2+n)n]`
and `scale [3]`, and applies its mixing matrix `comb` transposed
(`out_k = post_k F + sum_j comb[j, k] X_j`). Here `H_res` is applied as `H_res @ X`, so
`H_res = comb^T`: the comb rows of `fn` and `base` are permuted from `comb`'s row-major
order into `H_res`'s. The Sinkhorn iteration on the transposed logits is then exactly
DeepSeek-V4's (softmax + eps, `sum + eps` denominators, 20 column/row pairs).
"""

import math

import jax.numpy as jnp
import numpy as np


def _as_float32(name: str, array) -> np.ndarray:
  try:
    return np.asarray(array, dtype=np.float32)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name} must be a numeric array: {err}") from None


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
  if array.shape != shape:
    raise ValueError(f"{name} must have shape {shape}, got {array.shape}")


def streams_and_dim(fn: np.ndarray) -> tuple[int, int]:
  """Recovers (n, C) from `fn [(2+n)n, nC]`."""
  if fn.ndim != 2:
    raise ValueError(f"fn must have shape [(2+n)*n, n*C], got {fn.shape}")
  rows, cols = fn.shape
  n = math.isqrt(rows + 1) - 1  # (2+n)n = (n+1)^2 - 1
  if n < 1 or (2 + n) * n != rows or cols % n:
    raise ValueError(f"fn must have shape [(2+n)*n, n*C] for some n >= 1, C >= 1, got {fn.shape}")
  return n, cols // n


def site_params(fn, base, scale) -> tuple[int, int, dict]:
  """-> (num_streams, dim, params of an `MHCConfig` with res_mapping='sinkhorn')."""
  fn = _as_float32("fn", fn)
  n, c = streams_and_dim(fn)
  base, scale = _as_float32("base", base), _as_float32("scale", scale)
  _check_shape("base", base, ((2 + n) * n,))
  _check_shape("scale", scale, (3,))
  # comb row-major [j, k] -> H_res row-major [k, j]
  order = np.concatenate([np.arange(2 * n),
                          2 * n + np.arange(n * n).reshape(n, n).T.reshape(-1)])
  params = {"phi": jnp.asarray(fn[order].T), "alpha": jnp.asarray(scale),
            "bias": jnp.asarray(base[order])}
  return n, c, params


def head_params(hc_fn, hc_base, hc_scale) -> tuple[int, int, dict]:
  """-> (num_streams, dim, params of a `HeadConfig`) from `hc_fn [n, nC]`, `[n]`, `[1]`."""
  hc_fn = _as_float32("hc_fn", hc_fn)
  if hc_fn.ndim != 2 or hc_fn.shape[0] < 1 or hc_fn.shape[1] % hc_fn.shape[0]:
    raise ValueError(f"hc_fn must have shape [n, n*C], got {hc_fn.shape}")
  n = hc_fn.shape[0]
  hc_base, hc_scale = _as_float32("hc_base", hc_base), _as_float32("hc_scale", hc_scale)
  _check_shape("hc_base", hc_base, (n,))
  _check_shape("hc_scale", hc_scale, (1,))
  params = {"phi": jnp.asarray(hc_fn.T), "alpha": jnp.asarray(hc_scale),
            "bias": jnp.asarray(hc_base)}
  return n, hc_fn.shape[1] // n, params
