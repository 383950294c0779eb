"""`mappings.rms_projection` (custom VJP) and the coefficient paths that use it, against
autodiff of the plain formula in float64."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernels_pallas.sinkhorn import sinkhorn_reference
from mhc_jax import HCConfig, HeadConfig, MHCConfig, aggregate, merge
from mhc_jax.mappings import rms_projection
from test_modules import hc_reference, site_reference

EPS = 1e-6


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random(seed, shape, dtype=np.float32, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


def plain_rms_projection(x, w, eps):
  """The formula itself, for autodiff: flatten the trailing axes that `w` contracts."""
  flat = x.reshape(*x.shape[:x.ndim - (w.ndim - 1)], -1)
  return (flat @ w.reshape(flat.shape[-1], -1)) / jnp.sqrt(
      jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)


def value_and_grads(fn, x, w, g):
  out, pullback = jax.vjp(lambda x, w: fn(x, w, EPS), x, w)
  return out, *pullback(g.astype(out.dtype))


SHAPES = {  # leading axes, feature axes, width
    "no leading axes": ((), (12,), 5),
    "one leading axis": ((7,), (12,), 5),
    "streams layout": ((2, 3), (4, 6), 24),
    "three leading axes": ((2, 1, 3), (4, 6), 24),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_projection_float64_matches_autodiff_of_plain_formula(shape):
  lead, features, width = SHAPES[shape]
  with jax.enable_x64(True):
    x = random(1, lead + features, np.float64, scale=3.0)
    w = random(2, features + (width,), np.float64)
    g = random(3, lead + (width,), np.float64)
    got = value_and_grads(rms_projection, x, w, g)
    ref = value_and_grads(plain_rms_projection, x, w, g)
  for name, a, b in zip(("value", "dx", "dw"), got, ref):
    assert a.dtype == jnp.float64 and a.shape == b.shape, name
    assert rel_err(a, b) < 1e-12, name


@pytest.mark.parametrize("shape", ["one leading axis", "three leading axes"])
def test_rms_projection_float32_and_bfloat16_against_float64(shape):
  lead, features, width = SHAPES[shape]
  x, w, g = random(4, lead + features), random(5, features + (width,)), random(6, lead + (width,))
  for dtype, dx_tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    x_in = x.astype(dtype)
    out, dx, dw = value_and_grads(rms_projection, x_in, w, g)
    assert (out.dtype, dx.dtype, dw.dtype) == (jnp.float32, dtype, jnp.float32)
    with jax.enable_x64(True):  # on the very values the function saw
      to64 = lambda a: jnp.asarray(a, jnp.float64)
      ref = value_and_grads(plain_rms_projection, to64(x_in), to64(w), to64(g))
    assert rel_err(out, ref[0]) < 1e-5
    assert rel_err(dx, ref[1]) < dx_tolerance  # bf16: the gradient is rounded to 8 bits
    assert rel_err(dw, ref[2]) < 1e-5


# ---- whole sites against float64 transcriptions of the formulas


N, C = 4, 16


def branch(x, w):
  return jnp.tanh(x @ w)


def random_mhc_params(cfg: MHCConfig, seed: int, dtype) -> dict:
  width = 2 * cfg.num_streams + cfg.num_res_logits
  return {"phi": random(seed, (N * C, width), dtype, 1 / np.sqrt(N * C)),
          "alpha": jnp.asarray([0.7, -0.4, 0.9], dtype),
          "bias": random(seed + 1, (width,), dtype)}


def random_head_params(seed: int, dtype) -> dict:
  return {"phi": random(seed, (N * C, N), dtype, 1 / np.sqrt(N * C)),
          "alpha": jnp.asarray([0.8], dtype), "bias": random(seed + 1, (N,), dtype)}


def library_site(cfg, params, x, w):
  """One site of any config: `merge(X, branch(aggregate(X, H_pre)), coefficients(X))`."""
  coefficients = cfg.coefficients(params, x)
  return merge(x, branch(aggregate(x, coefficients.h_pre), w), coefficients)


# ---- H_res from its logits, one token at a time, from the papers' formulas


def square(logits):
  n = int(round(np.sqrt(logits.shape[-1])))
  return logits.reshape(*logits.shape[:-1], n, n)


def kromhc_reference(logits):
  """KromHC: `U_1 ⊗ ... ⊗ U_K`, `U_k = [[p, 1-p], [1-p, p]]`, `p = softmax(pair k)[0]`."""
  h = jnp.ones((1, 1), logits.dtype)
  for pair in logits.reshape(-1, 2):
    p = jnp.exp(pair[0]) / jnp.sum(jnp.exp(pair))
    h = jnp.kron(h, jnp.stack([jnp.stack([p, 1 - p]), jnp.stack([1 - p, p])]))
  return h


def polar_square_reference(logits):
  """`O ∘ O` with `O = U Vᵀ` the exact polar factor (SVD): what a converged Newton-Schulz
  iteration reaches."""
  u, _, vt = jnp.linalg.svd(logits)
  return jnp.square(u @ vt)


def tokenbender_reference(logits):
  """tokenbender's `orthostochastic_project` with its defaults: 5 steps of
  `X <- 3 X + (-3.2 A + 1.2 A²) X`, `A = X Xᵀ`, from `X = logits / (||logits||_F + 1e-7)`."""
  x = logits / (jnp.linalg.norm(logits) + 1e-7)
  for _ in range(5):
    a = x @ x.T
    x = 3.0 * x + (-3.2 * a + 1.2 * a @ a) @ x
  return x * x


def permutations_reference(logits, n):
  perms = np.stack([np.eye(n)[list(q)] for q in itertools.permutations(range(n))])
  return jnp.einsum("...k,kij->...ij", jax.nn.softmax(logits, -1), jnp.asarray(perms))


def reference_h_res(cfg: MHCConfig, logits):
  """`[..., R]` -> `[..., n, n]`, float64, for `cfg.res_mapping` (n: `cfg.res_size`, the
  streams times the fractions)."""
  if cfg.res_mapping == "sinkhorn":
    return sinkhorn_reference(square(logits), cfg.sinkhorn_iters, cfg.sinkhorn_eps)
  if cfg.res_mapping == "permutations":
    return permutations_reference(logits, cfg.res_size)
  if cfg.res_mapping == "kromhc":
    return jnp.vectorize(kromhc_reference, signature="(r)->(n,n)")(logits)
  one = {"converged": polar_square_reference,
         "tokenbender": tokenbender_reference}[cfg.orthostochastic_schedule]
  return jnp.vectorize(one, signature="(n,n)->(n,n)")(square(logits))


def mhc_site_reference(cfg, p, x, w):
  n = cfg.num_streams
  mixes = plain_rms_projection(x.reshape(*x.shape[:-2], -1), p["phi"], cfg.norm_eps)
  h_pre = jax.nn.sigmoid(p["alpha"][0] * mixes[..., :n] + p["bias"][:n]) + cfg.pre_eps
  h_post = 2 * jax.nn.sigmoid(p["alpha"][1] * mixes[..., n:2 * n] + p["bias"][n:2 * n])
  h_res = reference_h_res(cfg, p["alpha"][2] * mixes[..., 2 * n:] + p["bias"][2 * n:])
  out = branch(jnp.einsum("...n,...nc->...c", h_pre, x), w)
  return jnp.einsum("...kj,...jc->...kc", h_res, x) + h_post[..., None] * out[..., None, :]


def head(cfg, params, x):
  return aggregate(x, cfg.weights(params, x))


def head_reference(cfg, p, x):
  mixes = plain_rms_projection(x.reshape(*x.shape[:-2], -1), p["phi"], cfg.norm_eps)
  weights = jax.nn.sigmoid(p["alpha"][0] * mixes + p["bias"]) + cfg.eps
  return jnp.einsum("...n,...nc->...c", weights, x)


# Every res_mapping (and orthostochastic schedule) the site tests run, as MHCConfig options.
RES_OPTIONS = {
    "sinkhorn": dict(sinkhorn_eps=1e-3, sinkhorn_iters=7, sinkhorn_backend="xla"),
    "permutations": dict(res_mapping="permutations"),
    "kromhc": dict(res_mapping="kromhc"),
    "orthostochastic": dict(res_mapping="orthostochastic"),
    "orthostochastic_tokenbender": dict(res_mapping="orthostochastic",
                                        orthostochastic_schedule="tokenbender"),
}


def site_and_head_vjps(dtype, res="sinkhorn"):
  """-> (library, reference): {name: (value, gradients)} of an mHC site (H_res mapping `res`,
  a key of RES_OPTIONS) and a head at `dtype`."""
  mhc = MHCConfig(N, C, pre_eps=1e-3, **RES_OPTIONS[res])
  hc_head = HeadConfig(N, C, eps=1e-3)
  x = random(10, (2, 3, N, C), dtype, scale=2.0)
  site_args = (random_mhc_params(mhc, 11, dtype), x, random(13, (C, C), dtype, 1 / np.sqrt(C)))
  head_args = (random_head_params(14, dtype), x)
  cases = {"mhc site": (lambda *a: library_site(mhc, *a), lambda *a: mhc_site_reference(mhc, *a),
                        site_args),
           "head": (lambda *a: head(hc_head, *a), lambda *a: head_reference(hc_head, *a),
                    head_args)}
  library, reference = {}, {}
  for name, (fn, ref_fn, args) in cases.items():
    for results, f in ((library, fn), (reference, ref_fn)):
      out, pullback = jax.vjp(f, *args)
      results[name] = (out, pullback(random(15, out.shape, dtype)))
  return library, reference


def assert_close(got, want, tolerance):
  for name, (out, grads) in got.items():
    want_out, want_grads = want[name]
    assert out.dtype == want_out.dtype and rel_err(out, want_out) < tolerance, name
    for (path, g), ref in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(want_grads)):
      assert rel_err(g, ref) < tolerance, (name, jax.tree_util.keystr(path))


@pytest.mark.parametrize("res", RES_OPTIONS)
def test_mhc_site_and_head_float64_match_autodiff_of_plain_formula(res):
  with jax.enable_x64(True):
    library, reference = site_and_head_vjps(np.float64, res)
  assert_close(library, reference, 1e-12)


@pytest.mark.parametrize("res", RES_OPTIONS)
def test_mhc_site_and_head_float32_match_float64(res):
  library, _ = site_and_head_vjps(np.float32, res)
  with jax.enable_x64(True):
    _, reference = site_and_head_vjps(np.float64, res)
    reference = jax.tree.map(lambda a: a.astype(np.float32), reference)
  assert_close(library, reference, 1e-5)


# ---- Hyper-Connections (static and dynamic) against the paper's formulas


HC_OPTIONS = {"dynamic": {}, "dynamic without tanh": dict(use_tanh=False),
              "static": dict(dynamic=False)}
HC_LEADS = {"one token": (), "tokens": (7,), "batch and sequence": (2, 3)}


def random_hc_params(cfg: HCConfig, seed: int, dtype) -> dict:
  """Every parameter moved off its init (W = 0 would hide the dynamic path's gradients)."""
  return {name: value.astype(dtype) + random(seed + i, value.shape, dtype, 0.5)
          for i, (name, value) in enumerate(cfg.init_params(jax.random.key(0)).items())}


def hc_site_reference(cfg, params, x, w):
  return site_reference(hc_reference(params, x, cfg), x, lambda u: branch(u, w))


def hc_site_args(cfg, dtype, lead):
  x = random(30, (*lead, N, C), dtype, scale=2.0)
  return random_hc_params(cfg, 31, dtype), x, random(13, (C, C), dtype, 1 / np.sqrt(C))


def hc_site_vjps(options, dtype, lead):
  """-> (library, reference): {"hc site": (value, gradients)} at `dtype`."""
  cfg = HCConfig(N, C, layer_index=1, **HC_OPTIONS[options])
  args = hc_site_args(cfg, dtype, lead)
  results = []
  for f in (lambda *a: library_site(cfg, *a), lambda *a: hc_site_reference(cfg, *a)):
    out, pullback = jax.vjp(f, *args)
    results.append({"hc site": (out, pullback(random(32, out.shape, dtype)))})
  return results


@pytest.mark.parametrize("lead", HC_LEADS)
@pytest.mark.parametrize("options", HC_OPTIONS)
def test_hc_site_float64_matches_autodiff_of_plain_formula(options, lead):
  with jax.enable_x64(True):
    library, reference = hc_site_vjps(options, np.float64, HC_LEADS[lead])
  assert_close(library, reference, 1e-12)


@pytest.mark.parametrize("lead", HC_LEADS)
@pytest.mark.parametrize("options", HC_OPTIONS)
def test_hc_site_float32_matches_float64(options, lead):
  library, _ = hc_site_vjps(options, np.float32, HC_LEADS[lead])
  with jax.enable_x64(True):
    _, reference = hc_site_vjps(options, np.float64, HC_LEADS[lead])
    reference = jax.tree.map(lambda a: a.astype(np.float32), reference)
  assert_close(library, reference, 1e-5)


@pytest.mark.parametrize("options", ["dynamic", "dynamic without tanh"])
def test_hc_site_gradients_match_finite_differences(options):
  cfg = HCConfig(N, C, layer_index=1, **HC_OPTIONS[options])
  with jax.enable_x64(True):
    check_grads(lambda *a: library_site(cfg, *a), hc_site_args(cfg, np.float64, (3,)),
                order=1, modes=["rev"])


@pytest.mark.parametrize("lead", ["tokens", "batch and sequence"])
def test_hc_coefficients_from_bfloat16_streams_against_float64(lead):
  cfg = HCConfig(N, C, layer_index=1)
  params, x, _ = hc_site_args(cfg, np.float32, HC_LEADS[lead])
  x = x.astype(jnp.bfloat16)
  out, pullback = jax.vjp(cfg.coefficients, params, x)
  cotangents = jax.tree.map(lambda a: random(33, a.shape), out)
  grads = pullback(cotangents)
  with jax.enable_x64(True):  # on the very values the library saw
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    ref_out, ref_pullback = jax.vjp(lambda p, x: hc_reference(p, x, cfg), *to64((params, x)))
    ref_grads = ref_pullback(tuple(to64(cotangents)))
  assert all(a.dtype == jnp.float32 for a in out) and grads[1].dtype == jnp.bfloat16
  for got, ref in zip(out, ref_out):
    assert rel_err(got, ref) < 1e-5
  for name, got in grads[0].items():
    assert got.dtype == jnp.float32 and rel_err(got, ref_grads[0][name]) < 1e-5, name
  assert rel_err(grads[1], ref_grads[1]) < 1e-2  # the gradient is rounded to 8 bits


# ---- what the coefficient path keeps for the backward


def saved_bytes(f, *args) -> int:
  residuals = jax.jit(lambda *a: jax.vjp(f, *a)[1])
  return residuals.lower(*args).compile().memory_analysis().output_size_in_bytes


@pytest.mark.parametrize("res", ["sinkhorn", "permutations", "kromhc", "orthostochastic"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_coefficients_keep_only_the_streams_for_the_backward(dtype, res):
  # Enough tokens, wide enough, that phi and the per-token arrays (projection, rsqrt, H_res
  # logits, ...) are small next to the streams: a second stream-sized residual cannot hide,
  # nor Newton-Schulz iterates kept by autodiff (16 steps, about 3.2 n² floats each per token).
  n, c = 4, 256
  mhc, hc_head = MHCConfig(n, c, **RES_OPTIONS[res]), HeadConfig(n, c)
  x = random(20, (512, n, c), dtype)
  stream_bytes = x.size * x.dtype.itemsize
  mhc_saved = saved_bytes(lambda x, p: mhc.coefficients(p, x), x,
                          mhc.init_params(jax.random.key(0)))
  head_saved = saved_bytes(lambda x, p: hc_head.weights(p, x), x,
                           hc_head.init_params(jax.random.key(0)))
  # Autodiff of the plain formula keeps three: x, its float32 flattened copy, d(x^2)/dx.
  assert stream_bytes <= mhc_saved < 1.5 * stream_bytes
  assert stream_bytes <= head_saved < 1.5 * stream_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dynamic_hc_coefficients_keep_only_the_streams_for_the_backward(dtype):
  # Autodiff of the per-stream norm and the three projections keeps the normalised float32
  # copy and more: 4.1 stream arrays in float32 here, 8.1 (bfloat16 ones) in bfloat16.
  n, c = 4, 256
  hc = HCConfig(n, c)
  x = random(21, (512, n, c), dtype)
  stream_bytes = x.size * x.dtype.itemsize
  saved = saved_bytes(lambda x, p: hc.coefficients(p, x), x, hc.init_params(jax.random.key(0)))
  assert stream_bytes <= saved < 1.5 * stream_bytes
