"""experiments.retrofit and its task: the word problems (deterministic, disjoint splits, right
answers), their lm-eval task (prompts, the strict-match number, exact match, lm-eval's
decoding of the model against a plain loop), the verdicts, the settings, and one micro run of
the whole pipeline."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

# No network: lm-eval reads the task's jsonl files through `datasets`, which must not look
# anything up on the Hub. Set before `datasets` is imported (it reads them once).
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
os.environ.update(OFFLINE)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.models.utils import postprocess_generated_text  # noqa: E402

from experiments import retrofit, word_problems  # noqa: E402
from experiments.word_problems import TaskConfig  # noqa: E402
from mhc_jax.lm.harness import MhcJaxLM  # noqa: E402
from mhc_jax.lm.metrics import read_metrics  # noqa: E402
from mhc_jax.lm.model import ModelConfig, Transformer  # noqa: E402
from mhc_jax.lm.tokenizer import EOS, ByteTokenizer, decode, encode  # noqa: E402

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
  with pytest.raises(ValueError, match="num_train = 5000 distinct problems are more than"):
    # Its train split's arithmetic gives 3,120 questions.
    word_problems.make_task(TaskConfig(max_number=4, num_train=5000, num_test=1))


def test_documents_hold_the_train_split_in_order(tmp_path):
  task = word_problems.make_task(SMALL)
  (tmp_path / "stale.txt").write_text("old")
  source = word_problems.write_documents(task.train, tmp_path, per_document=150)
  files = sorted(tmp_path.glob("*.txt"))
  assert source == str(tmp_path / "*.txt") and len(files) == 3  # 150, 150, 100
  assert "".join(f.read_text() for f in files) == "".join(p.text for p in task.train)


class ScriptedLM(LM):
  """Continues each prompt with `reply(index of its test problem)`, cut at the request's stop
  strings as a model's text is."""

  def __init__(self, task: word_problems.Task, reply):
    super().__init__()
    self.index = {p.question: i for i, p in enumerate(task.test)}
    self.reply = reply

  def generate_until(self, requests):
    texts = []
    for context, kwargs in (request.args for request in requests):
      question = context.removesuffix(word_problems.ANSWER).rsplit("\n", 1)[-1]
      texts.append(postprocess_generated_text(self.reply(self.index[question]),
                                              kwargs["until"], None))
    return texts

  def loglikelihood(self, requests):
    raise NotImplementedError("the task only generates")

  loglikelihood_rolling = loglikelihood


def scored(task, lm, tmp_path, shots=1) -> dict:
  return word_problems.evaluate(lm, word_problems.write_lm_eval_task(task, tmp_path / "lm_eval"),
                                shots)


def test_prompts_are_train_shots_then_the_question(tmp_path):
  task = word_problems.make_task(SMALL)
  lm = ScriptedLM(task, lambda i: " 1")
  prompts = scored(task, lm, tmp_path, shots=2)["prompts"]
  assert prompts == scored(task, lm, tmp_path, shots=2)["prompts"]
  assert len(prompts) == len(task.test)
  train_texts = {p.text for p in task.train}
  for prompt, problem in zip(prompts, task.test):
    assert prompt.endswith(problem.question + "\nAnswer:")
    shots = re.findall(r"[^\n]+\nAnswer: \d+\n", prompt[:-len(problem.question + "\nAnswer:")])
    assert len(shots) == 2 and set(shots) <= train_texts and shots[0] != shots[1]
    assert "".join(shots) + problem.question + "\nAnswer:" == prompt
    assert len(prompt.encode()) <= word_problems.longest_prompt(task, 2)
  zero_shot = scored(task, lm, tmp_path, shots=0)["prompts"]
  assert zero_shot[0] == task.test[0].question + "\nAnswer:"


# What the model continues "Answer:" with -> the number strict-match takes, or none.
CONTINUATIONS = [
    (" 12\n", "12"), ("12", "12"), (" 7\nQuestion", "7"), (" -3\n", "-3"), (" 07\n", "07"),
    (" 1 2\n", "1"), (" 12apples\n", "12"), ("\n12\n", None), (" twelve\n", None), ("", None),
]


def test_strict_match_takes_the_first_number_on_the_answer_line(tmp_path):
  task = word_problems.make_task(SMALL)
  result = scored(task, ScriptedLM(task, lambda i: CONTINUATIONS[i % len(CONTINUATIONS)][0]),
                  tmp_path)
  for i, problem in enumerate(task.test):
    number = CONTINUATIONS[i % len(CONTINUATIONS)][1]
    assert result["answers"][i] == (number or "[invalid]"), CONTINUATIONS[i % len(CONTINUATIONS)]
    assert result["correct"][i] == (number == str(problem.answer))


def test_constant_answers_score_the_skew():
  problem = lambda answer: word_problems.Problem(f"q{answer}", answer, key=())
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


