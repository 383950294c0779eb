"""Sampling from a trained model, to see what it learned."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.lm.tokenizer import decode, encode


def sample_text(model, prompt: str, *, num_tokens: int, context: int, temperature: float = 0.8,
                seed: int = 0, encode: Callable[[str], np.ndarray] = encode,
                decode: Callable[[list[int]], str] = decode) -> str:
  """Continues `prompt` by `num_tokens` tokens, re-reading the last `context` tokens each step
  (no KV cache: these models are small and this runs once per training run).

  `encode` / `decode`: the corpus's tokenizer (`Corpus.encode`, `Corpus.decode`); bytes by
  default."""
  tokens = list(encode(prompt))
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
  return decode(tokens)
