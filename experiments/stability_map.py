"""A stability map: which learning rates and depths each residual variant trains at, and a
second phase that confirms HC's failures with more seeds.

    python -m experiments.stability_map --preset stability_map --out reports/stability_map
        [--gin_param 'Grid.depths = [4, 8]'] [--gin_param 'LoopConfig.steps = 100']

A preset is `gin_configs/compare/NAME.gin` (or the path of any gin file): the train configs as
`mhc-train` takes them plus `Grid.*`, the variants, learning rates, depths and seeds to cross,
and `Thresholds.*`, the failure rule's numbers, stated before the runs. Every (variant, depth,
learning rate, seed) trains once with `mhc_jax.lm.train.train` in
`OUT/runs/<variant>_L<depth>_lr<lr>_seed<k>/`, with `ModelConfig.residual`,
`ModelConfig.num_layers`, `OptimizerConfig.learning_rate` set to the cell's, the seed in
`LoopConfig.seed` and `DataConfig.seed`, and the H_res gains logged about `Grid.gain_points`
times (`LoopConfig.diagnostics_every`). `LoopConfig.nonfinite` is always "skip": an update with
a non-finite loss, gradient or parameter is dropped and counted, so a diverging run still
finishes and the map has every cell. As in every experiment (`experiments/runs.py`), a finished
run is reused, an unfinished one resumes, and a workdir trained with other configs is an error.

A run failed by `experiments/report/thresholds.py`'s rule, counting from step 1: a non-finite
value logged or an update skipped, a surge of the train loss's moving average, or a final
full-validation loss within `Thresholds.collapse_margin` of the unigram loss of the same tokens
(computed once per map, before training, with `mhc_jax.lm.data.reference_losses`).

Confirm phase (`Grid.confirm_seeds` > 0): at the lowest learning rate where some seed of hc
failed at `Grid.confirm_depth` blocks, `confirm_seeds` seeds (0, 1, ...) each of prenorm, hc,
mhc and hc with its static maps and scales at `Grid.confirm_static_multiplier` x the rate
(`OptimizerConfig.static_map_lr_multiplier`); the failures per arm,
and Fisher's exact test (two-sided) of each arm's against prenorm's and against hc's. Runs the
map already has are reused.

Written to OUT:
  stability_map.png  one panel per variant, learning rate (log) x depth; each cell coloured by
                     its final eval loss (mean over seeds) on one scale for all panels, or
                     hatched grey with an x where a seed failed
  gain_by_depth.png  one panel per stream variant: the worst seed's peak composite backward
                     gain (log) against depth, a line per learning rate (the cells' numbers);
                     an x at the top where it was not finite
  summary.json       the settings, the unigram / bigram reference, every run (final losses,
                     skipped updates, surges, gains, why it failed), every cell, and the confirm
                     phase's arms and tests
  report.md          the failure rule, the figure, the map and the composite backward gains as
                     tables, the confirm phase
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from typing import NamedTuple

import gin
import jax
import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import LogFormatter, NullLocator  # noqa: E402

from experiments.report import significance, thresholds  # noqa: E402
from experiments.report.numbers import series  # noqa: E402
from experiments.runs import (configs_json, devices_for, diagnostics_every,  # noqa: E402
                             preset_path, Stopped, train_or_reuse, use_compilation_cache)
from mhc_jax.checks import check_int, one_line  # noqa: E402
from mhc_jax.lm import presets  # noqa: E402
from mhc_jax.lm.data import Corpus, DataConfig  # noqa: E402
from mhc_jax.lm.metrics import read_metrics  # noqa: E402
from mhc_jax.lm.model import ModelConfig  # noqa: E402
from mhc_jax.lm.optimizer import OptimizerConfig  # noqa: E402
from mhc_jax.lm.residuals import RESIDUALS, with_residual  # noqa: E402
from mhc_jax.lm.sharding import MeshConfig  # noqa: E402
from mhc_jax.lm.train import LoopConfig  # noqa: E402

FIGURE = "stability_map.png"
GAIN_FIGURE = "gain_by_depth.png"
DPI = 110
GAIN = "composite_backward_gain/max"  # the largest over sub-layers, as the train step logs it
# The confirm phase's arms besides the static-rate one, and the arms every arm is tested against.
CONFIRM_VARIANTS = ("prenorm", "hc", "mhc")
TESTED_AGAINST = ("prenorm", "hc")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Grid:
  """variants: names in `residuals.RESIDUALS`. learning_rates: peak learning rates (the x
  axis). depths: blocks (`ModelConfig.num_layers`, the y axis). seeds: one run per cell and
  seed. num_streams: n of the stream variants. gain_points: about how many steps log the H_res
  gains. confirm_seeds: seeds per arm of the confirm phase (0: none); confirm_depth: its depth,
  one of `depths`; confirm_static_multiplier: the rate multiplier of its static-rate hc
  arm's static maps and scales."""

  variants: tuple[str, ...] = ("prenorm", "hc", "mhc")
  learning_rates: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
  depths: tuple[int, ...] = (4, 8, 16)
  seeds: tuple[int, ...] = (0,)
  num_streams: int = 4
  gain_points: int = 30
  confirm_seeds: int = 0
  confirm_depth: int = 32
  confirm_static_multiplier: float = 0.1

  def __post_init__(self):
    # Lists (e.g. from gin) become tuples so the config stays hashable; sorted, so the axes
    # run one way whatever order the preset lists them in.
    for name in ("learning_rates", "depths"):
      object.__setattr__(self, name, tuple(sorted(getattr(self, name))))
    for name in ("variants", "seeds"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    unknown = set(self.variants) - set(RESIDUALS)
    if not self.variants or unknown or len(set(self.variants)) != len(self.variants):
      raise ValueError(f"variants must be distinct ones of {', '.join(RESIDUALS)}; got "
                       f"{list(self.variants)}")
    for name in ("learning_rates", "depths", "seeds"):
      values = getattr(self, name)
      if not values or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct and at least one; got {list(values)}")
    if not all(_positive(lr) for lr in self.learning_rates):
      raise ValueError(f"learning_rates must be positive numbers; got {list(self.learning_rates)}")
    for depth in self.depths:
      check_int("depths", depth)
    check_int("num_streams", self.num_streams)
    check_int("gain_points", self.gain_points)
    check_int("confirm_seeds", self.confirm_seeds, minimum=0)
    if self.confirm_seeds:
      self._check_confirm_phase()

  def _check_confirm_phase(self):
    if "hc" not in self.variants or self.confirm_depth not in self.depths:
      raise ValueError(f"the confirm phase starts where hc fails at confirm_depth "
                       f"{self.confirm_depth}: Grid.variants must hold hc and Grid.depths "
                       f"{self.confirm_depth} (got {list(self.variants)}, {list(self.depths)}),"
                       " or set Grid.confirm_seeds = 0")
    if not _positive(self.confirm_static_multiplier):
      raise ValueError(f"confirm_static_multiplier must be a positive number; got "
                       f"{self.confirm_static_multiplier!r}")


def _positive(x) -> bool:
  return isinstance(x, (int, float)) and 0 < x < math.inf


class RunKey(NamedTuple):
  """One run: a cell, a seed and, for the static-rate arm, HC's static maps' and scales' rate
  multiplier (None: the same rate as every other parameter)."""

  variant: str
  depth: int
  learning_rate: float
  seed: int
  static_multiplier: float | None = None

  @property
  def arm(self) -> str:
    if self.static_multiplier is None:
      return self.variant
    return f"{self.variant}_static{self.static_multiplier:g}x"


@dataclasses.dataclass(frozen=True)
class Settings:
  """The grid, the failure thresholds and the train configs before a run's values are set in
  them (`run_configs`)."""

  grid: Grid
  thresholds: thresholds.Thresholds
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  loop: LoopConfig

  def runs(self) -> list[RunKey]:
    """Every run of the map, variant by variant."""
    g = self.grid
    return [RunKey(v, d, lr, s) for v in g.variants for d in g.depths for lr in g.learning_rates
            for s in g.seeds]

  def confirm_runs(self, learning_rate: float) -> list[RunKey]:
    """Every run of the confirm phase at `learning_rate`, arm by arm."""
    g = self.grid
    arms = [(v, None) for v in CONFIRM_VARIANTS] + [("hc", g.confirm_static_multiplier)]
    return [RunKey(v, g.confirm_depth, learning_rate, s, m) for v, m in arms
            for s in range(g.confirm_seeds)]


def load_settings(preset: str, gin_params=()) -> Settings:
  configs, _ = presets.parse([str(preset_path(preset))], gin_params,
                             extra={"grid": Grid, "thresholds": thresholds.Thresholds})
  return Settings(**configs)


def run_name(key: RunKey) -> str:
  return f"{key.arm}_L{key.depth}_lr{key.learning_rate:g}_seed{key.seed}"


def run_configs(settings: Settings, variant: str, depth: int, lr: float, seed: int,
                static_multiplier: float | None = None) -> dict:
  """The `train` keyword arguments of one run."""
  static_rate = {} if static_multiplier is None else {
      "static_map_lr_multiplier": static_multiplier}
  loop = settings.loop
  return {
      "model": with_residual(dataclasses.replace(settings.model, num_layers=depth), variant,
                             num_streams=settings.grid.num_streams),
      "data": dataclasses.replace(settings.data, seed=seed),
      "optimizer": dataclasses.replace(settings.optimizer, learning_rate=lr, **static_rate),
      "mesh": settings.mesh,
      # "skip", whatever the preset says: "stop" would end the map at its first divergence.
      "loop": dataclasses.replace(
          loop, seed=seed, sample_tokens=0, nonfinite="skip",
          diagnostics_every=diagnostics_every(loop.steps, settings.grid.gain_points)),
  }


def train_runs(settings: Settings, keys: list[RunKey], runs_dir: pathlib.Path,
               progress: bool) -> None:
  """Trains (or resumes, or reuses) every run, one after another."""
  runs = [(runs_dir / run_name(key), run_configs(settings, *key)) for key in keys]
  train_or_reuse([(workdir, configs, configs) for workdir, configs in runs], "stability_map",
                 progress)


def validation_reference(data: DataConfig) -> dict:
  """The unigram / bigram losses of the validation tokens every run is scored on (the split
  is `DataConfig.split_seed`'s, the same for every seed)."""
  reference = Corpus(data).reference_losses()
  if reference is None:
    raise ValueError(f"DataConfig.source {data.source!r} gives no unigram reference (no "
                     "validation split, or a corpus prepared without unigram counts), which "
                     "the collapse rule needs: hold out documents, or prepare it again")
  return reference


def gains(rows: list[dict]) -> dict | None:
  """The composite backward gain (the largest over sub-layers) at the last logged step and
  its peak over training; None for a run without streams (no H_res)."""
  values = series(rows, GAIN)[1]
  if not len(values):
    return None
  return {"final": float(values[-1]), "peak": float(np.max(values))}


def run_result(settings: Settings, runs_dir: pathlib.Path, key: RunKey,
               unigram_loss: float) -> dict:
  """One run's final numbers and whether it failed, read from its metrics."""
  workdir = runs_dir / run_name(key)
  rows = read_metrics(workdir)
  last = rows[-1]
  if "final_eval_loss" not in last:  # the whole validation split's, at the last step
    raise ValueError(f"{workdir}: no final_eval_loss (no validation data, or trained before "
                     "the whole-split evaluation: delete that workdir to retrain it)")
  why = thresholds.failed(rows, unigram_loss, settings.thresholds)
  return {**key._asdict(), "arm": key.arm, "run": workdir.name,
          "final_train_loss": last["train_loss"], "final_eval_loss": last["final_eval_loss"],
          "skipped_updates": int(last["skipped_steps"]),
          "surges": thresholds.surges_of_run(rows, settings.thresholds),
          "composite_backward_gain": gains(rows), "failed": why is not None, "why_failed": why}


def cells(settings: Settings, runs: list[dict]) -> list[dict]:
  """One entry per (variant, depth, learning rate): the mean final eval loss over its seeds and
  their range (lowest, highest), None where a seed failed; the worst seed's composite
  backward gain at the end and at its peak (None without streams)."""
  g, out = settings.grid, []
  for variant in g.variants:
    for depth in g.depths:
      for lr in g.learning_rates:
        group = [r for r in runs if (r["variant"], r["depth"], r["learning_rate"])
                 == (variant, depth, lr)]
        failed = sum(r["failed"] for r in group)
        losses = [r["final_eval_loss"] for r in group]
        run_gains = [r["composite_backward_gain"] for r in group]
        out.append({"variant": variant, "depth": depth, "learning_rate": lr,
                    "seeds": len(group), "failed_seeds": failed,
                    "final_eval_loss": None if failed else float(np.mean(losses)),
                    "seed_range": None if failed else [min(losses), max(losses)],
                    # np.max: a NaN gain (a run that blew up) is the worst.
                    "composite_backward_gain": None if None in run_gains else
                    {k: float(np.max([gain[k] for gain in run_gains]))
                     for k in ("final", "peak")}})
  return out


def confirm_rate(settings: Settings, runs: list[dict]) -> float | None:
  """The lowest learning rate at which some seed of hc failed at the confirm depth."""
  return min((r["learning_rate"] for r in runs if r["variant"] == "hc" and r["failed"]
              and r["depth"] == settings.grid.confirm_depth), default=None)


def confirm_summary(runs: list[dict]) -> dict:
  """Per arm of the confirm phase's `runs`: its runs, failures and failed seeds; the final eval
  loss (mean, sample std) of the runs that did not fail; the median and largest peak composite
  backward gain (None without streams); Fisher's exact test of its failures against those of
  each arm in TESTED_AGAINST."""
  arms = {}
  for run in runs:
    arms.setdefault(run["arm"], []).append(run)
  counts = {arm: (sum(r["failed"] for r in group), len(group)) for arm, group in arms.items()}
  return {arm: {"runs": total, "failed": failed,
                "failed_seeds": [r["seed"] for r in arms[arm] if r["failed"]],
                "trained_loss": _mean_std([r["final_eval_loss"] for r in arms[arm]
                                           if not r["failed"]]),
                "peak_gain": _median_max([r["composite_backward_gain"] for r in arms[arm]]),
                "fisher": {other: significance.fisher_exact(failed, total, *counts[other])
                           for other in TESTED_AGAINST if other != arm}}
          for arm, (failed, total) in counts.items()}


def _mean_std(losses: list[float]) -> dict | None:
  if not losses:
    return None
  return {"mean": float(np.mean(losses)),
          "std": float(np.std(losses, ddof=1)) if len(losses) > 1 else None}


def _median_max(run_gains: list[dict | None]) -> dict | None:
  if None in run_gains:
    return None
  peaks = [gain["peak"] for gain in run_gains]
  # np.max: a NaN peak (a run that blew up) is the largest.
  return {"median": float(np.median(peaks)), "max": float(np.max(peaks))}


def log_edges(values) -> np.ndarray:
  """Cell edges around sorted positive `values`, halfway between neighbours in log space."""
  logs = np.log(np.asarray(values, float))
  half = np.diff(logs) / 2 if len(logs) > 1 else np.array([np.log(2)])
  inner = logs[:-1] + half[:len(logs) - 1]
  return np.exp(np.concatenate([[logs[0] - half[0]], inner, [logs[-1] + half[-1]]]))


def plot_map(path: pathlib.Path, settings: Settings, cell_list: list[dict]) -> None:
  """One panel per variant; every panel shares the colour scale of the finite cells."""
  g = settings.grid
  losses = [c["final_eval_loss"] for c in cell_list if c["final_eval_loss"] is not None]
  norm = Normalize(min(losses, default=0), max(losses, default=1))
  cmap = plt.get_cmap("viridis")
  x_edges, y_edges = log_edges(g.learning_rates), log_edges(g.depths)
  fig, axes = plt.subplots(1, len(g.variants), figsize=(3.6 * len(g.variants) + 1.2, 3.6),
                           sharey=True, squeeze=False)
  for ax, variant in zip(axes[0], g.variants):
    for c in (c for c in cell_list if c["variant"] == variant):
      i, j = g.learning_rates.index(c["learning_rate"]), g.depths.index(c["depth"])
      x0, x1, y0, y1 = x_edges[i], x_edges[i + 1], y_edges[j], y_edges[j + 1]
      centre = (math.sqrt(x0 * x1), math.sqrt(y0 * y1))  # the middle on log axes
      loss = c["final_eval_loss"]
      if loss is None:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="0.85", edgecolor="0.4",
                               hatch="///", linewidth=0.5))
        label = "×" if c["seeds"] == 1 else f"× {c['failed_seeds']}/{c['seeds']}"
        ax.text(*centre, label, ha="center", va="center", fontsize=14, color="crimson")
      else:
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=cmap(norm(loss)),
                               edgecolor="white", linewidth=0.5))
        # Dark text on the light end of viridis, light text on the dark end.
        # The seeds' range under the mean: a cell where one seed failed shows it.
        low, high = c["seed_range"]
        label = f"{loss:.2f}" + (f"\n{low:.2f}–{high:.2f}" if c["seeds"] > 1 else "")
        ax.text(*centre, label, ha="center", va="center", fontsize=8,
                color="black" if norm(loss) > 0.6 else "white")
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlim(x_edges[0], x_edges[-1])
    ax.set_ylim(y_edges[0], y_edges[-1])
    ax.set_xticks(g.learning_rates, [f"{lr:g}" for lr in g.learning_rates])
    ax.set_yticks(g.depths, [str(d) for d in g.depths])
    ax.minorticks_off()
    ax.set_title(variant, color=RESIDUALS[variant].color)
    ax.set_xlabel("peak learning rate")
  axes[0][0].set_ylabel("depth (blocks)")
  if losses:
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes[0].tolist(),
                 label="final eval loss")
  fig.suptitle(f"Final eval loss after {settings.loop.steps} steps (× hatched: failed)", y=1.03)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)


