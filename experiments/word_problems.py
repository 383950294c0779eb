"""A GSM8K-like task at byte scale: short arithmetic word problems with numeric answers,
generated from a seed, written as an lm-evaluation-harness task and scored the way the blog
scored GSM8K: lm-eval, few-shot, greedy, exact match of the strict-match number.

    task = make_task(TaskConfig(seed=0, num_train=3000, num_test=200))
    task.test[0].text  # "Dan has 3 cups. He buys 2 more and gives away 1. How many cups
                       #  does he have?\nAnswer: 4\n"
    write_lm_eval_task(task, folder)
    result = evaluate(lm, folder, shots=1)  # {"accuracy", "stderr", ...}

Four templates: add, subtract, add then subtract, multiply (bags of equal size), every number
in them and every step between at most `TaskConfig.max_number`. The splits are disjoint: no
test question's text occurs in the train split.

The lm-eval task (`LM_EVAL_TASK`, in `write_lm_eval_task`'s folder) is lm-eval's `gsm8k` in
this task's format: a k-shot prompt is k problems drawn from the train split by lm-eval's
sampler (with its default seed, as `mhc-eval` draws them), each as its `Problem.text`, then
the question and "Answer:"; the model continues it greedily to the end of the line, and
`strict-match` takes the first number there (gsm8k's takes the one after its "####" marker;
here "Answer:" ends the prompt, so the answer's line holds nothing else), `flexible-extract`
the last one (gsm8k's regex). Exact match then compares it with the answer's digits, so "07"
is wrong.
"""

import dataclasses
import importlib.metadata
import json
import pathlib
from collections import Counter
from collections.abc import Callable

import lm_eval
import numpy as np
from lm_eval.tasks import TaskManager

from mhc_jax.checks import check_int

PEOPLE = (("Tom", "He"), ("Ann", "She"), ("Bob", "He"), ("Eve", "She"), ("Sam", "He"),
          ("Mia", "She"), ("Joe", "He"), ("Amy", "She"), ("Ben", "He"), ("Liz", "She"),
          ("Dan", "He"), ("Kim", "She"))
ITEMS = ("apples", "pens", "cards", "eggs", "coins", "books", "cups", "shells", "stamps",
         "plums")
ANSWER = "\nAnswer:"
LM_EVAL_TASK = "mhc_word_problems"
SCORED_BY = f"lm-eval {importlib.metadata.version('lm_eval')} {LM_EVAL_TASK} strict-match"
# The task as lm-eval reads it (`write_lm_eval_task` fills in the files): gsm8k.yaml's fields,
# with this task's delimiters (a shot is `Problem.text`: "... Answer: N\n") and line.
LM_EVAL_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
"""
# Draws allowed per problem wanted before the task counts as impossible (duplicates are
# redrawn; with max_number 9 the templates give 39,120 distinct questions).
DRAWS_PER_PROBLEM = 20


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """seed: fixes every problem and the split. num_train, num_test: problems per split.
  max_number: the largest number a problem holds or reaches (at least 4, so that a bag
  problem exists). problems_per_document: train problems per fine-tuning document (a `.txt`
  file)."""

  seed: int = 0
  num_train: int = 3000
  num_test: int = 200
  max_number: int = 9
  problems_per_document: int = 30

  def __post_init__(self):
    check_int("seed", self.seed, minimum=0)
    check_int("max_number", self.max_number, minimum=4)
    for name in ("num_train", "num_test", "problems_per_document"):
      check_int(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  answer: int

  @property
  def text(self) -> str:
    """The problem as fine-tuning data and few-shot examples show it."""
    return f"{self.question}{ANSWER} {self.answer}\n"


@dataclasses.dataclass(frozen=True)
class Task:
  train: tuple[Problem, ...]
  test: tuple[Problem, ...]


def _add(rng, top, person, pronoun, item) -> Problem:
  a = rng.integers(1, top)
  b = rng.integers(1, top - a + 1)
  return Problem(f"{person} has {a} {item}. {pronoun} buys {b} more. "
                 f"How many {item} does {pronoun.lower()} have?", int(a + b))


def _subtract(rng, top, person, pronoun, item) -> Problem:
  a = rng.integers(2, top + 1)
  b = rng.integers(1, a + 1)
  return Problem(f"{person} has {a} {item}. {pronoun} gives away {b}. "
                 f"How many {item} does {pronoun.lower()} have?", int(a - b))


def _add_subtract(rng, top, person, pronoun, item) -> Problem:
  a = rng.integers(1, top)
  b = rng.integers(1, top - a + 1)
  c = rng.integers(1, a + b + 1)
  return Problem(f"{person} has {a} {item}. {pronoun} buys {b} more and gives away {c}. "
                 f"How many {item} does {pronoun.lower()} have?", int(a + b - c))


def _multiply(rng, top, person, pronoun, item) -> Problem:
  a = rng.integers(2, top // 2 + 1)
  b = rng.integers(2, top // a + 1)
  return Problem(f"{person} has {a} bags of {b} {item}. "
                 f"How many {item} does {pronoun.lower()} have?", int(a * b))


TEMPLATES: tuple[Callable[..., Problem], ...] = (_add, _subtract, _add_subtract, _multiply)


def draw_problem(rng: np.random.Generator, top: int) -> Problem:
  """One problem of a random template whose numbers, in the question, the answer and every
  step between, lie in [0, top]."""
  person, pronoun = PEOPLE[rng.integers(len(PEOPLE))]
  item = ITEMS[rng.integers(len(ITEMS))]
  return TEMPLATES[rng.integers(len(TEMPLATES))](rng, top, person, pronoun, item)


def make_task(config: TaskConfig) -> Task:
  """Distinct questions drawn from `config.seed`: the first `num_test` are the test split,
  the next `num_train` the train split."""
  rng, wanted = np.random.default_rng(config.seed), config.num_test + config.num_train
  problems = {}
  for _ in range(DRAWS_PER_PROBLEM * wanted):
    problem = draw_problem(rng, config.max_number)
    problems.setdefault(problem.question, problem)
    if len(problems) == wanted:
      ordered = list(problems.values())
      return Task(train=tuple(ordered[config.num_test:]), test=tuple(ordered[:config.num_test]))
  raise ValueError(f"num_train + num_test = {wanted} distinct problems are more than the "
                   f"templates give; ask for fewer")


def write_documents(problems, folder: pathlib.Path, per_document: int) -> str:
  """The problems as `.txt` documents of `per_document` each, in `folder` (emptied of older
  documents first); -> the glob for `DataConfig.source`."""
  folder.mkdir(parents=True, exist_ok=True)
  for old in folder.glob("*.txt"):
    old.unlink()
  for d, start in enumerate(range(0, len(problems), per_document)):
    chunk = problems[start:start + per_document]
    (folder / f"problems_{d:04d}.txt").write_text("".join(p.text for p in chunk))
  return str(folder / "*.txt")


def longest_prompt(task: Task, shots: int) -> int:
  """The most bytes a `shots`-shot prompt can take: the longest shots, then the longest test
  question and "Answer:" (lm-eval draws the shots)."""
  check_int("shots", shots, minimum=0)
  texts = sorted((len(p.text.encode()) for p in task.train), reverse=True)[:shots]
  return sum(texts) + max(len(p.question.encode()) for p in task.test) + len(ANSWER.encode())


def answer_tokens(task: Task) -> int:
  """Bytes to decode: a space, the longest answer's digits, and the newline ending it."""
  return max(len(str(p.answer)) for p in task.train + task.test) + 2


