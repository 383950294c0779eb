"""Decoding with the KV cache: `generate` continues token prompts of any lengths in one batch.

The prompts are left-padded, so every row's last prompt token sits in the same slot and each
new token goes to the same slot of every row: rows differ only in their tokens' RoPE
positions and in which slots hold padding (`KVCache.valid`). `prefill` runs the padded
prompts through the model once, writing the cache; each `decode_step` feeds one token per row
and reads the cache, so a new token costs one token's forward pass plus attention's read of
the cache, not a forward pass over every token before it.

Shapes are bucketed, so that batches compile a bounded number of programs: the rows are
rounded up to a power of two (then to a multiple of the mesh's data x fsdp), the prompt length
to a power of two of at least 16, and the cache's slots to the power of two at or above that
prompt length plus `max_new_tokens`. A call compiles at most three programs: the prefill (one
per rows, prompt length and slots), the decode step (one per rows and slots) and the sampler
(one per rows and sampling mode: greedy, sampling, or sampling with top-k / top-p); a later
call for the same model whose sizes fall in the same buckets compiles none. So batches of up
to 2^j rows with prompt plus continuation up to 2^s tokens (s >= 5) compile at most
(j + 1)(s - 4)(s - 3) / 2 prefills and (j + 1)(s - 4) steps per sampling mode: any 3 or 4
prompts of at most 16 tokens continued by at most 16 tokens run on one prefill and one step.

(The module is not `generate.py`: `mhc_jax.lm` exports the function `generate`, which would
hide a module of that name.)
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from mhc_jax.checks import check_int
from mhc_jax.lm.model import KVCache, Transformer
from mhc_jax.lm.sharding import BATCH_AXES

MIN_PROMPT_BUCKET = 16
_MAX_SEED = 2**31 - 1  # the seed goes into the sampler as an int32


def generate(model: Transformer, prompts: Sequence, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_id: int | None = None, context: int | None = None,
             stop: Callable[[np.ndarray], bool] | None = None) -> list[np.ndarray]:
  """Each of `prompts` (int token ids, any lengths, at least one token each) continued by up
  to `max_new_tokens` tokens -> one int32 array per prompt: its continuation, ending with its
  first `eos_id` when that is given.

  `temperature=0` is greedy: each token is the argmax of the logits, as a full forward pass
  over the prompt and the tokens so far would give. Above 0 each token is drawn from
  softmax(logits / temperature), restricted to the `top_k` most likely tokens and to the
  smallest set of most likely tokens whose probability reaches `top_p` when those are given
  (`filter_logits`). Draws are reproducible: the t-th token of row i is drawn with key
  fold_in(fold_in(key(seed), i), t), whatever else the batch holds.

  `context`: the most tokens the model may read (the length it was trained on, say): a
  prompt longer than it, or one whose continuation would take the model past it, is refused.
  None: no limit.

  `stop(continuation so far) -> bool`: decoding ends early once it is True for every row
  (e.g. a stop string in the decoded text; the continuations are returned whole, for the
  caller to cut). Like `eos_id`, it costs a wait for each token.

  All prompts run as one batch (see the module docstring for the programs it compiles); under
  a mesh (`jax.set_mesh`) the batch and the cache are split as the activations are.
  """
  vocab = model.cfg.vocab_size
  prompts = _checked_prompts(prompts, vocab)
  check_int("max_new_tokens", max_new_tokens)
  mode = _sampling_mode(temperature, top_k, top_p)
  check_int("seed", seed, minimum=0)
  if seed > _MAX_SEED:
    raise ValueError(f"seed must be an int in 0..{_MAX_SEED}, got {seed}")
  if eos_id is not None and not (isinstance(eos_id, int | np.integer) and 0 <= eos_id < vocab):
    raise ValueError(f"eos_id must be a token id in 0..{vocab - 1} (the model's vocabulary), "
                     f"got {eos_id!r}")
  if context is not None:
    _check_context(prompts, max_new_tokens, context)

  rows = _bucket_rows(len(prompts))
  width = max(MIN_PROMPT_BUCKET, next_power_of_two(max(len(p) for p in prompts)))
  slots = next_power_of_two(width + max_new_tokens)
  lengths = np.zeros(rows, np.int32)  # the rows filling the batch up stay empty
  lengths[:len(prompts)] = [len(p) for p in prompts]
  settings = (np.float32(temperature or 1.0), np.int32(min(top_k or vocab, vocab)),
              np.float32(top_p or 1.0))
  graphdef, state = nnx.split(model)
  logits, cache = _prefill(graphdef, state, *_left_padded(prompts, rows, width), slots=slots)
  drawn = [_draw(logits, seed, 0, *settings, mode=mode)]
  finished = np.zeros(len(prompts), bool)
  so_far = []  # the drawn tokens on the host, each fetched once, for `eos_id` and `stop`
  for t in range(1, max_new_tokens):
    if eos_id is not None or stop is not None:  # a wait for each token: only with an end
      so_far.append(np.asarray(drawn[-1])[:len(prompts)])
      finished |= _finished(so_far, eos_id, stop)
      if finished.all():
        break
    logits, cache = _step(graphdef, state, cache, drawn[-1], lengths + t - 1)
    drawn.append(_draw(logits, seed, t, *settings, mode=mode))
  continuations = np.stack(jax.device_get(drawn), axis=1)[:len(prompts)]
  return [_cut_after(row, eos_id) for row in continuations]


def _finished(so_far: list[np.ndarray], eos_id, stop) -> np.ndarray:
  """Which rows have ended, from the tokens drawn so far (one `[rows]` array a step): their
  newest token is `eos_id`, or `stop` says so."""
  newest = so_far[-1]
  ended = newest == eos_id if eos_id is not None else np.zeros(len(newest), bool)
  if stop is not None:
    ended |= np.array([bool(stop(row)) for row in np.stack(so_far, axis=1)])
  return ended


def prefill(model: Transformer, tokens, positions, mask, *, slots: int):
  """Left-padded prompts `tokens`, their `positions` and `mask` `[batch, seq]` -> (each row's
  logits after its last prompt token `[batch, vocab]`, a `KVCache` of `slots` slots holding
  the prompts)."""
  graphdef, state = nnx.split(model)
  return _prefill(graphdef, state, tokens, positions, mask, slots=slots)


def decode_step(model: Transformer, cache: KVCache, tokens, positions):
  """One token per row, `tokens` `[batch]` at `positions` `[batch]`, after those `cache`
  holds -> (logits `[batch, vocab]`, the cache holding them too). `cache` is donated: use
  the one returned."""
  graphdef, state = nnx.split(model)
  return _step(graphdef, state, cache, tokens, positions)


def filter_logits(logits: jax.Array, *, top_k=None, top_p=None) -> jax.Array:
  """`logits` `[..., vocab]` with -inf outside the `top_k` largest and outside the smallest
  set of largest whose softmax probability reaches `top_p` (both may be traced; a tie at
  the edge stays in)."""
  descending = -jnp.sort(-logits, axis=-1)
  threshold = jnp.full(logits.shape[:-1] + (1,), -jnp.inf, logits.dtype)
  if top_k is not None:
    threshold = jnp.maximum(threshold, jnp.take(descending, top_k - 1, axis=-1)[..., None])
  if top_p is not None:
    probs = jax.nn.softmax(descending, axis=-1)
    # What the more likely tokens hold: the first token is always kept.
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(before < top_p, axis=-1, keepdims=True)
    threshold = jnp.maximum(threshold, jnp.take_along_axis(descending, kept - 1, axis=-1))
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def _split_batch(x):
  """Rows split over data x fsdp when a mesh is set, as training splits its batch."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *(None,) * (x.ndim - 1)))


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill(graphdef, state, tokens, positions, mask, *, slots):
  # The model is merged inside the trace: its scanned layers split it there, which a module
  # from outside the trace does not allow.
  model = nnx.merge(graphdef, state)
  tokens, positions, mask = map(_split_batch, (tokens, positions, mask))
  cache = KVCache.empty(model.cfg, tokens.shape[0], slots)
  logits, cache = model.extend(cache, tokens, positions, mask, last_only=True)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnames="cache")
