"""mhc_jax.lm.data: byte tokenizer, sources, document split, packing,
and the grain training / validation iterators (determinism, resume, orbax, sharding)."""

import collections
import dataclasses
import math
import pathlib
import re
import shutil

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mhc_jax.lm import data, tokenizer

SHARED_SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/shakespeare"


def write_documents(directory, lengths, seed=0):
  """Files `doc_XX.txt` of random printable bytes with the given lengths; their paths."""
  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, length in enumerate(lengths):
    path = directory / f"doc_{i:02d}.txt"
    path.write_bytes(rng.integers(32, 127, size=length, dtype=np.uint8).tobytes())
    paths.append(path)
  return paths


def make_corpus(tmp_path, lengths=(300,) * 12, **config):
  write_documents(tmp_path / "corpus", lengths)
  defaults = dict(source=str(tmp_path / "corpus" / "*.txt"), seq_len=16, batch_size=4)
  return data.Corpus(data.DataConfig(**{**defaults, **config}))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"inputs", "targets"}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# Sources.


def test_load_documents_sorted_by_name_each_file_once_bytes_verbatim(tmp_path):
  paths = write_documents(tmp_path, [5, 7, 3])
  paths[1].write_bytes(b"\x00\xff not utf-8 \x80")
  documents = data.load_documents((str(tmp_path / "*.txt"), str(paths[0])))
  assert [name for name, _ in documents] == sorted(p.name for p in paths)
  assert [raw for _, raw in documents] == [p.read_bytes() for p in paths]
  assert data.load_documents(str(paths[2])) == [(paths[2].name, paths[2].read_bytes())]


@pytest.mark.parametrize("patterns, names", [
    (["a/**/*.txt"], ["1.txt", "b/2.txt"]),
    (["a/1.txt", "a/b/*.txt"], ["1.txt", "b/2.txt"]),
    (["a/b/2.txt"], ["2.txt"]),
    (["a/*.txt", "c/3.txt"], ["a/1.txt", "c/3.txt"]),
])
def test_names_are_relative_to_the_corpus_root(tmp_path, monkeypatch, patterns, names):
  for path in ("a/1.txt", "a/b/2.txt", "c/3.txt"):
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_text(path)
  monkeypatch.chdir(tmp_path)  # relative patterns name the same files
  for given in (patterns, [str(tmp_path / p) for p in patterns]):
    assert [name for name, _ in data.load_documents(given)] == names


def test_a_corpus_copied_elsewhere_splits_the_same(tmp_path):
  write_documents(tmp_path / "one/corpus/deep", [50] * 20)
  (tmp_path / "two").mkdir()
  shutil.copytree(tmp_path / "one/corpus", tmp_path / "two/elsewhere")
  corpora = [data.Corpus(data.DataConfig(source=str(root / "**/*.txt"), seq_len=8, batch_size=2))
             for root in (tmp_path / "one/corpus", tmp_path / "two/elsewhere")]
  assert corpora[0].validation_names == corpora[1].validation_names
  assert corpora[0].validation_names == ["deep/doc_04.txt", "deep/doc_16.txt"]
  np.testing.assert_array_equal(corpora[0].train_windows, corpora[1].train_windows)


@pytest.mark.skipif(not SHARED_SHAKESPEARE.is_dir(), reason="no shared Shakespeare copy")
def test_shared_shakespeare_copy(monkeypatch):
  monkeypatch.setenv("MHC_JAX_SHAKESPEARE_DIR", str(SHARED_SHAKESPEARE))
  documents = data.load_documents("shakespeare")
  assert len(documents) == 42 and documents[0][0] == "alls_well_that_ends_well_gut.txt"
  total_tokens = data.num_tokens(documents)
  assert 4.9e6 < total_tokens < 5.1e6  # ~5.0 MB of text, plus an EOS per play
  corpus = data.Corpus(data.DataConfig(seq_len=256, batch_size=8))
  assert len(corpus.train_names) == 38 and len(corpus.validation_names) == 4
  num_train, num_validation = len(corpus.train_windows), len(corpus.validation_windows)
  # Each split loses less than one window to its tail.
  assert total_tokens // 257 - 2 <= num_train + num_validation <= total_tokens // 257
  assert 0.05 < num_validation / (num_train + num_validation) < 0.2
  batch = next(corpus.train_iterator())
  assert batch["inputs"].shape == (8, 256) and batch["inputs"].dtype == np.int32
  assert len(corpus.validation_batches()) == num_validation // 8


