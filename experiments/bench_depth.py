"""Benchmark: how the train step's build time and memory grow with depth.

    python -m experiments.bench_depth [--depths 2,4,8,16] [--variants prenorm,hc,mhc]
        [--layouts scanned,unrolled] [--d_model 32] [--seq 64] [--batch 16] [--remat minimal]

For each residual variant, layer layout (`ModelConfig.scan_layers`) and depth, builds the real
`Trainer` train step (forward, backward, clipping, AdamW, non-finite guard) and reports the
seconds to trace and lower it, the seconds XLA takes to compile it, and the compiled program's
temporary bytes. Defaults are the stability preset's model (`gin_configs/compare/stability.gin`:
width 32, 2 heads, MLP 128, 64 x 16 tokens). Ratios are to the shallowest depth of the same
variant and layout, measured in the same run. Nothing is executed: build cost only. Each row
is printed when measured; progress and the estimated time left go to stderr.
"""

import argparse
import time

import jax

from experiments.bench_progress import RowProgress
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train_state import Trainer
from mhc_jax.lm.train import LoopConfig

LAYOUTS = {"scanned": True, "unrolled": False}


def build_cost(variant: str, scan_layers: bool, depth: int, args) -> dict:
  """-> seconds to lower and to compile the train step, and its temporary bytes."""
  model = ModelConfig(d_model=args.d_model, num_layers=depth, num_heads=args.heads,
                      mlp_dim=args.mlp_dim, residual=variant, scan_layers=scan_layers,
                      remat=args.remat)
  trainer = Trainer(model, OptimizerConfig(), MeshConfig(), LoopConfig(steps=10), args.batch,
                    devices=jax.devices()[:1])
  start = time.perf_counter()
  lowered = trainer.lower_train_step(args.seq, args.batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return {"lower": lowered_at - start, "compile": done - lowered_at,
          "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", default="2,4,8,16", help="comma list of block counts")
  parser.add_argument("--variants", default="prenorm,hc,mhc")
  parser.add_argument("--layouts", default="scanned,unrolled")
  parser.add_argument("--d_model", type=int, default=32)
  parser.add_argument("--heads", type=int, default=2)
  parser.add_argument("--mlp_dim", type=int, default=128)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--remat", default="minimal")
  args = parser.parse_args(argv)
  depths = [int(d) for d in args.depths.split(",")]
  variants, layouts = args.variants.split(","), args.layouts.split(",")
  for name, choices in (("variant", variants), ("layout", layouts)):
    allowed = RESIDUALS if name == "variant" else tuple(LAYOUTS)
    unknown = sorted(set(choices) - set(allowed))
    if unknown:
      parser.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")

  progress = RowProgress(len(variants) * len(layouts) * len(depths),
                         "each a train step lowered and compiled")
  print(f"Train-step build cost vs depth: d_model {args.d_model}, {args.heads} heads, mlp "
        f"{args.mlp_dim}, seq {args.seq}, batch {args.batch}, remat {args.remat}, float32, on "
        f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print("| variant | layout | blocks | lower s | compile s | build s | vs shallowest | "
        "temp MiB |")
  print("|---|---|---|---|---|---|---|---|")
  for variant in variants:
    for layout in layouts:
      first = None
      for depth in depths:
        cost = build_cost(variant, LAYOUTS[layout], depth, args)
        build = cost["lower"] + cost["compile"]
        first = first or build
        print(f"| {variant} | {layout} | {depth} | {cost['lower']:.2f} | {cost['compile']:.2f} "
              f"| {build:.2f} | {build / first:.2f}x | {cost['temp_bytes'] / 2**20:.2f} |",
              flush=True)
        progress.row_done(f"{variant} {layout} depth {depth}")


if __name__ == "__main__":
  main()
