"""mhc-prepare-data: text -> a tokenized corpus of ArrayRecord shards for "arrayrecord:OUT".

Read by `DataConfig(source="arrayrecord:OUT")`; the layout is in `arrayrecord.py`.

    mhc-prepare-data OUT INPUT... [--tokenizer bytes | PATH/tokenizer.json] [--eos_token T]
        [--text_field text] [--validation_fraction 0.1] [--seed 0] [--workers N]

INPUT: paths or globs, local or fsspec URLs (gs://, s3://, ... with their package), of
`.txt` (a file is a document), `.jsonl` (a line is a document: its `--text_field`) or
`.parquet` (a row is a document: its `--text_field` column; needs pyarrow). Every document
is tokenized and followed by the tokenizer's EOS.

The split is the in-memory sources' rule (`data.split_documents`) over document names: a
file's path relative to the corpus root (`data.corpus_root`), plus ":LINE" (from 1) for a
.jsonl line or ":ROW" (from 0) for a parquet row. A corpus copied to another folder is
therefore split the same, and a folder of .txt files prepared with the byte tokenizer gives
the very batches the in-memory source gives.

Two passes, each spread over `--workers` processes: the first lists the documents (the
split needs every name), the second tokenizes pieces of input (a run of .txt files, a byte
range of a .jsonl, a parquet row group) in name order, each into one shard per split, and
counts its train tokens (EOS included): their sum, `train/unigram_counts.npy`, gives the
unigram reference loss (`Corpus.reference_losses`) without counting at train time.
Shards, the index and the counts are written under temporary names and renamed when
complete; `metadata.json` is written last. Run again on the same OUT: a complete preparation
of the same inputs and options says "already prepared"; a preparation that did not finish
(OUT holds `.preparing` and no metadata) is removed and started over, so its counts are
always the whole split's; anything else is refused.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from mhc_jax.checks import one_line
from mhc_jax.lm import arrayrecord, tokenizer
from mhc_jax.lm.data import corpus_root, split_key, split_threshold
from mhc_jax.lm.files import write_atomically

KINDS = (".txt", ".jsonl", ".parquet")
MARKER = ".preparing"
RECORD_TOKENS = 4096
# Input per second-pass task: a 64th of the input, so that workers share it and the progress
# bar moves, but 1 to 8 MB. Not a function of --workers: shards are the same whatever it is.
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 1 << 20, 8 << 20
# Documents per call of a Hugging Face tokenizer (its threads share a batch).
ENCODE_BATCH = 256
# Train tokens counted at a time: one count per short document would be a pass over the
# vocabulary each.
COUNT_BATCH_TOKENS = 1 << 20


class PrepareError(ValueError):
  """Bad input or output folder; the message is one line naming the culprit."""


@dataclasses.dataclass(frozen=True)
class InputFile:
  url: str
  name: str  # relative to the corpus root
  kind: str  # one of KINDS
  size: int


@dataclasses.dataclass(frozen=True)
class Piece:
  """Documents of one file: a .txt whole, a .jsonl's lines from byte `start` (line
  `first`) to byte `end`, a parquet's row group `start` (rows from `first`)."""
  file: InputFile
  start: int = 0
  end: int = 0
  first: int = 0


@dataclasses.dataclass(frozen=True)
class Options:
  text_field: str
  seed: int
  threshold: int  # documents with a split key below it are held out
  record_tokens: int
  out: str


# Inputs.


