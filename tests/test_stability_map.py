"""stability_map end to end on a tiny corpus: the summary's runs and cells, the failure rule
against the metrics, the gains, the figure, reuse of finished runs, the confirm phase with its
Fisher tests, and a bad grid in one line."""

import dataclasses
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import types

import numpy as np
import pytest
from scipy import stats

from experiments.report.thresholds import Thresholds, failed
from experiments.runs import preset_path
from experiments.stability_map import (cells, confirm_rate, confirm_summary, load_settings,
                                       validation_reference)
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

VARIANTS, LEARNING_RATES, DEPTHS = ("prenorm", "hc"), (1e-1, 1e3), (1, 2)
STEPS, CONFIRM_SEEDS, CONFIRM_DEPTH = 20, 2, 2
CONFIRM_ARMS = ("prenorm", "hc", "mhc", "hc_static0.1x")
# 1e3 is far past any stable learning rate: its runs must fail; 1e-1's learn below the
# unigram loss within 20 steps. So hc fails at the confirm depth, and the confirm phase runs.
MICRO = """
include 'base.gin'
Grid.variants = {variants}
Grid.learning_rates = {learning_rates}
Grid.depths = {depths}
Grid.seeds = [0]
Grid.num_streams = 2
Grid.gain_points = 3
Grid.confirm_seeds = {confirm_seeds}
Grid.confirm_depth = {confirm_depth}
DataConfig.source = "{source}"
DataConfig.seq_len = 16
DataConfig.batch_size = 4
ModelConfig.d_model = 16
ModelConfig.num_heads = 2
ModelConfig.mlp_dim = 32
OptimizerConfig.warmup_steps = 1
LoopConfig.steps = {steps}
LoopConfig.eval_every = {steps}
LoopConfig.eval_batches = 1
LoopConfig.checkpoint_every = {steps}
LoopConfig.log_every = 1
"""
RUNS = len(VARIANTS) * len(LEARNING_RATES) * len(DEPTHS)
# The confirm phase reuses the map's seed-0 runs of prenorm and hc.
TRAINED = RUNS + len(CONFIRM_ARMS) * CONFIRM_SEEDS - 2
GAIN = "composite_backward_gain/max"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def preset(tmp_path_factory, corpus):
  """The micro preset on conftest's pseudo-verse."""
  path = tmp_path_factory.mktemp("stability_map") / "micro.gin"
  path.write_text(MICRO.format(variants=list(VARIANTS), learning_rates=list(LEARNING_RATES),
                               depths=list(DEPTHS), source=corpus, steps=STEPS,
                               confirm_seeds=CONFIRM_SEEDS, confirm_depth=CONFIRM_DEPTH))
  return str(path)