def test_lm_eval_decodes_and_scores_the_model_as_a_plain_loop(tmp_path):
  model = tiny_model()
  task = word_problems.make_task(TaskConfig(seed=3, num_train=50, num_test=7))
  # 7 prompts of different lengths in batches of 3: padding within and after the batches.
  result = scored(task, MhcJaxLM(model, ByteTokenizer(), max_length=256, batch_size=3), tmp_path)
  continuations = []
  for prompt in result["prompts"]:
    tokens = slow_greedy(model, encode(prompt), word_problems.answer_tokens(task))
    tokens = tokens[:tokens.index(EOS)] if EOS in tokens else tokens
    continuations.append(decode(tokens).split("\n")[0])
  assert result["continuations"] == continuations
  numbers = [re.search(r"-?\d+", c) for c in continuations]
  assert result["correct"] == [float(bool(n) and n.group() == str(p.answer))
                               for n, p in zip(numbers, task.test)]
  assert result["accuracy"] == np.mean(result["correct"])


def test_scores_count_exact_matches(tmp_path):
  task = word_problems.make_task(SMALL)
  n = len(task.test)
  # Right for even problems; odd ones add a zero or give the next number.
  reply = lambda i: (f" {task.test[i].answer}\nMore" if i % 2 == 0 else
                     f" {task.test[i].answer}0\n" if i % 4 == 1 else
                     f" {task.test[i].answer + 1}\n")
  result = scored(task, ScriptedLM(task, reply), tmp_path, shots=2)
  assert result["accuracy"] == 0.5
  assert result["stderr"] == pytest.approx(math.sqrt(0.25 * n / (n - 1)) / math.sqrt(n))
  assert result["continuations"][0] == f" {task.test[0].answer}"  # cut at the line's end
  assert result["correct"] == [float(i % 2 == 0) for i in range(n)]


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
    ("TaskConfig.held_out = 1.0", "held_out must be in (0, 1)"),
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
  env = {**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu",
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
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
    assert run["accuracy"] == kept["accuracy"] == np.mean(kept["correct"])
    assert len(kept["continuations"]) == len(kept["prompts"]) == 8
    assert kept["key"]["scored_by"] == word_problems.SCORED_BY
  assert set(summary["constant_answers"]) == {"train_majority", "best_constant"}
  majority = summary["constant_answers"]["train_majority"]
  assert summary["lookup_table"] == {"accuracy": majority["accuracy"], "seen": 0.0,
                                     "fallback": majority["answer"]}
  assert [(c["row"], c["minus"]) for c in summary["comparisons"]] == [
      ("prenorm", "pretrained"), ("mhc", "prenorm")]
  text = (out / "report.md").read_text()
  assert "0.4109" in text and "0.3624" in text and "0.4443" in text
  assert f"lookup table scores {majority['accuracy']:.3f}" in text
  for figure in retrofit.FIGURES:
    assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
  scores = sorted((out / "runs").glob(f"*/{retrofit.SCORES}"))
  before = {p: p.stat().st_mtime_ns for p in scores}
  proc = run_script(str(preset), out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished, reused") == 5 and ": training" not in proc.stdout
  assert len(scores) == 5 and {p: p.stat().st_mtime_ns for p in scores} == before


def test_tunix_micro_pipeline_with_grpo_rows(tmp_path):
  pytest.importorskip("tunix")
  (tmp_path / "verse0.txt").write_text("Thou art my lord. " * 40)
  preset = tmp_path / "micro.gin"
  preset.write_text(MICRO.format(source=tmp_path / "verse*.txt").replace(
      'Retrofit.rows = ["pretrained", "prenorm", "mhc"]\nRetrofit.seeds = [0, 1]',
      'Retrofit.rows = ["prenorm", "mhc", "prenorm+grpo", "mhc+grpo"]\nRetrofit.seeds = [0]')
      + "GRPOConfig.steps = 2\nGRPOConfig.group_size = 2\nGRPOConfig.prompts_per_step = 2\n"
        "GRPOConfig.max_prompt_length = 128\n")
  out = tmp_path / "out"
  proc = run_script(str(preset), out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["rows"]) == ["prenorm", "mhc", "prenorm+grpo", "mhc+grpo"]
  assert ("prenorm+grpo", "prenorm") in [(c["row"], c["minus"]) for c in summary["comparisons"]]
  for row in ("prenorm+grpo", "mhc+grpo"):
    workdir = out / "runs" / f"{row}_seed0"
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
    assert json.loads((workdir / retrofit.SCORES).read_text())["key"]["grpo"]["steps"] == 2
  assert summary["settings"]["grpo"]["steps"] == 2
  rows = read_metrics(out / "runs" / "mhc+grpo_seed0")
  assert summary["rows"]["mhc+grpo"]["grpo"]["0"]["last"]["reward"] == pytest.approx(
      np.mean([r["reward"] for r in rows]))  # 2 steps: the last 10 are all of them
  assert summary["rows"]["mhc+grpo"]["top_answer"]["0"]["share"] > 0
  assert "0.4541" in (out / "report.md").read_text()
  curves = json.loads((out / retrofit.GRPO_CURVES).read_text())
  assert curves["mhc+grpo"]["0"]["reward"] == [
      r["reward"] for r in read_metrics(out / "runs" / "mhc+grpo_seed0")]
  for figure in retrofit.FIGURES + retrofit.GRPO_FIGURES:
    assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
