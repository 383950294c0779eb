"""Benchmark: the bytes one hyper-connection site keeps for its backward pass.

    python -m experiments.bench_site_memory [--batch 16] [--seq 256] [--n 4] [--dim 256]
        [--dtype float32] [--layers 6] [--repeats 10]

For one site `merge(X, F(aggregate(X, H_pre)), coefficients(X))` with a `[C, C]` linear
branch and with the identity, reads from the compiled program's memory analysis the bytes
`jax.vjp` keeps between the forward and the backward (its residuals), on whatever device JAX
picked. mHC rows compare the library's path (the RMS + projection step as
`mappings.rms_projection`, and the stream mixing `aggregate` / `merge`, custom VJPs) with
autodiff of the plain formulas they replaced (`vec(X) @ phi * rsqrt(mean(vec(X)^2) + eps)`;
the mixing's `streams.astype(float32)` then einsums), and with the RMS + projection's custom
VJP alone (the library before the mixing's); everything else in the site is the same code.
Dynamic HC rows compare the library's (the per-stream norm and three projections as one
`rms_projection`, the mixing's custom VJPs) with autodiff of the plain formulas (the
normalised copy `X̄`, three einsums, the plain mixing). Sizes are also given in stream arrays
(`[batch, seq, n, C]` in the streams' dtype), the unit the residuals scale with.

The baseline row is the same mHC site in MaxText's formulation
(`ManifoldConstrainedHyperConnections`, src/MaxText/layers/mhc.py in AI-Hypercomputer/maxtext),
written here from its description and fed our site's parameters (`maxtext_params`):

  * the streams `[b, s, n, C]` are reshaped to `[b, s, nC]` and RMS-normalised with a learned
    scale (here 1) into a materialised copy: the norm comes BEFORE the projections;
  * three separate projections of that copy, each `alpha_scale * (x @ W) + beta`: pre
    `[nC, n]` -> sigmoid, post `[nC, n]` -> 2 sigmoid, res `[nC, n*n]` -> Sinkhorn;
  * the Sinkhorn is a column softmax, then 20 times a row then a column normalisation (sums
    clipped at 1e-12) in a `jax.lax.fori_loop`, differentiated by autodiff;
  * branch input `einsum("bskd,bsk->bsd")`, post `einsum("bsd,bsk->bskd")`, res
    `einsum("bskd,bskm->bsmd")`, output res + post; everything in the streams' dtype (MaxText's
    `config.dtype`), matmuls at `matmul_precision="highest"`.

MaxText normalises a `residual_x` (for res) and a `layer_x` (for pre and post) separately; at
one site both are the streams, so the copy is made once. MaxText's res matrix is applied
transposed (`bskd,bskm->bsmd`), so its res columns and bias are ours transposed; its Sinkhorn
on the transpose is then ours preceded by one extra row normalisation: the same fixed point,
not the same 20th iterate (about 1e-4 apart on `H_res` at init). Before measuring, the script
checks in float32, with both Sinkhorns run to convergence, that this site and the library's
compute the same output to 1e-5, on the benchmark's parameters and on perturbed ones (alpha
0.3, random biases: a non-symmetric res bias exercises the transposition); it prints the gap
at 20 iterations too.

For context, the last columns give the temporary bytes of the compiled forward+backward of
`--layers` such sites under `jax.lax.scan` (as the model runs its blocks with `remat="none"`;
the scan stacks every layer's residuals). Inside one program XLA fuses what it can, so this
is where a residual costs memory or not.

A second table puts every `H_res` mapping (`mhc_jax.res_mappings.RES_MAPPINGS`) in the same
mHC site with the linear branch: its bytes saved for the backward and the median time of the
jitted forward+backward over `--repeats` runs, both against the Sinkhorn site. The
orthostochastic mapping is listed with its two Newton-Schulz schedules, and once with plain
autodiff through its iterations instead of the library's recomputation from the logits.
Frac-connection sites follow (`num_fracs`, `FRAC_ROWS`): the same `N = --n` units mixed, as
one stream of `--n` fractions (the paper's) or two streams of `--n / 2`, so their streams
are the first 1 or 2 of the `--n` (their bytes in the same stream arrays, of `--n` streams).
"""

import argparse
import contextlib
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import mappings, res_mappings
from mhc_jax import streams as streams_lib

