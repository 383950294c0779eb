"""A stability map: which learning rates and depths each residual variant trains at.

    python -m experiments.stability_map --preset stability_map --out reports/stability_map
        [--gin_param 'Grid.depths = [4, 8]'] [--gin_param 'LoopConfig.steps = 100']

A preset is `gin_configs/compare/NAME.gin` (or the path of any gin file): the train configs as
`mhc-train` takes them plus `Grid.*`, the variants, learning rates, depths and seeds to cross.
Every (variant, depth, learning rate, seed) trains once with `mhc_jax.lm.train.train` in
`OUT/runs/<variant>_L<depth>_lr<lr>_seed<k>/`, with `ModelConfig.residual`,
`ModelConfig.num_layers`, `OptimizerConfig.learning_rate` set to the cell's, and the seed in
`LoopConfig.seed` and `DataConfig.seed`. `LoopConfig.nonfinite` is always "skip": an update with
a non-finite loss, gradient or parameter is dropped and counted, so a diverging run still
finishes and the map has every cell. As in every experiment (`experiments/runs.py`), a finished
run is reused, an unfinished one resumes, and a workdir trained with other configs is an error.

A run diverged when any of its updates was skipped, when its final train or eval loss is not
finite, or when either is not below ln(vocab_size) - 0.01: no better than guessing every token
uniformly, which a run that learns leaves within its first steps, and where a run whose
parameters blew up but stayed finite lands (its eval loss exactly ln(vocab_size), or its train
loss in the millions).

Written to OUT:
  stability_map.png  one panel per variant, learning rate (log) x depth; each cell coloured by
                     its final eval loss (mean over seeds) on one scale for all panels, or
                     hatched grey with an x where a seed diverged
  summary.json       the settings, every run (final losses, skipped updates, diverged) and
                     every cell
  report.md          the divergence rule, the figure and the map as tables
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys

import gin
import jax
import matplotlib

matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from experiments.runs import (configs_json, devices_for, preset_path,  # noqa: E402
                             train_or_reuse, use_compilation_cache)
from mhc_jax.checks import check_int, one_line  # noqa: E402
from mhc_jax.lm import presets  # noqa: E402
from mhc_jax.lm.data import DataConfig  # noqa: E402
from mhc_jax.lm.metrics import read_metrics  # noqa: E402
from mhc_jax.lm.model import ModelConfig  # noqa: E402
from mhc_jax.lm.optimizer import OptimizerConfig  # noqa: E402
from mhc_jax.lm.residuals import RESIDUALS, with_residual  # noqa: E402
from mhc_jax.lm.sharding import MeshConfig  # noqa: E402
from mhc_jax.lm.train import LoopConfig  # noqa: E402

FIGURE = "stability_map.png"
# How far below ln(vocab_size) a final loss must be to count as learning: a collapsed model's
# uniform predictions score ln(vocab_size) to within float error.
UNIFORM_MARGIN = 0.01
DPI = 110


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Grid:
  """variants: names in `residuals.RESIDUALS`. learning_rates: peak learning rates (the x
  axis). depths: blocks (`ModelConfig.num_layers`, the y axis). seeds: one run per cell and
  seed. num_streams: n of the stream variants."""

  variants: tuple[str, ...] = ("prenorm", "hc", "mhc")
  learning_rates: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
  depths: tuple[int, ...] = (4, 8, 16)
  seeds: tuple[int, ...] = (0,)
  num_streams: int = 4

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
    if not all(isinstance(lr, (int, float)) and 0 < lr < math.inf for lr in self.learning_rates):
      raise ValueError(f"learning_rates must be positive numbers; got {list(self.learning_rates)}")
    for depth in self.depths:
      check_int("depths", depth)
    check_int("num_streams", self.num_streams)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The grid and the train configs before a cell's values are set in them (`run_configs`)."""

  grid: Grid
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  loop: LoopConfig

  def runs(self) -> list[tuple[str, int, float, int]]:
    """Every (variant, depth, learning rate, seed), variant by variant."""
    g = self.grid
    return [(v, d, lr, s) for v in g.variants for d in g.depths for lr in g.learning_rates
            for s in g.seeds]