def constant_baselines(task: Task) -> dict:
  """The test accuracy of always giving one answer: the train split's most common one (what
  the answers' skew alone teaches), and the best one in hindsight (the most any constant
  answer scores on these test problems)."""
  train = Counter(p.answer for p in task.train).most_common(1)[0][0]
  test = Counter(p.answer for p in task.test)
  best = test.most_common(1)[0][0]
  return {name: {"answer": answer, "accuracy": test[answer] / len(task.test)}
          for name, answer in (("train_majority", train), ("best_constant", best))}


def write_lm_eval_task(task: Task, folder: pathlib.Path) -> pathlib.Path:
  """The task as lm-eval's `LM_EVAL_TASK` in `folder`: its YAML, `train.jsonl` (the shots) and
  `test.jsonl`, each problem a {"question", "answer"} line; -> `folder`, lm-eval's
  `include_path`. Decoding stops after `answer_tokens` tokens at most."""
  folder.mkdir(parents=True, exist_ok=True)
  for split in ("train", "test"):
    (folder / f"{split}.jsonl").write_text("".join(
        json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n"
        for p in getattr(task, split)))
  (folder / f"{LM_EVAL_TASK}.yaml").write_text(LM_EVAL_YAML.format(
      name=LM_EVAL_TASK, train=json.dumps(str((folder / "train.jsonl").resolve())),
      test=json.dumps(str((folder / "test.jsonl").resolve())),
      max_gen_toks=answer_tokens(task)))
  return folder


def evaluate(lm, folder: pathlib.Path, shots: int) -> dict:
  """lm-eval's run of the task in `folder` (`write_lm_eval_task`) with `lm` (an lm-eval `LM`:
  `mhc_jax.lm.harness.MhcJaxLM` for this project's models), `shots` examples a prompt ->
  accuracy (exact match after strict-match) and lm-eval's stderr of it (sample std /
  sqrt(N)), the longest prompt in bytes, and per test problem, in order, its prompt, its
  continuation, the number strict-match took from it ("[invalid]": none) and whether that
  was right."""
  check_int("shots", shots, minimum=0)
  manager = TaskManager(include_path=str(folder), include_defaults=False)
  run = lm_eval.simple_evaluate(model=lm, tasks=[LM_EVAL_TASK], num_fewshot=shots,
                                task_manager=manager, log_samples=True)
  scores = run["results"][LM_EVAL_TASK]
  strict = sorted((s for s in run["samples"][LM_EVAL_TASK] if s["filter"] == "strict-match"),
                  key=lambda sample: sample["doc_id"])
  prompts = [sample["arguments"][0][0] for sample in strict]
  return {"accuracy": float(scores["exact_match,strict-match"]),
          "stderr": float(scores["exact_match_stderr,strict-match"]),
          "longest_prompt": max(len(p.encode()) for p in prompts),
          "prompts": prompts,
          "continuations": [sample["resps"][0][0] for sample in strict],
          "answers": [sample["filtered_resps"][0] for sample in strict],
          "correct": [float(sample["exact_match"]) for sample in strict]}