_HIGHEST = jax.lax.Precision.HIGHEST
AUTODIFF = "autodiff of plain formula"
MIXING_AUTODIFF = "custom VJP of RMS + projection, mixing by autodiff"
MAXTEXT = "MaxText formulation (autodiff)"
BRANCHES = {
    "linear [C, C]": lambda x, w: jnp.dot(x, w.astype(x.dtype)),
    "identity": lambda x, w: x,
}


def plain_rms_projection(x, w, eps):
  """The formula before the custom VJP, verbatim: flatten the streams, autodiff does the rest.
  `[..., n, C]`, `[n, C, W]` -> `[..., W]`."""
  flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + eps)
  return jnp.dot(flat, w.reshape(flat.shape[-1], -1), precision=_HIGHEST) * inv_rms


def _plain_mixing_dtype(streams):
  return jnp.promote_types(streams.dtype, jnp.float32)


def _one_fraction(num_fracs: int) -> None:
  if num_fracs != 1:
    raise ValueError(f"the plain formulas have one fraction, got num_fracs={num_fracs}")


def plain_aggregate(streams, h_pre, num_fracs=1):
  """`streams.aggregate` before its custom VJP, verbatim (one fraction)."""
  _one_fraction(num_fracs)
  out = jnp.einsum("...n,...nc->...c", h_pre, streams.astype(_plain_mixing_dtype(streams)),
                   precision=_HIGHEST)
  return out.astype(streams.dtype)


def plain_merge(streams, branch_output, coefficients, num_fracs=1):
  """`streams.merge` before its custom VJP, verbatim (one fraction)."""
  _one_fraction(num_fracs)
  dtype = _plain_mixing_dtype(streams)
  mixed = jnp.einsum("...kj,...jc->...kc", coefficients.h_res, streams.astype(dtype),
                     precision=_HIGHEST)
  spread = coefficients.h_post[..., :, None] * branch_output.astype(dtype)[..., None, :]
  return (mixed + spread).astype(streams.dtype)


def plain_hc_coefficients(self, params, streams):
  """`HCConfig.coefficients` before it used `rms_projection`, verbatim."""
  h_pre, h_post, h_res = params["static_pre"], params["static_post"], params["static_res"]
  if not self.dynamic:
    return streams_lib.Coefficients(h_pre, h_post, h_res)
  xbar = mappings.rms_normalise(streams, self.norm_eps) * params["norm_scale"]
  squash = jnp.tanh if self.use_tanh else (lambda v: v)
  dyn_pre = jnp.einsum("...nc,c->...n", xbar, params["w_pre"], precision=_HIGHEST)
  dyn_post = jnp.einsum("...nc,c->...n", xbar, params["w_post"], precision=_HIGHEST)
  dyn_res = jnp.einsum("...jc,ck->...kj", xbar, params["w_res"], precision=_HIGHEST)
  alpha, beta = params["scale_alpha"], params["scale_beta"]
  return streams_lib.Coefficients(h_pre + alpha * squash(dyn_pre),
                                  h_post + beta * squash(dyn_post),
                                  h_res + alpha * squash(dyn_res))


def maxtext_params(site_params, n: int) -> dict:
  """Our `MHCConfig` parameters (phi `[nC, 2n+n²]`, alpha `[3]`, bias `[2n+n²]`) in MaxText's
  layout. MaxText applies its res matrix `M` as `M^T @ X`, so `M = H_res^T`: its logit `(a, b)`
  is our column `b*n + a`."""
  phi, alpha, bias = site_params["phi"], site_params["alpha"], site_params["bias"]
  transpose = lambda a: jnp.swapaxes(a.reshape(*a.shape[:-1], n, n), -1, -2).reshape(a.shape)
  return {
      "norm_scale": jnp.ones((phi.shape[0],), jnp.float32),
      "pre_alpha": phi[:, :n], "pre_alpha_scale": alpha[0:1], "pre_beta": bias[:n],
      "post_alpha": phi[:, n:2 * n], "post_alpha_scale": alpha[1:2], "post_beta": bias[n:2 * n],
      "res_alpha": transpose(phi[:, 2 * n:]), "res_alpha_scale": alpha[2:3],
      "res_beta": transpose(bias[2 * n:]).reshape(n, n),
  }


