"""The claims table: its rules on made-up summaries, and docs/results.md against it."""

import json
import pathlib

import pytest

from experiments.report import claims
from experiments.report.claims import (CONTRADICTED, NOT_DETECTABLE, REPRODUCES, Claim,
                                       Difference, Failures, Gains, Match, RetrofitDifference)

RESULTS_MD = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results.md"


def write(results: pathlib.Path, folder: str, summary: dict) -> None:
  (results / folder).mkdir(parents=True, exist_ok=True)
  (results / folder / "summary.json").write_text(json.dumps(summary))


def comparison(mean: float, ci95: float, tost_p: float = 0.5) -> dict:
  difference = {"mean": mean, "ci95": ci95, "detectable": 0.031,
                "tost": {"margin": 0.02, "p": tost_p}}
  return {"variants": {"mhc": {"eval_loss_minus": {"prenorm": difference}}}}


@pytest.mark.parametrize("mean, ci95, expected, verdict", [
    (-0.05, 0.03, -1, REPRODUCES),  # [-0.08, -0.02]: below 0, the paper's side
    (-0.05, 0.03, +1, CONTRADICTED),
    (+0.05, 0.03, -1, CONTRADICTED),
    (-0.05, 0.06, -1, f"{NOT_DETECTABLE} (detects 0.031)"),  # holds 0
])
def test_a_difference_reproduces_only_outside_0_on_the_papers_side(
    tmp_path, mean, ci95, expected, verdict):
  write(tmp_path, "cmp", comparison(mean, ci95))
  here, got = Difference("cmp", "mhc", "prenorm", expected).measure(tmp_path)
  assert got == verdict
  assert here == claims._interval(mean, ci95) + " nats"


def test_intervals_are_printed_with_true_minus_signs():
  assert claims._interval(-0.05, 0.03) == "−0.050 [−0.080, −0.020]"


@pytest.mark.parametrize("mean, ci95, tost_p, verdict", [
    (0.001, 0.01, 0.01, REPRODUCES),
    (0.05, 0.01, 0.9, CONTRADICTED),
    (0.001, 0.05, 0.4, f"{NOT_DETECTABLE} (detects 0.031)"),
])
def test_a_match_needs_tost(tmp_path, mean, ci95, tost_p, verdict):
  write(tmp_path, "cmp", comparison(mean, ci95, tost_p))
  assert Match("cmp", "mhc", "prenorm").measure(tmp_path)[1] == verdict


def test_a_retrofit_difference_uses_1_96_standard_errors_and_2_8_to_detect(tmp_path):
  write(tmp_path, "rf", {"comparisons": [
      {"row": "hc", "minus": "prenorm", "here": {"mean": 0.03, "stderr": 0.01}},
      {"row": "hc+grpo", "minus": "hc", "here": {"mean": 0.01, "stderr": 0.01}}]})
  here, verdict = RetrofitDifference("rf", "hc", "prenorm", +1).measure(tmp_path)
  assert (here, verdict) == ("+0.030 [+0.010, +0.050] exact match", REPRODUCES)
  assert RetrofitDifference("rf", "hc+grpo", "hc", +1).measure(tmp_path)[1] == \
      f"{NOT_DETECTABLE} (detects 0.028)"


def map_runs(failed: dict[str, int], total: int, peaks: dict[str, float]) -> dict:
  return {"cells": [], "runs": [
      {"arm": arm, "failed": i < failed[arm],
       "composite_backward_gain": {"final": 1.0, "peak": peaks[arm] / (1 + i)}}
      for arm in failed for i in range(total)]}


@pytest.mark.parametrize("failed, verdict, p", [
    # Hypergeometric, by hand: 2 x C(10, 8) / C(20, 8) and 2 x C(10, 4) / C(20, 4).
    ({"hc": 8, "mhc": 0}, REPRODUCES, "0.00071"),
    ({"hc": 0, "mhc": 8}, CONTRADICTED, "0.00071"),
    ({"hc": 4, "mhc": 0}, NOT_DETECTABLE, "0.087"),
])
def test_failures_by_fishers_exact_test(tmp_path, failed, verdict, p):
  write(tmp_path, "map", map_runs(failed, 10, {"hc": 1.0, "mhc": 1.0}))
  here, got = Failures("map", "hc", "mhc").measure(tmp_path)
  assert got == verdict
  assert here == f"failed runs: hc {failed['hc']}/10, mhc {failed['mhc']}/10; Fisher p {p}"


