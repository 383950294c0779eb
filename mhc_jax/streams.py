"""Pure functions on residual streams, layout `[..., num_streams, dim]`.

The update of one site (attention or MLP), in the mHC paper's notation:

    X_out = H_res @ X + H_post^T * F(H_pre @ X)

`aggregate` is `H_pre @ X`, `merge` is the rest. Mixing runs in float32 (float64 streams stay
float64) and returns the streams' dtype.

With `num_fracs = m > 1` (Frac-connections, Zhu et al., arXiv:2503.14125) every stream's `dim`
is split into `m` fractions of `d = dim / m` channels, fraction `f` being channels
`[f d, (f + 1) d)` (lucidrains' `(f d)`), and the site mixes the `N = n m` fraction units of
`d` channels, unit `u = s m + f` (stream-major, so `[..., n, dim]` -> `[..., N, d]` is a plain
reshape): the branch input's fraction `j` is `sum_u H_pre[j, u] X_u` (`H_pre` `[m, N]`), unit
`u` receives `sum_j H_post[u, j] F_j` (`H_post` `[N, m]`), and `H_res` is `[N, N]`. The
branch still takes and returns `[..., dim]`, its fractions concatenated.

Every contraction over the stream axis asks for HIGHEST precision explicitly. At DEFAULT, the
one `jax.default_matmul_precision` governs, TPUs multiply float32 in one bfloat16 pass (GPUs
in TF32): the identity path `H_res @ X` would then be rounded to 8 mantissa bits at every
sub-layer, and the rows of `H_res` would in effect no longer sum to 1. The contractions are
`n` deep, so full precision costs little; they stay dot_generals for XLA to fuse.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mhc_jax.checks import check_int

_HIGHEST = jax.lax.Precision.HIGHEST


class Coefficients(NamedTuple):
  """The three mappings of one site. Leading axes are the tokens' (or absent if static).

  h_pre:  [..., n]     weights that collapse the streams into the branch input.
  h_post: [..., n]     weights that spread the branch output back over the streams.
  h_res:  [..., n, n]  stream mixing, applied as `H_res @ X` (row k = output stream k).

  With `m > 1` fractions (see the module docstring) they are `[..., m, N]`, `[..., N, m]` and
  `[..., N, N]` over the `N = n m` fraction units.
  """

  h_pre: jax.Array
  h_post: jax.Array
  h_res: jax.Array


def mixing_flops(num_streams: int, dim: int, num_fracs: int = 1) -> int:
  """Forward matmul FLOPs per token of one site's mixing: `H_res @ X` (2 n² C), then
  `H_pre @ X` and `H_post^T F` (2 n C each); m times that with `m` fractions (`N = n m` units
  of `C / m` channels: 2 N² C / m, and `[m, N]`, `[N, m]` maps, 2 N C each)."""
  return num_fracs * (2 * num_streams**2 * dim + 4 * num_streams * dim)


def expand_streams(x: jax.Array, num_streams: int) -> jax.Array:
  """`[..., dim]` -> `[..., num_streams, dim]`: the input copied into every stream."""
  check_int("num_streams", num_streams)
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], num_streams, x.shape[-1]))


def reduce_streams(streams: jax.Array) -> jax.Array:
  """`[..., n, dim]` -> `[..., dim]`: the sum over streams (HC paper, mHC-lite)."""
  if streams.ndim < 2:
    raise ValueError(f"streams must have shape [..., num_streams, dim], got {streams.shape}")
  return jnp.sum(streams.astype(jnp.float32), axis=-2).astype(streams.dtype)


def embed_streams(x: jax.Array, offsets: jax.Array) -> jax.Array:
  """`[..., dim]`, `[num_streams, dim]` -> `[..., num_streams, dim]`: the input copied into
  every stream plus that stream's learned offset (lucidrains' `StreamEmbed`, its
  `add_stream_embed`), so the streams can differ from the first layer on. Added in float32
  (float64 stays float64), returned in `x`'s dtype; `expand_streams` at zero offsets."""
  offsets_shape = tuple(getattr(offsets, "shape", ()))
  if len(offsets_shape) != 2 or offsets_shape[-1] != x.shape[-1]:
    raise ValueError(f"offsets must have shape [num_streams, dim={x.shape[-1]}] (x's last "
                     f"axis), got {offsets_shape}")
  dtype = _mixing_dtype(x, offsets)
  return (x.astype(dtype)[..., None, :] + offsets.astype(dtype)).astype(x.dtype)


