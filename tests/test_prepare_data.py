"""mhc_jax.lm.prepare_data and the "arrayrecord:DIR" source: shards and metadata, round trips
with the byte tokenizer and a BPE the tests train, the same batches as the in-memory path,
sharding, resume, damage, re-runs, bad input, bounded memory, the train split's unigram
counts and reference, and a short training run."""

import collections
import importlib.util
import json
import pathlib
import re
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from mhc_jax.lm import arrayrecord, data, prepare_data, tokenizer
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.train import LoopConfig, train

WORDS = ("thou art my lord and I thy humble servant for the king doth love whence comes "
         "this sweet sorrow é ü").split()


def verse(rng, lines):
  return "\n".join(" ".join(rng.choice(WORDS, 7)).capitalize() + "." for _ in range(lines))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  """Twelve .txt documents of pseudo-verse (~250 KB) under `root/deep/`; the root."""
  root = tmp_path_factory.mktemp("texts")
  (root / "deep").mkdir()
  rng = np.random.default_rng(0)
  for d in range(12):
    (root / "deep" / f"doc{d:02d}.txt").write_text(verse(rng, 500 + 40 * d))
  return root


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, texts):
  """A byte-level BPE of 400 tokens trained on the texts, with "</s>"; its tokenizer.json."""
  return tokenizer.train_bpe((p.read_text() for p in sorted(texts.glob("deep/*.txt"))), 400,
                             tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, texts):
  """The texts prepared with the byte tokenizer; the output folder."""
  out = tmp_path_factory.mktemp("prepared") / "bytes"
  prepare_data.prepare(str(out), [str(texts / "**/*.txt")])
  return out


def records(out, split):
  """Every record of a split's shards, in order, as token arrays."""
  metadata = json.loads((out / "metadata.json").read_text())
  dtype = np.dtype(metadata["dtype"]).newbyteorder("<")
  result = []
  for shard in metadata["splits"][split]["shards"]:
    reader = ArrayRecordReader(str(out / shard["file"]))
    result += [np.frombuffer(r, dtype) for r in reader.read_all()]
    reader.close()
  return result


def documents_of(out, split, eos_id):
  stream = np.concatenate(records(out, split))
  ends = np.flatnonzero(stream == eos_id)
  return np.split(stream[:ends[-1]], ends[:-1] + 1), stream


def direct_train_counts(texts):
  """The byte-tokenized train split's token counts `[258]`, by counting its documents here:
  their bytes, plus one EOS each."""
  originals = [(p.relative_to(texts).as_posix(), p.read_bytes())
               for p in sorted(texts.glob("deep/*.txt"))]
  train, _ = data.split_documents(originals, 0.1, seed=0)
  tally = collections.Counter(b"".join(text for _, text in train))
  tally[tokenizer.EOS] += len(train)
  return np.array([tally[token] for token in range(258)], np.int64)


def corpus(out, **config):
  return data.Corpus(data.DataConfig(**{"source": f"arrayrecord:{out}", "seq_len": 16,
                                        "batch_size": 4, **config}))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def fails(capsys, argv, pattern):
  """main(argv) exits 2 printing one line that matches `pattern`."""
  assert prepare_data.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and re.search(pattern, err), err


# What is written.


def test_shards_match_metadata_and_bytes_round_trip(prepared, texts):
  metadata = json.loads((prepared / "metadata.json").read_text())
  assert (metadata["vocab_size"], metadata["eos_id"], metadata["dtype"]) == (258, 256, "uint16")
  assert metadata["tokenizer"] == {"kind": "bytes"}
  originals = {p.relative_to(texts).as_posix(): p.read_bytes()
               for p in texts.glob("deep/*.txt")}
  train_names, validation_names = (
      [name for name, _ in split] for split in data.split_documents(
          list(originals.items()), 0.1, seed=0))
  for split, names in (("train", train_names), ("validation", validation_names)):
    meta = metadata["splits"][split]
    for shard in meta["shards"]:
      assert arrayrecord.sha256_file(prepared / shard["file"]) == shard["sha256"]
    docs, stream = documents_of(prepared, split, tokenizer.EOS)
    assert len(stream) == meta["tokens"] and meta["documents"] == len(names) == len(docs)
    assert all(len(r) <= metadata["record_tokens"] for r in records(prepared, split))
    assert [tokenizer.decode(doc).encode() for doc in docs] == [originals[n] for n in names]