def resolve_inputs(patterns: Sequence[str]) -> list[InputFile]:
  """Paths / globs -> their files, sorted by name; one-line errors for what cannot be read."""
  if not patterns:
    raise PrepareError("no INPUT given")
  found, filesystems, stripped = {}, set(), []
  for pattern in patterns:
    try:
      fs, path = fsspec.core.url_to_fs(os.path.expanduser(pattern))
    except ImportError as err:
      raise PrepareError(f"cannot read {pattern}, a package is missing: {err}") from None
    filesystems.add(type(fs))
    is_file = fs.isfile(path)
    matches = {path: fs.info(path)} if is_file else fs.glob(path, detail=True)
    files = {p: info for p, info in matches.items() if info["type"] == "file"}
    if not files:
      raise PrepareError(f"input {pattern} matches no file")
    stripped.append((path, is_file))
    for p, info in files.items():
      found.setdefault(p, (fs, info["size"]))
  if len(filesystems) > 1:
    raise PrepareError(f"inputs {', '.join(patterns)} lie on different file systems")
  root = corpus_root([path for path, _ in stripped], dict(stripped).get)
  inputs = []
  for path, (fs, size) in found.items():
    kind = next((k for k in KINDS if path.endswith(k)), None)
    if kind is None:
      raise PrepareError(f"input {path} is none of {', '.join(KINDS)}")
    inputs.append(InputFile(fs.unstrip_protocol(path), os.path.relpath(path, root), kind, size))
  return sorted(inputs, key=lambda f: f.name)


def _open(file: InputFile):
  return fsspec.open(file.url, "rb").open()


def _parquet():
  try:
    import pyarrow.parquet
  except ImportError:
    raise PrepareError("reading .parquet needs the pyarrow package: pip install pyarrow") \
        from None
  return pyarrow.parquet


def piece_bytes(files: Sequence[InputFile]) -> int:
  return min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, sum(f.size for f in files) // 64))


def scan(file: InputFile, text_field: str, seed: int,
         piece_size: int) -> tuple[list[Piece], np.ndarray]:
  """First pass: a file's pieces (a .jsonl's of ~`piece_size` bytes) and its documents'
  uint64 split keys `[num_documents]`."""
  if file.kind == ".txt":
    return [Piece(file)], np.array([split_key(file.name, seed)], np.uint64)
  if file.kind == ".parquet":
    with _open(file) as stream:
      parquet = _parquet().ParquetFile(stream)
      if text_field not in parquet.schema_arrow.names:
        raise PrepareError(f"{file.url} has no column {text_field!r} (--text_field)")
      sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    starts = np.cumsum([0] + sizes)
    keys = [split_key(f"{file.name}:{row}", seed) for row in range(starts[-1])]
    return [Piece(file, g, g, int(starts[g])) for g in range(len(sizes))], \
        np.array(keys, np.uint64)
  pieces, keys, start, first, position = [], [], 0, 1, 0
  with _open(file) as stream:
    for number, line in enumerate(stream, 1):
      if position - start >= piece_size:
        pieces.append(Piece(file, start, position, first))
        start, first = position, number
      position += len(line)
      if line.strip():
        keys.append(split_key(f"{file.name}:{number}", seed))
  pieces.append(Piece(file, start, position, first))
  return pieces, np.array(keys, np.uint64)


def documents(piece: Piece, text_field: str) -> Iterator[tuple[str, str | bytes]]:
  """Second pass: `(name, text)` of a piece's documents, in order."""
  file = piece.file
  if file.kind == ".txt":
    with _open(file) as stream:
      yield file.name, stream.read()
  elif file.kind == ".parquet":
    with _open(file) as stream:
      column = _parquet().ParquetFile(stream).read_row_group(piece.start, [text_field])
    for row, text in enumerate(column.column(0).to_pylist(), piece.first):
      if text is not None:  # a null is no document
        yield f"{file.name}:{row}", text
  else:
    with _open(file) as stream:
      stream.seek(piece.start)
      position = piece.start
      for number, line in enumerate(stream, piece.first):
        if position >= piece.end:
          break
        position += len(line)
        if line.strip():
          yield f"{file.name}:{number}", _text(line, text_field, f"{file.url}:{number}")


def _text(line: bytes, text_field: str, where: str) -> str:
  try:
    record = json.loads(line)
  except ValueError as err:
    raise PrepareError(f"{where} is not JSON: {err}") from None
  if not isinstance(record, dict) or text_field not in record:
    raise PrepareError(f"{where} has no field {text_field!r} (--text_field)")
  text = record[text_field]
  if not isinstance(text, str):
    raise PrepareError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
  return text


