"""Sampling from a trained model, to see what it learned, and greedy decoding of many prompts
at once, to score it on a task."""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.checks import check_int
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
  logits / `temperature` at the last position of the last `context` tokens (no KV cache:
  these models are small and this runs once per training run)."""
  check_int("num_tokens", num_tokens)
  check_int("context", context)
  if not temperature > 0:
    raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
  tokens = [int(t) for t in prompt]
  key = jax.random.key(seed)
  # The model goes in as an argument, not a closure: its scanned layers split the module
  # inside the trace, which a module from outside the trace does not allow.
  graphdef, state = nnx.split(model)
  logits_at = jax.jit(lambda state, ids, last: nnx.merge(graphdef, state)(ids)[0, last])
  # Right-padded to a fixed length so it compiles once; causal attention keeps the padding
  # invisible to the position whose logits are read.
  for _ in range(num_tokens):
    window = np.asarray(tokens[-context:], np.int32)
    padded = np.zeros((1, context), np.int32)
    padded[0, :len(window)] = window
    key, sub = jax.random.split(key)
    logits = logits_at(state, jnp.asarray(padded), len(window) - 1)
    tokens.append(int(jax.random.categorical(sub, logits / temperature)))
  return tokens


def printable(text: str) -> str:
  """`text` with every character `str.isprintable` rejects, other than newline and tab,
  escaped as Python writes it (`\\x07`, `\\u200b`).

  An undertrained byte model samples control bytes; printed raw, they garble the terminal
  and make `grep` treat the training log as binary. Newlines and tabs stay: they are the
  layout of the verse, which is what a reader of a sample judges."""
  return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode()
                 for c in text)


def greedy_continuations(model, prompts: Sequence[np.ndarray], num_tokens: int, *,
                         batch_size: int = 64) -> np.ndarray:
  """Token-id prompts (int `[len_i]` each, none empty) -> int32 `[len(prompts), num_tokens]`:
  each prompt continued by its most likely token, `num_tokens` times.

  Every batch is one compiled call: its prompts right-padded into a `[batch_size, longest +
  num_tokens]` buffer (causal attention keeps the padding invisible to the positions read),
  then a loop of `num_tokens` full forward passes (no KV cache), each writing every row's
  argmax after that row's tokens so far. The shapes depend only on the longest prompt, so all
  batches share one program; the last batch is filled up with copies of the first prompt."""
  check_int("num_tokens", num_tokens)
  check_int("batch_size", batch_size)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if not len(prompts) or lengths.min() == 0:
    raise ValueError("greedy_continuations needs at least one prompt and no empty one")
  rows = -(-len(prompts) // batch_size) * batch_size
  buffer = np.zeros((rows, lengths.max() + num_tokens), np.int32)
  for i, tokens in enumerate(prompts):
    buffer[i, :len(tokens)] = tokens
  buffer[len(prompts):, :lengths[0]] = prompts[0]
  lengths = np.concatenate([lengths, np.full(rows - len(prompts), lengths[0], np.int32)])
  graphdef, state = nnx.split(model)

  @jax.jit
  def continue_batch(state, buffer, lengths):  # [B, W], [B] -> [B, num_tokens]
    batch = jnp.arange(buffer.shape[0])

    def step(t, carry):
      # The parameters ride in the carry, to be the loop's own values: scanned layers split
      # the module inside the trace, which values from an outer trace do not allow.
      state, buffer = carry
      logits = nnx.merge(graphdef, state)(buffer)[batch, lengths - 1 + t]  # [B, vocab]
      return state, buffer.at[batch, lengths + t].set(jnp.argmax(logits, -1).astype(buffer.dtype))

    _, buffer = jax.lax.fori_loop(0, num_tokens, step, (state, buffer))
    return buffer[batch[:, None], lengths[:, None] + jnp.arange(num_tokens)]

  out = [continue_batch(state, buffer[b:b + batch_size], lengths[b:b + batch_size])
         for b in range(0, rows, batch_size)]
  return np.concatenate(jax.device_get(out))[:len(prompts)]
