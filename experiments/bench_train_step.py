"""Benchmark: training step time and memory of the residual variants of one model.

    python -m experiments.bench_train_step [--d_model 256] [--layers 6] [--seq 256]
        [--batch 16] [--steps 10] [--variants prenorm,hc,hc_static,mhc,mhc_sinkhorn1,mhc_lite]
        [--remat none,minimal,full]

Times the real `Trainer.train_step` (forward, backward, clipping, AdamW update, non-finite
guard) on random token batches, float32, scanned layers, on whatever device JAX picked, and
reads the compiled step's temporary bytes from its memory analysis, for every variant under
every remat policy given. Every number is also given as a ratio to `prenorm` without remat,
measured in the same run (it is always measured).
"""

import argparse
import time

import jax
import numpy as np

from mhc_jax.lm.model import REMAT_POLICIES, ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train_state import LoopConfig, Trainer

VOCAB = 258  # the byte-level vocabulary the LM trains with
NUM_STREAMS = 4
# Every registered residual, then ablations that each change one thing, so the rows isolate
# what a cost comes from.
VARIANTS = {
    **{name: dict(residual=name, num_streams=NUM_STREAMS) for name in RESIDUALS},
    "hc_static": dict(residual="hc", num_streams=NUM_STREAMS, hc_dynamic=False),
    "mhc_sinkhorn1": dict(residual="mhc", num_streams=NUM_STREAMS, sinkhorn_iters=1),
}
BASELINE = ("prenorm", "none")


def build(variant: str, remat: str, args):
  """-> (trainer, initial state, one device batch) for `variant` on the first device."""
  model = ModelConfig(vocab_size=VOCAB, d_model=args.d_model, num_layers=args.layers,
                      num_heads=args.heads, mlp_dim=args.mlp_dim, dtype="float32",
                      remat=remat, **VARIANTS[variant])
  # LoopConfig.steps only sets the learning-rate schedule's length, not the work of a step.
  trainer = Trainer(model, OptimizerConfig(), MeshConfig(), LoopConfig(steps=args.steps + 1),
                    args.batch, devices=jax.devices()[:1])
  # One fixed batch, the same for every variant: token values do not change the work.
  tokens = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.seq + 1), np.int32)
  batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  return trainer, trainer.init_state(), batch


def temp_bytes(trainer: Trainer, args) -> int:
  # A second compile of the same step: jit keeps its executables to itself.
  compiled = trainer.lower_train_step(args.seq, args.batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def timed_step(run) -> float:
  """One train step of `run` (a dict holding trainer, state, batch); -> seconds."""
  start = time.perf_counter()
  # The step donates its state, so the new state must replace the old one.
  run["state"], metrics = run["trainer"].train_step(run["state"], run["batch"])
  jax.block_until_ready((run["state"], metrics))
  return time.perf_counter() - start


def measure(rows: list[tuple[str, str]], args) -> dict[tuple[str, str], dict]:
  """Builds and warms up every (variant, remat) row, then times them round-robin: on a shared
  machine the load from other jobs drifts over minutes, and this spreads it over every row."""
  runs = {}
  for variant, remat in rows:
    trainer, state, batch = build(variant, remat, args)
    runs[variant, remat] = {"trainer": trainer, "state": state, "batch": batch, "times": [],
                     "params": trainer.num_params, "temp_bytes": temp_bytes(trainer, args)}
    timed_step(runs[variant, remat])  # compile and warm up
  for _ in range(args.steps):
    for run in runs.values():
      run["times"].append(timed_step(run))
  return {name: {"params": run["params"], "seconds": float(np.median(run["times"])),
                 "temp_bytes": run["temp_bytes"]} for name, run in runs.items()}


def print_table(results: dict[tuple[str, str], dict], args) -> None:
  base = results[BASELINE]
  print(f"Train step (fwd+bwd+AdamW), d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, mlp {args.mlp_dim}, seq {args.seq}, batch {args.batch}, float32, "
        f"n={NUM_STREAMS}, on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.steps}")
  header = f"| {'variant':<13} | {'remat':<7} | {'params':>9} | {'step ms':>8} | " \
           f"{'vs prenorm':>10} | {'overhead':>8} | {'temp MiB':>8} | {'vs prenorm':>10} |"
  print(header)
  print("|" + "|".join("-" * len(col) for col in header.split("|")[1:-1]) + "|")
  for (name, remat), r in results.items():
    ratio = r["seconds"] / base["seconds"]
    print(f"| {name:<13} | {remat:<7} | {r['params']:>9,} | {r['seconds'] * 1e3:8.1f} | "
          f"{ratio:9.2f}x | "
          f"{(ratio - 1) * 100:7.1f}% | {r['temp_bytes'] / 2**20:8.1f} | "
          f"{r['temp_bytes'] / base['temp_bytes']:9.2f}x |")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--mlp_dim", type=int, default=1024)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma list of {', '.join(VARIANTS)}")
  parser.add_argument("--remat", default="none",
                      help=f"comma list of remat policies ({', '.join(REMAT_POLICIES)})")
  args = parser.parse_args(argv)

  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  policies = [r.strip() for r in args.remat.split(",") if r.strip()]
  for name, given, allowed in (("variant", variants, VARIANTS),
                               ("remat policy", policies, REMAT_POLICIES)):
    unknown = sorted(set(given) - set(allowed))
    if unknown:
      parser.error(f"unknown {name}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
  # The baseline runs first so every ratio has its denominator.
  rows = [(v, r) for v in dict.fromkeys(variants) for r in dict.fromkeys(policies)]
  print_table(measure([BASELINE] + [row for row in rows if row != BASELINE], args), args)


if __name__ == "__main__":
  main()