def plot_gains(path: pathlib.Path, settings: Settings, cell_list: list[dict]) -> None:
  """Per stream variant, the worst seed's peak composite backward gain against depth, a line
  per learning rate: whether a variant's H_res product grows with depth."""
  g = settings.grid
  variants = [v for v in g.variants
              if any(c["composite_backward_gain"] for c in cell_list if c["variant"] == v)]
  # Each panel its own scale: HC's gains may be 1e20 times mHC's.
  fig, axes = plt.subplots(1, len(variants), figsize=(3.8 * len(variants), 3.4),
                           squeeze=False)
  colours = plt.get_cmap("plasma")(np.linspace(0.1, 0.8, len(g.learning_rates)))
  for ax, variant in zip(axes[0], variants):
    for lr, colour in zip(g.learning_rates, colours):
      peaks = [next(c["composite_backward_gain"]["peak"] for c in cell_list
                    if (c["variant"], c["depth"], c["learning_rate"]) == (variant, d, lr))
               for d in g.depths]
      ax.plot(g.depths, peaks, "o-", color=colour, label=f"lr {lr:g}")
      # A non-finite peak (a run that blew up) leaves the log axis: an x at its top instead.
      blown = [d for d, peak in zip(g.depths, peaks) if not math.isfinite(peak)]
      ax.plot(blown, [0.96] * len(blown), "x", color=colour, markersize=9,
              transform=ax.get_xaxis_transform())
    ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(g.depths, [str(d) for d in g.depths])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_tick_params(which="both", labelsize=8)
    # Plain numbers; minor ticks labelled too where a panel spans under 10x (mHC's).
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    ax.set_title(variant, color=RESIDUALS[variant].color)
    ax.set_xlabel("depth (blocks)")
  if variants:
    axes[0][0].set_ylabel("peak composite backward gain\n(worst seed)")
    axes[0][0].legend(fontsize=8)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)


