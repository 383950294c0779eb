"""How each kind of hyper-connection computes its coefficients: configs, initial
parameters and the coefficient functions, as plain dataclasses and pure functions.

The NNX and Linen modules are thin shells over these, so both share one set of math and
parameter names. Everything on the coefficient path runs in float32 with full-precision
matmuls, whatever the streams' dtype (float64 stays float64, for references), and looks at
one token at a time (causal).
"""

import dataclasses
import functools
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.checks import check_int
from mhc_jax.res_mappings import NEWTON_SCHULZ_SCHEDULES, RES_MAPPINGS, ResMapping
from mhc_jax.sinkhorn import BACKENDS
from mhc_jax.streams import Coefficients

Params = dict[str, jax.Array]
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_nonnegative(name: str, value) -> None:
  if not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_streams(streams: jax.Array, num_streams: int, dim: int) -> None:
  """Raises a ValueError naming `streams` unless its last two axes are `[num_streams, dim]`."""
  shape = tuple(getattr(streams, "shape", ()))
  if len(shape) < 2 or shape[-2:] != (num_streams, dim):
    raise ValueError(
        f"streams must have shape [..., num_streams={num_streams}, dim={dim}], got {shape}")


def rms_normalise(x: jax.Array, eps: float) -> jax.Array:
  """Un-weighted RMSNorm over the last axis, in float32 (float64 stays float64)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def _compute_dtype(x: jax.Array, w: jax.Array) -> jnp.dtype:
  """float32 for float32 and narrower inputs; float64 stays float64 (for references)."""
  return jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)


def _project(x: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """-> (`x @ w` `[..., W]`, `rsqrt(mean(x^2) + eps)` `[..., 1]`) in the compute dtype."""
  features = w.ndim - 1
  dtype = _compute_dtype(x, w)
  x = x.astype(dtype)
  projection = jnp.tensordot(x, w.astype(dtype), axes=features, precision=_HIGHEST)
  mean_square = jnp.mean(jnp.square(x), axis=tuple(range(-features, 0)))
  return projection, jax.lax.rsqrt(mean_square + eps)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_projection(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """`(x @ w) * rsqrt(mean(x^2) + eps)`: `[..., *F]`, `[*F, W]` -> `[..., W]`.

  The RMS and the contraction run over x's trailing axes `F` (as many as `w` has before its
  last), so `[..., n, C]` streams go in without a reshape (mHC's `w` is `[n, C, W]`; dynamic
  HC's `[C, W]`, one RMS per stream). That matters for the memory: the backward keeps only
  `x` itself (which the site's `merge` keeps anyway), `w` and two small per-token arrays, the
  projection `[..., W]` and `rsqrt(...)` `[..., 1]`, and recomputes the rest. Autodiff of
  the same formula keeps two more x-sized arrays: the flattened float32 copy of `x` and the
  derivative of its square. (A reshaped `x` kept for the backward is a buffer of its own
  once the residuals leave the forward, e.g. stacked by a scan over layers, even where the
  reshape is a bitcast; on TPU `[..., 4, C]` -> `[..., 4C]` is a real relayout.)
  With `r = rsqrt(mean(x^2) + eps)`, `N = size(F)`:

      dx = (g r) @ w^T - sum_W(g * (x @ w)) * r^3 * x / N,    dw = sum_tokens x^T (g r)

  Computes in float32 (float64 stays float64); the result has the compute dtype, the
  gradients the dtypes of `x` and `w`.
  """
  projection, inv_rms = _project(x, w, eps)
  return projection * inv_rms


def _rms_projection_fwd(x, w, eps):
  projection, inv_rms = _project(x, w, eps)
  return projection * inv_rms, (x, w, projection, inv_rms)


def _rms_projection_bwd(eps, residuals, g):
  del eps  # already inside the saved rsqrt
  x, w, projection, inv_rms = residuals
  features = w.ndim - 1
  dtype = projection.dtype
  g = g.astype(dtype)
  g_scaled = g * inv_rms
  # Through rsqrt(mean(x^2) + eps): d r / d x = -r^3 x / N.
  through_rms = (-jnp.sum(g * projection, axis=-1, keepdims=True) * inv_rms**3 /
                 math.prod(w.shape[:-1]))
  through_rms = through_rms.reshape(through_rms.shape[:-1] + (1,) * features)
  x = x.astype(dtype)
  dx = (jnp.tensordot(g_scaled, w.astype(dtype), axes=((-1,), (-1,)), precision=_HIGHEST) +
        through_rms * x)
  tokens = tuple(range(x.ndim - features))
  # `[W, *F]` then transposed: the other operand order made XLA:CPU transpose all of x.
  dw = jnp.tensordot(g_scaled, x, axes=(tokens, tokens), precision=_HIGHEST)
  return dx.astype(residuals[0].dtype), jnp.moveaxis(dw, 0, -1).astype(w.dtype)


rms_projection.defvjp(_rms_projection_fwd, _rms_projection_bwd)


def pre_weights(num_streams: int, layer_index: int) -> np.ndarray:
  """`[n]` aggregation weights summing to 1: `2/(n+1)` at stream `layer_index mod n`,
  `1/(n+1)` elsewhere (unequal, to break the symmetry between streams, as HC's one-hot)."""
  weights = np.full((num_streams,), 1.0 / (num_streams + 1))
  weights[layer_index % num_streams] = 2.0 / (num_streams + 1)
  return weights


def one_hot_logits(num_streams: int, layer_index: int, on: float, off: float) -> np.ndarray:
  """`on` at stream `layer_index mod n`, `off` elsewhere: which stream a layer reads first."""
  logits = np.full((num_streams,), off, np.float32)
  logits[layer_index % num_streams] = on
  return logits


# --------------------------------------------------------------------------------------------
# Hyper-Connections (Zhu et al., arXiv:2409.19606)


@dataclasses.dataclass(frozen=True)
class HCConfig:
  """Static or dynamic Hyper-Connections at one site.

  Static: `H_pre = A_m` (init one-hot at stream `layer_index mod n`), `H_post = B` (init
  ones), `H_res = A_r` (init identity). Dynamic adds, from each stream's own RMS-normalised
  features `X̄`: `s_α·tanh(X̄ W_m)` to `A_m`, `s_β·tanh(X̄ W_β)` to `B` and
  `s_α·tanh(X̄ W_r)` to `A_r` (the paper's `A_r^T H` convention: row j of `X̄ W_r` is how
  stream j feeds the outputs, i.e. column j of `H_res`). `W` start at 0, `s_α = s_β = 0.01`.
  """

  num_streams: int
  dim: int
  layer_index: int = 0
  dynamic: bool = True
  use_tanh: bool = True
  norm_eps: float = 1e-6
  scale_init: float = 0.01

  def __post_init__(self):
    check_int("num_streams", self.num_streams, 1)
    check_int("dim", self.dim, 1)
    check_int("layer_index", self.layer_index, 0)
    _check_nonnegative("norm_eps", self.norm_eps)

  # The paper exempts the static maps from weight decay (the modules tag them).
  no_weight_decay: ClassVar[frozenset[str]] = frozenset({"static_pre", "static_post",
                                                         "static_res"})

  def coefficient_flops(self) -> int:
    """Forward matmul FLOPs per token of the coefficients: dynamic HC's `W_pre`, `W_post`
    `[C]` and `W_res` `[C, n]` on each of the n streams; static HC has none."""
    n, c = self.num_streams, self.dim
    return 2 * n * c * (2 + n) if self.dynamic else 0

  def passthrough_params(self, params: Params) -> Params:
    """`params` changed so that equal streams pass through the site as a pre-norm residual
    (H_pre sums to 1, H_post = 1, rows of H_res sum to 1: see `mhc_jax.lm.retrofitting`).
    The paper's start already is one (one-hot A_m, B = 1, A_r = I, W = 0)."""
    return params

  def init_params(self, key: jax.Array) -> Params:
    del key  # the paper's initialisation is deterministic
    n, c = self.num_streams, self.dim
    params = {
        "static_pre": jnp.asarray(one_hot_logits(n, self.layer_index, 1.0, 0.0)),
        "static_post": jnp.ones((n,), jnp.float32),
        "static_res": jnp.eye(n, dtype=jnp.float32),
    }
    if self.dynamic:
      params |= {
          "norm_scale": jnp.ones((c,), jnp.float32),
          "w_pre": jnp.zeros((c,), jnp.float32),
          "w_post": jnp.zeros((c,), jnp.float32),
          "w_res": jnp.zeros((c, n), jnp.float32),
          "scale_alpha": jnp.full((), self.scale_init, jnp.float32),
          "scale_beta": jnp.full((), self.scale_init, jnp.float32),
      }
    return params

  def coefficients(self, params: Params, streams: jax.Array) -> Coefficients:
    """`[..., n, C]` -> Coefficients (shapes `[n]`, `[n]`, `[n, n]` when static)."""
    h_pre, h_post, h_res = params["static_pre"], params["static_post"], params["static_res"]
    if not self.dynamic:
      return Coefficients(h_pre, h_post, h_res)
    # `X̄ W = (X (norm_scale W)) * rsqrt(mean(X^2) + eps)` per stream: one `rms_projection`
    # over C for the three projections, so the backward keeps the streams and `[..., n, 2+n]`,
    # not the normalised float32 copy and the projections' intermediates.
    weights = params["norm_scale"][:, None] * jnp.concatenate(
        [params["w_pre"][:, None], params["w_post"][:, None], params["w_res"]], axis=1)
    mixes = rms_projection(streams, weights, self.norm_eps)  # [..., n, 2 + n]
    squash = jnp.tanh if self.use_tanh else (lambda v: v)
    alpha, beta = params["scale_alpha"], params["scale_beta"]
    return Coefficients(
        h_pre=h_pre + alpha * squash(mixes[..., 0]),
        h_post=h_post + beta * squash(mixes[..., 1]),
        # row j of X̄ W_r is column j of H_res
        h_res=h_res + alpha * squash(jnp.swapaxes(mixes[..., 2:], -1, -2)),
    )


# --------------------------------------------------------------------------------------------
# Manifold-Constrained Hyper-Connections (DeepSeek, arXiv:2512.24880) and mHC-lite


@dataclasses.dataclass(frozen=True)
class MHCConfig:
  """mHC at one site: dynamic mappings from the flattened, RMS-normalised streams.

      mixes  = (vec(X) @ phi) * rsqrt(mean(vec(X)^2) + norm_eps)      # norm after the matmul
      H_pre  = sigmoid(alpha[0] * mixes_pre  + bias_pre) + pre_eps
      H_post = 2 * sigmoid(alpha[1] * mixes_post + bias_post)
      H_res  = res_mapping(alpha[2] * mixes_res + bias_res)

  `res_mapping` (`mhc_jax.res_mappings.RES_MAPPINGS`): "sinkhorn" (mHC: SinkhornKnopp of
  the row-major `[n, n]` logits, `R = n²`), "permutations" (mHC-lite: `sum_k softmax_k P_k`
  over the `R = n!` permutation matrices), "kromhc" (KromHC: a Kronecker product of 2x2
  doubly-stochastic factors, `R = 2 log2 n`, n a power of two) or "orthostochastic"
  (tokenbender's: `O ∘ O`, `O` from Newton-Schulz on the row-major `[n, n]` logits, `R = n²`,
  schedule `orthostochastic_schedule`: "converged" (to float32 rounding) or "tokenbender"
  (their 5 steps, approximately doubly stochastic)).
  `phi` is `[n*C, 2n + R]` with column blocks pre `[0:n]`, post `[n:2n]`, res `[2n:]`.
  `use_pre/use_post/use_res = False` is the paper's ablation: `1/n`, `1`, identity.
  `sinkhorn_backend`: see `mhc_jax.sinkhorn_knopp` ("auto": XLA on every platform until a
  Pallas kernel is validated there; "pallas" opts in).

  Initialisation (the paper leaves it open), chosen so a fresh network is a pre-norm
  residual network plus a perturbation of order `alpha = 0.01`:
    * `bias_post = 0`: `H_post = 1` on every stream, so copies of the embedding stay equal
      copies and every stream receives exactly the baseline's `x + F(norm(x))`.
    * `bias_pre = +1` at stream `layer_index mod n`, `-1` elsewhere: with equal streams the
      branch input is a multiple of `x`, which the block's own norm removes; the asymmetry
      breaks the symmetry between streams in the backward pass, as HC's one-hot `A_m` does.
    * `bias_res`: the mapping's `init_bias`, such that `H_res` starts at identity weight
      `res_init_identity = 0.95`: near the identity, yet `H(1-H)` ≈ 0.05 keeps the gradient
      alive (a Sinkhorn logit gap of 20 would freeze it). The diagonal of `H_res` is 0.95 for
      "sinkhorn" (a logit gap on the diagonal), "kromhc" (every factor keeps
      `0.95^(1/log2 n)`) and "orthostochastic" (logits an orthogonal `O_0` with
      `O_0,ii² = 0.95`); for "permutations" the identity permutation's weight is 0.95.
      With `orthostochastic_schedule="tokenbender"` that start is scaled by its unconverged
      `p⁵(1/sqrt(n))²` (rows sum to 0.982, 1.005, 0.983 at n = 2, 4, 8).
    * `phi ~ N(0, 1/(n C))`: `mixes` start as unit-variance token-dependent signals, so the
      dynamic part of every logit starts at about `alpha = 0.01`.
  """

  num_streams: int
  dim: int
  layer_index: int = 0
  res_mapping: Literal["sinkhorn", "permutations", "kromhc", "orthostochastic"] = "sinkhorn"
  sinkhorn_iters: int = 20
  sinkhorn_eps: float = 0.0
  sinkhorn_backend: str = "auto"
  orthostochastic_schedule: str = "converged"
  pre_eps: float = 0.0
  norm_eps: float = 1e-6
  use_pre: bool = True
  use_post: bool = True
  use_res: bool = True
  alpha_init: float = 0.01
  res_init_identity: float = 0.95

  def __post_init__(self):
    check_int("num_streams", self.num_streams, 1)
    check_int("dim", self.dim, 1)
    check_int("layer_index", self.layer_index, 0)
    check_int("sinkhorn_iters", self.sinkhorn_iters, 1)
    for name in ("sinkhorn_eps", "pre_eps", "norm_eps"):
      _check_nonnegative(name, getattr(self, name))
    if self.sinkhorn_backend not in BACKENDS:
      raise ValueError(f"sinkhorn_backend must be one of {', '.join(BACKENDS)}; got "
                       f"{self.sinkhorn_backend!r}")
    if self.orthostochastic_schedule not in NEWTON_SCHULZ_SCHEDULES:
      raise ValueError(f"orthostochastic_schedule must be one of "
                       f"{', '.join(NEWTON_SCHULZ_SCHEDULES)}; got "
                       f"{self.orthostochastic_schedule!r}")
    if self.res_mapping not in RES_MAPPINGS:
      raise ValueError(f"res_mapping must be one of {', '.join(RES_MAPPINGS)}; got "
                       f"{self.res_mapping!r}")
    self.res_spec.check(self)
    if not 0.0 < self.res_init_identity < 1.0:
      raise ValueError(f"res_init_identity must be in (0, 1), got {self.res_init_identity!r}")

  @property
  def res_spec(self) -> ResMapping:
    """The `res_mapping`'s entry in `RES_MAPPINGS`: what parameter counts, FLOPs and
    initialisation read about it."""
    return RES_MAPPINGS[self.res_mapping]

  @property
  def num_res_logits(self) -> int:
    return self.res_spec.num_logits(self.num_streams)

  @property
  def res_matmul_flops(self) -> int:
    """Forward matmul FLOPs per token from the res logits to `H_res` (not `phi`'s)."""
    return self.res_spec.matmul_flops(self)

  no_weight_decay: ClassVar[frozenset[str]] = frozenset()  # phi decays; the rest are vectors

  def coefficient_flops(self) -> int:
    """Forward matmul FLOPs per token of the coefficients: `phi` `[nC, 2n + R]` on vec(X),
    then the mapping's own from the R res logits to `H_res`."""
    n, c = self.num_streams, self.dim
    return 2 * n * c * (2 * n + self.num_res_logits) + self.res_matmul_flops

  def passthrough_params(self, params: Params) -> Params:
    """`params` changed so that equal streams pass through the site as a pre-norm residual
    would (see `mhc_jax.lm.retrofitting`): `alpha_pre = alpha_post = 0` so H_pre and H_post
    are static; `H_post = 2 sigmoid(0) = 1`; `H_pre = pre_weights`, summing to 1; H_res keeps
    its start, whose rows sum to 1 for every mapping that is doubly stochastic. float32."""
    n = self.num_streams
    target = pre_weights(n, self.layer_index) - self.pre_eps  # H_pre = sigmoid + pre_eps
    bias = np.array(params["bias"], np.float32)
    bias[:n] = np.log(target / (1.0 - target))  # in float64, then rounded once
    bias[n:2 * n] = 0.0
    alpha = np.array(params["alpha"], np.float32)
    alpha[:2] = 0.0
    return {**params, "alpha": alpha, "bias": bias}

  def init_params(self, key: jax.Array) -> Params:
    n, c = self.num_streams, self.dim
    width = 2 * n + self.num_res_logits
    bias = np.concatenate([one_hot_logits(n, self.layer_index, 1.0, -1.0),
                           np.zeros((n,), np.float32),
                           self.res_spec.init_bias(n, self.res_init_identity)])
    return {
        "phi": jax.random.normal(key, (n * c, width), jnp.float32) / math.sqrt(n * c),
        "alpha": jnp.full((3,), self.alpha_init, jnp.float32),
        "bias": jnp.asarray(bias),
    }

  def coefficients(self, params: Params, streams: jax.Array) -> Coefficients:
    """`[..., n, C]` -> Coefficients with shapes `[..., n]`, `[..., n]`, `[..., n, n]`."""
    n = self.num_streams
    mixes = rms_projection(streams, params["phi"].reshape(n, self.dim, -1), self.norm_eps)
    alpha, bias = params["alpha"], params["bias"]
    batch = mixes.shape[:-1]

    if self.use_pre:
      h_pre = jax.nn.sigmoid(alpha[0] * mixes[..., :n] + bias[:n]) + self.pre_eps
    else:
      h_pre = jnp.full((*batch, n), 1.0 / n, jnp.float32)
    if self.use_post:
      h_post = 2.0 * jax.nn.sigmoid(alpha[1] * mixes[..., n:2 * n] + bias[n:2 * n])
    else:
      h_post = jnp.ones((*batch, n), jnp.float32)
    if not self.use_res:
      h_res = jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (*batch, n, n))
    else:
      h_res = self.res_spec.h_res(alpha[2] * mixes[..., 2 * n:] + bias[2 * n:], self)
    return Coefficients(h_pre, h_post, h_res)


# --------------------------------------------------------------------------------------------
# Learned output head (DeepSeek-V4 "HyperHead")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Collapses the streams with learned per-token sigmoid weights (DeepSeek-V4's head):

      weights = sigmoid(alpha * (vec(X) @ phi) * rsqrt(mean(vec(X)^2) + norm_eps) + bias) + eps
      out     = sum_i weights_i X_i

  Init: `bias = 0` (every weight 1/2; the final norm that follows removes the scale),
  `alpha = 0.01`, `phi ~ N(0, 1/(n C))`.
  """

  num_streams: int
  dim: int
  eps: float = 0.0
  norm_eps: float = 1e-6
  alpha_init: float = 0.01

  def __post_init__(self):
    check_int("num_streams", self.num_streams, 1)
    check_int("dim", self.dim, 1)
    _check_nonnegative("eps", self.eps)
    _check_nonnegative("norm_eps", self.norm_eps)

  no_weight_decay: ClassVar[frozenset[str]] = frozenset()

  def init_params(self, key: jax.Array) -> Params:
    n, c = self.num_streams, self.dim
    return {
        "phi": jax.random.normal(key, (n * c, n), jnp.float32) / math.sqrt(n * c),
        "alpha": jnp.full((1,), self.alpha_init, jnp.float32),
        "bias": jnp.zeros((n,), jnp.float32),
    }

  def weights(self, params: Params, streams: jax.Array) -> jax.Array:
    """`[..., n, C]` -> `[..., n]` per-token stream weights."""
    phi = params["phi"].reshape(self.num_streams, self.dim, -1)
    mixes = rms_projection(streams, phi, self.norm_eps)
    return jax.nn.sigmoid(params["alpha"][0] * mixes + params["bias"]) + self.eps
