"""The H_res mappings (`mhc_jax.res_mappings`): KromHC and orthostochastic next to Sinkhorn and
mHC-lite's permutations, against float64 transcriptions of their formulas (in
test_mappings.py), their doubly-stochastic claims, initialisation, gains over 64 layers, the
float32 coefficient path, and both module APIs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mhc_jax
from mhc_jax import MHCConfig, res_mappings
from mhc_jax.diagnostics import doubly_stochastic_error, gain_summary
from mhc_jax.res_mappings import NEWTON_SCHULZ_SCHEDULES, RES_MAPPINGS
from test_mappings import RES_OPTIONS, plain_rms_projection, reference_h_res
from test_modules import branch, random_params, rel_err
from test_streams import assert_all_highest

C = 8
NEW = ["kromhc", "orthostochastic", "orthostochastic_tokenbender"]
CONVERGED = 5e-7  # float32: 4 ulps of 1 in a row or column sum


def normal(seed, shape, scale=1.0, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, dtype)


def config(res, n, **options):
  return MHCConfig(n, C, **RES_OPTIONS[res], **options)


def ds_error(h_res):
  """`doubly_stochastic_error` with the sums taken in float64 (float32 sums round by 1e-7)."""
  with jax.enable_x64(True):
    return np.asarray(doubly_stochastic_error(jnp.asarray(np.asarray(h_res, np.float64))))


def relative_smallest_singular_value(logits):
  """`[..., n, n]` -> `[...]` in float64: smallest singular value / Frobenius norm."""
  s = np.linalg.svd(np.asarray(logits, np.float64), compute_uv=False)
  return s[..., -1] / np.sqrt(np.sum(s**2, axis=-1))


def res_logits64(cfg, params, x):
  """The site's H_res logits in float64, from the formula (not the library's path)."""
  n = cfg.num_streams
  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64)
    mixes = plain_rms_projection(to64(x).reshape(*x.shape[:-2], -1), to64(params["phi"]),
                                 cfg.norm_eps)
    return np.asarray(to64(params["alpha"])[2] * mixes[..., 2 * n:] +
                      to64(params["bias"])[2 * n:])


def site(res, n, seed=0, **options):
  return mhc_jax.ManifoldHyperConnection(n, C, rngs=nnx.Rngs(seed), **RES_OPTIONS[res],
                                         **options)


# ---- parameter counts, FLOPs


@pytest.mark.parametrize("n, logits", [
    (1, {"sinkhorn": 1, "permutations": 1, "kromhc": 0, "orthostochastic": 1}),
    (2, {"sinkhorn": 4, "permutations": 2, "kromhc": 2, "orthostochastic": 4}),
    (4, {"sinkhorn": 16, "permutations": 24, "kromhc": 4, "orthostochastic": 16}),
    (8, {"sinkhorn": 64, "kromhc": 6, "orthostochastic": 64}),
])
def test_number_of_res_logits_sizes_phi_and_bias(n, logits):
  for name, count in logits.items():
    cfg = MHCConfig(n, C, res_mapping=name)
    params = jax.eval_shape(cfg.init_params, jax.random.key(0))
    assert cfg.num_res_logits == count, name
    assert params["phi"].shape == (n * C, 2 * n + count), name
    assert params["bias"].shape == (2 * n + count,), name


def dot_general_flops(jaxpr) -> int:
  """2 · output size · contracted size over every dot_general, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += dot_general_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += dot_general_flops(sub)
  return total


@pytest.mark.parametrize("res", RES_OPTIONS)
@pytest.mark.parametrize("n", [2, 4])
def test_matmul_flops_are_those_of_the_mapping_for_one_token(res, n):
  cfg = config(res, n)
  logits = normal(1, (cfg.num_res_logits,))
  jaxpr = jax.make_jaxpr(lambda l: cfg.res_spec.h_res(l, cfg))(logits).jaxpr
  assert cfg.res_matmul_flops == dot_general_flops(jaxpr)
  if res.startswith("orthostochastic"):  # the count must see the schedule's iterations
    assert cfg.res_matmul_flops == 6 * n**3 * len(
        NEWTON_SCHULZ_SCHEDULES[cfg.orthostochastic_schedule])


# ---- the mappings alone, float32 against float64 references, n = 2, 4, 8


