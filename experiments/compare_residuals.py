"""Compare the residual variants of one model: train each over several seeds, then report.

    python -m experiments.compare_residuals --preset cpu --out reports/cpu
        [--variants prenorm,mhc] [--seeds 0,1] [--gin_param 'LoopConfig.steps = 100']

A preset is `gin_configs/compare/NAME.gin` (or the path of any gin file): the train configs as
`mhc-train` takes them (`ModelConfig.*`, `DataConfig.*`, ...) plus `Comparison.*`, which says
what to compare. Every (variant, seed) trains with `mhc_jax.lm.train.train` in
`OUT/runs/<variant>_seed<k>/`, with `ModelConfig.residual` = the variant and, for the stream
variants, `Comparison.num_streams` streams.

Seed k sets `LoopConfig.seed` (the initialisation) and `DataConfig.seed` (the data order):
both vary with the seed and are identical across variants. The validation documents are the
same for every run (`DataConfig.split_seed`, untouched by the seeds); differences between
variants at one seed are paired, and the report gives them next to the plain means.

With `Comparison.learning_rates` (a log grid of >= 4 peak rates), each variant first sweeps
them at `Comparison.sweep_seeds` in `OUT/sweep/<variant>_lr<rate>[_m<mult>]_seed<k>/` (HC's
static maps and scales also at each of `Comparison.static_map_lr_multipliers`); its best point
is the lowest mean final loss, and a best at an edge of the grid extends the grid by one log
step there, up to `Comparison.max_extensions` times. The seeds then run at each variant's own
best (`OUT/runs/`) and at prenorm's best rate (`OUT/runs_prenorm_best/`, where that differs;
a sweep seed's run at either is the sweep's, trained once), and the report shows both comparisons and the sweep's curves. Without it every run has the
optimizer's rate.

A finished run (`mhc_jax.lm.train.is_finished`) is reused; an unfinished one resumes where it
stopped. A workdir trained with other configs is an error, not reused (`experiments/runs.py`).

Then each run's final parameters are restored and run on the first validation batches; every
block's output gives the cosine similarity between layers (streams summed) and between streams.
`experiments/report/` writes `OUT/report.md`, `OUT/summary.json` and the plots. A run's final
loss is its `final_eval_loss`, every window of the validation split at the last step (the
curves' `eval_loss` is a fixed subset); summary.json's `reference` holds the unigram and bigram
losses of the same tokens, which the validation-loss plot draws as lines.
"""

import argparse
import dataclasses
import itertools
import math
import pathlib
import sys

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import arms, report
from experiments.report.thresholds import Thresholds
from experiments.runs import (configs_json, devices_for, diagnostics_every, final_params,
                             preset_path, Stopped, train_or_reuse, use_compilation_cache)
