"""Benchmark: greedy decoding with the KV cache against recomputing the whole window per token.

    python -m experiments.bench_decode [--variants prenorm,mhc] [--batch 8] [--prompt 128]
        [--new 128] [--d_model 256] [--layers 6] [--repeats 3]

For each residual variant, a fresh model (d_model x layers, heads of 64, MLP 4 d_model)
continues `batch` random prompts of `prompt` tokens by `new` greedy tokens twice:
`mhc_jax.lm.generate` (one prefill, then one jitted step per token reading the cache), and the
recomputation a model without a cache needs (the full forward over the padded window of
prompt + new tokens for every new token: one compiled program, O(T^2) work). Times are the
median of `--repeats` warm runs (compilation excluded: both compile once first); the tokens of
the two must agree, and the table says whether they do. The last column is each variant's
cached time per token over pre-norm's, measured in the same run.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.lm import generate
from mhc_jax.lm.model import ModelConfig, Transformer


def recompute_greedy(model: Transformer, prompts: np.ndarray, new: int) -> np.ndarray:
  """Greedy continuation by a full forward over the whole window for every new token."""
  graphdef, state = nnx.split(model)
  batch, prompt = prompts.shape

  @jax.jit
  def step(state, tokens, position):
    logits = nnx.merge(graphdef, state)(tokens)
    chosen = jnp.argmax(logits[:, position - 1], axis=-1).astype(jnp.int32)
    return tokens.at[:, position].set(chosen)

  tokens = jnp.zeros((batch, prompt + new), jnp.int32).at[:, :prompt].set(prompts)
  for position in range(prompt, prompt + new):
    tokens = step(state, tokens, position)
  return np.asarray(tokens[:, prompt:])


def median_seconds(fn, repeats: int):
  result = fn()  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="prenorm,mhc")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  prompts = np.random.default_rng(0).integers(0, 256, (args.batch, args.prompt)).astype(np.int32)
  print(f"greedy decoding, batch {args.batch}, prompt {args.prompt} + {args.new} new tokens, "
        f"d_model {args.d_model} x {args.layers} layers, float32, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}; median of {args.repeats} warm runs")
  print("| variant | cached s | recomputed s | speed-up | same tokens | cached ms/token | "
        "vs prenorm |")
  print("|---|---:|---:|---:|---|---:|---:|")
  per_token = {}
  for variant in args.variants.split(","):
    cfg = ModelConfig(residual=variant, d_model=args.d_model, num_layers=args.layers,
                      num_heads=args.d_model // 64, mlp_dim=4 * args.d_model)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    cached, cached_tokens = median_seconds(
        lambda: generate(model, list(prompts), args.new), args.repeats)
    recomputed, recomputed_tokens = median_seconds(
        lambda: recompute_greedy(model, prompts, args.new), args.repeats)
    same = all(np.array_equal(a, b) for a, b in zip(cached_tokens, recomputed_tokens))
    per_token[variant] = cached / args.new
    baseline = per_token.get("prenorm")
    versus = f"{per_token[variant] / baseline:.2f}x" if baseline else "-"
    print(f"| {variant} | {cached:.2f} | {recomputed:.2f} | {recomputed / cached:.1f}x | "
          f"{'yes' if same else 'NO'} | {1e3 * per_token[variant]:.2f} | {versus} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
