"""`inference.load(path)`: a workdir's latest checkpoint with its corpus's tokenizer and the
context it was trained on, or a Hugging Face folder with its tokenizer.json, its end-of-text
token and its max_position_embeddings; in either dtype; one line for every path it refuses."""

import dataclasses
import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import WORDS
from mhc_jax.lm import inference, prepare_data
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import ModelConfig, from_params, layer_params, outer_params
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.tokenizer import ByteTokenizer, HuggingFaceTokenizer, train_bpe
from mhc_jax.lm.train import LoopConfig, train

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
SEQ_LEN = 32
# mHC with its default streams: loading must rebuild a stream model, not only pre-norm. Its
# weights start at 15x the usual scale, so that its greedy tokens depend on the whole prompt
# (at 0.02 a tiny model repeats the prompt's last token whatever came before it).
TINY_MHC = ModelConfig(residual="mhc", d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                       remat="none", init_std=0.3)


def train_workdir(workdir: pathlib.Path, corpus: str, steps: int = 2) -> pathlib.Path:
  """A tiny mHC run on one device, a checkpoint after every step."""
  train(str(workdir), model=TINY_MHC,
        data=DataConfig(source=corpus, seq_len=SEQ_LEN, batch_size=8, validation_fraction=0.0),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=1),
        loop=LoopConfig(steps=steps, log_every=1, checkpoint_every=1, sample_tokens=0),
        devices=jax.devices()[:1], progress=False)
  return workdir


def small_tokenizer(path: pathlib.Path, vocab_size: int) -> pathlib.Path:
  """A sentencepiece-like BPE (Metaspace, EOS "</s>") of `vocab_size` tokens over the test
  corpus's words, saved at `path`: the fixtures' vocabularies (64) are too small for a
  byte-level one (256 tokens before any merge)."""
  import tokenizers
  model = tokenizers.Tokenizer(tokenizers.models.BPE())
  model.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  model.decoder = tokenizers.decoders.Metaspace()
  rng = np.random.default_rng(0)
  model.train_from_iterator(
      [" ".join(rng.choice(WORDS, 6)) for _ in range(200)],
      tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                     show_progress=False))
  model.save(str(path))
  return path


def hf_folder(tmp_path: pathlib.Path, name: str = "qwen3", eos_token="</s>") -> pathlib.Path:
  """A copy of the fixture `name` with a tokenizer of its vocabulary and a
  tokenizer_config.json naming `eos_token` (a string, or {"content": ...}; None: no file)."""
  folder = tmp_path / name
  shutil.copytree(FIXTURES / name, folder)
  vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
  small_tokenizer(folder / "tokenizer.json", vocab)
  if eos_token is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token}))
  return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
  return train_workdir(tmp_path_factory.mktemp("workdir"), corpus)


def saved_params(workdir: pathlib.Path, step: int) -> dict:
  """The parameters a checkpoint holds, read by orbax alone."""
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(workdir / "checkpoints" / str(step) / "state")
  return jax.tree.map(np.asarray, state["params"])


