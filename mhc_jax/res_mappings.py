"""The `H_res` mappings of mHC: how a site's `R` residual logits per token become its `[n, n]`
stream mixing. One table, `RES_MAPPINGS`, keyed by `MHCConfig.res_mapping`; each entry says
everything the rest of the code asks of a mapping (logit count, initial bias, the mapping
itself, what it supports, its matmul FLOPs), so a new mapping is one entry here.

    sinkhorn         R = n²       Sinkhorn-Knopp of the `[n, n]` logits (mHC)
    permutations     R = n!       softmax-weighted sum of the n! permutation matrices (mHC-lite)
    kromhc           R = 2 log2 n Kronecker product of 2x2 doubly-stochastic factors (KromHC)
    orthostochastic  R = n²       `O ∘ O`, `O` orthogonal by Newton-Schulz on the logits

All run in float32 (float64 stays float64, for references), on the logits of one token at a
time, with every matmul at HIGHEST precision.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.sinkhorn import sinkhorn_knopp

_HIGHEST = jax.lax.Precision.HIGHEST
MAX_PERMUTATION_STREAMS = 6  # 6! = 720 permutation matrices; 7! = 5040 is past any use


def identity_logit_gap(num_choices: int, identity_weight: float) -> float:
  """Logit gap that gives the identity `identity_weight` of a softmax over `num_choices`."""
  if num_choices == 1:
    return 0.0
  return math.log(identity_weight * (num_choices - 1) / (1.0 - identity_weight))


def permutation_matrices(num_streams: int) -> np.ndarray:
  """All `n!` permutation matrices `[n!, n, n]`, the identity first."""
  perms = list(itertools.permutations(range(num_streams)))
  return np.stack([np.eye(num_streams, dtype=np.float32)[list(p)] for p in perms])


def _check_logits(logits, axes: str, ok: bool) -> None:
  if not ok:
    raise ValueError(f"logits must have shape {axes}, got {tuple(logits.shape)}")


# --------------------------------------------------------------------------------------------
# KromHC (Zhou et al., arXiv:2601.21579; public code wz1119/KromHC)


def kromhc_factors(num_streams: int, name: str = "num_streams") -> int:
  """`K` with `2^K = num_streams`; a ValueError naming `name` unless it is a power of two."""
  if num_streams < 1 or num_streams & (num_streams - 1):
    raise ValueError(f"{name} must be a power of two with res_mapping='kromhc' (a "
                     f"Kronecker product of 2x2 factors), got {num_streams}; use 1, 2, 4, 8, "
                     f"... streams or res_mapping='sinkhorn' or 'orthostochastic'")
  return num_streams.bit_length() - 1


def kromhc(logits: jax.Array) -> jax.Array:
  """`[..., 2K]` logits -> `H_res = U_1 ⊗ U_2 ⊗ ... ⊗ U_K` `[..., 2^K, 2^K]`, exactly doubly
  stochastic (a Kronecker product of doubly-stochastic matrices is one).

  KromHC's parametrisation for `n = 2^K`: logits pair `k` (`logits[..., 2k:2k+2]`, the
  identity's logit then the swap's) gives `(p_k, 1 - p_k) = softmax(pair)` and the factor
  `U_k = p_k I + (1 - p_k) [[0, 1], [1, 0]] = [[p_k, 1-p_k], [1-p_k, p_k]]`, a convex
  combination of the two 2x2 permutations. `U_1` is the outermost factor (the most
  significant bit of a stream's index), as in KromHC's loop. Every factor is symmetric, so
  `H_res` is too: KromHC's transposed application (`out_t = sum_s H[s, t] X_s`) and ours
  (`H_res @ X`) agree. Both weights come from the softmax, so the small one keeps its
  relative precision at a large gap (KromHC's `1 - p` rounds it). `K = 0` (one stream): `[[1]]`.
  """
  _check_logits(logits, "[..., 2K] (K = log2 num_streams)", logits.ndim >= 1 and
                logits.shape[-1] % 2 == 0)
  batch = logits.shape[:-1]
  weights = jax.nn.softmax(logits.reshape(*batch, -1, 2), axis=-1)  # [..., K, 2]
  h_res = jnp.ones((*batch, 1, 1), weights.dtype)
  for k in range(weights.shape[-2]):
    keep, swap = weights[..., k, 0, None, None], weights[..., k, 1, None, None]
    factor = keep * jnp.eye(2, dtype=weights.dtype) + swap * (1 - jnp.eye(2, dtype=weights.dtype))
    size = 2 * h_res.shape[-1]
    h_res = (h_res[..., :, None, :, None] * factor[..., None, :, None, :]).reshape(
        *batch, size, size)
  return h_res


def _kromhc_pairs(num_streams: int, identity_weight: float) -> np.ndarray:
  """Every factor keeps `p = identity_weight^(1/K)`, so `H_res`'s diagonal, and the identity's
  weight `prod_k p_k` in the expanded product, start at `identity_weight`. Each pair is
  `(0, -gap)`: KromHC's own start `(0, -8)` is `identity_weight = sigmoid(8)^K`."""
  factors = kromhc_factors(num_streams)
  if factors == 0:
    return np.zeros((0,), np.float32)
  gap = identity_logit_gap(2, identity_weight**(1.0 / factors))
  return np.tile(np.asarray([0.0, -gap], np.float32), factors)


def _kromhc_bias(config) -> np.ndarray:
  """The streams' factors (the high bits of unit `s m + f`), then the fractions'."""
  return np.concatenate([_kromhc_pairs(config.num_streams, config.res_init_identity),
                         _kromhc_pairs(config.num_fracs, config.frac_init_identity)])


# --------------------------------------------------------------------------------------------
# Orthostochastic H_res (tokenbender/mHC, `mhc_h_res_proj="orthostochastic"`)

# One Newton-Schulz step `X <- a X + (b A + c A²) X`, `A = X Xᵀ`, as the odd polynomial
# `a σ + b σ³ + c σ⁵` on every singular value σ of X.
TOKENBENDER_STEP = (3.0, -3.2, 1.2)  # σ ×3 while small; fixed point 1 with slope -0.6
CONVERGENT_STEP = (15 / 8, -10 / 8, 3 / 8)  # slope and curvature 0 at 1: cubic convergence
NEWTON_SCHULZ_SCHEDULES = {
    # 16 steps. In float32, rows and columns sum to 1 within 5e-7 (4 ulps of 1; at most 4.7e-7
    # measured over 200k random logits at n = 2, 4, 8) for logits whose smallest singular
    # value is at least 1e-6 of their Frobenius norm: on [1e-6, 1] the composed polynomial is
    # 1 to 1e-14, and 12 + 4 is the shortest split of these two steps that gets there.
    "converged": (TOKENBENDER_STEP,) * 12 + (CONVERGENT_STEP,) * 4,
    # tokenbender's default: approximate. Singular values end in [0.97, 1.19] for σ >= 0.01
    # and at most 1.2105 for any σ in [0, 1], so row and column sums stay below 1.2105² =
    # 1.4652; random logits reach 1.46 (measured); the start (all σ = 1/sqrt(n)) ends at
    # p⁵(1/sqrt(n)), so H_res starts with rows summing to 0.982 (n = 2), 1.005 (4), 0.983 (8).
    "tokenbender": (TOKENBENDER_STEP,) * 5,
}
FROBENIUS_EPS = 1e-7  # tokenbender's `ns_eps`: X / (||X||_F + eps)


def newton_schulz_square(logits: jax.Array, schedule: tuple) -> jax.Array:
  """`[..., n, n]` logits -> `O ∘ O` (entrywise square), `O` the Newton-Schulz iterate.

  tokenbender's `orthostochastic_project`: `X = logits / (||logits||_F + 1e-7)` (all
  singular values in [0, 1]), then per step `(a, b, c)` of `schedule`
  `X <- a X + (b A + c A²) X` with `A = X Xᵀ`. For an orthogonal `O` every row and column of
  `O ∘ O` sums to 1 (`(O Oᵀ)_ii` and `(Oᵀ O)_jj`) and every entry is >= 0, so `H_res` is
  doubly stochastic as far as the iterations converge (see `NEWTON_SCHULZ_SCHEDULES`): a
  singular value the schedule leaves below 1 leaves the sums below 1 (the gains stay <= 1 with
  "converged", which maps [0, 1] into [0, 1 + 1e-15]); tokenbender's overshoots.
  tokenbender applies its matrix transposed (`out_t = sum_s H[s, t] X_s`); the iteration
  commutes with transposition, so their logits `M` are our `Mᵀ`.
  Plain autodiff; `orthostochastic` recomputes it in the backward. Cost: 3 batched `[n, n]`
  matmuls per step, slow on XLA:CPU (an n = 4 site's forward+backward took 7x the Sinkhorn
  site's there; `python -m experiments.bench_site_memory`).
  """
  _check_logits(logits, "[..., n, n]", logits.ndim >= 2 and logits.shape[-1] == logits.shape[-2])
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  norm = jnp.sqrt(jnp.sum(jnp.square(logits), axis=(-2, -1), keepdims=True))
  x = logits / (norm + FROBENIUS_EPS)
  for a, b, c in schedule:
    gram = jnp.einsum("...ij,...kj->...ik", x, x, precision=_HIGHEST)
    poly = b * gram + c * jnp.einsum("...ij,...jk->...ik", gram, gram, precision=_HIGHEST)
    x = a * x + jnp.einsum("...ij,...jk->...ik", poly, x, precision=_HIGHEST)
  return jnp.square(x)


# The backward recomputes the iterates from the logits (saved alone, n² floats per token, as
# Sinkhorn's custom VJP saves them) and differentiates through every step exactly. Plain
# autodiff keeps about 3.2 n² floats per step and token: 51 n² with "converged", 18 n² with
# "tokenbender" (measured, n = 4 and 8; a site: experiments.bench_site_memory).
orthostochastic = jax.checkpoint(newton_schulz_square, static_argnums=(1,))


@functools.cache
def uniform_diagonal_rotation(num_streams: int, diagonal: float) -> np.ndarray:
  """An orthogonal `[n, n]` matrix (float64, read-only) with every diagonal entry `diagonal`.

  `exp(θ (N - Nᵀ))` with `N` the negacyclic shift (`N e_i = e_{i+1}`, `N e_{n-1} = -e_0`):
  a polynomial in `N`, so its diagonal is constant, and a rotation, since `N - Nᵀ` is
  skew-symmetric; `θ` by bisection on `[0, π / max|eig|]`, where the diagonal falls from 1 to
  below 0. (The cyclic shift would do for n >= 3, but its `N - Nᵀ` is 0 at n = 2.)
  """
  if num_streams == 1:
    rotation = np.ones((1, 1))
  else:
    shift = np.roll(np.eye(num_streams), 1, axis=0)
    shift[0, -1] = -1.0
    rates, vectors = np.linalg.eigh(1j * (shift - shift.T))  # N - Nᵀ = -i V diag(rates) V^H
    at = lambda theta: ((vectors * np.exp(-1j * theta * rates)) @ vectors.conj().T).real
    low, high = 0.0, math.pi / np.max(np.abs(rates))
    for _ in range(60):  # to float64 resolution
      mid = (low + high) / 2
      low, high = (mid, high) if at(mid)[0, 0] > diagonal else (low, mid)
    rotation = at(high)
  rotation.setflags(write=False)
  return rotation


def _orthostochastic_bias(config) -> np.ndarray:
  """Logits `O_0`, orthogonal with `O_0,ii² = res_init_identity` (`uniform_diagonal_rotation`):
  their own polar factor, reached from singular values all `1/sqrt(n)`, so `H_res` starts
  with diagonal `res_init_identity` (its rest on the cyclic neighbours i ± 1 mostly). With
  fractions `O_0 ⊗ O_f` (`O_f,ii² = frac_init_identity`), orthogonal, so `H_res` starts at
  `(O_0 ∘ O_0) ⊗ (O_f ∘ O_f)`."""
  streams = uniform_diagonal_rotation(config.num_streams, math.sqrt(config.res_init_identity))
  fractions = uniform_diagonal_rotation(config.num_fracs, math.sqrt(config.frac_init_identity))
  return np.kron(streams, fractions).astype(np.float32).reshape(-1)


# --------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass(frozen=True)
class ResMapping:
  """One `H_res` mapping. Functions of the site's `MHCConfig` (`config`) where options matter;
  `n` is the side of `H_res`, `config.res_size` (the streams, times the fractions if any).

  num_logits(n)            residual logits per token, `R` (phi's res columns, bias's length)
  init_bias(config)        `[R]` float32 logits with which `H_res` starts at identity weight
                           `res_init_identity` among the streams and, with fractions,
                           `frac_init_identity` among a stream's fractions (a Kronecker
                           product of the two starts where the mapping has one)
  h_res(logits, config)    `[..., R]` -> `[..., n, n]`, applied as `H_res @ X`
  check(config)            raises a one-line ValueError for what the mapping does not support
  matmul_flops(config)     forward matmul FLOPs per token from logits to `H_res` (elementwise
                           work, e.g. Sinkhorn's normalisations, left out as `lm.flops` does)
  """

  num_logits: Callable[[int], int]
  init_bias: Callable[..., np.ndarray]
  h_res: Callable[..., jax.Array]
  check: Callable = lambda config: None
  matmul_flops: Callable = lambda config: 0


def _square(logits: jax.Array, n: int) -> jax.Array:
  return logits.reshape(*logits.shape[:-1], n, n)


def _sinkhorn_bias(config) -> np.ndarray:
  """A logit gap on the diagonal; with fractions, one on the same stream and one on the same
  fraction: the logits of `S ⊗ F` (both with constant diagonals), Sinkhorn's fixed point."""
  n, m = config.num_streams, config.num_fracs
  same_stream = np.kron(np.eye(n, dtype=np.float32), np.ones((m, m), np.float32))
  same_fraction = np.kron(np.ones((n, n), np.float32), np.eye(m, dtype=np.float32))
  return (same_stream * identity_logit_gap(n, config.res_init_identity) +
          same_fraction * identity_logit_gap(m, config.frac_init_identity)).reshape(-1)


def _permutation_bias(config) -> np.ndarray:
  """The identity's weight `res_init_identity` among the permutations that keep every unit
  in its fraction; with fractions, the others share `1 - frac_init_identity`."""
  m, size = config.num_fracs, config.res_size
  units = np.arange(size)
  keeps = np.asarray([np.all(np.asarray(p) % m == units % m)
                      for p in itertools.permutations(units)])
  bias = np.zeros((keeps.size,), np.float32)
  gap = identity_logit_gap(int(keeps.sum()), config.res_init_identity)
  bias[0] = gap
  if not keeps.all():
    kept_mass = math.exp(gap) + keeps.sum() - 1  # the softmax's sum over those kept
    bias[~keeps] = math.log((1 - config.frac_init_identity) * kept_mass /
                            (config.frac_init_identity * np.sum(~keeps)))
  return bias


def _size_name(config) -> str:
  """What `config.res_size` is called in an error: the streams, or streams times fractions."""
  return "num_streams" if config.num_fracs == 1 else "num_streams * num_fracs"


def _permutation_mixture(logits: jax.Array, config) -> jax.Array:
  return jnp.einsum("...k,kij->...ij", jax.nn.softmax(logits, axis=-1),
                    permutation_matrices(config.res_size), precision=_HIGHEST)


def _check_permutation_streams(config) -> None:
  if config.res_size > MAX_PERMUTATION_STREAMS:
    raise ValueError(f"{_size_name(config)} must be <= {MAX_PERMUTATION_STREAMS} with "
                     f"res_mapping='permutations' (n! mixtures), got {config.res_size}")


RES_MAPPINGS: dict[str, ResMapping] = {
    "sinkhorn": ResMapping(
        num_logits=lambda n: n * n, init_bias=_sinkhorn_bias,
        h_res=lambda logits, config: sinkhorn_knopp(
            _square(logits, config.res_size), config.sinkhorn_iters,
            eps=config.sinkhorn_eps, backend=config.sinkhorn_backend)),
    "permutations": ResMapping(
        num_logits=math.factorial, init_bias=_permutation_bias, h_res=_permutation_mixture,
        check=_check_permutation_streams,
        matmul_flops=lambda config: 2 * math.factorial(config.res_size) * config.res_size**2),
    "kromhc": ResMapping(
        num_logits=lambda n: 2 * kromhc_factors(n), init_bias=_kromhc_bias,
        h_res=lambda logits, config: kromhc(logits),
        check=lambda config: kromhc_factors(config.res_size, _size_name(config))),
    "orthostochastic": ResMapping(
        num_logits=lambda n: n * n, init_bias=_orthostochastic_bias,
        h_res=lambda logits, config: orthostochastic(
            _square(logits, config.res_size),
            NEWTON_SCHULZ_SCHEDULES[config.orthostochastic_schedule]),
        # Three [n, n] matmuls per step: X Xᵀ, A², (b A + c A²) X.
        matmul_flops=lambda config: 3 * 2 * config.res_size**3 *
        len(NEWTON_SCHULZ_SCHEDULES[config.orthostochastic_schedule])),
}
