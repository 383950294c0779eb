"""Sampling from a trained model, to see what it learned, through `generate` (`decode.py`, the
KV cache)."""

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from mhc_jax.checks import check_int
from mhc_jax.lm.decode import generate
from mhc_jax.lm.tokenizer import decode, encode


def sample_text(model, prompt: str, *, num_tokens: int, context: int, temperature: float = 0.8,
                seed: int = 0, encode: Callable[[str], np.ndarray] = encode,
                decode: Callable[[list[int]], str] = decode) -> str:
  """`prompt` continued by `num_tokens` sampled tokens (`sample_tokens`), decoded and made
  `printable` for a log.

  `encode` / `decode`: the corpus's tokenizer (`Corpus.encode`, `Corpus.decode`); bytes by
  default."""
  tokens = sample_tokens(model, encode(prompt), num_tokens=num_tokens, context=context,
                         temperature=temperature, seed=seed)
  return printable(decode(tokens))


def sample_tokens(model, prompt: Sequence[int], *, num_tokens: int, context: int,
                  temperature: float = 0.8, seed: int = 0) -> list[int]:
  """The prompt's token ids followed by `num_tokens` more, each drawn from the model's
  logits / `temperature` (0: the argmax) by `generate`, the model reading at most `context`
  tokens (the length it was trained on): the end of the text that fits is prefilled, and
  once the text outgrows the context its last half is prefilled again and decoding goes on,
  so a text of any length costs one prefill per context / 2 new tokens."""
  check_int("num_tokens", num_tokens)
  check_int("context", context)
  tokens = [int(t) for t in prompt]
  end, window = len(tokens) + num_tokens, tokens[-context:]
  for round_ in itertools.count():
    # The round's last token is drawn, never read: the window and all but one new token fit.
    # Every round after the first makes as many (the last drops what it does not need), so
    # they share their programs.
    room = context - len(window) + 1
    new = room if round_ else min(end - len(tokens), room)
    # A stream of draws of its own per round: `seed` itself for the first.
    round_seed = seed if round_ == 0 else int(np.random.SeedSequence([seed, round_])
                                              .generate_state(1)[0] >> 1)
    tokens += generate(model, [window], new, temperature=temperature, seed=round_seed,
                       context=context)[0][:end - len(tokens)].tolist()
    if len(tokens) == end:
      break
    window = tokens[-((context + 1) // 2):]
  return tokens


def printable(text: str) -> str:
  """`text` with every character `str.isprintable` rejects, other than newline and tab,
  escaped as Python writes it (`\\x07`, `\\u200b`).

  An undertrained byte model samples control bytes; printed raw, they garble the terminal
  and make `grep` treat the training log as binary. Newlines and tabs stay: they are the
  layout of the verse, which is what a reader of a sample judges."""
  return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode()
                 for c in text)
