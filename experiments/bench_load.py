"""Benchmark: loading a Hugging Face checkpoint, its time and the loading process's peak
resident memory, against transformers' `from_pretrained` of the same folder in the same run.

    python -m experiments.bench_load [--checkpoint DIR] [--torch_python PYTHON]
        [--retrofit mhc] [--repeats 3]

Without `--checkpoint`, a checkpoint of Qwen3-0.6B's exact shape (596,049,920 parameters,
random weights, bfloat16 safetensors) is made by transformers' `save_pretrained` in a
temporary folder, by `--torch_python` (a Python with torch and transformers, which this
project does not depend on: `python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install
torch transformers`). Nothing is downloaded.

Every row runs in a fresh process, since peak RSS (`VmHWM`) is a process's: transformers'
`from_pretrained(..., dtype=float32)`; `load_hf_checkpoint` (and then `retrofit`); the same
load over two processes (`jax.distributed`, one CPU device each, an fsdp=2 mesh), one row per
process. Ratios are to the model's float32 parameter bytes; "growth" is the peak over the
resident memory just before the load (the interpreter, torch or JAX already up); "held", the
parameters' bytes on the process's devices. Load times are the median over `--repeats`
processes of each, transformers' and ours alternating; peaks are the last run's. The last
line compares our logits with transformers' on 16 random tokens. Rows print as measured.
"""

