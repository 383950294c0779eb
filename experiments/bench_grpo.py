"""Benchmark: GRPO throughput per residual variant, rollout tokens/s and the learner's step time.

    python -m experiments.bench_grpo [--variants prenorm,hc,mhc,mhc_lite] [--steps 12]
        [--d_model 64] [--layers 4] [--group_size 8] [--prompts_per_step 4] [--new 4]

(In the `[rl]` environment; on one device.) For each variant, a model of d_model x layers (n = 4 streams,
heads of 16) is trained 1 step on the word problems (experiments/word_problems.py: its
weights are near their initialisation, which draws as fast as trained ones) and post-trained
`--steps` GRPO steps with `mhc_jax.lm.grpo.post_train` on zero-shot prompts of the problems.
Per step, metrics.jsonl holds `rollout_tokens_per_sec` (completion tokens drawn per second of
the rollout) and `step_time` (rollout, rewards, the reference's log-probabilities and the
update); the table gives their medians over the steps after the first two (which compile),
and each variant's over pre-norm's, measured in the same run.
"""

import argparse
import pathlib
import statistics
import tempfile

import jax

from experiments import word_problems
from mhc_jax.lm import grpo
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.metrics import read_metrics
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import with_residual
from mhc_jax.lm.tokenizer import VOCAB_SIZE
from mhc_jax.lm.train import LoopConfig, train

WARM_STEPS = 2  # the steps that compile


def measure(folder: pathlib.Path, variant: str, args, prompts: pathlib.Path,
            source: str) -> dict:
  """One variant's medians: rollout tokens/s and step seconds."""
  model = with_residual(ModelConfig(vocab_size=VOCAB_SIZE, d_model=args.d_model,
                                    num_layers=args.layers, num_heads=args.d_model // 16,
                                    mlp_dim=4 * args.d_model), variant, num_streams=4)
  start = folder / f"{variant}_start"
  train(str(start), model=model, data=DataConfig(source=source, seq_len=256, batch_size=8),
        loop=LoopConfig(steps=1, eval_every=10, checkpoint_every=1, log_every=1,
                        sample_tokens=0), devices=jax.devices()[:1], progress=False)
  config = grpo.GRPOConfig(prompts=str(prompts), group_size=args.group_size,
                           prompts_per_step=args.prompts_per_step, steps=args.steps,
                           max_new_tokens=args.new, max_prompt_length=128)
  grpo.post_train(str(folder / variant), str(start), config,
                  OptimizerConfig(learning_rate=1e-4, warmup_steps=0), progress=False,
                  devices=jax.devices()[:1])
  rows = read_metrics(folder / variant)[WARM_STEPS:]
  return {key: statistics.median(row[key] for row in rows)
          for key in ("rollout_tokens_per_sec", "step_time")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="prenorm,hc,mhc,mhc_lite")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--group_size", type=int, default=8)
  parser.add_argument("--prompts_per_step", type=int, default=4)
  parser.add_argument("--new", type=int, default=4, help="tokens per completion at most")
  args = parser.parse_args(argv)
  if args.steps <= WARM_STEPS:
    parser.error(f"--steps must be more than {WARM_STEPS}, the steps that compile")
  task = word_problems.make_task(word_problems.TaskConfig(num_train=600, num_test=20))
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    source = word_problems.write_documents(task.train, folder / "task", 30)
    prompts = word_problems.write_prompts(task.train, folder / "prompts.jsonl")
    results = {v: measure(folder, v, args, prompts, source) for v in args.variants.split(",")}
  base = results.get("prenorm", next(iter(results.values())))
  print(f"GRPO, d_model {args.d_model} x {args.layers} layers, {args.prompts_per_step} prompts "
        f"x {args.group_size} completions of up to {args.new} tokens; medians of steps "
        f"{WARM_STEPS + 1}..{args.steps}")
  print("| variant | rollout tokens/s | step time (s) | tokens/s vs prenorm | step time vs "
        "prenorm |")
  print("|---|---:|---:|---:|---:|")
  for variant, r in results.items():
    print(f"| {variant} | {r['rollout_tokens_per_sec']:.0f} | {r['step_time']:.3f} | "
          f"{r['rollout_tokens_per_sec'] / base['rollout_tokens_per_sec']:.2f}x | "
          f"{r['step_time'] / base['step_time']:.2f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
