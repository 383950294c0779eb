"""What the Pallas Sinkhorn kernels share: layout, in-kernel math, custom VJP, dispatch.

Layout. The kernels take the batch lane-dense, `[..., n, n]` -> `(n, n, B)` float32 with the
B = prod(...) tokens last, so a matrix is a stack of token vectors and a row or column sum
is an add across a leading axis: `n - 1` whole-vector adds, never a cross-lane reduction,
never a block that fills 4 of 128 lanes. Each platform module pads B to its block size and
slices the padding off again (zero logits: harmless, and tokens never mix).

Math. Inside a kernel a matrix is an array `(n, n, *tokens)`: axis 0 is the row index i,
axis 1 the column index j, as in `xla.py` with the tokens moved last. The functions below
are `xla.py`'s, so both kernels run the same arithmetic:

* the first iteration in the log domain (column log-softmax, `+ eps` as a log-add-exp,
  row log-sum-exp), which keeps logits of +-1e4 and `-inf` finite;
* later iterations in the exp domain, dividing by `sum + eps` through one reciprocal per
  row/column and multiplies;
* backward of one normalisation, on `g = dLoss/dlog M`: `g - M_after * sum_axis(g)`.

`off`, where given, marks entries outside the real matrix (the GPU kernel pads n to a power
of two; see `gpu.py`). They must stay exactly 0, which only the `+ eps` step would break.

Custom VJP. The forward saves only the logits; the backward kernel recomputes the
iterates on chip and reverses every normalisation exactly, like `xla._bwd`.
"""

import functools
import importlib
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.sinkhorn.xla import sinkhorn_xla

ROWS = 1  # summing over it gives row sums (the column index j)
COLS = 0  # summing over it gives column sums (the row index i)


# --- layout ------------------------------------------------------------------------------

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


# --- in-kernel math on (n, n, *tokens) arrays --------------------------------------------

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


def first_iteration(x: jax.Array, eps: float,
                    off: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Logits -> (column softmax `q`, `m2` = the matrix after the first row step)."""
  shifted = x - jnp.max(x, axis=COLS, keepdims=True)  # this order keeps |x| ~ 1e4 exact
  log_q = shifted - jnp.log(_sum(jnp.exp(shifted), COLS))
  log_m1 = _log_add_eps(log_q, eps)
  if off is not None and eps > 0:
    log_m1 = jnp.where(off, -jnp.inf, log_m1)
  log_m2 = log_m1 - _log_add_eps(_log_sum_exp(log_m1, ROWS), eps)
  return jnp.exp(log_q), jnp.exp(log_m2)


def _normalise(m: jax.Array, axis: int, eps: float) -> jax.Array:
  return m * (1.0 / (_sum(m, axis) + eps))  # n reciprocals, n^2 multiplies


def iteration(m: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """One later (exp-domain) iteration: (after the column step, after the row step)."""
  m_col = _normalise(m, COLS, eps)
  return m_col, _normalise(m_col, ROWS, eps)


def advance(m: jax.Array, num_iters, eps: float) -> jax.Array:
  """`num_iters` (static or traced) later iterations from `m`."""
  return jax.lax.fori_loop(0, num_iters, lambda _, m: iteration(m, eps)[1], m)


def forward(x: jax.Array, num_iters: int, eps: float, off: jax.Array | None = None) -> jax.Array:
  """Logits -> the Sinkhorn output after all `num_iters` iterations."""
  return advance(first_iteration(x, eps, off)[1], num_iters - 1, eps)


def _back(g: jax.Array, m_after: jax.Array, axis: int) -> jax.Array:
  """Backward of one normalisation on log-gradients: `g - M_after * sum_axis(g)`."""
  return g - m_after * _sum(g, axis)


def back_through_iteration(g: jax.Array, m_col: jax.Array, m_row: jax.Array) -> jax.Array:
  """Log-gradient after a later iteration -> before it."""
  return _back(_back(g, m_row, ROWS), m_col, COLS)


def back_through_first(g: jax.Array, x: jax.Array, eps: float,
                       off: jax.Array | None = None) -> jax.Array:
  """Log-gradient after the first iteration -> gradient of the logits (recomputes it)."""
  q, m2 = first_iteration(x, eps, off)
  g = _back(g, m2, ROWS)
  if eps > 0:  # through log(q + eps) back to log(q); 0 (not 0/0) where q = 0
    g = g * (q / (q + eps))
  return _back(g, q, COLS)  # through the column log-softmax


def cost_estimate(n: int, num_tokens: int, num_iters: int, backward: bool):
  """Rough flop/transcendental/byte counts so XLA schedules around the call sensibly."""
  per_iter = 4 * n * n + 2 * n  # two normalisations: adds, multiplies, reciprocals
  flops = num_tokens * per_iter * num_iters * (4 if backward else 1)
  transcendentals = num_tokens * 5 * n * n * (2 if backward else 1)
  arrays = 3 if backward else 2
  return pl.CostEstimate(
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


_BACKEND_NAMES = {"tpu": "TPU (Mosaic)", "gpu": "Triton"}  # the Pallas backend each needs


def sinkhorn_pallas(logits: jax.Array, num_iters: int = 20, eps: float = 0.0, *,
                    platform: str = "tpu", interpret=False) -> jax.Array:
  """`[..., n, n]` logits -> `[..., n, n]` float32, same semantics as `sinkhorn_xla`.

  Float32 math for float32/bfloat16/float16 input; the gradient has the input's dtype.
  `platform`: "tpu" (Mosaic) or "gpu" (Triton). `interpret`: passed to `pallas_call`
  (True, or a `pltpu.InterpretParams` for TPU semantics on CPU). `n = 1` (nothing to
  normalise) and float64 (the kernels are float32) take the XLA path. Raises `ImportError`
  when this JAX lacks the platform's Pallas backend. Arguments are not validated beyond
  `platform`: `mhc_jax.sinkhorn_knopp` is the checked entry point.
  """
  if platform not in _BACKEND_NAMES:
    raise ValueError(f"platform must be 'tpu' or 'gpu', got {platform!r}")
  if logits.shape[-1] == 1 or logits.dtype == jnp.float64:
    return sinkhorn_xla(logits, num_iters, eps)
  # Imported here, not at the top: both platform modules import this one. Only the one
  # asked for, so a JAX without Triton (deprecated from 0.11 on) still runs the TPU kernel.
  try:
    module = importlib.import_module(f"kernels_pallas.sinkhorn.{platform}")
  except ImportError as e:
    raise ImportError(f"the Pallas Sinkhorn {platform} kernel needs JAX's Pallas "
                      f"{_BACKEND_NAMES[platform]} backend, which JAX {jax.__version__} "
                      f"lacks ({e}); use backend='xla'") from None
  return _sinkhorn(logits, int(num_iters), float(eps), module.KERNELS, interpret)
