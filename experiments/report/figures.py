"""The figures of a residual comparison, one PNG each; every curve is the mean over seeds,
with the min-max band.

    loss_train.png, loss_eval.png, grad_norm.png    per variant, over training
    gain_over_training.png   largest single-layer and composite H_res gain (stream variants)
    gain_per_layer.png       the same per sub-layer, at the last diagnostics step
    cosine_layers.png        cosine similarity between blocks' outputs, per variant
    cosine_streams.png       cosine similarity between streams (stream variants)
    sweep.png                after a learning-rate sweep: final loss against the rate
"""

import itertools
import math
import pathlib
import re

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

from experiments.report.numbers import (GAINS, REFERENCE_KEYS, Run, by_variant,  # noqa: E402
                                        chosen_point, has_streams, over_seeds)
from mhc_jax.lm.residuals import RESIDUALS  # noqa: E402

FIGURES = ("loss_train.png", "loss_eval.png", "grad_norm.png", "gain_over_training.png",
           "gain_per_layer.png", "cosine_layers.png", "cosine_streams.png")
SWEEP_FIGURE = "sweep.png"
DPI = 110


def _color(variant: str) -> str:
  """An arm's colour: its variant's (`hc(dynamic=False)`: hc's; `prenorm@flops(mhc)`:
  prenorm's), drawn dashed (`_style`) when the arm is more than the variant."""
  base = re.match(r"\w+", variant).group(0)
  return RESIDUALS[base].color if base in RESIDUALS else "black"


def _style(variant: str) -> str:
  return "-" if variant in RESIDUALS else "--"


def _band(ax, steps, values, variant, marker=None):
  """Mean over seeds as a line, min-max over seeds as a shaded band."""
  ax.plot(steps, values.mean(0), color=_color(variant), linestyle=_style(variant),
          label=variant, marker=marker,
          markersize=3)
  ax.fill_between(steps, values.min(0), values.max(0), color=_color(variant), alpha=0.2,
                  linewidth=0)


def _stream_groups(groups: dict[str, list[Run]]) -> dict[str, list[Run]]:
  return {v: g for v, g in groups.items() if has_streams(g)}


def _no_streams(path: pathlib.Path, title: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 2), layout="constrained")
  ax.axis("off")
  ax.text(0.5, 0.5, f"{title}:\nno variant with streams in this comparison", ha="center",
          va="center")
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def plot_curve(path: pathlib.Path, groups: dict[str, list[Run]], key: str, title: str,
               ylabel: str, log: bool = False, zoom: bool = False,
               references: dict[str, float] | None = None) -> None:
  """One line per variant over steps. `zoom` starts the y axis a tenth into training, so
  that the end, where the variants differ, is not squashed by the initial loss.
  `references`: dashed horizontal lines by name (`unigram_loss`: ...), kept in view."""
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  curves = {variant: over_seeds(group, key) for variant, group in groups.items()}
  for variant, (steps, values) in curves.items():
    _band(ax, steps, values, variant, marker="o" if len(steps) <= 30 else None)
  if zoom:
    low = min(np.nanmin(values) for _, values in curves.values())
    top = max(np.nanmax(values[:, np.argmax(steps >= steps[-1] / 10)])
              for steps, values in curves.values())
    if np.isfinite(low) and np.isfinite(top) and top > low:
      ax.set_ylim(low - 0.05 * (top - low), top)
  for (name, value), style in zip((references or {}).items(), ("--", ":")):
    ax.axhline(value, color="gray", linestyle=style, linewidth=1,
               label=f"{name.removesuffix('_loss')} (whole split)")
  if references and zoom:  # the references stay visible above or below the zoomed curves
    low, top = ax.get_ylim()
    ax.set_ylim(min(low, *references.values()) - 0.05, max(top, *references.values()) + 0.05)
  if log:
    ax.set_yscale("log")
  ax.set(title=title, xlabel="step", ylabel=ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _gain_grid(title: str):
  fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, layout="constrained")
  fig.suptitle(title)
  # Columns: single layer, composite; rows: forward, backward.
  return fig, dict(zip(GAINS, axes.T.reshape(-1)))


