"""A GSM8K-like task at byte scale: short arithmetic word problems with numeric answers,
generated from a seed, and their few-shot evaluation by greedy decoding and exact match of the
final number (lm-eval's GSM8K strict-match, in spirit).

    task = make_task(TaskConfig(seed=0, num_train=3000, num_test=200))
    task.test[0].text  # "Dan has 3 cups. He buys 2 more and gives away 1. How many cups
                       #  does he have?\nAnswer: 4\n"
    result = evaluate(model, task, shots=1, seed=0)  # {"accuracy", "stderr", ...}

Four templates: add, subtract, add then subtract, multiply (bags of equal size), every number
in them and every step between at most `TaskConfig.max_number`. The splits are disjoint: no
test question's text occurs in the train split. A k-shot prompt is k train problems drawn
for that question, then the question and "Answer:"; the model continues it greedily, and the
first number on the answer's line must equal the answer's digits exactly.
"""

import dataclasses
import pathlib
import re
from collections import Counter
from collections.abc import Callable

import numpy as np

from mhc_jax.checks import check_int
from mhc_jax.lm.sample import greedy_continuations
from mhc_jax.lm.tokenizer import EOS, decode, encode

PEOPLE = (("Tom", "He"), ("Ann", "She"), ("Bob", "He"), ("Eve", "She"), ("Sam", "He"),
          ("Mia", "She"), ("Joe", "He"), ("Amy", "She"), ("Ben", "He"), ("Liz", "She"),
          ("Dan", "He"), ("Kim", "She"))
ITEMS = ("apples", "pens", "cards", "eggs", "coins", "books", "cups", "shells", "stamps",
         "plums")
ANSWER = "\nAnswer:"
NUMBER = re.compile(r"-?\d+")
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


def prompt(shots, question: str) -> str:
  """k solved problems, then the question, ending where the answer's number would start."""
  return "".join(p.text for p in shots) + question + ANSWER


def few_shot_prompts(task: Task, shots: int, seed: int) -> list[str]:
  """One prompt per test problem; its `shots` examples are distinct train problems drawn for
  that problem alone (from `seed` and its index, so every model sees the same prompts)."""
  check_int("shots", shots, minimum=0)
  prompts = []
  for i, problem in enumerate(task.test):
    picks = np.random.default_rng([seed, i]).choice(len(task.train), shots, replace=False)
    prompts.append(prompt([task.train[j] for j in picks], problem.question))
  return prompts


def extract_answer(continuation: str) -> str | None:
  """The first number on the answer's line (up to the first newline), as written; None
  without one. Exact match then compares it with the answer's digits, so "07" is wrong."""
  match = NUMBER.search(continuation.split("\n", 1)[0])
  return match.group() if match else None


def is_correct(continuation: str, problem: Problem) -> bool:
  return extract_answer(continuation) == str(problem.answer)


def until_eos(tokens: np.ndarray) -> np.ndarray:
  """`[n]` -> the tokens before the first EOS: the document ends there (decoding would drop
  the EOS and join what surrounds it)."""
  ends = np.flatnonzero(tokens == EOS)
  return tokens[:ends[0]] if len(ends) else tokens


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


def evaluate(model, task: Task, shots: int, seed: int, batch_size: int = 50) -> dict:
  """Few-shot greedy decoding of every test problem (see `few_shot_prompts`) ->
  accuracy (exact match), its standard error over problems (lm-eval's: sample std / sqrt(N)),
  the longest prompt in bytes, and every continuation."""
  prompts = [encode(p) for p in few_shot_prompts(task, shots, seed)]
  outputs = greedy_continuations(model, prompts, answer_tokens(task), batch_size=batch_size)
  continuations = [decode(until_eos(row)) for row in outputs]
  correct = np.array([is_correct(c, p) for c, p in zip(continuations, task.test)], float)
  return {"accuracy": float(correct.mean()),
          "stderr": float(correct.std(ddof=1) / np.sqrt(len(correct))) if len(correct) > 1
          else float("nan"),
          "longest_prompt": max(len(p) for p in prompts),
          "continuations": continuations}
