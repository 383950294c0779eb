"""A trained model ready to be used: `load(path)` -> `Loaded(model, tokenizer, context)`, for
`mhc-generate` and the lm-evaluation-harness adapter.

`path` is a workdir of this project (its latest complete checkpoint, decoded with its
corpus's tokenizer: bytes, or the `tokenizer.json` its prepared corpus records; its context
is the `seq_len` it was trained on) or a Hugging Face Llama / Qwen3 folder (its safetensors,
decoded with its `tokenizer.json`, the end-of-text token from `tokenizer_config.json`; its
context is `max_position_embeddings`). Errors are one line naming the path or file at fault.
"""

import dataclasses
import json
import pathlib

from mhc_jax.lm import arrayrecord, pretrained
from mhc_jax.lm.data import ARRAYRECORD, DataConfig
from mhc_jax.lm.hf import read_json
from mhc_jax.lm.model import Transformer
from mhc_jax.lm.tokenizer import ByteTokenizer, HuggingFaceTokenizer, Tokenizer, from_metadata

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """model: the `Transformer`; tokenizer: its `encode` / `decode` / `eos_id`; context: the
  most tokens it reads at once; source: where it came from (`pretrained.Source`)."""

  model: Transformer
  tokenizer: Tokenizer
  context: int
  source: pretrained.Source


def load(path, *, dtype: str = "float32", argument: str = "path") -> Loaded:
  """`path` (a workdir or a Hugging Face folder) -> `Loaded`; `dtype`: the activations'
  ("float32" or "bfloat16"; parameters stay float32). `argument`: what the errors call the
  path, the caller's name for it (lm-eval's `path`, mhc-generate's `--from`)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
  source = pretrained.read_source(str(path), argument)
  source = dataclasses.replace(source, config=dataclasses.replace(source.config, dtype=dtype))
  tokenizer, context = (_hf_tokenizer(source) if source.kind == pretrained.HUGGINGFACE
                        else _workdir_tokenizer(source))
  if tokenizer.vocab_size > source.config.vocab_size:
    raise ValueError(f"the tokenizer of {source.path} has {tokenizer.vocab_size} tokens, its "
                     f"model only {source.config.vocab_size}: not the model's tokenizer")
  return Loaded(pretrained.load_model(source), tokenizer, context, source)


def _workdir_tokenizer(source: pretrained.Source) -> tuple[Tokenizer, int]:
  fields = read_json(source.path / pretrained.CONFIG).get("data", {})
  try:
    data = DataConfig(**fields)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{source.path / pretrained.CONFIG}'s data section is no DataConfig: "
                     f"{err}") from None
  if isinstance(data.source, str) and data.source.startswith(ARRAYRECORD):
    corpus = pathlib.Path(data.source[len(ARRAYRECORD):])
    try:
      metadata = arrayrecord.read_metadata(corpus)
    except ValueError as err:
      raise ValueError(f"{source.path} decodes with the tokenizer of its corpus, and "
                       f"{err}") from None
    return from_metadata(corpus, metadata["tokenizer"]), data.seq_len
  return ByteTokenizer(), data.seq_len


def _hf_tokenizer(source: pretrained.Source) -> tuple[Tokenizer, int]:
  tokenizer_file = source.path / "tokenizer.json"
  if not tokenizer_file.is_file():
    raise ValueError(f"{source.path} holds no tokenizer.json: copy the model's tokenizer.json "
                     "into it")
  config = read_json(source.path / pretrained.CONFIG)
  return (HuggingFaceTokenizer(tokenizer_file, _eos_token(source.path)),
          int(config.get("max_position_embeddings", 2048)))


def _eos_token(folder: pathlib.Path) -> str | None:
  """The end-of-text token `tokenizer_config.json` names (a string, or {"content": ...});
  None without one (the tokenizer then tries its usual names)."""
  path = folder / "tokenizer_config.json"
  if not path.is_file():
    return None
  try:
    eos = json.loads(path.read_text()).get("eos_token")
  except (json.JSONDecodeError, AttributeError):
    raise ValueError(f"{path} holds no JSON object: download it again") from None
  return eos.get("content") if isinstance(eos, dict) else eos