def _step(graphdef, state, cache, tokens, positions):
  model = nnx.merge(graphdef, state)
  tokens, positions = (_split_batch(jnp.asarray(x, jnp.int32)[:, None])
                       for x in (tokens, positions))
  logits, cache = model.extend(cache, tokens, positions)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames="mode")
def _draw(logits, seed, step, temperature, top_k, top_p, *, mode):
  """Each row's next token from its logits `[rows, vocab]` (see `generate`)."""
  if mode == "greedy":
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if mode == "filtered":
    logits = filter_logits(logits, top_k=top_k, top_p=top_p)
  key = jax.random.key(seed)
  keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, row), step))(
      jnp.arange(logits.shape[0]))
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _sampling_mode(temperature, top_k, top_p) -> str:
  if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
      0 <= temperature < math.inf):
    raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
  if top_k is not None:
    check_int("top_k", top_k)
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, int | float)
                            or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
  filtered = top_k is not None or top_p is not None
  if temperature == 0:
    if filtered:
      raise ValueError("top_k and top_p shape sampling: give a temperature > 0 with them "
                       "(temperature=0 is greedy)")
    return "greedy"
  return "filtered" if filtered else "sample"


def _checked_prompts(prompts: Sequence, vocab: int) -> list[np.ndarray]:
  if not len(prompts):
    raise ValueError("prompts must hold at least one prompt, got none")
  checked = []
  for i, prompt in enumerate(prompts):
    tokens = np.asarray(prompt)
    if tokens.ndim == 1 and not tokens.size:
      raise ValueError(f"prompts[{i}] is empty: a prompt needs at least one token")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      got = tokens.dtype if tokens.ndim == 1 else f"shape {tokens.shape}"
      raise ValueError(f"prompts[{i}] must be a 1-d sequence of int token ids, got {got}")
    outside = tokens[(tokens < 0) | (tokens >= vocab)]
    if outside.size:
      raise ValueError(f"prompts[{i}] holds token id {outside[0]}, outside the vocabulary "
                       f"0..{vocab - 1}")
    checked.append(tokens.astype(np.int32))
  return checked