from mhc_jax.lm import distributed, presets, train as train_lib
from mhc_jax.lm.data import Corpus, DataConfig
from mhc_jax.checks import check_int, one_line
from mhc_jax.diagnostics import layer_cosine_similarity, stream_cosine_similarity
from mhc_jax.lm.metrics import read_metrics
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.model import ModelConfig, Transformer, per_layer
from mhc_jax.lm.optimizer import OptimizerConfig, static_map_mask
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.streams import reduce_streams
from mhc_jax.lm.train_state import Trainer
from mhc_jax.lm.train import LoopConfig


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Comparison:
  """variants: the arms, each a spec of `experiments/arms.py`: a name in `residuals.RESIDUALS`,
  an ablation (`hc(dynamic=False)`, `mhc(sinkhorn_iters=1)`), pre-norm trained for a stream
  variant's FLOPs (`prenorm@flops(mhc)`) or widened to its parameters (`prenorm@params(mhc)`).
  seeds: one run per arm and seed.
  num_streams: n of the stream variants. gain_points: about how many steps log the H_res gains
  (`LoopConfig.diagnostics_every` = steps // gain_points). analysis_batches: validation batches
  the cosine similarities average over.

  The learning-rate sweep (none when `learning_rates` is empty): learning_rates, a log grid of
  peak rates; sweep_seeds, the seeds of each point; max_extensions, how many times a best
  point at an edge extends the grid; static_map_lr_multipliers, swept with the rates for
  variants with static maps (`OptimizerConfig.static_map_lr_multiplier`).

  Stated before the runs: equivalence_margin, the margin (nats) within which the report tests
  each paired difference for equivalence (TOST); detectable_effect, the difference (nats) for
  which it gives the seeds that would detect it with 80% power at the spread observed."""

  variants: tuple[str, ...] = tuple(RESIDUALS)
  seeds: tuple[int, ...] = (0, 1)
  num_streams: int = 4
  gain_points: int = 30
  analysis_batches: int = 4
  equivalence_margin: float = report.numbers.EQUIVALENCE_MARGIN
  detectable_effect: float = report.numbers.DETECTABLE_EFFECT
  learning_rates: tuple[float, ...] = ()
  sweep_seeds: tuple[int, ...] = (0,)
  max_extensions: int = 2
  static_map_lr_multipliers: tuple[float, ...] = (1.0,)

  def __post_init__(self):
    # Lists (e.g. from gin or the command line) become tuples so the config stays hashable.
    for name in ("variants", "seeds", "learning_rates", "sweep_seeds",
                 "static_map_lr_multipliers"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    # Each an arm (`experiments/arms.py`), kept as its canonical spec.
    object.__setattr__(self, "variants", tuple(arms.parse_arm(v).spec for v in self.variants))
    if not self.variants or len(set(self.variants)) != len(self.variants):
      raise ValueError(f"variants must be distinct arms (e.g. {', '.join(RESIDUALS)}); got "
                       f"{list(self.variants)}")
    for name in ("seeds", "sweep_seeds"):
      seeds = getattr(self, name)
      if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"{name} must be distinct and at least one; got {list(seeds)}")
    for name in ("num_streams", "gain_points", "analysis_batches"):
      check_int(name, getattr(self, name))
    check_int("max_extensions", self.max_extensions, minimum=0)
    for name in ("equivalence_margin", "detectable_effect"):
      if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
        raise ValueError(f"{name} must be > 0 (nats), got {getattr(self, name)!r}")
    multipliers = self.static_map_lr_multipliers
    if not multipliers or len(set(multipliers)) != len(multipliers) or \
        not all(m > 0 and math.isfinite(m) for m in multipliers):
      raise ValueError("static_map_lr_multipliers must be distinct, positive and at least one; "
                       f"got {list(multipliers)}")
    if self.learning_rates:
      check_log_grid(self.learning_rates)
      if report.BASELINE not in self.variants:
        raise ValueError(f"a learning-rate sweep needs {report.BASELINE!r} among the variants "
                         "(the second comparison runs every variant at its best rate)")

  @property
  def sweeps(self) -> bool:
    return bool(self.learning_rates)


# A grid's log steps may differ by this fraction of their mean: a 1, 3, 10, 30 grid is one.
LOG_STEP_TOLERANCE = 0.1
MIN_GRID = 4


def check_log_grid(rates) -> None:
  """One-line ValueError unless `rates` are >= MIN_GRID positive increasing rates evenly
  spaced in log (within LOG_STEP_TOLERANCE)."""
  shown = ", ".join(f"{r:g}" for r in rates)
  if len(rates) < MIN_GRID:
    raise ValueError(f"learning_rates needs at least {MIN_GRID} rates for a sweep; got "
                     f"[{shown}]")
  if not all(r > 0 and math.isfinite(r) for r in rates):
    raise ValueError(f"learning_rates must be positive; got [{shown}]")
  steps = np.diff(np.log(rates))
  if not np.all(steps > 0):
    raise ValueError(f"learning_rates must increase; got [{shown}]")
  if np.max(np.abs(steps - steps.mean())) > LOG_STEP_TOLERANCE * steps.mean():
    raise ValueError(f"learning_rates must be evenly spaced in log (e.g. 1e-3, 3e-3, 1e-2, "
                     f"3e-2); got [{shown}]")


def grid_edge(grid: tuple[float, ...], rate: float) -> str | None:
  """"low" or "high" when `rate` is the grid's lowest or highest, else None."""
  return {grid[0]: "low", grid[-1]: "high"}.get(rate)


