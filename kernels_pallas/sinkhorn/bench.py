"""Benchmark: Sinkhorn-Knopp custom VJP against jax autodiff of the unrolled loop.

    python -m kernels_pallas.sinkhorn.bench [--tokens 65536] [--n 4] [--iters 20]

Prints, for forward+backward of `sum(sinkhorn(logits) * cotangent)`: the median wall time,
the bytes kept from the forward for the backward (the residuals `jax.vjp` returns, read from
the compiled program's memory analysis), the compiled program's temporary bytes, and each as
a ratio to autodiff, all measured in one run on whatever device JAX picked.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sinkhorn.reference import sinkhorn_reference
from kernels_pallas.sinkhorn.xla import sinkhorn_xla


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure(sinkhorn, logits, cotangent, repeats: int) -> dict[str, float]:
  residuals = jax.jit(lambda x: jax.vjp(sinkhorn, x)[1])
  fwd_bwd = jax.jit(jax.grad(lambda x: jnp.sum(sinkhorn(x) * cotangent)))
  return {
      "seconds": median_seconds(fwd_bwd, logits, repeats=repeats),
      "saved_bytes": residuals.lower(logits).compile().memory_analysis().output_size_in_bytes,
      "temp_bytes": fwd_bwd.lower(logits).compile().memory_analysis().temp_size_in_bytes,
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  shape = (args.tokens, args.n, args.n)
  logits = jnp.asarray(rng.normal(size=shape) * 3, jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  paths = {
      "autodiff of unrolled loop": lambda x: sinkhorn_reference(x, args.iters),
      "custom VJP (XLA)": lambda x: sinkhorn_xla(x, args.iters, 0.0),
  }
  results = {name: measure(fn, logits, cotangent, args.repeats) for name, fn in paths.items()}
  base = results["autodiff of unrolled loop"]

  print(f"Sinkhorn-Knopp fwd+bwd, {args.tokens} tokens, n={args.n}, {args.iters} iterations, "
        f"float32, on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.repeats}")
  header = f"| {'path':<26} | {'fwd+bwd ms':>10} | {'vs autodiff':>11} | {'saved MiB':>9} | " \
           f"{'vs autodiff':>11} | {'temp MiB':>8} | {'vs autodiff':>11} |"
  print(header)
  print("|" + "|".join("-" * (len(col)) for col in header.split("|")[1:-1]) + "|")
  for name, r in results.items():
    print(f"| {name:<26} | {r['seconds'] * 1e3:10.2f} | {r['seconds'] / base['seconds']:10.2f}x "
          f"| {r['saved_bytes'] / 2**20:9.2f} | {r['saved_bytes'] / base['saved_bytes']:10.3f}x "
          f"| {r['temp_bytes'] / 2**20:8.2f} | {r['temp_bytes'] / base['temp_bytes']:10.3f}x |")


if __name__ == "__main__":
  main()
