"""Benchmark: pretraining-data rates on this host, against what one pod host consumes.

    python -m experiments.bench_data [--megabytes 32] [--bpe_megabytes 8] [--workers N]
        [--seconds 10] [--mfu 0.4] [--chip "TPU v5 lite"] [--hosts 32]

1. Preparation rate (tokens/s) of `mhc-prepare-data` on generated pseudo-verse, with the
   byte tokenizer and with a byte-level BPE of 8192 tokens trained here (no downloads).
2. Loader rate (tokens/s) of one process reading the prepared byte corpus as one host of
   the pod preset reads it: `tpu_pod_mhc.gin`'s DataConfig (global batch of batch_size rows
   of seq_len), shard 0 of `--hosts`.
3. Both against one host's consumption: the preset's tokens per step / hosts / step time,
   the step time assumed from the model's FLOPs per token at `--mfu` of `--chip`'s peak on
   `MeshConfig`'s chips (256).
"""

import argparse
import glob
import math
import os
import pathlib
import tempfile
import time

import numpy as np

from mhc_jax.lm import data, prepare_data, tokenizer
from mhc_jax.lm.flops import model_flops_per_token, peak_flops_per_device
from mhc_jax.lm.presets import parse

WORDS = ("thou art my lord and I thy humble servant for the king doth love whence comes this "
         "sweet sorrow that we shall say good night till it be morrow now is the winter of "
         "our discontent made glorious summer by this sun of york").split()


def write_verse(directory: pathlib.Path, megabytes: float, seed: int = 0) -> str:
  """Files of ~1 MB of pseudo-verse totalling `megabytes`; their glob."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True)
  words = np.array(WORDS)
  for f in range(math.ceil(megabytes)):
    lines = [" ".join(line) for line in rng.choice(words, (25_000, 7))]
    (directory / f"{f:04d}.txt").write_text("\n".join(lines)[:1 << 20])
  return str(directory / "*.txt")


def prepare_rate(out: pathlib.Path, pattern: str, tokenizer_spec: str, workers: int) -> float:
  start = time.perf_counter()
  metadata, _ = prepare_data.prepare(str(out), [pattern], tokenizer_spec, workers=workers)
  elapsed = time.perf_counter() - start
  return sum(s["tokens"] for s in metadata["splits"].values()) / elapsed


def loader_rate(out: pathlib.Path, config: data.DataConfig, hosts: int, seconds: float) -> float:
  """Tokens/s of one host's iterator (its rows of every global batch, inputs only)."""
  iterator = data.Corpus(data.DataConfig(
      source=f"arrayrecord:{out}", seq_len=config.seq_len, batch_size=config.batch_size,
      seed=config.seed)).train_iterator(shard_index=0, shard_count=hosts)
  next(iterator)  # readers open, threads start
  tokens, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    tokens += next(iterator)["inputs"].size
  return tokens / (time.perf_counter() - start)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--megabytes", type=float, default=32)
  parser.add_argument("--bpe_megabytes", type=float, default=8)
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument("--seconds", type=float, default=10)
  parser.add_argument("--mfu", type=float, default=0.4)
  parser.add_argument("--chip", default="TPU v5 lite")
  parser.add_argument("--hosts", type=int, default=32)
  args = parser.parse_args(argv)

  configs, _ = parse(["tpu_pod_mhc.gin"])
  pod, mesh = configs["data"], configs["mesh"]
  chips = mesh.data * mesh.fsdp * mesh.tensor
  step_tokens = pod.batch_size * pod.seq_len
  step_seconds = (step_tokens * model_flops_per_token(configs["model"], pod.seq_len)
                  / (args.mfu * peak_flops_per_device(args.chip) * chips))
  host_need = step_tokens / args.hosts / step_seconds
  print(f"pod (tpu_pod_mhc.gin): {pod.batch_size} x {pod.seq_len} = {step_tokens:,} tokens/step"
        f" on {chips} {args.chip} chips at {args.mfu:.0%} MFU: {step_seconds * 1e3:.0f} ms/step"
        f" (assumed) -> {host_need:,.0f} tokens/s per host of {args.hosts}")

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    text = write_verse(tmp / "text", args.megabytes)
    bpe_text = write_verse(tmp / "bpe_text", args.bpe_megabytes, seed=1)
    sample = (pathlib.Path(p).read_text() for p in sorted(glob.glob(bpe_text))[:2])
    bpe = str(tokenizer.train_bpe(sample, 8192, tmp / "tokenizer.json"))
    rows = [("prepare, bytes", prepare_rate(tmp / "bytes", text, "bytes", args.workers)),
            ("prepare, BPE 8192", prepare_rate(tmp / "bpe", bpe_text, bpe, args.workers)),
            ("load, bytes, one host", loader_rate(tmp / "bytes", pod, args.hosts, args.seconds))]
  print(f"{args.workers} worker(s) preparing, {os.cpu_count()} CPUs")
  for name, rate in rows:
    print(f"{name:24s} {rate:>14,.0f} tokens/s   {rate / host_need:8.1f} x one host's need")


if __name__ == "__main__":
  main()
