"""The word problems held out by arithmetic: no test problem's arithmetic in the train split
(read back from the questions' words), answers flat enough that no constant answer scores
above 5%, the lookup-table baseline, and a task that is the same in every process."""

import os
import pathlib
import re
import subprocess
import sys
from collections import Counter

import pytest

from experiments import word_problems
from experiments.word_problems import TaskConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT = TaskConfig()


def operation(question: str) -> str:
  if " bags of " in question:
    return "multiply"
  if " buys " in question:
    return "add_subtract" if " gives away " in question else "add"
  return "subtract"


def arithmetic(question: str) -> tuple:
  """The operation and its numbers, read from the words; the two numbers of a sum or a
  product in either order are the same arithmetic."""
  numbers = tuple(int(x) for x in re.findall(r"\d+", question))
  name = operation(question)
  if name != "subtract":
    numbers = tuple(sorted(numbers[:2])) + numbers[2:]
  return name, numbers


def test_no_test_arithmetic_is_in_the_train_split():
  task = word_problems.make_task(DEFAULT)
  train = {arithmetic(p.question) for p in task.train}
  seen = [p.question for p in task.test if arithmetic(p.question) in train]
  assert not seen, f"{len(seen)} of {len(task.test)}, e.g. {seen[:2]}"
  assert (len(task.train), len(task.test)) == (DEFAULT.num_train, DEFAULT.num_test)
  assert all(p.key[0] == operation(p.question) for p in task.train + task.test)


def test_no_constant_answer_scores_above_5_percent():
  task = word_problems.make_task(DEFAULT)
  for split in (task.test, task.train):
    answer, count = Counter(p.answer for p in split).most_common(1)[0]
    assert count / len(split) <= 0.05, (answer, count)
  assert word_problems.constant_baselines(task)["best_constant"]["accuracy"] <= 0.05


def test_every_operation_reaches_both_splits():
  task = word_problems.make_task(DEFAULT)
  for split in (task.train, task.test):
    assert {operation(p.question) for p in split} == set(word_problems.TEMPLATES)


def problem(key: tuple, answer: int) -> word_problems.Problem:
  return word_problems.Problem(f"{key} {answer}", answer, key)


def test_the_lookup_table_answers_seen_arithmetic_else_the_majority():
  train = [problem(("add", (1, 2)), 3), problem(("add", (2, 3)), 5),
           problem(("subtract", (7, 2)), 5)]
  test = [problem(("add", (1, 2)), 3),  # seen: its train answer, right
          problem(("add", (2, 1)), 3),  # another order is another key: the majority, 5
          problem(("multiply", (2, 2)), 4),  # unseen: 5, wrong
          problem(("subtract", (9, 4)), 5)]  # unseen: 5, right
  task = word_problems.Task(train=tuple(train), test=tuple(test))
  assert word_problems.lookup_baseline(task) == {"accuracy": 0.5, "seen": 0.25, "fallback": 5}


def test_the_lookup_table_scores_the_majority_here_and_high_on_a_leaky_split():
  task = word_problems.make_task(DEFAULT)
  lookup = word_problems.lookup_baseline(task)
  majority = word_problems.constant_baselines(task)["train_majority"]
  assert lookup == {"accuracy": majority["accuracy"], "seen": 0.0, "fallback": majority["answer"]}
  # Leaky: train problems' arithmetic tested under other names, as before the hold-out.
  leaky = word_problems.Task(train=task.train, test=tuple(
      word_problems.Problem(f"renamed {p.question}", p.answer, p.key) for p in task.train[:200]))
  assert word_problems.lookup_baseline(leaky) == {"accuracy": 1.0, "seen": 1.0,
                                                  "fallback": majority["answer"]}


def test_too_few_keys_to_hold_out_is_an_error():
  with pytest.raises(ValueError, match="held_out"):
    TaskConfig(held_out=1.0)


TASK_DIGEST = ("import hashlib; from experiments import word_problems as w; "
               "print(hashlib.sha256(repr(w.make_task(w.TaskConfig())).encode()).hexdigest())")


def test_the_task_is_the_same_in_every_process():
  """Python salts its string hashes per process: a split that iterated a set of keys would
  differ between runs of the experiment."""
  digests = {subprocess.run([sys.executable, "-c", TASK_DIGEST], capture_output=True, text=True,
                            check=True, cwd=REPO,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout
             for seed in ("1", "2")}
  assert len(digests) == 1 and len(digests.pop()) == 65
