"""mhc-train's command line says what it does: finished runs, unquoted strings, the default
preset, schedule changes on resume, the presets in --help."""

import os
import pathlib
import shutil
import subprocess
import sys

import gin
import pytest

from mhc_jax import train as train_lib
from mhc_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
TINY = {
    "ModelConfig.d_model": 32, "ModelConfig.num_layers": 2, "ModelConfig.num_heads": 4,
    "ModelConfig.mlp_dim": 64, "DataConfig.seq_len": 32, "DataConfig.batch_size": 8,
    "OptimizerConfig.learning_rate": 3e-3, "OptimizerConfig.warmup_steps": 1,
    "LoopConfig.steps": STEPS, "LoopConfig.eval_every": 1000, "LoopConfig.log_every": 1,
    "LoopConfig.checkpoint_every": 1000, "train.sample_tokens": 4, "train.progress": False,
}


def cli(workdir, corpus, bindings=None) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mhc_jax.train", "--gin_file", "base.gin"]
  for name, value in {**TINY, "DataConfig.source": corpus, **(bindings or {})}.items():
    command += ["--gin_param", f"{name} = {value!r}"]
  return subprocess.run(command + ["--workdir", str(workdir)], cwd=REPO, capture_output=True,
                        text=True, timeout=240, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def checkpoints(workdir) -> list[str]:
  return sorted(path.name for path in (workdir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
  """A workdir whose run did all its steps."""
  workdir = tmp_path_factory.mktemp("finished")
  proc = cli(workdir, corpus)
  assert proc.returncode == 0, proc.stderr
  assert f"sample after {STEPS} steps" in proc.stdout
  assert (workdir / train_lib.FINISHED).exists()
  return workdir


def test_finished_run_says_so_and_neither_trains_nor_samples(finished, corpus):
  metrics_file = finished / "metrics.jsonl"
  before = checkpoints(finished), read_metrics(finished), metrics_file.stat().st_mtime_ns
  proc = cli(finished, corpus)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and str(finished) in lines[0] and f"({STEPS} steps)" in lines[0], lines
  assert proc.stdout == ""  # no banner, no sample
  assert (checkpoints(finished), read_metrics(finished), metrics_file.stat().st_mtime_ns) == before


def test_resuming_with_another_schedule_warns(finished, corpus, tmp_path):
  workdir = tmp_path / "extended"
  shutil.copytree(finished, workdir)
  lower = {"OptimizerConfig.learning_rate": 1e-3}
  proc = cli(workdir, corpus, {"LoopConfig.steps": STEPS + 2, **lower})
  assert proc.returncode == 0, proc.stderr
  warnings = [line for line in proc.stderr.splitlines() if "schedule changes" in line]
  assert len(warnings) == 1, proc.stderr
  assert f"LoopConfig.steps {STEPS} -> {STEPS + 2}" in warnings[0]
  assert "OptimizerConfig.learning_rate 0.003 -> 0.001" in warnings[0]
  assert f"resuming at step {STEPS}" in proc.stdout
  assert [row["step"] for row in read_metrics(workdir)] == list(range(1, STEPS + 3))
  # The schedule now in force is the one recorded: resuming with it again is not a change.
  proc = cli(workdir, corpus, {"LoopConfig.steps": STEPS + 3, **lower})
  assert proc.returncode == 0, proc.stderr
  assert "OptimizerConfig" not in proc.stderr and f"steps {STEPS + 2} -> {STEPS + 3}" in proc.stderr


def test_unquoted_string_gets_a_hint_and_exit_code_2(tmp_path):
  command = [sys.executable, "-m", "mhc_jax.train", "--gin_param", "ModelConfig.residual = mhc",
             "--workdir", str(tmp_path)]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  hint = 'strings need quotes, e.g. ModelConfig.residual = "mhc"'
  assert len(lines) == 1 and hint in lines[0], proc.stderr
  assert not list(tmp_path.iterdir())


@pytest.fixture
def in_process(monkeypatch):
  """`main` called here: its hooks and gin bindings are undone afterwards."""
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  yield
  gin.clear_config()


def test_without_gin_file_the_tiny_preset_runs_and_is_named(in_process, monkeypatch, capsys):
  ran = []
  def train(workdir):
    ran.append((workdir, gin.query_parameter("LoopConfig.steps")))

  monkeypatch.setattr(train_lib, "train", train)
  assert train_lib.main(["--workdir", "somewhere"]) == 0
  assert ran == [("somewhere", 600)]  # shakespeare_tiny.gin's steps, not LoopConfig's default
  assert capsys.readouterr().err == "mhc-train: no --gin_file given: using shakespeare_tiny.gin\n"


def test_help_describes_the_workdir_and_lists_every_preset(capsys):
  with pytest.raises(SystemExit) as exit_:
    train_lib.parse_args(["--help"])
  assert exit_.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "re-running on it resumes" in text
  for preset in ("shakespeare_tiny.gin", "residual/mhc.gin", "compare/cpu.gin", "base.gin"):
    assert f" {preset} " in f"{text} "
