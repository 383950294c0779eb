"""Benchmark: on two cores, do two single-threaded processes train more steps per second than
one process with both cores? For the cpu comparison's model: whether its seeds should run
side by side.

    python -m experiments.bench_processes [--preset cpu] [--arm prenorm] [--steps 30]
        [--gin_param 'ModelConfig.num_layers = 2']

(a) One process on two cores, XLA's default threads, trains runs one after another; a second
run in the same process would compile (or read the compilation cache) and then step at the
same rate, so it times both runs' steps (2 x `--steps`) as one stretch.
(b) Two processes, each pinned to one of those cores (`os.sched_setaffinity`) with XLA's
multi-threaded Eigen off (`--xla_cpu_multi_thread_eigen=false`; the
`intra_op_parallelism_threads=1` often written beside it is TensorFlow's, and XLA_FLAGS
ignores it), train one run each at once, `--steps` steps.

Each process builds the preset's `Trainer` for the arm (`experiments/arms.py`: a variant, an
ablation, a matched pre-norm), compiles and warms up, then waits for a common start, so only
steps are timed: the real `train_step` on one fixed random batch, as `bench_train_step` times
it (no data pipeline, evaluation or checkpoints: those differ between runs, not between the
two ways of running them). A way's throughput is all its steps over the time from its start
to its last process's end. The last line is (b)'s over (a)'s, both measured in this one
invocation; on a shared machine, run it twice.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from experiments.arms import arm_configs, arm_facts, parse_arm
from experiments.bench_train_step import timed_step
from experiments.compare_residuals import load_settings
from experiments.runs import devices_for
from mhc_jax.checks import one_line
from mhc_jax.lm.train_state import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
ONE_THREAD_FLAG = "--xla_cpu_multi_thread_eigen=false"
READY = "ready"  # a worker's line once it is compiled and warmed up; then it waits for a line


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="cpu", help="a comparison preset (default: cpu)")
  parser.add_argument("--arm", default="prenorm", help="the arm trained (default: prenorm)")
  parser.add_argument("--steps", type=int, default=30,
                      help="timed steps per run (default: 30)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding applied after the preset (repeatable)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # the cores of one worker process
  return parser.parse_args(argv)


def run_configs(args) -> tuple[dict, dict]:
  """-> (train's configs of the arm at the preset, the arm's facts); raises for bad input."""
  if args.steps < 1:
    raise ValueError(f"--steps must be >= 1, got {args.steps}")
  settings = load_settings(args.preset, args.gin_param)
  base = {name: getattr(settings, name) for name in ("model", "data", "optimizer", "mesh",
                                                      "loop")}
  arm, streams = parse_arm(args.arm), settings.comparison.num_streams
  return arm_configs(arm, base, streams), arm_facts(arm, base, streams)


def worker(args) -> None:
  """One process's run: pinned, built, warmed up, then after the start line its timed steps;
  prints their start and end times and the cores it ran on as JSON."""
  os.sched_setaffinity(0, {int(core) for core in args.worker.split(",")})
  configs, _ = run_configs(args)
  data = configs["data"]
  trainer = Trainer(configs["model"], configs["optimizer"], configs["mesh"], configs["loop"],
                    data.batch_size, devices=devices_for(configs["mesh"]))
  # Token values do not change the work of a step.
  tokens = np.random.default_rng(0).integers(0, configs["model"].vocab_size,
                                             (data.batch_size, data.seq_len + 1), np.int32)
  run = {"trainer": trainer, "state": trainer.init_state(),
         "batch": trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})}
  for _ in range(2):  # the compile, then one step at speed
    timed_step(run)
  print(READY, flush=True)
  sys.stdin.readline()
  start = time.time()
  for _ in range(args.steps):
    timed_step(run)
  print(json.dumps({"start": start, "end": time.time(), "steps": args.steps,
                    "cores": sorted(os.sched_getaffinity(0))}), flush=True)


def run_at_once(workers: list[tuple[list[int], int]], args, env: dict) -> list[dict]:
  """Starts a worker per (cores, steps), all with `env`; once every one is ready, lets them
  step together. -> each one's times and steps."""
  passed = [arg for binding in args.gin_param for arg in ("--gin_param", binding)]
  passed += ["--preset", args.preset, "--arm", args.arm]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.bench_processes", "--worker",
       ",".join(map(str, cores)), "--steps", str(steps), *passed],
      cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
      for cores, steps in workers]
  for proc, (cores, _) in zip(procs, workers):
    if proc.stdout.readline().strip() != READY:
      raise RuntimeError(f"the worker on cores {cores} exited with {proc.wait()} before it was "
                         "ready (its error is above)")
  for proc in procs:  # the common start
    proc.stdin.write("go\n")
    proc.stdin.flush()
  results = [proc.communicate()[0] for proc in procs]
  for proc, (cores, _) in zip(procs, workers):
    if proc.returncode:
      raise RuntimeError(f"the worker on cores {cores} exited with {proc.returncode} (its error "
                         "is above)")
  return [json.loads(out.strip().splitlines()[-1]) for out in results]


def steps_per_second(results: list[dict]) -> float:
  """All the steps of processes that ran at once, over their common stretch."""
  return (sum(r["steps"] for r in results)
          / (max(r["end"] for r in results) - min(r["start"] for r in results)))


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.worker is not None:
    worker(args)
    return 0
  cores = sorted(os.sched_getaffinity(0))[:2]
  try:
    if len(cores) < 2:
      raise ValueError(f"this process may use {len(cores)} core (os.sched_getaffinity): run it "
                       "where it may use two")
    _, facts = run_configs(args)
  except Exception as err:  # gin and the configs raise many types; each means a bad setting
    print(f"bench_processes: {one_line(err)}", file=sys.stderr)
    return 2
  print(f"Train steps of the {args.preset} preset's {facts['arm']} ({facts['parameters']:,} "
        f"parameters, d_model {facts['d_model']}), {args.steps} timed steps a run, compile and "
        f"warm-up excluded, on cores {cores[0]} and {cores[1]}", flush=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  one = steps_per_second(run_at_once([(cores, 2 * args.steps)], args, env))
  print(f"(a) one process on both cores, 2 runs one after another: {one:.2f} steps/s",
        flush=True)
  single = {**env, "XLA_FLAGS": f"{env.get('XLA_FLAGS', '')} {ONE_THREAD_FLAG}".strip()}
  each = run_at_once([([core], args.steps) for core in cores], args, single)
  two = steps_per_second(each)
  alone = ", ".join(f"{r['steps'] / (r['end'] - r['start']):.2f} on core(s) "
                    f"{','.join(map(str, r['cores']))}" for r in each)
  print(f"(b) two processes of one core each, 2 runs at once: {two:.2f} steps/s in all "
        f"({alone})")
  print(f"(b) / (a): {two / one:.2f}x the total throughput")
  return 0


if __name__ == "__main__":
  sys.exit(main())