def settings_summary(settings: Settings, preset: str) -> dict:
  """The settings every run shares, JSON-ready (what a run sets is left out)."""
  configs = configs_json(run_configs(settings, *settings.runs()[0]))
  for group, key in (("model", "residual"), ("model", "residual_settings"),
                     ("model", "num_layers"), ("data", "seed"),
                     ("optimizer", "learning_rate"), ("loop", "seed")):
    del configs[group][key]
  devices = devices_for(settings.mesh)
  return {"preset": preset, **dataclasses.asdict(settings.grid),
          "thresholds": dataclasses.asdict(settings.thresholds),
          "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
          "jax": jax.__version__, **configs}


def markdown(summary: dict, settings: Settings) -> str:
  g, t = settings.grid, settings.thresholds
  unigram = summary["reference"]["unigram_loss"]
  lines = [
      "# Stability map", "",
      f"{len(g.variants)} variants x {len(g.depths)} depths x {len(g.learning_rates)} learning "
      f"rates x {len(g.seeds)} seed(s), {settings.loop.steps} steps each, logged every "
      f"{settings.loop.log_every} step(s) (preset `{summary['settings']['preset']}`; all "
      "settings in `summary.json`).", "",
      f"**Failed** means, by thresholds the preset states before the runs, counted from step "
      f"1: a non-finite value was logged or an update skipped (`LoopConfig.nonfinite = "
      f"\"skip\"` drops it and counts it); or the train loss's {t.surge_window}-step moving "
      f"average rose more than {t.loss_surge_margin:g} nats above its running minimum at a "
      f"step >= {t.surge_after}; or the final loss on the whole validation split is within "
      f"{t.collapse_margin:g} nats of the unigram loss of the same tokens, {unigram:.3f} (or "
      "above it). Gradient-norm surges (the geometric moving average above "
      f"{t.grad_surge_ratio:g}x its running minimum) are in `summary.json`, not failures. The "
      "reasons of each run are `why_failed` in `summary.json`. A cell is marked failed when "
      "any of its seeds is; otherwise it shows the mean final eval loss over its seeds and, "
      "in brackets (in the figure: under it), their range.",
      "", f"![stability map]({FIGURE})", ""]
  for variant in g.variants:
    lines += [f"## {variant}", ""] + _table(g, variant, summary, _cell_text) + [""]
  lines += ["## Composite backward gain", "",
            "The largest over sub-layers of the composite backward gain of the H_res product, "
            "logged every `LoopConfig.diagnostics_every` = "
            f"{summary['settings']['loop']['diagnostics_every']} steps: at the last step, and "
            "in brackets its peak over training; the worst seed of each cell.", "",
            f"![composite backward gain by depth]({GAIN_FIGURE})", ""]
  for variant in g.variants:
    if any(c["composite_backward_gain"] for c in summary["cells"] if c["variant"] == variant):
      lines += [f"### {variant}", ""] + _table(g, variant, summary, _gain_text) + [""]
  if "confirm" in summary:
    lines += _confirm_lines(summary["confirm"])
  return "\n".join(lines)


