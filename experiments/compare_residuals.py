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
import pathlib
import sys

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import report
from experiments.runs import (configs_json, devices_for, diagnostics_every, final_params,
                             preset_path, train_or_reuse, use_compilation_cache)
from mhc_jax.lm import distributed, presets, train as train_lib
from mhc_jax.lm.data import Corpus, DataConfig
from mhc_jax.checks import check_int, one_line
from mhc_jax.diagnostics import layer_cosine_similarity, stream_cosine_similarity
from mhc_jax.lm.metrics import read_metrics
from mhc_jax.lm.residuals import RESIDUALS, with_residual
from mhc_jax.lm.model import ModelConfig, Transformer, per_layer
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.streams import reduce_streams
from mhc_jax.lm.train_state import Trainer
from mhc_jax.lm.train import LoopConfig


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Comparison:
  """variants: names in `residuals.RESIDUALS`. seeds: one run per variant and seed.
  num_streams: n of the stream variants. gain_points: about how many steps log the H_res gains
  (`LoopConfig.diagnostics_every` = steps // gain_points). analysis_batches: validation batches
  the cosine similarities average over."""

  variants: tuple[str, ...] = tuple(RESIDUALS)
  seeds: tuple[int, ...] = (0, 1)
  num_streams: int = 4
  gain_points: int = 30
  analysis_batches: int = 4

  def __post_init__(self):
    # Lists (e.g. from gin or the command line) become tuples so the config stays hashable.
    object.__setattr__(self, "variants", tuple(self.variants))
    object.__setattr__(self, "seeds", tuple(self.seeds))
    unknown = set(self.variants) - set(RESIDUALS)
    if not self.variants or unknown or len(set(self.variants)) != len(self.variants):
      raise ValueError(f"variants must be distinct ones of {', '.join(RESIDUALS)}; got "
                       f"{list(self.variants)}")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct and at least one; got {list(self.seeds)}")
    for name in ("num_streams", "gain_points", "analysis_batches"):
      check_int(name, getattr(self, name))


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


def load_settings(preset: str, gin_params=(), variants=None, seeds=None) -> Settings:
  """Parses the preset, then `gin_params`; `variants` / `seeds` replace the preset's."""
  configs, _ = presets.parse([str(preset_path(preset))], gin_params,
                             extra={"comparison": Comparison})
  comparison = configs.pop("comparison")
  overrides = {k: v for k, v in (("variants", variants), ("seeds", seeds)) if v is not None}
  return Settings(dataclasses.replace(comparison, **overrides), **configs)


def run_name(variant: str, seed: int) -> str:
  return f"{variant}_seed{seed}"


def run_configs(settings: Settings, variant: str, seed: int) -> dict:
  """The `train` keyword arguments of one run."""
  loop = settings.loop
  return {
      "model": with_residual(settings.model, variant,
                             num_streams=settings.comparison.num_streams),
      "data": dataclasses.replace(settings.data, seed=seed),
      "optimizer": settings.optimizer,
      "mesh": settings.mesh,
      "loop": dataclasses.replace(
          loop, seed=seed, sample_tokens=0,
          diagnostics_every=diagnostics_every(loop.steps, settings.comparison.gain_points)),
  }


def train_runs(settings: Settings, runs_dir: pathlib.Path, progress: bool = True) -> None:
  """Trains (or resumes, or reuses) every variant and seed, one after another."""
  comparison = settings.comparison
  runs = [(runs_dir / run_name(v, s), run_configs(settings, v, s))
          for v in comparison.variants for s in comparison.seeds]
  train_or_reuse([(workdir, configs, configs) for workdir, configs in runs], "compare_residuals",
                 progress)


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


def analyse_runs(settings: Settings, runs_dir: pathlib.Path) -> list[report.Run]:
  """Reads every run's metrics and measures its final parameters on validation batches."""
  comparison, shard = settings.comparison, dict(shard_index=jax.process_index(),
                                                shard_count=jax.process_count())
  corpora = {seed: Corpus(run_configs(settings, comparison.variants[0], seed)["data"])
             for seed in comparison.seeds}  # the data depend on the seed only
  results = []
  for variant in comparison.variants:
    # One trainer and one compiled forward per variant: the seeds only change values.
    configs = run_configs(settings, variant, comparison.seeds[0])
    trainer = Trainer(configs["model"], configs["optimizer"], configs["mesh"], configs["loop"],
                      configs["data"].batch_size, devices_for(settings.mesh))
    measure = compiled_similarities(trainer)
    for seed in comparison.seeds:
      workdir = runs_dir / run_name(variant, seed)
      params = final_params(trainer, workdir, settings.loop.steps)
      batches = corpora[seed].validation_batches(comparison.analysis_batches, **shard)
      with jax.set_mesh(trainer.mesh):
        per_batch = [jax.device_get(measure(params, trainer.global_batch(b))) for b in batches]
      if not per_batch:
        raise ValueError(f"{workdir}: no validation batch to measure the similarities on")
      means = {k: np.mean([b[k] for b in per_batch], axis=0) for k in per_batch[0]}
      results.append(report.Run(variant, seed, read_metrics(workdir), trainer.num_params,
                                means["layers"], means.get("streams")))
  return results


def settings_summary(settings: Settings, preset: str) -> dict:
  """The settings the report states, JSON-ready: every run's configs, less what varies."""
  comparison = settings.comparison
  configs = configs_json(run_configs(settings, comparison.variants[0], comparison.seeds[0]))
  for group, key in (("model", "residual"), ("model", "residual_settings"), ("data", "seed"),
                     ("loop", "seed")):
    del configs[group][key]
  devices = devices_for(settings.mesh)
  return {
      "preset": preset,
      **dataclasses.asdict(comparison),
      "each seed sets": "LoopConfig.seed (initialisation) and DataConfig.seed (data order); "
                        "the validation split is DataConfig.split_seed's for every run",
      "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
      "jax": jax.__version__,
      **configs,
  }


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="compare_residuals", description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu",
                      help="name in gin_configs/compare/ (cpu, gpu, tpu_pod, stability) or a "
                           ".gin path")
  parser.add_argument("--out", required=True, help="report folder; runs go to OUT/runs/")
  parser.add_argument("--variants", help=f"comma list of {', '.join(RESIDUALS)} (default: the "
                                         "preset's)")
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
    settings = load_settings(args.preset, args.gin_param, _comma_list(args.variants, str.strip),
                             _comma_list(args.seeds, int))
  except Exception as err:  # gin and the configs raise many types; each means a bad setting
    print(f"compare_residuals: {one_line(err)}", file=sys.stderr)
    return 2
  if args.multihost:
    distributed.initialize()
  out = pathlib.Path(args.out)
  use_compilation_cache(out / "runs")
  try:
    train_runs(settings, out / "runs", progress=not args.no_progress)
    runs = analyse_runs(settings, out / "runs")
    if jax.process_index() == 0:  # the summary refuses runs it cannot compare
      report.write_report(out, runs, settings_summary(settings, args.preset))
      print(f"report: {out / 'report.md'}", flush=True)
  except (ValueError, train_lib.NonFiniteError) as err:
    print(f"compare_residuals: {err}", file=sys.stderr)
    return 2 if isinstance(err, ValueError) else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
