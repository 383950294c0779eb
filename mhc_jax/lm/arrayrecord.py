"""A prepared corpus on disk (what `mhc-prepare-data` writes), and its windows read on demand.

    DIR/metadata.json    written last: tokenizer, vocab_size, eos_id, dtype, record_tokens,
                         and per split its documents, tokens, index and shards
    DIR/tokenizer.json   (Hugging Face tokenizers only) a copy: the corpus stands alone
    DIR/SPLIT/NNNNN.arrayrecord  records of at most `record_tokens` token ids each, as
                         little-endian `dtype`; a split's records, shard after shard, are
                         its documents in order, each followed by EOS: one token stream
    DIR/SPLIT/index.npy  int64 `[num_records + 1]`: where each record starts in that stream
    DIR/train/unigram_counts.npy  int64 `[vocab_size]`: how often each token occurs in the
                         train split (the unigram reference; absent in corpora prepared
                         before it was added)

Documents are cut into records of at most `record_tokens` so that a window reads little
more than its own tokens however long the documents are (a play is ~100k tokens).
Opening checks what is cheap (each shard's size and record count, the index's and the
counts' checksums); a shard whose bytes were damaged in place fails when read, naming the
file. The full sha256 of every shard is in the metadata for `sha256sum`-style checks.
"""

import hashlib
import json
import pathlib

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from grain.sources import ArrayRecordDataSource

from mhc_jax.checks import one_line
from mhc_jax.lm import tokenizer

METADATA = "metadata.json"
FORMAT = "mhc-jax-prepared-corpus/1"
SPLITS = ("train", "validation")
INDEX = "index.npy"
UNIGRAM_COUNTS = "unigram_counts.npy"
# One record per chunk: grain's ArrayRecordDataSource reads records at random only so.
WRITER_OPTIONS = "group_size:1"
# Batches read ahead in threads, so that reading overlaps the train step (the main thread
# waits on the device); reading alone runs no faster with them on 2 CPUs.
READ_THREADS = 2


def sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for block in iter(lambda: file.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_metadata(directory: pathlib.Path) -> dict:
  """`DIR/metadata.json`; one-line ValueError when DIR is not a complete preparation."""
  path = directory / METADATA
  if not directory.is_dir():
    raise ValueError(f"prepared corpus {directory} not found")
  if not path.is_file():
    raise ValueError(f"{directory} holds no {METADATA}: not a prepared corpus, or its "
                     f"preparation did not finish (run mhc-prepare-data again)")
  try:
    metadata = json.loads(path.read_text())
  except (OSError, ValueError) as err:
    raise ValueError(f"{path} is damaged: {err}") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    raise ValueError(f"{path} is not the metadata of a {FORMAT} corpus")
  return metadata


class PreparedCorpus:
  """A prepared corpus opened for windows of `seq_len + 1` tokens: `tokenizer`, `train`
  and `validation` (`TokenWindows`), `train_unigram_counts` (int64 `[vocab_size]`, or None
  for a corpus prepared without them)."""

  def __init__(self, directory: str | pathlib.Path, seq_len: int):
    directory = pathlib.Path(directory).expanduser()
    self.metadata = read_metadata(directory)
    self.tokenizer = tokenizer.from_metadata(directory, self.metadata["tokenizer"])
    dtype = np.dtype(self.metadata["dtype"]).newbyteorder("<")
    self.train, self.validation = (
        TokenWindows(directory, self.metadata["splits"][split], dtype, seq_len)
        for split in SPLITS)
    self.train_unigram_counts = _load_counts(directory, self.metadata["splits"]["train"],
                                             self.metadata["vocab_size"])


class TokenWindows:
  """int32 `[len(self), seq_len + 1]` windows of a split's token stream (non-overlapping,
  the tail that fills no window dropped), read from its shards on demand.

  Memory holds the index (8 bytes a record, memory-mapped) and the records of the windows
  being read, whatever the corpus size. Indexed like an array, by an index array or a slice.
  """

  def __init__(self, directory: pathlib.Path, split: dict, dtype: np.dtype, seq_len: int):
    self.seq_len = seq_len
    self.num_tokens = int(split["tokens"])
    self._dtype = dtype
    self._paths = [directory / shard["file"] for shard in split["shards"]]
    for path, shard in zip(self._paths, split["shards"]):
      _check_shard(path, shard)
    self._shard_ends = np.cumsum([shard["records"] for shard in split["shards"]], dtype=np.int64)
    self._offsets = _load_index(directory / split["index"]["file"], split, self.num_tokens,
                                int(self._shard_ends[-1]) if self._paths else 0)
    self._source = ArrayRecordDataSource([str(p) for p in self._paths]) if self._paths else None

  def __len__(self) -> int:
    return self.num_tokens // (self.seq_len + 1)

  def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
    """Window indices `[k]` (or a slice) -> int32 `[k, seq_len + 1]`."""
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    index = np.asarray(index, np.int64).reshape(-1)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f"window indices must lie in [0, {len(self)}), got "
                       f"{index.min()}..{index.max()}")
    width = self.seq_len + 1
    starts = index * width
    # Window w spans records firsts[w] .. lasts[w] - 1.
    firsts = np.searchsorted(self._offsets, starts, "right") - 1
    lasts = np.searchsorted(self._offsets, starts + width, "left")
    keys = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(firsts, lasts)]
                                    or [np.zeros(0, np.int64)]))
    records = dict(zip(keys.tolist(), self._read(keys)))
    windows = np.empty((len(index), width), np.int32)
    for row, (start, first, last) in enumerate(zip(starts, firsts, lasts)):
      stream = np.concatenate([records[key] for key in range(first, last)])
      skip = start - self._offsets[first]
      windows[row] = stream[skip:skip + width]
    return windows

  def _read(self, keys: np.ndarray) -> list[np.ndarray]:
    """Records `keys` -> their tokens, each checked against the index."""
    try:
      raw = self._source.__getitems__(keys.tolist())
    except RuntimeError:  # riegeli's checksums: find the record, to name its file
      for key in keys.tolist():
        try:
          self._source[key]
        except RuntimeError as err:
          raise ValueError(f"{self._where(key)} is damaged: "
                           f"{one_line(err, limit=300, with_type=False)}; prepare the corpus "
                           f"again") from None
      raise
    records = []
    for key, data in zip(keys.tolist(), raw):
      tokens = np.frombuffer(data, self._dtype)
      expected = self._offsets[key + 1] - self._offsets[key]
      if len(tokens) != expected or len(data) % self._dtype.itemsize:
        raise ValueError(f"{self._where(key)} holds {len(data)} bytes, the index says "
                         f"{expected} tokens of {self._dtype.name}: shard and metadata "
                         f"disagree; prepare the corpus again")
      records.append(tokens)
    return records

  def _where(self, key: int) -> str:
    shard = int(np.searchsorted(self._shard_ends, key, "right"))
    local = key - (int(self._shard_ends[shard - 1]) if shard else 0)
    return f"record {local} of {self._paths[shard]}"


