"""`mhc-generate`: a trained model continues text prompts, decoded with its own tokenizer.

    mhc-generate --from workdirs/shakespeare_tiny --prompt 'ROMEO.'
    mhc-generate --from Qwen3-0.6B/ --prompts_file prompts.txt --temperature 0

--from is a workdir of mhc-train (its latest complete checkpoint, its corpus's tokenizer, the
context it was trained on) or a Hugging Face Llama / Qwen3 folder (its tokenizer.json and
max_position_embeddings): `inference.load`. The prompts, one --prompt or a file's lines,
continue in one batch of `mhc_jax.lm.generate` (the KV cache). Only the continuations go to
stdout, control characters escaped; of several prompts, each after a header line
`==> prompt I of N: PROMPT <==`, as `head` marks several files. Exit 0, or 2 for bad input,
in one line naming the argument, before anything is decoded.
"""

import argparse
import math
import pathlib
import sys

import numpy as np

from mhc_jax.checks import one_line
from mhc_jax.lm import inference
from mhc_jax.lm.decode import generate
from mhc_jax.lm.sample import printable

PROG = "mhc-generate"


class OneLineParser(argparse.ArgumentParser):
  """argparse's errors as every other error of the command: one line, exit 2 (not the usage
  block first)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: {message}\n")


def number(convert, accepts, what: str):
  """An argparse `type`: the text converted, or its error saying what the value must be."""
  def parse(text: str):
    try:
      value = convert(text)
    except ValueError:
      value = None
    if value is None or not accepts(value):
      raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value
  return parse


COUNT = number(int, lambda v: v >= 1, "an int >= 1")
TEMPERATURE = number(float, lambda v: 0 <= v < math.inf, "a number >= 0 (0: greedy)")
PROBABILITY = number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
SEED = number(int, lambda v: v >= 0, "an int >= 0")


def parse_args(argv):
  parser = OneLineParser(prog=PROG, description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", metavar="DIR", required=True,
                      help="a workdir of mhc-train or a Hugging Face Llama / Qwen3 folder")
  prompts = parser.add_mutually_exclusive_group(required=True)
  prompts.add_argument("--prompt", metavar="TEXT", help="the text to continue")
  prompts.add_argument("--prompts_file", metavar="FILE", type=pathlib.Path,
                       help="one prompt a line (UTF-8), all continued in one batch")
  parser.add_argument("--max_new_tokens", type=COUNT, default=100,
                      help="tokens to add to each prompt (default: %(default)s); the prompt "
                           "and all but the last of them must fit the model's context")
  parser.add_argument("--temperature", type=TEMPERATURE, default=0.8,
                      help="logits / temperature are sampled; 0: greedy (default: %(default)s)")
  parser.add_argument("--top_k", type=COUNT, help="sample only among the k likeliest tokens")
  parser.add_argument("--top_p", type=PROBABILITY,
                      help="sample only among the likeliest tokens that together reach p")
  parser.add_argument("--seed", type=SEED, default=0,
                      help="fixes the draws: the same seed, the same continuations")
  parser.add_argument("--dtype", choices=inference.DTYPES, default="float32",
                      help="of the activations (parameters stay float32)")
  parser.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True,
                      help="stop a continuation at the tokenizer's end-of-text token "
                           "(default); --no-eos: always max_new_tokens")
  args = parser.parse_args(argv)
  if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
    parser.error("--top_k and --top_p shape sampling: give them a --temperature > 0 "
                 "(0 is greedy)")
  return args


def read_prompts(args) -> dict[str, str]:
  """Each prompt by the name its errors give it: --prompt, or its line of --prompts_file."""
  if args.prompt is not None:
    prompts = {"--prompt": args.prompt}
  else:
    path = args.prompts_file
    if not path.is_file():
      raise ValueError(f"--prompts_file {path} is not a file")
    try:
      lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
      raise ValueError(f"--prompts_file {path} is not UTF-8 text") from None
    if not lines:
      raise ValueError(f"--prompts_file {path} holds no prompt: write one a line")
    prompts = {f"--prompts_file line {i}": line for i, line in enumerate(lines, 1)}
  for name, text in prompts.items():
    if not text:
      raise ValueError(f"{name} is empty: a prompt needs some text to continue")
  return prompts


def check_fits(name: str, length: int, max_new_tokens: int, context: int) -> None:
  """One line unless a prompt of `length` tokens and its continuation fit the context."""
  if length > context:
    raise ValueError(f"{name} has {length} tokens, more than the model's context of {context}")
  # The last new token is drawn, never read: the model reads one token fewer than it makes.
  reads = length + max_new_tokens - 1
  if reads > context:
    raise ValueError(f"{name} has {length} tokens: with --max_new_tokens {max_new_tokens} the "
                     f"model reads {reads}, more than its context of {context}; lower "
                     "--max_new_tokens or shorten the prompt")


def added_text(tokenizer, prompt: np.ndarray, continuation: np.ndarray) -> str:
  """What the continuation adds to the prompt's text. Decoded after the prompt, not alone: a
  token's text can depend on the one before it (a sentencepiece-style tokenizer drops the
  space that starts a text)."""
  before = tokenizer.decode(prompt)
  whole = tokenizer.decode(np.concatenate([prompt, continuation]))
  # Not a prefix where the boundary splits a character: then the continuation alone.
  return whole[len(before):] if whole.startswith(before) else tokenizer.decode(continuation)


def report(prompts: dict[str, str], texts: list[str]) -> str:
  """The continuations as printed: one alone, several each after its header."""
  if len(texts) == 1:
    return printable(texts[0]) + "\n"
  return "\n".join(f"==> prompt {i} of {len(texts)}: {printable(prompt)} <==\n"
                   f"{printable(text)}\n"
                   for i, (prompt, text) in enumerate(zip(prompts.values(), texts), 1))


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    prompts = read_prompts(args)
    loaded = inference.load(args.source, dtype=args.dtype, argument="--from")
    tokens = [loaded.tokenizer.encode(text) for text in prompts.values()]
    for name, prompt in zip(prompts, tokens):
      check_fits(name, len(prompt), args.max_new_tokens, loaded.context)
    continuations = generate(
        loaded.model, tokens, args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_id=loaded.tokenizer.eos_id if args.eos else None)
  except ValueError as err:
    print(f"{PROG}: {one_line(err)}", file=sys.stderr)
    return 2
  texts = [added_text(loaded.tokenizer, p, c) for p, c in zip(tokens, continuations)]
  sys.stdout.write(report(prompts, texts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
