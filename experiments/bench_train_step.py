"""Benchmark: training step time and memory of the residual variants of one model.

    python -m experiments.bench_train_step [--d_model 256] [--layers 6] [--seq 256]
        [--batch 16] [--steps 10] [--variants prenorm,hc,hc_static,mhc,mhc_sinkhorn1,mhc_lite]
        [--remat none,minimal,full]

Times the real `Trainer.train_step` (forward, backward, clipping, AdamW update, non-finite
guard) on random token batches, float32, scanned layers, on whatever device JAX picked, and
reads the compiled step's temporary bytes from its memory analysis, for every variant under
every remat policy given. Every number is also given as a ratio to `prenorm` without remat
(always measured, first). Each row is printed as soon as it is measured; progress and the
estimated time left go to stderr.

Step-time ratios are paired: a row's steps are timed alternately with the baseline's, and the
ratio is that of their medians (the baseline's median is printed beside it). On a shared
machine the load drifts over minutes; steps timed side by side see the same load.
"""

import argparse
import time

import jax
import numpy as np

from experiments.bench_progress import RowProgress
from mhc_jax.lm.model import REMAT_POLICIES, ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import RESIDUALS, with_residual
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train_state import Trainer
from mhc_jax.lm.train import LoopConfig

VOCAB = 258  # the byte-level vocabulary the LM trains with
# Every registered residual, then ablations that each change one thing, so the rows isolate
# what a cost comes from.
VARIANTS = {
    **{name: (name, {}) for name in RESIDUALS},
    "hc_static": ("hc", dict(dynamic=False)),
    "mhc_sinkhorn1": ("mhc", dict(sinkhorn_iters=1)),
}
BASELINE = ("prenorm", "none")


def build(variant: str, remat: str, args):
  """-> (trainer, initial state, one device batch) for `variant` on the first device."""
  residual, settings = VARIANTS[variant]
  model = with_residual(
      ModelConfig(vocab_size=VOCAB, d_model=args.d_model, num_layers=args.layers,
                  num_heads=args.heads, mlp_dim=args.mlp_dim, dtype="float32", remat=remat),
      residual, **settings)  # each variant's own streams and fractions
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


def start(variant: str, remat: str, args) -> dict:
  """A row ready to time: its trainer, state and batch, compiled and warmed up."""
  trainer, state, batch = build(variant, remat, args)
  run = {"trainer": trainer, "state": state, "batch": batch, "params": trainer.num_params,
         "temp_bytes": temp_bytes(trainer, args)}
  timed_step(run)  # compile and warm up
  return run


def paired_seconds(run: dict, baseline: dict, steps: int) -> tuple[float, float]:
  """Median step seconds of `run` and of `baseline`, their steps timed alternately."""
  times, baseline_times = [], []
  for _ in range(steps):
    baseline_times.append(timed_step(baseline))
    times.append(timed_step(run))
  return float(np.median(times)), float(np.median(baseline_times))


HEADER = (f"| {'variant':<13} | {'remat':<7} | {'params':>9} | {'step ms':>8} | "
          f"{'prenorm ms':>10} | {'vs prenorm':>10} | {'overhead':>8} | {'temp MiB':>8} | "
          f"{'vs prenorm':>10} |")


def print_header(args) -> None:
  print(f"Train step (fwd+bwd+AdamW), d_model {args.d_model}, {args.layers} layers, "
        f"{args.heads} heads, mlp {args.mlp_dim}, seq {args.seq}, batch {args.batch}, float32, "
        f"each variant with its default settings (streams, fractions), "
        f"on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"median of {args.steps}, each row's steps alternating with prenorm's")
  print(HEADER)
  print("|" + "|".join("-" * len(col) for col in HEADER.split("|")[1:-1]) + "|", flush=True)


def print_row(name: str, remat: str, run: dict, seconds: float, baseline_seconds: float,
              baseline_temp_bytes: int) -> None:
  """One table row; `baseline_seconds`: the baseline's median over the same stretch of time."""
  ratio = seconds / baseline_seconds
  print(f"| {name:<13} | {remat:<7} | {run['params']:>9,} | {seconds * 1e3:8.1f} | "
        f"{baseline_seconds * 1e3:10.1f} | {ratio:9.2f}x | {(ratio - 1) * 100:7.1f}% | "
        f"{run['temp_bytes'] / 2**20:8.1f} | {run['temp_bytes'] / baseline_temp_bytes:9.2f}x |",
        flush=True)


def measure_and_print(rows: list[tuple[str, str]], args) -> None:
  """The baseline row (timed alone), then every other row, each printed when measured."""
  progress = RowProgress(len(rows), f"each built, compiled, warmed up and timed for "
                         f"{args.steps} steps, alternating with prenorm's")
  print_header(args)
  baseline = start(*BASELINE, args)
  seconds = float(np.median([timed_step(baseline) for _ in range(args.steps)]))
  print_row(*BASELINE, baseline, seconds, seconds, baseline["temp_bytes"])
  progress.row_done(" ".join(BASELINE))
  for variant, remat in rows[1:]:
    run = start(variant, remat, args)
    print_row(variant, remat, run, *paired_seconds(run, baseline, args.steps),
              baseline["temp_bytes"])
    progress.row_done(f"{variant} {remat}")
    del run  # its state and compiled step: only the baseline's stay alive


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
  measure_and_print([BASELINE] + [row for row in rows if row != BASELINE], args)


if __name__ == "__main__":
  main()