def stability_map(preset: str, out: pathlib.Path, *gin_params: str) -> subprocess.CompletedProcess:
  # A process of its own, as users run it: gin and JAX's compilation cache are global state.
  # Even quick compiles are cached, so the second invocation compiles nothing.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  args = [a for p in gin_params for a in ("--gin_param", p)]
  return subprocess.run([sys.executable, "-m", "experiments.stability_map", "--preset", preset,
                         "--out", str(out), "--no_progress", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def check_run(out: pathlib.Path, run: dict, unigram_loss: float) -> None:
  """A run's entry in the summary against its metrics."""
  rows = read_metrics(out / "runs" / run["run"])
  last = rows[-1]
  assert [row["step"] for row in rows] == list(range(1, STEPS + 1))  # every step logged
  assert run["skipped_updates"] == last["skipped_steps"]
  # The whole validation split's loss, not the subset's of the intermediate evaluations.
  np.testing.assert_equal(run["final_eval_loss"], last["final_eval_loss"])
  # The map's reference, computed once, is the one each run logged for its tokens.
  assert last["unigram_loss"] == unigram_loss
  assert run["why_failed"] == failed(rows, unigram_loss, Thresholds())
  assert run["failed"] == (run["learning_rate"] == 1e3), run
  gains = [row[GAIN] for row in rows if GAIN in row]
  # Every STEPS // gain_points = 6 steps, for the variants with streams.
  assert [row["step"] for row in rows if GAIN in row] == \
      ([] if run["variant"] == "prenorm" else [6, 12, 18])
  if gains:
    # assert_equal: NaN equals NaN (a run at 1e3 may log NaN gains)
    np.testing.assert_equal(run["composite_backward_gain"],
                            {"final": gains[-1], "peak": np.max(gains)})
  else:
    assert run["composite_backward_gain"] is None


def check_summary(out: pathlib.Path) -> None:
  summary = json.loads((out / "summary.json").read_text())
  runs, cell_list = summary["runs"], summary["cells"]
  assert len(runs) == len(cell_list) == RUNS
  assert {(r["variant"], r["depth"], r["learning_rate"], r["seed"]) for r in runs} == \
      {(v, d, lr, 0) for v in VARIANTS for d in DEPTHS for lr in LEARNING_RATES}
  assert summary["settings"]["loop"]["nonfinite"] == "skip"
  assert summary["settings"]["num_streams"] == 2
  assert summary["settings"]["thresholds"] == dataclasses.asdict(Thresholds())
  unigram_loss = summary["reference"]["unigram_loss"]
  for run in runs:
    check_run(out, run, unigram_loss)
  for cell in cell_list:
    assert (cell["final_eval_loss"] is None) == (cell["failed_seeds"] == 1)
  check_confirm(out, summary["confirm"], unigram_loss)


def check_confirm(out: pathlib.Path, confirm: dict, unigram_loss: float) -> None:
  # hc fails at 1e3 only: that is where the confirm phase runs.
  assert (confirm["depth"], confirm["learning_rate"]) == (CONFIRM_DEPTH, 1e3)
  assert {(r["arm"], r["seed"]) for r in confirm["runs"]} == \
      {(arm, s) for arm in CONFIRM_ARMS for s in range(CONFIRM_SEEDS)}
  for run in confirm["runs"]:
    check_run(out, run, unigram_loss)
    optimizer = json.loads((out / "runs" / run["run"] / "run.json").read_text())["optimizer"]
    assert optimizer["learning_rate"] == 1e3
    assert optimizer["static_map_lr_multiplier"] == (0.1 if run["arm"] == "hc_static0.1x"
                                                     else 1.0)
  arms = confirm["arms"]
  assert list(arms) == list(CONFIRM_ARMS)
  for arm, entry in arms.items():
    group = [r for r in confirm["runs"] if r["arm"] == arm]
    assert (entry["failed"], entry["runs"]) == (sum(r["failed"] for r in group), CONFIRM_SEEDS)
    assert set(entry["fisher"]) == {"prenorm", "hc"} - {arm}
    for other, test in entry["fisher"].items():
      theirs = arms[other]
      table = [[entry["failed"], entry["runs"] - entry["failed"]],
               [theirs["failed"], theirs["runs"] - theirs["failed"]]]
      assert test["p"] == stats.fisher_exact(table, alternative="two-sided").pvalue


def check_report(out: pathlib.Path) -> None:
  for figure in ("stability_map.png", "gain_by_depth.png"):
    data = (out / figure).read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE
  text = (out / "report.md").read_text()
  assert "](stability_map.png)" in text and "](gain_by_depth.png)" in text
  assert "moving average" in text
  assert all(f"## {variant}" in text for variant in VARIANTS)
  assert text.count("| failed") == len(VARIANTS) * len(DEPTHS)
  assert "### hc" in text and "### prenorm" not in text  # gains: stream variants only
  assert "## Confirm phase" in text and "| hc_static0.1x | 2/2 | 0, 1 |" in text


def test_map_then_confirm_then_reuse(preset, tmp_path):
  # One test for the whole grid, so that parallel workers do not each train it.
  proc = stability_map(preset, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(": training") == TRAINED
  check_summary(tmp_path)
  check_report(tmp_path)
  metrics = sorted((tmp_path / "runs").glob("*/metrics.jsonl"))
  before = {p: p.stat().st_mtime_ns for p in metrics}
  proc = stability_map(preset, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert ": training" not in proc.stdout
  assert len(metrics) == TRAINED and {p: p.stat().st_mtime_ns for p in metrics} == before


def test_cells_hold_the_mean_and_range_of_their_seeds():
  grid = types.SimpleNamespace(variants=("hc",), depths=(4, 8), learning_rates=(0.1,))

  def run(depth, seed, loss, failed=False, gain=None):
    return {"variant": "hc", "depth": depth, "learning_rate": 0.1, "seed": seed,
            "final_eval_loss": loss, "failed": failed, "composite_backward_gain": gain}

  runs = [run(4, 0, 2.4, gain={"final": 1.2, "peak": 3.0}),
          run(4, 1, 3.5, gain={"final": 1.5, "peak": 2.0}), run(4, 2, 2.6, gain={"final": 1.1,
          "peak": 1.4}), run(8, 0, 2.5), run(8, 1, 9.0, True)]
  shallow, deep = cells(types.SimpleNamespace(grid=grid), runs)
  assert shallow["final_eval_loss"] == pytest.approx(2.8333333)
  assert shallow["seed_range"] == [2.4, 3.5] and shallow["failed_seeds"] == 0
  assert shallow["composite_backward_gain"] == {"final": 1.5, "peak": 3.0}  # the worst seed's
  assert deep["final_eval_loss"] is None and deep["seed_range"] is None
  assert (deep["seeds"], deep["failed_seeds"]) == (2, 1)
  assert deep["composite_backward_gain"] is None


def test_confirm_rate_is_the_lowest_where_hc_fails_at_its_depth():
  settings = types.SimpleNamespace(grid=types.SimpleNamespace(confirm_depth=32))

  def run(variant, depth, lr, failed):
    return {"variant": variant, "depth": depth, "learning_rate": lr, "failed": failed}

  runs = [run("hc", 32, 3e-2, True), run("hc", 32, 1e-1, True), run("hc", 32, 1e-2, False),
          run("hc", 16, 1e-2, True), run("prenorm", 32, 3e-3, True)]
  assert confirm_rate(settings, runs) == 3e-2
  assert confirm_rate(settings, runs[2:]) is None


def test_confirm_summary_counts_failures_and_tests_them():
  arms = {"prenorm": [False] * 5, "hc": [True] * 4 + [False], "mhc": [True] + [False] * 4}
  loss = lambda arm, seed: 2.0 + 0.1 * seed + (3.0 if arm == "hc" and seed < 4 else 0.0)
  gain = lambda arm, seed: None if arm == "prenorm" else {"final": 1.0, "peak": 1.5 + seed}
  runs = [{"arm": arm, "seed": seed, "failed": f, "final_eval_loss": loss(arm, seed),
           "composite_backward_gain": gain(arm, seed)}
          for arm, fails in arms.items() for seed, f in enumerate(fails)]
  summary = confirm_summary(runs)
  assert summary["hc"]["failed_seeds"] == [0, 1, 2, 3] and summary["mhc"]["failed"] == 1
  # The runs that did not fail: prenorm's 2.0-2.4, mhc's 2.1-2.4, hc's one (no std).
  assert summary["prenorm"]["trained_loss"] == pytest.approx({"mean": 2.2, "std": 0.158113883})
  assert summary["mhc"]["trained_loss"] == pytest.approx({"mean": 2.25, "std": 0.129099445})
  assert summary["hc"]["trained_loss"] == pytest.approx({"mean": 2.4, "std": None})
  assert summary["prenorm"]["peak_gain"] is None
  assert summary["hc"]["peak_gain"] == {"median": 3.5, "max": 5.5}
  # 4 of 5 against 0 of 5: two tables as extreme, each C(5, 4) C(5, 0) / C(10, 4) = 5 / 210.
  assert summary["hc"]["fisher"]["prenorm"]["p"] == pytest.approx(10 / 210, rel=1e-12)
  assert summary["prenorm"]["fisher"]["hc"]["p"] == pytest.approx(10 / 210, rel=1e-12)
  assert set(summary["hc"]["fisher"]) == {"prenorm"}
  assert summary["mhc"]["fisher"]["hc"]["p"] == \
      stats.fisher_exact([[1, 4], [4, 1]], alternative="two-sided").pvalue


def test_the_collapse_rule_needs_a_validation_split(tmp_path):
  (tmp_path / "only.txt").write_text("thou art my lord " * 200)
  with pytest.raises(ValueError, match="gives no unigram reference"):
    validation_reference(DataConfig(source=str(tmp_path / "only.txt"), seq_len=16))


@pytest.mark.parametrize("binding, message", [
    ('Grid.variants = ["prenorm", "nope"]', "variants must be"),
    ("Grid.confirm_depth = 8", "Grid.variants must hold hc and Grid.depths 8"),
    ("Thresholds.collapse_margin = -1.0", "collapse_margin must be a finite number >= 0"),
])
def test_bad_grid_is_one_line_and_exit_2(preset, tmp_path, binding, message):
  proc = stability_map(preset, tmp_path, binding)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["stability_map", "stability_sharp"])
def test_presets_log_every_step_and_state_their_thresholds(name):
  settings = load_settings(name)
  assert settings.loop.log_every == 1
  # Stated in the preset itself, not left to the defaults: fixed before the runs.
  text = preset_path(name).read_text()
  assert all(f"\nThresholds.{field.name} = " in text for field in dataclasses.fields(Thresholds))
  assert settings.thresholds == Thresholds(surge_window=20, loss_surge_margin=0.3,
                                           grad_surge_ratio=3.0, surge_after=1,
                                           collapse_margin=0.25)
  if name == "stability_sharp":
    g = settings.grid
    assert (g.depths, g.learning_rates, g.variants) == ((8, 16, 32), (3e-3, 1e-2, 3e-2),
                                                        ("prenorm", "hc", "mhc"))
    assert (g.confirm_seeds, g.confirm_depth, g.confirm_static_multiplier) == (10, 32, 0.1)
    assert [key.arm for key in settings.confirm_runs(3e-2)[::10]] == list(CONFIRM_ARMS)


def test_the_sharp_maps_stages_load_and_only_the_last_confirms():
  """The preset's three commands (one folder, each reusing the runs before it) load; the first
  two train the map's depths without the confirm phase, the last is the whole preset."""
  text = preset_path("stability_sharp").read_text()
  commands = re.findall(r"^#   (python -m experiments\.stability_map .*?)(?:  #.*)?$",
                        text.replace("\\\n#       ", ""), flags=re.M)
  stages = [[arg for flag, arg in zip(args, args[1:]) if flag == "--gin_param"]
            for args in map(shlex.split, commands)]
  assert len(stages) == 3 and stages[-1] == []
  grids = [load_settings("stability_sharp", params).grid for params in stages]
  assert [(g.depths, g.confirm_seeds) for g in grids] == [((8, 16), 0), ((8, 16, 32), 0),
                                                          ((8, 16, 32), 10)]
  assert all(c.endswith("--out reports/sharp") or "--out reports/sharp " in c for c in commands)
