"""What a comparison over few seeds can claim: intervals, equivalence and detectable effects.

All on final losses (lower is better), variant minus baseline, at a two-sided level `alpha`:

    paired (same seed, same shared weights and batches):  one-sample t on the per-seed deltas
    welch  (unpaired):                                    Welch's t, Welch-Satterthwaite df

`tost` is Schuirmann's two one-sided tests: the difference lies within +-margin when both
one-sided nulls (delta <= -margin, delta >= +margin) are rejected at `alpha`.
`minimal_detectable_effect` is the smallest true difference the two-sided t test detects
with probability `power` for a seed spread `std` (from a pilot), solved on the noncentral t;
`seeds_for_effect` is the fewest seeds whose detectable effect is at most a stated one.
`fisher_exact` compares two arms' counts of failed runs (the stability map's confirm phase).
"""

import math

import numpy as np
from scipy import optimize, stats


def welch_difference(a, b, alpha: float = 0.05) -> dict:
  """mean(a) - mean(b), the half-width of its (1 - alpha) interval, and the df."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
  df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
  half = stats.t.ppf(1 - alpha / 2, df) * math.sqrt(va + vb)
  return {"mean": float(a.mean() - b.mean()), "ci": float(half), "df": float(df)}


def tost(deltas, margin: float, alpha: float = 0.05) -> dict:
  """Equivalence of paired differences `deltas` within +-`margin`: the larger of the two
  one-sided p-values, and whether it is below `alpha`."""
  deltas = np.asarray(deltas, np.float64)
  if not margin > 0:
    raise ValueError(f"the equivalence margin must be > 0, got {margin!r}")
  n = deltas.size
  se = deltas.std(ddof=1) / math.sqrt(n)
  above_lower = stats.t.sf((deltas.mean() + margin) / se, n - 1)  # H0: delta <= -margin
  below_upper = stats.t.cdf((deltas.mean() - margin) / se, n - 1)  # H0: delta >= +margin
  p = float(max(above_lower, below_upper))
  return {"margin": margin, "p": p, "equivalent": p < alpha}


def _df_and_scale(n: int, paired: bool) -> tuple[int, float]:
  """The t test's degrees of freedom, and the standard error of the difference per unit of
  the seed spread: paired, sd of the deltas / sqrt(n); unpaired, n seeds per arm."""
  if paired:
    return n - 1, 1 / math.sqrt(n)
  return 2 * n - 2, math.sqrt(2 / n)


def power(effect: float, std: float, n: int, alpha: float = 0.05, paired: bool = True) -> float:
  """Probability that the two-sided t test at `alpha` rejects "no difference" when the true
  difference is `effect` and the per-seed spread `std` (of the deltas, when paired)."""
  df, scale = _df_and_scale(n, paired)
  critical = stats.t.ppf(1 - alpha / 2, df)
  noncentrality = effect / (std * scale)
  # The lower tail as the upper one of the mirrored distribution: scipy's nct.cdf is NaN at
  # points of its far left tail (df 1, noncentrality 8), its sf finite on the whole range.
  return float(stats.nct.sf(critical, df, noncentrality) +
               stats.nct.sf(critical, df, -noncentrality))


def minimal_detectable_effect(std: float, n: int, alpha: float = 0.05, power_goal: float = 0.8,
                              paired: bool = True) -> float:
  """The true difference detected with probability `power_goal` (same units as `std`)."""
  if n < 2:
    raise ValueError(f"a t test needs at least 2 seeds, got {n}")
  _, scale = _df_and_scale(n, paired)
  # Solved in units of `std`, so the numbers stay moderate whatever `std` is (a spread of 0
  # detects any effect).
  gap = lambda effect: power(effect, 1.0, n, alpha, paired) - power_goal
  upper = scale  # a noncentrality of 1, then doubled until it brackets the goal
  while gap(upper) < 0:
    upper *= 2
  return float(optimize.brentq(gap, 0.0, upper, xtol=1e-12)) * std


def seeds_for_effect(std: float, effect: float, alpha: float = 0.05, power_goal: float = 0.8,
                     paired: bool = True, most: int = 10_000) -> int:
  """The fewest seeds whose minimal detectable effect is at most `effect`: those at which
  `effect` is detected with probability `power_goal` (power grows with the effect)."""
  for n in range(2, most + 1):
    if power(effect, std, n, alpha, paired) >= power_goal:
      return n
  raise ValueError(f"an effect of {effect} with seed spread {std} needs more than {most} seeds")


def fisher_exact(failed_a: int, runs_a: int, failed_b: int, runs_b: int) -> dict:
  """Fisher's exact test (two-sided) of `failed_a` failures in `runs_a` runs against
  `failed_b` in `runs_b`: its p-value and the sample odds ratio (inf or 0 where an arm has no
  failures or no successes)."""
  for failed, runs in ((failed_a, runs_a), (failed_b, runs_b)):
    if not 0 <= failed <= runs:
      raise ValueError(f"failures must be between 0 and the runs, got {failed} of {runs}")
  table = [[failed_a, runs_a - failed_a], [failed_b, runs_b - failed_b]]
  result = stats.fisher_exact(table, alternative="two-sided")
  return {"p": float(result.pvalue), "odds_ratio": float(result.statistic)}