def _check_context(prompts: list[np.ndarray], max_new_tokens: int, context: int) -> None:
  check_int("context", context)
  for i, prompt in enumerate(prompts):
    # The last new token is drawn, never read: the model reads one token fewer than it makes.
    reads = len(prompt) + max_new_tokens - 1
    if len(prompt) > context:
      raise ValueError(f"prompts[{i}] has {len(prompt)} tokens, more than context={context}")
    if reads > context:
      raise ValueError(f"prompts[{i}] has {len(prompt)} tokens: with max_new_tokens="
                       f"{max_new_tokens} the model reads {reads}, more than context={context}; "
                       "lower max_new_tokens or shorten the prompt")


def next_power_of_two(n: int) -> int:
  """The least power of two >= `n` (>= 1): the buckets' sizes."""
  return 1 << (n - 1).bit_length()


def _bucket_rows(num_prompts: int) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  shards = 1 if mesh.empty else math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
  return -(-next_power_of_two(num_prompts) // shards) * shards


def _left_padded(prompts: list[np.ndarray], rows: int, width: int):
  """-> tokens, positions (int32) and mask `[rows, width]`: each prompt at the right end of its
  row at positions 0..len-1; padding token 0 at position 0, masked."""
  tokens, positions = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
  mask = np.zeros((rows, width), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    positions[row, width - len(prompt):] = np.arange(len(prompt))
    mask[row, width - len(prompt):] = True
  return tokens, positions, mask


def _cut_after(tokens: np.ndarray, eos_id: int | None) -> np.ndarray:
  ends = np.flatnonzero(tokens == eos_id) if eos_id is not None else ()
  return tokens[:ends[0] + 1] if len(ends) else tokens
