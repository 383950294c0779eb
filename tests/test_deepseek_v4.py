"""DeepSeek-V4 arrays loaded into the NNX and Linen modules, against an independent float64
numpy transcription of DeepSeek-V4's per-site computation and head (docs: spec, "DeepSeek-V4's
production mHC"): comb is applied transposed, `out_k = post_k F + sum_j comb[j, k] X_j`."""

import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from mhc_jax import linen as mhc_linen

EPS = 1e-6
BATCH = (2, 3)


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def mixes64(x, fn, norm_eps=EPS):
  """`(vec(X) @ fn^T) * rsqrt(mean(vec(X)^2) + norm_eps)` for one token's `X [n, C]`."""
  flat = x.reshape(-1)
  return (flat @ fn.T) / np.sqrt(np.mean(flat**2) + norm_eps)


def site64(x, f, fn, base, scale, eps=EPS, norm_eps=EPS):
  """One token, as DeepSeek-V4 writes it: `X [n, C]`, `F [C]` -> pre, post, comb, branch
  input, new streams. Plain loops, float64."""
  n = x.shape[0]
  mixes = mixes64(x, fn, norm_eps)
  pre = sigmoid(mixes[:n] * scale[0] + base[:n]) + eps
  post = 2.0 * sigmoid(mixes[n:2 * n] * scale[1] + base[n:2 * n])
  logits = (mixes[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n)  # comb[j, k], row-major
  comb = np.exp(logits - logits.max(axis=-1, keepdims=True))
  comb = comb / comb.sum(axis=-1, keepdims=True) + eps
  comb = comb / (comb.sum(axis=0, keepdims=True) + eps)
  for _ in range(19):
    comb = comb / (comb.sum(axis=1, keepdims=True) + eps)
    comb = comb / (comb.sum(axis=0, keepdims=True) + eps)
  branch_input = sum(pre[i] * x[i] for i in range(n))
  out = np.stack([post[k] * f + sum(comb[j, k] * x[j] for j in range(n)) for k in range(n)])
  return pre, post, comb, branch_input, out


def head64(x, hc_fn, hc_base, hc_scale, eps=EPS, norm_eps=EPS):
  pre = sigmoid(mixes64(x, hc_fn, norm_eps) * hc_scale[0] + hc_base) + eps
  return sum(pre[i] * x[i] for i in range(x.shape[0]))


def per_token(fun, *arrays):
  """Applies `fun` to each token of arrays with leading shape BATCH; stacks each output."""
  outs = [fun(*(a[idx] for a in arrays)) for idx in np.ndindex(*BATCH)]
  if not isinstance(outs[0], tuple):
    return np.stack(outs).reshape(*BATCH, *outs[0].shape)
  return tuple(np.stack(o).reshape(*BATCH, *o[0].shape) for o in zip(*outs))


def site_arrays(seed, n, c):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=((2 + n) * n, n * c)), rng.normal(size=((2 + n) * n,)),
          rng.uniform(0.1, 1.0, size=(3,)))


def head_arrays(seed, n, c):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, n * c)), rng.normal(size=(n,)), rng.uniform(0.1, 1.0, size=(1,))


def streams_and_output(seed, n, c):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(*BATCH, n, c)), rng.normal(size=(*BATCH, c))


def f32(x):
  return jnp.asarray(x, jnp.float32)


def run_nnx_site(arrays, x, f, **eps):
  site = mhc_jax.ManifoldHyperConnection.from_deepseek_v4(*arrays, **eps)
  branch_input, ctx = site.pre(f32(x))
  return branch_input, ctx, site.post(f32(f), ctx)


def run_linen_site(arrays, x, f, **eps):
  module, params = mhc_linen.ManifoldHyperConnection.from_deepseek_v4(*arrays, **eps)
  variables = {"params": params}
  branch_input, ctx = module.apply(variables, f32(x), method="pre")
  return branch_input, ctx, module.apply(variables, f32(f), ctx, method="post")


@pytest.mark.parametrize("run", [run_nnx_site, run_linen_site], ids=["nnx", "linen"])
@pytest.mark.parametrize("n,c", [(2, 8), (2, 16), (4, 8), (4, 16)])
def test_site_matches_float64_transcription(run, n, c):
  arrays = site_arrays(10 * n + c, n, c)
  x, f = streams_and_output(n + c, n, c)
  pre, post, comb, branch_ref, out_ref = per_token(lambda xt, ft: site64(xt, ft, *arrays), x, f)
  # The draw must exercise what matters: comb far from the identity, so a missing mixing
  # matrix fails, and for n = 4 not symmetric, so an un-transposed one fails (a 2x2
  # doubly-stochastic matrix is symmetric).
  assert np.abs(comb - np.eye(n)).max() > 0.2
  if n == 4:
    assert np.abs(comb - comb.swapaxes(-1, -2)).max() > 0.05

  branch_input, ctx, out = run(arrays, x, f)
  assert branch_input.shape == (*BATCH, c) and out.shape == (*BATCH, n, c)
  assert branch_input.dtype == jnp.float32 and out.dtype == jnp.float32
  assert rel_err(branch_input, branch_ref) <= 1e-5
  assert rel_err(out, out_ref) <= 1e-5
  coefficients = ctx.coefficients
  assert rel_err(coefficients.h_pre, pre) <= 1e-5
  assert rel_err(coefficients.h_post, post) <= 1e-5
  assert rel_err(coefficients.h_res, comb.swapaxes(-1, -2)) <= 1e-5  # H_res = comb^T


def run_nnx_head(arrays, x, **eps):
  return mhc_jax.HyperHead.from_deepseek_v4(*arrays, **eps)(f32(x))


