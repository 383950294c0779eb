"""The project's `Transformer` as google-tunix's samplers and learners call a model: the policy
(and reference) of its GRPO (`tunix.rl.grpo.grpo_learner.GRPOLearner` on an `RLCluster`).

tunix (0.1.7) calls `model(tokens, positions, cache, attention_mask)` and reads back `(logits,
cache)`: with `cache=None` from the learner (`tunix.rl.common.compute_per_token_logps`: the
whole prompt + completion, `attention_mask` `[batch, seq, seq]`), and from its sampler
(`tunix.generate.sampler.Sampler`) with the cache `model.init_cache(batch, cache_size, dtype)`
made: a prefill of the left-padded prompts, then one token per row at a time, `attention_mask`
`[batch, seq, cache_size]` over the cache's slots. Its rollout reads `model.config.num_layers`,
`.num_kv_heads` and `.head_dim`, for a cache it builds only for a model without `init_cache`.

`Policy` runs those calls on `Transformer.__call__` and `Transformer.extend` with the project's
`KVCache`, whose slots are the sampler's token buffer's: prompt slots first, then one slot per
step. tunix's masks are causal over the real (not padding) tokens, which is what the model's
own masks are, so a call reads from `attention_mask` only whether each of its tokens is real:
the entry of the token's own slot. (A token tunix marks as padding, which nothing attends to,
still attends to itself here, so that its row of the softmax is not empty: its own logits
mean nothing either way.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.lm.model import KVCache, Transformer


class Policy(nnx.Module):
  """`model` behind tunix's model interface; its parameters are `model`'s (under `model/`), so
  training the policy trains the model."""

  def __init__(self, model: Transformer):
    self.model = model
    # What tunix's rollout reads: num_layers, head_dim, num_kv_heads (None: num_heads; only
    # a model without init_cache needs it) and dtype (the activations', a name).
    self.config = model.cfg

  @property
  def num_embed(self) -> int:
    """The vocabulary: the size of tunix's logits buffer when it keeps logits."""
    return self.model.cfg.vocab_size

  def init_cache(self, batch_size: int, cache_size: int, dtype=None) -> KVCache:
    """An empty cache of `cache_size` slots for `batch_size` rows. `dtype` (tunix's guess at
    the model's) is not used: the cache holds keys and values in the activations' dtype,
    the one `extend` writes."""
    del dtype
    return KVCache.empty(self.model.cfg, batch_size, cache_size)  # tunix's sampler donates it

  def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None,
               attention_mask: jax.Array, decode_only_last_token: bool = False):
    """`tokens` `[batch, seq]` at `positions`, after those `cache` holds (None: none, and none
    kept) -> (logits `[batch, seq, vocab]`, or the last token's `[batch, 1, vocab]` with
    `decode_only_last_token`; the cache holding the tokens too, or None)."""
    batch, seq = tokens.shape
    slots = seq if cache is None else cache.slots
    if attention_mask.shape != (batch, seq, slots):
      raise ValueError(f"attention_mask has shape {attention_mask.shape}; for {seq} tokens "
                       f"{'and no cache' if cache is None else f'and a cache of {slots} slots'}"
                       f" it must be {(batch, seq, slots)}")
    start = 0 if cache is None else cache.length
    real = own_entries(attention_mask, start)
    # Rebuilt in this trace: tunix's sampler merges the model outside the `while_loop` whose
    # body calls it, and scanned layers (`nnx.scan`) refuse variables of another trace.
    model = nnx.merge(*nnx.split(self.model), copy=True)
    if cache is None:
      logits = model(tokens, positions, real)
      return (logits[:, -1:] if decode_only_last_token else logits), None
    return model.extend(cache, tokens, positions, real, last_only=decode_only_last_token)


def own_entries(attention_mask: jax.Array, start) -> jax.Array:
  """`attention_mask` `[batch, seq, keys]` of tokens at key slots `start`.. -> `[batch, seq]`:
  each token's entry for its own slot, whether it is real (a padding token attends to
  nothing, not even itself)."""
  own = start + jnp.arange(attention_mask.shape[1])
  return jnp.take_along_axis(attention_mask, own[None, :, None], axis=2)[..., 0].astype(bool)


class TunixTokenizer:
  """A project tokenizer (`mhc_jax.lm.tokenizer`: bytes, or a Hugging Face tokenizer.json) as
  tunix's `TokenizerAdapter` takes one without its own type: `encode` to a list, and the
  special ids as methods. `pad_id`: the id that fills prompts and completions (the byte
  tokenizer's `PAD`); there is no beginning-of-sequence token."""

  def __init__(self, tokenizer, pad_id: int):
    self.tokenizer = tokenizer
    self._pad_id = pad_id

  def encode(self, text: str) -> list[int]:
    return np.asarray(self.tokenizer.encode(text)).tolist()

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)

  def bos_id(self) -> None:
    return None

  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  def pad_id(self) -> int:
    return self._pad_id
