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
from mhc_jax.streams import Coefficients, embed_streams, mixing_flops

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


def _split_fractions(x: jax.Array, num_fracs: int) -> jax.Array:
  """`[..., C]` -> `[..., m, C / m]` (fraction f: channels `[f C/m, (f+1) C/m)`); as is at 1."""
  if num_fracs == 1:
    return x
  return x.reshape(*x.shape[:-1], num_fracs, x.shape[-1] // num_fracs)


def _project(x: jax.Array, w: jax.Array, eps: float,
             num_fracs: int) -> tuple[jax.Array, jax.Array]:
  """-> (`x @ w` `[..., W]`, `rsqrt(mean(x^2) + eps)` `[..., 1]`) in the compute dtype."""
  features = w.ndim - 1
  dtype = _compute_dtype(x, w)
  x = _split_fractions(x, num_fracs).astype(dtype)
  projection = jnp.tensordot(x, w.astype(dtype), axes=features, precision=_HIGHEST)
  mean_square = jnp.mean(jnp.square(x), axis=tuple(range(-features, 0)))
  return projection, jax.lax.rsqrt(mean_square + eps)[..., None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_projection(x: jax.Array, w: jax.Array, eps: float, num_fracs: int = 1) -> jax.Array:
  """`(x @ w) * rsqrt(mean(x^2) + eps)`: `[..., *F]`, `[*F, W]` -> `[..., W]`.

  `num_fracs = m > 1` first splits x's last axis into m fractions, `[..., C]` ->
  `[..., m, C/m]`, inside the VJP (the backward keeps `x` as given): one RMS and projection per
  fraction unit (Frac-connections' dynamic HC, `w` `[C/m, W]`).

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
  projection, inv_rms = _project(x, w, eps, num_fracs)
  return projection * inv_rms


def _rms_projection_fwd(x, w, eps, num_fracs):
  projection, inv_rms = _project(x, w, eps, num_fracs)
  return projection * inv_rms, (x, w, projection, inv_rms)


def _rms_projection_bwd(eps, num_fracs, residuals, g):
  del eps  # already inside the saved rsqrt
  x, w, projection, inv_rms = residuals
  x = _split_fractions(x, num_fracs)
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
        through_rms * x).reshape(residuals[0].shape)
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


class _Fractions:
  """Frac-connections (Zhu et al., arXiv:2503.14125) for a site config with `num_streams`,
  `dim` and `num_fracs` fields: each stream's `dim` split into `m = num_fracs` fractions,
  mixed as `N = n m` units (`mhc_jax.streams`; lucidrains' `num_fracs`, fraction f being
  channels `[f d, (f+1) d)`, `d = dim / m`). `m = 1` is the method itself, unchanged."""

  def _check_fractions(self) -> None:
    check_int("num_fracs", self.num_fracs, 1)
    if self.dim % self.num_fracs:
      raise ValueError(f"num_fracs={self.num_fracs} must divide dim={self.dim} (each stream is "
                       f"split into num_fracs equal fractions); use a divisor of dim")

  @property
  def res_size(self) -> int:
    """The side of `H_res`: `num_streams * num_fracs` units."""
    return self.num_streams * self.num_fracs

  @property
  def fraction_mask(self) -> np.ndarray:
    """`[m, N]`: 1 where unit `s m + f` is fraction `j` (`f = j`), else 0."""
    return np.tile(np.eye(self.num_fracs, dtype=np.float32), (1, self.num_streams))

  def mixing_flops(self) -> int:
    """Forward matmul FLOPs per token of the site's stream mixing (`streams.mixing_flops`)."""
    return mixing_flops(self.num_streams, self.dim, self.num_fracs)


# --------------------------------------------------------------------------------------------
# Hyper-Connections (Zhu et al., arXiv:2409.19606)


@dataclasses.dataclass(frozen=True)
class HCConfig(_Fractions):
  """Static or dynamic Hyper-Connections at one site.

  Static: `H_pre = A_m` (init one-hot at stream `layer_index mod n`), `H_post = B` (init
  ones), `H_res = A_r` (init identity). Dynamic adds, from each stream's own RMS-normalised
  features `X̄`: `s_α·tanh(X̄ W_m)` to `A_m`, `s_β·tanh(X̄ W_β)` to `B` and
  `s_α·tanh(X̄ W_r)` to `A_r` (the paper's `A_r^T H` convention: row j of `X̄ W_r` is how
  stream j feeds the outputs, i.e. column j of `H_res`). `W` start at 0, `s_α = s_β = 0.01`.

  `num_fracs = m > 1`: Frac-connections, HC over the `N = n m` fraction units of `d = C/m`
  channels, as lucidrains' `HyperConnections(num_fracs=m)`: the branch input has m fractions,
  so `A_m` is `static_pre` `[m, N]` (fraction j of the input reads unit u with weight
  `[j, u]`), `B` is `static_post` `[N, m]` (unit u receives branch fraction j with weight
  `[u, j]`), `A_r` is `[N, N]`; every unit is RMS-normalised over its d channels (one
  `norm_scale` `[d]`, as their RMSNorm(dim / m)), and the dynamic parts come from each
  unit's own features with shared weights `w_pre` `[d, m]`, `w_post` `[d, m]`, `w_res`
  `[d, N]`: `H_pre[j, u] += s_α tanh(X̄_u w_pre)[j]`, `H_res[v, u] += s_α tanh(X̄_u w_res)[v]`
  and, for units `u = (s, f)`, `H_post[(s, f), j] += s_β tanh(X̄_(s, j) w_post)[f]` (their
  `beta[f1, s, f2]` from unit (s, f1), sending branch fraction f1 to fraction f2 of stream
  s). `w_pre`, `w_post` are `[C]` at m = 1, as theirs. Initialisation (theirs is not used,
  see `init_params`): `static_pre[j] = ` one-hot at fraction j of stream `layer_index mod n`,
  `static_post[(s, f), j] = [f = j]`, `A_r = I`, so with `W = 0` the site is exactly
  pre-norm's `x + F(norm(x))` on every stream whose fractions are `x`'s.
  """

  num_streams: int
  dim: int
  layer_index: int = 0
  num_fracs: int = 1
  dynamic: bool = True
  use_tanh: bool = True
  norm_eps: float = 1e-6
  scale_init: float = 0.01

  def __post_init__(self):
    check_int("num_streams", self.num_streams, 1)
    check_int("dim", self.dim, 1)
    check_int("layer_index", self.layer_index, 0)
    _check_nonnegative("norm_eps", self.norm_eps)
    self._check_fractions()

  # The paper exempts the static maps from weight decay (the modules tag them).
  no_weight_decay: ClassVar[frozenset[str]] = frozenset({"static_pre", "static_post",
                                                         "static_res"})
  # The maps and the dynamic parts' scales enter the coefficients raw, so Adam moves them by
  # about the learning rate each step: their own rate is `static_map_lr_multiplier` times it.
  static_maps: ClassVar[frozenset[str]] = no_weight_decay | {"scale_alpha", "scale_beta"}

  def coefficient_flops(self) -> int:
    """Forward matmul FLOPs per token of the coefficients: dynamic HC's `W_pre`, `W_post`
    `[C]` and `W_res` `[C, n]` on each of the n streams (with fractions `[d, m]`, `[d, m]`,
    `[d, N]` on each of the N units: `2 n C (2m + N)`); static HC has none."""
    n, c, m = self.num_streams, self.dim, self.num_fracs
    return 2 * n * c * (2 * m + n * m) if self.dynamic else 0

  def passthrough_params(self, params: Params) -> Params:
    """`params` changed so that equal streams pass through the site as a pre-norm residual
    (H_pre sums to 1, H_post = 1, rows of H_res sum to 1: see `mhc_jax.lm.retrofitting`).
    The paper's start already is one (one-hot A_m, B = 1, A_r = I, W = 0), with fractions
    too (each input fraction reads its own fraction, each branch fraction returns to it)."""
    return params

  def init_params(self, key: jax.Array) -> Params:
    del key  # the paper's initialisation is deterministic
    n, c, m = self.num_streams, self.dim, self.num_fracs
    d, units = c // m, self.res_size
    # `[m, N]` and `[N, m]` maps, and `[d, m]` weights, are `[N]` and `[C]` at m = 1.
    per_fraction = (lambda a: a.reshape(-1)) if m == 1 else (lambda a: a)
    # Fraction j of the input reads fraction j of stream `layer_index mod n` (unit s m + f).
    reads = self.fraction_mask * np.repeat(one_hot_logits(n, self.layer_index, 1.0, 0.0), m)
    params = {
        "static_pre": jnp.asarray(per_fraction(reads)),
        "static_post": jnp.asarray(per_fraction(self.fraction_mask.T)),
        "static_res": jnp.eye(units, dtype=jnp.float32),
    }
    if self.dynamic:
      params |= {
          "norm_scale": jnp.ones((d,), jnp.float32),
          "w_pre": jnp.asarray(per_fraction(np.zeros((d, m), np.float32))),
          "w_post": jnp.asarray(per_fraction(np.zeros((d, m), np.float32))),
          "w_res": jnp.zeros((d, units), jnp.float32),
          "scale_alpha": jnp.full((), self.scale_init, jnp.float32),
          "scale_beta": jnp.full((), self.scale_init, jnp.float32),
      }
    return params

  def coefficients(self, params: Params, streams: jax.Array) -> Coefficients:
    """`[..., n, C]` -> Coefficients (shapes `[n]`, `[n]`, `[n, n]` when static; with
    fractions `[..., m, N]`, `[..., N, m]`, `[..., N, N]`)."""
    h_pre, h_post, h_res = params["static_pre"], params["static_post"], params["static_res"]
    if not self.dynamic:
      return Coefficients(h_pre, h_post, h_res)
    n, m = self.num_streams, self.num_fracs
    d, units = self.dim // m, self.res_size
    # `X̄ W = (X (norm_scale W)) * rsqrt(mean(X^2) + eps)` per unit: one `rms_projection`
    # over its channels for the three projections, so the backward keeps the streams and
    # `[..., N, 2m + N]`, not the normalised float32 copy and the projections' intermediates.
    weights = params["norm_scale"][:, None] * jnp.concatenate(
        [params["w_pre"].reshape(d, m), params["w_post"].reshape(d, m), params["w_res"]],
        axis=1)
    mixes = rms_projection(streams, weights, self.norm_eps, m)
    mixes = mixes.reshape(*streams.shape[:-2], units, 2 * m + units)
    squash = jnp.tanh if self.use_tanh else (lambda v: v)
    alpha, beta = params["scale_alpha"], params["scale_beta"]
    # Row u of `X̄ W_pre` is column u of H_pre, as row j of `X̄ W_r` is column j of H_res.
    h_pre = h_pre.reshape(m, units) + alpha * squash(jnp.swapaxes(mixes[..., :m], -1, -2))
    # From unit (s, f1): its branch fraction f1 to each fraction f2 of stream s.
    post = mixes[..., m:2 * m].reshape(*mixes.shape[:-2], n, m, m)
    post = jnp.swapaxes(post, -1, -2).reshape(*mixes.shape[:-2], units, m)
    h_post = h_post.reshape(units, m) + beta * squash(post)
    h_res = h_res + alpha * squash(jnp.swapaxes(mixes[..., 2 * m:], -1, -2))
    if m == 1:  # HC's own shapes, `[..., n]`
      h_pre, h_post = h_pre[..., 0, :], h_post[..., 0]
    return Coefficients(h_pre, h_post, h_res)


# --------------------------------------------------------------------------------------------
# Manifold-Constrained Hyper-Connections (DeepSeek, arXiv:2512.24880) and mHC-lite


@dataclasses.dataclass(frozen=True)
class MHCConfig(_Fractions):
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

  `num_fracs = m > 1` (Frac-connections): mHC over the `N = n m` fraction units
  (`mhc_jax.streams`), from the same `vec(X)`: `phi` is `[n C, 2N + R]` with `R` the
  mapping's logits at size N, `H_res` the `[N, N]` mapping (doubly stochastic as the mapping
  is at N: KromHC needs N a power of two, mHC-lite N <= 6). H_pre and H_post keep mHC's one
  weight per unit: fraction j of the branch input is `sum_s H_pre[s, j] X_(s, j)` and unit
  `(s, j)` receives `H_post[s, j] F_j` (as `[m, N]` and `[N, m]` maps, zero across
  fractions: a sigmoid cannot start at 0, so mixing across fractions is H_res's alone, and
  the branch input of equal streams is still a multiple of `x`). The same start per unit
  (`bias_pre = +1` on the units of stream `layer_index mod n`); `H_res` starts at `S ⊗ F`
  where the mapping has that form (Sinkhorn, KromHC, orthostochastic; mHC-lite: the
  permutations that keep every unit in its fraction share `frac_init_identity`): `S` the
  streams' start above, `F` the fractions' with identity weight `frac_init_identity =
  0.998`. Fractions are different channels, so every share `H_res` moves across them is a
  departure from pre-norm (copies of streams are not: they stay copies). Of 0.95, 0.99 and
  0.998, only 0.998 keeps a fresh 8-site network within 2% of the pre-norm baseline (24%, 5%,
  1.2% at n = 1, m = 4), the bound mHC's own start meets; `H(1-H)` ≈ 0.002 still moves.
  No finite start is exactly pre-norm (a doubly-stochastic map of positive entries mixes the
  fractions), so `passthrough_params` refuses m > 1.
  """

  num_streams: int
  dim: int
  layer_index: int = 0
  num_fracs: int = 1
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
  frac_init_identity: float = 0.998

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
    self._check_fractions()
    self.res_spec.check(self)
    for name in ("res_init_identity", "frac_init_identity"):
      if not 0.0 < getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")

  @property
  def res_spec(self) -> ResMapping:
    """The `res_mapping`'s entry in `RES_MAPPINGS`: what parameter counts, FLOPs and
    initialisation read about it."""
    return RES_MAPPINGS[self.res_mapping]

  @property
  def num_res_logits(self) -> int:
    return self.res_spec.num_logits(self.res_size)

  @property
  def res_matmul_flops(self) -> int:
    """Forward matmul FLOPs per token from the res logits to `H_res` (not `phi`'s)."""
    return self.res_spec.matmul_flops(self)

  no_weight_decay: ClassVar[frozenset[str]] = frozenset()  # phi decays; the rest are vectors
  # bias and alpha are logits' parts behind sigmoids and Sinkhorn: bounded maps at any size.
  static_maps: ClassVar[frozenset[str]] = frozenset()

  def coefficient_flops(self) -> int:
    """Forward matmul FLOPs per token of the coefficients: `phi` `[nC, 2N + R]` on vec(X)
    (`N = n` without fractions), then the mapping's own from the R res logits to `H_res`."""
    n, c = self.num_streams, self.dim
    return 2 * n * c * (2 * self.res_size + self.num_res_logits) + self.res_matmul_flops

  def passthrough_params(self, params: Params) -> Params:
    """`params` changed so that equal streams pass through the site as a pre-norm residual
    would (see `mhc_jax.lm.retrofitting`): `alpha_pre = alpha_post = 0` so H_pre and H_post
    are static; `H_post = 2 sigmoid(0) = 1`; `H_pre = pre_weights`, summing to 1; H_res keeps
    its start, whose rows sum to 1 for every mapping that is doubly stochastic. float32.
    None with fractions (see the class docstring): a one-line ValueError."""
    if self.num_fracs > 1:
      raise ValueError(f"mHC with num_fracs={self.num_fracs} has no pass-through start: its "
                       f"doubly-stochastic H_res of positive entries mixes the fractions' "
                       f"channels; use num_fracs=1, or HC (HCConfig) with num_fracs")
    n = self.num_streams
    target = pre_weights(n, self.layer_index) - self.pre_eps  # H_pre = sigmoid + pre_eps
    bias = np.array(params["bias"], np.float32)
    bias[:n] = np.log(target / (1.0 - target))  # in float64, then rounded once
    bias[n:2 * n] = 0.0
    alpha = np.array(params["alpha"], np.float32)
    alpha[:2] = 0.0
    return {**params, "alpha": alpha, "bias": bias}

  def init_params(self, key: jax.Array) -> Params:
    n, c, units = self.num_streams, self.dim, self.res_size
    width = 2 * units + self.num_res_logits
    # Unit s m + f belongs to stream s.
    pre = np.repeat(one_hot_logits(n, self.layer_index, 1.0, -1.0), self.num_fracs)
    bias = np.concatenate([pre, np.zeros((units,), np.float32),
                           self.res_spec.init_bias(self)])
    return {
        "phi": jax.random.normal(key, (n * c, width), jnp.float32) / math.sqrt(n * c),
        "alpha": jnp.full((3,), self.alpha_init, jnp.float32),
        "bias": jnp.asarray(bias),
    }

  def coefficients(self, params: Params, streams: jax.Array) -> Coefficients:
    """`[..., n, C]` -> Coefficients with shapes `[..., n]`, `[..., n]`, `[..., n, n]`; with
    fractions `[..., m, N]`, `[..., N, m]`, `[..., N, N]`."""
    n, u = self.num_streams, self.res_size
    mixes = rms_projection(streams, params["phi"].reshape(n, self.dim, -1), self.norm_eps)
    alpha, bias = params["alpha"], params["bias"]
    batch = mixes.shape[:-1]

    if self.use_pre:
      h_pre = jax.nn.sigmoid(alpha[0] * mixes[..., :u] + bias[:u]) + self.pre_eps
    else:
      h_pre = jnp.full((*batch, u), 1.0 / n, jnp.float32)
    if self.use_post:
      h_post = 2.0 * jax.nn.sigmoid(alpha[1] * mixes[..., u:2 * u] + bias[u:2 * u])
    else:
      h_post = jnp.ones((*batch, u), jnp.float32)
    if not self.use_res:
      h_res = jnp.broadcast_to(jnp.eye(u, dtype=jnp.float32), (*batch, u, u))
    else:
      h_res = self.res_spec.h_res(alpha[2] * mixes[..., 2 * u:] + bias[2 * u:], self)
    if self.num_fracs > 1:  # one weight per unit, for its own fraction of the branch
      mask = self.fraction_mask
      h_pre, h_post = h_pre[..., None, :] * mask, h_post[..., :, None] * mask.T
    return Coefficients(h_pre, h_post, h_res)


# --------------------------------------------------------------------------------------------
# Stream embeddings (lucidrains' `StreamEmbed`)


@dataclasses.dataclass(frozen=True)
class StreamEmbedConfig:
  """Learned per-stream offsets `[n, C]` added as the embedding is expanded into streams
  (lucidrains' `StreamEmbed`, their `add_stream_embed=True`): `streams = x + offsets[s]` on
  stream s (`mhc_jax.streams.embed_streams`), so the streams can start distinct.

  Init: zeros, as theirs (`torch.zeros(num_streams, dim)`): a fresh model is the model
  without them, equal copies, and the offsets learn from there (each gets its own stream's
  gradient summed over the tokens; these differ once H_pre favours a stream). Exempt from
  weight decay: a bias added to the input, which decay would pull back to equal copies.
  """

  num_streams: int
  dim: int

  def __post_init__(self):
    check_int("num_streams", self.num_streams, 1)
    check_int("dim", self.dim, 1)

  no_weight_decay: ClassVar[frozenset[str]] = frozenset({"offsets"})
  static_maps: ClassVar[frozenset[str]] = frozenset()

  def init_params(self, key: jax.Array) -> Params:
    del key  # zeros, deterministic
    return {"offsets": jnp.zeros((self.num_streams, self.dim), jnp.float32)}

  def embed(self, params: Params, x: jax.Array) -> jax.Array:
    """`[..., C]` -> `[..., n, C]` in x's dtype."""
    return embed_streams(x, params["offsets"])


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
  static_maps: ClassVar[frozenset[str]] = frozenset()

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
