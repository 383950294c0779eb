"""compare_residuals end to end on a tiny corpus (the report's files and numbers, reuse of
finished runs), and its presets and configs without training."""

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

from mhc_jax.lm.metrics import read_metrics

from experiments import compare_residuals, report
from experiments.runs import check_run_config
from experiments.report.markdown import format_paired

REPO = pathlib.Path(__file__).resolve().parents[1]

WORDS = "thou art my lord and I thy humble servant for the king doth love".split()
VARIANTS, SEEDS = ("prenorm", "mhc"), (0, 1)
MICRO = """
include 'base.gin'
Comparison.variants = {variants}
Comparison.seeds = {seeds}
Comparison.gain_points = 3
Comparison.analysis_batches = 2
DataConfig.source = "{source}"
DataConfig.seq_len = 16
DataConfig.batch_size = 8
ModelConfig.d_model = 16
ModelConfig.num_layers = 2
ModelConfig.num_heads = 2
ModelConfig.mlp_dim = 32
OptimizerConfig.warmup_steps = 2
LoopConfig.steps = 6
LoopConfig.eval_every = 3
LoopConfig.eval_batches = 2
LoopConfig.checkpoint_every = 100
LoopConfig.log_every = 1
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
  """A micro preset (2 variants x 2 seeds, 6 steps, gains every 2) on twelve small
  documents of pseudo-verse."""
  root = tmp_path_factory.mktemp("compare")
  rng = np.random.default_rng(0)
  for d in range(12):
    lines = [" ".join(rng.choice(WORDS, 6)).capitalize() + "." for _ in range(60)]
    (root / f"doc{d:02d}.txt").write_text("\n".join(lines))
  path = root / "micro.gin"
  path.write_text(MICRO.format(variants=list(VARIANTS), seeds=list(SEEDS),
                               source=root / "*.txt"))
  return str(path)


def compare(preset: str, out: pathlib.Path) -> subprocess.CompletedProcess:
  # A process of its own, as users run it: gin and JAX's compilation cache are global state.
  # The script caches compiled programs; here even the quick ones, so the second seed and the
  # second invocation compile nothing.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.run([sys.executable, "-m", "experiments.compare_residuals", "--preset", preset,
                         "--out", str(out), "--no_progress"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def out(tmp_path_factory, preset):
  out = tmp_path_factory.mktemp("report")
  proc = compare(preset, out)
  assert proc.stdout.count(": training") == len(VARIANTS) * len(SEEDS)
  return out


def final_eval_losses(out: pathlib.Path, variant: str) -> list[float]:
  return [read_metrics(out / "runs" / f"{variant}_seed{s}")[-1]["final_eval_loss"]
          for s in SEEDS]


def test_report_holds_every_file_and_valid_pngs(out):
  for name in ("report.md", "summary.json", *report.FIGURES):
    assert (out / name).is_file(), name
  for name in report.FIGURES:
    data = (out / name).read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, name
  text = (out / "report.md").read_text()
  assert all(f"]({name})" in text for name in report.FIGURES)
  assert all(f"| {variant} |" in text for variant in VARIANTS)


def test_summary_numbers_are_the_runs_final_eval_losses(out):
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["variants"]) == list(VARIANTS)
  assert summary["settings"]["seeds"] == list(SEEDS)
  assert [(r["variant"], r["seed"]) for r in summary["runs"]] == \
      [(v, s) for v in VARIANTS for s in SEEDS]
  for variant in VARIANTS:
    losses, entry = final_eval_losses(out, variant), summary["variants"][variant]
    assert all(np.isfinite(losses))
    assert entry["final_eval_loss"]["mean"] == pytest.approx(statistics.mean(losses))
    assert entry["final_eval_loss"]["std"] == pytest.approx(statistics.stdev(losses))
    assert entry["final_eval_loss"]["per_seed"] == {str(s): v for s, v in zip(SEEDS, losses)}
    assert entry["num_params"] > 0
    assert set(entry["train_loss_spikes"]) == set(entry["grad_norm_spikes"]) == \
        {str(s) for s in SEEDS}
  deltas = np.subtract(final_eval_losses(out, "mhc"), final_eval_losses(out, "prenorm"))
  paired = summary["variants"]["mhc"]["eval_loss_minus"]["prenorm"]
  assert summary["variants"]["prenorm"]["eval_loss_minus"]["mhc"]["mean"] == \
      pytest.approx(-deltas.mean())
  assert paired["mean"] == pytest.approx(deltas.mean())
  assert paired["ci95"] == pytest.approx(12.706 * abs(deltas[1] - deltas[0]) / 2, rel=1e-4)
  # mHC's H_res is doubly stochastic: its gains stay at 1, composite ones too.
  gains = summary["variants"]["mhc"]["final_max_gain"]
  assert gains["forward_gain"] == pytest.approx(1, abs=1e-4)
  assert gains["composite_forward_gain"] == pytest.approx(1, abs=1e-3)
  peaks = summary["variants"]["mhc"]["peak_max_gain"]
  logged = [row["composite_backward_gain/max"] for s in SEEDS
            for row in read_metrics(out / "runs" / f"mhc_seed{s}")
            if "composite_backward_gain/max" in row]
  assert peaks["composite_backward_gain"] == max(logged) >= gains["composite_backward_gain"]
  assert "final_max_gain" not in summary["variants"]["prenorm"]
  mhc_run = summary["runs"][-1]
  layers, streams = np.array(mhc_run["layer_cosine"]), np.array(mhc_run["stream_cosine"])
  assert layers.shape == (2, 2) and streams.shape == (2, 4, 4)
  np.testing.assert_allclose(np.diag(layers), 1, atol=1e-4)
  np.testing.assert_allclose(np.diagonal(streams, axis1=1, axis2=2), 1, atol=1e-4)


def test_second_invocation_reuses_the_runs(out, preset):
  runs = sorted((out / "runs").glob("*_seed*"))
  assert len(runs) == len(VARIANTS) * len(SEEDS)
  watched = [p for run in runs for p in (run / "metrics.jsonl", *(run / "checkpoints").iterdir())]
  before = {p: p.stat().st_mtime_ns for p in watched}
  proc = compare(preset, out)
  assert proc.stdout.count("finished, reused") == len(runs) and ": training" not in proc.stdout
  assert {p: p.stat().st_mtime_ns for p in watched} == before
  assert sorted(p for run in runs for p in (run / "checkpoints").iterdir()) == \
      sorted(p for p in watched if p.name != "metrics.jsonl")


def test_paired_difference_interval_is_students_t():
  # Three seeds: t(0.975, 2 dof) = 4.3027; the interval of the mean is t * s / sqrt(3).
  deltas = [-0.031, -0.012, -0.040]
  entry = report.numbers.paired_difference(deltas)
  assert entry["mean"] == pytest.approx(-0.027666667)
  assert entry["ci95"] == pytest.approx(4.302653 * statistics.stdev(deltas) / 3 ** 0.5, rel=1e-6)
  assert np.isnan(report.numbers.paired_difference([0.01])["ci95"])
  assert "[-0.0632, +0.0078]" in format_paired(entry)


def test_spikes_count_onsets_above_the_running_median():
  rng = np.random.default_rng(0)
  falling = 3 * np.exp(-np.arange(60) / 20) + 1.5 + 0.02 * rng.standard_normal(60)
  spikes = functools.partial(report.numbers.spikes, ratio=1.25)
  assert spikes(falling) == 0
  spiky = falling.copy()
  spiky[20] *= 1.6          # one point: one spike (the median lags a falling curve)
  spiky[40:43] *= 1.5       # three points in a row: one spike
  spiky[50] = float("nan")  # a non-finite loss is a skipped update, not a spike ...
  spiky[52] *= 1.4          # ... and leaves the median of the points around it
  spiky[57] *= 1.2          # under the 1.25 ratio
  assert spikes(spiky) == 3
  assert spikes(spiky[:report.numbers.SPIKE_WINDOW]) == 0
  assert report.numbers.spikes(spiky, ratio=1.38) == 2  # not the 1.4x point


@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu_pod", "stability"])
def test_presets_load(name):
  settings = compare_residuals.load_settings(name)
  assert set(settings.comparison.variants) <= set(compare_residuals.RESIDUALS)
  if name == "stability":
    assert settings.model.num_layers >= 16 and settings.optimizer.learning_rate >= 1e-2
    assert {"hc", "mhc"} <= set(settings.comparison.variants)
  if name == "tpu_pod":
    assert settings.mesh.shape == (16, 8, 2)


def test_runs_differ_only_in_residual_and_seeds(preset):
  settings = compare_residuals.load_settings(preset, variants=("hc",), seeds=(3,))
  assert settings.comparison.variants == ("hc",) and settings.comparison.seeds == (3,)
  configs = compare_residuals.run_configs(settings, "hc", 3)
  assert configs["model"] == dataclasses.replace(settings.model, residual="hc")
  assert configs["data"].seed == configs["loop"].seed == 3
  assert configs["loop"].diagnostics_every == 2  # 6 steps / gain_points 3


def test_a_workdir_of_other_configs_is_refused(tmp_path, preset):
  settings = compare_residuals.load_settings(preset)
  check_run_config(tmp_path, compare_residuals.run_configs(settings, "mhc", 0))
  check_run_config(tmp_path, compare_residuals.run_configs(settings, "mhc", 0))
  with pytest.raises(ValueError, match=r"other configs \(differing: data.seed, loop.seed\)"):
    check_run_config(tmp_path, compare_residuals.run_configs(settings, "mhc", 1))


def test_bad_preset_or_variant_exits_2(tmp_path, capsys):
  assert compare_residuals.main(["--preset", "no_such", "--out", str(tmp_path)]) == 2
  assert compare_residuals.main(["--preset", "cpu", "--variants", "resnet",
                                 "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "no_such" in err[0] and "resnet" in err[1]
