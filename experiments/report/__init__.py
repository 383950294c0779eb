"""The report of a residual comparison: plots, `report.md` and `summary.json` in one folder.

Takes the runs as `Run`s (metrics rows and measurements of the final parameters, see
`compare_residuals.py`): `numbers.py` summarises them, `figures.py` plots them (the list is
`FIGURES`), `markdown.py` writes the page that shows both.
"""

import json
import pathlib

from experiments.report.figures import FIGURES, plot_all
from experiments.report.markdown import markdown
from experiments.report.numbers import Run, jsonable, summarize

__all__ = ["FIGURES", "Run", "write_report"]


def write_report(out: pathlib.Path, runs: list[Run], settings: dict) -> dict:
  """Writes the figures, `summary.json` and `report.md` into `out`; -> the summary."""
  out.mkdir(parents=True, exist_ok=True)
  summary = summarize(runs, settings)
  plot_all(out, runs, summary["reference"])
  (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
  (out / "report.md").write_text(markdown(summary))
  return summary