def _finish_gains(fig, axes, xlabel: str) -> None:
  names = {"forward_gain": "single layer, forward (max |row sum|)",
           "backward_gain": "single layer, backward (max |column sum|)",
           "composite_forward_gain": "composite, forward (max |row sum|)",
           "composite_backward_gain": "composite, backward (max |column sum|)"}
  for gain, ax in axes.items():
    ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    _log_gain_axis(ax)
    ax.set(title=names[gain], ylabel="gain (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  for ax in (axes["backward_gain"], axes["composite_backward_gain"]):
    ax.set_xlabel(xlabel)


def _log_gain_axis(ax) -> None:
  """Log scale spanning at least [0.5, 2]: bounded gains then read as the flat 1 they are
  (not as magnified noise), exploding ones still fit; plain numbers as tick labels."""
  ax.set_yscale("log")
  low, high = ax.get_ylim()
  low, high = min(low, 0.5), max(high, 2.0)
  ax.set_ylim(low, high)
  plain = FuncFormatter(lambda value, _: f"{value:g}")
  ax.yaxis.set_major_formatter(plain)
  # Within one decade the decade ticks are too few to read values off: label the others too
  # (over more, their labels would crowd into each other).
  ax.yaxis.set_minor_formatter(plain if high / low <= 10 else NullFormatter())


def plot_gains_over_training(path: pathlib.Path, groups: dict[str, list[Run]]) -> None:
  streams = _stream_groups(groups)
  if not streams:
    return _no_streams(path, "H_res gain over training")
  fig, axes = _gain_grid("Largest H_res gain over sub-layers and tokens, during training")
  for gain, ax in axes.items():
    for variant, group in streams.items():
      _band(ax, *over_seeds(group, f"{gain}/max"), variant)
  _finish_gains(fig, axes, "step")
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def final_gains(run: Run, gain: str) -> np.ndarray:
  """`[2 * L]`: `gain` per sub-layer at the run's last diagnostics step."""
  row = [r for r in run.rows if f"{gain}/max" in r][-1]
  count = sum(1 for k in row if k.startswith(f"{gain}/") and k != f"{gain}/max")
  return np.array([row[f"{gain}/{i:02d}"] for i in range(count)], float)


def plot_gains_per_layer(path: pathlib.Path, groups: dict[str, list[Run]]) -> None:
  streams = _stream_groups(groups)
  if not streams:
    return _no_streams(path, "H_res gain per sub-layer")
  fig, axes = _gain_grid("H_res gain per sub-layer at the end of training "
                         "(composite: product of sub-layers 0..l)")
  for gain, ax in axes.items():
    for variant, group in streams.items():
      values = np.stack([final_gains(r, gain) for r in group])
      _band(ax, np.arange(values.shape[1]), values, variant, marker="o")
  _finish_gains(fig, axes, "sub-layer (even: attention, odd: MLP)")
  axes["backward_gain"].xaxis.set_major_locator(MaxNLocator(integer=True))
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _color_floor(matrices) -> float:
  """The shared lower end of a figure's colour scale: just below its smallest similarity
  (similarities of residual streams crowd near 1), at most 0.9."""
  return min(0.9, math.floor(min(float(np.min(m)) for m in matrices) * 10) / 10)


def _heatmap(ax, matrix: np.ndarray, vmin: float, title: str, label: str):
  image = ax.imshow(matrix, vmin=vmin, vmax=1.0, cmap="viridis")
  if len(matrix) <= 8:  # numbers stay legible only in small matrices
    for (i, j), value in np.ndenumerate(matrix):
      ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
              color="white" if value < (vmin + 1) / 2 else "black")
  ax.set(title=title, xlabel=label, ylabel=label)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  return image


def plot_layer_cosine(path: pathlib.Path, groups: dict[str, list[Run]]) -> None:
  matrices = {v: np.mean([r.layer_cosine for r in g], axis=0) for v, g in groups.items()}
  vmin = _color_floor(matrices.values())
  fig, axes = plt.subplots(1, len(matrices), figsize=(3.2 * len(matrices) + 1, 3.6),
                           squeeze=False, layout="constrained")
  for ax, (variant, matrix) in zip(axes[0], matrices.items()):
    image = _heatmap(ax, matrix, vmin, variant, "block")
  fig.suptitle("Cosine similarity between blocks' outputs (streams summed; mean over tokens "
               "and seeds)")
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def off_diagonal_mean(matrices: np.ndarray) -> np.ndarray:
  """`[..., n, n]` -> `[...]`: mean of the entries off the diagonal."""
  n = matrices.shape[-1]
  return (matrices.sum((-2, -1)) - np.trace(matrices, axis1=-2, axis2=-1)) / (n * n - n)