def test_bpe_corpus_from_jsonl_round_trips(tmp_path, texts, bpe):
  rows = [p.read_text() for p in sorted(texts.glob("deep/*.txt"))][:6]
  lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(rows)]
  (tmp_path / "in").mkdir()
  (tmp_path / "in/part.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
  out = tmp_path / "out"
  metadata, fresh = prepare_data.prepare(str(out), [str(tmp_path / "in/*.jsonl")], str(bpe),
                                         validation_fraction=0.2)
  assert fresh and metadata["tokenizer"]["eos_token"] == "</s>"
  assert metadata["vocab_size"] == tokenizer.load_tokenizer(str(bpe)).vocab_size
  assert 300 < metadata["vocab_size"] <= 400 and metadata["dtype"] == "uint16"
  assert (out / "tokenizer.json").read_bytes() == bpe.read_bytes()
  loaded = tokenizer.from_metadata(out, metadata["tokenizer"])
  names = [f"part.jsonl:{n}" for n in (1, 2, 3, 5, 6, 7)]  # line 4 is blank
  keys = np.array([data.split_key(n, 0) for n in names], np.uint64)
  held_out = keys < data.split_threshold(keys, 0.2)
  for split, wanted in (("train", ~held_out), ("validation", held_out)):
    docs, stream = documents_of(out, split, metadata["eos_id"])
    assert len(stream) == metadata["splits"][split]["tokens"]
    assert [loaded.decode(doc) for doc in docs] == [t for t, w in zip(rows, wanted) if w]
  assert len(stream) < 0.6 * sum(len(t.encode()) for t in rows)  # BPE merges bytes
  text = corpus(out, seq_len=32).decode(corpus(out, seq_len=32).train_windows[[0]])
  assert text and text in "".join(rows)


def test_a_copied_corpus_prepares_the_same(tmp_path, texts, prepared):
  shutil.copytree(texts, tmp_path / "elsewhere")
  metadata, _ = prepare_data.prepare(str(tmp_path / "out"),
                                     [str(tmp_path / "elsewhere/**/*.txt")], workers=2)
  before = json.loads((prepared / "metadata.json").read_text())
  assert metadata["splits"] == before["splits"]  # same shards, checksums included


def test_train_unigram_counts_are_a_direct_count(prepared, texts):
  entry = json.loads((prepared / "metadata.json").read_text())["splits"]["train"]
  counts = np.load(prepared / "train/unigram_counts.npy")
  expected = direct_train_counts(texts)
  assert counts.dtype == np.int64
  np.testing.assert_array_equal(counts, expected)
  assert expected.sum() == entry["tokens"]
  assert entry["unigram_counts"] == {
      "file": "train/unigram_counts.npy", "total": entry["tokens"],
      "sha256": arrayrecord.sha256_file(prepared / "train/unigram_counts.npy")}


def test_unigram_counts_add_up_over_tasks(tmp_path, texts, bpe, monkeypatch):
  monkeypatch.setattr(prepare_data, "MIN_PIECE_BYTES", 60_000)  # a few documents a task
  monkeypatch.setattr(prepare_data, "COUNT_BATCH_TOKENS", 15_000)  # counted in batches
  out = tmp_path / "out"
  metadata, _ = prepare_data.prepare(str(out), [str(texts / "**/*.txt")], str(bpe))
  assert len(metadata["splits"]["train"]["shards"]) > 5
  tally = collections.Counter(np.concatenate(records(out, "train")).tolist())
  np.testing.assert_array_equal(np.load(out / "train/unigram_counts.npy"),
                                [tally[token] for token in range(metadata["vocab_size"])])


def test_jsonl_pieces_hold_every_line_once(tmp_path):
  lines = [json.dumps({"text": f"line {i} " * (i % 7)}) for i in range(300)]
  (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n\n")
  (file,) = prepare_data.resolve_inputs([str(tmp_path / "x.jsonl")])
  pieces, keys = prepare_data.scan(file, "text", 0, piece_size=500)
  assert len(pieces) > 10 and len(keys) == 300
  docs = [doc for piece in pieces for doc in prepare_data.documents(piece, "text")]
  assert docs == [(f"x.jsonl:{i + 1}", json.loads(line)["text"]) for i, line in enumerate(lines)]


def test_fsspec_url_inputs(tmp_path):
  import fsspec
  memory = fsspec.filesystem("memory")
  for i in range(3):
    memory.pipe(f"/{tmp_path.name}/sub/{i}.txt", b"a document " * (i + 1))
  metadata, _ = prepare_data.prepare(str(tmp_path / "out"), [f"memory://{tmp_path.name}/*/*.txt"])
  assert metadata["recipe"]["files"] == [["sub/0.txt", 11], ["sub/1.txt", 22], ["sub/2.txt", 33]]
  assert sum(s["tokens"] for s in metadata["splits"].values()) == 66 + 3


# Reading.


def test_batches_equal_the_in_memory_path(prepared, texts):
  streamed = corpus(prepared)
  in_memory = data.Corpus(data.DataConfig(source=str(texts / "**/*.txt"), seq_len=16,
                                          batch_size=4))
  assert len(streamed.train_windows) == len(in_memory.train_windows)
  np.testing.assert_array_equal(streamed.train_windows[:], in_memory.train_windows)
  np.testing.assert_array_equal(streamed.validation_windows[5:9], in_memory.validation_windows[5:9])
  for a, b in zip(take(streamed.train_iterator(), 30), take(in_memory.train_iterator(), 30)):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])
  for a, b in zip(streamed.validation_batches(3), in_memory.validation_batches(3)):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert streamed.vocab_size == 258 and streamed.decode(streamed.encode("hé")) == "hé"


