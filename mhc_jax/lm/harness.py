"""The project's models in EleutherAI's lm-evaluation-harness (`pip install -e '.[eval]'`),
registered as `mhc_jax`:

    mhc-eval --model mhc_jax --model_args path=DIR --tasks hellaswag
    import mhc_jax.lm.harness, lm_eval
    lm_eval.simple_evaluate(model="mhc_jax", model_args="path=DIR", tasks=[...])

model_args: `path` (a workdir of this project or a Hugging Face folder, as `inference.load`
reads it), `batch_size` (rows per forward pass or decode; default lm-eval's `--batch_size`),
`max_length` (the most tokens the model reads at once; default the context it was trained on)
and `dtype` (the activations', "float32" or "bfloat16"). An unknown key or a bad value, and a
request the model cannot take, are one line (`AdapterError`; `mhc-eval` exits 2).

lm-eval 0.4.13 looks models up only in its own registry, which only its own modules fill (no
entry-point group, no plugin hook), so its `lm_eval` command cannot see this adapter:
`mhc-eval` is that command with the adapter imported first. From Python, importing this
module registers it.

The requests follow lm-eval's `HFLM`: `loglikelihood` splits context and continuation at the
token boundary as `TemplateLM._encode_pair` does (the whole text encoded, the context's
tokens cut off the front; an empty context becomes the end-of-text token), scores at most
`max_length` tokens ending with the continuation, and `is_greedy` says whether every
continuation token is its position's argmax. `loglikelihood_rolling` scores a document in
lm-eval's disjoint windows of `max_length` tokens. `generate_until` decodes with the KV cache
(`decode.generate`), contexts cut from the left to leave room for `max_gen_toks`, and cuts the
text at the first of the `until` strings.
"""

import functools
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)

from mhc_jax.checks import check_int, one_line
from mhc_jax.lm import inference
from mhc_jax.lm.decode import MIN_PROMPT_BUCKET, next_power_of_two, generate

NAME = "mhc_jax"
MODEL_ARGS = ("path", "batch_size", "max_length", "dtype")
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's, for requests that name none
# Generation settings lm-eval passes that `generate` takes (do_sample, until and max_gen_toks
# are read first).
SAMPLING_KWARGS = ("temperature", "top_k", "top_p")

log = logging.getLogger(__name__)


class AdapterError(ValueError):
  """A `model_args` key or value the adapter cannot use, or a request the model cannot take
  (generation settings, more tokens than `max_length`); one line."""