@pytest.mark.parametrize("res", NEW)
@pytest.mark.parametrize("n", [2, 4, 8])
def test_h_res_values_and_gradients_match_float64_references(res, n):
  cfg = config(res, n)
  logits = normal(2, (32, cfg.num_res_logits), scale=2.0)
  cotangent = normal(3, (32, n, n))
  library = lambda l: cfg.res_spec.h_res(l, cfg)
  out, pullback = jax.vjp(library, logits)
  (grad,) = pullback(cotangent)
  assert out.dtype == grad.dtype == jnp.float32 and out.shape == (32, n, n)
  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64)
    ref, ref_pullback = jax.vjp(lambda l: reference_h_res(cfg, l), to64(logits))
    (ref_grad,) = ref_pullback(to64(cotangent))
    # The float64 library path is the formula itself, or converges onto the polar factor.
    out64, pullback64 = jax.vjp(library, to64(logits))
    assert rel_err(out64, ref) < 1e-12 and rel_err(pullback64(to64(cotangent))[0], ref_grad) < 1e-9
  assert rel_err(out, ref) < 1e-6
  # tokenbender's n = 2 measures 1.0e-5: each of its steps triples a small singular value's
  # derivative, and the rounding in it; the others stay below 3e-6.
  assert rel_err(grad, ref_grad) < 2e-5


# ---- doubly stochastic, with every parameter randomised


@pytest.mark.parametrize("res, n", [("kromhc", 2), ("kromhc", 4), ("kromhc", 8),
                                    ("orthostochastic", 2), ("orthostochastic", 3),
                                    ("orthostochastic", 4), ("orthostochastic", 8)])
def test_h_res_is_doubly_stochastic_with_every_parameter_randomised(res, n):
  module = random_params(site(res, n), seed=4, scale=2.0)
  x = normal(5, (256, n, C), scale=3.0)
  h_res = np.asarray(module.pre(x)[1].coefficients.h_res, np.float64)
  assert np.min(np.diagonal(h_res, axis1=-2, axis2=-1)) < 0.5  # far from the start: exercised
  assert np.min(h_res) >= 0
  assert np.max(ds_error(h_res)) < CONVERGED
  if res == "orthostochastic":  # the tokens are within the schedule's reach (see below)
    logits = res_logits64(module.config, module._params(), x).reshape(-1, n, n)
    assert np.min(relative_smallest_singular_value(logits)) > 1e-6


@pytest.mark.parametrize("n", [2, 4, 8])
def test_orthostochastic_convergence_of_both_schedules_on_random_logits(n):
  logits = normal(6, (4096, n, n))
  converged = res_mappings.orthostochastic(logits, NEWTON_SCHULZ_SCHEDULES["converged"])
  assert np.max(ds_error(converged)) < CONVERGED
  # tokenbender's 5 steps: approximate, within their bound (singular values <= 1.2105).
  theirs = res_mappings.orthostochastic(logits, NEWTON_SCHULZ_SCHEDULES["tokenbender"])
  sums = np.concatenate([np.sum(theirs, -1), np.sum(theirs, -2)], -1)
  assert np.min(theirs) >= 0 and 1.3 < np.max(sums) < 1.2105**2
  assert np.median(ds_error(theirs)) > 1e-3


def test_converged_schedule_leaves_near_singular_logits_sub_stochastic():
  # Below 1e-6 of the Frobenius norm a singular value is out of the schedule's reach: its
  # direction loses mass, so rows and columns sum to at most 1 (gains never exceed 1).
  u, _, vt = np.linalg.svd(np.random.default_rng(7).normal(size=(3, 4, 4)))
  singular = jnp.asarray(u * np.asarray([1.0, 0.7, 0.4, 0.0]) @ vt, jnp.float32)
  h_res = res_mappings.orthostochastic(singular, NEWTON_SCHULZ_SCHEDULES["converged"])
  sums = np.concatenate([np.sum(h_res, -1), np.sum(h_res, -2)], -1)
  assert np.max(sums) < 1 + CONVERGED and np.min(sums) < 0.99


# ---- initialisation: near the identity, not saturated, close to the pre-norm baseline


@pytest.mark.parametrize("res, n", [("kromhc", 1), ("kromhc", 2), ("kromhc", 4), ("kromhc", 8),
                                    ("orthostochastic", 1), ("orthostochastic", 2),
                                    ("orthostochastic", 3), ("orthostochastic", 4),
                                    ("orthostochastic", 8)])