def run_linen_head(arrays, x, **eps):
  module, params = mhc_linen.HyperHead.from_deepseek_v4(*arrays, **eps)
  return module.apply({"params": params}, f32(x))


@pytest.mark.parametrize("run", [run_nnx_head, run_linen_head], ids=["nnx", "linen"])
@pytest.mark.parametrize("n,c", [(2, 8), (4, 16)])
def test_head_matches_float64_transcription(run, n, c):
  arrays = head_arrays(100 + n * c, n, c)
  x, _ = streams_and_output(7 * n + c, n, c)
  ref = per_token(lambda xt: head64(xt, *arrays), x)
  out = run(arrays, x)
  assert out.shape == (*BATCH, c) and out.dtype == jnp.float32
  assert rel_err(out, ref) <= 1e-5
  # Not a plain sum or mean of the streams: the learned weights matter.
  assert rel_err(x.sum(axis=-2), ref) > 0.05 and rel_err(x.mean(axis=-2), ref) > 0.05


@pytest.mark.parametrize("run_site,run_head", [(run_nnx_site, run_nnx_head),
                                               (run_linen_site, run_linen_head)],
                         ids=["nnx", "linen"])
def test_large_eps_lands_where_deepseek_v4_puts_it(run_site, run_head):
  # With hc_eps = 0.05 and norm_eps = 0.5 a misplaced eps (on post, in a softmax
  # denominator, missing from pre) is far above float32 noise.
  n, c, eps = 4, 8, {"hc_eps": 0.05, "norm_eps": 0.5}
  arrays, head = site_arrays(5, n, c), head_arrays(6, n, c)
  x, f = streams_and_output(7, n, c)
  *_, branch_ref, out_ref = per_token(
      lambda xt, ft: site64(xt, ft, *arrays, eps=0.05, norm_eps=0.5), x, f)
  branch_input, _, out = run_site(arrays, x, f, **eps)
  assert rel_err(branch_input, branch_ref) <= 1e-5
  assert rel_err(out, out_ref) <= 1e-5
  head_ref = per_token(lambda xt: head64(xt, *head, eps=0.05, norm_eps=0.5), x)
  assert rel_err(run_head(head, x, **eps), head_ref) <= 1e-5


def test_numpy_and_jax_inputs_give_the_same_site_and_head():
  n, c = 4, 8
  site, head = site_arrays(1, n, c), head_arrays(2, n, c)
  x, f = streams_and_output(3, n, c)
  branch_np, _, out_np = run_nnx_site(site, x, f)  # float64 numpy parameters
  branch_jax, _, out_jax = run_nnx_site(tuple(f32(a) for a in site), x, f)
  np.testing.assert_array_equal(branch_np, branch_jax)
  np.testing.assert_array_equal(out_np, out_jax)
  branch_linen, _, out_linen = run_linen_site(tuple(f32(a) for a in site), x, f)
  np.testing.assert_allclose(branch_linen, branch_np, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out_linen, out_np, rtol=1e-6, atol=1e-6)

  # Streams given as a numpy array work too.
  module = mhc_jax.ManifoldHyperConnection.from_deepseek_v4(*site)
  branch_from_np, ctx = module.pre(x.astype(np.float32))
  np.testing.assert_allclose(branch_from_np, branch_np, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(module.post(f.astype(np.float32), ctx), out_np, rtol=1e-6,
                             atol=1e-6)

  ref = per_token(lambda xt: head64(xt, *head), x)
  for arrays in (head, tuple(f32(a) for a in head)):
    assert rel_err(run_nnx_head(arrays, x), ref) <= 1e-5
    assert rel_err(run_linen_head(arrays, x), ref) <= 1e-5


N, C = 2, 8
GOOD_SITE = {"fn": np.ones(((2 + N) * N, N * C)), "base": np.ones(((2 + N) * N,)),
             "scale": np.ones((3,))}
BAD_SITE = [
    ("fn", np.ones(((2 + N) * N + 1, N * C))),  # rows not of the form (2+n)n
    ("fn", np.ones(((2 + N) * N, N * C + 1))),  # columns not a multiple of n
    ("fn", np.ones(((2 + N) * N * N * C,))),  # not 2-D
    ("base", np.ones(((2 + N) * N - 1,))),
    ("base", np.ones((1, (2 + N) * N))),
    ("scale", np.ones((2,))),
    ("scale", np.ones((3, 1))),
    ("scale", "large"),  # not numeric
]


@pytest.mark.parametrize("factory", [mhc_jax.ManifoldHyperConnection.from_deepseek_v4,
                                     mhc_linen.ManifoldHyperConnection.from_deepseek_v4],
                         ids=["nnx", "linen"])
@pytest.mark.parametrize("name,value", BAD_SITE)
def test_site_wrong_shapes_raise_naming_the_argument(factory, name, value):
  factory(**GOOD_SITE)  # the good arrays are accepted
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    factory(**(GOOD_SITE | {name: value}))


GOOD_HEAD = {"hc_fn": np.ones((N, N * C)), "hc_base": np.ones((N,)), "hc_scale": np.ones((1,))}
BAD_HEAD = [
    ("hc_fn", np.ones((N, N * C + 1))),
    ("hc_fn", np.ones((N * N * C,))),
    ("hc_base", np.ones((N + 1,))),
    ("hc_scale", np.ones((2,))),
    ("hc_scale", np.ones(())),
]


@pytest.mark.parametrize("factory", [mhc_jax.HyperHead.from_deepseek_v4,
                                     mhc_linen.HyperHead.from_deepseek_v4],
                         ids=["nnx", "linen"])
@pytest.mark.parametrize("name,value", BAD_HEAD)
def test_head_wrong_shapes_raise_naming_the_argument(factory, name, value):
  factory(**GOOD_HEAD)
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    factory(**(GOOD_HEAD | {name: value}))
