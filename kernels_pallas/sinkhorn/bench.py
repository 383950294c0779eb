"""Benchmark: Sinkhorn-Knopp implementations, measured in one run on whatever device JAX picked.

    python -m kernels_pallas.sinkhorn.bench             # custom VJP vs autodiff: time, saved bytes
    python -m kernels_pallas.sinkhorn.bench --sweep     # 2^12..2^20 tokens: kernel vs XLA paths
    python -m kernels_pallas.sinkhorn.bench --validate  # Pallas kernel vs XLA: errors, PASS/FAIL

Default table: forward+backward of `sum(sinkhorn(logits) * cotangent)` at `--tokens`: median
wall time, the bytes the forward keeps for the backward (the residuals `jax.vjp` returns, from
the compiled program's memory analysis), the compiled program's temporary bytes, each as a
ratio to jax autodiff of the unrolled loop.

Sweep: forward and forward+backward time of the Pallas kernel (on TPU/GPU), the XLA custom
VJP and plain autodiff, with the achieved bandwidth against the minimum bytes the op must
move (forward: read logits, write output; backward adds: read logits and cotangent, write
the gradient). On CPU the kernels only run in interpret mode; `--validate` checks them.

Validate: the check a TPU/GPU must pass before `sinkhorn_knopp(backend="auto")` picks the
Pallas kernel there. The platform's kernel against the XLA custom VJP at eps 0 and 1e-6:
max abs error and max error relative to the largest entry, of the output and of the
gradient, against `--tol`; then forward+backward time and bandwidth of both. Prints one
PASS or FAIL line and exits 1 on FAIL. On CPU both kernels run in interpret mode at
`--tokens` capped to 1024, and are not timed (the interpreter's time is not a kernel's).
"""

import argparse
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.sinkhorn.api import IMPLEMENTATIONS, PLATFORMS
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


