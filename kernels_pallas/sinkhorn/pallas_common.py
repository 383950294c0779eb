"""What the Pallas Sinkhorn kernels share: layout, per-entry math, custom VJP, dispatch.

Layout. The kernels take the batch lane-dense, `[..., n, n]` -> `(n, n, B)` float32 with the
B = prod(...) tokens last, so every matrix entry `(i, j)` is a vector of tokens and a row or
column sum is a plain add of `n` vectors (no cross-lane reductions, no 4-of-128-lane
blocks). Each platform module pads B to its block size and slices the padding off again.

Math. A matrix inside a kernel is `Mat`: `m[i][j]` is entry (row i, column j), an array
of tokens ((rows, 128) on TPU, (T,) on GPU). The functions below are those of
`xla.py` written per entry, so both kernels run literally the same arithmetic:

* the first iteration in the log domain (column log-softmax, `+ eps` as a log-add-exp,
  row log-sum-exp), which keeps logits of +-1e4 and `-inf` finite;
* later iterations in the exp domain, dividing by `sum + eps` (via one reciprocal per
  row/column, then multiplies: `n` divides instead of `n^2`);
* backward of one normalisation, on `g = dLoss/dlog M`: `g - M_after * sum_axis(g)`.

Custom VJP. The forward saves only the logits; the backward kernel recomputes the
iterates on chip and reverses every normalisation exactly, like `xla._bwd`.
"""

import functools
import math
import operator
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kernels_pallas.sinkhorn.xla import sinkhorn_xla

Mat = Sequence[Sequence[jax.Array]]  # m[i][j]: entry (row i, column j), a token array


# --- layout ------------------------------------------------------------------------------

def to_lanes(x: jax.Array) -> jax.Array:
  """`[..., n, n]` (any float dtype) -> `(n, n, B)` float32, tokens on the last axis."""
  n = x.shape[-1]
  return jnp.moveaxis(x.reshape(-1, n, n).astype(jnp.float32), 0, -1)


