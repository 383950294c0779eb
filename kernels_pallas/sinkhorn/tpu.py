"""Sinkhorn-Knopp forward and exact backward as Pallas TPU (Mosaic) kernels.

Layout: the lane-dense `(n, n, B)` batch (see `layout.py`) is viewed as
`(n, n, rows, 128)`, B padded to `rows * 128`. Tokens fill the sublanes and lanes, so 8 rows
of one matrix entry are one dense (8, 128) vreg and a row or column sum is n - 1 vreg adds
(a `(tokens, n, n)` block would use n of the 128 lanes). A grid step ("parallel", so a
megacore chip splits the grid over its TensorCores) takes `rows_per_block` rows of every
entry and walks them in chunks of 8 rows, so the working set stays one vreg per entry
whatever the block size.

Backward: per chunk, the forward is recomputed and the input of each of the
`num_iters - 1` exp-domain iterations is kept in a VMEM scratch; the reverse loop reads them
back newest first, recomputes that iteration's two steps, and applies their backward.
Scratch: `(num_iters - 1) * n^2 * 4 KiB` (1.2 MiB at n = 4, 4.8 MiB at n = 8, 20 iterations).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.sinkhorn import iterations
from kernels_pallas.sinkhorn.cost import cost_estimate
from kernels_pallas.sinkhorn.iterations import TOKENS_LAST
from kernels_pallas.sinkhorn.layout import pad_to, round_up
from kernels_pallas.sinkhorn.pallas_vjp import Kernels

LANES, SUBLANES = 128, 8
_BLOCK_BYTES = 512 * 1024  # per operand block: amortises the ~0.35 us cost of a grid step
_DEFAULT_VMEM = 12 * 2**20  # below the smallest default scoped-VMEM limit (16 MiB, v5e)


def _plan(num_tokens: int, n: int) -> tuple[int, int, int]:
  """-> (rows, rows_per_block, chunk): padded row count, rows per block, rows per step."""
  rows = max(1, pl.cdiv(num_tokens, LANES))
  if rows <= SUBLANES:  # one block spanning the whole small array (full dims are legal)
    return rows, rows, rows
  rows = round_up(rows, SUBLANES)
  max_rows = max(SUBLANES, _BLOCK_BYTES // (n * n * LANES * 4) // SUBLANES * SUBLANES)
  num_blocks = max(2, pl.cdiv(rows, max_rows))  # >= 2: work for both cores of a megacore
  per_block = round_up(pl.cdiv(rows, num_blocks), SUBLANES)
  return num_blocks * per_block, per_block, SUBLANES


def _over_chunks(ref, chunk: int, body) -> None:
  """Calls `body(rows)` for each `chunk`-row slice (an index into the block) of the block."""
  if ref.shape[2] == chunk:  # a static index: a dynamic one must be 8-aligned on chip
    body((slice(None), slice(None), slice(None)))
    return

  def step(c, carry):
    body((slice(None), slice(None), pl.ds(pl.multiple_of(c * chunk, chunk), chunk)))
    return carry
  jax.lax.fori_loop(0, ref.shape[2] // chunk, step, 0)


def _forward_kernel(x_ref, out_ref, *, num_iters, eps, chunk):
  """x_ref, out_ref: (n, n, rows_per_block, 128) blocks."""
  def body(rows):
    out_ref[rows] = iterations.forward(x_ref[rows], num_iters, eps, TOKENS_LAST)
  _over_chunks(x_ref, chunk, body)


def _backward_kernel(x_ref, g_ref, grad_ref, inputs_ref, *, num_iters, eps, chunk):
  """x_ref, g_ref, grad_ref: (n, n, rows_per_block, 128) blocks;
  inputs_ref: (max(num_iters - 1, 1), n, n, chunk, 128) VMEM scratch."""
  def body(rows):
    def recompute(k, m):
      inputs_ref[k] = m
      return iterations.iteration(m, eps, TOKENS_LAST)[1]
    m2 = iterations.first_iteration(x_ref[rows], eps, TOKENS_LAST)[1]
    out = jax.lax.fori_loop(0, num_iters - 1, recompute, m2)
    g = g_ref[rows] * out  # the cotangent of log(out)

    def reverse(t, g):
      m_col, m_row = iterations.iteration(inputs_ref[num_iters - 2 - t], eps, TOKENS_LAST)
      return iterations.back_through_iteration(g, m_col, m_row, TOKENS_LAST)
    g = jax.lax.fori_loop(0, num_iters - 1, reverse, g)
    # x is re-read rather than kept live through both loops (n^2 vregs fewer to spill).
    q, m2 = iterations.first_iteration(x_ref[rows], eps, TOKENS_LAST)
    grad_ref[rows] = iterations.back_through_first(g, q, m2, eps, TOKENS_LAST)
  _over_chunks(x_ref, chunk, body)


def _call(kernel, arrays, num_iters, eps, interpret, scratch_matrices):
  """Pads `(n, n, B)` arrays to whole blocks, runs `kernel`, and slices the result back."""
  n, _, num_tokens = arrays[0].shape
  rows, per_block, chunk = _plan(num_tokens, n)
  tiles = [pad_to(a, (n, n, rows * LANES)).reshape(n, n, rows, LANES) for a in arrays]
  spec = pl.BlockSpec((n, n, per_block, LANES), lambda b: (0, 0, b, 0))
  scratch = [pltpu.VMEM((scratch_matrices, n, n, chunk, LANES), jnp.float32)]
  vmem = 4 * n * n * LANES * (scratch_matrices * chunk + 2 * (len(arrays) + 1) * per_block)
  out = pl.pallas_call(
      functools.partial(kernel, num_iters=num_iters, eps=eps, chunk=chunk),
      out_shape=jax.ShapeDtypeStruct(tiles[0].shape, jnp.float32),
      grid=(rows // per_block,),
      in_specs=[spec] * len(tiles),
      out_specs=spec,
      scratch_shapes=scratch if scratch_matrices else [],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",),
          vmem_limit_bytes=None if vmem <= _DEFAULT_VMEM else int(vmem * 1.25) + 2**21),
      cost_estimate=cost_estimate(n, rows * LANES, num_iters, bool(scratch_matrices)),
      interpret=interpret,
  )(*tiles)
  return out.reshape(n, n, rows * LANES)[..., :num_tokens]


def forward(x, num_iters, eps, interpret=False):
  """`(n, n, B)` float32 logits -> `(n, n, B)` float32 Sinkhorn output."""
  return _call(_forward_kernel, [x], num_iters, eps, interpret, 0)


def backward(x, g, num_iters, eps, interpret=False):
  """`(n, n, B)` logits and output cotangent -> `(n, n, B)` logits gradient."""
  return _call(_backward_kernel, [x, g], num_iters, eps, interpret, max(num_iters - 1, 1))


KERNELS = Kernels(forward, backward)
