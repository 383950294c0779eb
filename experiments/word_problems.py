"""A GSM8K-like task at byte scale: short arithmetic word problems with numeric answers,
generated from a seed, written as an lm-evaluation-harness task and scored the way the blog
scored GSM8K: lm-eval, few-shot, greedy, exact match of the strict-match number.

    task = make_task(TaskConfig(seed=0, num_train=3000, num_test=200))
    task.test[0].text  # "Dan has 11 pens. He buys 5 more and gives away 6. How many pens
                       #  does he have?\nAnswer: 10\n"
    write_lm_eval_task(task, folder)
    result = evaluate(lm, folder, shots=1)  # {"accuracy", "stderr", ...}

Four templates: add, subtract, add then subtract, multiply (bags of equal size), every number
in them and every step between at most `TaskConfig.max_number`. The splits are held out by
arithmetic: the facts (a template and its numbers, 2 + 3 and 3 + 2 as one) are split first,
then each split's problems are drawn from its own facts, so no test problem's arithmetic
occurs in the train split under other names and a lookup table (`lookup_baseline`) scores
only what the answers' skew gives. The answers take turns, so each is within one problem of
as common as any other (`constant_baselines`: at most 5% with the defaults).

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
from collections.abc import Callable, Iterator

import lm_eval
import numpy as np
from lm_eval.tasks import TaskManager

from mhc_jax.checks import check_int
from mhc_jax.lm.rewards import STRICT_MATCH_PATTERN

PEOPLE = (("Tom", "He"), ("Ann", "She"), ("Bob", "He"), ("Eve", "She"), ("Sam", "He"),
          ("Mia", "She"), ("Joe", "He"), ("Amy", "She"), ("Ben", "He"), ("Liz", "She"),
          ("Dan", "He"), ("Kim", "She"))
ITEMS = ("apples", "pens", "cards", "eggs", "coins", "books", "cups", "shells", "stamps",
         "plums")
ANSWER = "\nAnswer:"
LM_EVAL_TASK = "mhc_word_problems"
SCORED_BY = f"lm-eval {importlib.metadata.version('lm_eval')} {LM_EVAL_TASK} strict-match"
# The task as lm-eval reads it (`write_lm_eval_task` fills in the files): gsm8k.yaml's fields,
# with this task's delimiters (a shot is `Problem.text`: "... Answer: N\n") and line;
# strict-match's pattern is the GRPO reward's (mhc_jax.lm.rewards), one extraction for both.
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
        regex_pattern: {strict_match_pattern}
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
"""
# Draws allowed per problem wanted before the task counts as impossible (duplicates are
# redrawn; each order of a fact's numbers gives 120 questions, one per person and item).
DRAWS_PER_PROBLEM = 20


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """seed: fixes every problem and the split. num_train, num_test: problems per split.
  max_number: the largest number a problem holds or reaches (at least 4, so that a bag
  problem exists; 20 gives 21 answers, 0 to 20, so that none is more than 5% of 200 test
  problems). held_out: the share of each template's arithmetic facts whose problems are the
  test split's only. problems_per_document: train problems per fine-tuning document (a `.txt`
  file)."""

  seed: int = 0
  num_train: int = 3000
  num_test: int = 200
  max_number: int = 20
  held_out: float = 0.2
  problems_per_document: int = 30

  def __post_init__(self):
    check_int("seed", self.seed, minimum=0)
    check_int("max_number", self.max_number, minimum=4)
    for name in ("num_train", "num_test", "problems_per_document"):
      check_int(name, getattr(self, name))
    if not 0 < self.held_out < 1:
      raise ValueError(f"held_out must be in (0, 1), the share of arithmetic facts the test "
                       f"split holds; got {self.held_out!r}")


@dataclasses.dataclass(frozen=True)
class Problem:
  """key: its arithmetic, (template name, numbers in the question's order)."""

  question: str
  answer: int
  key: tuple

  @property
  def text(self) -> str:
    """The problem as fine-tuning data and few-shot examples show it."""
    return f"{self.question}{ANSWER} {self.answer}\n"


@dataclasses.dataclass(frozen=True)
class Task:
  train: tuple[Problem, ...]
  test: tuple[Problem, ...]


@dataclasses.dataclass(frozen=True)
class Template:
  """One kind of problem: `operands(top)` yields every tuple of its numbers that keeps the
  question, each step and the answer in [0, top]; `question` words them (`str.format` of the
  numbers, `person`, `He` (the pronoun), `he` and `item`); `commutes`: its first two numbers
  swap without changing the arithmetic (a + b, a x b)."""

  operands: Callable[[int], Iterator[tuple[int, ...]]]
  answer: Callable[..., int]
  question: str
  commutes: bool