def random_inputs(tokens: int, n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  shape = (tokens, n, n)
  return (jnp.asarray(rng.normal(size=shape) * 3, jnp.float32),
          jnp.asarray(rng.normal(size=shape), jnp.float32))


def fwd_bwd(sinkhorn, cotangent):
  return jax.jit(jax.grad(lambda x: jnp.sum(sinkhorn(x) * cotangent)))


def gb_per_s(logits: jax.Array, seconds: float, backward: bool) -> float:
  """Achieved bandwidth against the minimum bytes moved: the forward reads the logits and
  writes the output; the backward reads the logits and cotangent and writes the gradient."""
  return (5 if backward else 2) * logits.size * 4 / seconds / 1e9


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


def sweep(args) -> None:
  name = PLATFORMS.get(jax.default_backend())
  paths = {"custom VJP (XLA)": lambda x: sinkhorn_xla(x, args.iters, 0.0),
           "autodiff of loop": lambda x: sinkhorn_reference(x, args.iters)}
  if name:
    implementation = IMPLEMENTATIONS[name]
    pallas = implementation.require()
    paths = {f"Pallas ({implementation.platform})": lambda x: pallas(x, args.iters, 0.0),
             **paths}
  print(f"Sinkhorn-Knopp, n={args.n}, {args.iters} iterations, float32, on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), median of {args.repeats}. "
        "GB/s = minimum bytes the op must move / time.")
  print("| tokens | path | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd vs XLA |")
  print("|---|---|---|---|---|---|---|")
  for log2 in range(args.min_log2, args.max_log2 + 1):
    logits, cotangent = random_inputs(2**log2, args.n)
    timings = {name: (median_seconds(jax.jit(fn), logits, repeats=args.repeats),
                      median_seconds(fwd_bwd(fn, cotangent), logits, repeats=args.repeats))
               for name, fn in paths.items()}
    xla_fwd_bwd = timings["custom VJP (XLA)"][1]
    for name, (fwd, both) in timings.items():
      print(f"| 2^{log2} | {name} | {fwd * 1e3:.3f} | {gb_per_s(logits, fwd, False):.1f} | "
            f"{both * 1e3:.3f} | {gb_per_s(logits, both, True):.1f} | "
            f"{xla_fwd_bwd / both:.2f}x |", flush=True)  # each size as soon as it is measured


def max_errors(out: jax.Array, ref: jax.Array) -> tuple[float, float]:
  """(max abs error, max abs error / max |ref|): entries near 0 make an elementwise
  relative error meaningless."""
  abs_err = float(jnp.max(jnp.abs(out - ref)))
  return abs_err, abs_err / float(jnp.max(jnp.abs(ref)))


def validate(args) -> None:
  name = PLATFORMS.get(jax.default_backend())
  # On CPU the kernels exist only as interpreted programs; both run, at few tokens.
  names = [name] if name else [n for n, impl in IMPLEMENTATIONS.items() if impl.platform]
  kernels = {IMPLEMENTATIONS[n].platform: IMPLEMENTATIONS[n].require() for n in names}
  tokens = args.tokens if name else min(args.tokens, 1024)
  logits, cotangent = random_inputs(tokens, args.n, seed=1)
  # An interpreted kernel runs as the interpreter's XLA program: its time says nothing of
  # the kernel's (on CPU it looked 20x faster than the XLA path), so it is not measured.
  mode = "compiled" if name else "interpret mode on CPU: numerics only, kernels not timed"
  print(f"Pallas Sinkhorn kernel vs XLA custom VJP, {tokens} tokens, n={args.n}, "
        f"{args.iters} iterations, float32, on {jax.devices()[0].device_kind} "
        f"({jax.default_backend()}), JAX {jax.__version__}, {mode}; median of {args.repeats}")
  print("| path | eps | fwd max abs err | fwd max rel err | grad max abs err | grad max rel err "
        "| fwd+bwd ms | fwd+bwd GB/s |")
  print("|---|---|---|---|---|---|---|---|")
  worst = 0.0
  for eps in (0.0, 1e-6):
    xla = lambda x, eps=eps: sinkhorn_xla(x, args.iters, eps)
    ref_out, ref_grad = jax.jit(xla)(logits), fwd_bwd(xla, cotangent)(logits)
    seconds = median_seconds(fwd_bwd(xla, cotangent), logits, repeats=args.repeats)
    print(f"| XLA custom VJP | {eps:g} | | | | | {seconds * 1e3:.3f} | "
          f"{gb_per_s(logits, seconds, True):.3g} |")
    for platform, kernel in kernels.items():
      pallas = functools.partial(kernel, num_iters=args.iters, eps=eps, interpret=name is None)
      step = fwd_bwd(pallas, cotangent)
      fwd_err, grad_err = max_errors(pallas(logits), ref_out), max_errors(step(logits), ref_grad)
      worst = max(worst, fwd_err[1], grad_err[1])
      timing = "not timed (interpreted) | -"
      if name:
        seconds = median_seconds(step, logits, repeats=args.repeats)
        timing = f"{seconds * 1e3:.3f} | {gb_per_s(logits, seconds, True):.3g}"
      print(f"| Pallas ({platform}) | {eps:g} | {fwd_err[0]:.1e} | {fwd_err[1]:.1e} | "
            f"{grad_err[0]:.1e} | {grad_err[1]:.1e} | {timing} |")
  verdict = "PASS" if worst <= args.tol else "FAIL"
  print(f"{verdict}: Pallas {'/'.join(kernels)} kernel max rel error {worst:.1e} "
        f"(tolerance {args.tol:g}) on {jax.default_backend()}, JAX {jax.__version__}")
  if verdict == "FAIL":
    sys.exit(1)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--sweep", action="store_true", help="token sweep, kernel vs XLA paths")
  mode.add_argument("--validate", action="store_true",
                    help="Pallas kernel vs XLA: errors, PASS/FAIL, time and bandwidth")
  parser.add_argument("--tokens", type=int, default=65536)
  parser.add_argument("--min_log2", type=int, default=12)
  parser.add_argument("--max_log2", type=int, default=20)
  parser.add_argument("--n", type=int, default=4)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--tol", type=float, default=1e-4,
                      help="--validate: largest max rel error that passes")
  args = parser.parse_args(argv)
  (sweep if args.sweep else validate if args.validate else memory_table)(args)


if __name__ == "__main__":
  main()
