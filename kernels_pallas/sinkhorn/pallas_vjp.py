"""The custom VJP around a platform's pair of Pallas kernels.

The forward saves only the logits; the backward kernel recomputes the iterates on chip and
reverses every normalisation exactly, like `xla._bwd`. Both kernels take the batch in the
lane-dense layout of `layout.py`.
"""

import functools
from typing import Callable, NamedTuple

import jax

from kernels_pallas.sinkhorn.layout import from_lanes, to_lanes


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


def sinkhorn_pallas(logits: jax.Array, num_iters: int, eps: float, *, kernels: Kernels,
                    interpret=False) -> jax.Array:
  """`[..., n, n]` logits, n >= 2 -> `[..., n, n]` float32, same semantics as `sinkhorn_xla`.

  Float32 math for float32/bfloat16/float16 input; the gradient has the input's dtype.
  `interpret`: passed to `pallas_call` (True, or a `pltpu.InterpretParams` for TPU semantics
  on CPU). Arguments are not validated: `api.sinkhorn_knopp` is the checked entry point, and
  sends n = 1 and float64 to XLA.
  """
  return _sinkhorn(logits, int(num_iters), float(eps), kernels, interpret)