# Split and packing.


def documents_named(n):
  return [(f"doc_{i:02d}", bytes([i]) * (i + 1)) for i in range(n)]


def test_split_is_deterministic_disjoint_and_sorted():
  documents = documents_named(20)
  train, validation = data.split_documents(documents[::-1], 0.1, seed=3)
  assert (train, validation) == data.split_documents(documents, 0.1, seed=3)
  assert len(validation) == 2
  assert sorted(train + validation) == documents
  assert train == sorted(train) and validation == sorted(validation)
  validations = {tuple(data.split_documents(documents, 0.1, seed)[1]) for seed in range(5)}
  assert len(validations) > 1


@pytest.mark.parametrize("n, fraction, expected", [
    (1, 0.5, 0), (2, 0.01, 1), (3, 0.99, 2), (10, 0.0, 0), (10, 0.25, 2), (42, 0.1, 4)])
def test_number_of_validation_documents(n, fraction, expected):
  train, validation = data.split_documents(documents_named(n), fraction, seed=0)
  assert len(validation) == expected and len(train) == n - expected


def test_pack_windows_concatenate_back_to_the_stream():
  rng = np.random.default_rng(0)
  documents = [(f"d{i}", rng.integers(0, 256, size=n, dtype=np.uint8).tobytes())
               for i, n in enumerate([0, 5, 40, 1, 17])]
  stream = np.concatenate([np.append(tokenizer.encode(raw), tokenizer.EOS) for _, raw in documents])
  assert len(stream) == 68
  windows = data.pack(documents, seq_len=9)
  assert windows.dtype == np.int32 and windows.shape == (6, 10)  # 68 // 10; tail of 8 dropped
  np.testing.assert_array_equal(windows.reshape(-1), stream[:60])
  assert data.pack(documents, seq_len=67).shape == (1, 68)
  assert data.pack(documents, seq_len=68).shape == (0, 69)
  assert data.pack([], seq_len=4).shape == (0, 5)


def test_examples_are_next_token_pairs_of_train_windows(tmp_path):
  corpus = make_corpus(tmp_path)
  batch = next(corpus.train_iterator())
  assert batch["inputs"].shape == batch["targets"].shape == (4, 16)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  windows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
  train = {w.tobytes() for w in corpus.train_windows}
  assert all(w.tobytes() in train for w in windows)
  assert not corpus.train_windows.flags.writeable


# Training iterator.


def test_seed_orders_the_data_and_split_seed_alone_picks_the_validation_set(tmp_path):
  def corpus(**seeds):
    return make_corpus(tmp_path, lengths=(40,) * 20, validation_fraction=0.25, **seeds)

  base, reordered, resplit = corpus(), corpus(seed=1), corpus(split_seed=1)
  assert reordered.validation_names == base.validation_names
  np.testing.assert_array_equal(reordered.validation_windows, base.validation_windows)
  first = lambda c: next(c.train_iterator())["inputs"]
  assert not np.array_equal(first(reordered), first(base))
  assert resplit.validation_names != base.validation_names
  assert len(resplit.validation_names) == len(base.validation_names) == 5