def assert_same_tree(got: dict, want: dict):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_workdir_loads_its_latest_checkpoint_with_the_byte_tokenizer(workdir):
  loaded = inference.load(workdir)
  assert loaded.source.kind == "workdir" and loaded.source.step == 2
  assert loaded.model.cfg.residual == "mhc" and loaded.model.cfg.num_streams == 4
  # Step 2's weights, not step 1's (warm-up makes step 1 a no-op, so the two differ).
  assert_same_tree(nnx.to_pure_dict(nnx.state(loaded.model)), saved_params(workdir, 2))
  assert isinstance(loaded.tokenizer, ByteTokenizer)
  assert loaded.context == SEQ_LEN


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A corpus prepared with a byte-level BPE of the tiny model's vocabulary."""
  root = tmp_path_factory.mktemp("prepared")
  (root / "in").mkdir()
  rng = np.random.default_rng(1)
  for d in range(4):
    (root / "in" / f"doc{d}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
  bpe = train_bpe([" ".join(WORDS)] * 10, TINY_MHC.vocab_size, root / "bpe.json")
  prepare_data.prepare(str(root / "corpus"), [str(root / "in/*.txt")], str(bpe))
  return root / "corpus"


def trained_on(workdir: pathlib.Path, source: str, tmp_path: pathlib.Path) -> pathlib.Path:
  """A copy of `workdir` whose config.json says it trained on `source`."""
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  config = json.loads((copy / "config.json").read_text())
  config["data"]["source"] = source
  (copy / "config.json").write_text(json.dumps(config))
  return copy


def test_a_workdir_of_a_prepared_corpus_decodes_with_that_corpus_tokenizer(workdir, prepared,
                                                                          tmp_path):
  loaded = inference.load(trained_on(workdir, f"arrayrecord:{prepared}", tmp_path))
  assert isinstance(loaded.tokenizer, HuggingFaceTokenizer)
  assert loaded.tokenizer.path.parent == prepared  # the copy that travels with the corpus
  assert loaded.tokenizer.eos_id == loaded.tokenizer._tokenizer.token_to_id("</s>")
  text = "thou art my lord"
  assert len(loaded.tokenizer.encode(text)) < len(text)  # its merges, not bytes
  assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text


@pytest.mark.parametrize("name, eos_token", [("qwen3", {"content": "</s>"}), ("llama", "</s>")])
def test_a_hugging_face_folder_loads_with_its_tokenizer_and_context(tmp_path, name, eos_token):
  folder = hf_folder(tmp_path, name, eos_token)
  loaded = inference.load(folder)
  assert loaded.source.kind == "huggingface" and loaded.source.path == folder
  tokens = np.load(folder / "tokens.npy")
  np.testing.assert_allclose(loaded.model(tokens), np.load(folder / "logits.npy"), atol=1e-5)
  assert loaded.tokenizer.path == folder / "tokenizer.json"
  assert loaded.tokenizer.eos_id == loaded.tokenizer._tokenizer.token_to_id("</s>")
  assert loaded.context == json.loads((folder / "config.json").read_text())[
      "max_position_embeddings"]


def test_the_end_of_text_token_is_the_one_tokenizer_config_names(tmp_path):
  folder = hf_folder(tmp_path, eos_token="▁lord")  # any token of the vocabulary
  tokenizer = inference.load(folder).tokenizer
  assert tokenizer.eos_id == tokenizer._tokenizer.token_to_id("▁lord")
  assert tokenizer.eos_id != tokenizer._tokenizer.token_to_id("</s>")


def test_bfloat16_runs_the_activations_in_bfloat16_and_keeps_float32_parameters(workdir):
  full, half = inference.load(workdir), inference.load(workdir, dtype="bfloat16")
  assert half.model.cfg == dataclasses.replace(full.model.cfg, dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(half.model, nnx.Param))} == {
      np.dtype("float32")}
  # The same parameters in a bfloat16 model: the same logits exactly, and not float32's.
  same = from_params(half.model.cfg, outer_params(full.model), layer_params(full.model))
  tokens = ByteTokenizer().encode("Thou art my lord.")[None]
  np.testing.assert_array_equal(half.model(tokens), same(tokens))
  assert not np.allclose(half.model(tokens), full.model(tokens), rtol=0, atol=1e-4)


def only_line(err: pytest.ExceptionInfo) -> str:
  message = str(err.value)
  assert "\n" not in message
  return message


def test_a_path_that_is_no_directory_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path / "missing")
  assert only_line(err) == f"path {tmp_path / 'missing'} is not a directory"


def test_a_folder_of_neither_kind_is_refused_in_one_line(tmp_path):
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path)
  assert only_line(err) == (f"path {tmp_path} holds no config.json: neither a Hugging Face "
                            "checkpoint nor an mhc-train workdir")
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 32}))
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path)
  assert only_line(err).startswith(f"{tmp_path / 'config.json'} has neither model_type")


def test_a_workdir_without_a_checkpoint_is_refused_in_one_line(workdir, tmp_path):
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path)
  assert only_line(err) == (f"path {tmp_path} holds no complete checkpoint in checkpoints/: "
                            "nothing to start from")


def test_a_workdir_whose_corpus_is_gone_names_the_corpus_and_the_workdir(workdir, tmp_path):
  gone = tmp_path / "gone"
  copy = trained_on(workdir, f"arrayrecord:{gone}", tmp_path)
  with pytest.raises(ValueError) as err:
    inference.load(copy)
  assert only_line(err) == (f"{copy} decodes with the tokenizer of its corpus, and prepared "
                            f"corpus {gone} not found")


def test_a_hugging_face_folder_without_tokenizer_json_is_refused_in_one_line(tmp_path):
  folder = hf_folder(tmp_path)
  (folder / "tokenizer.json").unlink()
  with pytest.raises(ValueError) as err:
    inference.load(folder)
  assert only_line(err) == (f"{folder} holds no tokenizer.json: copy the model's "
                            "tokenizer.json into it")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_in_one_line(tmp_path):
  folder = hf_folder(tmp_path)
  train_bpe([" ".join(WORDS)], 300, folder / "tokenizer.json")  # 300 tokens for a model of 64
  with pytest.raises(ValueError) as err:
    inference.load(folder)
  assert only_line(err) == (f"the tokenizer of {folder} has 300 tokens, its model only 64: "
                            "not the model's tokenizer")


def test_an_unknown_dtype_is_refused_in_one_line_before_anything_is_read(tmp_path):
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path / "missing", dtype="float16")
  assert only_line(err) == "dtype must be one of float32, bfloat16, got 'float16'"


def test_the_errors_name_the_path_as_the_caller_calls_it(tmp_path):
  with pytest.raises(ValueError) as err:
    inference.load(tmp_path / "missing", argument="--from")
  assert only_line(err) == f"--from {tmp_path / 'missing'} is not a directory"