# Second pass: one task per group of pieces, each writing one shard per split.


_worker = {}


def _init_worker(tokenizer_spec: str, eos_token: str | None):
  _worker["tokenizer"] = tokenizer.load_tokenizer(tokenizer_spec, eos_token)


def _encoded(tok, docs: Iterator[tuple[str, str | bytes]]) -> Iterator[tuple[str, np.ndarray]]:
  """`(name, int32 token ids [n])`, no EOS yet."""
  if tok.kind == tokenizer.BYTES:
    yield from ((name, tok.encode(text)) for name, text in docs)
    return
  batch = []
  for doc in docs:
    batch.append(doc)
    if len(batch) == ENCODE_BATCH:
      yield from zip([n for n, _ in batch], tok.encode_batch([t for _, t in batch]))
      batch = []
  if batch:
    yield from zip([n for n, _ in batch], tok.encode_batch([t for _, t in batch]))


def run_task(task: tuple[int, list[Piece], Options]) -> dict:
  """Writes `OUT/SPLIT/NNNNN.arrayrecord` for the task's documents of each split; -> per
  split its shard (or None), documents, tokens and record lengths int64 `[num_records]`,
  and for train the int64 `[vocab_size]` `unigram_counts` of its tokens."""
  number, pieces, options = task
  tok = _worker["tokenizer"]
  dtype = np.dtype(dtype_name(tok.vocab_size)).newbyteorder("<")
  shards = {split: _ShardWriter(pathlib.Path(options.out) / split / f"{number:05d}.arrayrecord")
            for split in arrayrecord.SPLITS}
  train_counts = _TokenCounter(tok.vocab_size)
  try:
    docs = (doc for piece in pieces for doc in documents(piece, options.text_field))
    for name, ids in _encoded(tok, docs):
      held_out = split_key(name, options.seed) < options.threshold
      stream = np.append(ids, tok.eos_id).astype(dtype)
      shards[arrayrecord.SPLITS[held_out]].write_document(stream, options.record_tokens)
      if not held_out:
        train_counts.add(stream)
  except BaseException:
    for shard in shards.values():
      shard.abandon()
    raise
  results = {split: shard.finish() for split, shard in shards.items()}
  results["train"]["unigram_counts"] = train_counts.total()
  return results


class _TokenCounter:
  """int64 `[vocab_size]` counts of the tokens added, `COUNT_BATCH_TOKENS` at a time."""

  def __init__(self, vocab_size: int):
    self.counts = np.zeros(vocab_size, np.int64)
    self.pending, self.pending_tokens = [], 0

  def add(self, tokens: np.ndarray):
    self.pending.append(tokens)
    self.pending_tokens += len(tokens)
    if self.pending_tokens >= COUNT_BATCH_TOKENS:
      self._count_pending()

  def total(self) -> np.ndarray:
    self._count_pending()
    return self.counts

  def _count_pending(self):
    if self.pending:
      self.counts += np.bincount(np.concatenate(self.pending), minlength=len(self.counts))
    self.pending, self.pending_tokens = [], 0


class _ShardWriter:
  """One shard, opened at its first document, renamed from a temporary name when done."""

  def __init__(self, path: pathlib.Path):
    self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
    self.writer, self.lengths, self.documents = None, [], 0

  def write_document(self, tokens: np.ndarray, record_tokens: int):
    if self.writer is None:
      self.writer = ArrayRecordWriter(str(self.tmp), arrayrecord.WRITER_OPTIONS)
    for start in range(0, len(tokens), record_tokens):
      record = tokens[start:start + record_tokens]
      self.writer.write(record.tobytes())
      self.lengths.append(len(record))
    self.documents += 1

  def finish(self) -> dict:
    result = {"documents": self.documents, "lengths": np.array(self.lengths, np.int64),
              "shard": None}
    if self.writer is not None:
      self.writer.close()
      self.tmp.rename(self.path)
      result["shard"] = {"records": len(self.lengths), "tokens": int(sum(self.lengths)),
                         "bytes": self.path.stat().st_size,
                         "sha256": arrayrecord.sha256_file(self.path)}
    return result

  def abandon(self):
    if self.writer is not None:
      self.writer.close()
      self.tmp.unlink(missing_ok=True)


