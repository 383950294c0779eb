"""mhc_jax.lm.grpo and `mhc-grpo`: bad input is one line, exit 2, nothing written (without
tunix too); with tunix (the RL environment), GRPO raises the reward on the word problems over
the same run's first step, writes a metrics line per step, and a run killed mid-way resumes
with the rewards the uninterrupted run had."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments import word_problems
from mhc_jax.lm import cli, grpo, grpo_cli, pretrained
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.metrics import METRICS_FILE
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import with_residual
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.tokenizer import VOCAB_SIZE
from mhc_jax.lm.train import LoopConfig, train

REPO = pathlib.Path(__file__).resolve().parents[1]
ONE_DEVICE = jax.devices()[:1]  # the suite's process has 8 CPU devices; mhc-grpo's has one
# Answers 0..5: a model fine-tuned briefly has the format and guesses among six numbers.
TASK = word_problems.TaskConfig(seed=0, num_train=600, num_test=20, max_number=5)


def finetune(folder: pathlib.Path, variant: str, steps: int) -> tuple[pathlib.Path, list]:
  """A 2-layer byte model of `variant` trained `steps` steps on the task's train problems ->
  (its workdir, the problems)."""
  task = word_problems.make_task(TASK)
  source = word_problems.write_documents(task.train, folder / "task", 30)
  model = with_residual(ModelConfig(vocab_size=VOCAB_SIZE, d_model=32, num_layers=2,
                                    num_heads=4, mlp_dim=64), variant, num_streams=2)
  train(str(folder / "finetuned"), model=model,
        data=DataConfig(source=source, seq_len=64, batch_size=8),
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20),
        loop=LoopConfig(steps=steps, eval_every=10_000, log_every=100, checkpoint_every=10_000,
                        sample_tokens=0), devices=ONE_DEVICE, progress=False)
  return folder / "finetuned", task.train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A barely trained pre-norm model and a prompts file of 4 of its problems."""
  folder = tmp_path_factory.mktemp("tiny")
  workdir, problems = finetune(folder, "prenorm", 2)
  return workdir, word_problems.write_prompts(problems[:4], folder / "prompts.jsonl")


def raising_reward(prompts, completions, **batch):
  raise KeyError("score")


CALLS = []


def nan_after_preflight_reward(prompts, completions, **batch):
  """A reward that passes the preflight call, then returns NaN."""
  CALLS.append(len(completions))
  return [0.0 if len(CALLS) == 1 else float("nan")] * len(completions)


def cli_args(workdir, init_from, prompts, *bindings) -> list[str]:
  args = ["--gin_file", "grpo/word_problems.gin", "--workdir", str(workdir), "--no_progress",
          "--gin_param", f'GRPOConfig.prompts = "{prompts}"']
  args += [arg for binding in bindings for arg in ("--gin_param", binding)]
  return args + ([] if init_from is None else ["--init_from", str(init_from)])


@pytest.mark.parametrize("binding, message", [
    ("GRPOConfig.group_size = 1", "GRPOConfig.group_size must be an int >= 2, got 1"),
    ("GRPOConfig.kl_coeff = -0.1", "GRPOConfig.kl_coeff is -0.1: it must be >= 0"),
    ("GRPOConfig.temperature = 0.0", "GRPOConfig.temperature is 0.0: it must be > 0"),
    ('GRPOConfig.kl_estimator = "k9"', "GRPOConfig.kl_estimator must be one of low_var_kl"),
    ("GRPOConfig.rewards = []", "GRPOConfig.rewards is empty"),
    ('GRPOConfig.rewards = ["mhc_jax.lm.rewards.nope"]',
     "reward function 'mhc_jax.lm.rewards.nope' cannot be imported"),
    ('GRPOConfig.rewards = ["test_grpo.raising_reward"]',
     "reward function raising_reward raised KeyError: 'score'"),
    # (The suite's process has 8 devices.)
    ("MeshConfig.data = 8\nGRPOConfig.max_prompt_length = 8", "prompt 1 of .* has \\d+ tokens, more than "
                                         "GRPOConfig.max_prompt_length = 8: raise it"),
    ("ModelConfig.num_layers = 3", "ModelConfig is bound, but mhc-grpo post-trains the "
                                "--init_from model as it is"),
])
def test_bad_settings_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, tiny, binding,
                                                            message):
  init_from, prompts = tiny
  workdir = tmp_path / "grpo"
  assert grpo_cli.main(cli_args(workdir, init_from, prompts, binding)) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("mhc-grpo: "), err
  assert re.search(message, err), err
  assert not workdir.exists()


