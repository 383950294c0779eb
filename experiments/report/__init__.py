"""The report of a residual comparison: plots, `report.md` and `summary.json` in one folder.

Takes the runs as `Run`s (metrics rows and measurements of the final parameters, see
`compare_residuals.py`): `numbers.py` summarises them, `figures.py` plots them (the list is
`FIGURES`, and `SWEEP_FIGURE` after a learning-rate sweep), `markdown.py` writes the page that
shows both.
"""

import json
import pathlib

from experiments.report.figures import FIGURES, SWEEP_FIGURE, plot_all, plot_sweep
from experiments.report.markdown import markdown
from experiments.report.numbers import (BASELINE, Run, final_eval_loss, jsonable,
                                        prenorm_best_summary, summarize)
from experiments.report.thresholds import Thresholds, series

__all__ = ["BASELINE", "FIGURES", "SWEEP_FIGURE", "Run", "final_eval_loss", "write_report"]
SWEEP_DATA = "sweep.json"  # the sweep figure's data
CURVES_DATA = "curves.json"  # the curves' data: every run's logged series
CURVE_KEYS = ("train_loss", "eval_loss", "grad_norm", "composite_forward_gain/max",
              "composite_backward_gain/max")


def _write_json(path: pathlib.Path, data: dict) -> None:
  path.write_text(json.dumps(jsonable(data), indent=2) + "\n")


def curves(runs: list[Run]) -> dict:
  """The figures' data: per variant and seed, the steps and values of each `CURVE_KEYS`
  series it logged."""
  data = {}
  for run in runs:
    series_of = {key: series(run.rows, key) for key in CURVE_KEYS}
    data.setdefault(run.variant, {})[str(run.seed)] = {
        key: {"step": steps.tolist(), "value": values.tolist()}
        for key, (steps, values) in series_of.items() if len(steps)}
  return data


def write_report(out: pathlib.Path, runs: list[Run], settings: dict, sweep: dict | None = None,
                 prenorm_best: list[Run] | None = None) -> dict:
  """Writes the figures, `summary.json` and `report.md` into `out`; -> the summary. After a
  learning-rate sweep, `runs` are each variant's at its own best rate, `sweep` holds every
  variant's sweep (`compare_residuals.sweep_variant`) and `prenorm_best` the runs of every
  variant at prenorm's best rate."""
  out.mkdir(parents=True, exist_ok=True)
  thresholds = Thresholds(**settings.get("thresholds", {}))
  summary = summarize(runs, settings, thresholds)
  plot_all(out, runs, summary["reference"])
  _write_json(out / CURVES_DATA, curves(runs))
  if sweep:
    summary |= {"sweep": sweep,
                "prenorm_best": prenorm_best_summary(prenorm_best, settings, sweep,
                                                        thresholds)}
    plot_sweep(out / SWEEP_FIGURE, sweep)
    _write_json(out / SWEEP_DATA, sweep)
  _write_json(out / "summary.json", summary)
  (out / "report.md").write_text(markdown(summary))
  return summary
