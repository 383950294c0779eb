"""Language-model data: corpora, document split, packing, iterators.

Two sources. In memory (the byte tokenizer of `tokenizer.py`): a `Corpus` loads documents
(text files, or the complete works of Shakespeare), splits them by document into train and
validation, and packs each split into windows of `seq_len + 1` tokens. Streamed
("arrayrecord:DIR", a corpus `mhc-prepare-data` wrote, any tokenizer): the split was made
when it was prepared, and windows are cut from its shards on demand (`arrayrecord.py`).
Either way each split is one stream of documents, each followed by EOS, cut into windows
that do not overlap; an example is `inputs = window[:-1]`, `targets = window[1:]`.

Training batches come from one grain iterator for both sources (infinite, reshuffled every
epoch, resumable through `get_state` / `set_state` or orbax's `grain.checkpoint`);
validation batches are the validation windows in order. Evaluation batches
(`Corpus.eval_batches`) hold every validation window once, or a fixed subset spread over
every held-out document, with weights that let the last batch be padded; `reference_losses`
scores the same tokens under unigram / bigram counts of the train split (a prepared corpus:
unigram only, from the counts its preparation stored). With `shard_count` processes, each
takes its own contiguous rows of every global batch.
"""

import dataclasses
import functools
import glob
import hashlib
import itertools
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import grain
import numpy as np

from mhc_jax.checks import check_int
from mhc_jax.lm import arrayrecord
from mhc_jax.lm.shakespeare import SHAKESPEARE, shakespeare_files
from mhc_jax.lm.tokenizer import EOS, ByteTokenizer, Tokenizer, encode

ARRAYRECORD = "arrayrecord:"
# Validation tokens read at a time when counting a prepared corpus's targets: its split may
# be far larger than memory.
COUNT_TOKENS = 1 << 20

Document = tuple[str, bytes]
Batch = dict[str, np.ndarray]


class Windows(Protocol):
  """Windows of one split: an int32 `[num_windows, seq_len + 1]` array, or anything that
  indexes like one by an index array or a slice (`arrayrecord.TokenWindows`)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: np.ndarray | slice) -> np.ndarray: ...


# Configuration.


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What a `Corpus` is built from.

  source: "shakespeare", or a path / glob, or a tuple of them (each file is one document),
    or "arrayrecord:DIR", a corpus prepared by `mhc-prepare-data`.
  seq_len: tokens per example.
  batch_size: the global batch (rows over all processes together).
  validation_fraction: share of the documents held out, in [0, 1) (a prepared corpus was
    split when it was prepared: there it is unused).
  seed: fixes the training order (the shuffle of the windows, every epoch).
  split_seed: fixes which documents an in-memory source holds out (a prepared corpus was
    split by `mhc-prepare-data --seed`), apart from `seed`, so that runs over several seeds
    are evaluated on one validation set.
  """

  source: str | tuple[str, ...] = SHAKESPEARE
  seq_len: int = 256
  batch_size: int = 16
  validation_fraction: float = 0.1
  seed: int = 0
  split_seed: int = 0

  def __post_init__(self):
    if not isinstance(self.source, str):
      # Lists (e.g. from gin) become tuples so the config stays hashable.
      object.__setattr__(self, "source", tuple(self.source))
    check_int("seq_len", self.seq_len)
    check_int("batch_size", self.batch_size)
    _check_fraction(self.validation_fraction)
    # grain's shuffle takes only this range; fail before the corpus is loaded.
    for name in ("seed", "split_seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")


def _check_fraction(validation_fraction: float):
  if not 0 <= validation_fraction < 1:
    raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction!r}")