def load_settings(preset: str, gin_params=()) -> Settings:
  configs, _ = presets.parse([str(preset_path(preset))], gin_params, extra={"grid": Grid})
  return Settings(**configs)


def run_name(variant: str, depth: int, lr: float, seed: int) -> str:
  return f"{variant}_L{depth}_lr{lr:g}_seed{seed}"


def run_configs(settings: Settings, variant: str, depth: int, lr: float, seed: int) -> dict:
  """The `train` keyword arguments of one run."""
  return {
      "model": with_residual(dataclasses.replace(settings.model, num_layers=depth), variant,
                             num_streams=settings.grid.num_streams),
      "data": dataclasses.replace(settings.data, seed=seed),
      "optimizer": dataclasses.replace(settings.optimizer, learning_rate=lr),
      "mesh": settings.mesh,
      # "skip", whatever the preset says: "stop" would end the map at its first divergence.
      "loop": dataclasses.replace(settings.loop, seed=seed, sample_tokens=0, nonfinite="skip"),
  }


def train_runs(settings: Settings, runs_dir: pathlib.Path, progress: bool) -> None:
  """Trains (or resumes, or reuses) every run, one after another."""
  runs = [(runs_dir / run_name(*run), run_configs(settings, *run)) for run in settings.runs()]
  train_or_reuse([(workdir, configs, configs) for workdir, configs in runs], "stability_map",
                 progress)


def divergence(losses: dict[str, float], skipped: int, vocab_size: int) -> list[str]:
  """Why a run counts as diverged (see the module's docstring), given its final losses by
  name; empty when it did not."""
  reasons = [f"{skipped} skipped update(s)"] if skipped else []
  ceiling = math.log(vocab_size) - UNIFORM_MARGIN
  for name, loss in losses.items():
    if not math.isfinite(loss):
      reasons.append(f"non-finite final {name} loss")
    elif loss >= ceiling:
      reasons.append(f"final {name} loss {loss:.4g} not below ln(vocab) - {UNIFORM_MARGIN}")
  return reasons


def run_result(settings: Settings, runs_dir: pathlib.Path, variant: str, depth: int,
               lr: float, seed: int) -> dict:
  """One run's final numbers, read from its metrics."""
  workdir = runs_dir / run_name(variant, depth, lr, seed)
  last = read_metrics(workdir)[-1]
  if "final_eval_loss" not in last:  # the whole validation split's, at the last step
    raise ValueError(f"{workdir}: no final_eval_loss (no validation data, or trained before "
                     "the whole-split evaluation: delete that workdir to retrain it)")
  skipped = int(last["skipped_steps"])
  reasons = divergence({"train": last["train_loss"], "eval": last["final_eval_loss"]},
                       skipped, settings.model.vocab_size)
  return {"variant": variant, "depth": depth, "learning_rate": lr, "seed": seed,
          "run": workdir.name, "final_train_loss": last["train_loss"],
          "final_eval_loss": last["final_eval_loss"], "skipped_updates": skipped,
          "diverged": bool(reasons), "why_diverged": reasons}


def cells(settings: Settings, runs: list[dict]) -> list[dict]:
  """One entry per (variant, depth, learning rate): the mean final eval loss over its seeds and
  their range (lowest, highest), None where a seed diverged."""
  g, out = settings.grid, []
  for variant in g.variants:
    for depth in g.depths:
      for lr in g.learning_rates:
        group = [r for r in runs if (r["variant"], r["depth"], r["learning_rate"])
                 == (variant, depth, lr)]
        diverged = sum(r["diverged"] for r in group)
        losses = [r["final_eval_loss"] for r in group]
        out.append({"variant": variant, "depth": depth, "learning_rate": lr,
                    "seeds": len(group), "diverged_seeds": diverged,
                    "final_eval_loss": None if diverged else float(np.mean(losses)),
                    "seed_range": None if diverged else [min(losses), max(losses)]})
  return out


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
        label = "×" if c["seeds"] == 1 else f"× {c['diverged_seeds']}/{c['seeds']}"
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
  fig.suptitle(f"Final eval loss after {settings.loop.steps} steps (× hatched: diverged)", y=1.03)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  plt.close(fig)