def maxtext_sinkhorn(logits, iters):
  """Column softmax, then `iters` row-then-column normalisations in a `fori_loop` (float32)."""
  def body(_, m):
    m = m / jnp.clip(jnp.sum(m, axis=-1, keepdims=True), min=1e-12)
    return m / jnp.clip(jnp.sum(m, axis=-2, keepdims=True), min=1e-12)
  m = jax.nn.softmax(logits.astype(jnp.float32), axis=-2)
  return jax.lax.fori_loop(0, iters, body, m).astype(logits.dtype)


def maxtext_site(config, branch):
  """-> f(streams, (maxtext_params(...), branch weight)) -> new streams; see the docstring."""
  def f(streams, params):
    p, branch_weight = params
    b, s, n, c = streams.shape
    dtype = streams.dtype
    flat = streams.reshape(b, s, n * c).astype(jnp.float32)
    normed = flat * jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) +
                                  config.norm_eps)
    normed = normed.astype(dtype) * p["norm_scale"].astype(dtype)

    def projection(name):
      h = jnp.einsum("bsm,mk->bsk", normed, p[f"{name}_alpha"].astype(dtype), precision=_HIGHEST)
      return p[f"{name}_alpha_scale"].astype(dtype) * h

    h_pre = jax.nn.sigmoid(projection("pre") + p["pre_beta"].astype(dtype))
    layer_input = jnp.einsum("bskd,bsk->bsd", streams, h_pre, precision=_HIGHEST)
    layer_out = branch(layer_input, branch_weight)
    h_post = 2.0 * jax.nn.sigmoid(projection("post") + p["post_beta"].astype(dtype))
    post_out = jnp.einsum("bsd,bsk->bskd", layer_out, h_post, precision=_HIGHEST)
    res_logits = projection("res").reshape(b, s, n, n) + p["res_beta"].astype(dtype)
    h_res = maxtext_sinkhorn(res_logits, config.sinkhorn_iters)
    return jnp.einsum("bskd,bskm->bsmd", streams, h_res, precision=_HIGHEST) + post_out
  return f


@contextlib.contextmanager
def replaced(module, name: str, value):
  """Traces within see `value` in place of `module.name`."""
  original = getattr(module, name)
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, original)


@contextlib.contextmanager
def plain_mixing():
  """Traces within see the plain formulas in place of `aggregate` and `merge`."""
  with replaced(streams_lib, "aggregate", plain_aggregate), \
       replaced(streams_lib, "merge", plain_merge):
    yield


@contextlib.contextmanager
def plain_autodiff():
  """Traces within see the plain formulas in place of every custom VJP of the site (but
  Sinkhorn's): `mappings.rms_projection`, dynamic HC's coefficients, the mixing."""
  with replaced(mappings, "rms_projection", plain_rms_projection), \
       replaced(mappings.HCConfig, "coefficients", plain_hc_coefficients), plain_mixing():
    yield


# H_res mapping rows: label -> (MHCConfig options, context the site is traced in).
ORTHO_AUTODIFF = "orthostochastic, plain autodiff"
RES_ROWS = {
    "sinkhorn": ({}, contextlib.nullcontext),
    "permutations": ({"res_mapping": "permutations"}, contextlib.nullcontext),
    "kromhc": ({"res_mapping": "kromhc"}, contextlib.nullcontext),
    "orthostochastic": ({"res_mapping": "orthostochastic"}, contextlib.nullcontext),
    ORTHO_AUTODIFF: ({"res_mapping": "orthostochastic"},
                     lambda: replaced(res_mappings, "orthostochastic",
                                      res_mappings.newton_schulz_square)),
    "orthostochastic, tokenbender schedule": (
        {"res_mapping": "orthostochastic", "orthostochastic_schedule": "tokenbender"},
        contextlib.nullcontext),
}
# Frac-connection rows: label -> the site's config for `--n` units and `--dim`.
FRAC_ROWS = {
    "Frac-connection, HC: 1 stream x n fractions":
        lambda n, dim: mappings.HCConfig(1, dim, num_fracs=n),
    "Frac-connection, mHC sinkhorn: 1 stream x n fractions":
        lambda n, dim: mappings.MHCConfig(1, dim, num_fracs=n),
    "Frac-connection, mHC sinkhorn: 2 streams x n/2 fractions": lambda n, dim: _two_streams(n, dim),
}


