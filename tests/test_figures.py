"""The report's figures: what each panel draws from the runs."""

import warnings

import numpy as np

from experiments.report import figures
from experiments.report.numbers import Run, by_variant

BLOCKS = 3


def stream_run(variant: str, seed: int, num_streams: int, rng) -> Run:
  rows = [{"step": 1, "forward_gain/max": 1.0, "train_loss": 2.0}]
  cosine = rng.uniform(-1, 1, (BLOCKS, num_streams, num_streams))
  return Run(variant, seed, rows, 1000, np.eye(BLOCKS), cosine)


def test_stream_cosine_leaves_out_one_stream_variants(tmp_path, monkeypatch):
  """Frac-connections' single stream logs H_res gains (its fractions mix) but has no pair of
  distinct streams: its off-diagonal mean would be 0 / 0."""
  rng = np.random.default_rng(0)
  runs = [stream_run(v, s, n, rng) for v, n in (("hc", 4), ("frac", 1)) for s in (0, 1)]
  drawn = {}
  monkeypatch.setattr(figures, "_band", lambda ax, x, ys, label, **kw: drawn.update({label: ys}))
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # 0 / 0
    figures.plot_stream_cosine(tmp_path / "cosine_streams.png", by_variant(runs))
  assert list(drawn) == ["hc"]
  hc = np.stack([r.stream_cosine for r in runs[:2]])
  expected = (hc.sum((-2, -1)) - np.trace(hc, axis1=-2, axis2=-1)) / 12  # 12 pairs of 4
  np.testing.assert_allclose(drawn["hc"], expected, rtol=1e-12)
  assert (tmp_path / "cosine_streams.png").is_file()