def _check_shard(batch_size: int, shard_index: int, shard_count: int):
  check_int("shard_count", shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must lie in [0, {shard_count}), got {shard_index!r}")
  if batch_size % shard_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by shard_count {shard_count}")


# Sources.


def load_documents(source: str | Sequence[str]) -> list[Document]:
  """`(name, raw bytes)` per file, sorted by name; "shakespeare" or paths / globs.

  A file's name is its path relative to the corpus root (see `corpus_root`), so a corpus
  copied to another folder keeps its names, and with them its split.
  """
  if source == SHAKESPEARE:
    paths = {p.name: p for p in shakespeare_files()}
  else:
    patterns = (source,) if isinstance(source, str) else tuple(source)
    files = _match_paths(patterns)
    root = corpus_root([os.path.abspath(os.path.expanduser(p)) for p in patterns],
                       os.path.isfile)
    paths = {os.path.relpath(os.path.abspath(path), root): path for path in files}
  documents = [(name, pathlib.Path(paths[name]).read_bytes()) for name in sorted(paths)]
  if not any(data for _, data in documents):
    raise ValueError(f"corpus is empty: {len(documents)} file(s) of 0 bytes from {source!r}")
  return documents


def _match_paths(patterns: tuple[str, ...]) -> list[str]:
  """Paths / globs -> the files they match, each once however many patterns match it."""
  if not patterns:
    raise ValueError("corpus source names no paths")
  by_file = {}
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    # A file whose name holds glob characters ("a[1].txt") is still itself.
    matches = [pattern] if os.path.isfile(pattern) else glob.glob(pattern, recursive=True)
    files = [os.path.normpath(p) for p in matches if os.path.isfile(p)]
    if not files:
      raise ValueError(f"corpus path not found: {pattern}")
    for path in files:
      by_file.setdefault(os.path.realpath(path), path)
  return list(by_file.values())


def glob_root(pattern: str, is_file: bool) -> str:
  """The folder a path or glob's matches are named relative to: a file's own folder, else
  the pattern's leading components before the first with glob characters
  ("/data/**/x*.txt" -> "/data"). Patterns are absolute, "/"-separated."""
  if is_file or not glob.has_magic(pattern):
    return os.path.dirname(pattern)
  fixed = itertools.takewhile(lambda part: not glob.has_magic(part), pattern.split("/"))
  return "/".join(fixed) or "/"


def corpus_root(patterns: Sequence[str], is_file) -> str:
  """The common folder of the patterns' roots (`is_file(pattern) -> bool`)."""
  return os.path.commonpath([glob_root(p, is_file(p)) for p in patterns])


# Split and packing.


def split_documents(documents: Sequence[Document], validation_fraction: float,
                    seed: int) -> tuple[list[Document], list[Document]]:
  """`(train, validation)`, each sorted by name; the same names and seed give the same split.

  `round(validation_fraction * n)` documents are held out, at least one when there are two
  or more documents and the fraction is positive, and never all of them: those whose
  `split_key` is below `split_threshold` (`mhc-prepare-data` splits by the same rule).
  """
  keys = np.array([split_key(name, seed) for name, _ in documents], np.uint64)
  held_out = keys < split_threshold(keys, validation_fraction)
  train = sorted(doc for doc, out in zip(documents, held_out) if not out)
  validation = sorted(doc for doc, out in zip(documents, held_out) if out)
  return train, validation


def split_key(name: str, seed: int) -> int:
  """A document's turn to be held out: a hash of the seed and its name, so the split
  outlives numpy's RNG changes."""
  digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogateescape")).digest()
  return int.from_bytes(digest[:8], "big")


def split_threshold(keys: np.ndarray, validation_fraction: float) -> int:
  """uint64 `[n]` keys -> t such that the documents with key < t are held out."""
  _check_fraction(validation_fraction)
  n = len(keys)
  if n < 2 or validation_fraction == 0:
    return 0
  num_validation = min(n - 1, max(1, round(validation_fraction * n)))
  return int(np.partition(keys, num_validation)[num_validation])


def num_tokens(documents: Sequence[Document]) -> int:
  """Length of the packed stream: every byte plus one EOS per document."""
  return sum(len(data) + 1 for _, data in documents)


def pack(documents: Sequence[Document], seq_len: int) -> np.ndarray:
  """Documents in the given order, each followed by EOS -> int32 `[num_windows, seq_len + 1]`.

  Windows do not overlap; the tail that does not fill one is dropped.
  """
  check_int("seq_len", seq_len)
  pieces = [piece for _, data in documents for piece in (encode(data), [EOS])]
  stream = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
  num_windows = len(stream) // (seq_len + 1)
  return stream[:num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)


def _examples(windows: np.ndarray) -> Batch:
  """`[..., seq_len + 1]` -> inputs and targets `[..., seq_len]` (next-token pairs)."""
  return {"inputs": np.ascontiguousarray(windows[..., :-1]),
          "targets": np.ascontiguousarray(windows[..., 1:])}


# Iterators.


def train_iterator(windows: Windows, batch_size: int, seed: int, shard_index: int = 0,
                   shard_count: int = 1, num_threads: int = 0) -> grain.DatasetIterator:
  """Endless batches, int32 `[batch_size // shard_count, seq_len]` inputs and targets.

  Window order is a grain shuffle of the seed, reshuffled every epoch; batches run across
  epoch boundaries so no window is ever dropped. The shuffle and batching act on indices,
  so each process gathers only its own rows `[shard_index * rows, (shard_index + 1) * rows)`
  of every global batch, and its iterator state is a position in that shared sequence.
  `num_threads` read batches ahead (0 for windows in memory: threads would only contend
  for the GIL).
  """
  check_int("batch_size", batch_size)
  _check_shard(batch_size, shard_index, shard_count)
  if len(windows) == 0:
    raise ValueError("train_iterator needs at least one window")
  rows = batch_size // shard_count
  # The global order: window positions, reshuffled every epoch, endless. Batch b is its
  # positions [b * batch_size, (b + 1) * batch_size); a process looks up only its own rows
  # of it (grain's per-element lookups, not the gather, bound the loader's rate).
  order = grain.MapDataset.range(len(windows)).shuffle(seed=seed).repeat()
  own_offsets = np.arange(shard_index * rows, (shard_index + 1) * rows)
  dataset = (grain.MapDataset.range(len(order) // batch_size)
             .map(functools.partial(_gather, windows, order, batch_size, own_offsets)))
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))