def _table(g: Grid, variant: str, summary: dict, text) -> list[str]:
  """Depth x learning rate of one variant, each cell's `text(cell, runs)`."""
  lines = ["| depth | " + " | ".join(f"lr {lr:g}" for lr in g.learning_rates) + " |",
           "|---:|" + "---:|" * len(g.learning_rates)]
  for depth in g.depths:
    row = [c for c in summary["cells"] if (c["variant"], c["depth"]) == (variant, depth)]
    lines.append(f"| {depth} | " + " | ".join(text(c, summary["runs"]) for c in row) + " |")
  return lines


def _cell_text(cell: dict, runs: list[dict]) -> str:
  if cell["final_eval_loss"] is not None:
    low, high = cell["seed_range"]
    return f"{cell['final_eval_loss']:.3f}" + (f" ({low:.3f}–{high:.3f})" if cell["seeds"] > 1
                                                else "")
  skipped = sum(r["skipped_updates"] for r in runs if (r["variant"], r["depth"],
                r["learning_rate"]) == (cell["variant"], cell["depth"], cell["learning_rate"]))
  seeds = "" if cell["seeds"] == 1 else f" {cell['failed_seeds']}/{cell['seeds']}"
  return f"failed{seeds}" + (f" ({skipped} skipped)" if skipped else "")