def extended_grid(grid: tuple[float, ...], edge: str) -> tuple[float, ...]:
  """`grid` with one more rate past `edge`, one step of the grid's pattern further: the
  ratio two steps in (a 1, 3, 10 grid goes on to 30 and 100); rounded to 3 digits."""
  if edge == "high":
    return (*grid, float(f"{grid[-1] * grid[-2] / grid[-3]:.3g}"))
  return (float(f"{grid[0] * grid[1] / grid[2]:.3g}"), *grid)


def best_point(means: dict) -> object:
  """The key of the lowest finite mean loss (a diverged point's is not); the first of
  equals."""
  finite = {point: mean for point, mean in means.items() if math.isfinite(mean)}
  if not finite:
    raise ValueError(f"no finite final loss at any point of the sweep {list(means)}: every "
                     "rate diverged; sweep lower rates")
  return min(finite, key=finite.get)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a comparison depends on: the train configs before the variant and the seed
  are set in them (`run_configs`)."""

  comparison: Comparison
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  loop: LoopConfig
  thresholds: Thresholds = Thresholds()


def load_settings(preset: str, gin_params=(), variants=None, seeds=None) -> Settings:
  """Parses the preset, then `gin_params`; `variants` / `seeds` replace the preset's."""
  configs, _ = presets.parse([str(preset_path(preset))], gin_params,
                             extra={"comparison": Comparison, "thresholds": Thresholds})
  comparison = configs.pop("comparison")
  overrides = {k: v for k, v in (("variants", variants), ("seeds", seeds)) if v is not None}
  return Settings(dataclasses.replace(comparison, **overrides), **configs)


def run_name(variant: str, seed: int) -> str:
  return f"{arms.arm_dirname(arms.parse_arm(variant))}_seed{seed}"


def base_configs(settings: Settings) -> dict:
  """The preset's train configs, before an arm and a seed are set in them."""
  return {"model": settings.model, "data": settings.data, "optimizer": settings.optimizer,
          "mesh": settings.mesh, "loop": settings.loop}


def run_configs(settings: Settings, variant: str, seed: int,
                optimizer: OptimizerConfig | None = None) -> dict:
  """The `train` keyword arguments of one run of arm `variant`; `optimizer` (the sweep's)
  gives its learning rate and static-map multiplier."""
  configs = arms.arm_configs(arms.parse_arm(variant), base_configs(settings),
                             settings.comparison.num_streams)
  loop = configs["loop"]
  if optimizer is not None:
    configs["optimizer"] = dataclasses.replace(
        configs["optimizer"], learning_rate=optimizer.learning_rate,
        static_map_lr_multiplier=optimizer.static_map_lr_multiplier)
  return {
      **configs,
      "data": dataclasses.replace(configs["data"], seed=seed),
      "loop": dataclasses.replace(
          loop, seed=seed, sample_tokens=0,
          diagnostics_every=diagnostics_every(loop.steps, settings.comparison.gain_points)),
  }


def variant_model(settings: Settings, variant: str) -> ModelConfig:
  return run_configs(settings, variant, settings.comparison.seeds[0])["model"]


def has_static_maps(model: ModelConfig) -> bool:
  """Whether the model has Variables tagged `static_map` (HC's static maps and scales)."""
  abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
  return any(jax.tree.leaves(static_map_mask(nnx.state(abstract))))


# Where each (variant, seed) of a plan trains, and how: {(variant, seed): (workdir, configs)}.
Plan = dict[tuple[str, int], tuple[pathlib.Path, dict]]


def seed_plan(settings: Settings, runs_dir: pathlib.Path,
              optimizers: dict[str, OptimizerConfig] | None = None) -> Plan:
  """Every variant and seed in `runs_dir`, at its optimizer in `optimizers` (default: the
  settings')."""
  optimizers = optimizers or {}
  return {(v, s): (runs_dir / run_name(v, s), run_configs(settings, v, s, optimizers.get(v)))
          for v in settings.comparison.variants for s in settings.comparison.seeds}


def train_plan(runs, progress: bool = True) -> None:
  """Trains (or resumes, or reuses) every (workdir, configs) of `runs` (a plan's values), one
  after another."""
  train_or_reuse([(workdir, configs, configs) for workdir, configs in runs],
                 "compare_residuals", progress)


