"""Benchmark: the bytes one hyper-connection site keeps for its backward pass.

    python experiments/bench_site_memory.py [--batch 16] [--seq 256] [--n 4] [--dim 256]
        [--dtype float32] [--layers 6]

For one site `merge(X, F(aggregate(X, H_pre)), coefficients(X))` with a `[C, C]` linear
branch and with the identity, reads from the compiled program's memory analysis the bytes
`jax.vjp` keeps between the forward and the backward (its residuals), on whatever device JAX
picked. mHC rows compare the library's path (the RMS + projection step as
`mappings.rms_projection`, a custom VJP) with autodiff of the plain formula it replaced
(`vec(X) @ phi * rsqrt(mean(vec(X)^2) + eps)`); everything else in the site is the same code.
An HC (dynamic) site is listed for information. Sizes are also given in stream arrays
(`[batch, seq, n, C]` in the streams' dtype), the unit the residuals scale with.

For context, the last columns give the temporary bytes of the compiled forward+backward of
`--layers` such sites under `jax.lax.scan` (as the model runs its blocks with `remat="none"`;
the scan stacks every layer's residuals). Inside one program XLA fuses what it can, so this
is where a residual costs memory or not.
"""

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import mappings
from mhc_jax.streams import aggregate, merge

_HIGHEST = jax.lax.Precision.HIGHEST
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


@contextlib.contextmanager
def plain_autodiff():
  """Traces within see the plain formula in place of `mappings.rms_projection`."""
  custom = mappings.rms_projection
  mappings.rms_projection = plain_rms_projection
  try:
    yield
  finally:
    mappings.rms_projection = custom


def site(config, branch):
  """-> f(streams, (site params, branch weight)) -> new streams."""
  def f(streams, params):
    site_params, branch_weight = params
    coefficients = config.coefficients(site_params, streams)
    branch_output = branch(aggregate(streams, coefficients.h_pre), branch_weight)
    return merge(streams, branch_output, coefficients)
  return f


def saved_bytes(f, *args) -> int:
  residuals = jax.jit(lambda *a: jax.vjp(f, *a)[1])
  return residuals.lower(*args).compile().memory_analysis().output_size_in_bytes


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

  print(f"Bytes one site keeps for its backward, streams [{', '.join(map(str, shape))}] "
        f"{args.dtype} (one stream array: {stream_bytes / 2**20:.2f} MiB), on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()})")
  print(f"| site | branch | path | saved MiB | stream arrays | vs autodiff | "
        f"{args.layers}-layer scan fwd+bwd temp MiB | vs autodiff |")
  print("|---|---|---|---|---|---|---|---|")
  for branch_name, branch in BRANCHES.items():
    cases = [("mHC", "autodiff of plain formula", mhc, mhc_params, plain_autodiff()),
             ("mHC", "custom VJP (library)", mhc, mhc_params, contextlib.nullcontext()),
             ("HC dynamic", "library", hc, hc_params, contextlib.nullcontext())]
    rows = []
    for site_name, path, config, params, context in cases:
      with context:
        f = site(config, branch)
        rows.append((site_name, path, saved_bytes(f, streams, params),
                     scanned_step_temp_bytes(f, streams, params, args.layers)))
    base_saved, base_temp = rows[0][2:]
    for site_name, path, saved, temp in rows:
      mhc_row = site_name == "mHC"
      print(f"| {site_name} | {branch_name} | {path} | {saved / 2**20:.2f} | "
            f"{saved / stream_bytes:.2f} | {f'{saved / base_saved:.3f}x' if mhc_row else '-'} | "
            f"{temp / 2**20:.2f} | {f'{temp / base_temp:.3f}x' if mhc_row else '-'} |")


if __name__ == "__main__":
  main()