def _gain_text(cell: dict, runs: list[dict]) -> str:
  gain = cell["composite_backward_gain"]
  return f"{gain['final']:.3g} ({gain['peak']:.3g})"


def _confirm_lines(confirm: dict) -> list[str]:
  lines = ["## Confirm phase", ""]
  if confirm["learning_rate"] is None:
    return lines + [f"hc failed at no learning rate at {confirm['depth']} blocks: nothing to "
                    "confirm.", ""]
  lines += [f"At {confirm['depth']} blocks and learning rate {confirm['learning_rate']:g}, the "
            f"lowest where a seed of hc failed in the map: {confirm['seeds']} seeds per arm. "
            "p: Fisher's exact test (two-sided) of the arm's failures against the other's. "
            "The final eval loss is that of the runs that did not fail (mean ± std); the "
            "peak composite backward gain, the median and the largest over the arm's runs.", "",
            "| arm | failures | seeds failed | p vs prenorm | p vs hc | final eval loss, "
            "runs not failed | peak composite backward gain, median (largest) |",
            "|---|---:|---|---:|---:|---:|---:|"]
  for arm, entry in confirm["arms"].items():
    p = [f"{entry['fisher'][other]['p']:.3g}" if other in entry["fisher"] else "—"
         for other in TESTED_AGAINST]
    loss, gain = entry["trained_loss"], entry["peak_gain"]
    loss_text = "—" if loss is None else f"{loss['mean']:.3f}" + (
        "" if loss["std"] is None else f" ± {loss['std']:.3f}")
    gain_text = "—" if gain is None else f"{gain['median']:.3g} ({gain['max']:.3g})"
    seeds = ", ".join(map(str, entry["failed_seeds"])) or "—"
    lines.append(f"| {arm} | {entry['failed']}/{entry['runs']} | {seeds} | " + " | ".join(p)
                 + f" | {loss_text} | {gain_text} |")
  return lines + [""]


