"""compare_residuals end to end on a tiny corpus (the report's files and numbers, reuse of
finished runs, a learning-rate sweep), and its presets, configs and sweep rules without
training."""

import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

from mhc_jax.lm.metrics import read_metrics

from experiments import compare_residuals, report
from experiments.report import significance
from experiments.report.thresholds import Thresholds, failed, surges_of_run
from experiments.runs import RUN_CONFIG, check_run_config
from experiments.report.markdown import _sweep_lines as sweep_lines, format_paired
from mhc_jax.checks import one_line
from mhc_jax.lm import train as train_lib

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
  curves = json.loads((out / "curves.json").read_text())
  rows = read_metrics(out / "runs" / "mhc_seed1")
  assert curves["mhc"]["1"]["train_loss"] == {"step": [r["step"] for r in rows],
                                              "value": [r["train_loss"] for r in rows]}
  assert "composite_backward_gain/max" in curves["mhc"]["1"]
  assert "composite_backward_gain/max" not in curves["prenorm"]["0"]
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
    # The preset's thresholds, seed by seed, as thresholds.py finds them in the metrics.
    unigram = summary["reference"]["unigram_loss"]
    for seed in SEEDS:
      rows = read_metrics(out / "runs" / f"{variant}_seed{seed}")
      assert entry["surges"][str(seed)] == surges_of_run(rows, Thresholds())
      assert entry["failed"][str(seed)] == failed(rows, unigram, Thresholds())
  deltas = np.subtract(final_eval_losses(out, "mhc"), final_eval_losses(out, "prenorm"))
  paired = summary["variants"]["mhc"]["eval_loss_minus"]["prenorm"]
  assert summary["variants"]["prenorm"]["eval_loss_minus"]["mhc"]["mean"] == \
      pytest.approx(-deltas.mean())
  # The preset's margins (the defaults, 0.02 nats): equivalence and the seeds an effect needs.
  assert paired["tost"] == pytest.approx(significance.tost(deltas, 0.02))
  assert paired["seeds_for_effect"] == {
      "effect": 0.02, "seeds": significance.seeds_for_effect(np.std(deltas, ddof=1), 0.02)}
  assert "TOST p = " in (out / "report.md").read_text()
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


@pytest.mark.parametrize("name", ["cpu", "gpu", "tpu_pod", "stability"])
def test_presets_load(name):
  settings = compare_residuals.load_settings(name)
  assert {compare_residuals.arms.parse_arm(v).variant for v in settings.comparison.variants} \
      <= set(compare_residuals.RESIDUALS)
  if name == "stability":
    assert settings.model.num_layers >= 16 and settings.optimizer.learning_rate >= 1e-2
    assert {"hc", "mhc"} <= set(settings.comparison.variants)
  if name == "tpu_pod":
    assert settings.mesh.shape == (16, 8, 2)


def test_the_ablations_preset_is_the_cpu_comparison_with_its_arms():
  settings, cpu = (compare_residuals.load_settings(name) for name in ("ablations", "cpu"))
  # The cpu comparison's settings at one fixed rate: ten arms' sweeps would not fit 90 min.
  assert not settings.comparison.sweeps
  assert dataclasses.replace(
      settings.comparison, variants=cpu.comparison.variants,
      learning_rates=cpu.comparison.learning_rates) == cpu.comparison
  assert settings.model == cpu.model and settings.loop == cpu.loop
  models = {v: compare_residuals.variant_model(settings, v) for v in settings.comparison.variants}
  assert models["hc(dynamic=False)"].residual_settings.dynamic is False
  assert models["mhc(sinkhorn_iters=1)"].residual_settings.sinkhorn_iters == 1
  assert models["frac(num_streams=1)"].num_streams == 1  # Frac-connections' own definition
  assert models["mhc(num_streams=2)"].num_streams == 2 and models["mhc"].num_streams == 4


def test_the_cpu_preset_sweeps_every_arm_and_matches_mhcs_compute():
  comparison = compare_residuals.load_settings("cpu").comparison
  assert comparison.sweeps and len(comparison.learning_rates) >= 4
  assert comparison.max_extensions == 2 and comparison.static_map_lr_multipliers == (1.0, 0.1)
  assert {"prenorm@flops(mhc)", "prenorm@params(mhc)"} <= set(comparison.variants)


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


