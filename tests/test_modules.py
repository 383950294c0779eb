"""HC / mHC / mHC-lite modules (NNX and Linen) against float64 transcriptions of the papers."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mhc_jax
from kernels_pallas.sinkhorn import sinkhorn_reference
from mhc_jax import HCConfig, MHCConfig
from mhc_jax.diagnostics import gain_summary
from mhc_jax.mappings import rms_normalise
from mhc_jax.streams import expand_streams, reduce_streams

N, C = 4, 8


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def rms_norm(x, eps=1e-6):
  return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def random_params(module, seed, scale=0.5):
  """Replaces every parameter by a fresh random one, so nothing sits at its init."""
  graphdef, params = nnx.split(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [v + scale * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# ---- float64 transcriptions of the papers' equations (written from the spec, not the code)


def mhc_reference(p, x, cfg: MHCConfig):
  """mHC paper: x = RMSNorm(vec X); H̃ = α·(xφ) + b; σ / 2σ / Sinkhorn (or permutations)."""
  n = cfg.num_streams
  v = rms_norm(x.reshape(*x.shape[:-2], -1), cfg.norm_eps)
  mixes = v @ p["phi"]
  h_pre = jax.nn.sigmoid(p["alpha"][0] * mixes[..., :n] + p["bias"][:n]) + cfg.pre_eps
  h_post = 2 * jax.nn.sigmoid(p["alpha"][1] * mixes[..., n:2 * n] + p["bias"][n:2 * n])
  res = p["alpha"][2] * mixes[..., 2 * n:] + p["bias"][2 * n:]
  if cfg.res_mapping == "permutations":
    perms = [np.eye(n)[list(q)] for q in itertools.permutations(range(n))]
    h_res = jnp.einsum("...k,kij->...ij", jax.nn.softmax(res, -1), jnp.asarray(np.stack(perms)))
  else:
    h_res = sinkhorn_reference(res.reshape(*res.shape[:-1], n, n), cfg.sinkhorn_iters,
                               cfg.sinkhorn_eps)
  return h_pre, h_post, h_res


def hc_reference(p, x, cfg: HCConfig):
  """HC paper: H' = B^T F(H^T A_m) + A_r^T H with A = static (+ s·tanh(X̄ W) if dynamic)."""
  a_m, b, a_r = p["static_pre"], p["static_post"], jnp.swapaxes(p["static_res"], -1, -2)
  if cfg.dynamic:
    xbar = rms_norm(x, cfg.norm_eps) * p["norm_scale"]
    act = jnp.tanh if cfg.use_tanh else (lambda v: v)
    a_m = a_m + p["scale_alpha"] * act(xbar @ p["w_pre"])
    b = b + p["scale_beta"] * act(xbar @ p["w_post"])
    a_r = a_r + p["scale_alpha"] * act(xbar @ p["w_res"])
  a_m, b = jnp.broadcast_to(a_m, x.shape[:-1]), jnp.broadcast_to(b, x.shape[:-1])
  return a_m, b, jnp.swapaxes(a_r, -1, -2)  # H_res = A_r^T


def site_reference(coefficients, x, branch_fn):
  h_pre, h_post, h_res = coefficients
  out = branch_fn(jnp.einsum("...n,...nc->...c", h_pre, x))
  return jnp.einsum("...kj,...jc->...kc", h_res, x) + h_post[..., None] * out[..., None, :]


def params_of(module):
  return {k: jnp.asarray(v, jnp.float64) for k, v in module._params().items()}


BRANCH_W = random(99, (C, C), 1 / np.sqrt(C))


def branch(x):
  return jnp.tanh(rms_norm(x) @ BRANCH_W.astype(x.dtype))


MODULES = {
    "hc": lambda **kw: mhc_jax.HyperConnection(N, C, layer_index=1, rngs=nnx.Rngs(0), **kw),
    "hc_no_tanh": lambda **kw: mhc_jax.HyperConnection(N, C, use_tanh=False, **kw),
    "hc_static": lambda **kw: mhc_jax.HyperConnection(N, C, layer_index=2, dynamic=False, **kw),
    "mhc": lambda **kw: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0), **kw),
    "mhc_eps": lambda **kw: mhc_jax.ManifoldHyperConnection(
        N, C, rngs=nnx.Rngs(0), sinkhorn_eps=1e-3, pre_eps=1e-3, sinkhorn_iters=7, **kw),
    "mhc_lite": lambda **kw: mhc_jax.ManifoldHyperConnection(
        N, C, rngs=nnx.Rngs(0), res_mapping="permutations", **kw),
}


def reference_site(module, x, params=None):
  cfg = module.config
  params = params_of(module) if params is None else params
  ref = hc_reference if isinstance(cfg, HCConfig) else mhc_reference
  return site_reference(ref(params, x, cfg), x, branch)