def plot_stream_cosine(path: pathlib.Path, groups: dict[str, list[Run]]) -> None:
  """Left: mean similarity between distinct streams per block. Then the last block's
  `[n, n]` per variant. A variant of one stream (Frac-connections' fractions of it) has no
  pair to compare and is left out."""
  matrices = {v: np.stack([r.stream_cosine for r in g])
              for v, g in _stream_groups(groups).items() if g[0].stream_cosine.shape[-1] > 1}
  if not matrices:
    return _no_streams(path, "Cosine similarity between streams")
  fig, axes = plt.subplots(1, 1 + len(matrices), figsize=(4.5 + 3.2 * len(matrices), 3.6),
                           squeeze=False, layout="constrained")
  axes = axes[0]
  for variant, stack in matrices.items():
    per_block = off_diagonal_mean(stack)  # [seeds, L]
    _band(axes[0], np.arange(per_block.shape[1]), per_block, variant, marker="o")
  axes[0].set(title="mean over pairs of distinct streams", xlabel="block",
              ylabel="cosine similarity")
  axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
  axes[0].grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  last = {v: stack.mean(0)[-1] for v, stack in matrices.items()}
  vmin = _color_floor(last.values())
  for ax, (variant, matrix) in zip(axes[1:], last.items()):
    image = _heatmap(ax, matrix, vmin, f"{variant}: last block", "stream")
  fig.suptitle("Cosine similarity between streams (mean over tokens and seeds)")
  fig.colorbar(image, ax=axes[1:].tolist(), shrink=0.8)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def plot_all(out: pathlib.Path, runs: list[Run], references: dict | None = None) -> None:
  """`references`: the summary's `reference` (unigram / bigram losses), or None."""
  groups = by_variant(runs)
  references = ({k: references[k] for k in REFERENCE_KEYS if k in references} if references
                else None)
  plot_curve(out / "loss_train.png", groups, "train_loss", "Training loss (one batch a point)",
             "cross entropy (nats / byte)", zoom=True)
  plot_curve(out / "loss_eval.png", groups, "eval_loss",
             "Validation loss (a fixed subset; lines: references on the whole split)",
             "cross entropy (nats / byte)", zoom=True, references=references)
  plot_curve(out / "grad_norm.png", groups, "grad_norm", "Gradient norm (before clipping)",
             "global L2 norm (log)", log=True)
  plot_gains_over_training(out / "gain_over_training.png", groups)
  plot_gains_per_layer(out / "gain_per_layer.png", groups)
  plot_layer_cosine(out / "cosine_layers.png", groups)
  plot_stream_cosine(out / "cosine_streams.png", groups)


def plot_sweep(path: pathlib.Path, sweep: dict) -> None:
  """Mean final loss over the sweep seeds against the learning rate (log), a line per variant
  and static-map multiplier, the chosen point starred."""
  fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
  for variant, entry in sweep.items():
    multipliers = entry["static_map_lr_multipliers"]
    for multiplier, style in zip(multipliers, itertools.cycle(("-", "--", ":", "-."))):
      points = sorted((p for p in entry["points"] if p["static_map_lr_multiplier"] == multiplier),
                      key=lambda p: p["learning_rate"])
      label = variant + ("" if multiplier == 1.0 else f", static maps x{multiplier:g}")
      means = np.array([p["final_eval_loss"]["mean"] for p in points], float)
      ax.plot([p["learning_rate"] for p in points],  # a diverged point is a gap
              np.where(np.isfinite(means), means, np.nan), linestyle=style, marker="o",
              markersize=4, color=_color(variant), label=label)
    chosen = chosen_point(entry)
    ax.plot(chosen["learning_rate"], chosen["final_eval_loss"]["mean"], marker="*",
            markersize=15, color=_color(variant), markeredgecolor="black", linestyle="none")
  ax.set_xscale("log")
  ax.set(title="Learning-rate sweep (star: each variant's chosen point)",
         xlabel="peak learning rate (log)",
         ylabel="final val loss, mean over sweep seeds (nats / byte)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.savefig(path, dpi=DPI)
  plt.close(fig)