TEMPLATES = {
    "add": Template(
        lambda top: ((a, b) for a in range(1, top) for b in range(1, top - a + 1)),
        lambda a, b: a + b, "{person} has {0} {item}. {He} buys {1} more. "
        "How many {item} does {he} have?", commutes=True),
    "subtract": Template(
        lambda top: ((a, b) for a in range(2, top + 1) for b in range(1, a + 1)),
        lambda a, b: a - b, "{person} has {0} {item}. {He} gives away {1}. "
        "How many {item} does {he} have?", commutes=False),
    "add_subtract": Template(
        lambda top: ((a, b, c) for a in range(1, top) for b in range(1, top - a + 1)
                     for c in range(1, a + b + 1)),
        lambda a, b, c: a + b - c, "{person} has {0} {item}. {He} buys {1} more and gives "
        "away {2}. How many {item} does {he} have?", commutes=True),
    "multiply": Template(
        lambda top: ((a, b) for a in range(2, top // 2 + 1) for b in range(2, top // a + 1)),
        lambda a, b: a * b, "{person} has {0} bags of {1} {item}. "
        "How many {item} does {he} have?", commutes=True),
}


def arithmetic_facts(top: int) -> dict[str, dict[tuple, list[tuple]]]:
  """Per template, every fact within `top`: its numbers with a sum's or a product's first two
  sorted -> its keys, (template, numbers), one per order of them (1 + 2 and 2 + 1 are one
  fact, held out together)."""
  facts = {}
  for name, template in TEMPLATES.items():
    facts[name] = {}
    for numbers in template.operands(top):
      fact = (*sorted(numbers[:2]), *numbers[2:]) if template.commutes else numbers
      facts[name].setdefault(fact, []).append((name, numbers))
  return facts


def split_facts(facts: dict, held_out: float, rng: np.random.Generator) -> tuple[list, list]:
  """-> (test, train): lists of facts' keys, `held_out` of each template's facts in test
  (rounded, at least one of a template with two or more; train keeps at least one)."""
  test, train = [], []
  for by_fact in facts.values():
    keys = list(by_fact.values())
    count = min(max(1, round(held_out * len(keys))), len(keys) - 1)
    order = rng.permutation(len(keys))
    test += [keys[i] for i in order[:count]]
    train += [keys[i] for i in order[count:]]
  return test, train


def phrase(key: tuple, rng: np.random.Generator) -> Problem:
  """The problem of `key` told of a random person and item."""
  name, numbers = key
  template = TEMPLATES[name]
  person, pronoun = PEOPLE[rng.integers(len(PEOPLE))]
  question = template.question.format(*numbers, person=person, He=pronoun, he=pronoun.lower(),
                                      item=ITEMS[rng.integers(len(ITEMS))])
  return Problem(question, template.answer(*numbers), key)


def draw_problems(facts: list[list[tuple]], count: int, rng: np.random.Generator,
                  name: str) -> tuple[Problem, ...]:
  """`count` distinct questions of `facts` (each a list of keys), shuffled: the answers take
  turns (each within one problem of as often as any other), then a template reaching that
  answer, a fact of it and the order of its numbers are drawn uniformly. `name`: the config
  field asking for `count`, for the error when too few questions exist."""
  by_answer = {}
  for keys in facts:
    template, numbers = keys[0]
    answer = TEMPLATES[template].answer(*numbers)
    by_answer.setdefault(answer, {}).setdefault(template, []).append(keys)
  turns = [int(a) for a in rng.permutation(sorted(by_answer))]
  problems = {}
  for _ in range(DRAWS_PER_PROBLEM * count):
    by_template = by_answer[turns[len(problems) % len(turns)]]
    template_facts = list(by_template.values())[rng.integers(len(by_template))]
    orders = template_facts[rng.integers(len(template_facts))]
    problem = phrase(orders[rng.integers(len(orders))], rng)
    problems.setdefault(problem.question, problem)
    if len(problems) == count:
      ordered = list(problems.values())
      return tuple(ordered[i] for i in rng.permutation(count))
  raise ValueError(f"{name} = {count} distinct problems are more than the templates give "
                   f"from their split's arithmetic; lower {name} or raise max_number")


def make_task(config: TaskConfig) -> Task:
  """The facts split first (`split_facts`), then each split's problems drawn from its own
  (`draw_problems`), all from `config.seed`."""
  rng = np.random.default_rng(config.seed)
  test, train = split_facts(arithmetic_facts(config.max_number), config.held_out, rng)
  return Task(test=draw_problems(test, config.num_test, rng, "num_test"),
              train=draw_problems(train, config.num_train, rng, "num_train"))


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


def lookup_baseline(task: Task) -> dict:
  """The test accuracy of a lookup table: each test problem answered with the train answer of
  its key (the same template and numbers in the same order), else with the train split's
  most common answer (`fallback`); `seen`: the share of test problems whose key is in train
  (0 when the split holds the arithmetic out)."""
  table = {p.key: p.answer for p in task.train}
  fallback = constant_baselines(task)["train_majority"]["answer"]
  answers = [table.get(p.key, fallback) for p in task.test]
  return {"accuracy": float(np.mean([a == p.answer for a, p in zip(answers, task.test)])),
          "seen": float(np.mean([p.key in table for p in task.test])), "fallback": fallback}


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
      max_gen_toks=answer_tokens(task), strict_match_pattern=json.dumps(STRICT_MATCH_PATTERN)))
  return folder


def write_prompts(problems, path: pathlib.Path) -> pathlib.Path:
  """The problems as `mhc-grpo`'s prompts (`GRPOConfig.prompts`): a JSON line each, its
  question and "Answer:" (the lm-eval task's zero-shot prompt) and its answer's digits."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps({"prompt": p.question + ANSWER, "answer": str(p.answer)})
                          + "\n" for p in problems))
  return path


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