def _two_streams(n: int, dim: int) -> mappings.MHCConfig:
  if n < 4 or n % 2:
    raise ValueError("two streams of n/2 >= 2 fractions need an even --n >= 4")
  return mappings.MHCConfig(2, dim, num_fracs=n // 2)


def site(config, branch):
  """-> f(streams, (site params, branch weight)) -> new streams."""
  def f(streams, params):
    site_params, branch_weight = params
    coefficients = config.coefficients(site_params, streams)
    branch_input = streams_lib.aggregate(streams, coefficients.h_pre, config.num_fracs)
    return streams_lib.merge(streams, branch(branch_input, branch_weight), coefficients,
                             config.num_fracs)
  return f


def output_gap(config, branch, streams, params, branch_weight) -> float:
  """max |maxtext_site - site| on the same (library) parameters, in float32."""
  streams = streams.astype(jnp.float32)
  ours = jax.jit(site(config, branch))(streams, (params, branch_weight))
  theirs = jax.jit(maxtext_site(config, branch))(
      streams, (maxtext_params(params, config.num_streams), branch_weight))
  return float(jnp.max(jnp.abs(theirs - ours)))


def check_same_function(config, streams, params, branch_weight, iters=200, tol=1e-5) -> float:
  """Raises unless `maxtext_site` and `site` agree to `tol` with both Sinkhorns run `iters`
  times, on `params` and on a perturbed copy; -> the gap at `config.sinkhorn_iters`."""
  noise = np.random.default_rng(1).normal(size=params["bias"].shape)
  perturbed = dict(params, alpha=jnp.full((3,), 0.3, jnp.float32),
                   bias=params["bias"] + jnp.asarray(0.5 * noise, jnp.float32))
  converged = dataclasses.replace(config, sinkhorn_iters=iters)
  for branch_name, branch in BRANCHES.items():
    for label, checked in (("benchmark", params), ("perturbed", perturbed)):
      gap = output_gap(converged, branch, streams, checked, branch_weight)
      if not gap <= tol:
        raise AssertionError(f"MaxText formulation differs from the library's site by "
                             f"{gap:.1e} > {tol:.0e} ({branch_name}, {label} parameters)")
  return max(output_gap(config, branch, streams, params, branch_weight)
             for branch in BRANCHES.values())


def saved_bytes(f, *args) -> int:
  residuals = jax.jit(lambda *a: jax.vjp(f, *a)[1])
  return residuals.lower(*args).compile().memory_analysis().output_size_in_bytes


def fwd_bwd_seconds(f, streams, params, repeats: int) -> float:
  """Median wall time of the jitted gradient of `sum(f(streams, params) * cotangent)`."""
  cotangent = jnp.asarray(np.random.default_rng(2).normal(size=streams.shape), jnp.float32)
  step = jax.jit(jax.grad(lambda x, p, g: jnp.sum(f(x, p).astype(jnp.float32) * g),
                          argnums=(0, 1)))
  jax.block_until_ready(step(streams, params, cotangent))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(streams, params, cotangent))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def print_res_mapping_table(args, streams, branch_weight) -> None:
  """One row per `RES_ROWS` and `FRAC_ROWS` entry, see the module docstring; sites that do
  not support `--n` are listed as such."""
  stream_bytes = streams.size * streams.dtype.itemsize
  print(f"\nmHC site (linear branch) per H_res mapping, then Frac-connection sites; time: "
        f"median of {args.repeats} jitted forward+backward runs")
  print("| H_res mapping | res logits | saved MiB | stream arrays | vs sinkhorn | fwd+bwd ms "
        "| vs sinkhorn |")
  print("|---|---|---|---|---|---|---|")
  configs = {label: (lambda n, dim, options=options: mappings.MHCConfig(n, dim, **options),
                     context) for label, (options, context) in RES_ROWS.items()}
  configs |= {label: (make, contextlib.nullcontext) for label, make in FRAC_ROWS.items()}
  rows = {}
  for label, (make, context) in configs.items():
    try:
      config = make(args.n, args.dim)
    except ValueError as error:
      rows[label] = f"not for n = {args.n}: {error}"
      continue
    f = site(config, BRANCHES["linear [C, C]"])
    params = (config.init_params(jax.random.key(0)), branch_weight)
    its_streams = streams[..., :config.num_streams, :]
    with context():
      rows[label] = (getattr(config, "num_res_logits", "-"), saved_bytes(f, its_streams, params),
                     fwd_bwd_seconds(f, its_streams, params, args.repeats))
  _, base_saved, base_seconds = rows["sinkhorn"]
  for label, row in rows.items():
    if isinstance(row, str):
      print(f"| {label} | - | {row} | | | | |")
      continue
    logits, saved, seconds = row
    print(f"| {label} | {logits} | {saved / 2**20:.2f} | {saved / stream_bytes:.2f} | "
          f"{saved / base_saved:.3f}x | {seconds * 1e3:.2f} | {seconds / base_seconds:.2f}x |")


