"""Frac-connections (`num_fracs` on HCConfig and MHCConfig): against float64 transcriptions of
the formulas (over the `N = n m` fraction units, `mhc_jax.streams`), finite differences and
lucidrains' `HyperConnections(num_fracs=m)` (tests/fixtures/frac, made by make_fixtures.py);
their initialisation, pass-through, doubly-stochastic H_res, 64-layer gains, FLOPs, kept
bytes, precision and both module APIs."""

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import mhc_jax
from mhc_jax import HCConfig, MHCConfig, aggregate, merge
from mhc_jax.diagnostics import gain_summary
from test_mappings import RES_OPTIONS, reference_h_res, saved_bytes
from test_modules import rel_err, rms_norm
from test_res_mappings import (CONVERGED, dot_general_flops, ds_error, normal,
                               random_layers_h_res)
from test_streams import assert_all_highest

C = 8
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "frac" / "lucidrains.npz"
HC_OPTIONS = {"dynamic": {}, "no tanh": dict(use_tanh=False), "static": dict(dynamic=False)}
# (streams, fractions) per mapping: the pure Frac-connection (n = 1) and mixes of both, at
# sizes N = n m the mapping supports.
MHC_SIZES = {
    "sinkhorn": [(1, 4), (2, 2), (4, 2)],
    "permutations": [(1, 4), (3, 2)],
    "kromhc": [(1, 4), (2, 4)],
    "orthostochastic": [(1, 4), (2, 2)],
    "orthostochastic_tokenbender": [(1, 4)],
}
MHC_CASES = [(res, n, m) for res, sizes in MHC_SIZES.items() for n, m in sizes]


def hc_config(n, m, options="dynamic", **extra):
  return HCConfig(n, C, layer_index=1, num_fracs=m, **HC_OPTIONS[options], **extra)


def mhc_config(res, n, m, **extra):
  return MHCConfig(n, C, layer_index=1, num_fracs=m, pre_eps=1e-3, **RES_OPTIONS[res], **extra)


def randomised(cfg, seed, dtype=np.float32, scale=0.5):
  """Every parameter moved off its init by N(0, scale²) (W = 0, alpha = 0.01 would hide the
  dynamic paths); phi by N(0, 4 scale² / fan_in), so the mixes stay of order 1."""
  params = {}
  for i, (name, value) in enumerate(sorted(cfg.init_params(jax.random.key(seed)).items())):
    noise = 2 * scale / math.sqrt(value.shape[0]) if name == "phi" else scale
    params[name] = value.astype(dtype) + normal(seed + i, value.shape, noise, dtype)
  return params


def branch(x, w):
  return jnp.tanh(x @ w)


def with_params(module, params):
  """`module` with its parameters set to `params` (a pure dict of arrays)."""
  for name, value in params.items():
    getattr(module, name)[...] = jnp.asarray(value)
  return module


# ---- float64 transcriptions (from the formulas in mappings.py / streams.py, not the code)


def fraction_of_unit(n, m):
  """`[m, N]`: 1 where unit u = s m + f has fraction f = j."""
  return (np.arange(n * m)[None, :] % m == np.arange(m)[:, None]).astype(np.float64)


def hc_reference(cfg, p, x):
  """HC over units `X_u` (u = s m + f, fraction f of stream s) with per-unit `X̄_u`:
  `H_pre[j, u] = A_m[j, u] + s_α act(X̄_u · w_pre[:, j])`,
  `H_post[(s, f), j] = B[(s, f), j] + s_β act(X̄_(s, j) · w_post[:, f])`,
  `H_res[v, u] = A_r[v, u] + s_α act(X̄_u · w_res[:, v])`."""
  n, m = cfg.num_streams, cfg.num_fracs
  units, d, lead = n * m, C // m, x.shape[:-2]
  a_m = p["static_pre"].reshape(m, units)
  b = p["static_post"].reshape(units, m)
  a_r = p["static_res"]
  if cfg.dynamic:
    xbar = rms_norm(x.reshape(*lead, units, d), cfg.norm_eps) * p["norm_scale"]
    act = jnp.tanh if cfg.use_tanh else (lambda v: v)
    a_m = a_m + p["scale_alpha"] * act(jnp.einsum("...ud,dj->...ju", xbar,
                                                  p["w_pre"].reshape(d, m)))
    by_stream = xbar.reshape(*lead, n, m, d)  # [s, j]
    post = jnp.einsum("...sjd,df->...sfj", by_stream, p["w_post"].reshape(d, m))
    b = b + p["scale_beta"] * act(post.reshape(*lead, units, m))
    a_r = a_r + p["scale_alpha"] * act(jnp.einsum("...ud,dv->...vu", xbar, p["w_res"]))
  return tuple(jnp.broadcast_to(a, (*lead, *a.shape[-2:])) for a in (a_m, b, a_r))