def _gather(windows: Windows, order: grain.MapDataset, batch_size: int,
            own_offsets: np.ndarray, batch: int) -> Batch:
  indices = np.fromiter((order[batch * batch_size + k] for k in own_offsets), np.int64,
                        len(own_offsets))
  return _examples(windows[indices])


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no value equality or hash
class ValidationBatches:
  """The validation windows in order, batched; iterable any number of times.

  Full batches only, except that fewer windows than one batch make a single smaller
  batch (trimmed to a multiple of `shard_count` so every process gets the same rows).
  """

  windows: Windows
  batch_size: int
  max_batches: int | None = None
  shard_index: int = 0
  shard_count: int = 1

  def __post_init__(self):
    check_int("batch_size", self.batch_size)
    _check_shard(self.batch_size, self.shard_index, self.shard_count)
    if self.max_batches is not None:
      check_int("max_batches", self.max_batches)

  def _global_batch(self) -> int:
    n = len(self.windows)
    return self.batch_size if n >= self.batch_size else n - n % self.shard_count

  def __len__(self) -> int:
    global_batch = self._global_batch()
    num_batches = len(self.windows) // global_batch if global_batch else 0
    return num_batches if self.max_batches is None else min(num_batches, self.max_batches)

  def __iter__(self) -> Iterator[Batch]:
    global_batch = self._global_batch()
    rows = global_batch // self.shard_count
    for b in range(len(self)):
      start = b * global_batch + self.shard_index * rows
      yield _examples(self.windows[start:start + rows])


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no value equality or hash
class WeightedBatches:
  """Chosen validation windows (`indices`, in that order), each exactly once, in batches of
  `batch_size` rows with a float32 `weights` `[rows, seq_len]` beside inputs and targets: the
  last batch is padded with copies of the first window at weight 0. So every batch has one
  shape (one compiled step, whatever the split's length), and a weighted sum over tokens
  divided by the sum of weights is the token-weighted mean over exactly these windows.
  Iterable any number of times; each process gathers only its own rows of every batch.
  """

  windows: Windows
  indices: np.ndarray
  batch_size: int
  shard_index: int = 0
  shard_count: int = 1

  def __post_init__(self):
    check_int("batch_size", self.batch_size)
    _check_shard(self.batch_size, self.shard_index, self.shard_count)

  def __len__(self) -> int:
    return -(-len(self.indices) // self.batch_size)

  def __iter__(self) -> Iterator[Batch]:
    rows = self.batch_size // self.shard_count
    own = slice(self.shard_index * rows, (self.shard_index + 1) * rows)
    for b in range(len(self)):
      chosen = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
      padded = np.pad(chosen, (0, self.batch_size - len(chosen)), constant_values=chosen[0])
      real = (np.arange(self.batch_size) < len(chosen))[own]
      batch = _examples(self.windows[padded[own]])
      batch["weights"] = np.repeat(real[:, None], batch["targets"].shape[1], axis=1).astype(
          np.float32)
      yield batch


def spread_windows(num_windows: int, count: int,
                   document_spans: Sequence[tuple[int, int]] = ()) -> np.ndarray:
  """Sorted indices of `min(count, num_windows)` windows spread over a split: the middle
  window of every document's span `(first, last)` (window indices, inclusive), then windows
  evenly spaced among the others. With more documents than `count`, evenly spaced middles.
  """
  count = min(count, num_windows)
  middles = np.unique(np.array([(first + last) // 2 for first, last in document_spans],
                               np.int64))
  if len(middles) >= count:
    return middles[_evenly_spaced(len(middles), count)]
  others = np.setdiff1d(np.arange(num_windows), middles)
  return np.sort(np.concatenate([middles,
                                 others[_evenly_spaced(len(others), count - len(middles))]]))


def _evenly_spaced(n: int, k: int) -> np.ndarray:
  """k distinct positions in [0, n), k <= n, each at the middle of its n / k stretch."""
  return (2 * np.arange(k) + 1) * n // (2 * k)


def document_spans(documents: Sequence[Document], seq_len: int) -> list[tuple[int, int]]:
  """Per document of a packed split (see `pack`), the first and last window holding its
  tokens or its EOS; documents only in the dropped tail have none."""
  width, num_windows = seq_len + 1, num_tokens(documents) // (seq_len + 1)
  ends = np.cumsum([len(data) + 1 for _, data in documents])
  starts = ends - np.diff(ends, prepend=0)
  return [(int(start // width), int(min(end - 1, num_windows * width - 1) // width))
          for start, end in zip(starts, ends) if start < num_windows * width]


def reference_losses(train_stream: np.ndarray, validation_windows: np.ndarray,
                     vocab_size: int) -> dict[str, float]:
  """The cross entropy (nats per token) of every validation target (`windows[:, 1:]`) under
  a unigram and a bigram model counted on the train token stream, both with add-one
  (Laplace) smoothing over the vocabulary: `(c(b) + 1) / (N + V)` and
  `(c(a, b) + 1) / (c(a) + V)` with `c(a)` counting `a` as the first of a pair. The bigram
  of a window's first target is conditioned on the window's first input."""
  stream = np.asarray(train_stream, np.int64)
  contexts = np.asarray(validation_windows[:, :-1], np.int64).reshape(-1)
  targets = np.asarray(validation_windows[:, 1:], np.int64).reshape(-1)
  # Pairs as codes a * V + b: sparse, so a large vocabulary needs no V x V table.
  codes, pair_counts = np.unique(stream[:-1] * vocab_size + stream[1:], return_counts=True)
  wanted = contexts * vocab_size + targets
  found = np.minimum(np.searchsorted(codes, wanted), len(codes) - 1)
  pairs = np.where(codes[found] == wanted, pair_counts[found], 0)
  firsts = np.bincount(stream[:-1], minlength=vocab_size)[contexts]
  bigram_logp = np.log((pairs + 1) / (firsts + vocab_size))
  return {"unigram_loss": unigram_loss(np.bincount(stream, minlength=vocab_size),
                                      np.bincount(targets, minlength=vocab_size)),
          "bigram_loss": float(-bigram_logp.mean())}


def unigram_loss(train_counts: np.ndarray, target_counts: np.ndarray) -> float:
  """The cross entropy (nats per token) of targets, int64 `target_counts` `[V]` of each token,
  under a unigram model of the train counts `[V]` with add-one smoothing over the vocabulary:
  `(c(b) + 1) / (N + V)`. Counts, not token arrays: a prepared corpus's splits do not fit in
  memory."""
  logp = np.log((train_counts + 1) / (train_counts.sum() + len(train_counts)))
  return float(-(target_counts @ logp) / target_counts.sum())


def target_counts(windows: Windows, seq_len: int, vocab_size: int) -> np.ndarray:
  """int64 `[vocab_size]` counts of every window's targets (`window[1:]`), read
  `COUNT_TOKENS` at a time."""
  counts = np.zeros(vocab_size, np.int64)
  step = max(1, COUNT_TOKENS // (seq_len + 1))
  for start in range(0, len(windows), step):
    targets = windows[start:start + step][:, 1:].reshape(-1)
    counts += np.bincount(targets, minlength=vocab_size)
  return counts


# Corpus.


class Corpus:
  """A `DataConfig`'s corpus: documents loaded, split and packed once, or a prepared corpus
  ("arrayrecord:DIR") read on demand.

  train_windows:      `Windows` int32 `[num_train_windows, seq_len + 1]`
  validation_windows: `Windows` int32 `[num_validation_windows, seq_len + 1]` (may be
                      empty: a single document, `validation_fraction=0`, or held-out
                      documents shorter than one window together)
  train_names, validation_names: the documents of each split (in-memory sources only; a
                      prepared corpus has None)
  validation_spans:   per held-out document, its first and last validation window (in-memory
                      sources only; a prepared corpus, whose records are no documents, has ())
  tokenizer:          its `vocab_size`, `eos_id`, `encode`, `decode`
  """

  def __init__(self, config: DataConfig):
    self.config = config
    self._reference = None
    if isinstance(config.source, str) and config.source.startswith(ARRAYRECORD):
      directory = config.source[len(ARRAYRECORD):]
      if not directory:  # what the pod presets leave for the user to fill in
        raise ValueError(f"DataConfig.source {config.source!r} names no corpus: prepare one "
                         f"with mhc-prepare-data and set DataConfig.source = "
                         f"'{ARRAYRECORD}/path/to/it'")
      prepared = arrayrecord.PreparedCorpus(directory, config.seq_len)
      self.tokenizer: Tokenizer = prepared.tokenizer
      self.train_names = self.validation_names = None
      self.validation_spans = ()
      self.train_windows, self.validation_windows = prepared.train, prepared.validation
      self._train_counts = prepared.train_unigram_counts
      self._read_threads, train_tokens = arrayrecord.READ_THREADS, prepared.train.num_tokens
    else:
      documents = load_documents(config.source)
      train, validation = split_documents(documents, config.validation_fraction,
                                          config.split_seed)
      self.tokenizer = ByteTokenizer()
      self.train_names = [name for name, _ in train]
      self.validation_names = [name for name, _ in validation]
      self.validation_spans = document_spans(validation, config.seq_len)
      self.train_windows = _read_only(pack(train, config.seq_len))
      self.validation_windows = _read_only(pack(validation, config.seq_len))
      self._train_counts = None  # counted from the windows, with the pairs, when asked
      self._read_threads, train_tokens = 0, num_tokens(train)
    if len(self.train_windows) == 0:
      raise ValueError(f"train split has {train_tokens} tokens, one sequence needs "
                       f"seq_len + 1 = {config.seq_len + 1}")

  @property
  def vocab_size(self) -> int:
    """Token ids lie in [0, vocab_size): `ModelConfig.vocab_size` must equal it."""
    return self.tokenizer.vocab_size

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 `[n]` token ids (no EOS)."""
    return self.tokenizer.encode(text)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Token ids `[n]` -> text, special tokens dropped."""
    return self.tokenizer.decode(ids)

  def train_iterator(self, shard_index: int = 0,
                     shard_count: int = 1) -> grain.DatasetIterator:
    """Endless shuffled batches; see the module function `train_iterator`."""
    return train_iterator(self.train_windows, self.config.batch_size, self.config.seed,
                          shard_index, shard_count, self._read_threads)

  def validation_batches(self, max_batches: int | None = None, shard_index: int = 0,
                         shard_count: int = 1) -> ValidationBatches:
    """One pass over the validation windows in order, at most `max_batches` batches."""
    return ValidationBatches(self.validation_windows, self.config.batch_size, max_batches,
                             shard_index, shard_count)

  def eval_batches(self, max_windows: int | None = None, shard_index: int = 0,
                   shard_count: int = 1) -> WeightedBatches:
    """Every validation window once (`max_windows` None), or a fixed subset of at most
    `max_windows` spread over every held-out document (`spread_windows`): it depends on the
    split alone, so it is the same at every step, for every seed and every model."""
    num_windows = len(self.validation_windows)
    indices = (np.arange(num_windows) if max_windows is None else
               spread_windows(num_windows, max_windows, self.validation_spans))
    return WeightedBatches(self.validation_windows, indices, self.config.batch_size,
                           shard_index, shard_count)

  def reference_losses(self) -> dict[str, float] | None:
    """`reference_losses` of the validation windows with counts from the train split,
    computed once. A prepared corpus gives `unigram_loss` alone, from the counts of its
    whole train split that `mhc-prepare-data` stored (counting at train time would take
    longer than the run's evaluation, and pair counts do not scale to a pod's vocabulary and
    corpus). None without validation windows, or for a corpus prepared without counts."""
    prepared = self.train_names is None
    if len(self.validation_windows) == 0 or (prepared and self._train_counts is None):
      return None
    if self._reference is None:
      self._reference = self._prepared_reference() if prepared else reference_losses(
          np.asarray(self.train_windows).reshape(-1), self.validation_windows, self.vocab_size)
    return self._reference

  def _prepared_reference(self) -> dict[str, float]:
    counts = target_counts(self.validation_windows, self.config.seq_len, self.vocab_size)
    return {"unigram_loss": unigram_loss(self._train_counts, counts)}


def _read_only(array: np.ndarray) -> np.ndarray:
  # Every iterator of a corpus reads the same windows: no caller may edit them.
  array.flags.writeable = False
  return array
