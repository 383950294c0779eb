"""The comparison report reads each run's whole-split final loss (`final_eval_loss`), not the
last subset `eval_loss`, and carries the unigram / bigram references the runs logged."""


import numpy as np
import pytest

from experiments import report
from experiments.report.markdown import _reference_lines
from experiments.report.numbers import Run, summarize

REFERENCE = {"unigram_loss": 3.31, "bigram_loss": 2.47}


def rows(final_subset: float, final_whole: float, reference=REFERENCE) -> list[dict]:
  base = {"train_loss": 2.0, "grad_norm": 1.0, "skipped_steps": 0, "tokens_per_sec": 1e4}
  return [{"step": 1, **base, "eval_loss": 4.0},
          {"step": 2, **base, "eval_loss": final_subset, "final_eval_loss": final_whole,
           **reference}]


def runs(reference=REFERENCE) -> list[Run]:
  finals = {("prenorm", 0): (2.5, 2.40), ("prenorm", 1): (2.6, 2.44),
            ("hc", 0): (2.4, 2.38), ("hc", 1): (2.5, 2.41)}
  return [Run(variant, seed, rows(*losses, reference), 1000, np.eye(2))
          for (variant, seed), losses in finals.items()]


def test_summary_reads_the_whole_split_loss_and_the_reference():
  summary = summarize(runs(), {"seeds": [0, 1]})
  assert summary["variants"]["prenorm"]["final_eval_loss"]["per_seed"] == {"0": 2.40,
                                                                          "1": 2.44}
  assert summary["variants"]["hc"]["eval_loss_minus"]["prenorm"]["mean"] == \
      pytest.approx(((2.38 - 2.40) + (2.41 - 2.44)) / 2)
  assert {k: summary["reference"][k] for k in REFERENCE} == REFERENCE


def test_runs_on_different_validation_splits_are_refused():
  mixed = runs()
  mixed[-1] = Run("hc", 1, rows(2.5, 2.41, {"unigram_loss": 3.0, "bigram_loss": 2.47}), 1000,
                  np.eye(2))
  with pytest.raises(ValueError, match="^hc seed 1: its unigram / bigram reference"):
    summarize(mixed, {"seeds": [0, 1]})


def test_a_run_without_a_whole_split_loss_is_named():
  old = runs()
  old[0] = Run("prenorm", 0, [{k: v for k, v in row.items() if k != "final_eval_loss"}
                              for row in old[0].rows], 1000, np.eye(2))
  with pytest.raises(ValueError, match="^prenorm seed 0: no final_eval_loss"):
    summarize(old, {"seeds": [0, 1]})


def test_eval_plot_draws_the_references(tmp_path, monkeypatch):
  drawn = []
  monkeypatch.setattr("matplotlib.axes.Axes.axhline",
                      lambda self, y, **kw: drawn.append((y, kw.get("label"))))
  report.figures.plot_curve(tmp_path / "loss_eval.png", report.numbers.by_variant(runs()),
                            "eval_loss", "Validation loss", "nats", references=REFERENCE)
  assert [y for y, _ in drawn] == [3.31, 2.47]
  assert all("unigram" in label or "bigram" in label for _, label in drawn)


def test_a_prepared_corpus_gives_the_unigram_reference_alone(tmp_path):
  """A prepared corpus logs `unigram_loss` without `bigram_loss`: the collapse rule, the
  figure and the report keep the unigram line."""
  unigram_only = {"unigram_loss": 3.31}
  summary = summarize(runs(unigram_only), {"seeds": [0, 1]})
  assert {k: v for k, v in summary["reference"].items() if k != "what"} == unigram_only
  assert _reference_lines(summary["reference"])[0].startswith(
      "Reference on the same tokens: unigram 3.3100 nats / token")
  report.figures.plot_all(tmp_path, runs(unigram_only), summary["reference"])
  assert (tmp_path / "loss_eval.png").is_file()