@pytest.mark.parametrize("identity", [0.95, 0.6])
def test_h_res_starts_at_res_init_identity_without_saturating(res, n, identity):
  module = site(res, n, res_init_identity=identity)
  module.alpha[...] = jnp.zeros(3)
  x = normal(8, (n, C))
  h_res = module.pre(x)[1].coefficients.h_res
  assert ds_error(h_res) < CONVERGED
  expected = 1.0 if n == 1 else identity  # one stream: H_res = [[1]], whatever the weight
  np.testing.assert_allclose(np.diag(np.asarray(h_res)), expected, rtol=1e-6)
  if n == 1:
    return

  def h00(bias):
    return module.config.coefficients(module._params() | {"bias": bias}, x).h_res[0, 0]
  assert jnp.max(jnp.abs(jax.grad(h00)(module.bias[...]))) > 0.01  # H_res can still move


def test_kromhc_res_init_identity_reproduces_kromhc_bias():
  n = 8
  kromhc_start = (1 / (1 + math.exp(-8))) ** 3  # each factor's softmax(0, -8), three factors
  bias = MHCConfig(n, C, res_mapping="kromhc", res_init_identity=kromhc_start).init_params(
      jax.random.key(0))["bias"][2 * n:]
  np.testing.assert_allclose(bias, np.tile([0.0, -8.0], 3), atol=1e-5)


@pytest.mark.parametrize("n", range(1, 17))
def test_uniform_diagonal_rotation_is_orthogonal_with_the_asked_diagonal(n):
  rotation = res_mappings.uniform_diagonal_rotation(n, 0.8)
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(np.diag(rotation), 1.0 if n == 1 else 0.8, atol=1e-12)


def test_tokenbender_schedule_starts_off_the_doubly_stochastic_set():
  # At the start every singular value of the normalised logits is 1/sqrt(n); tokenbender's five
  # steps leave it at p⁵(1/sqrt(n)) != 1, so H_res is the converged start scaled by its square.
  for n in (2, 4, 8):
    sigma = 1 / math.sqrt(n)
    for _ in range(5):
      sigma = 3.0 * sigma - 3.2 * sigma**3 + 1.2 * sigma**5
    x = normal(15, (n, C))

    def start(res):  # without the token-dependent part
      module = site(res, n)
      module.alpha[...] = jnp.zeros(3)
      return module.pre(x)[1].coefficients.h_res
    np.testing.assert_allclose(start("orthostochastic_tokenbender"),
                               sigma**2 * start("orthostochastic"), rtol=2e-5, atol=1e-7)
    assert abs(sigma**2 - 1) > 5e-3


# ---- 64 random layers: the composite gain stays within its bound


DEPTH = 64


def random_layers_h_res(res, n, scale, **options):
  """H_res `[64, tokens, N, N]` of 64 sites (`N = n num_fracs`) with every parameter
  randomised (their own phi, alpha and bias), through which bfloat16 streams of size
  `scale` flow."""
  module = site(res, n, sow_coefficients=True, **options)
  size = module.config.res_size
  graphdef, params = nnx.split(module)
  params = nnx.to_pure_dict(params)
  stacked = {name: value + jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                             (DEPTH, *value.shape))
             for i, (name, value) in enumerate(sorted(params.items()))}
  weights = jax.random.normal(jax.random.key(1), (DEPTH, C, C)) / math.sqrt(C)

  def sublayer(streams, layer):
    layer_params, w = layer
    fn = lambda u: (jnp.tanh(u.astype(jnp.float32) @ w) * scale).astype(u.dtype)
    streams, sown = nnx.capture(nnx.merge(graphdef, layer_params), nnx.Intermediate)(streams, fn)
    return streams, nnx.to_pure_dict(sown)["coefficients"][0].h_res

  x = (jax.random.normal(jax.random.key(2), (32, C)) * scale).astype(jnp.bfloat16)
  streams, h_res = jax.jit(lambda s, w, x: jax.lax.scan(
      sublayer, mhc_jax.expand_streams(x, n), (s, w)))(stacked, weights, x)
  assert streams.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(streams)))
  assert h_res.dtype == jnp.float32 and h_res.shape == (DEPTH, 32, size, size)
  return h_res