def _check_shard(path: pathlib.Path, shard: dict) -> None:
  if not path.is_file():
    raise ValueError(f"shard {path} is missing")
  size = path.stat().st_size
  if size != shard["bytes"]:
    raise ValueError(f"shard {path} is {size} bytes, {METADATA} says {shard['bytes']}: "
                     f"truncated or replaced; prepare the corpus again")
  try:
    reader = ArrayRecordReader(str(path))
    count = reader.num_records()
    reader.close()
  except RuntimeError as err:
    detail = one_line(err, limit=300, with_type=False)
    raise ValueError(f"shard {path} is damaged: {detail}") from None
  if count != shard["records"]:
    raise ValueError(f"shard {path} holds {count} records, {METADATA} says "
                     f"{shard['records']}")


def _check_file(path: pathlib.Path, sha256: str, what: str) -> None:
  """One-line errors naming `what` file is missing or not the one the metadata describes."""
  if not path.is_file():
    raise ValueError(f"{what} {path} is missing; prepare the corpus again")
  if sha256_file(path) != sha256:
    raise ValueError(f"{what} {path} does not match its sha256 in {METADATA}: damaged or "
                     f"replaced; prepare the corpus again")


def _load_index(path: pathlib.Path, split: dict, num_tokens: int,
                num_records: int) -> np.ndarray:
  """int64 `[num_records + 1]` record starts, memory-mapped, checked against the metadata."""
  _check_file(path, split["index"]["sha256"], "index")
  offsets = np.load(path, mmap_mode="r")
  if offsets.shape != (num_records + 1,) or offsets[0] != 0 or offsets[-1] != num_tokens:
    raise ValueError(f"index {path} does not fit {METADATA}: {offsets.shape[0] - 1} records "
                     f"of {int(offsets[-1])} tokens, its shards hold {num_records} records of "
                     f"{num_tokens} tokens")
  return offsets


def _load_counts(directory: pathlib.Path, split: dict, vocab_size: int) -> np.ndarray | None:
  """The split's int64 `[vocab_size]` token counts, checked against the metadata; None when
  its preparation stored none."""
  if "unigram_counts" not in split:
    return None
  entry = split["unigram_counts"]
  path = directory / entry["file"]
  _check_file(path, entry["sha256"], "unigram counts")
  counts = np.load(path)
  if counts.shape != (vocab_size,) or counts.sum() != entry["total"]:
    raise ValueError(f"unigram counts {path} do not fit {METADATA}: shape {counts.shape}, "
                     f"total {int(counts.sum())}; it says vocab_size {vocab_size}, total "
                     f"{entry['total']}; prepare the corpus again")
  return counts
