"""`report.md` of a residual comparison, from its summary (see `numbers.summarize`)."""

import math

from experiments.report.numbers import BASELINE, SPIKE_RATIOS, SPIKE_WINDOW


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
           "spikes per seed | tokens/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for variant, entry in summary["variants"].items():
    delta = entry["eval_loss_minus"].get(BASELINE)
    gains = entry.get("final_max_gain")
    single = composite = peak = "–"
    if gains:
      single = f"{gains['forward_gain']:.3g} / {gains['backward_gain']:.3g}"
      composite = f"{gains['composite_forward_gain']:.3g} / {gains['composite_backward_gain']:.3g}"
      peaks = entry["peak_max_gain"]
      peak = f"{peaks['composite_forward_gain']:.3g} / {peaks['composite_backward_gain']:.3g}"
    spike_counts = ", ".join(f"{loss} / {grad}" for loss, grad in zip(
        entry["train_loss_spikes"].values(), entry["grad_norm_spikes"].values()))
    per_seed = ", ".join(f"{v:.4f}" for v in entry["final_eval_loss"]["per_seed"].values())
    lines.append(f"| {variant} | {entry['num_params']:,} | {_pm(entry['final_eval_loss'])} | "
                 f"{format_paired(delta) if delta else '–'} | {per_seed} | {single} | "
                 f"{composite} | {peak} | {entry['skipped_updates']} | {spike_counts} | "
                 f"{entry['tokens_per_sec_median']:,.0f} |")
  return lines


def _reference_lines(reference: dict | None) -> list[str]:
  """What a model that learned nothing past token counts scores on the same tokens."""
  if reference is None:
    return []
  return [f"Reference on the same tokens: unigram {reference['unigram_loss']:.4f}, bigram "
          f"{reference['bigram_loss']:.4f} nats / token (counted on the train split, add-one "
          "smoothing).", ""]


def _pairs_table(summary: dict) -> list[str]:
  variants = list(summary["variants"])
  lines = ["| row − column | " + " | ".join(variants) + " |",
           "|---|" + "---:|" * len(variants)]
  for variant, entry in summary["variants"].items():
    cells = [format_paired(entry["eval_loss_minus"][other]) if other != variant else "–"
             for other in variants]
    lines.append(f"| {variant} | " + " | ".join(cells) + " |")
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
      "new parameters were not finite (summed over seeds). Spikes: logged training losses above "
      f"{SPIKE_RATIOS['train_loss']:g} × (gradient norms above {SPIKE_RATIOS['grad_norm']:g} ×) "
      f"the median of the {SPIKE_WINDOW} logged values before them, a run of such points "
      "counting once. Tokens/s: median over logged steps (shared machines make "
      "it noisy).",
      "",
      "### Every pair of variants",
      "",
      "Final validation loss of the row's variant minus the column's, paired by seed: mean "
      "[95% interval].",
      "",
      *_pairs_table(summary),
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