def tasks(pieces: list[Piece], options: Options,
          piece_size: int) -> list[tuple[int, list[Piece], Options]]:
  """Consecutive pieces grouped up to `piece_size` bytes of input (many small .txt files)."""
  groups, size = [], 0
  for piece in pieces:
    this_size = piece.file.size if piece.file.kind == ".txt" else piece_size
    if not groups or size + this_size > piece_size:
      groups.append([])
      size = 0
    groups[-1].append(piece)
    size += this_size
  return [(number, group, options) for number, group in enumerate(groups)]


def dtype_name(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


# The output folder.


def _recipe(inputs: Sequence[str], files: list[InputFile], tok, **options) -> dict:
  """What a preparation is made of: the same recipe, the same corpus."""
  tokenizer_id = (tokenizer.BYTES if tok.kind == tokenizer.BYTES
                  else arrayrecord.sha256_file(tok.path))
  return {"inputs": list(inputs), "files": [[f.name, f.size] for f in files],
          "tokenizer": tokenizer_id, "eos_id": tok.eos_id, **options}


# What a preparation writes into OUT.
OURS = (MARKER, arrayrecord.METADATA, "tokenizer.json", *arrayrecord.SPLITS)


def check_out(out: pathlib.Path, recipe: dict) -> bool:
  """True when OUT already holds this preparation; removes one that did not finish; raises
  when OUT holds anything else."""
  if not out.exists():
    return False
  if not out.is_dir():
    raise PrepareError(f"OUT {out} is a file")
  entries = {entry.name for entry in out.iterdir()}
  if arrayrecord.METADATA in entries:
    try:
      metadata = arrayrecord.read_metadata(out)
    except ValueError as err:
      raise PrepareError(f"OUT {out} holds something else ({err}); choose another OUT") \
          from None
    if metadata.get("recipe") != recipe:
      raise PrepareError(f"OUT {out} holds another preparation (other inputs or options); "
                         f"choose another OUT or delete it")
    return True
  if entries and (MARKER not in entries or entries - set(OURS)):
    raise PrepareError(f"OUT {out} is not empty and holds no preparation: {sorted(entries)[0]}"
                       f"{' ...' if len(entries) > 1 else ''}; choose another OUT")
  _remove_ours(out)  # a preparation that did not finish: start over
  return False


def _remove_ours(out: pathlib.Path):
  for name in OURS:
    path = out / name
    if path.is_dir():
      shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
      path.unlink()


# Preparation.


def prepare(out: str, inputs: Sequence[str], tokenizer_spec: str = tokenizer.BYTES,
            eos_token: str | None = None, text_field: str = "text",
            validation_fraction: float = 0.1, seed: int = 0, workers: int = 1,
            record_tokens: int = RECORD_TOKENS, progress: bool = False) -> tuple[dict, bool]:
  """Prepares OUT; -> (its metadata, whether this call wrote it). See the module doc."""
  if not 0 <= validation_fraction < 1:
    raise PrepareError(f"--validation_fraction must lie in [0, 1), got {validation_fraction}")
  if record_tokens < 2 or workers < 1:
    raise PrepareError("--record_tokens must be >= 2 and --workers >= 1")
  out = pathlib.Path(out).expanduser()
  files = resolve_inputs(inputs)
  tok = tokenizer.load_tokenizer(tokenizer_spec, eos_token)
  recipe = _recipe(inputs, files, tok, text_field=text_field,
                   validation_fraction=validation_fraction, seed=seed,
                   record_tokens=record_tokens)
  if check_out(out, recipe):
    return arrayrecord.read_metadata(out), False
  created = not out.exists()
  context = multiprocessing.get_context("spawn")  # the caller may hold threads (JAX, grain)
  try:
    # Leaving this block ends the workers: none writes while a failure cleans up.
    with (context.Pool(workers, _init_worker, (tokenizer_spec, eos_token)) if workers > 1
          else contextlib.nullcontext()) as pool:
      map_ = pool.imap if pool else map
      piece_size = piece_bytes(files)
      scans = list(map_(_scan_task, [(f, text_field, seed, piece_size) for f in files]))
      keys = np.concatenate([k for _, k in scans])
      if not len(keys):
        raise PrepareError(f"input {', '.join(inputs)} holds no documents")
      options = Options(text_field, seed, split_threshold(keys, validation_fraction),
                        record_tokens, str(out))
      out.mkdir(parents=True, exist_ok=True)
      (out / MARKER).write_text(json.dumps(recipe))
      for split in arrayrecord.SPLITS:
        (out / split).mkdir()
      if pool is None:
        _init_worker(tokenizer_spec, eos_token)
      work = tasks([piece for pieces, _ in scans for piece in pieces], options, piece_size)
      results, train_counts = _with_progress(map_(run_task, work), len(work), tok.vocab_size,
                                             progress)
      return _finish(out, tok, recipe, record_tokens, results, train_counts), True
  except BaseException:
    # Only what this call wrote: OUT held no other preparation (check_out).
    _remove_ours(out)
    if created:
      shutil.rmtree(out, ignore_errors=True)
    raise


def _scan_task(args) -> tuple[list[Piece], np.ndarray]:
  return scan(*args)


def _with_progress(results: Iterator[dict], total: int, vocab_size: int,
                   show: bool) -> tuple[list[dict], np.ndarray]:
  """Collects task results, showing documents and tokens per second on stderr; -> them and
  the sum of their train `unigram_counts`, taken out of each as it comes (an array the size
  of the vocabulary per task would not fit in memory for a large corpus)."""
  columns = (TextColumn("preparing"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
             TextColumn("{task.fields[docs]:,} docs {task.fields[tokens]:,} tokens  "
                        "{task.fields[docs_rate]:,.0f} docs/s {task.fields[tokens_rate]:,.0f} "
                        "tokens/s"), TimeElapsedColumn())
  collected, docs, tokens, start = [], 0, 0, time.perf_counter()
  train_counts = np.zeros(vocab_size, np.int64)
  # Disabled, rich would still print an empty line.
  with Progress(*columns) if show else contextlib.nullcontext() as bar:
    task = bar and bar.add_task("", total=total, docs=0, tokens=0, docs_rate=0, tokens_rate=0)
    for result in results:
      train_counts += result["train"].pop("unigram_counts")
      collected.append(result)
      docs += sum(r["documents"] for r in result.values())
      tokens += sum(int(r["lengths"].sum()) for r in result.values())
      elapsed = max(time.perf_counter() - start, 1e-9)
      if bar:
        bar.update(task, advance=1, docs=docs, tokens=tokens, docs_rate=docs / elapsed,
                   tokens_rate=tokens / elapsed)
  return collected, train_counts


def _finish(out: pathlib.Path, tok, recipe: dict, record_tokens: int, results: list[dict],
            train_counts: np.ndarray) -> dict:
  """Index files, the train unigram counts, the tokenizer's copy, then metadata.json; -> the
  metadata."""
  splits = {}
  for split in arrayrecord.SPLITS:
    parts = [result[split] for result in results]
    lengths = np.concatenate([np.zeros(1, np.int64)] + [p["lengths"] for p in parts])
    index = out / split / arrayrecord.INDEX
    _save_array(index, np.cumsum(lengths))
    shards = [{"file": f"{split}/{number:05d}.arrayrecord", **p["shard"]}
              for number, p in enumerate(parts) if p["shard"]]
    splits[split] = {"documents": sum(p["documents"] for p in parts),
                     "tokens": int(lengths.sum()), "records": len(lengths) - 1,
                     "index": {"file": f"{split}/{arrayrecord.INDEX}",
                               "sha256": arrayrecord.sha256_file(index)},
                     "shards": shards}
  counts = out / "train" / arrayrecord.UNIGRAM_COUNTS
  _save_array(counts, train_counts)
  splits["train"]["unigram_counts"] = {"file": f"train/{arrayrecord.UNIGRAM_COUNTS}",
                                       "sha256": arrayrecord.sha256_file(counts),
                                       "total": int(train_counts.sum())}
  documents = sum(s["documents"] for s in splits.values())
  if sum(s["tokens"] for s in splits.values()) == documents:
    raise PrepareError(f"input {', '.join(recipe['inputs'])} holds no tokens: {documents} "
                       f"empty document(s)")
  if tok.kind == tokenizer.BYTES:
    tokenizer_meta = {"kind": tokenizer.BYTES}
  else:
    write_atomically(out / "tokenizer.json", tok.path.read_bytes())
    tokenizer_meta = {"kind": tokenizer.HUGGINGFACE, "file": "tokenizer.json",
                      "sha256": recipe["tokenizer"], "eos_token": tok.eos_token}
  metadata = {"format": arrayrecord.FORMAT, "tokenizer": tokenizer_meta,
              "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
              "dtype": dtype_name(tok.vocab_size), "byte_order": "little",
              "record_tokens": record_tokens, "splits": splits, "recipe": recipe}
  write_atomically(out / arrayrecord.METADATA, json.dumps(metadata, indent=1).encode())
  (out / MARKER).unlink()
  return metadata


def _save_array(path: pathlib.Path, array: np.ndarray):
  """`array` as a .npy file, written atomically."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_atomically(path, buffer.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="mhc-prepare-data", description=__doc__.split("\n")[0])
  parser.add_argument("out", metavar="OUT", help="the corpus directory to write")
  parser.add_argument("inputs", metavar="INPUT", nargs="+",
                      help=".txt / .jsonl / .parquet paths or globs, local or fsspec URLs")
  parser.add_argument("--tokenizer", default=tokenizer.BYTES,
                      help="'bytes' or the path of a Hugging Face tokenizer.json")
  parser.add_argument("--eos_token", default=None,
                      help=f"ends every document; default: the first of "
                           f"{', '.join(tokenizer.EOS_CANDIDATES)} in the vocabulary")
  parser.add_argument("--text_field", default="text", help=".jsonl field / .parquet column")
  parser.add_argument("--validation_fraction", type=float, default=0.1,
                      help="share of the documents held out for validation")
  parser.add_argument("--seed", type=int, default=0, help="picks the held-out documents")
  parser.add_argument("--workers", type=int, default=1,
                      help="processes; the byte tokenizer is I/O-bound and a tokenizer.json's "
                           "batches use every core already: more pay for JSON / parquet "
                           "parsing and remote inputs (each costs seconds to start)")
  parser.add_argument("--record_tokens", type=int, default=RECORD_TOKENS,
                      help="most tokens per record (longer documents span records)")
  args = parser.parse_args(argv)
  try:
    metadata, fresh = prepare(args.out, args.inputs, args.tokenizer, args.eos_token,
                              args.text_field, args.validation_fraction, args.seed,
                              args.workers, args.record_tokens, progress=sys.stderr.isatty())
  except (ValueError, OSError) as err:
    print(f"mhc-prepare-data: {one_line(err, with_type=False)}", file=sys.stderr)
    return 2
  splits = metadata["splits"]
  summary = ", ".join(f"{split} {splits[split]['documents']:,} documents / "
                      f"{splits[split]['tokens']:,} tokens" for split in arrayrecord.SPLITS)
  print(f"mhc-prepare-data: {args.out} {'prepared' if fresh else 'is already prepared'}: "
        f"{summary}; train with DataConfig.source = 'arrayrecord:{args.out}' and "
        f"ModelConfig.vocab_size = {metadata['vocab_size']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