def test_a_record_from_before_a_new_field_is_reused_at_its_default(tmp_path, preset):
  settings = compare_residuals.load_settings(preset)
  configs = compare_residuals.run_configs(settings, "hc", 0)
  check_run_config(tmp_path, configs)
  record = json.loads((tmp_path / RUN_CONFIG).read_text())
  del record["optimizer"]["static_map_lr_multiplier"]  # as written before the field existed
  (tmp_path / RUN_CONFIG).write_text(json.dumps(record))
  check_run_config(tmp_path, configs)
  changed = {**configs, "optimizer": dataclasses.replace(configs["optimizer"],
                                                         static_map_lr_multiplier=0.1)}
  with pytest.raises(ValueError, match=r"differing: optimizer.static_map_lr_multiplier\)"):
    check_run_config(tmp_path, changed)


def test_bad_preset_or_variant_exits_2(tmp_path, capsys):
  assert compare_residuals.main(["--preset", "no_such", "--out", str(tmp_path)]) == 2
  assert compare_residuals.main(["--preset", "cpu", "--variants", "resnet",
                                 "--out", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "no_such" in err[0] and "resnet" in err[1]


# --------------------------------------------------------------------------------------------
# The learning-rate sweep

Comparison = compare_residuals.Comparison


@pytest.mark.parametrize("rates, complaint", [
    ((1e-3, 1e-2, 1e-1), "at least 4 rates"),
    ((0.0, 1e-2, 1e-1, 1.0), "positive"),
    ((1e-3, 1e-1, 1e-2, 1.0), "increase"),
    ((1e-4, 1e-3, 3e-3, 1e-2), "evenly spaced in log"),
])
def test_a_bad_rate_grid_is_one_line(rates, complaint):
  with pytest.raises(ValueError, match=complaint) as err:
    Comparison(learning_rates=rates)
  assert one_line(err.value, with_type=False).startswith("learning_rates")


def test_sweep_settings_are_checked():
  Comparison(learning_rates=(1e-4, 3e-4, 1e-3, 3e-3))  # 1-3-10 steps are log steps enough
  with pytest.raises(ValueError, match="needs 'prenorm' among the variants"):
    Comparison(variants=("hc", "mhc"), learning_rates=(1e-4, 1e-3, 1e-2, 1e-1))
  for bad in ((), (0.1, 0.1), (0.0,)):
    with pytest.raises(ValueError, match="static_map_lr_multipliers must be"):
      Comparison(static_map_lr_multipliers=bad)
  with pytest.raises(ValueError, match="sweep_seeds must be distinct"):
    Comparison(sweep_seeds=())
  with pytest.raises(ValueError, match="max_extensions must be an int >= 0"):
    Comparison(max_extensions=-1)


def test_grid_extends_one_step_of_its_pattern_at_an_edge():
  even, halves = (1e-3, 1e-2, 1e-1, 1.0), (1e-4, 3e-4, 1e-3, 3e-3)
  assert compare_residuals.extended_grid(even, "high") == (*even, 10.0)
  assert compare_residuals.extended_grid(even, "low") == (1e-4, *even)
  assert compare_residuals.extended_grid(halves, "high") == (*halves, 1e-2)
  assert compare_residuals.extended_grid(halves, "low") == (3e-5, *halves)
  edge = compare_residuals.grid_edge
  assert (edge(even, 1e-3), edge(even, 1.0), edge(even, 1e-2)) == ("low", "high", None)


def test_best_point_is_the_lowest_finite_mean():
  best = compare_residuals.best_point
  assert best({(1e-3, 1.0): 2.5, (1e-2, 1.0): 2.1, (1e-2, 0.1): 2.3}) == (1e-2, 1.0)
  assert best({1e-3: 2.5, 1e-2: float("nan"), 1e-1: float("inf"), 1.0: 2.6}) == 1e-3
  with pytest.raises(ValueError, match="every rate diverged"):
    best({1e-2: float("nan"), 1e-1: float("inf")})


def test_a_diverged_sweep_point_is_skipped_and_reported(monkeypatch, tmp_path, capsys):
  def diverge(runs, progress=True):
    raise train_lib.NonFiniteError("non-finite loss at step 3")
  monkeypatch.setattr(compare_residuals, "train_plan", diverge)
  assert compare_residuals.sweep_loss(tmp_path / "hc_lr0.1_seed0", {}, False) == math.inf
  assert "hc_lr0.1_seed0: diverged (non-finite loss at step 3)" in capsys.readouterr().out
  points = [{"learning_rate": rate, "static_map_lr_multiplier": 1.0,
             "final_eval_loss": {"per_seed": {"0": loss}, "mean": loss}}
            for rate, loss in ((1e-3, 2.5), (1e-2, 2.0), (1e-1, math.inf))]
  entry = {"grid": [1e-3, 1e-2, 1e-1], "static_map_lr_multipliers": [1.0], "points": points,
           "extensions": 0, "edge": None, "inside": True,
           "chosen": {"learning_rate": 1e-2, "static_map_lr_multiplier": 1.0}}
  settings = {"sweep_seeds": [0], "max_extensions": 2, "static_map_lr_multipliers": [1.0]}
  lines = sweep_lines({"settings": settings, "sweep": {"hc": entry}})
  assert "hc diverged (a non-finite value stopped a run) at 0.1." in lines
  assert "| hc | 0.001, 0.01, 0.1 | 0.01 | 2.0000 | yes | 0 |" in lines
  assert not any("not bracketed" in line for line in lines)
  report.figures.plot_sweep(tmp_path / "sweep.png", {"hc": entry})  # a gap, not an error
  assert (tmp_path / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE


def test_only_hc_has_static_maps(preset):
  settings = compare_residuals.load_settings(preset)
  assert [compare_residuals.has_static_maps(compare_residuals.variant_model(settings, v))
          for v in ("prenorm", "hc", "mhc", "frac")] == [False, True, False, True]


# Every rate far too small for 6 steps: each variant's best is the grid's highest, which
# extends the grid once (max_extensions 1), and the best then is the new highest again.
SWEEP = """
Comparison.learning_rates = [1e-6, 1e-5, 1e-4, 1e-3]
Comparison.max_extensions = 1
Comparison.static_map_lr_multipliers = [0.1]
"""
SWEPT = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, preset):
  """The micro preset's prenorm and hc at seed 0 after a sweep, and its report."""
  root = pathlib.Path(preset).parent
  path = root / "sweep.gin"
  path.write_text(MICRO.format(variants=["prenorm", "hc"], seeds=[0], source=root / "*.txt")
                  + SWEEP)
  out = tmp_path_factory.mktemp("sweep")
  compare(str(path), out)
  return out


def test_sweep_extends_the_grid_and_runs_the_seeds_at_the_chosen_rates(swept):
  summary = json.loads((swept / "summary.json").read_text())
  sweep = summary["sweep"]
  assert json.loads((swept / "sweep.json").read_text()) == sweep
  assert list(sweep) == ["prenorm", "hc"]
  for variant, multiplier in (("prenorm", 1.0), ("hc", 0.1)):  # prenorm has no static maps
    entry = sweep[variant]
    assert entry["grid"] == SWEPT and entry["static_map_lr_multipliers"] == [multiplier]
    assert (entry["extensions"], entry["edge"], entry["inside"]) == (1, "high", False)
    assert entry["chosen"] == {"learning_rate": 1e-2, "static_map_lr_multiplier": multiplier}
    for point in entry["points"]:
      workdir = swept / "sweep" / compare_residuals.sweep_name(
          variant, point["learning_rate"], multiplier, 0)
      assert point["final_eval_loss"] == {"per_seed": {"0": read_metrics(workdir)[-1][
          "final_eval_loss"]}, "mean": read_metrics(workdir)[-1]["final_eval_loss"]}
  assert sorted(p.name for p in (swept / "sweep").glob("*_seed0")) == sorted(
      [f"prenorm_lr{r:g}_seed0" for r in SWEPT] + [f"hc_lr{r:g}_m0.1_seed0" for r in SWEPT])
  # Seed 0 at its own best is the sweep's run, not trained again in runs/; at prenorm's best
  # hc runs once more, without its multiplier (a point the sweep did not train); prenorm is
  # its own-best run.
  assert not list((swept / "runs").glob("*"))
  assert [p.name for p in (swept / "runs_prenorm_best").glob("*_seed0")] == ["hc_seed0"]
  optimizers = {d: json.loads((swept / d / "run.json").read_text())["optimizer"]
                for d in ("sweep/hc_lr0.01_m0.1_seed0", "runs_prenorm_best/hc_seed0")}
  assert [(o["learning_rate"], o["static_map_lr_multiplier"]) for o in optimizers.values()] == \
      [(1e-2, 0.1), (1e-2, 1.0)]
  arm = summary["prenorm_best"]
  assert arm["learning_rate"] == 1e-2
  assert arm["variants"]["prenorm"]["final_eval_loss"] == \
      summary["variants"]["prenorm"]["final_eval_loss"]
  assert arm["variants"]["hc"]["final_eval_loss"]["mean"] == \
      read_metrics(swept / "runs_prenorm_best" / "hc_seed0")[-1]["final_eval_loss"]


def test_sweep_report_shows_the_curves_and_both_comparisons(swept):
  text = (swept / "report.md").read_text()
  assert (swept / report.SWEEP_FIGURE).read_bytes()[:8] == PNG_SIGNATURE
  assert f"]({report.SWEEP_FIGURE})" in text
  assert "Each variant at its own best learning rate from the sweep below: prenorm 0.01, " \
         "hc 0.01 (static maps x0.1)." in text
  arm = json.loads((swept / "summary.json").read_text())["prenorm_best"]["variants"]["hc"]
  second = text[text.index("## All at prenorm's best rate"):text.index("## Learning-rate sweep")]
  assert f"| hc | {arm['num_params']:,} | {arm['final_eval_loss']['mean']:.4f} ± n/a |" in second
  assert text.count("still best at the highest rate of its grid after 1 extension(s)") == 2
  assert "| hc | 1e-06, 1e-05, 0.0001, 0.001, 0.01 | 0.01 (static maps x0.1) |" in text


def test_arms_ablate_and_match_compute_and_the_report_states_their_cost(tmp_path, preset):
  arms_preset = tmp_path / "arms.gin"
  variants = ["prenorm", "hc(dynamic=False)", "prenorm@flops(mhc)", "prenorm@params(mhc)"]
  arms_preset.write_text(pathlib.Path(preset).read_text().replace(
      f"Comparison.variants = {list(VARIANTS)}", f"Comparison.variants = {variants}").replace(
      f"Comparison.seeds = {list(SEEDS)}", "Comparison.seeds = [0]"))
  out = tmp_path / "out"
  compare(str(arms_preset), out)
  summary = json.loads((out / "summary.json").read_text())
  assert list(summary["variants"]) == variants
  record = lambda name: json.loads((out / "runs" / f"{name}_seed0" / RUN_CONFIG).read_text())
  assert record("hc+dynamic=False")["model"]["residual_settings"]["dynamic"] is False
  # mhc costs more per token than prenorm: the matched prenorm trains more steps, the same
  # batches first (same seed), and its total FLOPs are mhc's within half a step's.
  compute = summary["settings"]["compute"]
  matched = compute["prenorm@flops(mhc)"]
  assert matched["steps"] > compute["prenorm"]["steps"] == 6
  assert record("prenorm@flops-mhc")["loop"]["steps"] == matched["steps"]
  assert abs(matched["ratio"] - 1) <= 0.5 * compute["prenorm"]["flops_per_token"] / (
      matched["total_flops"] / matched["tokens"]) / matched["steps"]
  widened = record("prenorm@params-mhc")["model"]
  assert widened["d_model"] >= 16 and abs(compute["prenorm@params(mhc)"]["ratio"] - 1) <= 0.02
  text = (out / "report.md").read_text()
  assert "### Compute per arm" in text and "| prenorm@flops(mhc) |" in text


def test_a_stopped_run_stops_the_comparison_and_the_same_command_resumes(tmp_path, preset):
  # stop_after_step ends a run early with a checkpoint, as SIGTERM does: the comparison must
  # not go on to the next run (nor analyse an unfinished one), and its rerun resumes.
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "experiments.compare_residuals", "--preset", preset, "--out",
             str(out), "--no_progress", "--variants", "prenorm", "--seeds", "0,1"]
  stop = ["--gin_param", "LoopConfig.stop_after_step = 3"]
  proc = subprocess.run(command + stop, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[-1] == ("compare_residuals: stopped in prenorm_seed0 (its "
                                          "checkpoint is saved); run the same command to resume")
  assert "prenorm_seed1" not in proc.stdout and not (out / "report.md").exists()
  assert [r["step"] for r in read_metrics(out / "runs" / "prenorm_seed0")][-1] == 3
  proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [r["step"] for r in read_metrics(out / "runs" / "prenorm_seed0")][-1] == 6
  assert (out / "report.md").exists()
