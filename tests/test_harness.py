"""lm-evaluation-harness runs the project's models (`mhc_jax.lm.harness`) offline, on local
task YAMLs over jsonl files written here: every number it reports (multiple-choice acc and
acc_norm, a loglikelihood task's is_greedy rate, exact match of generations, word and byte
perplexity and bits per byte of rolling windows) equals the same quantity computed here from
the model's logits, for a workdir and for a Hugging Face folder whose BPE merges across the
context / continuation boundary. Bad model_args and requests the model cannot take are one
line; `mhc-eval` is lm-eval's CLI with the model, and exits 2 on them."""

import json
import math
import os
import pathlib
import re
import shutil

# No network: lm-eval reads the local jsonl files through `datasets`, which must not look
# anything up on the Hub. Set before `datasets` is imported (it reads them once).
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

import jax  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from mhc_jax.lm import harness  # noqa: E402
from mhc_jax.lm.data import DataConfig  # noqa: E402
from mhc_jax.lm.inference import load  # noqa: E402
from mhc_jax.lm.model import ModelConfig  # noqa: E402
from mhc_jax.lm.optimizer import OptimizerConfig  # noqa: E402
from mhc_jax.lm.tokenizer import EOS, HuggingFaceTokenizer, decode, encode  # noqa: E402
from mhc_jax.lm.train import LoopConfig, train  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CONTEXT = 64  # the workdir's seq_len: the adapter's default max_length
ROLLING_MAX_LENGTH = 24  # below the documents' lengths, so that they take several windows
WORDS = "thou art my lord and I thy humble servant for the king doth love".split()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, corpus):
  """An mHC workdir (the default n = 4 streams) trained 100 steps on pseudo-verse: enough
  for its answers to follow the verse and differ from prompt to prompt."""
  folder = tmp_path_factory.mktemp("mhc_workdir")
  train(str(folder), model=ModelConfig(residual="mhc", d_model=32, num_layers=2, num_heads=4,
                                       mlp_dim=64, remat="none"),
        data=DataConfig(source=corpus, seq_len=CONTEXT, batch_size=8, validation_fraction=0.0),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
        loop=LoopConfig(steps=100, log_every=100, checkpoint_every=100, sample_tokens=0),
        devices=jax.devices()[:1], progress=False)
  return folder


@pytest.fixture(scope="module")
def model(workdir):
  return load(workdir).model


@nnx.jit
def padded_forward(model, tokens):
  return model(tokens)


def logits_of(model, tokens) -> np.ndarray:
  """The logits after each of `tokens` (at most CONTEXT), read from a row padded with random
  tokens after them (causal attention keeps them out): one program for every length."""
  row = np.random.default_rng(len(tokens)).integers(0, model.cfg.vocab_size, (1, CONTEXT),
                                                     dtype=np.int32)
  row[0, :len(tokens)] = tokens
  return np.asarray(padded_forward(model, row)[0, :len(tokens)], np.float64)