def mean_streams(streams: jax.Array) -> jax.Array:
  """`[..., n, dim]` -> `[..., dim]`: the mean over streams, summed in float32. n equal
  streams give back the one stream, so a retrofitted model's final norm sees what the
  pre-norm model's did."""
  if streams.ndim < 2:
    raise ValueError(f"streams must have shape [..., num_streams, dim], got {streams.shape}")
  return jnp.mean(streams.astype(jnp.float32), axis=-2).astype(streams.dtype)


def _mixing_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32 for float32 and narrower inputs; float64 stays float64 (for references)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def _sum_to(grad: jax.Array, like: jax.Array) -> jax.Array:
  """`grad` (of the broadcast shape) summed over the axes `like` was broadcast along, then
  cast to its dtype: static coefficients get the sum over the tokens, in float32."""
  grad = jnp.sum(grad, axis=tuple(range(grad.ndim - like.ndim)))
  broadcast = tuple(i for i, size in enumerate(like.shape) if size == 1 and grad.shape[i] != 1)
  return jnp.sum(grad, axis=broadcast, keepdims=True).astype(like.dtype)


# The mixing has custom VJPs for the memory: autodiff of `streams.astype(float32)` followed by
# a contraction keeps the float32 copy for the backward, twice the bytes of bfloat16 streams,
# at `aggregate` and again at `merge`. These keep their inputs as given (the streams in their
# own dtype, which the site's other steps keep anyway; the small coefficients) and cast again
# in the backward, where every product is still float32 and every contraction HIGHEST.


def aggregate(streams: jax.Array, h_pre: jax.Array, num_fracs: int = 1) -> jax.Array:
  """`H_pre @ X`: `[..., n, dim]`, `[..., n]` -> `[..., dim]` (the branch input); with
  `num_fracs = m > 1`, `H_pre` is `[..., m, n m]` over the fraction units (module docstring).

  Leading axes broadcast (static coefficients have none). Computes in float32 (float64 stays
  float64), returns the streams' dtype; the gradients have the inputs' dtypes.
  """
  if num_fracs == 1:
    return _aggregate(streams, h_pre)
  return _fraction_aggregate(streams, h_pre)


@jax.custom_vjp
def _aggregate(streams: jax.Array, h_pre: jax.Array) -> jax.Array:
  dtype = _mixing_dtype(streams, h_pre)
  out = jnp.einsum("...n,...nc->...c", h_pre, streams.astype(dtype), precision=_HIGHEST)
  return out.astype(streams.dtype)


def _aggregate_fwd(streams, h_pre):
  return _aggregate(streams, h_pre), (streams, h_pre)


def _aggregate_bwd(residuals, g):
  streams, h_pre = residuals
  dtype = _mixing_dtype(streams, h_pre)
  g = g.astype(dtype)
  d_streams = h_pre.astype(dtype)[..., :, None] * g[..., None, :]
  d_h_pre = jnp.einsum("...c,...nc->...n", g, streams.astype(dtype), precision=_HIGHEST)
  return _sum_to(d_streams, streams), _sum_to(d_h_pre, h_pre)


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def merge(streams: jax.Array, branch_output: jax.Array, coefficients: Coefficients,
          num_fracs: int = 1) -> jax.Array:
  """`H_res @ X + H_post^T F`: `[..., n, dim]`, `[..., dim]` -> `[..., n, dim]`; with
  `num_fracs = m > 1`, over the fraction units (module docstring).

  Leading axes broadcast (static coefficients have none). Computes in float32 (float64 stays
  float64), returns the streams' dtype; the gradients have the inputs' dtypes.
  """
  mix = _merge if num_fracs == 1 else _fraction_merge
  return mix(streams, branch_output, coefficients.h_post, coefficients.h_res)