def test_unigram_reference_of_the_validation_targets(prepared, texts, monkeypatch):
  monkeypatch.setattr(data, "COUNT_TOKENS", 100)  # counted a few windows at a time
  streamed = corpus(prepared)
  counts = direct_train_counts(texts)
  targets = streamed.validation_windows[:][:, 1:].reshape(-1)
  assert len(targets) > 1000
  expected = -np.mean(np.log((counts[targets] + 1) / (counts.sum() + len(counts))))
  reference = streamed.reference_losses()
  assert reference == {"unigram_loss": pytest.approx(expected, rel=1e-12)}
  assert streamed.reference_losses() is reference  # counted once per corpus


def test_a_corpus_prepared_without_counts_has_no_reference(tmp_path, prepared):
  out = tmp_path / "old"
  shutil.copytree(prepared, out)
  metadata = json.loads((out / "metadata.json").read_text())
  del metadata["splits"]["train"]["unigram_counts"]
  (out / "metadata.json").write_text(json.dumps(metadata))
  (out / "train/unigram_counts.npy").unlink()
  assert corpus(out).reference_losses() is None


def test_windows_spanning_records_and_documents(prepared):
  windows = corpus(prepared, seq_len=5000).train_windows  # > record_tokens
  stream = np.concatenate(records(prepared, "train"))
  assert len(windows) == len(stream) // 5001
  np.testing.assert_array_equal(windows[[3, 0]],
                                stream[[*range(3 * 5001, 4 * 5001), *range(5001)]].reshape(2, -1))


def test_process_shards_make_the_global_batch(prepared):
  streamed = corpus(prepared, batch_size=8)
  global_batches = take(streamed.train_iterator(), 5)
  shards = [take(streamed.train_iterator(i, 2), 5) for i in range(2)]
  for b, expected in enumerate(global_batches):
    assert all(shard[b]["inputs"].shape == (4, 16) for shard in shards)
    np.testing.assert_array_equal(
        np.concatenate([shard[b]["inputs"] for shard in shards]), expected["inputs"])


def test_resume_through_orbax_is_bitwise(prepared, tmp_path):
  streamed = corpus(prepared)
  iterator = streamed.train_iterator(1, 2)
  take(iterator, 7)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = take(iterator, 4)
  resumed = corpus(prepared).train_iterator(1, 2)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  for a, b in zip(take(resumed, 4), expected):
    assert a["inputs"].tobytes() == b["inputs"].tobytes()
    assert a["targets"].tobytes() == b["targets"].tobytes()


def test_memory_stays_bounded(tmp_path):
  """Reading a corpus of 32M tokens (64 MB as uint16) grows the RSS by far less (about
  8 MB here: reader buffers and threads, whatever the corpus size)."""
  psutil = pytest.importorskip("psutil")
  rng = np.random.default_rng(0)
  (tmp_path / "in").mkdir()
  for d in range(32):
    (tmp_path / "in" / f"{d}.txt").write_bytes(rng.integers(32, 127, 1 << 20, np.uint8).tobytes())
  out = tmp_path / "out"
  metadata, _ = prepare_data.prepare(str(out), [str(tmp_path / "in/*.txt")])
  corpus_bytes = 2 * metadata["splits"]["train"]["tokens"]
  rss = psutil.Process().memory_info
  iterator = corpus(out, seq_len=512, batch_size=16).train_iterator()
  before, peak = rss().rss, 0
  for _ in range(200):  # 1.6M tokens, from every shard
    next(iterator)
    peak = max(peak, rss().rss)  # ru_maxrss would hide growth below an earlier peak
  held = np.ones(corpus_bytes, np.uint8)  # a corpus in memory: the measure sees it
  growth, control = peak - before, rss().rss - before
  del held
  print(f"RSS growth {growth / 2**20:.1f} MiB reading, {control / 2**20:.1f} MiB holding "
        f"it all; corpus {corpus_bytes / 2**20:.1f} MiB")
  assert growth < corpus_bytes / 4 and control > corpus_bytes


