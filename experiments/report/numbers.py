"""The numbers of a residual comparison: runs grouped by variant, curves over seeds, the
summary (final losses on the whole validation split, paired differences to the baseline,
worst gains, the unigram / bigram reference) that `summary.json` holds."""

import dataclasses
import math

import numpy as np
from scipy import stats

from experiments.report import significance
from experiments.report.thresholds import Thresholds, failed, series, surges_of_run

BASELINE = "prenorm"
GAINS = ("forward_gain", "backward_gain", "composite_forward_gain", "composite_backward_gain")
REFERENCE_KEYS = ("unigram_loss", "bigram_loss")
# The defaults of `Comparison.equivalence_margin` and `.detectable_effect` (nats): the papers'
# effects are 0.02-0.03, so a difference within 0.02 is what "no difference" may claim.
EQUIVALENCE_MARGIN = DETECTABLE_EFFECT = 0.02  # what `mhc_jax.lm.train` logs at the end


@dataclasses.dataclass(frozen=True, eq=False)  # arrays have no value equality
class Run:
  """One trained (variant, seed).

  rows: its metrics.jsonl records. layer_cosine: `[L, L]` between blocks' outputs (streams
  summed). stream_cosine: `[L, n, n]` between the streams of each block's output, or None
  without streams. Both may be None where they were not measured (the curves and gains need
  only the rows); `summarize` needs them.
  """

  variant: str
  seed: int
  rows: list[dict]
  num_params: int
  layer_cosine: np.ndarray | None = None
  stream_cosine: np.ndarray | None = None


def by_variant(runs: list[Run]) -> dict[str, list[Run]]:
  """Runs grouped by variant, in first-seen order, each group in seed order."""
  groups = {}
  for run in runs:
    groups.setdefault(run.variant, []).append(run)
  return {v: sorted(group, key=lambda r: r.seed) for v, group in groups.items()}


def over_seeds(group: list[Run], key: str) -> tuple[np.ndarray, np.ndarray]:
  """-> (steps `[T]`, values `[seeds, T]`) at the steps every seed logged `key` at."""
  curves = [dict(zip(*series(run.rows, key))) for run in group]
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return np.array(steps, int), np.array([[c[s] for s in steps] for c in curves], float)


def last_value(rows: list[dict], key: str) -> float:
  return series(rows, key)[1][-1]


def final_eval_loss(rows: list[dict], name: str) -> float:
  """The loss on the whole validation split a run (`name` in the error) logged at its last
  step (`eval_loss` is a fixed subset's, comparable over steps)."""
  losses = series(rows, "final_eval_loss")[1]
  if not len(losses):
    raise ValueError(f"{name}: no final_eval_loss (no validation data, or trained before the "
                     "last step scored the whole validation split); delete its workdir to "
                     "retrain it")
  return float(losses[-1])


def final_loss(run: Run) -> float:
  return final_eval_loss(run.rows, f"{run.variant} seed {run.seed}")


def reference(runs: list[Run]) -> dict | None:
  """The unigram / bigram losses of the validation tokens the runs logged at their last
  step, one split for all of them (a prepared corpus logs no bigram: the unigram alone);
  None when they logged no unigram."""
  found = {r: tuple(r.rows[-1].get(key) for key in REFERENCE_KEYS) for r in runs}
  first = found[runs[0]]
  for run, values in found.items():
    if values != first:
      raise ValueError(f"{run.variant} seed {run.seed}: its unigram / bigram reference "
                       f"{values} differs from {runs[0].variant} seed {runs[0].seed}'s "
                       f"{first}: the runs were scored on different validation splits")
  if first[0] is None:
    return None
  return {**{key: value for key, value in zip(REFERENCE_KEYS, first) if value is not None},
          "what": "cross entropy of every target of the whole validation split under a "
                  "unigram (and, but for a prepared corpus, a bigram) model counted on the "
                  "train split, add-one smoothing"}


