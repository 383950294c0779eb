"""Sinkhorn-Knopp forward and exact backward as Pallas GPU kernels (Triton backend).

Why Triton and not Mosaic GPU: the work is elementwise arithmetic on small stacks of token
vectors (no matmuls), which Triton expresses directly and runs on any CUDA GPU from Ampere
on (and on ROCm). Mosaic GPU needs sm_90+, and its model (warpgroup register layouts,
explicit SMEM/TMA staging) buys nothing for this kernel.

Layout: the lane-dense `(n, n, B)` batch (see `layout.py`) padded to `(p, p, B')`:
Triton arrays must have power-of-two sizes, so B' is a multiple of the (power-of-two) token
block and `p` is n rounded up to a power of two. The padded rows and columns hold a separate
block of the block-diagonal matrix `[[L, -inf], [-inf, 0]]`: Sinkhorn on it normalises the
two blocks independently, so the real block is exactly the n x n result (the `+ eps` step is
masked so the off-diagonal blocks stay 0). A program handles `p * p * tokens = 2048`
elements, 16 per thread, loaded as one coalesced block per operand.

Backward: Triton has no addressable scratch memory, so the iterates cannot be stored and
read back in reverse as on TPU. Instead the backward keeps a checkpoint every
`ceil(sqrt(num_iters - 1))` iterations and recomputes each iterate from the nearest one: at
20 iterations, 74 exp-domain iterations instead of 38, with 4 checkpoint matrices live
instead of 19 stored iterates.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas.sinkhorn import iterations
from kernels_pallas.sinkhorn.cost import cost_estimate
from kernels_pallas.sinkhorn.iterations import TOKENS_LAST
from kernels_pallas.sinkhorn.layout import pad_to, round_up
from kernels_pallas.sinkhorn.pallas_vjp import Kernels

_ELEMENTS = 2048  # per program and operand: 16 per thread of 4 warps
_NUM_WARPS = 4


def _off_block(p: int, n: int):
  """(p, p, 1) mask of the off-diagonal padding blocks, or None when there is no padding."""
  if p == n:
    return None
  real_row = jax.lax.broadcasted_iota(jnp.int32, (p, p, 1), 0) < n
  real_col = jax.lax.broadcasted_iota(jnp.int32, (p, p, 1), 1) < n
  return real_row != real_col


def _logits(x_ref, n):
  """The block's logits with the off-diagonal padding at -inf (it holds zeros in HBM)."""
  off = _off_block(x_ref.shape[0], n)
  x = x_ref[...]
  return (x, off) if off is None else (jnp.where(off, -jnp.inf, x), off)


def _forward_kernel(x_ref, out_ref, *, n, num_iters, eps):
  """x_ref, out_ref: (p, p, tokens) blocks."""
  x, off = _logits(x_ref, n)
  out_ref[...] = iterations.forward(x, num_iters, eps, TOKENS_LAST, off)


def _backward_kernel(x_ref, g_ref, grad_ref, *, n, num_iters, eps):
  """x_ref, g_ref, grad_ref: (p, p, tokens) blocks; g is 0 in the padding."""
  x, off = _logits(x_ref, n)
  later = num_iters - 1
  segment = math.isqrt(max(later - 1, 0)) + 1  # ceil(sqrt(later)), at least 1
  starts = range(0, later, segment)
  checkpoints, m = [], iterations.first_iteration(x, eps, TOKENS_LAST, off)[1]
  for start in starts:
    checkpoints.append(m)
    m = iterations.advance(m, min(segment, later - start), eps, TOKENS_LAST)
  g = g_ref[...] * m  # the cotangent of log(out)

  for start, checkpoint in reversed(list(zip(starts, checkpoints))):
    length = min(segment, later - start)

    def reverse(t, g, checkpoint=checkpoint, length=length):
      m_in = iterations.advance(checkpoint, length - 1 - t, eps, TOKENS_LAST)  # its input
      m_col, m_row = iterations.iteration(m_in, eps, TOKENS_LAST)
      return iterations.back_through_iteration(g, m_col, m_row, TOKENS_LAST)
    g = jax.lax.fori_loop(0, length, reverse, g)
  q, m2 = iterations.first_iteration(x, eps, TOKENS_LAST, off)
  grad_ref[...] = iterations.back_through_first(g, q, m2, eps, TOKENS_LAST)


def _call(kernel, arrays, num_iters, eps, interpret):
  """Pads `(n, n, B)` arrays to `(p, p, whole blocks)`, runs `kernel`, slices back."""
  n, _, num_tokens = arrays[0].shape
  p = pl.next_power_of_2(n)
  tokens = _ELEMENTS // (p * p)
  padded = round_up(max(num_tokens, 1), tokens)
  arrays = [pad_to(a, (p, p, padded)) for a in arrays]
  spec = pl.BlockSpec((p, p, tokens), lambda b: (0, 0, b))
  out = pl.pallas_call(
      functools.partial(kernel, n=n, num_iters=num_iters, eps=eps),
      out_shape=jax.ShapeDtypeStruct((p, p, padded), jnp.float32),
      grid=(padded // tokens,),
      in_specs=[spec] * len(arrays),
      out_specs=spec,
      compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
      cost_estimate=cost_estimate(p, padded, num_iters, len(arrays) > 1),
      interpret=interpret,
  )(*arrays)
  return out[:n, :n, :num_tokens]


def forward(x, num_iters, eps, interpret=False):
  """`(n, n, B)` float32 logits -> `(n, n, B)` float32 Sinkhorn output."""
  return _call(_forward_kernel, [x], num_iters, eps, interpret)


def backward(x, g, num_iters, eps, interpret=False):
  """`(n, n, B)` logits and output cotangent -> `(n, n, B)` logits gradient."""
  return _call(_backward_kernel, [x, g], num_iters, eps, interpret)


KERNELS = Kernels(forward, backward)