def from_lanes(y: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`(n, n, B)` -> `shape` (`[..., n, n]`), the inverse of `to_lanes` up to dtype."""
  return jnp.moveaxis(y, -1, 0).reshape(shape)


def pad_tokens(x: jax.Array, num_tokens: int) -> jax.Array:
  """Zero-pads the token (last) axis to `num_tokens`. Zero logits give the uniform
  matrix: finite, and tokens never mix, so padding cannot reach the real tokens."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, num_tokens - x.shape[-1])])


def round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


# --- per-entry math (runs inside the kernels) ---------------------------------------------

def _sum(xs):
  return functools.reduce(operator.add, xs)


def _max(xs):
  return functools.reduce(jnp.maximum, xs)


def _log_add_eps(log_x: jax.Array, eps: float) -> jax.Array:
  """log(exp(log_x) + eps), stable for log_x = -inf and for |log_x| large."""
  if eps == 0:
    return log_x
  log_eps = math.log(eps)
  hi = jnp.maximum(log_x, log_eps)
  return hi + jnp.log1p(jnp.exp(-jnp.abs(log_x - log_eps)))


def _transpose(m: Mat) -> Mat:
  return tuple(zip(*m))


def first_iteration(x: Mat, eps: float) -> tuple[Mat, Mat, Mat]:
  """Column softmax `q`, `m1 = q + eps`, `m2 = m1 / (row sums + eps)`; log domain."""
  n = len(x)
  cols = _transpose(x)
  log_q_cols = []
  for col in cols:  # log-softmax down each column
    top = _max(col)
    shifted = [v - top for v in col]
    log_norm = jnp.log(_sum([jnp.exp(v) for v in shifted]))
    log_q_cols.append([v - log_norm for v in shifted])
  log_q = _transpose(log_q_cols)
  log_m1 = [[_log_add_eps(v, eps) for v in row] for row in log_q]
  log_m2 = []
  for row in log_m1:  # log-sum-exp along each row
    top = _max(row)
    log_rows = top + jnp.log(_sum([jnp.exp(v - top) for v in row]))
    log_den = _log_add_eps(log_rows, eps)
    log_m2.append([v - log_den for v in row])
  exp = lambda m: tuple(tuple(jnp.exp(m[i][j]) for j in range(n)) for i in range(n))
  return exp(log_q), exp(log_m1), exp(log_m2)


def normalise_rows(m: Mat, eps: float) -> Mat:
  inv = [1.0 / (_sum(row) + eps) for row in m]
  return tuple(tuple(v * inv[i] for v in row) for i, row in enumerate(m))


def normalise_cols(m: Mat, eps: float) -> Mat:
  return _transpose(normalise_rows(_transpose(m), eps))


def iteration(m: Mat, eps: float) -> tuple[Mat, Mat]:
  """One later (exp-domain) iteration: (after the column step, after the row step)."""
  m_col = normalise_cols(m, eps)
  return m_col, normalise_rows(m_col, eps)


def forward(x: Mat, num_iters: int, eps: float) -> Mat:
  """Logits -> the Sinkhorn output, all `num_iters` iterations."""
  m = first_iteration(x, eps)[2]
  return jax.lax.fori_loop(0, num_iters - 1, lambda _, m: iteration(m, eps)[1], m)


def _back_rows(g: Mat, m_after: Mat) -> Mat:
  """Backward of a row step on log-gradients: `g - M_after * rowsum(g)`."""
  return tuple(tuple(gv - mv * s for gv, mv in zip(g_row, m_row))
               for g_row, m_row, s in zip(g, m_after, [_sum(r) for r in g]))


def _back_cols(g: Mat, m_after: Mat) -> Mat:
  return _transpose(_back_rows(_transpose(g), _transpose(m_after)))


def back_through_iteration(g: Mat, m_col: Mat, m_row: Mat) -> Mat:
  """Log-gradient after a later iteration -> before it."""
  return _back_cols(_back_rows(g, m_row), m_col)


def back_through_first(g: Mat, x: Mat, eps: float) -> Mat:
  """Log-gradient after the first iteration -> gradient of the logits (recomputes it)."""
  q, m1, m2 = first_iteration(x, eps)
  g = _back_rows(g, m2)
  if eps > 0:  # through log(q + eps) back to log(q)
    g = tuple(tuple(gv * (qv / mv) for gv, qv, mv in zip(*rows)) for rows in zip(g, q, m1))
  return _back_cols(g, q)  # through the column log-softmax


def times(a: Mat, b: Mat) -> Mat:
  """Entrywise product (the cotangent of M -> the cotangent of log M)."""
  return tuple(tuple(x * y for x, y in zip(*rows)) for rows in zip(a, b))


def load(ref, *index) -> Mat:
  """Reads `ref[i, j, *index]` for every entry; `ref` has the two matrix axes first."""
  n = ref.shape[0]
  return tuple(tuple(ref[(i, j, *index)] for j in range(n)) for i in range(n))


def store(ref, m: Mat, *index) -> None:
  for i, row in enumerate(m):
    for j, v in enumerate(row):
      ref[(i, j, *index)] = v


def cost_estimate(n: int, num_tokens: int, num_iters: int, backward: bool):
  """Rough flop/transcendental/byte counts so XLA schedules around the call sensibly."""
  per_iter = 4 * n * n + 2 * n  # two normalisations: adds, multiplies, reciprocals
  flops = num_tokens * per_iter * num_iters * (4 if backward else 1)
  transcendentals = num_tokens * 5 * n * n * (2 if backward else 1)
  arrays = 3 if backward else 2
  return jax.experimental.pallas.CostEstimate(
      flops=flops, transcendentals=transcendentals,
      bytes_accessed=arrays * 4 * n * n * num_tokens)


# --- custom VJP and dispatch --------------------------------------------------------------

class Kernels(NamedTuple):
  """A platform's pair of lane-dense kernels, `(n, n, B)` float32 in and out, any B."""
  forward: Callable  # (x, num_iters, eps, interpret) -> out
  backward: Callable  # (x, g, num_iters, eps, interpret) -> dLoss/dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _sinkhorn(logits, num_iters, eps, kernels, interpret):
  out = kernels.forward(to_lanes(logits), num_iters, eps, interpret)
  return from_lanes(out, logits.shape)


def _fwd(logits, num_iters, eps, kernels, interpret):
  return _sinkhorn(logits, num_iters, eps, kernels, interpret), logits


def _bwd(num_iters, eps, kernels, interpret, logits, g):
  grad = kernels.backward(to_lanes(logits), to_lanes(g), num_iters, eps, interpret)
  return (from_lanes(grad, logits.shape).astype(logits.dtype),)


_sinkhorn.defvjp(_fwd, _bwd)


def sinkhorn_pallas(logits: jax.Array, num_iters: int = 20, eps: float = 0.0, *,
                    platform: str = "tpu", interpret=False) -> jax.Array:
  """`[..., n, n]` logits -> `[..., n, n]` float32, same semantics as `sinkhorn_xla`.

  Float32 math for float32/bfloat16/float16 input; the gradient has the input's dtype.
  `platform`: "tpu" (Mosaic) or "gpu" (Triton). `interpret`: passed to `pallas_call`
  (True, or a `pltpu.InterpretParams` for TPU semantics on CPU). `n = 1` (nothing to
  normalise) and float64 (the kernels are float32) take the XLA path. Arguments are not
  validated beyond `platform`: `mhc_jax.sinkhorn_knopp` is the checked entry point.
  """
  # Imported here, not at the top: both platform modules import this one.
  from kernels_pallas.sinkhorn import gpu, tpu
  kernels = {"tpu": tpu.KERNELS, "gpu": gpu.KERNELS}.get(platform)
  if kernels is None:
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  if logits.shape[-1] == 1 or logits.dtype == jnp.float64:
    return sinkhorn_xla(logits, num_iters, eps)
  return _sinkhorn(logits, int(num_iters), float(eps), kernels, interpret)
