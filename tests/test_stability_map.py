"""stability_map end to end on a tiny corpus: the summary's runs and cells, the divergence flag
against the metrics, the figure, reuse of finished runs and a bad grid in one line."""

import json
import math
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from experiments.stability_map import UNIFORM_MARGIN, cells
from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

WORDS = "thou art my lord and I thy humble servant for the king doth love".split()
VARIANTS, LEARNING_RATES, DEPTHS = ("prenorm", "mhc"), (1e-2, 1e3), (1, 2)
# 1e3 is far past any stable learning rate: its runs must diverge, 1e-2's must not.
MICRO = """
include 'base.gin'
Grid.variants = {variants}
Grid.learning_rates = {learning_rates}
Grid.depths = {depths}
Grid.seeds = [0]
Grid.num_streams = 2
DataConfig.source = "{source}"
DataConfig.seq_len = 16
DataConfig.batch_size = 4
ModelConfig.d_model = 16
ModelConfig.num_heads = 2
ModelConfig.mlp_dim = 32
OptimizerConfig.warmup_steps = 1
LoopConfig.steps = 3
LoopConfig.eval_every = 3
LoopConfig.eval_batches = 1
LoopConfig.checkpoint_every = 3
LoopConfig.log_every = 1
"""
RUNS = len(VARIANTS) * len(LEARNING_RATES) * len(DEPTHS)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
  """The micro preset on six small documents of pseudo-verse."""
  root = tmp_path_factory.mktemp("stability_map")
  rng = np.random.default_rng(0)
  for d in range(6):
    lines = [" ".join(rng.choice(WORDS, 6)).capitalize() + "." for _ in range(30)]
    (root / f"doc{d}.txt").write_text("\n".join(lines))
  path = root / "micro.gin"
  path.write_text(MICRO.format(variants=list(VARIANTS), learning_rates=list(LEARNING_RATES),
                               depths=list(DEPTHS), source=root / "*.txt"))
  return str(path)


def stability_map(preset: str, out: pathlib.Path, *gin_params: str) -> subprocess.CompletedProcess:
  # A process of its own, as users run it: gin and JAX's compilation cache are global state.
  # Even quick compiles are cached, so the second invocation compiles nothing.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  args = [a for p in gin_params for a in ("--gin_param", p)]
  return subprocess.run([sys.executable, "-m", "experiments.stability_map", "--preset", preset,
                         "--out", str(out), "--no_progress", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def check_summary(out: pathlib.Path) -> None:
  summary = json.loads((out / "summary.json").read_text())
  runs, cells = summary["runs"], summary["cells"]
  assert len(runs) == len(cells) == RUNS
  assert {(r["variant"], r["depth"], r["learning_rate"], r["seed"]) for r in runs} == \
      {(v, d, lr, 0) for v in VARIANTS for d in DEPTHS for lr in LEARNING_RATES}
  assert set(runs[0]) >= {"variant", "depth", "learning_rate", "seed", "final_train_loss",
                          "final_eval_loss", "diverged", "skipped_updates"}
  assert summary["settings"]["loop"]["nonfinite"] == "skip"
  assert summary["settings"]["num_streams"] == 2
  for run in runs:
    last = read_metrics(out / "runs" / run["run"])[-1]
    assert last["step"] == 3 and run["skipped_updates"] == last["skipped_steps"]
    # The whole validation split's loss, not the subset's of the intermediate evaluations.
    np.testing.assert_equal(run["final_eval_loss"], last["final_eval_loss"])
    if run["learning_rate"] != 1e3:  # a run that learned: the two evaluations differ
      assert run["final_eval_loss"] != last["eval_loss"]
    # not <=: NaN compares false, so a NaN loss counts as diverged too.
    learned = all(last[k] < math.log(258) - UNIFORM_MARGIN
                  for k in ("train_loss", "final_eval_loss"))
    bad = last["skipped_steps"] > 0 or not learned
    assert run["diverged"] == bad == (run["learning_rate"] == 1e3), run
  for cell in cells:
    assert (cell["final_eval_loss"] is None) == (cell["diverged_seeds"] == 1)


def check_report(out: pathlib.Path) -> None:
  data = (out / "stability_map.png").read_bytes()
  assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
  text = (out / "report.md").read_text()
  assert "](stability_map.png)" in text and "ln(vocab)" in text
  assert all(f"## {variant}" in text for variant in VARIANTS)
  assert text.count("| diverged") == len(VARIANTS) * len(DEPTHS)


def test_map_of_every_cell_then_reuse(preset, tmp_path):
  # One test for the whole grid, so that parallel workers do not each train it.
  proc = stability_map(preset, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(": training") == RUNS
  check_summary(tmp_path)
  check_report(tmp_path)
  metrics = sorted((tmp_path / "runs").glob("*/metrics.jsonl"))
  before = {p: p.stat().st_mtime_ns for p in metrics}
  proc = stability_map(preset, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count("finished, reused") == RUNS and ": training" not in proc.stdout
  assert len(metrics) == RUNS and {p: p.stat().st_mtime_ns for p in metrics} == before


def test_cells_hold_the_mean_and_range_of_their_seeds():
  grid = types.SimpleNamespace(variants=("hc",), depths=(4, 8), learning_rates=(0.1,))

  def run(depth, seed, loss, diverged=False):
    return {"variant": "hc", "depth": depth, "learning_rate": 0.1, "seed": seed,
            "final_eval_loss": loss, "diverged": diverged}

  runs = [run(4, 0, 2.4), run(4, 1, 3.5), run(4, 2, 2.6), run(8, 0, 2.5), run(8, 1, 9.0, True)]
  shallow, deep = cells(types.SimpleNamespace(grid=grid), runs)
  assert shallow["final_eval_loss"] == pytest.approx(2.8333333)
  assert shallow["seed_range"] == [2.4, 3.5] and shallow["diverged_seeds"] == 0
  assert deep["final_eval_loss"] is None and deep["seed_range"] is None
  assert (deep["seeds"], deep["diverged_seeds"]) == (2, 1)


def test_bad_grid_is_one_line_and_exit_2(preset, tmp_path):
  proc = stability_map(preset, tmp_path, 'Grid.variants = ["prenorm", "nope"]')
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "variants must be" in proc.stderr
  assert not (tmp_path / "runs").exists()