def settings_summary(settings: Settings, preset: str) -> dict:
  """The settings every run shares, JSON-ready (what a cell sets is left out)."""
  configs = configs_json(run_configs(settings, *settings.runs()[0]))
  for group, key in (("model", "residual"), ("model", "residual_settings"),
                     ("model", "num_layers"), ("data", "seed"),
                     ("optimizer", "learning_rate"), ("loop", "seed")):
    del configs[group][key]
  devices = devices_for(settings.mesh)
  return {"preset": preset, **dataclasses.asdict(settings.grid),
          "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
          "jax": jax.__version__, **configs}


def markdown(summary: dict, settings: Settings) -> str:
  g, ceiling = settings.grid, math.log(settings.model.vocab_size)
  lines = [
      "# Stability map", "",
      f"{len(g.variants)} variants x {len(g.depths)} depths x {len(g.learning_rates)} learning "
      f"rates x {len(g.seeds)} seed(s), {settings.loop.steps} steps each "
      f"(preset `{summary['settings']['preset']}`; all settings in `summary.json`).", "",
      "**Diverged** means: an update was skipped (its loss, gradient or new parameters were "
      "not finite; `LoopConfig.nonfinite = \"skip\"` drops it and counts it), or the final "
      "train or eval loss is not finite or not below ln(vocab) - "
      f"{UNIFORM_MARGIN} = {ceiling - UNIFORM_MARGIN:.3f}: no better than guessing tokens "
      "uniformly, where a run whose parameters blew up but stayed finite ends. The reasons "
      "of each run are `why_diverged` in `summary.json`. A cell is marked diverged "
      "when any of its seeds is; otherwise it shows the mean final eval loss over its seeds and, "
      "in brackets (in the figure: under it), their range.",
      "", f"![stability map]({FIGURE})", ""]
  header = "| depth | " + " | ".join(f"lr {lr:g}" for lr in g.learning_rates) + " |"
  for variant in g.variants:
    lines += [f"## {variant}", "", header, "|---:|" + "---:|" * len(g.learning_rates)]
    for depth in g.depths:
      row = [c for c in summary["cells"] if (c["variant"], c["depth"]) == (variant, depth)]
      lines.append(f"| {depth} | " + " | ".join(_cell_text(c, summary["runs"]) for c in row)
                   + " |")
    lines.append("")
  return "\n".join(lines)


def _cell_text(cell: dict, runs: list[dict]) -> str:
  if cell["final_eval_loss"] is not None:
    low, high = cell["seed_range"]
    return f"{cell['final_eval_loss']:.3f}" + (f" ({low:.3f}–{high:.3f})" if cell["seeds"] > 1
                                                else "")
  skipped = sum(r["skipped_updates"] for r in runs if (r["variant"], r["depth"],
                r["learning_rate"]) == (cell["variant"], cell["depth"], cell["learning_rate"]))
  seeds = "" if cell["seeds"] == 1 else f" {cell['diverged_seeds']}/{cell['seeds']}"
  return f"diverged{seeds}" + (f" ({skipped} skipped)" if skipped else "")


def write_report(out: pathlib.Path, settings: Settings, preset: str) -> None:
  runs = [run_result(settings, out / "runs", *run) for run in settings.runs()]
  summary = {"settings": settings_summary(settings, preset), "runs": runs,
             "cells": cells(settings, runs)}
  plot_map(out / FIGURE, settings, summary["cells"])
  # allow_nan: a diverged run's losses may be NaN or infinite; JSON readers such as Python's
  # take the NaN / Infinity they are written as.
  (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  (out / "report.md").write_text(markdown(summary, settings))


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="stability_map", description=__doc__.splitlines()[0])
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
    train_runs(settings, out / "runs", progress=not args.no_progress)
    write_report(out, settings, args.preset)
  except ValueError as err:
    print(f"stability_map: {err}", file=sys.stderr)
    return 2
  print(f"report: {out / 'report.md'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
