"""Benchmark: Sinkhorn-Knopp implementations, measured in one run on whatever device JAX picked.

    python -m kernels_pallas.sinkhorn.bench             # custom VJP vs autodiff: time, saved bytes
    python -m kernels_pallas.sinkhorn.bench --sweep     # 2^12..2^20 tokens: kernel vs XLA paths

Default table: forward+backward of `sum(sinkhorn(logits) * cotangent)` at `--tokens`: median
wall time, the bytes the forward keeps for the backward (the residuals `jax.vjp` returns, from
the compiled program's memory analysis), the compiled program's temporary bytes, each as a
ratio to jax autodiff of the unrolled loop.

Sweep: forward and forward+backward time of the Pallas kernel (on TPU/GPU), the XLA custom
VJP and plain autodiff, with the achieved bandwidth against the minimum bytes the op must
move (forward: read logits, write output; backward adds: read logits and cotangent, write
the gradient). On CPU the kernels only run in interpret mode, so they are checked for
correctness against the XLA path instead of timed.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sinkhorn.pallas_common import sinkhorn_pallas
from kernels_pallas.sinkhorn.reference import sinkhorn_reference
from kernels_pallas.sinkhorn.xla import sinkhorn_xla

_PLATFORMS = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def median_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def random_inputs(tokens: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = (tokens, n, n)
  return (jnp.asarray(rng.normal(size=shape) * 3, jnp.float32),
          jnp.asarray(rng.normal(size=shape), jnp.float32))


def fwd_bwd(sinkhorn, cotangent):
  return jax.jit(jax.grad(lambda x: jnp.sum(sinkhorn(x) * cotangent)))


def memory_table(args) -> None:
  logits, cotangent = random_inputs(args.tokens, args.n)
  paths = {
      "autodiff of unrolled loop": lambda x: sinkhorn_reference(x, args.iters),
      "custom VJP (XLA)": lambda x: sinkhorn_xla(x, args.iters, 0.0),
  }
  results = {}
  for name, fn in paths.items():
    step = fwd_bwd(fn, cotangent)
    residuals = jax.jit(lambda x, fn=fn: jax.vjp(fn, x)[1])
    results[name] = {
        "seconds": median_seconds(step, logits, repeats=args.repeats),
        "saved": residuals.lower(logits).compile().memory_analysis().output_size_in_bytes,
        "temp": step.lower(logits).compile().memory_analysis().temp_size_in_bytes,
    }
  base = results["autodiff of unrolled loop"]
  print(f"Sinkhorn-Knopp fwd+bwd, {args.tokens} tokens, n={args.n}, {args.iters} iterations, "
        f"float32, on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.repeats}")
  print("| path | fwd+bwd ms | vs autodiff | saved MiB | vs autodiff | temp MiB | vs autodiff |")
  print("|---|---|---|---|---|---|---|")
  for name, r in results.items():
    print(f"| {name} | {r['seconds'] * 1e3:.2f} | {r['seconds'] / base['seconds']:.2f}x | "
          f"{r['saved'] / 2**20:.2f} | {r['saved'] / base['saved']:.3f}x | "
          f"{r['temp'] / 2**20:.2f} | {r['temp'] / base['temp']:.3f}x |")


def check_kernels_in_interpret_mode(args) -> None:
  logits, cotangent = random_inputs(1000, args.n, seed=1)
  ref_out = sinkhorn_xla(logits, args.iters, 0.0)
  ref_grad = fwd_bwd(lambda x: sinkhorn_xla(x, args.iters, 0.0), cotangent)(logits)
  for platform in ("tpu", "gpu"):
    kernel = lambda x, p=platform: sinkhorn_pallas(x, args.iters, platform=p, interpret=True)
    out, grad = kernel(logits), fwd_bwd(kernel, cotangent)(logits)
    err = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    print(f"{platform} kernel, interpret mode, 1000 tokens: forward rel. error "
          f"{err(out, ref_out):.1e}, gradient rel. error {err(grad, ref_grad):.1e} vs XLA")


def sweep(args) -> None:
  platform = _PLATFORMS.get(jax.default_backend())
  paths = {"custom VJP (XLA)": lambda x: sinkhorn_xla(x, args.iters, 0.0),
           "autodiff of loop": lambda x: sinkhorn_reference(x, args.iters)}
  if platform:
    paths = {f"Pallas ({platform})": lambda x: sinkhorn_pallas(x, args.iters, platform=platform),
             **paths}
  print(f"Sinkhorn-Knopp, n={args.n}, {args.iters} iterations, float32, on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {args.repeats}. "
        "GB/s = minimum bytes the op must move / time.")
  print("| tokens | path | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd vs XLA |")
  print("|---|---|---|---|---|---|---|")
  for log2 in range(args.min_log2, args.max_log2 + 1):
    logits, cotangent = random_inputs(2**log2, args.n)
    matrix_bytes = logits.size * 4
    timings = {name: (median_seconds(jax.jit(fn), logits, repeats=args.repeats),
                      median_seconds(fwd_bwd(fn, cotangent), logits, repeats=args.repeats))
               for name, fn in paths.items()}
    xla_fwd_bwd = timings["custom VJP (XLA)"][1]
    for name, (fwd, both) in timings.items():
      print(f"| 2^{log2} | {name} | {fwd * 1e3:.3f} | {2 * matrix_bytes / fwd / 1e9:.1f} | "
            f"{both * 1e3:.3f} | {5 * matrix_bytes / both / 1e9:.1f} | "
            f"{xla_fwd_bwd / both:.2f}x |")
  if not platform:
    check_kernels_in_interpret_mode(args)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", action="store_true", help="token sweep, kernel vs XLA paths")
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--min_log2", type=int, default=12)
  parser.add_argument("--max_log2", type=int, default=20)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  (sweep if args.sweep else memory_table)(args)


if __name__ == "__main__":
  main()