def test_train_order_is_deterministic_per_seed_and_differs_across_seeds(tmp_path):
  corpus = make_corpus(tmp_path, lengths=(16,) * 12, seq_len=16, batch_size=4)
  windows = corpus.train_windows
  assert len(windows) == 11  # 11 training documents, one window each

  def order(seed, num_batches):
    iterator = data.train_iterator(windows, 4, seed)
    rows = np.concatenate([b["inputs"] for b in take(iterator, num_batches)])
    return [next(i for i, w in enumerate(windows) if (w[:-1] == row).all()) for row in rows]

  first = order(0, 11)  # 44 rows = 4 epochs of 11 windows
  assert first == order(0, 11)
  assert first != order(1, 11)
  epochs = [first[i:i + 11] for i in range(0, 44, 11)]
  assert all(sorted(epoch) == list(range(11)) for epoch in epochs)
  assert len({tuple(epoch) for epoch in epochs}) == 4  # reshuffled every epoch


def test_resume_from_iterator_state_gives_the_same_batches(tmp_path):
  corpus = make_corpus(tmp_path)
  iterator = corpus.train_iterator()
  take(iterator, 5)
  state = iterator.get_state()
  expected = take(iterator, 3)
  resumed = corpus.train_iterator()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


def test_orbax_checkpoints_the_iterator(tmp_path):
  corpus = make_corpus(tmp_path)
  iterator = corpus.train_iterator()
  take(iterator, 5)
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  assert list((tmp_path / "checkpoints/5/data").iterdir())
  expected = take(iterator, 3)
  resumed = corpus.train_iterator()
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert manager.latest_step() == 5
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_batches_equal(take(resumed, 3), expected)


def test_shards_concatenate_to_the_global_batch(tmp_path):
  corpus = make_corpus(tmp_path, batch_size=8)
  global_batches = take(corpus.train_iterator(), 6)
  shards = [take(corpus.train_iterator(i, 4), 6) for i in range(4)]
  for b, expected in enumerate(global_batches):
    for key in ("inputs", "targets"):
      assert all(shard[b][key].shape == (2, 16) for shard in shards)
      np.testing.assert_array_equal(
          np.concatenate([shard[b][key] for shard in shards]), expected[key])


# Validation batches.


def test_validation_batches_in_order_and_reiterable(tmp_path):
  corpus = make_corpus(tmp_path, lengths=(300,) * 20, batch_size=4)
  windows = corpus.validation_windows
  assert len(windows) == 2 * 301 // 17 == 35
  batches = corpus.validation_batches()
  assert len(batches) == 8  # 35 // 4, remainder dropped
  first, second = list(batches), list(batches)
  assert_batches_equal(first, second)
  np.testing.assert_array_equal(
      np.concatenate([b["inputs"] for b in first]), windows[:32, :-1])
  np.testing.assert_array_equal(
      np.concatenate([b["targets"] for b in first]), windows[:32, 1:])
  assert_batches_equal(list(corpus.validation_batches(max_batches=3)), first[:3])
  sharded = [list(corpus.validation_batches(shard_index=i, shard_count=2)) for i in range(2)]
  for b, expected in enumerate(first):
    np.testing.assert_array_equal(
        np.concatenate([shard[b]["inputs"] for shard in sharded]), expected["inputs"])


def test_validation_smaller_than_one_batch_is_one_smaller_batch(tmp_path):
  corpus = make_corpus(tmp_path, lengths=(300,) * 12, batch_size=64)
  windows = corpus.validation_windows
  assert len(windows) == 17  # one document: 301 // 17
  (batch,) = corpus.validation_batches()
  np.testing.assert_array_equal(batch["inputs"], windows[:, :-1])
  shards = [list(corpus.validation_batches(shard_index=i, shard_count=4)) for i in range(4)]
  assert all(len(shard) == 1 and shard[0]["inputs"].shape == (4, 16) for shard in shards)
  np.testing.assert_array_equal(
      np.concatenate([shard[0]["inputs"] for shard in shards]), windows[:16, :-1])


def test_no_validation_documents_means_no_validation_batches(tmp_path):
  corpus = make_corpus(tmp_path, validation_fraction=0.0)
  assert corpus.validation_windows.shape == (0, 17)
  assert list(corpus.validation_batches()) == []


# Errors.


