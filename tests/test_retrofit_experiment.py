"""experiments.retrofit and its task: the word problems (deterministic, disjoint splits, right
answers), the exact-match extraction, batched greedy decoding against a plain loop, the
scoring, the verdicts, the settings, and one micro run of the whole pipeline."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import retrofit, word_problems
from experiments.word_problems import TaskConfig
from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.sample import greedy_continuations
from mhc_jax.lm.tokenizer import EOS, encode

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = TaskConfig(seed=3, num_train=400, num_test=60)


def solve(question: str) -> int:
  """The answer, recomputed from the question's words alone."""
  numbers = [int(x) for x in re.findall(r"\d+", question)]
  if " bags of " in question:
    return numbers[0] * numbers[1]
  if " buys " in question and " gives away " in question:
    return numbers[0] + numbers[1] - numbers[2]
  return numbers[0] + numbers[1] if " buys " in question else numbers[0] - numbers[1]


def test_the_task_is_deterministic_disjoint_and_right():
  task = word_problems.make_task(SMALL)
  assert task == word_problems.make_task(SMALL)
  assert task != word_problems.make_task(TaskConfig(seed=4, num_train=400, num_test=60))
  assert (len(task.train), len(task.test)) == (400, 60)
  train, test = {p.question for p in task.train}, {p.question for p in task.test}
  assert len(train) == 400 and len(test) == 60 and not train & test
  for problem in task.train + task.test:
    assert problem.answer == solve(problem.question), problem
    assert max(int(x) for x in re.findall(r"\d+", problem.question)) <= SMALL.max_number
    assert 0 <= problem.answer <= SMALL.max_number
  templates = [" bags of ", " buys ", " gives away "]
  assert all(any(t in p.question for p in task.train) for t in templates)


def test_too_many_problems_is_an_error():
  with pytest.raises(ValueError, match="more than the templates give"):
    word_problems.make_task(TaskConfig(max_number=4, num_train=5000, num_test=1))  # ~4.3k exist


def test_documents_hold_the_train_split_in_order(tmp_path):
  task = word_problems.make_task(SMALL)
  (tmp_path / "stale.txt").write_text("old")
  source = word_problems.write_documents(task.train, tmp_path, per_document=150)
  files = sorted(tmp_path.glob("*.txt"))
  assert source == str(tmp_path / "*.txt") and len(files) == 3  # 150, 150, 100
  assert "".join(f.read_text() for f in files) == "".join(p.text for p in task.train)


def test_prompts_are_train_shots_then_the_question():
  task = word_problems.make_task(SMALL)
  prompts = word_problems.few_shot_prompts(task, shots=2, seed=0)
  assert prompts == word_problems.few_shot_prompts(task, shots=2, seed=0)
  assert len(prompts) == len(task.test)
  train_texts = {p.text for p in task.train}
  for prompt, problem in zip(prompts, task.test):
    assert prompt.endswith(problem.question + "\nAnswer:")
    shots = re.findall(r"[^\n]+\nAnswer: \d+\n", prompt[:-len(problem.question + "\nAnswer:")])
    assert len(shots) == 2 and set(shots) <= train_texts and shots[0] != shots[1]
  assert word_problems.few_shot_prompts(task, 0, 0)[0] == task.test[0].question + "\nAnswer:"


@pytest.mark.parametrize("continuation, number", [
    (" 12\n", "12"), ("12", "12"), (" 7\nQuestion", "7"), (" -3\n", "-3"), (" 07\n", "07"),
    (" 1 2\n", "1"), (" 12apples\n", "12"), ("\n12\n", None), (" twelve\n", None), ("", None),
])
def test_the_first_number_on_the_answer_line(continuation, number):
  assert word_problems.extract_answer(continuation) == number


def test_constant_answers_score_the_skew():
  problem = lambda answer: word_problems.Problem(f"q{answer}", answer)
  task = word_problems.Task(train=tuple(map(problem, (1, 1, 2))),
                            test=tuple(map(problem, (2, 2, 1, 3))))
  assert word_problems.constant_baselines(task) == {
      "train_majority": {"answer": 1, "accuracy": 0.25},
      "best_constant": {"answer": 2, "accuracy": 0.5}}


def tiny_model() -> Transformer:
  return Transformer(ModelConfig(d_model=16, num_layers=2, num_heads=2, mlp_dim=32),
                     rngs=nnx.Rngs(1))


@nnx.jit
def forward(model, tokens):
  return model(tokens)