def run_experiment(settings: Settings, runs_dir: pathlib.Path, progress: bool) -> dict:
  """Trains the map, then the confirm phase where it has one; -> the summary (without the
  settings)."""
  reference = validation_reference(settings.data)  # before training: a bad source trains none
  unigram = reference["unigram_loss"]
  train_runs(settings, settings.runs(), runs_dir, progress)
  runs = [run_result(settings, runs_dir, key, unigram) for key in settings.runs()]
  summary = {"reference": reference, "runs": runs, "cells": cells(settings, runs)}
  if settings.grid.confirm_seeds:
    lr = confirm_rate(settings, runs)
    confirm = {"depth": settings.grid.confirm_depth, "learning_rate": lr,
               "seeds": settings.grid.confirm_seeds}
    if lr is not None:
      keys = settings.confirm_runs(lr)
      train_runs(settings, keys, runs_dir, progress)
      confirm_runs = [run_result(settings, runs_dir, key, unigram) for key in keys]
      confirm.update(arms=confirm_summary(confirm_runs), runs=confirm_runs)
    summary["confirm"] = confirm
  return summary


def write_report(out: pathlib.Path, settings: Settings, preset: str, summary: dict) -> None:
  summary = {"settings": settings_summary(settings, preset), **summary}
  plot_map(out / FIGURE, settings, summary["cells"])
  plot_gains(out / GAIN_FIGURE, settings, summary["cells"])
  # allow_nan: a failed run's losses may be NaN or infinite; JSON readers such as Python's
  # take the NaN / Infinity they are written as.
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  (out / "report.md").write_text(markdown(summary, settings))


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="stability_map", description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="stability_map",
                      help="name in gin_configs/compare/ or a .gin path")
  parser.add_argument("--out", required=True, help="report folder; runs go to OUT/runs/")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding applied after the preset (repeatable), e.g. "
                           "'Grid.depths = [4, 8]'")
  parser.add_argument("--no_progress", action="store_true", help="no per-step progress bar")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    settings = load_settings(args.preset, args.gin_param)
  except Exception as err:  # gin and the configs raise many types; each means a bad setting
    print(f"stability_map: {one_line(err)}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  use_compilation_cache(out / "runs")
  try:
    summary = run_experiment(settings, out / "runs", progress=not args.no_progress)
    write_report(out, settings, args.preset, summary)
  except Stopped as stopped:
    print(stopped, file=sys.stderr)
    return 0
  except ValueError as err:
    print(f"stability_map: {err}", file=sys.stderr)
    return 2
  print(f"report: {out / 'report.md'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