def logprobs(model, tokens) -> np.ndarray:
  """log p(tokens[j + 1] | tokens[:j + 1]) for every j."""
  logits = logits_of(model, tokens[:-1])
  logits -= logits.max(-1, keepdims=True)
  normalized = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return normalized[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


def continuation_logprob(model, context: str, continuation: str) -> tuple[float, bool]:
  """log p(continuation | context), bytes being tokens, and whether each of its bytes is the
  argmax after the ones before it."""
  tokens = np.concatenate([encode(context), encode(continuation)])
  scored = slice(len(encode(context)) - 1, len(tokens) - 1)
  greedy = bool((logits_of(model, tokens[:-1]).argmax(-1)[scored] == tokens[1:][scored]).all())
  return float(logprobs(model, tokens)[scored].sum()), greedy


def greedy_text(model, prompt: str, max_tokens: int, stop: str) -> str:
  """The argmax continuation, one full forward pass per token, up to EOS or `stop`."""
  tokens = list(encode(prompt))
  for _ in range(max_tokens):
    tokens.append(int(logits_of(model, tokens)[-1].argmax()))
    if tokens[-1] == EOS:
      break
  return decode(tokens[len(encode(prompt)):]).split(stop)[0]


def rolling_logprob(model, text: str, max_length: int) -> float:
  """log p(text | EOS): every token predicted once, in windows of `max_length` predictions,
  each window reading the `max_length` tokens before its last (all of them, at the start)."""
  tokens = [EOS, *encode(text)]
  total, start = 0.0, 0
  while start < len(tokens) - 1:
    end = min(start + max_length, len(tokens) - 1)  # predicts tokens[start + 1 : end + 1]
    window = tokens[max(0, end - max_length):end + 1]
    total += logprobs(model, window)[-(end - start):].sum()
    start = end
  return total


def verse(rng, words: int) -> str:
  return " ".join(rng.choice(WORDS, words)).capitalize()


def write_task(folder: pathlib.Path, name: str, docs: list[dict], yaml: str) -> None:
  data = folder / f"{name}.jsonl"
  data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
  (folder / f"{name}.yaml").write_text(
      f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
      f"test_split: test\n{yaml}")


def multiple_choice_docs(model, rng) -> tuple[list[dict], dict]:
  """Questions with 4 choices of different lengths, half labelled with the choice the model
  scores highest -> (docs, the acc and acc_norm they must get)."""
  docs, acc, acc_norm = [], [], []
  for i in range(12):
    choices = [verse(rng, int(n)) for n in rng.integers(1, 4, 4)]
    question = verse(rng, 4)
    scores = np.array([continuation_logprob(model, question, " " + c)[0] for c in choices])
    best, best_norm = scores.argmax(), (scores / [len(c) for c in choices]).argmax()
    label = int(best if i % 2 else (best + 1 + i % 3) % 4)
    docs.append({"question": question, "choices": choices, "label": label})
    acc.append(label == best)
    acc_norm.append(label == best_norm)
  return docs, {"acc": np.mean(acc), "acc_norm": np.mean(acc_norm)}


def loglikelihood_docs(model, rng) -> tuple[list[dict], dict]:
  """Contexts with the model's own greedy continuation (every other one) or another ->
  (docs, the perplexity (lm-eval's: mean log-probability) and acc (the is_greedy rate))."""
  docs, lls, greedy = [], [], []
  for i in range(8):
    context = verse(rng, 3)
    target = (greedy_text(model, context, 5, "\x00") if i % 2 else " " + verse(rng, 1))
    ll, is_greedy = continuation_logprob(model, context, target)
    docs.append({"context": context, "target": target})
    lls.append(ll)
    greedy.append(is_greedy)
  return docs, {"perplexity": math.exp(-np.mean(lls)), "acc": np.mean(greedy)}


def generation_docs(model, rng) -> tuple[list[dict], dict, list[str]]:
  """Prompts ending within a word, continued greedily up to the next space (or 12 bytes);
  every other one's answer is that continuation -> (docs, exact_match, the continuations)."""
  docs, generations = [], []
  for i in range(8):
    prompt = f"{verse(rng, 2)} {rng.choice(WORDS)[:1 + i % 2]}"
    generations.append(greedy_text(model, prompt, 12, " "))
    docs.append({"prompt": prompt, "answer": generations[-1] if i % 2 else "nope"})
  exact = np.mean([d["answer"] == g for d, g in zip(docs, generations)])
  return docs, {"exact_match": exact}, generations


def rolling_docs(model, rng) -> tuple[list[dict], dict]:
  texts = [". ".join(verse(rng, 6) for _ in range(int(n))) + "." for n in rng.integers(1, 4, 6)]
  lls = np.array([rolling_logprob(model, t, ROLLING_MAX_LENGTH) for t in texts])
  words = sum(len(re.split(r"\s+", t)) for t in texts)
  num_bytes = sum(len(t.encode()) for t in texts)
  return [{"text": t} for t in texts], {
      "word_perplexity": math.exp(-lls.sum() / words),
      "byte_perplexity": math.exp(-lls.sum() / num_bytes),
      "bits_per_byte": -lls.sum() / num_bytes / math.log(2)}


@pytest.fixture(scope="module")
def tasks(model, tmp_path_factory):
  """The folder of the four tasks (each YAML beside its jsonl), what each must report, and
  the generation task's continuations."""
  rng = np.random.default_rng(0)
  folder = tmp_path_factory.mktemp("tasks")
  mc, mc_expected = multiple_choice_docs(model, rng)
  write_task(folder, "tiny_choice", mc, "output_type: multiple_choice\n"
             "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
             "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  ll, ll_expected = loglikelihood_docs(model, rng)
  write_task(folder, "tiny_loglikelihood", ll, "output_type: loglikelihood\n"
             "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
             "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
  gen, gen_expected, generations = generation_docs(model, rng)
  write_task(folder, "tiny_generation", gen, "output_type: generate_until\n"
             "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
             "generation_kwargs:\n  until: [' ']\n  max_gen_toks: 12\n  do_sample: false\n"
             "metric_list:\n  - metric: exact_match\n")
  rolling, rolling_expected = rolling_docs(model, rng)
  write_task(folder, "tiny_rolling", rolling, "output_type: loglikelihood_rolling\n"
             "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
             "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
             "  - metric: bits_per_byte\n")
  return folder, {"tiny_choice": mc_expected, "tiny_loglikelihood": ll_expected,
                  "tiny_generation": gen_expected, "tiny_rolling": rolling_expected}, generations


@pytest.fixture(scope="module")
def task_manager(tasks):
  """These tasks alone (an index of lm-eval's own takes seconds to build)."""
  return TaskManager(include_path=str(tasks[0]), include_defaults=False)


def evaluate(model_args: str, task_manager, names, **kwargs) -> dict:
  # No bootstrap for the perplexities' standard errors: seconds, and processes forked.
  return lm_eval.simple_evaluate(model="mhc_jax", model_args=model_args, tasks=list(names),
                                 task_manager=task_manager, bootstrap_iters=0, **kwargs)


def test_every_reported_number_equals_the_direct_computation(workdir, tasks, task_manager):
  _, expected, generations = tasks
  # Batches of 5 leave a part-filled one; contexts and continuations of many lengths.
  results = evaluate(f"path={workdir},batch_size=5", task_manager,
                     ["tiny_choice", "tiny_loglikelihood", "tiny_generation"], log_samples=True)
  rolling = evaluate(f"path={workdir},max_length={ROLLING_MAX_LENGTH}", task_manager,
                     ["tiny_rolling"], batch_size=3)
  reported = {**results["results"], **rolling["results"]}
  for task, metrics in expected.items():
    for metric, value in metrics.items():
      assert reported[task][f"{metric},none"] == pytest.approx(value, rel=1e-5), (task, metric)
  # Neither trivially 0 nor 1: the model's choices and continuations differ by prompt.
  assert 0 < expected["tiny_choice"]["acc"] < 1 and 0 < expected["tiny_loglikelihood"]["acc"] < 1
  samples = sorted(results["samples"]["tiny_generation"], key=lambda s: s["doc_id"])
  assert [s["resps"][0][0] for s in samples] == generations
  assert any(len(g) < 12 for g in generations)  # some stopped at the space
  assert len(set(generations)) > 1


def test_the_cli_reports_what_simple_evaluate_does(workdir, tasks, tmp_path):
  folder, expected, _ = tasks
  out = tmp_path / "results"
  assert harness.main(["--model", "mhc_jax", "--model_args", f"path={workdir}", "--tasks",
                       "tiny_generation", "--include_path", str(folder), "--batch_size", "4",
                       "--output_path", str(out)]) == 0
  (written,) = out.rglob("results_*.json")
  reported = json.loads(written.read_text())["results"]["tiny_generation"]
  assert reported["exact_match,none"] == expected["tiny_generation"]["exact_match"]


@pytest.mark.parametrize("model_args, message", [
    ("path={workdir},devise=cpu", "mhc_jax model_args has no key 'devise': use path, "),
    ("batch_size=2", "mhc_jax needs model_args path=DIR"),
    ("path={workdir}/nowhere", "mhc_jax model_args: path "),
    ("path={workdir},batch_size=auto", "batch_size must be an int >= 1, got 'auto'"),
    ("path={workdir},dtype=float16", "dtype must be one of float32, bfloat16"),
    # Loads, then cannot take the task's 12 new tokens.
    ("path={workdir},max_length=12", "max_gen_toks must be in 1..11 (max_length - 1), got 12"),
])
def test_bad_model_args_and_requests_are_one_line(workdir, task_manager, model_args, message):
  with pytest.raises(harness.AdapterError) as err:
    evaluate(model_args.format(workdir=workdir), task_manager, ["tiny_generation"])
  assert message in str(err.value) and "\n" not in str(err.value)


def test_the_cli_refuses_bad_model_args_in_one_line_and_writes_nothing(workdir, tasks, tmp_path,
                                                                     capsys):
  out = tmp_path / "results"
  assert harness.main(["--model", "mhc_jax", "--model_args", f"path={workdir},shots=5",
                       "--tasks", "tiny_generation", "--include_path", str(tasks[0]),
                       "--output_path", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith("mhc-eval: mhc_jax model_args has no key 'shots'")
  assert not out.exists()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  """The tiny random Qwen3 checkpoint of tests/fixtures/hf with a tokenizer.json of its 64
  tokens: a BPE over the verse's characters, whose merges cross word and prompt boundaries."""
  folder = tmp_path_factory.mktemp("qwen3")
  shutil.copytree(FIXTURES / "qwen3", folder, dirs_exist_ok=True)
  texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
  alphabet = sorted(set("".join(texts) + "".join(w.capitalize() for w in WORDS) + "."))
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  bpe.decoder = tokenizers.decoders.Metaspace()
  bpe.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
      vocab_size=64, special_tokens=["</s>", "<unk>"], initial_alphabet=alphabet,
      show_progress=False))
  bpe.save(str(folder / "tokenizer.json"))
  return folder


def test_a_hugging_face_folder_splits_at_its_tokenizers_boundary(hf_folder, tmp_path):
  """lm-eval's split: the context's trailing spaces go to the continuation, the whole text is
  encoded and the context's tokens cut off its front, wherever the merges fall."""
  model, tokenizer = load(hf_folder).model, HuggingFaceTokenizer(hf_folder / "tokenizer.json")
  pairs = [("Thou ar", "t my lord"), ("The kin", "g doth love"), ("Thou art ", "my lord"),
           ("I thy humble", " servant"), ("Love", "ly")]
  lls = []
  for context, continuation in pairs:
    spaces = len(context) - len(context.rstrip())
    context, continuation = context.rstrip(), context[len(context) - spaces:] + continuation
    whole, head = tokenizer.encode(context + continuation), tokenizer.encode(context)
    lls.append(logprobs(model, whole)[len(head) - 1:].sum())
  assert any(not np.array_equal(tokenizer.encode(c + x)[:len(tokenizer.encode(c))],
                                tokenizer.encode(c)) for c, x in pairs)  # a merge crosses
  write_task(tmp_path, "tiny_hf", [{"context": c, "target": x} for c, x in pairs],
             "output_type: loglikelihood\ndoc_to_text: '{{context}}'\n"
             "doc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
             "metric_list:\n  - metric: perplexity\n")
  results = evaluate(f"path={hf_folder}", TaskManager(include_path=str(tmp_path),
                                                      include_defaults=False), ["tiny_hf"])
  assert results["results"]["tiny_hf"]["perplexity,none"] == pytest.approx(
      math.exp(-np.mean(lls)), rel=1e-5)