def scanned_step_temp_bytes(f, streams, params, layers: int) -> int:
  stacked = jax.tree.map(lambda a: jnp.stack([a] * layers), params)

  def loss(x, stacked, cotangent):
    out, _ = jax.lax.scan(lambda x, p: (f(x, p), None), x, stacked)
    return jnp.sum(out.astype(jnp.float32) * cotangent)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(streams, stacked, streams.astype(jnp.float32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq, args.n, args.dim)
  streams = jnp.asarray(rng.normal(size=shape), args.dtype)
  branch_weight = jnp.asarray(rng.normal(size=(args.dim, args.dim)) / np.sqrt(args.dim),
                              jnp.float32)
  stream_bytes = streams.size * streams.dtype.itemsize
  key = jax.random.key(0)
  mhc = mappings.MHCConfig(args.n, args.dim)
  hc = mappings.HCConfig(args.n, args.dim)
  mhc_params = (mhc.init_params(key), branch_weight)
  hc_params = (hc.init_params(key), branch_weight)
  maxtext_site_params = (maxtext_params(mhc_params[0], args.n), branch_weight)

  gap = check_same_function(mhc, streams, mhc_params[0], branch_weight)

  print(f"Bytes one site keeps for its backward, streams [{', '.join(map(str, shape))}] "
        f"{args.dtype} (one stream array: {stream_bytes / 2**20:.2f} MiB), on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(f"MaxText formulation = library site to 1e-5 (float32, both Sinkhorns converged; "
        f"checked); at {mhc.sinkhorn_iters} Sinkhorn iterations max |diff| {gap:.1e}")
  print(f"| site | branch | path | saved MiB | stream arrays | vs autodiff | vs MaxText "
        f"formulation | {args.layers}-layer scan fwd+bwd temp MiB | vs autodiff | vs MaxText "
        f"formulation |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for branch_name, branch in BRANCHES.items():
    cases = [("mHC", MAXTEXT, maxtext_site(mhc, branch), maxtext_site_params,
              contextlib.nullcontext()),
             ("mHC", AUTODIFF, site(mhc, branch), mhc_params, plain_autodiff()),
             ("mHC", MIXING_AUTODIFF, site(mhc, branch), mhc_params, plain_mixing()),
             ("mHC", "custom VJP (library)", site(mhc, branch), mhc_params,
              contextlib.nullcontext()),
             ("HC dynamic", AUTODIFF, site(hc, branch), hc_params, plain_autodiff()),
             ("HC dynamic", "library", site(hc, branch), hc_params, contextlib.nullcontext())]
    rows = {}
    for site_name, path, f, params, context in cases:
      with context:
        rows[site_name, path] = (saved_bytes(f, streams, params),
                                 scanned_step_temp_bytes(f, streams, params, args.layers))
    for (site_name, path), (saved, temp) in rows.items():
      def ratios(i, value, site_name=site_name):
        """vs the same site's autodiff row, and vs MaxText's (mHC only)."""
        return " | ".join(f"{value / rows[site_name, base][i]:.3f}x"
                          if (site_name, base) in rows else "-" for base in (AUTODIFF, MAXTEXT))
      print(f"| {site_name} | {branch_name} | {path} | {saved / 2**20:.2f} | "
            f"{saved / stream_bytes:.2f} | {ratios(0, saved)} | {temp / 2**20:.2f} | "
            f"{ratios(1, temp)} |")
  print_res_mapping_table(args, streams, branch_weight)


if __name__ == "__main__":
  main()