# Damage.


@pytest.fixture
def damaged(tmp_path, prepared):
  out = tmp_path / "copy"
  shutil.copytree(prepared, out)
  return out, out / "train/00000.arrayrecord"


def one_line_error(make, pattern):
  with pytest.raises(ValueError) as error:
    make()
  assert "\n" not in str(error.value) and re.search(pattern, str(error.value)), error.value


def test_truncated_shard(damaged):
  out, shard = damaged
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  one_line_error(lambda: corpus(out), f"shard {re.escape(str(shard))} is .* truncated")


def test_corrupted_shard(damaged):
  out, shard = damaged
  raw = bytearray(shard.read_bytes())
  middle = len(raw) // 3
  raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
  shard.write_bytes(bytes(raw))
  windows = corpus(out).train_windows
  one_line_error(lambda: windows[np.arange(len(windows))],
                 f"record \\d+ of {re.escape(str(shard))} is damaged")


def test_metadata_and_shard_disagree(damaged):
  out, shard = damaged
  metadata = json.loads((out / "metadata.json").read_text())
  metadata["splits"]["train"]["shards"][0]["records"] += 1
  (out / "metadata.json").write_text(json.dumps(metadata))
  one_line_error(lambda: corpus(out), f"shard {re.escape(str(shard))} holds \\d+ records, "
                                      f"metadata.json says")


def test_tampered_or_missing_unigram_counts(damaged):
  out, _ = damaged
  path = out / "train/unigram_counts.npy"
  counts = np.load(path)
  counts[ord("e")] += 1
  np.save(path, counts)
  one_line_error(lambda: corpus(out), f"unigram counts {re.escape(str(path))} does not match "
                                      f"its sha256 in metadata.json.*prepare the corpus again")
  path.unlink()
  one_line_error(lambda: corpus(out), f"unigram counts {re.escape(str(path))} is missing")


def test_not_a_prepared_corpus(tmp_path):
  one_line_error(lambda: corpus(tmp_path), "holds no metadata.json")


# Re-runs and the output folder.


def test_rerun_says_already_prepared(prepared, texts, capsys):
  stamp = (prepared / "metadata.json").stat().st_mtime_ns
  assert prepare_data.main([str(prepared), str(texts / "**/*.txt"), "--workers", "1"]) == 0
  assert "is already prepared" in capsys.readouterr().out
  assert (prepared / "metadata.json").stat().st_mtime_ns == stamp


def test_out_holding_something_else_is_refused(tmp_path, texts, prepared, capsys):
  fails(capsys, [str(prepared), str(texts / "**/*.txt"), "--seed", "1"],
        "holds another preparation")
  (tmp_path / "notes.txt").write_text("mine")
  fails(capsys, [str(tmp_path), str(texts / "**/*.txt")], "is not empty and holds no prep")
  assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unfinished_preparation_starts_over(tmp_path, texts, prepared):
  out = tmp_path / "out"
  (out / "train").mkdir(parents=True)
  (out / "train/00007.arrayrecord").write_bytes(b"left by a killed run")
  np.save(out / "train/unigram_counts.npy", np.ones(258, np.int64))  # a killed run's too
  (out / prepare_data.MARKER).write_text("{}")
  metadata, fresh = prepare_data.prepare(str(out), [str(texts / "**/*.txt")])
  assert fresh and not (out / "train/00007.arrayrecord").exists()
  np.testing.assert_array_equal(np.load(out / "train/unigram_counts.npy"),
                                direct_train_counts(texts))
  assert not (out / prepare_data.MARKER).exists()
  assert metadata["splits"] == json.loads((prepared / "metadata.json").read_text())["splits"]


# Bad input: one line naming the culprit, exit 2, nothing written.