@pytest.mark.parametrize("kind", MODULES)
def test_site_matches_float64_reference_forward_and_backward(kind):
  module = random_params(MODULES[kind](), seed=1)
  x = random(2, (2, 3, N, C))
  cotangent = random(3, (2, 3, N, C))
  out = module(x, branch)
  with jax.enable_x64(True):
    x64 = jnp.asarray(x, jnp.float64)
    ref = reference_site(module, x64)
    assert rel_err(out, ref) < 1e-5
    ref_grads = jax.grad(lambda p, x: jnp.sum(reference_site(module, x, p) * cotangent),
                         argnums=(0, 1))(params_of(module), x64)

  graphdef, params = nnx.split(module, nnx.Param)
  loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, branch) * cotangent)
  grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
  assert rel_err(grad_x, ref_grads[1]) < 1e-5
  for name, g in nnx.to_pure_dict(grad_params).items():
    assert rel_err(g, ref_grads[0][name]) < 1e-4, name


@pytest.mark.parametrize("kind", MODULES)
def test_nnx_and_linen_agree_on_the_same_parameters(kind):
  module = random_params(MODULES[kind](), seed=4)
  x = random(5, (3, N, C))
  cls = (mhc_jax.linen.HyperConnection if kind.startswith("hc")
         else mhc_jax.linen.ManifoldHyperConnection)
  linen_module = cls(module.config)
  variables = {"params": module._params()}
  assert jax.tree.structure(linen_module.init(jax.random.key(0), x, branch)) == \
      jax.tree.structure(variables)
  np.testing.assert_array_equal(linen_module.apply(variables, x, branch), module(x, branch))
  branch_input, ctx = linen_module.apply(variables, x, method="pre")
  np.testing.assert_array_equal(branch_input, module.pre(x)[0])
  np.testing.assert_array_equal(
      linen_module.apply(variables, branch(branch_input), ctx, method="post"), module(x, branch))


def test_hyper_head_nnx_and_linen_agree_and_match_reference():
  head = random_params(mhc_jax.HyperHead(N, C, rngs=nnx.Rngs(0), eps=1e-6), seed=6)
  x = random(7, (5, N, C))
  p = head._params()
  weights = jax.nn.sigmoid(p["alpha"][0] * (rms_norm(x.reshape(5, -1)) @ p["phi"]) + p["bias"])
  ref = jnp.einsum("tn,tnc->tc", weights + 1e-6, x)
  assert rel_err(head(x), ref) < 1e-5
  linen_head = mhc_jax.linen.HyperHead(head.config)
  np.testing.assert_array_equal(linen_head.apply({"params": p}, x), head(x))


@pytest.mark.parametrize("make", [
    lambda: mhc_jax.HyperConnection(1, C, dynamic=False),
    lambda: mhc_jax.HyperConnection(1, C, layer_index=3),
    lambda: mhc_jax.ManifoldHyperConnection(1, C, rngs=nnx.Rngs(0), use_pre=False,
                                            use_post=False, use_res=False),
])
def test_one_stream_without_constraints_is_exactly_prenorm_residual(make):
  x = random(8, (2, 5, C))
  streams = mhc_jax.expand_streams(x, 1)
  out = mhc_jax.reduce_streams(make()(streams, branch))
  np.testing.assert_array_equal(out, x + branch(x))


def prenorm_network(x, branches):
  for f in branches:
    x = x + f(x)
  return rms_norm(x)


def hyper_network(x, sites, branches):
  streams = mhc_jax.expand_streams(x, N)
  for site, f in zip(sites, branches):
    streams = site(streams, f)
  return rms_norm(mhc_jax.reduce_streams(streams))


@pytest.mark.parametrize("res_mapping", ["sinkhorn", "permutations", "kromhc", "orthostochastic"])
def test_fresh_mhc_network_is_close_to_prenorm_baseline(res_mapping):
  layers = 8
  weights = [random(10 + i, (C, C), 1 / np.sqrt(C)) for i in range(layers)]
  branches = [lambda x, w=w: rms_norm(x) @ w for w in weights]
  sites = [mhc_jax.ManifoldHyperConnection(N, C, layer_index=i, res_mapping=res_mapping,
                                           rngs=nnx.Rngs(i)) for i in range(layers)]
  x = random(9, (16, C))
  baseline = prenorm_network(x, branches)
  assert 1e-4 < rel_err(hyper_network(x, sites, branches), baseline) < 0.02
  for site in sites:  # without the token-dependent part the network *is* the baseline
    site.alpha[...] = jnp.zeros(3)
  assert rel_err(hyper_network(x, sites, branches), baseline) < 1e-5


