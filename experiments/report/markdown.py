"""`report.md` of a residual comparison, from its summary (see `numbers.summarize`)."""

import math

from experiments.report.numbers import BASELINE, chosen_point
from experiments.report.thresholds import Thresholds


def _pm(stats: dict) -> str:
  std = "n/a" if math.isnan(stats["std"]) else f"{stats['std']:.4f}"
  return f"{stats['mean']:.4f} ± {std}"


def format_paired(delta: dict) -> str:
  """A paired difference as `mean [low, high]` (its 95% interval) and the difference these
  seeds detect with 80% power, or the mean alone."""
  if math.isnan(delta["ci95"]):
    return f"{delta['mean']:+.4f}"
  return (f"{delta['mean']:+.4f} [{delta['mean'] - delta['ci95']:+.4f}, "
          f"{delta['mean'] + delta['ci95']:+.4f}]; detects {delta['detectable']:.4f}")


def _table(summary: dict) -> list[str]:
  seeds = summary["settings"]["seeds"]
  lines = ["| variant | parameters | final val loss | Δ vs prenorm (paired, 95% CI) | per seed "
           f"({', '.join(map(str, seeds))}) | max gain single fwd / bwd | max gain composite "
           "fwd / bwd | peak composite gain fwd / bwd | skipped updates | loss / grad-norm "
           "surges per seed | failed seeds | tokens/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for variant, entry in summary["variants"].items():
    delta = entry["eval_loss_minus"].get(BASELINE)
    gains = entry.get("final_max_gain")
    single = composite = peak = "–"
    if gains:
      single = f"{gains['forward_gain']:.3g} / {gains['backward_gain']:.3g}"
      composite = f"{gains['composite_forward_gain']:.3g} / {gains['composite_backward_gain']:.3g}"
      peaks = entry["peak_max_gain"]
      peak = f"{peaks['composite_forward_gain']:.3g} / {peaks['composite_backward_gain']:.3g}"
    surge_counts = ", ".join(f"{len(s['train_loss'])} / {len(s['grad_norm'])}"
                             for s in entry["surges"].values())
    failed = ", ".join(seed for seed, why in entry["failed"].items() if why) or "none"
    per_seed = ", ".join(f"{v:.4f}" for v in entry["final_eval_loss"]["per_seed"].values())
    lines.append(f"| {variant} | {entry['num_params']:,} | {_pm(entry['final_eval_loss'])} | "
                 f"{format_paired(delta) if delta else '–'} | {per_seed} | {single} | "
                 f"{composite} | {peak} | {entry['skipped_updates']} | {surge_counts} | {failed} | "
                 f"{entry['tokens_per_sec_median']:,.0f} |")
  return lines


def _thresholds_text(summary: dict) -> str:
  """The surge and failure rule, with the numbers the preset stated before the runs."""
  t = Thresholds(**summary["settings"].get("thresholds", {}))
  return (f"Surges, counted from step {t.surge_after}: the training loss's {t.surge_window}-step "
          f"moving average rising more than {t.loss_surge_margin:g} nats above its running "
          f"minimum (the gradient norm's geometric one, {t.grad_surge_ratio:g} ×), a run of "
          "such steps counting once. Failed: a non-finite value or a skipped update, a loss "
          f"surge, or a final loss within {t.collapse_margin:g} nats of the unigram reference "
          "(`experiments/report/thresholds.py`).")


def _equivalence_lines(summary: dict) -> list[str]:
  """Per variant against pre-norm: TOST at the preset's margin, and the seeds its effect
  needs at this spread."""
  lines = []
  for variant, entry in summary["variants"].items():
    delta = entry["eval_loss_minus"].get(BASELINE, {})
    if "tost" in delta:
      tost, need = delta["tost"], delta["seeds_for_effect"]
      lines.append(f"- {variant} − {BASELINE}: equivalent within ±{tost['margin']:g} nats "
                   f"(TOST p = {tost['p']:.3f}): {'yes' if tost['equivalent'] else 'not shown'}; "
                   f"{need['seeds']} seeds would detect {need['effect']:g} nats with 80% power "
                   "at this spread.")
  return lines + [""] if lines else []


def _compute_lines(summary: dict) -> list[str]:
  """What each arm costs (`experiments/arms.py`'s facts) and how long its steps took here."""
  compute = summary["settings"].get("compute")
  if not compute:
    return []
  lines = ["### Compute per arm", "",
           "| arm | parameters | model MFLOPs / token | steps | total PFLOPs | matched ratio | "
           "training time (s, from tokens/s) |", "|---|---:|---:|---:|---:|---:|---:|"]
  for arm, facts in compute.items():
    tokens_per_sec = summary["variants"].get(arm, {}).get("tokens_per_sec_median", math.nan)
    ratio = f"{facts['ratio']:.4f} ({facts['target']})" if "ratio" in facts else "–"
    lines.append(f"| {arm} | {facts['parameters']:,} | {facts['flops_per_token'] / 1e6:.3f} | "
                 f"{facts['steps']} | {facts['total_flops'] / 1e15:.4f} | {ratio} | "
                 f"{facts['tokens'] / tokens_per_sec:,.0f} |")
  return lines + ["", "Model FLOPs per token: `mhc_jax.lm.flops` (matmuls, attention and the "
                  "hyper-connection sites' mixing and coefficients; forward and backward). "
                  "Matched ratio: the arm's total FLOPs (`@flops`) or parameters "
                  "(`@params`) over its target's. Training time: the arm's tokens over its "
                  "median tokens/s (evaluation left out).", ""]


def _reference_lines(reference: dict | None) -> list[str]:
  """What a model that learned nothing past token counts scores on the same tokens."""
  if reference is None:
    return []
  # A prepared corpus has no bigram reference (its pair counts would not scale).
  bigram = f", bigram {reference['bigram_loss']:.4f}" if "bigram_loss" in reference else ""
  return [f"Reference on the same tokens: unigram {reference['unigram_loss']:.4f}{bigram} "
          "nats / token (counted on the train split, add-one smoothing).", ""]


def _pairs_table(summary: dict) -> list[str]:
  variants = list(summary["variants"])
  lines = ["| row − column | " + " | ".join(variants) + " |",
           "|---|" + "---:|" * len(variants)]
  for variant, entry in summary["variants"].items():
    cells = [format_paired(entry["eval_loss_minus"][other]) if other != variant else "–"
             for other in variants]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
  return lines


def _rate(point: dict) -> str:
  """A sweep point's (or chosen) rate and, when not 1, its static maps' multiplier."""
  multiplier = point["static_map_lr_multiplier"]
  return f"{point['learning_rate']:g}" + ("" if multiplier == 1.0 else
                                           f" (static maps x{multiplier:g})")


def _own_best_lines(summary: dict) -> list[str]:
  if "sweep" not in summary:
    return []
  rates = ", ".join(f"{v} {_rate(e['chosen'])}" for v, e in summary["sweep"].items())
  return [f"Each variant at its own best learning rate from the sweep below: {rates}.", ""]


def _sweep_lines(summary: dict) -> list[str]:
  """The sweep's table and figure, a line for every variant with diverged points and one for
  every variant whose best stayed at an edge of its grid."""
  if "sweep" not in summary:
    return []
  s, sweep = summary["settings"], summary["sweep"]
  lines = ["## Learning-rate sweep", "",
           f"Every variant's peak learning rate on a log grid, each point at sweep seeds "
           f"{', '.join(map(str, s['sweep_seeds']))} (runs in `sweep/`); the chosen point has "
           "the lowest mean final validation loss. A best point at an edge of the grid "
           f"extended it by one log step there (up to {s['max_extensions']} extensions). Variants "
           "with static maps (HC) also sweep their maps' and scales' rate as a multiple of the "
           f"peak rate: x {', '.join(f'{m:g}' for m in s['static_map_lr_multipliers'])}. "
           "Data: `sweep.json`.", "",
           "| variant | rates swept | chosen rate | mean final val loss | strictly inside the "
           "grid | extensions |", "|---|---|---:|---:|---|---:|"]
  for variant, entry in sweep.items():
    lines.append(f"| {variant} | {', '.join(f'{r:g}' for r in entry['grid'])} | "
                 f"{_rate(entry['chosen'])} | "
                 f"{chosen_point(entry)['final_eval_loss']['mean']:.4f} | "
                 f"{'yes' if entry['inside'] else 'no'} | {entry['extensions']} |")
  lines.append("")
  for variant, entry in sweep.items():
    diverged = [_rate(p) for p in entry["points"]
                if not math.isfinite(p["final_eval_loss"]["mean"])]
    if diverged:
      lines += [f"{variant} diverged (a non-finite value stopped a run) at "
                f"{', '.join(diverged)}.", ""]
    if not entry["inside"]:
      edge = "lowest" if entry["edge"] == "low" else "highest"
      lines += [f"**{variant}: still best at the {edge} rate of its grid after "
                f"{entry['extensions']} extension(s): its optimum is not bracketed.**", ""]
  return [*lines, "![learning-rate sweep](sweep.png)", ""]


def _prenorm_best_lines(summary: dict) -> list[str]:
  """The second comparison: every variant at the baseline's best rate."""
  if "prenorm_best" not in summary:
    return []
  arm = summary["prenorm_best"]
  table = {"settings": summary["settings"], "variants": arm["variants"]}
  return [f"## All at {BASELINE}'s best rate", "",
          f"Every variant at learning rate {arm['learning_rate']:g}, {BASELINE}'s best, with no "
          "static-map multiplier (runs in `runs_prenorm_best/`, or the own-best run where the "
          "two are one, or the sweep's for a sweep seed); columns as above.", "",
          *_table(table), "", *_pairs_table(table), ""]


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
      f"{data['batch_size']} × {data['seq_len']} tokens each; the stream variants have "
      f"n = {s['num_streams']} streams where an arm does not set its own (`hc(num_streams=2)`).",
      "",
      "## Final validation loss",
      "",
      *_own_best_lines(summary),
      *_table(summary),
      "",
      *_equivalence_lines(summary),
      *_reference_lines(summary.get("reference")),
      "Final validation loss: every window of the validation split at the last step (the "
      "curves' `eval_loss` is a fixed subset spread over every held-out document, the same "
      "at every step and for every run). "
      "Mean ± sample standard deviation (ddof 1) over seeds. The initialisation and the data "
      "order follow the seed and are the same for every variant, and every run is evaluated on "
      "the same validation documents, so *Δ vs prenorm* (variant minus prenorm at the same "
      "seed) is the paired difference: its mean and, in brackets, the 95% confidence interval "
      "of that mean (Student's t over seeds; an interval that holds 0 does not tell the "
      "variants apart), then the smallest true difference these seeds would detect with 80% "
      "power at the 5% level, given the spread of the per-seed differences (noncentral t; "
      "summary.json also holds the unpaired Welch interval as `welch_ci95`). Gains: the "
      "largest over sub-layers, tokens and seeds at the last "
      "diagnostics step (1 for doubly-stochastic H_res); peak: the largest at any diagnostics "
      "step of training. Skipped updates: updates dropped because their loss, gradient or "
      "new parameters were not finite (summed over seeds). "
      + _thresholds_text(summary) + " Tokens/s: median over logged steps (shared machines "
      "make it noisy).",
      "",
      *_compute_lines(summary),
      "### Every pair of variants",
      "",
      "Final validation loss of the row's variant minus the column's, paired by seed: mean "
      "[95% interval].",
      "",
      *_pairs_table(summary),
      "",
      *_prenorm_best_lines(summary),
      *_sweep_lines(summary),
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
