"""Tokenizers: bytes (ids 0..255, then EOS and PAD), or a Hugging Face `tokenizer.json`.

Both expose `vocab_size`, `eos_id`, `encode(text) -> int32 [n]` (no EOS appended) and
`decode(ids) -> str` (special tokens dropped). `load_tokenizer` builds one from the
`--tokenizer` argument of `mhc-prepare-data`, `from_metadata` from a prepared corpus.
"""

import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from mhc_jax.checks import one_line

EOS = 256
PAD = 257
VOCAB_SIZE = 258
BYTES = "bytes"
HUGGINGFACE = "huggingface"
# Tried in order when `--eos_token` is not given.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>")


def encode(text: str | bytes) -> np.ndarray:
  """`str` (as UTF-8) or bytes -> int32 `[num_bytes]`, one token per byte."""
  if isinstance(text, str):
    text = text.encode("utf-8")
  if not isinstance(text, bytes | bytearray | memoryview):
    raise TypeError(f"encode takes str or bytes, got {type(text).__name__}")
  return np.frombuffer(text, np.uint8).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
  """Token ids `[n]` -> text: bytes as UTF-8 (invalid ones replaced), specials dropped."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
    raise ValueError(f"token ids must lie in [0, {VOCAB_SIZE}), got {ids.min()}..{ids.max()}")
  return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
  """One token per UTF-8 byte; `EOS` ends documents."""

  kind = BYTES
  vocab_size = VOCAB_SIZE
  eos_id = EOS

  def encode(self, text: str | bytes) -> np.ndarray:
    return encode(text)

  def decode(self, ids) -> str:
    return decode(ids)


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer from its `tokenizer.json`; `eos_token` ends documents."""

  kind = HUGGINGFACE

  def __init__(self, path: str | pathlib.Path, eos_token: str | None = None):
    tokenizers = _tokenizers()
    self.path = pathlib.Path(path)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(self.path))
    except Exception as err:  # tokenizers raises bare Exceptions for unreadable files
      raise ValueError(f"tokenizer {self.path} does not load: "
                       f"{one_line(err, limit=200, with_type=False)}") from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_token = eos_token if eos_token is not None else self._default_eos()
    eos_id = self._tokenizer.token_to_id(self.eos_token)
    if eos_id is None:
      raise ValueError(f"--eos_token {self.eos_token!r} is not in the vocabulary of {self.path}")
    self.eos_id = int(eos_id)

  def _default_eos(self) -> str:
    for token in EOS_CANDIDATES:
      if self._tokenizer.token_to_id(token) is not None:
        return token
    raise ValueError(f"tokenizer {self.path} has none of {', '.join(EOS_CANDIDATES)}: "
                     f"name its end-of-document token with --eos_token")

  def encode(self, text: str | bytes) -> np.ndarray:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    """Many documents at once (`tokenizers` spreads a batch over its threads); bytes are
    read as UTF-8, invalid bytes replaced."""
    texts = [bytes(t).decode("utf-8", errors="replace") if isinstance(t, bytes | bytearray)
             else t for t in texts]
    encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                  skip_special_tokens=True)


Tokenizer = ByteTokenizer | HuggingFaceTokenizer


def _tokenizers():
  """The optional `tokenizers` package, imported where a tokenizer.json is used."""
  try:
    import tokenizers
  except ImportError:
    raise ValueError("a tokenizer.json needs the tokenizers package: "
                     "pip install 'mhc-jax[data]'") from None
  return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, path: pathlib.Path) -> pathlib.Path:
  """Trains a byte-level BPE of `vocab_size` tokens (EOS "</s>") on `texts` and saves its
  tokenizer.json at `path`: a corpus tokenizer for experiments and tests, no download."""
  tokenizers = _tokenizers()
  model = tokenizers.Tokenizer(tokenizers.models.BPE())
  model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  model.train_from_iterator(texts, trainer)
  model.save(str(path))
  return path


def load_tokenizer(spec: str, eos_token: str | None = None) -> Tokenizer:
  """`"bytes"` or the path of a `tokenizer.json`."""
  if spec == BYTES:
    if eos_token is not None:
      raise ValueError("--eos_token applies to a tokenizer.json; the bytes tokenizer's EOS is "
                       f"{EOS}")
    return ByteTokenizer()
  if not pathlib.Path(spec).is_file():
    raise ValueError(f"tokenizer {spec} is neither 'bytes' nor a tokenizer.json file")
  return HuggingFaceTokenizer(spec, eos_token)


def from_metadata(directory: pathlib.Path, tokenizer: dict) -> Tokenizer:
  """The tokenizer a prepared corpus records (`metadata.json`'s "tokenizer")."""
  if tokenizer["kind"] == BYTES:
    return ByteTokenizer()
  return HuggingFaceTokenizer(directory / tokenizer["file"], tokenizer["eos_token"])