@pytest.mark.parametrize("res, n", [("kromhc", 4), ("kromhc", 8), ("orthostochastic", 4),
                                    ("orthostochastic_tokenbender", 4)])
def test_composite_gain_over_64_random_layers_stays_within_its_bound(res, n):
  h_res = random_layers_h_res(res, n, scale=1e3)
  gains = {k: np.asarray(v, np.float64) for k, v in gain_summary(h_res).items()}
  if res == "orthostochastic_tokenbender":
    # Each layer's sums are below 1.2105² (its bound); the composite below the product of the
    # layers' gains (the max row / column sum norm is submultiplicative). Approximate: the
    # single layers visibly leave 1.
    for side in ("forward_gain", "backward_gain"):
      assert np.max(gains[side]) < 1.2105**2 and np.max(np.abs(gains[side] - 1)) > 1e-2
      assert np.all(gains[f"composite_{side}"] <= np.cumprod(gains[side]) * (1 + 1e-6))
  else:  # exactly (KromHC) or to float32 rounding (converged) doubly stochastic
    for name in ("forward_gain", "backward_gain", "composite_forward_gain",
                 "composite_backward_gain"):
      assert np.max(np.abs(gains[name] - 1)) < 1e-4, name


# ---- float32 coefficient path, both module APIs, errors


@pytest.mark.parametrize("res", NEW)
def test_bfloat16_streams_give_float32_coefficients_and_highest_precision_dots(res):
  module = random_params(site(res, 4), seed=11)
  x = normal(12, (2, 3, 4, C))
  coefficients = module.pre(x.astype(jnp.bfloat16))[1].coefficients
  assert all(c.dtype == jnp.float32 for c in coefficients)
  np.testing.assert_allclose(coefficients.h_res, module.pre(x)[1].coefficients.h_res,
                             atol=2e-2)  # only the bf16 rounding of the streams differs
  graphdef, params = nnx.split(module, nnx.Param)
  run = lambda p, x: nnx.merge(graphdef, p)(x, lambda u: u)
  assert_all_highest(run, params, x)
  assert_all_highest(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2), argnums=(0, 1)), params, x)


@pytest.mark.parametrize("res", NEW)
def test_nnx_and_linen_accept_the_mapping_with_the_same_outputs(res):
  module = random_params(site(res, 4), seed=13)
  x = normal(14, (3, 4, C))
  linen_module = mhc_jax.linen.ManifoldHyperConnection(module.config)
  variables = {"params": module._params()}
  assert jax.tree.structure(linen_module.init(jax.random.key(0), x, branch)) == \
      jax.tree.structure(variables)
  np.testing.assert_array_equal(linen_module.apply(variables, x, branch), module(x, branch))
  fresh_nnx, fresh_linen = site(res, 4), linen_module.init(jax.random.key(0), x, branch)
  np.testing.assert_array_equal(fresh_linen["params"]["bias"], fresh_nnx.bias[...])


@pytest.mark.parametrize("call, match", [
    (lambda: MHCConfig(3, C, res_mapping="kromhc"), "num_streams must be a power of two"),
    (lambda: MHCConfig(6, C, res_mapping="kromhc"), "num_streams must be a power of two"),
    (lambda: mhc_jax.ManifoldHyperConnection(12, C, rngs=nnx.Rngs(0), res_mapping="kromhc"),
     "num_streams must be a power of two"),
    (lambda: MHCConfig(4, C, orthostochastic_schedule="muon"), "orthostochastic_schedule"),
    (lambda: MHCConfig(4, C, res_mapping="birkhoff"),
     "res_mapping must be one of sinkhorn, permutations, kromhc, orthostochastic"),
    (lambda: res_mappings.kromhc(jnp.ones((2, 3))), r"logits must have shape \[\.\.\., 2K\]"),
    (lambda: res_mappings.orthostochastic(jnp.ones((2, 3)), NEWTON_SCHULZ_SCHEDULES["converged"]),
     r"logits must have shape \[\.\.\., n, n\]"),
])
def test_unsupported_shapes_and_options_raise_one_line(call, match):
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert "\n" not in str(error.value)


def test_every_registered_mapping_is_covered_here():
  assert set(RES_MAPPINGS) == {options.get("res_mapping", "sinkhorn")
                               for options in RES_OPTIONS.values()}