def has_streams(group: list[Run]) -> bool:
  """Stream variants log H_res gains (and have stream similarities where measured)."""
  return any(f"{GAINS[0]}/max" in row for row in group[0].rows)


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof 1; NaN for one value)."""
  values = np.asarray(values, float)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
  return {"mean": float(np.mean(values)), "std": std}


def paired_difference(deltas) -> dict:
  """Mean and sample standard deviation of per-seed differences, and the half-width of the
  mean's 95% confidence interval from Student's t with seeds - 1 degrees of freedom (NaN for
  one seed): seeds are few, so the normal 1.96 would claim too much."""
  entry = mean_std(deltas)
  n = len(deltas)
  entry["ci95"] = (float(stats.t.ppf(0.975, n - 1) * entry["std"] / math.sqrt(n))
                   if n > 1 else math.nan)
  if n > 1:  # the true difference these seeds detect with 80% power, at this spread
    entry["detectable"] = significance.minimal_detectable_effect(entry["std"], n)
  return entry


def compared(ours: list[float], theirs: list[float], margin: float = EQUIVALENCE_MARGIN,
             effect: float = DETECTABLE_EFFECT) -> dict:
  """Final losses of two variants at the same seeds (in order): the paired difference, its
  unpaired (Welch) interval beside it (pairing helps only when seeds' losses correlate), the
  equivalence test within +-`margin` (TOST), and the seeds that would detect `effect` with
  80% power at this spread."""
  deltas = [a - b for a, b in zip(ours, theirs)]
  entry = paired_difference(deltas)
  if len(ours) > 1:
    entry["welch_ci95"] = significance.welch_difference(ours, theirs)["ci"]
  if len(ours) > 1 and entry["std"] > 0:
    entry["tost"] = significance.tost(deltas, margin)
    entry["seeds_for_effect"] = {"effect": effect, "seeds": significance.seeds_for_effect(
        entry["std"], effect)}
  return entry


def peak(group: list[Run], key: str) -> float:
  """The largest value `key` took at any logged step of any run of the group."""
  return float(np.max(np.concatenate([series(r.rows, key)[1] for r in group])))


def summarize(runs: list[Run], settings: dict,
              thresholds: Thresholds = Thresholds()) -> dict:
  """The report's numbers per variant; `settings` is stored alongside as given. Each seed's
  surges and whether it failed are `thresholds`' (`experiments/report/thresholds.py`), with
  the unigram loss of the validation tokens for a collapse (NaN without a reference)."""
  groups = by_variant(runs)
  unigram = (reference(runs) or {}).get("unigram_loss", math.nan)
  final = {v: {r.seed: final_loss(r) for r in g} for v, g in groups.items()}
  variants = {}
  for variant, group in groups.items():
    entry = {"num_params": group[0].num_params,
             "final_eval_loss": {**mean_std(list(final[variant].values())),
                                 "per_seed": {str(s): v for s, v in final[variant].items()}},
             "skipped_updates": int(sum(last_value(r.rows, "skipped_steps") for r in group)),
             "surges": {str(r.seed): surges_of_run(r.rows, thresholds) for r in group},
             "failed": {str(r.seed): failed(r.rows, unigram, thresholds) for r in group},
             "tokens_per_sec_median": float(np.median(np.concatenate(
                 [series(r.rows, "tokens_per_sec")[1] for r in group])))}
    # Same seed, same data order and validation set: the difference cancels what they share.
    entry["eval_loss_minus"] = {
        other: compared(list(final[variant].values()), [final[other][s] for s in final[variant]],
                        settings.get("equivalence_margin", EQUIVALENCE_MARGIN),
                        settings.get("detectable_effect", DETECTABLE_EFFECT))
        for other in groups if other != variant}
    if has_streams(group):
      # Worst case over seeds: a gain that explodes in one seed is what stability is about.
      entry["final_max_gain"] = {
          g: float(np.max([last_value(r.rows, f"{g}/max") for r in group])) for g in GAINS}
      # A gain that exploded mid-run and settled again is invisible at the end.
      entry["peak_max_gain"] = {g: peak(group, f"{g}/max") for g in GAINS}
    variants[variant] = entry
  return {"settings": settings, "reference": reference(runs), "variants": variants,
          "runs": [{"variant": r.variant, "seed": r.seed,
                    "final_eval_loss": final[r.variant][r.seed],
                    "layer_cosine": r.layer_cosine.tolist(),
                    "stream_cosine": None if r.stream_cosine is None else
                    r.stream_cosine.tolist()} for r in runs]}


def chosen_point(entry: dict) -> dict:
  """The point of a variant's sweep entry (see `compare_residuals.sweep_variant`) it chose."""
  chosen = entry["chosen"]
  return next(p for p in entry["points"] if p["learning_rate"] == chosen["learning_rate"] and
              p["static_map_lr_multiplier"] == chosen["static_map_lr_multiplier"])


def prenorm_best_summary(runs: list[Run], settings: dict, sweep: dict,
                         thresholds: Thresholds = Thresholds()) -> dict:
  """The second comparison's numbers: every variant at the baseline's best rate."""
  arm = summarize(runs, settings, thresholds)
  return {"learning_rate": sweep[BASELINE]["chosen"]["learning_rate"],
          "variants": arm["variants"], "runs": arm["runs"]}


def jsonable(x):
  """Non-finite floats as "nan" / "inf" / "-inf", as `mhc_jax.lm.metrics` writes them."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [jsonable(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x
