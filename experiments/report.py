"""The report of a residual comparison: plots, `report.md` and `summary.json` in one folder.

Takes the runs as `Run`s (metrics rows and measurements of the final parameters, see
`compare_residuals.py`); every figure shows the mean over seeds, with the min-max band.

    loss_train.png, loss_eval.png, grad_norm.png    per variant, over training
    gain_over_training.png   largest single-layer and composite H_res gain (stream variants)
    gain_per_layer.png       the same per sub-layer, at the last diagnostics step
    cosine_layers.png        cosine similarity between blocks' outputs, per variant
    cosine_streams.png       cosine similarity between streams (stream variants)
"""

import dataclasses
import json
import math
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

BASELINE = "prenorm"
COLORS = {"prenorm": "tab:blue", "postnorm": "tab:orange", "hc": "tab:red", "mhc": "tab:green",
          "mhc_lite": "tab:purple"}
GAINS = ("forward_gain", "backward_gain", "composite_forward_gain", "composite_backward_gain")
FIGURES = ("loss_train.png", "loss_eval.png", "grad_norm.png", "gain_over_training.png",
           "gain_per_layer.png", "cosine_layers.png", "cosine_streams.png")
DPI = 110


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no value equality
class Run:
  """One trained (variant, seed).

  rows: its metrics.jsonl records. layer_cosine: `[L, L]` between blocks' outputs (streams
  summed). stream_cosine: `[L, n, n]` between the streams of each block's output, or None
  without streams.
  """

  variant: str
  seed: int
  rows: list[dict]
  num_params: int
  layer_cosine: np.ndarray
  stream_cosine: np.ndarray | None


# Numbers.


def by_variant(runs: list[Run]) -> dict[str, list[Run]]:
  """Runs grouped by variant, in first-seen order, each group in seed order."""
  groups = {}
  for run in runs:
    groups.setdefault(run.variant, []).append(run)
  return {v: sorted(group, key=lambda r: r.seed) for v, group in groups.items()}


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (steps `[T]`, values `[T]`) of the rows that logged `key`."""
  kept = [row for row in rows if key in row]
  return np.array([r["step"] for r in kept], int), np.array([r[key] for r in kept], float)


def over_seeds(group: list[Run], key: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (steps `[T]`, values `[seeds, T]`) at the steps every seed logged `key` at."""
  curves = [dict(zip(*series(run.rows, key))) for run in group]
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return np.array(steps, int), np.array([[c[s] for s in steps] for c in curves], float)


def last_value(rows: list[dict], key: str) -> float:
  return series(rows, key)[1][-1]


def has_streams(group: list[Run]) -> bool:
  """Stream variants log H_res gains and have stream similarities."""
  return group[0].stream_cosine is not None


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof 1; NaN for one value)."""
  values = np.asarray(values, float)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return {"mean": float(np.mean(values)), "std": std}


def summarize(runs: list[Run], settings: dict) -> dict:
  """The report's numbers per variant; `settings` is stored alongside as given."""
  groups = by_variant(runs)
  final = {v: {r.seed: last_value(r.rows, "eval_loss") for r in g} for v, g in groups.items()}
  variants = {}
  for variant, group in groups.items():
    entry = {"num_params": group[0].num_params,
             "final_eval_loss": {**mean_std(list(final[variant].values())),
                                 "per_seed": {str(s): v for s, v in final[variant].items()}},
             "skipped_updates": int(sum(last_value(r.rows, "skipped_steps") for r in group)),
             "tokens_per_sec_median": float(np.median(np.concatenate(
                 [series(r.rows, "tokens_per_sec")[1] for r in group])))}
    if BASELINE in final and variant != BASELINE:
      # Same seed, same data and validation split: the difference cancels what they share.
      entry[f"eval_loss_minus_{BASELINE}"] = mean_std(
          [final[variant][s] - final[BASELINE][s] for s in final[variant]])
    if has_streams(group):
      # Worst case over seeds: a gain that explodes in one seed is what stability is about.
      entry["final_max_gain"] = {
          g: float(np.max([last_value(r.rows, f"{g}/max") for r in group])) for g in GAINS}
    variants[variant] = entry
  return {"settings": settings, "variants": variants,
          "runs": [{"variant": r.variant, "seed": r.seed,
                    "final_eval_loss": final[r.variant][r.seed],
                    "layer_cosine": r.layer_cosine.tolist(),
                    "stream_cosine": None if r.stream_cosine is None else
                    r.stream_cosine.tolist()} for r in runs]}


def _jsonable(x):
  """Non-finite floats as "nan" / "inf" / "-inf", as `mhc_jax.metrics` writes them."""
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


# Figures.


def _color(variant: str) -> str:
  return COLORS.get(variant, "black")


