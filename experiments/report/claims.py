"""The claims table of `docs/results.md`, built from the committed summary.json files.

    python -m experiments.report.claims [--results docs/results]

prints the table; `tests/test_claims.py` checks that docs/results.md holds it as printed, so no
number in it can drift from its summary. Each claim is one of four kinds, each with one rule
for its verdict:

  Difference  a paper's signed effect, variant minus baseline: *reproduces* when the 95%
              interval excludes 0 on the paper's side, *contradicted* when it excludes 0 on
              the other side, else *not detectable here*, with the smallest difference these
              seeds would detect (80% power, 5% level: the summary's `detectable`, or 2.80
              standard errors where a summary gives a mean and its standard error).
  Match       "as good as": *reproduces* when TOST puts the difference within the preset's
              margin (p < 0.05), *contradicted* when the interval excludes 0, else *not
              detectable here*.
  Failures    "A fails where B trains": Fisher's exact test (two-sided) of the failed runs,
              *reproduces* at p < 0.05 with A failing more, *contradicted* at p < 0.05 with B
              failing more, else *not detectable here*.
  Gains       "A's composite gain explodes, B's stays near 1": *reproduces* when A's largest
              composite backward gain passes EXPLODES and B's stays under BOUNDED,
              *contradicted* when A's largest is below B's, else *not detectable here*.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

from experiments.report.significance import fisher_exact

REPRODUCES, CONTRADICTED, NOT_DETECTABLE = "reproduces", "contradicted", "not detectable here"
EXPLODES, BOUNDED = 100.0, 10.0  # the papers: HC's composite gain about 3000, mHC's about 1.6
ALPHA = 0.05
Z_CI, Z_POWER = 1.959964, 0.841621  # two-sided 95%; 80% power
RESULTS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results"


def _sign(x: float) -> str:
  return f"{x:+.3f}".replace("-", "−")


def _interval(mean: float, half: float) -> str:
  return f"{_sign(mean)} [{_sign(mean - half)}, {_sign(mean + half)}]"


def _big(x: float) -> str:
  return f"{x:.3g}" if x < 1e4 else f"{x:.2g}".replace("e+0", "e").replace("e+", "e")


def _read(results: pathlib.Path, folder: str) -> dict:
  path = results / folder / "summary.json"
  if not path.exists():
    raise FileNotFoundError(f"{path}: no summary; run its experiment (README) and copy its "
                            "report there")
  return json.loads(path.read_text())


def _side(mean: float, half: float) -> int:
  """+1 / -1 where the interval `mean ± half` lies wholly above / below 0, else 0."""
  return 1 if mean - half > 0 else -1 if mean + half < 0 else 0


def _difference_verdict(mean: float, half: float, detectable: float, expected: int) -> str:
  side = _side(mean, half)
  if side:
    return REPRODUCES if side == expected else CONTRADICTED
  return f"{NOT_DETECTABLE} (detects {detectable:.3f})"


def _paired(results: pathlib.Path, folder: str, variant: str, baseline: str,
            section: str | None) -> dict:
  """`variant` − `baseline` in a comparison's summary: its own-best comparison, or a
  `section` of it (`prenorm_best`: every variant at prenorm's best rate)."""
  summary = _read(results, folder)
  return (summary[section] if section else summary)["variants"][variant]["eval_loss_minus"][
      baseline]


@dataclasses.dataclass(frozen=True)
class Difference:
  """`variant` − `baseline`'s final validation loss in a comparison's summary (`folder`, its
  `section`, see `_paired`); `expected` -1 where the paper has the variant lower, +1 higher."""
  folder: str
  variant: str
  baseline: str
  expected: int
  section: str | None = None

  def measure(self, results: pathlib.Path) -> tuple[str, str]:
    entry = _paired(results, self.folder, self.variant, self.baseline, self.section)
    return (f"{_interval(entry['mean'], entry['ci95'])} nats",
            _difference_verdict(entry["mean"], entry["ci95"], entry["detectable"],
                                self.expected))


@dataclasses.dataclass(frozen=True)
class RetrofitDifference:
  """Exact match of `row` − `minus` in the retrofit experiment's summary (`folder`): a mean
  and its standard error over seeds and problems, the interval ±1.96 of them."""
  folder: str
  row: str
  minus: str
  expected: int

  def measure(self, results: pathlib.Path) -> tuple[str, str]:
    entry = next(c for c in _read(results, self.folder)["comparisons"]
                 if (c["row"], c["minus"]) == (self.row, self.minus))
    mean, stderr = entry["here"]["mean"], entry["here"]["stderr"]
    return (f"{_interval(mean, Z_CI * stderr)} exact match",
            _difference_verdict(mean, Z_CI * stderr, (Z_CI + Z_POWER) * stderr,
                                self.expected))


@dataclasses.dataclass(frozen=True)
class Match:
  """`variant` − `baseline` in a comparison's summary (or its `section`), claimed level."""
  folder: str
  variant: str
  baseline: str
  section: str | None = None

  def measure(self, results: pathlib.Path) -> tuple[str, str]:
    entry = _paired(results, self.folder, self.variant, self.baseline, self.section)
    tost, mean, half = entry["tost"], entry["mean"], entry["ci95"]
    here = f"{_interval(mean, half)} nats; TOST at ±{tost['margin']:g}: p {tost['p']:.2f}"
    if tost["p"] < ALPHA:
      return here, REPRODUCES
    if _side(mean, half):
      return here, CONTRADICTED
    return here, f"{NOT_DETECTABLE} (detects {entry['detectable']:.3f})"


@dataclasses.dataclass(frozen=True)
class Failures:
  """Failed runs of `fails` against `trains` over every cell of a stability map (`folder`), or
  in its confirm phase (`confirm`: one depth and rate, more seeds)."""
  folder: str
  fails: str
  trains: str
  confirm: bool = False

  def measure(self, results: pathlib.Path) -> tuple[str, str]:
    summary = _read(results, self.folder)
    if not self.confirm:
      runs, at = summary["runs"], ""
    elif summary["confirm"]["learning_rate"] is None:
      return "hc failed nowhere in the map: no confirm phase", NOT_DETECTABLE
    else:
      runs, at = summary["confirm"]["runs"], f"lr {summary['confirm']['learning_rate']:g}, "
    counts = {arm: (sum(r["failed"] for r in runs if r["arm"] == arm),
                    sum(r["arm"] == arm for r in runs)) for arm in (self.fails, self.trains)}
    test = fisher_exact(*counts[self.fails], *counts[self.trains])
    here = (f"{at}failed runs: {self.fails} {'/'.join(map(str, counts[self.fails]))}, "
            f"{self.trains} {'/'.join(map(str, counts[self.trains]))}; Fisher p {test['p']:.2g}")
    rate = {arm: failed / total for arm, (failed, total) in counts.items()}
    if test["p"] >= ALPHA:
      return here, NOT_DETECTABLE
    return here, REPRODUCES if rate[self.fails] > rate[self.trains] else CONTRADICTED


@dataclasses.dataclass(frozen=True)
class Gains:
  """The largest composite backward gain (peak over training, over every run) of `explodes`
  against `bounded`, in a stability map's summary or a comparison's (`folder`, its `section`,
  see `_paired`)."""
  folder: str
  explodes: str
  bounded: str
  section: str | None = None

  def measure(self, results: pathlib.Path) -> tuple[str, str]:
    summary = _read(results, self.folder)
    if "runs" in summary and "cells" in summary:  # a stability map: per run
      largest = {arm: max(r["composite_backward_gain"]["peak"] for r in summary["runs"]
                          if r["arm"] == arm) for arm in (self.explodes, self.bounded)}
    else:
      variants = (summary[self.section] if self.section else summary)["variants"]
      largest = {v: variants[v]["peak_max_gain"]["composite_backward_gain"]
                 for v in (self.explodes, self.bounded)}
    high, low = largest[self.explodes], largest[self.bounded]
    here = f"largest composite backward gain: {self.explodes} {_big(high)}, " \
           f"{self.bounded} {_big(low)}"
    if high > EXPLODES and low < BOUNDED:
      return here, REPRODUCES
    return here, CONTRADICTED if high < low else NOT_DETECTABLE


@dataclasses.dataclass(frozen=True)
class Claim:
  claim: str  # what a paper says, and its number
  where: str  # the experiment here, in a few words
  test: object  # one of the kinds above


HC_GAIN = "HC lowers the loss against pre-norm (HC paper, OLMo-1B at n = 4: −0.030)"
MHC_GAIN = "mHC lowers the loss against pre-norm (mHC paper, 27B: −0.021)"
CPU = "8 blocks, each at its own best rate (`cpu`)"
CPU_AT_PRENORMS = "8 blocks, all at pre-norm's best rate (`cpu`)"
ABLATIONS = "8 blocks, all at lr 1e-2 (`ablations`)"
SHARP = "8-32 blocks × lr 3e-3-3e-2, 3 seeds (`stability_sharp`)"
SHARP_CONFIRM = ("32 blocks, 10 seeds, at the lowest rate where an HC seed failed in the map "
                 "(`stability_sharp`)")

CLAIMS = (
    Claim(HC_GAIN, CPU, Difference("cpu", "hc", "prenorm", -1)),
    Claim(HC_GAIN, CPU_AT_PRENORMS, Difference("cpu", "hc", "prenorm", -1, "prenorm_best")),
    Claim(MHC_GAIN, CPU, Difference("cpu", "mhc", "prenorm", -1)),
    Claim("mHC beats pre-norm given the same compute (mHC paper: −0.021 for 6.7% more "
          "training time at n = 4)",
          "mHC − pre-norm trained to mHC's FLOPs, 8 blocks (`cpu`)",
          Difference("cpu", "mhc", "prenorm@flops(mhc)", -1)),
    Claim("mHC's gain is more than its extra parameters",
          "mHC − pre-norm widened to mHC's parameters, 8 blocks (`cpu`)",
          Difference("cpu", "mhc", "prenorm@params(mhc)", -1)),
    Claim("mHC-lite is as good as mHC (mHC-lite paper)", CPU, Match("cpu", "mhc_lite", "mhc")),
    Claim("HC's composite gain explodes (mHC paper: ≈ 3000 at 27B), mHC's stays near 1 "
          "(≈ 1.6)", CPU, Gains("cpu", "hc", "mhc")),
    Claim("HC's composite gain explodes, mHC's stays near 1", CPU_AT_PRENORMS,
          Gains("cpu", "hc", "mhc", "prenorm_best")),
    Claim(HC_GAIN, "16 blocks, lr 3e-2 (`stability`)",
          Difference("stability", "hc", "prenorm", -1)),
    Claim(MHC_GAIN, "16 blocks, lr 3e-2 (`stability`)",
          Difference("stability", "mhc", "prenorm", -1)),
    Claim("mHC-lite is as good as mHC (mHC-lite paper)",
          "16 blocks, lr 3e-2 (`stability`)", Match("stability", "mhc_lite", "mhc")),
    Claim("HC's composite gain explodes, mHC's stays near 1", "16 blocks, lr 3e-2 (`stability`)",
          Gains("stability", "hc", "mhc")),
    Claim("HC's composite gain explodes with depth, mHC's stays near 1",
          "4-16 blocks × lr 1e-2-1e-1 (`stability_map`)",
          Gains("stability_map", "hc", "mhc")),
    Claim("HC's training fails where mHC's does not (mHC paper: loss and gradient spikes)",
          "4-16 blocks × lr 1e-2-1e-1, 2 seeds (`stability_map`)",
          Failures("stability_map", "hc", "mhc")),
    Claim("HC's composite gain explodes with depth, mHC's stays near 1", SHARP,
          Gains("stability_sharp", "hc", "mhc")),
    Claim("HC's training fails where mHC's does not", SHARP_CONFIRM,
          Failures("stability_sharp", "hc", "mhc", confirm=True)),
    Claim("HC's training fails where pre-norm's does not", SHARP_CONFIRM,
          Failures("stability_sharp", "hc", "prenorm", confirm=True)),
    Claim("HC's failures come from its static maps' and scales' rate (issue 26: they are raw "
          "parameters Adam moves by about the rate each step)",
          "HC against HC with them at 0.1× the rate, " + SHARP_CONFIRM,
          Failures("stability_sharp", "hc", "hc_static0.1x", confirm=True)),
    Claim("Dynamic HC beats static HC (HC paper, OLMo-1B at n = 4: 2.781 against 2.791, "
          "−0.010)", ABLATIONS, Difference("ablations", "hc", "hc(dynamic=False)", -1)),
    Claim("Static HC lowers the loss against pre-norm (HC paper: 2.791 against 2.811, −0.020)",
          ABLATIONS, Difference("ablations", "hc(dynamic=False)", "prenorm", -1)),
    Claim("HC with 4 streams beats 2 (HC paper: 2.781 against 2.802, −0.021)", ABLATIONS,
          Difference("ablations", "hc", "hc(num_streams=2)", -1)),
    Claim("KromHC is as good as mHC, with exact doubly stochastic H_res (KromHC paper)",
          ABLATIONS, Match("ablations", "kromhc", "mhc")),
    Claim("Frac-connections lower the loss against pre-norm at pre-norm's memory (Frac paper)",
          "one stream of four fractions, " + ABLATIONS,
          Difference("ablations", "frac(num_streams=1)", "prenorm", -1)),
    Claim("A supervised fine-tune lowers GSM8K accuracy (blog, Qwen3-0.6B: −0.049)",
          "pre-norm fine-tune − pretrained (`retrofit_grpo`)",
          RetrofitDifference("retrofit_grpo", "prenorm", "pretrained", -1)),
    Claim("An HC retrofit beats a plain fine-tune (blog: +0.082)",
          "HC retrofit − pre-norm fine-tune (`retrofit_grpo`)",
          RetrofitDifference("retrofit_grpo", "hc", "prenorm", +1)),
    Claim("GRPO improves the HC retrofit (blog: +0.010)",
          "HC + GRPO − HC (`retrofit_grpo`)",
          RetrofitDifference("retrofit_grpo", "hc+grpo", "hc", +1)),
)


def table(results: pathlib.Path = RESULTS) -> str:
  """The claims table as markdown: claim, experiment, what it measured, verdict."""
  lines = ["| claim | here | measured | verdict |", "|---|---|---|---|"]
  for claim in CLAIMS:
    here, verdict = claim.test.measure(results)
    lines.append(f"| {claim.claim} | {claim.where} | {here} | {verdict} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="claims", description=__doc__.splitlines()[0])
  parser.add_argument("--results", type=pathlib.Path, default=RESULTS,
                      help="the folder of the reports' summary.json files")
  args = parser.parse_args(argv)
  try:
    sys.stdout.write(table(args.results))
  except (FileNotFoundError, KeyError) as err:
    print(f"claims: {err}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