def slow_greedy(model, prompt: np.ndarray, num_tokens: int, width: int = 256) -> list[int]:
  """A token list grown one argmax at a time, each read at the last position of the prompt
  alone, padded to `width` with random bytes (causal attention must hide them; a fixed width
  compiles once)."""
  tokens, rng = list(prompt), np.random.default_rng(0)
  for _ in range(num_tokens):
    row = rng.integers(0, 256, (1, width), dtype=np.int32)
    row[0, :len(tokens)] = tokens
    tokens.append(int(jnp.argmax(forward(model, jnp.asarray(row))[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_batched_greedy_decoding_and_the_accuracy_equal_a_plain_loop():
  model = tiny_model()
  task = word_problems.make_task(TaskConfig(seed=3, num_train=50, num_test=7))
  prompts = word_problems.few_shot_prompts(task, 1, 0)
  slow = np.array([slow_greedy(model, encode(p), 3) for p in prompts])
  # 7 prompts of different lengths in batches of 3: padding within and after the batches.
  batched = greedy_continuations(model, [encode(p) for p in prompts], 3, batch_size=3)
  assert batched.dtype == np.int32
  np.testing.assert_array_equal(batched, slow)
  result = word_problems.evaluate(model, task, shots=1, seed=0, batch_size=3)
  continuations = [word_problems.decode(word_problems.until_eos(row)) for row in slow]
  assert result["continuations"] == continuations
  assert result["accuracy"] == np.mean([word_problems.extract_answer(c) == str(p.answer)
                                        for c, p in zip(continuations, task.test)])


def test_greedy_decoding_refuses_an_empty_prompt():
  with pytest.raises(ValueError, match="no empty one"):
    greedy_continuations(tiny_model(), [encode("a"), encode("")], 2)


def test_scores_count_exact_matches(monkeypatch):
  task = word_problems.make_task(SMALL)
  n = len(task.test)

  def fake_decoder(model, prompts, num_tokens, batch_size):
    # Right for even problems; odd ones split the right digits with an EOS or add a zero.
    assert len(prompts) == n and num_tokens == 3  # " 9\n": answers have one digit
    rows = []
    for i, p in enumerate(task.test):
      digits = encode(f" {p.answer}")
      rows.append(np.concatenate([digits, encode("\n")]) if i % 2 == 0 else
                  np.concatenate([digits[:1], [EOS], digits[1:]]) if i % 4 == 1 else
                  encode(f" {p.answer}0"))
    return np.stack(rows)

  monkeypatch.setattr(word_problems, "greedy_continuations", fake_decoder)
  result = word_problems.evaluate(None, task, shots=2, seed=0)
  assert result["accuracy"] == 0.5
  assert result["stderr"] == pytest.approx(math.sqrt(0.25 * n / (n - 1)) / math.sqrt(n))
  assert result["continuations"][0] == f" {task.test[0].answer}\n"
  assert result["continuations"][1] == " "  # cut at the EOS


UNRESOLVED = "not resolved (within 2 SE of 0)"


@pytest.mark.parametrize("blog, mean, stderr, verdict", [
    (-0.05, -0.2, 0.05, "reproduces"), (0.08, -0.2, 0.05, "does not reproduce (reversed)"),
    (0.08, 0.05, 0.05, UNRESOLVED), (0.08, 0.0, 0.0, UNRESOLVED), (0.08, 0.3, math.nan, UNRESOLVED),
    (None, 0.3, 0.01, "not in the blog; higher"), (None, -0.3, 0.01, "not in the blog; lower"),
    (None, -0.01, 0.008, f"not in the blog; {UNRESOLVED}"),
])
def test_verdicts(blog, mean, stderr, verdict):
  assert retrofit.verdict(blog, {"mean": mean, "stderr": stderr}) == verdict


def test_differences_pair_seeds_and_problems():
  results = [{"row": "pretrained", "seed": None, "correct": np.array([0., 0, 1, 0])},
             {"row": "hc", "seed": 0, "correct": np.array([1., 1, 1, 0])},
             {"row": "hc", "seed": 1, "correct": np.array([1., 0, 1, 1])}]
  # Per seed: [1, 1, 0, 0] and [1, 0, 0, 1], both 0.5; per problem: [1, 0.5, 0, 0.5].
  diff = retrofit.paired_difference(results, "hc", "pretrained", (0, 1))
  assert diff["mean"] == 0.5 and diff["stderr_seeds"] == 0
  assert diff["stderr_problems"] == pytest.approx(math.sqrt(0.5 / 3) / 2)
  assert diff["stderr"] == pytest.approx(diff["stderr_problems"])


def test_the_cpu_preset_and_its_fine_tune_scope():
  settings = retrofit.load_settings("cpu")
  assert settings.model.residual == "prenorm"
  assert settings.finetune["loop"].steps != settings.loop.steps
  assert set(settings.finetune) == {"data", "optimizer", "mesh", "loop"}
  out = pathlib.Path("out")
  hc = retrofit.run_configs(settings, out, "hc", 1)
  assert (hc["model"].residual, hc["model"].stream_reduction) == ("hc", "mean")
  assert hc["data"].seed == hc["loop"].seed == 1 and hc["data"].source == "out/task/*.txt"
  assert retrofit.run_configs(settings, out, "prenorm", 1)["model"] == settings.model
  retrofit.check_prompts_fit(settings, word_problems.make_task(settings.task))
  with pytest.raises(ValueError, match="finetune/ModelConfig"):
    retrofit.load_settings("cpu", ["finetune/ModelConfig.d_model = 32"])


@pytest.mark.parametrize("binding, message", [
    ('Retrofit.rows = ["prenorm", "nope"]', "rows must be"),
    ("Retrofit.shots = 9", "lower Retrofit.shots"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, capsys, binding, message):
  assert retrofit.main(["--out", str(tmp_path), "--gin_param", binding]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err
  assert not (tmp_path / "runs").exists()


WORDS = "thou art my lord and I thy humble servant for the king doth love".split()
MICRO = """
include 'base.gin'
Retrofit.rows = ["pretrained", "prenorm", "mhc"]
Retrofit.seeds = [0, 1]
Retrofit.num_streams = 2
Retrofit.shots = 1
Retrofit.gain_points = 2
TaskConfig.num_train = 120
TaskConfig.num_test = 8
TaskConfig.problems_per_document = 10
DataConfig.source = "{source}"
DataConfig.seq_len = 32
DataConfig.batch_size = 4
ModelConfig.d_model = 16
ModelConfig.num_layers = 1
ModelConfig.num_heads = 2
ModelConfig.mlp_dim = 32
OptimizerConfig.warmup_steps = 1
LoopConfig.steps = 3
LoopConfig.eval_every = 3
LoopConfig.eval_batches = 1
LoopConfig.checkpoint_every = 3
LoopConfig.log_every = 1
LoopConfig.sample_tokens = 0
finetune/DataConfig.seq_len = 200
finetune/LoopConfig.steps = 4
finetune/LoopConfig.eval_every = 2
"""


def run_script(preset: str, out: pathlib.Path) -> subprocess.CompletedProcess:
  # A process of its own, as users run it: gin and JAX's compilation cache are global state.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.run([sys.executable, "-m", "experiments.retrofit", "--preset", preset,
                         "--out", str(out), "--no_progress"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_micro_pipeline_then_reuse(tmp_path):
  rng = np.random.default_rng(0)
  for d in range(4):
    lines = [" ".join(rng.choice(WORDS, 6)).capitalize() + "." for _ in range(20)]
    (tmp_path / f"verse{d}.txt").write_text("\n".join(lines))
  preset = tmp_path / "micro.gin"
  preset.write_text(MICRO.format(source=tmp_path / "verse*.txt"))
  out = tmp_path / "out"
  proc = run_script(str(preset), out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(": training") == 5  # pretrain, then 2 rows x 2 seeds
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["rows"]) == ["pretrained", "prenorm", "mhc"]
  for run in summary["runs"]:
    kept = json.loads((out / "runs" / run["run"] / retrofit.SCORES).read_text())
    assert run["accuracy"] == kept["accuracy"] and len(kept["continuations"]) == 8
  assert set(summary["constant_answers"]) == {"train_majority", "best_constant"}
  assert [(c["row"], c["minus"]) for c in summary["comparisons"]] == [
      ("prenorm", "pretrained"), ("mhc", "prenorm")]
  text = (out / "report.md").read_text()
  assert "0.4109" in text and "0.3624" in text and "0.4443" in text
  for figure in retrofit.FIGURES:
    assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
  scores = sorted((out / "runs").glob(f"*/{retrofit.SCORES}"))
  before = {p: p.stat().st_mtime_ns for p in scores}
  proc = run_script(str(preset), out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished, reused") == 5 and ": training" not in proc.stdout
  assert len(scores) == 5 and {p: p.stat().st_mtime_ns for p in scores} == before