def sweep_name(variant: str, rate: float, multiplier: float, seed: int) -> str:
  shown = "" if multiplier == 1.0 else f"_m{multiplier:g}"
  return f"{arms.arm_dirname(arms.parse_arm(variant))}_lr{rate:g}{shown}_seed{seed}"


def sweep_optimizer(settings: Settings, rate: float, multiplier: float) -> OptimizerConfig:
  return dataclasses.replace(settings.optimizer, learning_rate=rate,
                             static_map_lr_multiplier=multiplier)


def sweep_loss(workdir: pathlib.Path, configs: dict, progress: bool) -> float:
  """Trains (or reuses) one point's run; -> its final loss, inf when it stopped at a
  non-finite value (a rate too high: the sweep goes on without it)."""
  try:
    train_plan([(workdir, configs)], progress)
  except train_lib.NonFiniteError as err:
    if jax.process_index() == 0:
      print(f"{workdir.name}: diverged ({err})", flush=True)
    return math.inf
  return report.final_eval_loss(read_metrics(workdir), workdir.name)


def sweep_variant(settings: Settings, variant: str, sweep_dir: pathlib.Path,
                  progress: bool = True) -> dict:
  """Trains the variant's sweep, extending its grid while the best point is at an edge;
  -> its entry of summary.json's `sweep`."""
  comparison = settings.comparison
  multipliers = (comparison.static_map_lr_multipliers
                 if has_static_maps(variant_model(settings, variant)) else (1.0,))
  grid = comparison.learning_rates
  for extensions in itertools.count():
    plan = {(rate, multiplier, seed): (
        sweep_dir / sweep_name(variant, rate, multiplier, seed),
        run_configs(settings, variant, seed, sweep_optimizer(settings, rate, multiplier)))
        for rate in grid for multiplier in multipliers for seed in comparison.sweep_seeds}
    losses = {key: sweep_loss(workdir, configs, progress)
              for key, (workdir, configs) in plan.items()}
    points = [{"learning_rate": rate, "static_map_lr_multiplier": multiplier,
               "final_eval_loss": {
                   "per_seed": {str(s): losses[rate, multiplier, s]
                                for s in comparison.sweep_seeds},
                   "mean": float(np.mean([losses[rate, multiplier, s]
                                          for s in comparison.sweep_seeds]))}}
              for rate in grid for multiplier in multipliers]
    rate, multiplier = best_point({(p["learning_rate"], p["static_map_lr_multiplier"]):
                                   p["final_eval_loss"]["mean"] for p in points})
    edge = grid_edge(grid, rate)
    if edge is None or extensions == comparison.max_extensions:
      return {"grid": list(grid), "static_map_lr_multipliers": list(multipliers),
              "points": points, "extensions": extensions, "edge": edge,
              "inside": edge is None,
              "chosen": {"learning_rate": rate, "static_map_lr_multiplier": multiplier}}
    grid = extended_grid(grid, edge)


def chosen_optimizer(settings: Settings, chosen: dict) -> OptimizerConfig:
  return sweep_optimizer(settings, chosen["learning_rate"], chosen["static_map_lr_multiplier"])


def arm_plans(settings: Settings, sweep: dict, out: pathlib.Path) -> tuple[Plan, Plan]:
  """The seeds' runs at each variant's own best (`OUT/runs/`) and at prenorm's best rate with
  no multiplier (`OUT/runs_prenorm_best/`, or the own-best run where the two are one). A run
  the sweep already trained (a sweep seed at one of its points: the same configs) is the
  sweep's, not trained again."""
  own = {v: chosen_optimizer(settings, entry["chosen"]) for v, entry in sweep.items()}
  baseline_rate = sweep[report.BASELINE]["chosen"]["learning_rate"]
  at_baseline = {v: sweep_optimizer(settings, baseline_rate, 1.0) for v in sweep}
  swept = {(v, s, p["learning_rate"], p["static_map_lr_multiplier"]):
           out / "sweep" / sweep_name(v, p["learning_rate"], p["static_map_lr_multiplier"], s)
           for v, entry in sweep.items() for p in entry["points"]
           for s, loss in p["final_eval_loss"]["per_seed"].items() if math.isfinite(loss)}

  def plan_at(runs_dir: pathlib.Path, optimizers: dict) -> Plan:
    return {(v, s): (swept.get((v, str(s), optimizers[v].learning_rate,
                                optimizers[v].static_map_lr_multiplier), workdir), configs)
            for (v, s), (workdir, configs) in seed_plan(settings, runs_dir, optimizers).items()}

  own_plan = plan_at(out / "runs", own)
  baseline_plan = plan_at(out / "runs_prenorm_best", at_baseline)
  return own_plan, {key: own_plan[key] if at_baseline[key[0]] == own[key[0]] else run
                    for key, run in baseline_plan.items()}