@pytest.mark.parametrize("res_mapping", ["sinkhorn", "permutations"])
def test_h_res_starts_near_identity_without_saturating(res_mapping):
  site = mhc_jax.ManifoldHyperConnection(N, C, res_mapping=res_mapping, rngs=nnx.Rngs(0))
  site.alpha[...] = jnp.zeros(3)
  h_res = site.pre(random(1, (N, C)))[1].coefficients.h_res
  assert mhc_jax.diagnostics.doubly_stochastic_error(h_res) < 1e-6
  diagonal = np.diag(np.asarray(h_res))
  expected = 0.95 if res_mapping == "sinkhorn" else 0.95 + 5 * 0.05 / 23  # + perms fixing i
  np.testing.assert_allclose(diagonal, expected, rtol=1e-5)

  def h00(bias):
    params = site._params() | {"bias": bias}
    return site.config.coefficients(params, random(1, (N, C))).h_res[0, 0]
  sensitivity = lambda bias: jnp.max(jnp.abs(jax.grad(h00)(bias)))
  assert sensitivity(site.bias[...]) > 0.01  # of order p(1-p) ≈ 0.05: H_res can still move
  saturated = site.bias[...] * (20.0 / jnp.max(site.bias[...]))  # a logit gap of 20
  assert sensitivity(saturated) < 1e-6


def test_coefficients_are_float32_for_bfloat16_streams():
  site = random_params(MODULES["mhc"](), seed=11)
  x = random(12, (4, N, C))
  _, ctx = site.pre(x.astype(jnp.bfloat16))
  assert all(c.dtype == jnp.float32 for c in ctx.coefficients)
  out = site(x.astype(jnp.bfloat16), branch)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, site(x, branch)) < 2e-2  # bf16 streams alone (8-bit mantissa)


@pytest.mark.parametrize("kind", MODULES)
def test_coefficients_never_look_across_tokens(kind):
  site = random_params(MODULES[kind](), seed=13)
  x = random(14, (2, 6, N, C))
  changed = x.at[:, 4:].add(random(15, (2, 2, N, C)))
  np.testing.assert_array_equal(site(changed, branch)[:, :4], site(x, branch)[:, :4])


def test_mhc_lite_is_exactly_doubly_stochastic():
  site = random_params(MODULES["mhc_lite"](), seed=16, scale=3.0)
  h_res = site.pre(random(17, (64, N, C)))[1].coefficients.h_res
  assert np.max(mhc_jax.diagnostics.doubly_stochastic_error(h_res)) < 1e-6
  np.testing.assert_array_equal(mhc_jax.permutation_matrices(3)[0], np.eye(3))
  assert mhc_jax.permutation_matrices(4).shape == (24, 4, 4)


def test_ablation_uses_fixed_replacements():
  site = mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0), use_pre=False, use_post=False,
                                         use_res=False)
  coefficients = site.pre(random(18, (3, N, C)))[1].coefficients
  np.testing.assert_array_equal(coefficients.h_pre, np.full((3, N), 1 / N, np.float32))
  np.testing.assert_array_equal(coefficients.h_post, np.ones((3, N)))
  np.testing.assert_array_equal(coefficients.h_res, np.broadcast_to(np.eye(N), (3, N, N)))


def test_modules_train_under_nnx_jit_and_grad():
  site = MODULES["mhc"]()
  x, target = random(19, (8, N, C)), random(20, (8, N, C))
  optimizer_loss = nnx.jit(lambda m: nnx.value_and_grad(
      lambda m: jnp.mean((m(x, branch) - target) ** 2))(m))
  loss0, grads = optimizer_loss(site)
  assert np.isfinite(loss0) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  nnx.update(site, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(site, nnx.Param), grads))
  assert optimizer_loss(site)[0] < loss0