def _band(ax, steps, values, variant, marker=None):
  """Mean over seeds as a line, min-max over seeds as a shaded band."""
  ax.plot(steps, values.mean(0), color=_color(variant), label=variant, marker=marker,
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
               ylabel: str, log: bool = False, zoom: bool = False) -> None:
  """One line per variant over steps. `zoom` starts the y axis a tenth into training, so
  that the end, where the variants differ, is not squashed by the initial loss."""
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
  `[n, n]` per variant."""
  streams = _stream_groups(groups)
  if not streams:
    return _no_streams(path, "Cosine similarity between streams")
  matrices = {v: np.stack([r.stream_cosine for r in g]) for v, g in streams.items()}
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


def plot_all(out: pathlib.Path, runs: list[Run]) -> None:
  groups = by_variant(runs)
  plot_curve(out / "loss_train.png", groups, "train_loss", "Training loss (one batch a point)",
             "cross entropy (nats / byte)", zoom=True)
  plot_curve(out / "loss_eval.png", groups, "eval_loss", "Validation loss",
             "cross entropy (nats / byte)", zoom=True)
  plot_curve(out / "grad_norm.png", groups, "grad_norm", "Gradient norm (before clipping)",
             "global L2 norm (log)", log=True)
  plot_gains_over_training(out / "gain_over_training.png", groups)
  plot_gains_per_layer(out / "gain_per_layer.png", groups)
  plot_layer_cosine(out / "cosine_layers.png", groups)
  plot_stream_cosine(out / "cosine_streams.png", groups)


# Markdown.


def _pm(stats: dict) -> str:
  std = "n/a" if math.isnan(stats["std"]) else f"{stats['std']:.4f}"
  return f"{stats['mean']:.4f} ± {std}"


def _table(summary: dict) -> list[str]:
  seeds = summary["settings"]["seeds"]
  lines = ["| variant | parameters | final val loss | Δ vs prenorm (paired) | per seed "
           f"({', '.join(map(str, seeds))}) | max gain single fwd / bwd | max gain composite "
           "fwd / bwd | skipped updates | tokens/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for variant, entry in summary["variants"].items():
    delta = entry.get(f"eval_loss_minus_{BASELINE}")
    gains = entry.get("final_max_gain")
    single = composite = "–"
    if gains:
      single = f"{gains['forward_gain']:.3g} / {gains['backward_gain']:.3g}"
      composite = f"{gains['composite_forward_gain']:.3g} / {gains['composite_backward_gain']:.3g}"
    per_seed = ", ".join(f"{v:.4f}" for v in entry["final_eval_loss"]["per_seed"].values())
    lines.append(f"| {variant} | {entry['num_params']:,} | {_pm(entry['final_eval_loss'])} | "
                 f"{_pm(delta) if delta else '–'} | {per_seed} | {single} | {composite} | "
                 f"{entry['skipped_updates']} | {entry['tokens_per_sec_median']:,.0f} |")
  return lines


def _settings_lines(settings: dict) -> list[str]:
  lines = []
  for key, value in settings.items():
    if isinstance(value, dict):
      value = ", ".join(f"{k}={v}" for k, v in value.items())
    elif isinstance(value, list | tuple):
      value = ", ".join(map(str, value))
    lines.append(f"- **{key}**: {value}")
  return lines


def markdown(summary: dict) -> str:
  s = summary["settings"]
  loop, data = s["loop"], s["data"]
  return "\n".join([
      f"# Residual variants compared (preset `{s['preset']}`)",
      "",
      f"{len(s['variants'])} variants × {len(s['seeds'])} seeds; {loop['steps']} steps of "
      f"{data['batch_size']} × {data['seq_len']} tokens each; n = {s['num_streams']} streams "
      "for hc / mhc / mhc_lite.",
      "",
      "## Final validation loss",
      "",
      *_table(summary),
      "",
      "Mean ± sample standard deviation (ddof 1) over seeds. The data order and the validation "
      "split follow the seed and are the same for every variant, so *Δ vs prenorm* (variant "
      "minus prenorm at the same seed) is the paired difference. Gains: the largest over "
      "sub-layers, tokens and seeds at the last diagnostics step (1 for doubly-stochastic "
      "H_res). Tokens/s: median over logged steps (shared machines make it noisy).",
      "",
      "## Loss and gradients",
      "",
      "Mean over seeds; the band spans min to max over seeds.",
      "",
      "![training loss](loss_train.png)",
      "",
      "![validation loss](loss_eval.png)",
      "",
      "![gradient norm](grad_norm.png)",
      "",
      "## H_res gains (stream variants)",
      "",
      f"Logged every {loop['diagnostics_every']} steps from the training forward pass. "
      "Composite: the product H_l ... H_0 from the first sub-layer's input to sub-layer l's "
      "output.",
      "",
      "![gain over training](gain_over_training.png)",
      "",
      "![gain per layer](gain_per_layer.png)",
      "",
      "## Representation similarity (final parameters)",
      "",
      f"Each block's output on the first {s['analysis_batches']} validation batches.",
      "",
      "![cosine similarity between layers](cosine_layers.png)",
      "",
      "![cosine similarity between streams](cosine_streams.png)",
      "",
      "## Settings",
      "",
      *_settings_lines(s),
      "",
  ])


def write_report(out: pathlib.Path, runs: list[Run], settings: dict) -> dict:
  """Writes the figures, `summary.json` and `report.md` into `out`; -> the summary."""
  out.mkdir(parents=True, exist_ok=True)
  summary = summarize(runs, settings)
  plot_all(out, runs)
  (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n")
  (out / "report.md").write_text(markdown(summary))
  return summary
