"""Rewards for GRPO on the word problems (`experiments/word_problems.py`), as plain functions a
user replaces with their own, called as google-tunix's GRPO learner calls a reward function:
`fn(prompts=, completions=, **batch) -> list[float]`, one float per completion, where `batch`
holds the training batch's other columns (`answer`), one entry per completion, and tunix's
`mode`.

A prompt ends with "Answer:" (the lm-eval task's prompt); a completion is what the policy
generated after it, which runs on past the answer's line unless the rollout's `eos_tokens`
hold the newline's id, where lm-eval's `until` ends it. Both rewards read that line only.

`checked_rewards` calls one and names it in one line when it raises or returns anything but
one finite float per completion; `checked(fn)` is `fn` calling through it, with the name and
parameters tunix reads (its metric `rewards/<name>`, the GRPOConfig fields it fills in).
"""

import functools
import numbers
import re
from collections.abc import Callable

import numpy as np

from mhc_jax.checks import one_line

# The lm-eval task's strict-match filter (its `regex_pattern`, which the task's YAML takes from
# here): the first integer of the answer's line.
STRICT_MATCH_PATTERN = "(-?[0-9]+)"
# lm-eval's `until` for the task: where the answer's line ends.
LINE_END = "\n"
WAY_OUT = "a reward function returns one finite float per completion"

_STRICT_MATCH = re.compile(STRICT_MATCH_PATTERN)


def answer_line(completion: str) -> str:
  """The completion up to its first newline: what lm-eval's `until` keeps of it."""
  return completion.split(LINE_END, 1)[0]


def strict_match(text: str) -> str | None:
  """The number strict-match takes from `text` (lm-eval's regex filter: the first match), or
  None where it finds none (lm-eval's "[invalid]")."""
  found = _STRICT_MATCH.search(text)
  return None if found is None else found.group(1)


def exact_match_reward(prompts: list[str], completions: list[str], answer: list,
                       **kwargs) -> list[float]:
  """1.0 where the strict-match number of a completion's answer line is its answer's digits
  (the lm-eval task's exact match: "07" is not 7), else 0.0."""
  del prompts, kwargs
  return [float(strict_match(answer_line(completion)) == str(expected))
          for completion, expected in zip(completions, answer, strict=True)]


def format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
  """1.0 where a completion starts with the answer line the task trains (`Problem.text` after
  "Answer:"): a space, an integer as Python writes it, and the newline, else 0.0."""
  del prompts, kwargs
  return [float(LINE_END in completion and _is_trained_answer(answer_line(completion)))
          for completion in completions]


def _is_trained_answer(line: str) -> bool:
  number = strict_match(line)
  return number is not None and line == f" {int(number)}"


def checked_rewards(fn: Callable, prompts: list[str], completions: list[str],
                    **batch) -> list[float]:
  """`fn(prompts=prompts, completions=completions, **batch)` as floats, one per completion;
  ValueError in one line naming `fn` when it raises or returns anything else."""
  name = getattr(fn, "__name__", repr(fn))
  try:
    returned = fn(prompts=prompts, completions=completions, **batch)
  except Exception as err:  # a user's function: any failure is its own, named in one line
    raise ValueError(f"reward function {name} raised {one_line(err, limit=200)}") from err
  return _as_rewards(returned, len(completions), name)


def _as_rewards(returned, count: int, name: str) -> list[float]:
  """`returned` as `count` floats, or the one line saying what it is instead."""
  problem = _reward_problem(returned, count)
  if problem is not None:
    raise ValueError(f"reward function {name} {problem}; {WAY_OUT}")
  return np.asarray(returned, np.float64).tolist()


def _reward_problem(returned, count: int) -> str | None:
  """What is wrong with `returned` as the rewards of `count` completions, or None."""
  if not _are_numbers(returned):
    return f"returned {returned!r:.80}, not numbers"
  shape = np.shape(returned)
  if len(shape) == 1 and shape[0] != count:
    return f"returned {shape[0]} values for {count} completions"
  if shape != (count,):
    return f"returned shape {shape} for {count} completions"
  values = np.asarray(returned, np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  return f"returned {values[bad[0]]} for completion {bad[0]}" if bad.size else None


def _are_numbers(returned) -> bool:
  """Whether `returned` holds only real numbers (numpy would take "1" and None for floats)."""
  if hasattr(returned, "dtype"):  # numpy and jax arrays
    return np.asarray(returned).dtype.kind in "biuf"
  if isinstance(returned, (list, tuple)):
    return all(_are_numbers(value) for value in returned)
  return isinstance(returned, numbers.Real)


def checked(fn: Callable) -> Callable:
  """`fn` through `checked_rewards`, with its name and signature (what tunix reads)."""

  @functools.wraps(fn)
  def call(prompts, completions, **batch):
    return checked_rewards(fn, prompts, completions, **batch)

  return call