def test_expand_and_reduce_streams():
  x = random(21, (2, 3, C))
  streams = mhc_jax.expand_streams(x, 3)
  assert streams.shape == (2, 3, 3, C)
  np.testing.assert_array_equal(streams[:, :, 2], x)
  np.testing.assert_allclose(mhc_jax.reduce_streams(streams), 3 * x, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: mhc_jax.expand_streams(jnp.zeros((2, C)), 0), "num_streams"),
    (lambda: mhc_jax.ManifoldHyperConnection(0, C, rngs=nnx.Rngs(0)), "num_streams"),
    (lambda: mhc_jax.HyperConnection(-1, C), "num_streams"),
    (lambda: mhc_jax.HyperConnection(N, 0), "dim"),
    (lambda: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0), sinkhorn_iters=0),
     "sinkhorn_iters"),
    (lambda: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0), res_mapping="birkhoff"),
     "res_mapping"),
    (lambda: mhc_jax.ManifoldHyperConnection(8, C, rngs=nnx.Rngs(0), res_mapping="permutations"),
     "num_streams"),
    (lambda: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0), res_init_identity=1.0),
     "res_init_identity"),
    (lambda: mhc_jax.ManifoldHyperConnection(N, C), "rngs"),
    (lambda: MODULES["mhc"]()(jnp.zeros((2, N + 1, C)), branch), "streams"),
    (lambda: MODULES["hc"]()(jnp.zeros((2, N, C + 1)), branch), "streams"),
    (lambda: MODULES["mhc"]()(jnp.zeros((N * C,)), branch), "streams"),
    (lambda: MODULES["mhc"]()(jnp.zeros((2, N, C)), lambda x: x[..., :2]), "branch_output"),
    (lambda: mhc_jax.HyperHead(N, C, rngs=nnx.Rngs(0))(jnp.zeros((2, N, 2 * C))), "streams"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# 64 sub-layers in bfloat16 with large activations.

NUM_STREAMS, DIM, DEPTH = 4, 16, 64
BATCH, SEQ = 2, 8
DEEP_VARIANTS = {
    "hc": lambda: mhc_jax.HyperConnection(NUM_STREAMS, DIM, dynamic=True, sow_coefficients=True),
    "hc_static": lambda: mhc_jax.HyperConnection(NUM_STREAMS, DIM, dynamic=False,
                                                 sow_coefficients=True),
    "mhc": lambda: mhc_jax.ManifoldHyperConnection(NUM_STREAMS, DIM, rngs=nnx.Rngs(0),
                                                   sow_coefficients=True),
    "mhc_lite": lambda: mhc_jax.ManifoldHyperConnection(NUM_STREAMS, DIM, rngs=nnx.Rngs(0),
                                                        res_mapping="permutations",
                                                        sow_coefficients=True),
}


def deep_stack(variant: str, scale: float):
  """64 sites of `variant` in a scan, each with a bfloat16 branch whose output is of size
  `scale`, fed streams of size `scale`: -> (loss, its gradients, H_res [64, B, L, n, n],
  output streams reduced)."""
  site = DEEP_VARIANTS[variant]()
  graphdef, params = nnx.split(site)
  params = nnx.to_pure_dict(params)
  key = jax.random.key(0)
  # Every site its own parameters, perturbed so the dynamic paths are active (HC's start
  # at zero) and the static mixings leave the identity.
  stacked = {name: value + 0.1 * jax.random.normal(jax.random.fold_in(key, i),
                                                   (DEPTH, *value.shape))
             for i, (name, value) in enumerate(sorted(params.items()))}
  weights = jax.random.normal(jax.random.key(1), (DEPTH, DIM, DIM)) / math.sqrt(DIM)
  x = (jax.random.normal(jax.random.key(2), (BATCH, SEQ, DIM)) * scale).astype(jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(3), (BATCH, SEQ, DIM))

  def loss_fn(stacked, weights, x):
    def sublayer(streams, layer):
      layer_params, w = layer
      branch = lambda u: (jnp.tanh(rms_normalise(u, 1e-6) @ w) * scale).astype(u.dtype)
      streams, sown = nnx.capture(nnx.merge(graphdef, layer_params), nnx.Intermediate)(
          streams, branch)
      h_res = nnx.to_pure_dict(sown)["coefficients"][0].h_res
      return streams, jnp.broadcast_to(h_res, (BATCH, SEQ, NUM_STREAMS, NUM_STREAMS))

    streams, h_res = jax.lax.scan(sublayer, expand_streams(x, NUM_STREAMS),
                                  (stacked, weights))
    out = reduce_streams(streams)
    return jnp.mean(out.astype(jnp.float32) * cotangent), (h_res, out)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True))
  (loss, (h_res, out)), grads = grad_fn(stacked, weights, x)
  return loss, grads, h_res, out


@pytest.mark.parametrize("variant", list(DEEP_VARIANTS))
def test_64_bfloat16_sublayers_with_large_activations_stay_finite(variant):
  loss, grads, h_res, out = deep_stack(variant, scale=1e4)
  assert out.dtype == jnp.bfloat16 and h_res.shape[0] == DEPTH
  assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(out)))
  for grad in jax.tree.leaves(grads):
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0))
  gains = gain_summary(h_res)
  forward = float(jnp.max(gains["composite_forward_gain"]))
  backward = float(jnp.max(gains["composite_backward_gain"]))
  if variant == "mhc":  # Sinkhorn: rows exact, columns to within 20 iterations' accuracy
    assert abs(forward - 1) < 1e-4
    assert float(jnp.min(gains["composite_backward_gain"])) > 0.97 and backward < 1.03
  elif variant == "mhc_lite":  # a mixture of permutations is exactly doubly stochastic
    assert abs(forward - 1) < 1e-4 and abs(backward - 1) < 1e-4
  else:  # unconstrained: finite, but 64 layers compound well past 1
    assert math.isfinite(forward) and math.isfinite(backward) and max(forward, backward) > 1.5