def test_bad_inputs(tmp_path, texts, capsys):
  out = tmp_path / "out"
  (tmp_path / "a.csv").write_text("x")
  (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
  (tmp_path / "broken.json").write_text("{not a tokenizer")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty/0.txt").write_text("")
  (tmp_path / "rows.parquet").write_bytes(b"PAR1")
  cases = [
      ([str(tmp_path / "a.csv")], f"input {re.escape(str(tmp_path / 'a.csv'))} is none of"),
      ([str(tmp_path / "rows.jsonl")], "rows.jsonl:2 has no field 'text'"),
      ([str(tmp_path / "nothing*.txt")], "matches no file"),
      ([str(tmp_path / "empty/*.txt")], "holds no tokens: 1 empty document"),
      ([str(texts / "**/*.txt"), "--tokenizer", str(tmp_path / "broken.json")],
       f"tokenizer {re.escape(str(tmp_path / 'broken.json'))} does not load"),
      ([str(texts / "**/*.txt"), "--tokenizer", str(tmp_path / "missing.json")],
       "neither 'bytes' nor a tokenizer.json"),
      (["gs://no-bucket/*.jsonl"], "gcsfs"),
  ]
  if importlib.util.find_spec("pyarrow") is None:
    cases.append(([str(tmp_path / "rows.parquet")], "needs the pyarrow package"))
  for inputs, pattern in cases:
    fails(capsys, [str(out), *inputs, "--workers", "1"], pattern)
    assert not out.exists()


def test_eos_token(tmp_path, texts, bpe, capsys):
  inputs = [str(texts / "deep/doc00.txt"), "--tokenizer", str(bpe)]
  fails(capsys, [str(tmp_path / "out"), *inputs, "--eos_token", "<eos>"],
        "--eos_token '<eos>' is not in the vocabulary")
  spec = json.loads(bpe.read_text())
  spec["added_tokens"] = []
  del spec["model"]["vocab"]["</s>"]
  (tmp_path / "no_eos.json").write_text(json.dumps(spec))
  fails(capsys, [str(tmp_path / "out"), str(texts / "deep/doc00.txt"), "--tokenizer",
                 str(tmp_path / "no_eos.json")], "name its end-of-document token with --eos_tok")


# Training from shards.


def test_training_reads_the_prepared_corpus(tmp_path, texts, bpe):
  out = tmp_path / "corpus"
  metadata, _ = prepare_data.prepare(str(out), [str(texts / "**/*.txt")], str(bpe))
  history = train(str(tmp_path / "run"),
                  model=ModelConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                                    vocab_size=metadata["vocab_size"]),
                  data=data.DataConfig(source=f"arrayrecord:{out}", seq_len=16, batch_size=4),
                  loop=LoopConfig(steps=2, log_every=1, eval_every=2, eval_batches=1,
                                  sample_tokens=0),
                  devices=jax.devices()[:1], progress=False)
  assert [row["step"] for row in history] == [1, 2]
  assert np.isfinite(history[-1]["eval_loss"])
  assert history[0]["train_loss"] < np.log(400) + 1
  # The final row holds the unigram reference; a prepared corpus has no bigram one.
  reference = corpus(out).reference_losses()
  assert history[-1]["unigram_loss"] == reference["unigram_loss"]
  assert "bigram_loss" not in history[-1] and "bigram_loss" not in reference


def test_a_vocabulary_that_disagrees_is_one_line_before_compiling(tmp_path, texts, bpe):
  out = tmp_path / "corpus"
  metadata, _ = prepare_data.prepare(str(out), [str(texts / "**/*.txt")], str(bpe))
  with pytest.raises(ValueError, match=rf"set ModelConfig.vocab_size = {metadata['vocab_size']}$"):
    train(str(tmp_path / "run"), model=ModelConfig(d_model=32, num_layers=1, num_heads=2,
                                                   mlp_dim=64, vocab_size=258),
          data=data.DataConfig(source=f"arrayrecord:{out}", seq_len=16, batch_size=4),
          devices=jax.devices()[:1], progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_preset_without_a_corpus_says_what_to_set():
  with pytest.raises(ValueError, match="names no corpus: prepare one with mhc-prepare-data"):
    data.Corpus(data.DataConfig(source="arrayrecord:"))


def test_paths_as_given_are_relative_to_the_root():
  assert data.glob_root("/a/b/**/c*.txt", False) == "/a/b"
  assert data.glob_root("/a/b/c.txt", True) == "/a/b"
  assert data.glob_root("/*.txt", False) == "/"
  assert pathlib.PurePosixPath(data.corpus_root(["/a/b/*.txt", "/a/c/d.txt"],
                                                lambda p: not p.endswith("*.txt"))) \
      == pathlib.PurePosixPath("/a")


def test_benchmark_runs(capsys):
  from experiments import bench_data
  bench_data.main(["--megabytes", "1", "--bpe_megabytes", "1", "--seconds", "0.2",
                   "--workers", "1"])
  out = capsys.readouterr().out
  assert "tokens/s per host of 32" in out and out.count("x one host's need") == 3