import argparse
import json
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.lm import distributed, load_hf_checkpoint, retrofit
from mhc_jax.lm.sharding import MeshConfig, make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30
# Qwen3-0.6B's config.json, as far as it fixes the shape and the function.
QWEN3_0_6B = {
    "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "attention_bias": False, "use_sliding_window": False}
TOKENS = 16  # the logits check's sequence
PEAK = re.compile(r"VmHWM:\s+(\d+) kB")  # in /proc/self/status

# Run by `--torch_python`: makes the checkpoint (argv: "make", DIR, config JSON).
MAKE = """
import json, sys, torch, transformers
torch.manual_seed(0)
config = transformers.Qwen3Config(**json.loads(sys.argv[3]))
transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[2])
"""
# Run by `--torch_python`: the transformers row (argv: DIR, tokens .npy, logits .npy to write).
TRANSFORMERS = r"""
import json, re, sys, time
import numpy as np, torch, transformers
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
load_s = time.perf_counter() - start
peak = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
with torch.no_grad():
  logits = model(torch.from_numpy(np.load(sys.argv[2]))).logits.numpy()
np.save(sys.argv[3], logits)
held = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": load_s, "peak_rss": peak, "load_growth": peak - before,
                  "held_bytes": held}))
"""


def current_rss() -> int:
  return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
  """This process's peak resident bytes: the kernel's high-water mark of its memory. Not
  `ru_maxrss`, which a child starts with at its parent's resident size (as forked)."""
  return int(PEAK.search(pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024


def probe(argv) -> dict:
  """One load in this process (`--probe DIR`): its seconds, peak RSS and growth, the bytes
  this process's devices hold; after `--retrofit`, the peak again; with `--logits`, the
  largest difference from transformers' logits."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--probe", type=pathlib.Path, required=True)
  parser.add_argument("--retrofit")
  parser.add_argument("--logits", nargs=2, type=pathlib.Path, metavar=("TOKENS", "THEIRS"))
  parser.add_argument("--coordinator")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args(argv)
  if args.coordinator:  # before the backend starts
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  jnp.zeros(()).block_until_ready()  # the backend is up: part of the baseline
  mesh = make_mesh(MeshConfig(fsdp=jax.device_count())) if jax.process_count() > 1 else None
  before = current_rss()
  start = time.perf_counter()
  model = load_hf_checkpoint(args.probe, mesh=mesh)
  jax.block_until_ready(nnx.state(model))
  result = {"load_s": time.perf_counter() - start, "peak_rss": peak_rss(),
            "load_growth": peak_rss() - before,
            "held_bytes": sum(shard.data.nbytes for leaf in jax.tree.leaves(nnx.state(model))
                              for shard in leaf.addressable_shards)}
  if args.retrofit:
    widened = retrofit(model, args.retrofit)
    jax.block_until_ready(nnx.state(widened))
    result |= {"retrofit_peak_rss": peak_rss(), "retrofit_growth": peak_rss() - before}
  if args.logits:
    tokens, theirs = (np.load(path) for path in args.logits)
    result["logits_max_diff"] = float(np.abs(np.asarray(model(jnp.asarray(tokens))) -
                                             theirs).max())
  return result


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_probes(folder, flags: list[str], *, processes: int = 1) -> list[dict]:
  """`probe` of `folder` in `processes` fresh processes (one run, several processes through
  `jax.distributed`), each's result."""
  command = [sys.executable, "-m", "experiments.bench_load", "--probe", str(folder), *flags]
  if processes > 1:
    command += ["--coordinator", f"localhost:{free_port()}", "--num_processes", str(processes)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(command + (["--process_id", str(i)] if processes > 1 else []),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(processes)]
  outputs = [proc.communicate(timeout=600) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    if proc.returncode:
      raise RuntimeError(f"the probe exited with {proc.returncode}: {err.strip()[-2000:]}")
  return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def run_torch(torch_python: str, script: str, *args) -> str:
  done = subprocess.run([torch_python, "-c", script, *map(str, args)], capture_output=True,
                        text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"{torch_python} exited with {done.returncode}: "
                       f"{done.stderr.strip()[-2000:]}")
  return done.stdout


def row(label: str, results: list[dict], float32_bytes: int, peak="peak_rss",
        growth="load_growth") -> str:
  seconds = statistics.median(r["load_s"] for r in results)
  last = results[-1]
  return (f"| {label} | {seconds:.2f} | {last[peak] / GIB:.2f} | "
          f"{last[peak] / float32_bytes:.2f}x | {last[growth] / GIB:.2f} | "
          f"{last['held_bytes'] / GIB:.2f} |")


def main(argv=None) -> int:
  if argv is None:
    argv = sys.argv[1:]
  if "--probe" in argv:  # a row's own process
    print(json.dumps(probe(argv)), flush=True)
    return 0
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", type=pathlib.Path,
                      help="a Hugging Face Llama / Qwen3 folder (default: make Qwen3-0.6B's "
                           "shape with --torch_python)")
  parser.add_argument("--torch_python", default="/tmp/torchenv/bin/python",
                      help="a Python with torch and transformers")
  parser.add_argument("--retrofit", default="mhc", help="the variant of the retrofit row")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if not pathlib.Path(args.torch_python).is_file():
    parser.error(f"--torch_python {args.torch_python} does not exist: make it with python3 -m "
                 "venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch transformers")
  if args.checkpoint is not None and not (args.checkpoint / "config.json").is_file():
    parser.error(f"--checkpoint {args.checkpoint} holds no config.json")
  with tempfile.TemporaryDirectory(prefix="bench_load_") as scratch:
    scratch = pathlib.Path(scratch)
    folder = args.checkpoint
    if folder is None:
      folder = scratch / "qwen3-0.6b"
      start = time.perf_counter()
      run_torch(args.torch_python, MAKE, "make", folder, json.dumps(QWEN3_0_6B))
      print(f"made {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    files = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    tokens, theirs = scratch / "tokens.npy", scratch / "logits.npy"
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    np.save(tokens, np.random.default_rng(0).integers(0, vocab, (1, TOKENS)).astype(np.int32))
    reference, ours = [], []
    for _ in range(args.repeats):  # alternating: a busy machine slows both alike
      reference.append(json.loads(run_torch(args.torch_python, TRANSFORMERS, folder, tokens,
                                            theirs).strip().splitlines()[-1]))
      ours += run_probes(folder, ["--retrofit", args.retrofit])
    float32_bytes = reference[-1]["held_bytes"]
    print(f"{folder.name}: {float32_bytes // 4:,} parameters, {float32_bytes / GIB:.2f} GiB in "
          f"float32, safetensors {files / GIB:.2f} GiB; {os.cpu_count()} CPUs; load time median "
          f"of {args.repeats}, the two alternating")
    print("| load | s | peak RSS GiB | x float32 bytes | growth GiB | held GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("transformers from_pretrained(dtype=float32)", reference, float32_bytes),
          flush=True)
    print(row("mhc_jax load_hf_checkpoint", ours, float32_bytes), flush=True)
    print(row(f"then retrofit(model, {args.retrofit!r})", ours, float32_bytes,
              "retrofit_peak_rss", "retrofit_growth"), flush=True)
    for i, result in enumerate(run_probes(folder, [], processes=2)):
      print(row(f"2 processes, fsdp=2: process {i}", [result], float32_bytes), flush=True)
    [checked] = run_probes(folder, ["--logits", str(tokens), str(theirs)])
    slowest = statistics.median(r["load_s"] for r in ours)
    fastest = statistics.median(r["load_s"] for r in reference)
    print(f"\nload time {slowest / fastest:.2f}x transformers'; logits within "
          f"{checked['logits_max_diff']:.2g} of transformers' (max |logit| "
          f"{np.abs(np.load(theirs)).max():.3g})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
