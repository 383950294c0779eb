"""mhc_jax.lm.rewards: the word problems' rewards as tunix's GRPO calls them, the exact match
scored as the lm-eval task scores it (its own filter and metric, loaded by lm-eval from the
task's files), and the one line that names a reward function gone wrong."""

import inspect
import math
import re

import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from experiments import word_problems
from mhc_jax.lm import rewards

# Continuations as lm-eval's `until` leaves them (no newline), each against the answer 12.
CONTINUATIONS = (" 12", " 12 cups", "12", " 012", " 120", " -12", " 1 2", " twelve", "",
                 " 3 then 12", " 12.5", "x12y", " 12,000")


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory):
  """The word problems' task as lm-eval builds it from `write_lm_eval_task`'s files."""
  task = word_problems.make_task(word_problems.TaskConfig(num_train=4, num_test=2))
  folder = word_problems.write_lm_eval_task(task, tmp_path_factory.mktemp("task"))
  manager = TaskManager(include_path=str(folder), include_defaults=False)
  return manager.load([word_problems.LM_EVAL_TASK])["tasks"][word_problems.LM_EVAL_TASK]


def lm_eval_strict_match(task, continuation: str) -> str:
  """What the task's strict-match filter keeps of one continuation."""
  strict = next(f for f in task._filters if f.name == "strict-match")
  instance = Instance("generate_until", {}, ("", {}), 0)
  instance.resps = [continuation]
  strict.apply([instance])
  return instance.filtered_resps["strict-match"]


@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_strict_match_is_the_lm_eval_tasks_filter(lm_eval_task, continuation):
  taken = rewards.strict_match(continuation)
  assert (taken if taken is not None else "[invalid]") == lm_eval_strict_match(
      lm_eval_task, continuation)


@pytest.mark.parametrize("continuation", CONTINUATIONS)
def test_the_exact_match_reward_is_the_lm_eval_tasks_score(lm_eval_task, continuation):
  """lm-eval stops at the newline; a rollout runs on, here into a line with the answer."""
  doc = {"question": "Tom has 9 pens. How many?", "answer": "12"}
  score = lm_eval_task.process_results(doc, [lm_eval_strict_match(lm_eval_task, continuation)])
  completion = continuation + "\n12 cups. Ann has 7 cups. She buys 5 more.\nAnswer: 12\n"
  assert rewards.exact_match_reward(["p"], [completion], answer=["12"]) == [
      float(score["exact_match"])]


def test_exact_match_rewards_each_completion_against_its_own_answer():
  completions = [" 4\n", " 4\n", " 7 apples\n", " 07\n", " 5", "\n 5\n"]
  answers = [4, "5", 7, 7, 5, 5]  # tunix passes the batch's column: ints or strings
  assert rewards.exact_match_reward(["p"] * 6, completions, answer=answers, mode="train") == [
      1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_the_format_reward_is_the_answer_line_the_task_trains():
  problem = word_problems.make_task(word_problems.TaskConfig(num_train=4, num_test=2)).test[0]
  trained = problem.text.split(word_problems.ANSWER, 1)[1]  # " N\n": what follows the prompt
  assert trained == f" {problem.answer}\n"
  completions = [trained, trained + "Ann has", " 12\n", " -4\n", " 3", " 03\n", "3\n",
                 "  3\n", " 3 pens\n", " three\n", "\n 3\n", " -0\n", ""]
  assert rewards.format_reward(["p"] * len(completions), completions, mode="train") == [
      1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_the_rewards_take_the_learners_arguments():
  """tunix's reward manager calls `fn(prompts=, completions=, **batch columns, mode=)` and
  fills in any other parameter named like a GRPOConfig field: none here."""
  for fn in (rewards.exact_match_reward, rewards.format_reward):
    names = [p.name for p in inspect.signature(fn).parameters.values()]
    assert names[:2] == ["prompts", "completions"] and names[-1] == "kwargs"
  assert rewards.checked_rewards(rewards.format_reward, ["p", "q"], [" 1\n", "x"],
                                 answer=[1, 2], mode="train") == [1.0, 0.0]


def answer_length(prompts, completions, **batch):
  return [float(len(c)) for c in completions]


@pytest.mark.parametrize("returned, problem", [
    ([1.0], "returned 1 values for 2 completions"),
    (1.0, r"returned shape \(\) for 2 completions"),
    ([[1.0], [0.0]], r"returned shape \(2, 1\) for 2 completions"),
    (np.zeros((2, 1)), r"returned shape \(2, 1\) for 2 completions"),
    ([1.0, math.nan], "returned nan for completion 1"),
    ([-math.inf, 0.0], "returned -inf for completion 0"),
    (["1.0", None], "returned \\['1.0', None\\], not numbers"),
    (None, "returned None, not numbers"),
])
def test_a_bad_reward_is_named_in_one_line(returned, problem):
  def my_reward(prompts, completions, **batch):
    return returned

  with pytest.raises(ValueError) as err:
    rewards.checked_rewards(my_reward, ["p", "q"], [" 1\n", " 2\n"])
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith("reward function my_reward ")
  assert message.endswith("; a reward function returns one finite float per completion")
  assert re.search(problem, message)


def test_a_reward_that_raises_is_named_in_one_line():
  def my_reward(prompts, completions, answer, **batch):
    return [float(a) for a in answer]

  with pytest.raises(ValueError, match=r"^reward function my_reward raised ValueError: could "
                                       r"not convert string to float: 'x'$"):
    rewards.checked_rewards(my_reward, ["p"], [" 1\n"], answer=["x"])
  with pytest.raises(ValueError, match=r"^reward function my_reward raised TypeError: .*"
                                       r"missing 1 required positional argument: 'answer'$"):
    rewards.checked_rewards(my_reward, ["p"], [" 1\n"])


def test_checked_keeps_the_name_and_parameters():
  checked = rewards.checked(answer_length)
  assert checked.__name__ == "answer_length"  # tunix's metric: rewards/answer_length
  assert inspect.signature(checked) == inspect.signature(answer_length)
  assert checked(prompts=["p"], completions=["abc"], mode="train") == [3.0]


def test_checked_raises_the_one_line():
  def one_reward(prompts, completions, **batch):
    return [1.0]

  with pytest.raises(ValueError, match="^reward function one_reward returned 1 values for 2 "
                                       "completions;"):
    rewards.checked(one_reward)(prompts=["p", "q"], completions=["a", "b"], mode="train")


def test_tunix_scores_completions_with_the_checked_rewards():
  """tunix's own reward manager (what GRPOLearner calls) sums the rewards per completion and
  lets the one line through."""
  pytest.importorskip("tunix")
  from tunix.rl.grpo.grpo_learner import GRPOConfig
  from tunix.rl.reward_manager import SequenceRewardManager

  fns = [rewards.checked(rewards.exact_match_reward), rewards.checked(rewards.format_reward)]
  manager = SequenceRewardManager(fns, GRPOConfig(num_generations=2))
  scored = manager(prompts=["p"] * 4, completions=[" 4\nTom", " 04\n", " 5\n", " 4"],
                   answer=["4", "4", "4", "4"], mode="train")
  np.testing.assert_array_equal(scored["rewards"], [2.0, 0.0, 1.0, 1.0])

  def half(prompts, completions, **batch):
    return [0.5] * (len(completions) // 2)

  manager = SequenceRewardManager([rewards.checked(half)], GRPOConfig(num_generations=2))
  with pytest.raises(ValueError, match="^reward function half returned 2 values for 4 "):
    manager(prompts=["p"] * 4, completions=["a"] * 4, mode="train")