def mhc_reference(cfg, p, x):
  """mHC over N units from `RMS(vec X) @ phi`: one sigmoid weight per unit for its own
  fraction (zero across fractions), `H_res` the mapping at size N."""
  n, m = cfg.num_streams, cfg.num_fracs
  units = n * m
  mixes = rms_norm(x.reshape(*x.shape[:-2], -1), cfg.norm_eps) @ p["phi"]
  alpha, bias = p["alpha"], p["bias"]
  h_pre = jax.nn.sigmoid(alpha[0] * mixes[..., :units] + bias[:units]) + cfg.pre_eps
  h_post = 2 * jax.nn.sigmoid(alpha[1] * mixes[..., units:2 * units] + bias[units:2 * units])
  h_res = reference_h_res(cfg, alpha[2] * mixes[..., 2 * units:] + bias[2 * units:])
  mask = fraction_of_unit(n, m)
  return h_pre[..., None, :] * mask, h_post[..., :, None] * mask.T, h_res


def site_reference(cfg, coefficients, x, branch_fn):
  """Branch input fraction j = `sum_u H_pre[j, u] X_u`, fractions concatenated; unit u out =
  `sum_v H_res[u, v] X_v + sum_j H_post[u, j] F_j`."""
  h_pre, h_post, h_res = coefficients
  m, lead = cfg.num_fracs, x.shape[:-2]
  units = x.reshape(*lead, cfg.res_size, C // m)
  inputs = jnp.einsum("...ju,...ud->...jd", h_pre, units).reshape(*lead, C)
  out = branch_fn(inputs).reshape(*lead, m, C // m)
  new = jnp.einsum("...uv,...vd->...ud", h_res, units) + jnp.einsum("...uj,...jd->...ud",
                                                                      h_post, out)
  return new.reshape(x.shape)


def reference(cfg, params, x, w):
  coefficients = (hc_reference if isinstance(cfg, HCConfig) else mhc_reference)(cfg, params, x)
  return site_reference(cfg, coefficients, x, lambda u: branch(u, w))


def library(cfg, params, x, w):
  coefficients = cfg.coefficients(params, x)
  branch_input = aggregate(x, coefficients.h_pre, cfg.num_fracs)
  return merge(x, branch(branch_input, w), coefficients, cfg.num_fracs)


def site_args(cfg, dtype):
  return (randomised(cfg, 1, dtype), normal(2, (2, 3, cfg.num_streams, C), 2.0, dtype),
          normal(3, (C, C), 1 / math.sqrt(C), dtype))


def vjps(cfg, dtype, fn):
  args = site_args(cfg, dtype)
  out, pullback = jax.vjp(lambda *a: fn(cfg, *a), *args)
  return out, pullback(normal(4, out.shape, 1.0, dtype))


def assert_vjps_close(got, want, tolerance):
  for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and rel_err(a, b) < tolerance, jax.tree_util.keystr(path)


CONFIGS = {
    **{f"hc {options} n{n} m{m}": (lambda n=n, m=m, o=options: hc_config(n, m, o))
       for options in HC_OPTIONS for n, m in [(1, 4), (2, 2), (4, 2)]},
    **{f"mhc {res} n{n} m{m}": (lambda res=res, n=n, m=m: mhc_config(res, n, m))
       for res, n, m in MHC_CASES},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_site_float64_matches_the_formula_values_and_gradients(name):
  cfg = CONFIGS[name]()
  with jax.enable_x64(True):
    assert_vjps_close(vjps(cfg, np.float64, library), vjps(cfg, np.float64, reference), 1e-12)


@pytest.mark.parametrize("name", CONFIGS)
def test_site_float32_matches_float64(name):
  cfg = CONFIGS[name]()
  out, grads = vjps(cfg, np.float32, library)
  with jax.enable_x64(True):
    want = vjps(cfg, np.float64, reference)
  assert out.dtype == jnp.float32
  assert_vjps_close((out, grads), want, 1e-5)


@pytest.mark.parametrize("cfg", [hc_config(2, 2), mhc_config("sinkhorn", 2, 2),
                                 mhc_config("kromhc", 1, 4)], ids=["hc", "mhc", "kromhc"])
def test_site_gradients_match_finite_differences(cfg):
  with jax.enable_x64(True):
    check_grads(lambda *a: library(cfg, *a), site_args(cfg, np.float64), order=1,
                modes=["rev"])


# ---- lucidrains' numbers


def lucidrains_hc_params(arrays, n, m):
  """Their parameters in ours. Their `static_alpha` / `dynamic_alpha_fn` columns are `(f2, t)`
  (t = 0 the branch input's fraction f2, t = 1 + s' unit (s', f2) of the output), the
  static rows `(f1 s)`; `static_beta` is `(s f2)` for every branch fraction f1; their
  RMSNorm's `gamma + 1` is our `norm_scale`."""
  d, units = C // m, n * m
  static = arrays["static_alpha"].reshape(m, n, m, 1 + n)  # [f1, s, f2, t]
  dynamic = arrays["dynamic_alpha_fn"].reshape(d, m, 1 + n)  # [d, f2, t]
  static_pre = np.transpose(static[..., 0], (2, 1, 0)).reshape(m, units)  # [f2, (s f1)]
  static_res = np.transpose(static[..., 1:], (3, 2, 1, 0)).reshape(units, units)
  w_res = np.transpose(dynamic[..., 1:], (0, 2, 1)).reshape(d, units)  # [d, (s' f2)]
  per_fraction = (lambda a: a.reshape(-1)) if m == 1 else (lambda a: a)
  return {
      "static_pre": per_fraction(static_pre),
      "static_post": per_fraction(np.repeat(arrays["static_beta"][:, None], m, axis=1)),
      "static_res": static_res,
      "norm_scale": arrays["norm.gamma"] + 1.0,
      "w_pre": per_fraction(dynamic[..., 0]),
      "w_post": arrays["dynamic_beta_fn"],
      "w_res": w_res,
      "scale_alpha": arrays["dynamic_alpha_scale"],
      "scale_beta": arrays["dynamic_beta_scale"],
  }


@pytest.mark.parametrize("n, m", [(1, 4), (2, 2), (4, 1)])
def test_hc_with_fractions_matches_lucidrains_numbers(n, m):
  fixture = np.load(FIXTURE)
  arrays = {key.split(".", 1)[1]: fixture[key] for key in fixture if key.startswith(f"n{n}_m{m}.")}
  # Their streams `[(b s), t, C]`; their RMSNorm has no epsilon.
  to_ours = lambda a: np.swapaxes(a.reshape(-1, n, *a.shape[1:]), 1, 2)
  cfg = HCConfig(n, C, layer_index=1, num_fracs=m, norm_eps=0.0)
  params = lucidrains_hc_params(arrays, n, m)
  expected = jax.eval_shape(cfg.init_params, jax.random.key(0))
  assert {k: v.shape for k, v in params.items()} == {k: v.shape for k, v in expected.items()}
  site = with_params(mhc_jax.HyperConnection(n, C, layer_index=1, num_fracs=m, norm_eps=0.0),
                     params)
  weight = jnp.asarray(arrays["branch_weight"])
  out = site(jnp.asarray(to_ours(arrays["x"])), lambda u: u @ weight)
  assert rel_err(out, to_ours(arrays["out"])) < 1e-5


# ---- initialisation and pass-through


def prenorm(x, branches):
  for f in branches:
    x = x + f(x)
  return x


def through_sites(x, sites, branches):
  streams = mhc_jax.expand_streams(x, sites[0].config.num_streams)
  for site, f in zip(sites, branches):
    streams = site(streams, f)
  return streams


def eight_branches():
  weights = [normal(10 + i, (C, C), 1 / math.sqrt(C)) for i in range(8)]
  return [lambda x, w=w: rms_norm(x) @ w for w in weights]


@pytest.mark.parametrize("n, m", [(1, 4), (2, 2), (4, 2), (1, 8)])
def test_fresh_hc_with_fractions_is_exactly_the_prenorm_network(n, m):
  # lucidrains' own start is not: with fractions their static maps read one fraction into
  # several branch fractions and send every branch fraction to every fraction.
  branches = eight_branches()
  sites = [mhc_jax.HyperConnection(n, C, layer_index=i, num_fracs=m) for i in range(8)]
  for site in sites:  # the retrofit start is the same one
    with_params(site, site.config.passthrough_params(site._params()))
  x = normal(9, (16, C))
  streams = through_sites(x, sites, branches)
  np.testing.assert_array_equal(streams, mhc_jax.expand_streams(prenorm(x, branches), n))


@pytest.mark.parametrize("res, n, m", [(res, n, m) for res, n, m in MHC_CASES
                                       if res != "orthostochastic_tokenbender"])
def test_fresh_mhc_with_fractions_is_within_two_percent_of_prenorm(res, n, m):
  branches = eight_branches()
  sites = [mhc_jax.ManifoldHyperConnection(n, C, layer_index=i, num_fracs=m, rngs=nnx.Rngs(i),
                                           res_mapping=res) for i in range(8)]
  x = normal(9, (16, C))
  baseline = rms_norm(prenorm(x, branches))
  network = lambda: rms_norm(mhc_jax.reduce_streams(through_sites(x, sites, branches)))
  assert 1e-3 < rel_err(network(), baseline) < 0.02
  # At mHC's stream share (0.95) across fractions too, far from it: why 0.998.
  loose = [mhc_jax.ManifoldHyperConnection(n, C, layer_index=i, num_fracs=m, rngs=nnx.Rngs(i),
                                           frac_init_identity=0.95, res_mapping=res)
           for i in range(8)]
  far = rms_norm(mhc_jax.reduce_streams(through_sites(x, loose, branches)))
  assert rel_err(far, baseline) > 0.1


@pytest.mark.parametrize("res, n, m", [("sinkhorn", 2, 2), ("kromhc", 2, 4),
                                       ("orthostochastic", 1, 4)])
def test_mhc_h_res_starts_as_streams_start_times_fractions_start(res, n, m):
  site = mhc_jax.ManifoldHyperConnection(n, C, num_fracs=m, rngs=nnx.Rngs(0),
                                         res_mapping=res)
  site.alpha[...] = jnp.zeros(3)
  x = normal(5, (n, C))
  h_res = np.asarray(site.pre(x)[1].coefficients.h_res, np.float64)
  streams, fractions = (mhc_jax.ManifoldHyperConnection(size, C, rngs=nnx.Rngs(0),
                                                        res_init_identity=identity,
                                                        res_mapping=res)
                        for size, identity in ((n, 0.95), (m, 0.998)))
  for module in (streams, fractions):
    module.alpha[...] = jnp.zeros(3)
  start = lambda module, k: np.asarray(module.pre(normal(6, (k, C)))[1].coefficients.h_res)
  np.testing.assert_allclose(h_res, np.kron(start(streams, n), start(fractions, m)),
                             atol=2e-7)
  np.testing.assert_allclose(np.diag(h_res), 0.95 * 0.998 if n > 1 else 0.998, rtol=1e-5)


def test_mhc_with_fractions_refuses_a_pass_through_start_in_one_line():
  cfg = MHCConfig(4, C, num_fracs=2)
  with pytest.raises(ValueError, match="num_fracs=2 has no pass-through start") as error:
    cfg.passthrough_params(cfg.init_params(jax.random.key(0)))
  assert "\n" not in str(error.value)


# ---- H_res doubly stochastic with every parameter randomised; 64 layers


@pytest.mark.parametrize("res, n, m", [("permutations", 1, 4), ("permutations", 3, 2),
                                       ("kromhc", 1, 2), ("kromhc", 2, 2), ("kromhc", 2, 4),
                                       ("orthostochastic", 1, 2), ("orthostochastic", 2, 2),
                                       ("orthostochastic", 1, 8)])
def test_h_res_with_fractions_is_doubly_stochastic_with_every_parameter_randomised(res, n, m):
  site = mhc_jax.ManifoldHyperConnection(n, C, num_fracs=m, rngs=nnx.Rngs(0),
                                         **RES_OPTIONS[res])
  with_params(site, randomised(site.config, 7, scale=4.0))
  x = normal(8, (256, n, C), 3.0)
  h_res = np.asarray(site.pre(x)[1].coefficients.h_res, np.float64)
  assert h_res.shape == (256, n * m, n * m)
  assert np.min(np.diagonal(h_res, axis1=-2, axis2=-1)) < 0.5  # far from the start
  assert np.min(h_res) >= 0 and np.max(ds_error(h_res)) < CONVERGED


@pytest.mark.parametrize("res, n, m", [("kromhc", 1, 4), ("kromhc", 2, 2),
                                       ("orthostochastic", 1, 4), ("permutations", 2, 2)])
def test_composite_gain_with_fractions_over_64_random_layers_stays_1(res, n, m):
  gains = gain_summary(random_layers_h_res(res, n, 1e3, num_fracs=m))
  for name in ("forward_gain", "backward_gain", "composite_forward_gain",
               "composite_backward_gain"):
    assert np.max(np.abs(np.asarray(gains[name], np.float64) - 1)) < 1e-4, name


# ---- parameter counts, FLOPs, kept bytes, precision, module APIs, errors


def test_parameter_shapes_with_fractions():
  shapes = lambda cfg: {k: v.shape for k, v in jax.eval_shape(cfg.init_params,
                                                               jax.random.key(0)).items()}
  assert shapes(hc_config(2, 4)) == {
      "static_pre": (4, 8), "static_post": (8, 4), "static_res": (8, 8), "norm_scale": (2,),
      "w_pre": (2, 4), "w_post": (2, 4), "w_res": (2, 8), "scale_alpha": (), "scale_beta": ()}
  # phi reads vec(X) [n C]; 2N + R columns with R the mapping's logits at N = n m.
  for res, logits in (("sinkhorn", 64), ("kromhc", 6), ("orthostochastic", 64)):
    cfg = MHCConfig(2, C, num_fracs=4, **RES_OPTIONS[res])
    assert shapes(cfg) == {"phi": (2 * C, 16 + logits), "alpha": (3,), "bias": (16 + logits,)}


def one_token_flops(fn, *args):
  return dot_general_flops(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("name", [name for name in CONFIGS if "tokenbender" not in name])
def test_flops_are_those_of_the_program_for_one_token(name):
  cfg = CONFIGS[name]()
  params, x, _ = site_args(cfg, np.float32)
  x = x[0, 0]
  assert cfg.coefficient_flops() == one_token_flops(cfg.coefficients, params, x)
  coefficients = cfg.coefficients(params, x)
  mixing = lambda x, c: merge(x, aggregate(x, c.h_pre, cfg.num_fracs), c, cfg.num_fracs)
  assert cfg.mixing_flops() == one_token_flops(mixing, x, coefficients)


def nbytes(*arrays):
  return sum(a.size * a.dtype.itemsize for a in arrays)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("cfg", [HCConfig(1, 1024, num_fracs=4), HCConfig(2, 1024, num_fracs=2),
                                 MHCConfig(1, 1024, num_fracs=4)], ids=["hc n1", "hc n2", "mhc"])
def test_site_with_fractions_keeps_the_streams_in_their_dtype_once_for_the_backward(cfg, dtype):
  # As without fractions: the coefficients keep x (rms_projection splits it inside its VJP)
  # and small per-token arrays; aggregate keeps x and H_pre, merge x, F and the coefficients:
  # no float32 copy of bfloat16 streams, no second, reshaped copy.
  x = normal(20, (512, cfg.num_streams, 1024), 1.0, dtype)
  branch_output = x[..., 0, :]
  stream_bytes = nbytes(x)
  params = cfg.init_params(jax.random.key(0))
  coefficients = cfg.coefficients(params, x)
  saved = saved_bytes(lambda x, p: cfg.coefficients(p, x), x, params)
  assert stream_bytes <= saved < 1.5 * stream_bytes
  kept = nbytes(x, coefficients.h_pre)
  saved = saved_bytes(lambda x, h: aggregate(x, h, cfg.num_fracs), x, coefficients.h_pre)
  assert kept <= saved < 1.01 * kept
  kept = nbytes(x, branch_output, coefficients.h_post, coefficients.h_res)
  saved = saved_bytes(lambda *a: merge(*a, cfg.num_fracs), x, branch_output, coefficients)
  assert kept <= saved < 1.01 * kept


@pytest.mark.parametrize("name", ["hc dynamic n2 m2", "mhc sinkhorn n2 m2", "mhc kromhc n1 m4"])
def test_site_with_fractions_runs_every_dot_at_highest_precision(name):
  cfg = CONFIGS[name]()
  params, x, _ = site_args(cfg, np.float32)
  run = lambda p, x: merge(x, aggregate(x, cfg.coefficients(p, x).h_pre, cfg.num_fracs),
                           cfg.coefficients(p, x), cfg.num_fracs)
  assert_all_highest(run, params, x)
  assert_all_highest(jax.grad(lambda p, x: jnp.sum(run(p, x) ** 2), argnums=(0, 1)), params, x)


@pytest.mark.parametrize("name", ["hc dynamic n2 m2", "mhc sinkhorn n1 m4"])
def test_bfloat16_streams_give_float32_coefficients_and_bfloat16_streams(name):
  cfg = CONFIGS[name]()
  params, x, w = site_args(cfg, np.float32)
  assert all(c.dtype == jnp.float32 for c in cfg.coefficients(params, x.astype(jnp.bfloat16)))
  out = library(cfg, params, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, library(cfg, params, x, w)) < 2e-2  # bf16 streams alone


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_nnx_and_linen_agree_with_fractions_and_never_look_across_tokens(kind):
  if kind == "hc":
    module = mhc_jax.HyperConnection(2, C, layer_index=1, num_fracs=2)
    linen_module = mhc_jax.linen.HyperConnection(module.config)
  else:
    module = mhc_jax.ManifoldHyperConnection(1, C, num_fracs=4, rngs=nnx.Rngs(0))
    linen_module = mhc_jax.linen.ManifoldHyperConnection(module.config)
  with_params(module, randomised(module.config, 11))
  x = normal(12, (2, 6, module.config.num_streams, C))
  fn = lambda u: branch(u, normal(13, (C, C), 1 / math.sqrt(C)))
  variables = {"params": module._params()}
  assert jax.tree.structure(linen_module.init(jax.random.key(0), x, fn)) == \
      jax.tree.structure(variables)
  np.testing.assert_array_equal(linen_module.apply(variables, x, fn), module(x, fn))
  changed = x.at[:, 4:].add(normal(14, (2, 2, module.config.num_streams, C)))
  np.testing.assert_array_equal(module(changed, fn)[:, :4], module(x, fn)[:, :4])


@pytest.mark.parametrize("call", [
    lambda: HCConfig(4, C, num_fracs=3),
    lambda: MHCConfig(4, C, num_fracs=3),
    lambda: mhc_jax.HyperConnection(1, 12, num_fracs=8),
    lambda: mhc_jax.ManifoldHyperConnection(2, 12, num_fracs=5, rngs=nnx.Rngs(0)),
])
def test_num_fracs_not_dividing_dim_raises_one_line_naming_both(call):
  with pytest.raises(ValueError, match=r"num_fracs=\d must divide dim=\d+") as error:
    call()
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("call, match", [
    (lambda: HCConfig(4, C, num_fracs=0), "num_fracs must be an int >= 1"),
    (lambda: MHCConfig(3, C, num_fracs=2, res_mapping="kromhc"),
     "num_streams [*] num_fracs must be a power of two"),
    (lambda: MHCConfig(2, C, num_fracs=4, res_mapping="permutations"),
     "num_streams [*] num_fracs must be <= 6"),
    (lambda: MHCConfig(2, C, num_fracs=2, frac_init_identity=1.0), "frac_init_identity"),
])
def test_unsupported_fractions_raise_one_line(call, match):
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert "\n" not in str(error.value)


def test_site_memory_benchmark_rows_for_frac_connections(capsys, monkeypatch):
  from experiments import bench_site_memory  # run from a checkout, as the benchmarks' tests
  monkeypatch.setattr(bench_site_memory, "RES_ROWS",
                      {"sinkhorn": bench_site_memory.RES_ROWS["sinkhorn"]})
  args = argparse.Namespace(n=4, dim=64, repeats=1)
  bench_site_memory.print_res_mapping_table(args, normal(40, (4, 64, 4, 64)),
                                            normal(41, (64, 64), 0.125))
  rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]]
                                            for line in capsys.readouterr().out.splitlines()
                                            if line.startswith("| ") and "---" not in line)}
  # Columns: res logits | saved MiB | stream arrays | vs sinkhorn | fwd+bwd ms | vs sinkhorn.
  assert rows["sinkhorn"][3] == "1.000x"
  for label in bench_site_memory.FRAC_ROWS:
    saved, ratio = float(rows[label][2]), float(rows[label][3].rstrip("x"))
    # The same 4 units mixed, from 1 or 2 of the 4 streams: fewer bytes, by the streams'.
    assert 0.5 < ratio < 0.85 and saved == pytest.approx(ratio * float(rows["sinkhorn"][2]),
                                                          abs=0.01), label