def block_outputs(model: Transformer, tokens: jax.Array) -> jax.Array:
  """`[B, S]` tokens -> every block's output, `[L, B, S, C]`, or `[L, B, S, n, C]` with
  streams."""
  _, intermediates = nnx.capture(model, nnx.Intermediate,
                                 method_outputs=nnx.Intermediate)(tokens)
  return per_layer(model, nnx.to_pure_dict(intermediates)["blocks"], "__call__", 0)


def similarities(model: Transformer, tokens: jax.Array) -> dict[str, jax.Array]:
  """`[B, S]` tokens -> "layers" `[L, L]` (cosine between blocks' outputs, streams summed)
  and, with streams, "streams" `[L, n, n]` (cosine between the streams of each block's
  output), both averaged over the tokens."""
  outputs = block_outputs(model, tokens)
  if not model.cfg.uses_streams:
    return {"layers": layer_cosine_similarity(outputs)}
  return {"layers": layer_cosine_similarity(reduce_streams(outputs)),
          "streams": jax.vmap(stream_cosine_similarity)(outputs)}


def compiled_similarities(trainer: Trainer):
  """`(params, batch)` -> `similarities` of the model, replicated so every process can read
  them."""
  return jax.jit(lambda params, batch: similarities(nnx.merge(trainer.graphdef, params),
                                                    batch["inputs"]),
                 out_shardings=NamedSharding(trainer.mesh, P()))


def analyse_runs(settings: Settings, plan: Plan) -> list[report.Run]:
  """Reads every run's metrics and measures its final parameters on validation batches."""
  comparison, shard = settings.comparison, dict(shard_index=jax.process_index(),
                                                shard_count=jax.process_count())
  corpora = {seed: Corpus(run_configs(settings, comparison.variants[0], seed)["data"])
             for seed in comparison.seeds}  # the data depend on the seed only
  results = []
  for variant in dict.fromkeys(v for v, _ in plan):
    # One trainer and one compiled forward per variant: the seeds only change values.
    runs = {seed: run for (v, seed), run in plan.items() if v == variant}
    configs = next(iter(runs.values()))[1]
    trainer = Trainer(configs["model"], configs["optimizer"], configs["mesh"], configs["loop"],
                      configs["data"].batch_size, devices_for(settings.mesh))
    measure = compiled_similarities(trainer)
    for seed, (workdir, _) in runs.items():
      params = final_params(trainer, workdir, configs["loop"].steps)
      batches = corpora[seed].validation_batches(comparison.analysis_batches, **shard)
      with jax.set_mesh(trainer.mesh):
        per_batch = [jax.device_get(measure(params, trainer.global_batch(b))) for b in batches]
      if not per_batch:
        raise ValueError(f"{workdir}: no validation batch to measure the similarities on")
      means = {k: np.mean([b[k] for b in per_batch], axis=0) for k in per_batch[0]}
      results.append(report.Run(variant, seed, read_metrics(workdir), trainer.num_params,
                                means["layers"], means.get("streams")))
  return results


def analyse_arms(settings: Settings, own: Plan, at_baseline: Plan) -> tuple[list, list]:
  """`analyse_runs` of both arms, measuring a run the two share once."""
  own_runs = analyse_runs(settings, own)
  measured = {own[r.variant, r.seed][0]: r for r in own_runs}
  others = analyse_runs(settings, {k: run for k, run in at_baseline.items()
                                   if run[0] not in measured})
  measured |= {at_baseline[r.variant, r.seed][0]: r for r in others}
  return own_runs, [measured[workdir] for workdir, _ in at_baseline.values()]


