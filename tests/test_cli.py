"""mhc-train's command line says what it does: it trains and writes its workdir, finished runs,
bad configs and unquoted strings in one line, presets that compose and the first line saying
what mhc-train added, schedule changes on resume, the presets in --help; every entry point's
--help describes it in whole sentences."""

import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mhc_jax.lm import cli as cli_lib, train as train_lib
from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
TINY = {
    "ModelConfig.d_model": 32, "ModelConfig.num_layers": 2, "ModelConfig.num_heads": 4,
    "ModelConfig.mlp_dim": 64, "DataConfig.seq_len": 32, "DataConfig.batch_size": 8,
    "OptimizerConfig.learning_rate": 3e-3, "OptimizerConfig.warmup_steps": 1,
    "LoopConfig.steps": STEPS, "LoopConfig.eval_every": 1000, "LoopConfig.log_every": 1,
    "LoopConfig.checkpoint_every": 1000, "LoopConfig.sample_tokens": 4,
}


def cli(workdir, corpus, bindings=None) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "mhc_jax.lm.cli", "--no_progress", "--gin_file", "base.gin"]
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
  command = [sys.executable, "-m", "mhc_jax.lm.cli", "--gin_param", "ModelConfig.residual = mhc",
             "--workdir", str(tmp_path)]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  hint = 'strings need quotes, e.g. ModelConfig.residual = "mhc"'
  assert len(lines) == 1 and hint in lines[0], proc.stderr
  assert not list(tmp_path.iterdir())


@pytest.fixture
def trained(monkeypatch):
  """cli.main with a `train` that records its configs instead of training."""
  monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # main's hooks are undone afterwards
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  runs = []
  monkeypatch.setattr(train_lib, "train", lambda workdir, **configs: runs.append(configs))
  return runs


DEFAULT = "shakespeare_tiny.gin (default: no --gin_file includes base.gin)"
TINY_MODEL, TINY_RUN = "d_model 128 x 4 layers", "600 steps of 16 x 128 tokens"


@pytest.mark.parametrize("files, trains, line", [
    ([], ("prenorm", 128), f"{DEFAULT} -> prenorm, {TINY_MODEL}, {TINY_RUN}"),
    # A residual preset alone adds to the default experiment, not to the configs' defaults.
    (["residual/mhc.gin"], ("mhc", 128),
     f"{DEFAULT}, residual/mhc.gin -> mhc (n=4), {TINY_MODEL}, {TINY_RUN}"),
    # Given before its experiment, it still applies after it.
    (["residual/hc.gin", "shakespeare_small.gin"], ("hc", 256), "shakespeare_small.gin, "
     "residual/hc.gin -> hc (n=4), d_model 256 x 6 layers, 3000 steps of 16 x 256 tokens"),
    # As given.
    (["shakespeare_small.gin", "residual/hc.gin"], ("hc", 256), "shakespeare_small.gin, "
     "residual/hc.gin -> hc (n=4), d_model 256 x 6 layers, 3000 steps of 16 x 256 tokens"),
    (["base.gin"], ("prenorm", 256),  # the configs' defaults, as asked
     "base.gin -> prenorm, d_model 256 x 6 layers, 1000 steps of 16 x 256 tokens"),
])
def test_presets_compose_and_the_first_line_names_every_file_in_force(trained, capsys, files,
                                                                     trains, line):
  assert cli_lib.main([arg for file in files for arg in ("--gin_file", file)]
                      + ["--workdir", "somewhere"]) == 0
  (run,) = trained
  assert (run["model"].residual, run["model"].d_model) == trains
  assert run["presets"] == f"mhc-train: presets: {line}"  # train() prints it as it starts
  assert capsys.readouterr().err == ""


def test_a_file_of_ones_own_that_includes_nothing_adds_to_the_default_and_says_so(
    trained, capsys, tmp_path):
  own = tmp_path / "own.gin"
  own.write_text("ModelConfig.d_model = 48\n")
  assert cli_lib.main(["--gin_file", str(own), "--workdir", "somewhere"]) == 0
  (run,) = trained
  assert (run["model"].d_model, run["model"].num_layers, run["loop"].steps) == (48, 4, 600)
  assert run["presets"] == (
      f"mhc-train: presets: {DEFAULT}, {own} -> prenorm, d_model 48 x 4 layers, {TINY_RUN}")


def test_help_states_the_rule_and_lists_only_the_presets_mhc_train_runs(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli_lib.parse_args(["--help"])
  assert exit_.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  assert "re-running on it resumes" in text
  experiments, add_ons = text.split(" experiments: ", 1)[1].split(" add-ons: ")
  for preset in ("shakespeare_tiny.gin", "tpu_pod_mhc.gin", "base.gin"):
    assert f" {preset} " in f"{experiments} "
  assert " residual/mhc.gin " in add_ons and "shakespeare_tiny.gin when no --gin_file" in add_ons
  assert "compare/cpu.gin" not in text and "sweeps/residuals_tiny.gin" not in text
  assert ("settings of experiments/ scripts, which run from a source checkout only: compare/ "
          "(python -m experiments.compare_residuals or python -m experiments.stability_map) "
          "retrofit/ (python -m experiments.retrofit) sweeps/ (python -m experiments.sweep)"
          ) in text
  assert "settings of other commands: grpo/ (mhc-grpo)" in text and "word_problems" not in text


ENTRY_POINTS = sorted({f"experiments.{path.stem}" for path in (REPO / "experiments").glob("*.py")
                       if "\ndef main(" in path.read_text()}
                      | {"kernels_pallas.sinkhorn.bench", "mhc_jax.lm.prepare_data",
                         "mhc_jax.lm.grpo_cli"})


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_entry_points_help_gives_its_docstrings_first_paragraph_whole(module, capsys,
                                                                            monkeypatch):
  monkeypatch.setenv("COLUMNS", "1000")  # one line: argparse would break "hyper-connections"
  module = importlib.import_module(module)
  with pytest.raises(SystemExit) as exit_:
    module.main(["--help"])
  assert exit_.value.code == 0
  first_paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
  assert first_paragraph in " ".join(capsys.readouterr().out.split())


def run_cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mhc_jax.lm.cli", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_its_workdir(tmp_path, corpus):
  bindings = [f"DataConfig.source = '{corpus}'", "DataConfig.seq_len = 32",
              "LoopConfig.steps = 4", "LoopConfig.eval_every = 2", "LoopConfig.sample_tokens = 5"]
  proc = run_cli("--gin_file", "shakespeare_tiny.gin",
                 *[arg for binding in bindings for arg in ("--gin_param", binding)],
                 "--workdir", "relative/workdir", cwd=tmp_path)  # from outside the repo
  tmp_path = tmp_path / "relative/workdir"
  assert proc.returncode == 0, proc.stderr
  assert "parameters" in proc.stdout and "sample after 4 steps" in proc.stdout
  assert [row["step"] for row in read_metrics(tmp_path)] == [2, 4]
  assert "LoopConfig.steps = 4" in (tmp_path / "config.gin").read_text()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("args, culprit", [
    (["--gin_param", "NoSuchThing.value = 3"], "NoSuchThing"),
    (["--gin_param", "ModelConfig.no_such_field = 3"], "no_such_field"),
    (["--gin_param", "ModelConfig.d_model = (("], "ModelConfig.d_model"),
    (["--gin_file", "no_such_file.gin"], "no_such_file.gin"),
])
def test_cli_bad_config_is_one_line_and_exit_code_2(tmp_path, args, culprit):
  proc = run_cli(*args, "--workdir", str(tmp_path))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and culprit in lines[0], proc.stderr