def test_bad_prompts_and_starts_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, tiny):
  init_from, prompts = tiny
  workdir = tmp_path / "grpo"
  empty, broken, other = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl", tmp_path / "x"
  empty.write_text("\n")
  broken.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": 3}\n')
  other.mkdir()
  cases = [
      (cli_args(workdir, init_from, empty), f"GRPOConfig.prompts {empty} holds no prompts"),
      (cli_args(workdir, init_from, broken), f'{broken}:2 is no object with a string "prompt"'),
      (cli_args(workdir, init_from, tmp_path / "none.jsonl"), "none.jsonl is not a file"),
      (cli_args(workdir, None, prompts), "--init_from is required"),
      (cli_args(workdir, other, prompts), f"--init_from {other} holds no config.json"),
  ]
  for args, message in cases:
    assert grpo_cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, (message, err)
    assert not workdir.exists()


def test_a_workdir_of_another_start_or_settings_is_refused(tmp_path, capsys, tiny):
  init_from, prompts = tiny
  workdir = tmp_path / "grpo"
  workdir.mkdir()
  start = grpo.read_start(str(init_from))
  elsewhere = grpo.Start(pretrained.Source(pathlib.Path("/elsewhere"), pretrained.WORKDIR,
                                           start.source.config, 3), start.data)
  config = grpo.GRPOConfig(prompts=str(prompts))
  recorded = grpo.record(config, OptimizerConfig(), MeshConfig(), elsewhere)
  (workdir / grpo.CONFIG).write_text(json.dumps(recorded))
  assert grpo_cli.main(cli_args(workdir, init_from, prompts)) == 2
  assert "holds a run with another init_from (path '/elsewhere'" in capsys.readouterr().err
  recorded = grpo.record(config, OptimizerConfig(), MeshConfig(), start)
  (workdir / grpo.CONFIG).write_text(json.dumps(recorded))
  assert grpo_cli.main(cli_args(workdir, init_from, prompts, "GRPOConfig.steps = 7")) == 2
  assert "holds a run with another grpo (steps 100, now 7)" in capsys.readouterr().err
  assert sorted(p.name for p in workdir.iterdir()) == [grpo.CONFIG]


def test_mhc_train_refuses_a_grpo_preset(tmp_path, capsys):
  assert cli.main(["--gin_file", "grpo/word_problems.gin", "--workdir", str(tmp_path / "w")]) == 2
  assert capsys.readouterr().err == ("mhc-train: grpo/word_problems.gin is for mhc-grpo, not "
                                     "for mhc-train\n")


def test_the_group_spread_is_per_group():
  rewards = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 0.0])  # groups of 3: std 0.4714, 0.9428
  assert grpo.group_std(rewards, 3) == pytest.approx((np.std([0, 1, 1]) + np.std([1, 2, 0])) / 2)


# --- with tunix --------------------------------------------------------------------------