def test_failures_can_read_the_confirm_phase(tmp_path):
  confirm = {"learning_rate": 0.03, **map_runs({"hc": 8, "mhc": 0}, 10, {"hc": 1, "mhc": 1})}
  write(tmp_path, "map", {**map_runs({"hc": 0, "mhc": 0}, 3, {"hc": 1, "mhc": 1}),
                          "confirm": confirm})
  assert Failures("map", "hc", "mhc").measure(tmp_path)[1] == NOT_DETECTABLE  # the map's 0/3
  assert Failures("map", "hc", "mhc", confirm=True).measure(tmp_path) == (
      "lr 0.03, failed runs: hc 8/10, mhc 0/10; Fisher p 0.00071", REPRODUCES)
  write(tmp_path, "map", {**map_runs({"hc": 0, "mhc": 0}, 3, {"hc": 1, "mhc": 1}),
                          "confirm": {"learning_rate": None}})
  assert Failures("map", "hc", "mhc", confirm=True).measure(tmp_path) == (
      "hc failed nowhere in the map: no confirm phase", NOT_DETECTABLE)


@pytest.mark.parametrize("peaks, verdict", [
    ({"hc": 4.5e22, "mhc": 3.7}, REPRODUCES),
    ({"hc": 50.0, "mhc": 3.7}, NOT_DETECTABLE),  # HC's does not pass 100
    ({"hc": 2.0, "mhc": 3.7}, CONTRADICTED),
])
def test_gains_explode_past_100_and_stay_under_10(tmp_path, peaks, verdict):
  write(tmp_path, "map", map_runs({"hc": 0, "mhc": 0}, 3, peaks))
  write(tmp_path, "cmp", {"variants": {
      arm: {"peak_max_gain": {"composite_backward_gain": peak}} for arm, peak in peaks.items()}})
  for folder in ("map", "cmp"):  # the map's runs (largest peak: the first) and a comparison's
    assert Gains(folder, "hc", "mhc").measure(tmp_path)[1] == verdict


def test_a_missing_summary_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(claims, "CLAIMS", (Claim("c", "w", Gains("none", "hc", "mhc")),))
  monkeypatch.setattr(claims, "RESULTS", tmp_path)
  assert claims.main(["--results", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "none/summary.json: no summary" in err


def test_results_md_holds_the_claims_table_as_the_summaries_give_it():
  assert claims.table() in RESULTS_MD.read_text(), (
      "docs/results.md's claims table differs from `python -m experiments.report.claims`")


def test_a_difference_can_read_the_comparison_at_prenorms_rate(tmp_path):
  write(tmp_path, "cmp", {**comparison(-0.05, 0.06), "prenorm_best": comparison(-0.05, 0.01)})
  assert Difference("cmp", "mhc", "prenorm", -1).measure(tmp_path)[1].startswith(NOT_DETECTABLE)
  assert Difference("cmp", "mhc", "prenorm", -1, "prenorm_best").measure(tmp_path)[1] == \
      REPRODUCES


def test_gains_can_read_the_comparison_at_prenorms_rate(tmp_path):
  gains = lambda hc: {"variants": {"hc": {"peak_max_gain": {"composite_backward_gain": hc}},
                                   "mhc": {"peak_max_gain": {"composite_backward_gain": 1.5}}}}
  write(tmp_path, "cmp", {**gains(2.7), "prenorm_best": gains(133.0)})
  assert Gains("cmp", "hc", "mhc").measure(tmp_path)[1] == NOT_DETECTABLE
  assert Gains("cmp", "hc", "mhc", "prenorm_best").measure(tmp_path) == (
      "largest composite backward gain: hc 133, mhc 1.5", REPRODUCES)
