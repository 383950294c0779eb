"""Benchmark: `mhc_jax.lm.generate` against Hugging Face transformers' `generate` on the same
Qwen3-shaped checkpoint, greedy, both on the CPU.

    python -m experiments.bench_hf_generate [--batches 1,8] [--prompt 128] [--new 128]
        [--hidden 512] [--layers 6] [--heads 8] [--kv_heads 4] [--vocab 16384] [--repeats 3]

Needs torch and transformers, which the project does not (`pip install -e '.[compare]'`, in an
environment of its own). transformers builds a Qwen3ForCausalLM (grouped-query attention,
q/k RMSNorm, tied embeddings, an MLP of 3 hidden) with random weights drawn at std
1/sqrt(hidden), so that every layer moves the logits and greedy tokens depend on the
context, and saves it with `save_pretrained` (safetensors) in a temporary folder; both load
that folder. For each batch, random prompts of `prompt` tokens are continued by exactly `new`
greedy tokens: by `mhc_jax.lm.generate` (float32, a prefill then one jitted step per token
reading the KV cache) and by transformers' `generate` (float32, its defaults: SDPA attention
and the dynamic cache, under `torch.inference_mode`). Times are the median of `--repeats`
warm runs, the two alternating (JAX's compilation and torch's first call excluded); the
tokens must be identical (the row says so, and the run fails after printing it when they are
not). A row is printed as soon as it is measured.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from mhc_jax.lm import generate, load_hf_checkpoint


def paired_medians(ours, theirs, repeats: int):
  """(median seconds of `ours`, of `theirs`, the last result of each) over `repeats` warm calls
  after an untimed first one each (JAX compiles, torch warms up), the two alternating so that
  both see the same load on a shared machine."""
  results = [ours(), theirs()]
  times = ([], [])
  for _ in range(repeats):
    for i, fn in enumerate((ours, theirs)):
      start = time.perf_counter()
      results[i] = fn()
      times[i].append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1]), *results


def first_difference(ours: np.ndarray, theirs: np.ndarray) -> str:
  """Where two `[batch, new]` token arrays first differ: "row r, token t"; "" if nowhere."""
  rows, tokens = np.nonzero(ours != theirs)
  return f"row {rows[0]}, token {tokens[0]}" if len(rows) else ""


def build_checkpoint(folder: str, args) -> None:
  """A random Qwen3ForCausalLM of the arguments' shape, saved in `folder`."""
  import torch
  from transformers import Qwen3Config, Qwen3ForCausalLM

  torch.manual_seed(0)
  config = Qwen3Config(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
      max_position_embeddings=args.prompt + args.new, tie_word_embeddings=True,
      initializer_range=args.hidden ** -0.5)
  Qwen3ForCausalLM(config).save_pretrained(folder)


def hf_greedy(model, prompts: np.ndarray, new: int) -> np.ndarray:
  """transformers' greedy continuation of `prompts` `[batch, prompt]` by exactly `new` tokens."""
  import torch

  tokens = torch.from_numpy(prompts.astype(np.int64))
  with torch.inference_mode():
    out = model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                         max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                         pad_token_id=0)
  return out[:, prompts.shape[1]:].numpy()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--vocab", type=int, default=16384)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  try:
    import torch
    import transformers
  except ImportError as err:
    print(f"bench_hf_generate: needs torch and transformers ({err.name} is missing): "
          "pip install -e '.[compare]' in an environment of its own", file=sys.stderr)
    return 2
  # Its notes on generation settings and its progress bars for saving and loading: no results.
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()

  with tempfile.TemporaryDirectory() as folder:
    build_checkpoint(folder, args)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_hf_checkpoint(folder)
  print(f"greedy decoding, Qwen3-shaped: hidden {args.hidden} x {args.layers} layers, "
        f"{args.heads} heads ({args.kv_heads} kv), vocab {args.vocab}, prompt {args.prompt} + "
        f"{args.new} new tokens, float32, {jax.devices()[0].device_kind}; jax {jax.__version__}"
        f", torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; median of {args.repeats} warm runs, alternating; load "
        f"average {os.getloadavg()[0]:.1f} at the start")
  print("| batch | mhc_jax s | transformers s | mhc_jax / transformers | same tokens | "
        "mhc_jax ms/token | transformers ms/token |")
  print("|---:|---:|---:|---:|---|---:|---:|")
  rng = np.random.default_rng(0)
  differ = []
  for batch in map(int, args.batches.split(",")):
    prompts = rng.integers(0, args.vocab, (batch, args.prompt)).astype(np.int32)
    our_time, their_time, our_tokens, their_tokens = paired_medians(
        lambda: np.stack(generate(ours, list(prompts), args.new)),
        lambda: hf_greedy(theirs, prompts, args.new), args.repeats)
    where = first_difference(our_tokens, their_tokens)
    if where:
      differ.append(f"batch {batch}: first at {where}")
    print(f"| {batch} | {our_time:.2f} | {their_time:.2f} | {our_time / their_time:.2f}x | "
          f"{'NO, ' + where if where else 'yes'} | {1e3 * our_time / args.new:.1f} | "
          f"{1e3 * their_time / args.new:.1f} |", flush=True)
  if differ:
    print(f"bench_hf_generate: greedy tokens differ ({'; '.join(differ)})", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