@jax.custom_vjp
def _merge(streams, branch_output, h_post, h_res):
  dtype = _mixing_dtype(streams, h_post, h_res)
  mixed = jnp.einsum("...kj,...jc->...kc", h_res, streams.astype(dtype), precision=_HIGHEST)
  spread = h_post[..., :, None] * branch_output.astype(dtype)[..., None, :]
  return (mixed + spread).astype(streams.dtype)


def _merge_fwd(streams, branch_output, h_post, h_res):
  return _merge(streams, branch_output, h_post, h_res), (streams, branch_output, h_post, h_res)


def _merge_bwd(residuals, g):
  streams, branch_output, h_post, h_res = residuals
  dtype = _mixing_dtype(streams, h_post, h_res)
  g = g.astype(dtype)
  # `d F` as products and a sum over the n streams, as autodiff's: a batched dot_general
  # there cost a float32 6-layer scan on XLA:CPU one more F-sized temporary.
  grads = (
      jnp.einsum("...kj,...kc->...jc", h_res.astype(dtype), g, precision=_HIGHEST),
      jnp.sum(h_post.astype(dtype)[..., :, None] * g, axis=-2),
      jnp.einsum("...kc,...c->...k", g, branch_output.astype(dtype), precision=_HIGHEST),
      jnp.einsum("...kc,...jc->...kj", g, streams.astype(dtype), precision=_HIGHEST),
  )
  return tuple(map(_sum_to, grads, residuals))


_merge.defvjp(_merge_fwd, _merge_bwd)


# ---- Frac-connections: the same mixing over the `N = n m` fraction units


def _units(streams: jax.Array, num_fracs: int) -> jax.Array:
  """`[..., n, dim]` -> `[..., n m, dim / m]`: unit `s m + f` is fraction f of stream s."""
  *lead, n, dim = streams.shape
  return streams.reshape(*lead, n * num_fracs, dim // num_fracs)


def _keeping_inputs(fn):
  """`fn` with a custom VJP that keeps only its inputs, as given (the streams in their own
  dtype, as `_aggregate` and `_merge` do), and differentiates `fn` again in the backward: its
  few contractions, `n m` deep, are cheap to redo, and XLA drops the unused forward."""
  wrapped = jax.custom_vjp(fn)
  wrapped.defvjp(lambda *args: (fn(*args), args), lambda args, g: jax.vjp(fn, *args)[1](g))
  return wrapped


@_keeping_inputs
def _fraction_aggregate(streams, h_pre):
  num_fracs = h_pre.shape[-2]
  dtype = _mixing_dtype(streams, h_pre)
  units = _units(streams, num_fracs).astype(dtype)
  out = jnp.einsum("...ju,...uc->...jc", h_pre, units, precision=_HIGHEST)
  return out.reshape(*out.shape[:-2], -1).astype(streams.dtype)


@_keeping_inputs
def _fraction_merge(streams, branch_output, h_post, h_res):
  num_fracs = h_post.shape[-1]
  dtype = _mixing_dtype(streams, h_post, h_res)
  units = _units(streams, num_fracs).astype(dtype)
  fractions = branch_output.reshape(*branch_output.shape[:-1], num_fracs, -1).astype(dtype)
  mixed = jnp.einsum("...uv,...vc->...uc", h_res, units, precision=_HIGHEST)
  spread = jnp.einsum("...uj,...jc->...uc", h_post, fractions, precision=_HIGHEST)
  out = mixed + spread
  return out.reshape(*out.shape[:-2], *streams.shape[-2:]).astype(streams.dtype)