def run_command(args: list[str]) -> subprocess.Popen:
  """`mhc-grpo ARGS` in a process of its own, as a user runs it."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.Popen([sys.executable, "-m", "mhc_jax.lm.grpo_cli", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rows_of(workdir: pathlib.Path) -> list[dict]:
  from mhc_jax.lm.metrics import read_metrics
  return read_metrics(workdir)


def test_tunix_grpo_raises_the_reward_on_the_word_problems(tmp_path):
  pytest.importorskip("tunix")
  init_from, problems = finetune(tmp_path, "prenorm", 600)
  prompts = word_problems.write_prompts(problems[:4], tmp_path / "prompts.jsonl")
  workdir = tmp_path / "grpo"
  config = grpo.GRPOConfig(prompts=str(prompts), group_size=16, prompts_per_step=4, steps=50,
                           max_new_tokens=4, max_prompt_length=96, checkpoint_every=25)
  rows = grpo.post_train(str(workdir), str(init_from), config, OptimizerConfig(
      learning_rate=3e-3, warmup_steps=0, weight_decay=0.0), progress=False,
      devices=ONE_DEVICE)
  assert rows == rows_of(workdir) and [r["step"] for r in rows] == list(range(1, 51))
  assert set(grpo.METRICS) | {"reward/exact_match_reward", "reward/format_reward"} <= set(rows[0])
  for row in rows:
    assert row["reward"] == pytest.approx(row["reward/exact_match_reward"]
                                          + row["reward/format_reward"])
  # Step 1's rollout is the fine-tune's (no update yet). Each step's reward is a mean over 64
  # completions of a sum of two 0/1 rewards (standard deviation <= 1 each), so the standard
  # error of step 1's is <= 1/8 and of the mean over steps 21..50 <= 1/sqrt(64 * 30); the
  # margin, 2.5 x the bound on their difference's (0.127), is what chance does not reach.
  margin = 2.5 * np.hypot(1 / 8, 1 / np.sqrt(64 * 30))
  later = np.mean([r["reward"] for r in rows[20:]])
  assert later > rows[0]["reward"] + margin, (rows[0]["reward"], later)
  assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())
  assert json.loads((workdir / grpo.FINISHED).read_text())["step"] == 50
  # The policy is a workdir the project's readers load, and it moved from the fine-tune.
  from mhc_jax.lm import inference
  trained, start = inference.load(workdir).model, inference.load(init_from).model
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                       nnx_params(trained), nnx_params(start)))
  assert max(moved) > 1e-3
  finished = grpo.post_train(str(workdir), str(init_from), config, OptimizerConfig(
      learning_rate=3e-3, warmup_steps=0, weight_decay=0.0), devices=ONE_DEVICE)
  assert finished == []  # nothing to do


def nnx_params(model):
  from flax import nnx
  return nnx.to_pure_dict(nnx.state(model))


@pytest.fixture(scope="module")
def mhc_finetuned(tmp_path_factory):
  """An mHC model fine-tuned 100 steps (it has the answers' format, not the answers) and a
  prompts file of 6 of its problems."""
  pytest.importorskip("tunix")
  folder = tmp_path_factory.mktemp("mhc")
  init_from, problems = finetune(folder, "mhc", 100)
  return init_from, word_problems.write_prompts(problems[:6], folder / "prompts.jsonl")


def test_tunix_grpo_under_a_mesh_draws_and_learns_as_on_one_device(tmp_path, mhc_finetuned):
  init_from, prompts = mhc_finetuned
  config = grpo.GRPOConfig(prompts=str(prompts), group_size=4, prompts_per_step=2, steps=3,
                           max_new_tokens=4, max_prompt_length=96)
  runs = {name: grpo.post_train(str(tmp_path / name), str(init_from), config, mesh=mesh,
                                devices=jax.devices()[:mesh.data * mesh.fsdp * mesh.tensor],
                                progress=False)
          for name, mesh in (("one", MeshConfig()), ("mesh", MeshConfig(fsdp=2, tensor=2)))}
  assert 0 < sum(r["reward"] for r in runs["one"])  # rewards that can differ
  for one, mesh in zip(runs["one"], runs["mesh"], strict=True):
    assert mesh["reward"] == one["reward"] and mesh["response_length"] == one["response_length"]
    assert mesh["loss"] == pytest.approx(one["loss"], rel=1e-3, abs=1e-6)


def test_tunix_a_reward_gone_bad_mid_run_stops_it_in_one_line(tmp_path, mhc_finetuned):
  init_from, prompts = mhc_finetuned
  config = grpo.GRPOConfig(prompts=str(prompts), group_size=2, prompts_per_step=2, steps=3,
                           max_new_tokens=4, max_prompt_length=96,
                           rewards=("test_grpo.nan_after_preflight_reward",))
  CALLS.clear()
  with pytest.raises(ValueError, match=r"^reward function nan_after_preflight_reward returned "
                                       r"nan for completion 0; a reward function returns one "
                                       r"finite float per completion$"):
    grpo.post_train(str(tmp_path / "grpo"), str(init_from), config, devices=ONE_DEVICE,
                    progress=False)
  assert CALLS == [1, 4] and not (tmp_path / "grpo" / grpo.FINISHED).exists()


def test_tunix_killed_run_resumes_with_the_rewards_of_the_uninterrupted_one(tmp_path,
                                                                           mhc_finetuned):
  init_from, prompts = mhc_finetuned
  bindings = ["GRPOConfig.steps = 8", "GRPOConfig.checkpoint_every = 3",
              "GRPOConfig.group_size = 4", "GRPOConfig.prompts_per_step = 2",
              "GRPOConfig.max_prompt_length = 96", "GRPOConfig.max_new_tokens = 4"]
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  process = run_command(cli_args(whole, init_from, prompts, *bindings))
  assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
  process = run_command(cli_args(killed, init_from, prompts, *bindings))
  deadline = time.monotonic() + 600
  # Past step 3's checkpoint; the workdir exists a moment before its metrics file does.
  while len(rows_of(killed)) < 5 if (killed / METRICS_FILE).exists() else True:
    assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / grpo.FINISHED).exists()
  process = run_command(cli_args(killed, init_from, prompts, *bindings))
  assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
  expected, got = rows_of(whole), rows_of(killed)
  assert [r["step"] for r in got] == list(range(1, 9))
  for want, have in zip(expected, got):
    assert have["reward"] == want["reward"] and have["response_length"] == want[
        "response_length"], (want["step"], want["reward"], have["reward"])
    assert have["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7)
  # mHC logs its H_res gains at every step; a doubly stochastic H_res has row sums 1.
  assert all(abs(r["forward_gain/max"] - 1) < 1e-3 for r in got)
