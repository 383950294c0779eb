"""The checked public entry point for Sinkhorn-Knopp, its implementations, and the choice."""

import functools
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kernels_pallas.sinkhorn import tpu
from kernels_pallas.sinkhorn.pallas_vjp import Kernels, sinkhorn_pallas
from kernels_pallas.sinkhorn.xla import sinkhorn_xla

try:  # Triton's Pallas backend is deprecated from JAX 0.11 on; only pallas_gpu needs it
  from kernels_pallas.sinkhorn import gpu
except ImportError as e:
  gpu, _NO_TRITON = None, (f"the Pallas Sinkhorn gpu kernel needs JAX's Pallas Triton "
                           f"backend, which JAX {jax.__version__} lacks ({e}); use backend='xla'")

BACKENDS = ("auto", "xla", "pallas")


class Implementation(NamedTuple):
  """One way to compute Sinkhorn: `fn(logits, num_iters, eps)`, `[..., n, n]` logits ->
  `[..., n, n]` float32; Pallas ones also take `interpret=` (see `pallas_vjp.py`)."""
  fn: Callable | None  # None where this JAX lacks the Pallas backend it needs
  platform: str | None  # the platform it compiles for; None: every platform
  missing: str = ""  # why `fn` is None, in one line

  def require(self) -> Callable:
    """`fn`, or an ImportError saying in one line why this JAX cannot run it."""
    if self.fn is None:
      raise ImportError(self.missing)
    return self.fn


def _pallas(platform: str, kernels: Kernels) -> Implementation:
  return Implementation(functools.partial(sinkhorn_pallas, kernels=kernels), platform)


IMPLEMENTATIONS = {
    "xla": Implementation(sinkhorn_xla, None),
    "pallas_tpu": _pallas("tpu", tpu.KERNELS),
    "pallas_gpu": _pallas("gpu", gpu.KERNELS) if gpu else Implementation(None, "gpu", _NO_TRITON),
}

# jax.default_backend() -> the Pallas implementation compiled for it. CPU has none: there
# backend="pallas" interprets pallas_tpu.
PLATFORMS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu",
             "rocm": "pallas_gpu"}


def sinkhorn_knopp(logits: jax.Array, num_iters: int = 20, *, eps: float = 0.0,
                   backend: str = "auto") -> jax.Array:
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

  `backend`: "auto" (the XLA path on every platform: neither Pallas kernel has been
  validated on a TPU or GPU yet; `python -m kernels_pallas.sinkhorn.bench --validate` does
  that, and "auto" will pick Pallas on a platform once it passes there), "xla", or "pallas"
  (opt-in: the Mosaic kernel on TPU, the Triton kernel on GPU, the TPU kernel in interpret
  mode on CPU, which is slow, for testing, and warns once per process). "pallas" raises
  if this JAX lacks the platform's Pallas backend (Triton's is deprecated from JAX 0.11 on).
  Two inputs take the XLA path even with "pallas": float64 (the kernels are float32) and
  n = 1 (nothing to normalise). Under a mesh set with `jax.set_mesh`, the Pallas kernel
  runs per shard through `jax.shard_map`, tokens split over every mesh axis (Pallas calls
  are not partitioned automatically).
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
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")

  if backend != "pallas" or logits.shape[-1] == 1 or logits.dtype == jnp.float64:
    return IMPLEMENTATIONS["xla"].fn(logits, num_iters, float(eps))
  name = PLATFORMS.get(jax.default_backend())
  pallas = IMPLEMENTATIONS[name or "pallas_tpu"].require()
  if name is None:
    _warn_interpreting()
  return _per_shard(functools.partial(pallas, num_iters=num_iters, eps=float(eps),
                                      interpret=name is None), logits)


@functools.cache  # once per process, whatever the warnings filters say
def _warn_interpreting() -> None:
  warnings.warn("sinkhorn_knopp(backend='pallas') on CPU interprets the TPU kernel: slow, "
                "for testing; backend='xla' is the fast path here", stacklevel=3)


def _per_shard(kernel, logits: jax.Array) -> jax.Array:
  """Runs `kernel` ([T, n, n] -> [T, n, n]) on each device's slice of the tokens when a
  mesh is set; the token count is padded to a multiple of the device count."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(logits)
  n = logits.shape[-1]
  tokens = logits.reshape(-1, n, n)
  count = tokens.shape[0]
  tokens = jnp.pad(tokens, ((0, -count % mesh.size), (0, 0), (0, 0)))
  spec = P(mesh.axis_names)
  # check_vma=False: pallas_call's outputs carry no varying-axes annotation; every token's
  # result depends on that token alone, so they vary over every axis the input does.
  out = jax.shard_map(kernel, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(tokens)
  return out[:count].reshape(logits.shape)