@pytest.mark.parametrize("config, message", [
    (dict(seq_len=0), "seq_len must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    (dict(validation_fraction=1.0), r"validation_fraction must lie in \[0, 1\), got 1.0"),
    (dict(validation_fraction=-0.1), r"validation_fraction must lie in \[0, 1\), got -0.1"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*32\), got -1"),
])
def test_bad_config_values(config, message):
  with pytest.raises(ValueError, match=message):
    data.DataConfig(**config)


@pytest.mark.parametrize("pattern", ["missing.txt", "nothing_*.txt", "subdir"])
def test_path_or_glob_matching_nothing(tmp_path, pattern):
  write_documents(tmp_path, [10])
  (tmp_path / "subdir").mkdir()
  missing = str(tmp_path / pattern)
  with pytest.raises(ValueError, match=f"^corpus path not found: {re.escape(missing)}$"):
    data.Corpus(data.DataConfig(source=(str(tmp_path / "*.txt"), missing)))


def test_empty_corpus(tmp_path):
  write_documents(tmp_path, [0, 0])
  with pytest.raises(ValueError, match="corpus is empty: 2 file"):
    data.load_documents(str(tmp_path / "*.txt"))


def test_train_split_shorter_than_one_sequence(tmp_path):
  with pytest.raises(ValueError, match=r"train split has 30 tokens, one sequence needs "
                                       r"seq_len \+ 1 = 33"):
    make_corpus(tmp_path, lengths=(9, 9, 9, 9), seq_len=32, validation_fraction=0.25)


def test_batch_size_not_divisible_by_shard_count(tmp_path):
  corpus = make_corpus(tmp_path, batch_size=6)
  message = "batch_size 6 is not divisible by shard_count 4"
  with pytest.raises(ValueError, match=message):
    corpus.train_iterator(0, 4)
  with pytest.raises(ValueError, match=message):
    corpus.validation_batches(shard_index=0, shard_count=4)
  with pytest.raises(ValueError, match=r"shard_index must lie in \[0, 3\), got 3"):
    corpus.train_iterator(3, 3)


def test_error_messages_are_one_line(tmp_path):
  errors = []
  for make in (lambda: data.DataConfig(seq_len=-1),
               lambda: data.load_documents(str(tmp_path / "none")),
               lambda: make_corpus(tmp_path, lengths=(3, 3), seq_len=64)):
    with pytest.raises(ValueError) as error:
      make()
    errors.append(str(error.value))
  assert all("\n" not in e for e in errors)


# Evaluation batches: the whole split, a fixed subset, reference losses.


def eval_windows(batches):
  """Weighted batches -> the windows (inputs + last target) of the rows of weight 1, and
  the number of padded rows; checks that a row's weights are all 0 or all 1."""
  rows, padded = [], 0
  for batch in batches:
    assert batch.keys() == {"inputs", "targets", "weights"}
    assert batch["weights"].shape == batch["inputs"].shape
    assert batch["weights"].dtype == np.float32
    for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
      assert np.all(weights == weights[0]) and weights[0] in (0, 1)
      if weights[0]:
        rows.append(np.concatenate([inputs, targets[-1:]]))
      else:
        padded += 1
  return np.array(rows), padded


def test_full_split_eval_batches_every_window_once_the_last_batch_padded(tmp_path):
  corpus = make_corpus(tmp_path, lengths=(300,) * 20, batch_size=4)
  windows = corpus.validation_windows
  assert len(windows) == 35  # not a multiple of the batch
  batches = corpus.eval_batches()
  assert len(batches) == 9 and all(b["inputs"].shape == (4, 16) for b in batches)
  covered, padded = eval_windows(batches)
  np.testing.assert_array_equal(covered, windows)
  assert padded == 1
  # Each of 2 processes reads its own rows of every global batch, padding included.
  shards = [list(corpus.eval_batches(shard_index=i, shard_count=2)) for i in range(2)]
  assert all(len(shard) == 9 and shard[0]["inputs"].shape == (2, 16) for shard in shards)
  merged = [{k: np.concatenate([s[b][k] for s in shards]) for k in shards[0][b]}
            for b in range(9)]
  for whole, parts in zip(batches, merged):
    for key in whole:
      np.testing.assert_array_equal(parts[key], whole[key])


def window_documents(corpus, lengths, window_indices):
  """Names of the held-out documents each window's tokens come from, by direct count."""
  width = corpus.config.seq_len + 1
  ends = np.cumsum([lengths[int(name[4:6])] + 1 for name in corpus.validation_names])
  starts = ends - np.diff(ends, prepend=0)
  return [{name for name, s, e in zip(corpus.validation_names, starts, ends)
           if s < (i + 1) * width and e > i * width} for i in window_indices]


def test_eval_subset_is_fixed_spread_and_touches_every_held_out_document(tmp_path):
  lengths = [700, 40, 900, 60, 500, 30, 800, 50, 600, 45] * 3  # long and short plays
  write_documents(tmp_path / "corpus", lengths)
  config = data.DataConfig(source=str(tmp_path / "corpus" / "*.txt"), seq_len=16,
                           batch_size=4, validation_fraction=0.3)
  corpus = data.Corpus(config)
  assert len(corpus.validation_names) == 9
  num_windows = len(corpus.validation_windows)
  subset = corpus.eval_batches(max_windows=12)
  covered, padded = eval_windows(subset)
  assert len(covered) == 12 and padded == 0
  chosen = [int(np.flatnonzero((corpus.validation_windows == w).all(axis=1))[0])
            for w in covered]
  assert chosen == sorted(set(chosen))
  touched = set().union(*window_documents(corpus, lengths, chosen))
  assert touched == set(corpus.validation_names)
  assert chosen[-1] > num_windows * 3 // 4  # spread to the end, not the opening
  # The same windows at every step and for every training seed (same split_seed).
  reseeded = data.Corpus(dataclasses.replace(config, seed=7)).eval_batches(max_windows=12)
  np.testing.assert_array_equal(eval_windows(reseeded)[0], covered)
  np.testing.assert_array_equal(eval_windows(subset)[0], covered)
  # Asking for more windows than the split has is the whole split.
  np.testing.assert_array_equal(eval_windows(corpus.eval_batches(10**6))[0],
                                corpus.validation_windows)


def test_spread_windows_picks_evenly_when_documents_outnumber_the_windows():
  spans = [(i, i) for i in range(10)]
  np.testing.assert_array_equal(data.spread_windows(10, 3, spans), [1, 5, 8])
  np.testing.assert_array_equal(data.spread_windows(10, 4, ()), [1, 3, 6, 8])
  np.testing.assert_array_equal(data.spread_windows(10, 4, [(0, 0), (9, 9)]), [0, 3, 7, 9])


def direct_reference(train_stream, validation_windows, vocab_size):
  """Add-one unigram and bigram cross entropies by plain counting, float64."""
  unigram = collections.Counter(train_stream.tolist())
  pairs = collections.Counter(zip(train_stream[:-1].tolist(), train_stream[1:].tolist()))
  firsts = collections.Counter(train_stream[:-1].tolist())
  uni, bi = [], []
  for window in validation_windows.tolist():
    for a, b in zip(window[:-1], window[1:]):
      uni.append(math.log((unigram[b] + 1) / (len(train_stream) + vocab_size)))
      bi.append(math.log((pairs[a, b] + 1) / (firsts[a] + vocab_size)))
  return -sum(uni) / len(uni), -sum(bi) / len(bi)


def test_reference_losses_match_a_direct_count(tmp_path):
  corpus = make_corpus(tmp_path, lengths=(120, 80, 200, 150, 90, 60), seq_len=8,
                       validation_fraction=0.34)
  train_stream = np.asarray(corpus.train_windows).reshape(-1)
  unigram, bigram = direct_reference(train_stream, corpus.validation_windows,
                                     corpus.vocab_size)
  reference = corpus.reference_losses()
  assert reference == {"unigram_loss": pytest.approx(unigram, rel=1e-12),
                       "bigram_loss": pytest.approx(bigram, rel=1e-12)}
  assert corpus.reference_losses() is reference  # counted once per corpus