def settings_summary(settings: Settings, preset: str) -> dict:
  """The settings the report states, JSON-ready: every run's configs, less what varies."""
  comparison = settings.comparison
  configs = configs_json(run_configs(settings, comparison.variants[0], comparison.seeds[0]))
  varying = [("model", "residual"), ("model", "residual_settings"), ("data", "seed"),
             ("loop", "seed")]
  if comparison.sweeps:  # each variant's rates are in the sweep's entry
    varying += [("optimizer", "learning_rate"), ("optimizer", "static_map_lr_multiplier")]
  for group, key in varying:
    del configs[group][key]
  devices = devices_for(settings.mesh)
  fields = dataclasses.asdict(comparison)
  if not comparison.sweeps:  # the report of a comparison without one, as before the sweep
    for name in SWEEP_FIELDS:
      del fields[name]
  return {
      "preset": preset,
      **fields,
      "each seed sets": "LoopConfig.seed (initialisation) and DataConfig.seed (data order); "
                        "the validation split is DataConfig.split_seed's for every run",
      "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
      "jax": jax.__version__,
      "thresholds": dataclasses.asdict(settings.thresholds),
      # What each arm costs: parameters, model FLOPs per token, steps, tokens, total FLOPs.
      "compute": {v: arms.arm_facts(arms.parse_arm(v), base_configs(settings),
                                    comparison.num_streams) for v in comparison.variants},
      **configs,
  }


SWEEP_FIELDS = ("learning_rates", "sweep_seeds", "max_extensions", "static_map_lr_multipliers")


def compare(settings: Settings, out: pathlib.Path, preset: str, progress: bool) -> None:
  """Trains the sweep (if any) and the seeds, analyses them, writes the report."""
  sweep = ({v: sweep_variant(settings, v, out / "sweep", progress)
            for v in settings.comparison.variants} if settings.comparison.sweeps else None)
  own, at_baseline = (arm_plans(settings, sweep, out) if sweep else
                      (seed_plan(settings, out / "runs"), {}))
  train_plan(own.values(), progress)
  train_plan([run for key, run in at_baseline.items() if run[0] != own[key][0]], progress)
  own_runs, baseline_runs = analyse_arms(settings, own, at_baseline)
  if jax.process_index() == 0:  # the summary refuses runs it cannot compare
    report.write_report(out, own_runs, settings_summary(settings, preset), sweep=sweep,
                        prenorm_best=baseline_runs)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="compare_residuals", description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu",
                      help="name in gin_configs/compare/ (cpu, gpu, tpu_pod, stability) or a "
                           ".gin path")
  parser.add_argument("--out", required=True, help="report folder; runs go to OUT/runs/")
  parser.add_argument("--variants", help=f"comma list of arms: {', '.join(RESIDUALS)}, "
                                         "ablations such as 'hc(dynamic=False)', "
                                         "'prenorm@flops(mhc)' (default: the preset's)")
  parser.add_argument("--seeds", help="comma list of ints, e.g. 0,1 (default: the preset's)")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding applied after the preset (repeatable)")
  parser.add_argument("--multihost", action="store_true",
                      help="call jax.distributed.initialize() first (every host of a pod runs "
                           "this same command; OUT must be shared storage)")
  parser.add_argument("--no_progress", action="store_true", help="no per-step progress bar")
  return parser.parse_args(argv)


def _comma_list(text: str | None, kind):
  return None if text is None else tuple(kind(x) for x in text.split(",") if x.strip())


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    variants = (None if args.variants is None else
                tuple(arm.spec for arm in arms.parse_arms(args.variants)))
    settings = load_settings(args.preset, args.gin_param, variants, _comma_list(args.seeds, int))
  except Exception as err:  # gin and the configs raise many types; each means a bad setting
    print(f"compare_residuals: {one_line(err)}", file=sys.stderr)
    return 2
  if args.multihost:
    distributed.initialize()
  out = pathlib.Path(args.out)
  use_compilation_cache(out / "runs")
  try:
    compare(settings, out, args.preset, progress=not args.no_progress)
    if jax.process_index() == 0:
      print(f"report: {out / 'report.md'}", flush=True)
  except Stopped as stopped:
    print(stopped, file=sys.stderr)
    return 0
  except (ValueError, train_lib.NonFiniteError) as err:
    print(f"compare_residuals: {err}", file=sys.stderr)
    return 2 if isinstance(err, ValueError) else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