@register_model(NAME)
class MhcJaxLM(TemplateLM):
  """`model` (a `Transformer`) with its `tokenizer` (`encode`, `decode`, `eos_id`), reading at
  most `max_length` tokens, `batch_size` rows at a time."""

  def __init__(self, model, tokenizer, max_length: int, batch_size: int = DEFAULT_BATCH_SIZE):
    super().__init__()
    check_int("max_length", max_length, minimum=2)
    check_int("batch_size", batch_size)
    self.model, self.tokenizer = model, tokenizer
    self._max_length, self.batch_size = max_length, batch_size

  @classmethod
  def from_path(cls, path, *, batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                dtype: str = "float32") -> "MhcJaxLM":
    """The model of a workdir or a Hugging Face folder (`inference.load`)."""
    loaded = inference.load(path, dtype=dtype)
    return cls(loaded.model, loaded.tokenizer,
               loaded.context if max_length is None else max_length, batch_size)

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_eval_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    """`model_args` as lm-eval parses them; of `additional_config` only lm-eval's own
    `batch_size` is read, below a `batch_size` in `model_args` (its `device`, "cuda:0" unless
    told otherwise, means nothing here: JAX places the model on its default devices)."""
    unknown = [key for key in arg_dict if key not in MODEL_ARGS]
    if unknown:
      raise AdapterError(f"{NAME} model_args has no key {unknown[0]!r}: use "
                         f"{', '.join(MODEL_ARGS)}")
    if "path" not in arg_dict:
      raise AdapterError(f"{NAME} needs model_args path=DIR (a workdir or a Hugging Face "
                         "folder)")
    args = dict(arg_dict)
    outer_batch_size = (additional_config or {}).get("batch_size")
    if outer_batch_size is not None:
      args.setdefault("batch_size", outer_batch_size)
    if isinstance(args.get("batch_size"), str) and args["batch_size"].isdigit():
      args["batch_size"] = int(args["batch_size"])  # lm-eval's CLI passes it as text
    try:
      return cls.from_path(str(args.pop("path")), **args)
    except ValueError as err:
      raise AdapterError(f"{NAME} model_args: {one_line(err, with_type=False)}") from None

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    """No special tokens are added, as HFLM adds none to a causal model's text."""
    return self.tokenizer.encode(string).tolist()

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
    """(key, context tokens, continuation tokens) each -> (log-probability of the
    continuation, whether greedy decoding would produce it), longest first in batches."""
    for _, context, continuation in requests:
      if not context or not continuation or len(continuation) > self.max_length:
        raise AdapterError(f"a loglikelihood request needs a context and a continuation of "
                           f"1..{self.max_length} tokens, got {len(context)} and "
                           f"{len(continuation)}")
      if len(context) + len(continuation) > self.max_length + 1:
        log.warning("a loglikelihood request of %d tokens is cut to its last %d (max_length + "
                    "1)", len(context) + len(continuation), self.max_length + 1)
    ordered = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
    results = []
    for chunk in ordered.get_batched(n=self.batch_size):
      scores = self._score([(context, continuation) for _, context, continuation in chunk])
      for (key, _, _), score in zip(chunk, scores):
        if key is not None:  # rolling windows are cached per document instead
          self.cache_hook.add_partial("loglikelihood", key, score)
        results.append(score)
    return ordered.get_original(results)

  def _score(self, pairs) -> list[tuple[float, bool]]:
    """One batch of (context, continuation) token lists -> (log-probability, is_greedy) each.

    The model reads the last `max_length` tokens before the continuation's last one,
    right-padded to a power of two (causal attention keeps the padding out of every real
    token's logits), in `batch_size` rows, so a run compiles one program per length bucket."""
    inputs = [(context + continuation)[-(self.max_length + 1):] for context, continuation in pairs]
    width = max(MIN_PROMPT_BUCKET, next_power_of_two(max(len(row) - 1 for row in inputs)))
    tokens = np.zeros((self.batch_size, width), np.int32)
    targets = np.zeros((self.batch_size, width), np.int32)
    scored = np.zeros((self.batch_size, width), bool)
    for i, (row, (_, continuation)) in enumerate(zip(inputs, pairs)):
      tokens[i, :len(row) - 1], targets[i, :len(row) - 1] = row[:-1], row[1:]
      scored[i, len(row) - 1 - len(continuation):len(row) - 1] = True
    graphdef, state = nnx.split(self.model)
    logprobs, greedy = jax.device_get(_continuation_scores(graphdef, state, tokens, targets,
                                                           scored))
    return [(float(logprobs[i]), bool(greedy[i])) for i in range(len(pairs))]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each document's log-probability after the end-of-text token, over lm-eval's disjoint
    windows of `max_length` tokens (every token predicted once, each window after the first
    read with a full context), all windows of all documents batched together."""
    windows, counts = [], []
    for (string,) in (request.args for request in requests):
      document = [(None, *lm_eval_utils.make_disjoint_window(window))
                  for window in lm_eval_utils.get_rolling_token_windows(
                      token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                      max_seq_len=self.max_length, context_len=1)]
      windows += document
      counts.append(len(document))
    scores = self._loglikelihood_tokens(windows) if windows else []
    totals, start = [], 0
    for request, count in zip(requests, counts):
      totals.append(sum(logprob for logprob, _ in scores[start:start + count]))
      start += count
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Each (context, generation kwargs) -> the text decoded after the context (greedy unless
    `do_sample`), ending before the first `until` string or at the end-of-text token, at most
    `max_gen_toks` tokens; requests with the same kwargs decode together, longest first."""
    ordered = Collator([request.args for request in requests],
                       sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                       group_by="gen_kwargs", group_fn=lambda r: r[1])
    results = []
    for chunk in ordered.get_batched(n=self.batch_size):
      contexts, kwargs = zip(*chunk)
      texts = self._generate(list(contexts), kwargs[0])
      for context, generation_kwargs, text in zip(contexts, kwargs, texts):
        self.cache_hook.add_partial("generate_until", (context, generation_kwargs), text)
      results += texts
    return ordered.get_original(results)

  def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
    # The end-of-text token stops `generate` itself (eos_id): no string stands for it.
    until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
    max_gen_toks = kwargs.pop("max_gen_toks")
    sampling = {key: kwargs.pop(key) for key in SAMPLING_KWARGS if key in kwargs}
    if not kwargs.pop("do_sample", False):
      sampling["temperature"] = 0.0
    if kwargs:
      raise AdapterError(f"generation kwarg {next(iter(kwargs))!r} is not one {NAME} knows: "
                         f"use until, max_gen_toks, do_sample, {', '.join(SAMPLING_KWARGS)}")
    if not 1 <= max_gen_toks < self.max_length:
      raise AdapterError(f"max_gen_toks must be in 1..{self.max_length - 1} (max_length - 1), "
                         f"got {max_gen_toks}")
    prompts = [self._prompt(context, self.max_length - max_gen_toks) for context in contexts]
    try:
      continuations = generate(
          self.model, prompts, max_gen_toks, eos_id=self.eot_token_id, context=self.max_length,
          stop=lambda tokens: any(u in self.tok_decode(tokens) for u in until), **sampling)
    except ValueError as err:  # a sampling setting out of range
      raise AdapterError(f"generation kwargs {gen_kwargs}: {one_line(err, with_type=False)}"
                         ) from None
    return [postprocess_generated_text(self.tok_decode(tokens), until, None)
            for tokens in continuations]

  def _prompt(self, context: str, room: int) -> list[int]:
    """The context's last `room` tokens (an empty one: the end-of-text token, as
    `loglikelihood` reads it)."""
    tokens = self.tok_encode(context) or [self.prefix_token_id]
    if len(tokens) > room:
      log.warning("a context of %d tokens is cut to its last %d (max_length %d - max_gen_toks)",
                  len(tokens), room, self.max_length)
    return tokens[-room:]


@functools.partial(jax.jit, static_argnames="graphdef")
def _continuation_scores(graphdef, state, tokens, targets, scored):
  """Rows of `tokens` `[batch, seq]` -> each row's summed log-probability of `targets` where
  `scored`, and whether each of those targets is its position's argmax."""
  logits = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return (jnp.sum(jnp.where(scored, picked, 0.0), axis=-1),
          jnp.all(greedy | ~scored, axis=-1))


def main(argv=None) -> int:
  """`mhc-eval`: lm-eval's command line (`lm_eval --help`) with `--model mhc_jax` known."""
  from lm_eval.__main__ import cli_evaluate

  # lm-eval's parser reads sys.argv itself.
  given, sys.argv = sys.argv, ["mhc-eval", *(sys.argv[1:] if argv is None else argv)]
  try:
    cli_evaluate()
  except AdapterError as err:
    print(f"mhc-eval: {err}", file=sys.stderr)
    return 2
  finally:
    sys.argv = given
  return 0


if __name__ == "__main__":
  sys.exit(main())
