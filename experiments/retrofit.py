"""The blog's retrofit pipeline at CPU scale: pretrain a pre-norm byte-level LM, fine-tune it
on a GSM8K-like task as it is and retrofitted with hyper-connections, score every model
few-shot, and set the accuracies beside the blog's.

    python -m experiments.retrofit --preset cpu --out reports/retrofit
        [--gin_param 'finetune/LoopConfig.steps = 100'] [--no_progress]

The blog (Suhas Chundi's, retrofitting Qwen3-0.6B; `BLOG`) scores GSM8K 5-shot with
lm-eval's strict-match: 0.4109 pretrained, 0.3624 after a full fine-tune (its SFT baseline),
0.4443 after an HC retrofit and the fine-tune. The rows here (`ROWS`):

  pretrained   the pretrained model, no fine-tune
  prenorm      the pre-norm model fine-tuned (the blog's SFT baseline)
  hc, mhc,     retrofitted (`mhc_jax.lm.retrofitting`: the same logits as the pretrained
  mhc_lite     model at the start) with `Retrofit.num_streams` streams, then fine-tuned alike

The task is `experiments/word_problems.py`: arithmetic word problems generated from
`TaskConfig.seed`, fine-tuned on as text (`OUT/task/*.txt`) and scored on the test split
(whose arithmetic the train split never holds) through lm-evaluation-harness, as the blog
scored GSM8K: the task written for lm-eval (`OUT/lm_eval_task/`), `Retrofit.shots`-shot,
greedy, exact match after its strict-match filter (`mhc_jax.lm.harness` runs the models).

A preset is `gin_configs/retrofit/NAME.gin` (or any gin file's path): the pretraining's
configs as `mhc-train` takes them (`ModelConfig.*`, `DataConfig.*`, ...), the fine-tunes'
differences from them in gin scope `finetune` (`finetune/LoopConfig.steps = 300`; the model
is the pretrained one, and the script sets the data source to the task's documents), and
`TaskConfig.*`, `Retrofit.*`. The pretraining trains once in `OUT/runs/pretrain/`; each
fine-tune starts from it (`train(init_from=...)`) in `OUT/runs/<row>_seed<k>/`, where seed k
sets `LoopConfig.seed` (the new sites' random parameters) and `DataConfig.seed` (the order
of the problems), the same for every row: differences between rows at one seed are paired.
As in every experiment (`experiments/runs.py`), a finished run is reused, an unfinished one
resumes, and a workdir trained with other configs is an error; each model's scores are kept in
its workdir (`few_shot.json`), so a rerun only writes the report again.

Written to OUT: `report.md` (the table beside the blog's numbers, which directions reproduce),
`summary.json`, `accuracy.png`, the fine-tunes' `loss_train.png` and `loss_eval.png`, and the
stream rows' H_res gains, `gain_over_training.png` and `gain_per_layer.png`.
"""

import argparse
import dataclasses
from collections import Counter
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
from flax import nnx  # noqa: E402

from experiments import report, word_problems  # noqa: E402
from experiments.runs import (configs_json, devices_for, diagnostics_every,  # noqa: E402
                             final_params, preset_path, Stopped, train_or_reuse,
                             use_compilation_cache)
from experiments.report.figures import (DPI, plot_curve, plot_gains_over_training,  # noqa: E402
                                        plot_gains_per_layer)
from experiments.report.numbers import mean_std  # noqa: E402
from mhc_jax.checks import check_int, one_line  # noqa: E402
from mhc_jax.lm import checkpoint, grpo, presets, train as train_lib  # noqa: E402
from mhc_jax.lm.grpo import GRPOConfig  # noqa: E402
from mhc_jax.lm.grpo_cli import GRPO_CONFIG  # noqa: E402
from mhc_jax.lm.data import Corpus, DataConfig  # noqa: E402
from mhc_jax.lm.harness import MhcJaxLM  # noqa: E402
from mhc_jax.lm.metrics import read_metrics  # noqa: E402
from mhc_jax.lm.model import ModelConfig  # noqa: E402
from mhc_jax.lm.optimizer import OptimizerConfig  # noqa: E402
from mhc_jax.lm.residuals import RESIDUALS  # noqa: E402
from mhc_jax.lm.retrofitting import retrofit_config  # noqa: E402
from mhc_jax.lm.sharding import MeshConfig  # noqa: E402
from mhc_jax.lm.tokenizer import ByteTokenizer  # noqa: E402
from mhc_jax.lm.train_state import Trainer  # noqa: E402
from mhc_jax.lm.train import LoopConfig  # noqa: E402

PRESET_DIR = presets.PRESET_DIR / "retrofit"
FINETUNE = "finetune"  # the gin scope of the fine-tunes' configs
GRPO_SCOPE = "grpo"  # the gin scope of the GRPO rows' optimizer (`grpo/OptimizerConfig.*`)
PRETRAIN = "pretrain"  # its run's folder in OUT/runs/
SCORES = "few_shot.json"  # a model's scores, in its run's folder
EVAL_BATCH_SIZE = 50  # prompts decoded together
FIGURES = ("accuracy.png", "loss_train.png", "loss_eval.png", "gain_over_training.png",
           "gain_per_layer.png")
GRPO_FIGURES = ("grpo_reward.png",)  # with GRPO rows
GRPO_CURVES = "grpo_reward.json"  # the figure's data
FINETUNED = {"prenorm": "pre-norm fine-tune (the blog's SFT baseline)",
             "hc": "HC retrofit + fine-tune",
             "mhc": "mHC retrofit + fine-tune",
             "mhc_lite": "mHC-lite retrofit + fine-tune"}
GRPO = "+grpo"  # a row's suffix: the fine-tune of that row, then GRPO on the word problems
ROWS = {"pretrained": "pretrained, no fine-tune", **FINETUNED,
        **{row + GRPO: f"{name} + GRPO" for row, name in FINETUNED.items()}}
BLOG = {"source": "Suhas Chundi's blog post on HC and mHC (code: github.com/s-chundi/"
                  "deepseek_mhc): Qwen3-0.6B, GSM8K, lm-eval 5-shot strict-match; full SFT "
                  "1 epoch at learning rate 1e-6",
        "accuracy": {"pretrained": 0.4109, "prenorm": 0.3624, "hc": 0.4443, "hc+grpo": 0.4541},
        "stderr": {"pretrained": 0.0136, "prenorm": 0.0132, "hc": 0.0137, "hc+grpo": 0.0137}}
# (row, minus row): the differences the report judges; the blog has the first three.
COMPARISONS = (("prenorm", "pretrained"), ("hc", "prenorm"), ("hc", "pretrained"),
               ("hc+grpo", "hc"), ("mhc", "prenorm"), ("mhc_lite", "prenorm"),
               ("prenorm+grpo", "prenorm"), ("mhc+grpo", "mhc"), ("mhc_lite+grpo", "mhc_lite"),
               ("hc+grpo", "prenorm+grpo"))
# A difference is resolved when its mean is at least this many standard errors from 0.
RESOLVED_SE = 2.0

# The task's config as gin binds it (`TaskConfig.num_train = 3000`); word_problems knows no gin.
TASK_CONFIG = gin.external_configurable(word_problems.TaskConfig, module="experiments")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Retrofit:
  """rows: keys of `ROWS`. seeds: one fine-tune per fine-tuned row and seed. num_streams: n
  of the retrofitted rows. shots: solved examples in each evaluation prompt. gain_points:
  about how many fine-tune steps log the H_res gains."""

  rows: tuple[str, ...] = ("pretrained", *FINETUNED)  # GRPO rows need the [rl] extra
  seeds: tuple[int, ...] = (0, 1, 2)
  num_streams: int = 4
  shots: int = 1
  gain_points: int = 20

  def __post_init__(self):
    # Lists (e.g. from gin) become tuples so the config stays hashable.
    object.__setattr__(self, "rows", tuple(self.rows))
    object.__setattr__(self, "seeds", tuple(self.seeds))
    unknown = set(self.rows) - set(ROWS)
    if not self.rows or unknown or len(set(self.rows)) != len(self.rows):
      raise ValueError(f"rows must be distinct ones of {', '.join(ROWS)}; got {list(self.rows)}")
    for row in self.post_trained:
      if row.removesuffix(GRPO) not in self.rows:
        raise ValueError(f"row {row} post-trains row {row.removesuffix(GRPO)}'s fine-tunes: "
                         "add that row too")
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f"seeds must be distinct and at least one; got {list(self.seeds)}")
    check_int("num_streams", self.num_streams, minimum=2)
    check_int("shots", self.shots, minimum=0)
    check_int("gain_points", self.gain_points)

  @property
  def finetuned(self) -> tuple[str, ...]:
    return tuple(row for row in self.rows if row in FINETUNED)

  @property
  def post_trained(self) -> tuple[str, ...]:
    """The GRPO rows (`row + GRPO`)."""
    return tuple(row for row in self.rows if row.endswith(GRPO))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The pretraining's configs (`model` ... `loop`), the fine-tunes' (`finetune`: data,
  optimizer, mesh, loop, before a row and seed are set in them), the task and the rows, and
  the GRPO rows' settings (`grpo`, its prompts and seed set per run; `grpo_optimizer`)."""

  retrofit: Retrofit
  task: word_problems.TaskConfig
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig
  loop: LoopConfig
  finetune: dict
  grpo: GRPOConfig
  grpo_optimizer: OptimizerConfig

  @property
  def pretrain_configs(self) -> dict:
    """The pretraining's `train` keyword arguments."""
    return {"model": self.model, "data": self.data, "optimizer": self.optimizer,
            "mesh": self.mesh, "loop": self.loop}


def load_settings(preset: str, gin_params=()) -> Settings:
  """Parses the preset, then `gin_params`."""
  configs, _ = presets.parse(
      [str(preset_path(preset, PRESET_DIR))], gin_params,
      extra={"retrofit": Retrofit, "task": TASK_CONFIG, "grpo": GRPO_CONFIG,
             FINETUNE: lambda: presets.scoped_configs(FINETUNE),
             "grpo_optimizer": lambda: presets.scoped_configs(GRPO_SCOPE)["optimizer"]})
  finetune = configs.pop(FINETUNE)
  if finetune.pop("model") != configs["model"]:
    raise ValueError(f"{FINETUNE}/ModelConfig bindings cannot apply: a fine-tune keeps the "
                     f"pretrained model (bind ModelConfig.* for both)")
  return Settings(finetune=finetune, **configs)


def run_name(row: str, seed: int) -> str:
  return f"{row}_seed{seed}"


def grpo_prompts(out: pathlib.Path) -> pathlib.Path:
  """The GRPO rows' prompts: the train split's problems (`word_problems.write_prompts`)."""
  return out / "task" / "grpo_prompts.jsonl"


def grpo_config(settings: Settings, out: pathlib.Path, seed: int) -> GRPOConfig:
  """A GRPO run's settings: the preset's, on the train problems, drawing from `seed`."""
  return dataclasses.replace(settings.grpo, prompts=str(grpo_prompts(out)), seed=seed)


def post_train_runs(settings: Settings, out: pathlib.Path, progress: bool) -> None:
  """GRPO on every GRPO row's fine-tune at each seed (resumed or reused as `post_train`
  does)."""
  runs = [(row, seed) for row in settings.retrofit.post_trained for seed in settings.retrofit.seeds]
  for i, (row, seed) in enumerate(runs, 1):
    print(f"[{i}/{len(runs)}] grpo {run_name(row, seed)}", flush=True)
    grpo.post_train(str(out / "runs" / run_name(row, seed)),
                    str(out / "runs" / run_name(row.removesuffix(GRPO), seed)),
                    grpo_config(settings, out, seed), settings.grpo_optimizer,
                    settings.finetune["mesh"], progress=progress)


def task_source(out: pathlib.Path) -> str:
  return str(out / "task" / "*.txt")


def lm_eval_task(out: pathlib.Path) -> pathlib.Path:
  """The folder of the task as lm-eval reads it (`word_problems.write_lm_eval_task`)."""
  return out / "lm_eval_task"


def run_configs(settings: Settings, out: pathlib.Path, row: str, seed: int) -> dict:
  """The `train` keyword arguments of one fine-tune (all but `init_from`)."""
  finetune, retrofit = settings.finetune, settings.retrofit
  model = (settings.model if row == "prenorm"
           else retrofit_config(settings.model, row, num_streams=retrofit.num_streams))
  return {"model": model,
          "data": dataclasses.replace(finetune["data"], source=task_source(out), seed=seed),
          "optimizer": finetune["optimizer"],
          "mesh": finetune["mesh"],
          "loop": finetune_loop(settings, seed)}


def finetune_loop(settings: Settings, seed: int) -> LoopConfig:
  """A fine-tune's loop: the preset's, logging the H_res gains `Retrofit.gain_points` times,
  without a sample (a continuation of the pretraining's prompt says nothing here)."""
  loop = settings.finetune["loop"]
  return dataclasses.replace(
      loop, seed=seed, sample_tokens=0,
      diagnostics_every=diagnostics_every(loop.steps, settings.retrofit.gain_points))


def jobs(settings: Settings, out: pathlib.Path) -> list[tuple[str, dict, dict]]:
  """(name, `train` keyword arguments, what the workdir's record holds) of every run: the
  pretraining, then each fine-tune, which also records the task and the pretraining's
  configs (it depends on both)."""
  pretrain = settings.pretrain_configs
  runs = [(PRETRAIN, pretrain, pretrain)]
  for row in settings.retrofit.finetuned:
    for seed in settings.retrofit.seeds:
      configs = {**run_configs(settings, out, row, seed),
                 "init_from": str(out / "runs" / PRETRAIN)}
      record = {**{k: v for k, v in configs.items() if k != "init_from"},
                "task": settings.task, **{f"pretrain_{k}": v for k, v in pretrain.items()}}
      runs.append((run_name(row, seed), configs, record))
  return runs


def check_prompts_fit(settings: Settings, task: word_problems.Task) -> None:
  """The evaluation's longest prompt and its answer must fit in the fine-tunes' windows: the
  model never saw positions beyond them."""
  longest = word_problems.longest_prompt(task, settings.retrofit.shots)
  needed, seq_len = longest + word_problems.answer_tokens(task), settings.finetune["data"].seq_len
  if needed > seq_len:
    raise ValueError(f"{settings.retrofit.shots}-shot prompts and their answers take up to "
                     f"{needed} bytes, more than the fine-tunes' seq_len {seq_len}: lower "
                     f"Retrofit.shots or raise {FINETUNE}/DataConfig.seq_len")


def train_runs(settings: Settings, out: pathlib.Path, progress: bool) -> None:
  """Trains (or resumes, or reuses) the pretraining, then every fine-tune."""
  train_or_reuse([(out / "runs" / name, configs, record)
                  for name, configs, record in jobs(settings, out)], "retrofit", progress)


def restore(configs: dict, workdir: pathlib.Path) -> tuple[Trainer, dict]:
  """A run's trainer and final parameters (a GRPO run's: its policy's, at `configs["grpo"]`'s
  last step)."""
  trainer = Trainer(configs["model"], configs["optimizer"], configs["mesh"], configs["loop"],
                    configs["data"].batch_size, devices_for(configs["mesh"]))
  if "grpo" in configs:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            trainer.abstract_state["params"])
    return trainer, checkpoint.restore_params(workdir.absolute(), configs["grpo"].steps,
                                              abstract)
  return trainer, final_params(trainer, workdir, configs["loop"].steps)


def scores(settings: Settings, task_folder: pathlib.Path, corpus: Corpus, configs: dict,
           workdir: pathlib.Path) -> dict:
  """The run's few-shot scores (`word_problems.evaluate` of the lm-eval task in
  `task_folder`) and its loss on the fine-tunes' validation problems (`corpus`), kept in
  `workdir/SCORES` and reused while the task, the shots, the fine-tunes' data and the scorer
  are the same."""
  key = {"task": dataclasses.asdict(settings.task), "shots": settings.retrofit.shots,
         "data": dataclasses.asdict(corpus.config),
         "eval_batches": settings.finetune["loop"].eval_batches,
         "scored_by": word_problems.SCORED_BY,
         **({"grpo": dataclasses.asdict(configs["grpo"])} if "grpo" in configs else {})}
  path = workdir / SCORES
  if path.is_file():
    kept = json.loads(path.read_text())
    if kept.get("key") == json.loads(json.dumps(key)):  # as JSON: tuples are lists
      return kept
  trainer, params = restore(configs, workdir)
  with jax.set_mesh(trainer.mesh):
    task_loss = trainer.evaluate(params, corpus.validation_batches(key["eval_batches"]))
  # Every model reads the prompts within the fine-tunes' windows (`check_prompts_fit`).
  lm = MhcJaxLM(nnx.merge(trainer.graphdef, jax.device_get(params)), ByteTokenizer(),
                max_length=corpus.config.seq_len, batch_size=EVAL_BATCH_SIZE)
  result = {"key": key, "task_val_loss": task_loss,
            **word_problems.evaluate(lm, task_folder, settings.retrofit.shots)}
  path.write_text(json.dumps(result, indent=1) + "\n")
  return result


def task_corpus(settings: Settings, out: pathlib.Path) -> Corpus:
  """The fine-tunes' corpus (every seed splits the problems alike)."""
  return Corpus(run_configs(settings, out, "prenorm", settings.retrofit.seeds[0])["data"])


def evaluate_runs(settings: Settings, corpus: Corpus, out: pathlib.Path) -> list[dict]:
  """-> one entry per scored model: row, seed (None for the pretrained model), accuracy and
  its stderr over problems, whether each test problem was solved (`[problems]` 0/1), loss
  on the fine-tunes' validation problems, metrics rows."""
  retrofit = settings.retrofit
  models = ([("pretrained", None, PRETRAIN, settings.pretrain_configs)]
            if "pretrained" in retrofit.rows else [])
  models += [(row, seed, run_name(row, seed), run_configs(settings, out, row, seed))
             for row in retrofit.finetuned for seed in retrofit.seeds]
  models += [(row, seed, run_name(row, seed),
              {**run_configs(settings, out, row.removesuffix(GRPO), seed),
               "grpo": grpo_config(settings, out, seed)})
             for row in retrofit.post_trained for seed in retrofit.seeds]
  results = []
  for i, (row, seed, name, configs) in enumerate(models, 1):
    workdir = out / "runs" / name
    score = scores(settings, lm_eval_task(out), corpus, configs, workdir)
    print(f"[{i}/{len(models)}] {name}: accuracy {score['accuracy']:.3f}", flush=True)
    results.append({"row": row, "seed": seed, "run": name, "accuracy": score["accuracy"],
                    "stderr": score["stderr"], "task_val_loss": score["task_val_loss"],
                    "first_continuations": score["continuations"][:5],
                    "top_answer": top_answer(score["answers"]),
                    "correct": np.array(score["correct"]),
                    "metrics": read_metrics(workdir)})
  return results


REWARD_PARTS = ("reward", "reward/exact_match_reward", "reward/format_reward")
EDGE_STEPS = 10  # the GRPO steps averaged at the start and at the end


def grpo_rewards(rows: list[dict]) -> dict:
  """A GRPO run's rewards (and their parts) averaged over its first and last `EDGE_STEPS`
  steps, and its last step's KL to the reference."""
  mean = lambda part, key: float(np.mean([r[key] for r in part]))
  return {"first": {key: mean(rows[:EDGE_STEPS], key) for key in REWARD_PARTS},
          "last": {key: mean(rows[-EDGE_STEPS:], key) for key in REWARD_PARTS},
          "final_kl": rows[-1]["kl"], "steps_averaged": EDGE_STEPS}


def top_answer(answers: list[str]) -> dict:
  """The answer a model gave most often over the test problems and its share: a model that
  collapsed to one answer gives it to nearly all."""
  answer, count = Counter(answers).most_common(1)[0]
  return {"answer": answer, "share": count / len(answers)}


def mean_stderr(values) -> dict:
  """Mean and standard error of the mean (sample std / sqrt(n); NaN for one value)."""
  stats = mean_std(values)
  return {"mean": stats["mean"], "stderr": stats["std"] / math.sqrt(len(values))}


def verdict(blog_delta: float | None, here: dict) -> str:
  """Whether a difference between rows is resolved (its mean at least `RESOLVED_SE` standard
  errors from 0) and, where the blog has it, whether its sign is the blog's."""
  mean, stderr = here["mean"], here["stderr"]
  resolved = mean != 0 and abs(mean) >= RESOLVED_SE * stderr  # NaN stderr (one seed): not
  unresolved = f"not resolved (within {RESOLVED_SE:g} SE of 0)"
  if blog_delta is None:
    return "not in the blog; " + (("higher" if mean > 0 else "lower") if resolved else unresolved)
  if not resolved:
    return unresolved
  return "reproduces" if (mean > 0) == (blog_delta > 0) else "does not reproduce (reversed)"


def solved(results: list[dict], row: str, seeds) -> np.ndarray:
  """`[seeds, problems]` 0/1: which test problems `row` solved at each seed; the pretrained
  model's one row repeated for every seed."""
  by_seed = {r["seed"]: r["correct"] for r in results if r["row"] == row}
  return np.stack([by_seed[None] if row == "pretrained" else by_seed[s] for s in seeds])


def paired_difference(results: list[dict], row: str, base: str, seeds) -> dict:
  """`row`'s accuracy minus `base`'s, paired by seed and by problem: the mean, its standard
  error over seeds (of the per-seed differences: how much the seed moves it), over problems
  (of the per-problem differences averaged over seeds: how much another draw of test
  problems would), and both together (root sum of squares), which the verdict uses."""
  diffs = solved(results, row, seeds) - solved(results, base, seeds)  # [seeds, problems]
  over_seeds = mean_stderr(diffs.mean(1))["stderr"]
  over_problems = mean_stderr(diffs.mean(0))["stderr"]
  return {"mean": float(diffs.mean()), "stderr": math.hypot(over_seeds, over_problems),
          "stderr_seeds": over_seeds, "stderr_problems": over_problems}


def summarize(settings: Settings, task: word_problems.Task, results: list[dict],
              epochs: float) -> dict:
  """The report's numbers: each row's accuracy, what constant answers and a lookup table of
  the train answers score, the differences the blog reports with their verdicts, and the
  settings."""
  retrofit, blog = settings.retrofit, BLOG["accuracy"]
  seeds, rows = retrofit.seeds, {}
  for row in retrofit.rows:
    group = [r for r in results if r["row"] == row]
    accuracies = [r["accuracy"] for r in group]
    rows[row] = {"name": ROWS[row], "blog": blog.get(row), "blog_stderr": BLOG["stderr"].get(row),
                 "accuracy": {**mean_stderr(accuracies),
                              "per_seed": {str(r["seed"]): r["accuracy"] for r in group}},
                 "stderr_over_problems": float(np.mean([r["stderr"] for r in group])),
                 "task_val_loss": mean_std([r["task_val_loss"] for r in group]),
                 "top_answer": {str(r["seed"]): r["top_answer"] for r in group}}
    if row.endswith(GRPO):
      rows[row]["grpo"] = {str(r["seed"]): grpo_rewards(r["metrics"]) for r in group}
  comparisons = []
  for row, base in COMPARISONS:
    if row in retrofit.rows and base in retrofit.rows:
      # Paired by seed (same data order) and problem (same prompts).
      here = paired_difference(results, row, base, seeds)
      blog_delta = blog[row] - blog[base] if row in blog and base in blog else None
      comparisons.append({"row": row, "minus": base, "blog": blog_delta, "here": here,
                          "verdict": verdict(blog_delta, here)})
  return {"settings": settings_summary(settings, epochs), "blog": BLOG, "rows": rows,
          "constant_answers": word_problems.constant_baselines(task),
          "lookup_table": word_problems.lookup_baseline(task), "comparisons": comparisons,
          "runs": [{k: v for k, v in r.items() if k not in ("metrics", "correct")}
                   for r in results]}


def settings_summary(settings: Settings, epochs: float) -> dict:
  """What the report states, JSON-ready."""
  finetune = {**settings.finetune, "loop": finetune_loop(settings, settings.retrofit.seeds[0])}
  configs = {"pretrain": configs_json(settings.pretrain_configs),
             "finetune": configs_json(finetune)}
  del configs["finetune"]["data"]["source"], configs["finetune"]["data"]["seed"]
  del configs["finetune"]["loop"]["seed"]
  devices = devices_for(settings.mesh)
  # A GRPO run's prompts and seed are the script's (OUT's problems, the row's seed).
  grpo_run = dataclasses.replace(settings.grpo, prompts=str(grpo_prompts(pathlib.Path("OUT"))),
                                 seed=0)
  grpo_settings = ({"grpo": dataclasses.asdict(grpo_run),
                    "grpo_optimizer": dataclasses.asdict(settings.grpo_optimizer)}
                   if settings.retrofit.post_trained else {})
  return {**dataclasses.asdict(settings.retrofit), "task": dataclasses.asdict(settings.task),
          **grpo_settings,
          "finetune_epochs": epochs,
          "each seed sets": "the fine-tunes' LoopConfig.seed (the new sites' random "
                            "parameters) and DataConfig.seed (the order of the problems)",
          "devices": f"{len(devices)} x {devices[0].device_kind} ({jax.default_backend()})",
          "jax": jax.__version__, **configs}


def plot_accuracy(path: pathlib.Path, summary: dict) -> None:
  """Left: each row's accuracy here (mean ± SE over seeds, seeds as dots); right: the blog's
  (± lm-eval's stderr)."""
  fig, (ours, theirs) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained",
                                     gridspec_kw={"width_ratios": [len(summary["rows"]),
                                                                   len(BLOG["accuracy"])]})
  for i, (row, entry) in enumerate(summary["rows"].items()):
    color = row_color(row)
    acc = entry["accuracy"]
    ours.bar(i, acc["mean"], yerr=0 if math.isnan(acc["stderr"]) else acc["stderr"],
             color=color, alpha=0.6, capsize=4)
    seeds = list(acc["per_seed"].values())
    ours.plot(np.full(len(seeds), i), seeds, "o", color="black", markersize=3)
    ours.text(i, max(seeds) + 0.03, f"{acc['mean']:.3f}", ha="center")
  best = summary["constant_answers"]["best_constant"]
  ours.axhline(best["accuracy"], color="gray", linestyle="--", linewidth=1,
               label=f"best constant answer ({best['answer']})")
  ours.legend(loc="upper right")
  ours.set_xticks(range(len(summary["rows"])), list(summary["rows"]))
  ours.set(title=f"here: word problems, {summary['settings']['shots']}-shot "
                 "(mean ± SE over seeds; dots: seeds)", ylabel="exact match", ylim=(0, 1))
  blog = BLOG["accuracy"]
  theirs.bar(range(len(blog)), list(blog.values()), yerr=list(BLOG["stderr"].values()),
             color=[row_color(row) for row in blog],
             alpha=0.6, capsize=4)
  for i, value in enumerate(blog.values()):
    theirs.text(i, value + 0.03, f"{value:.4f}", ha="center")
  theirs.set_xticks(range(len(blog)), list(blog))
  theirs.set(title="blog: Qwen3-0.6B, GSM8K 5-shot (± stderr)", ylim=(0, 1))
  for ax in (ours, theirs):
    ax.grid(alpha=0.3, axis="y")
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def grpo_curves(groups: dict) -> dict:
  """The GRPO rows' reward curves as data: per row and seed, each step's mean reward and its
  parts (the plot's numbers)."""
  keys = ("reward", "reward/exact_match_reward", "reward/format_reward", "kl")
  return {row: {str(run.seed): {"step": [r["step"] for r in run.rows],
                                **{k: [r.get(k) for r in run.rows] for k in keys}}
                for run in group} for row, group in groups.items()}


def row_color(row: str) -> str:
  """A row's colour: its variant's (a GRPO row's, that of the row it post-trains)."""
  entry = RESIDUALS.get(row.removesuffix(GRPO))
  return entry.color if entry else "gray"


def plot_all(out: pathlib.Path, summary: dict, results: list[dict]) -> None:
  plot_accuracy(out / "accuracy.png", summary)
  runs = lambda grpo_rows: report.numbers.by_variant([
      report.Run(r["row"], r["seed"], r["metrics"], 0) for r in results
      if r["seed"] is not None and r["row"].endswith(GRPO) == grpo_rows])
  if post_trained := runs(True):
    plot_curve(out / "grpo_reward.png", post_trained, "reward",
               "GRPO: mean reward of the rollouts (exact match + format, 0 or 1 each)",
               "reward per completion")
    (out / GRPO_CURVES).write_text(json.dumps(grpo_curves(post_trained), indent=1) + "\n")
  groups = runs(False)
  if not groups:
    return
  plot_curve(out / "loss_train.png", groups, "train_loss",
             "Fine-tuning loss (one batch a point)", "cross entropy (nats / byte)", zoom=True)
  plot_curve(out / "loss_eval.png", groups, "eval_loss",
             "Fine-tuning validation loss (held-out train-split problems)",
             "cross entropy (nats / byte)", zoom=True)
  plot_gains_over_training(out / "gain_over_training.png", groups)
  plot_gains_per_layer(out / "gain_per_layer.png", groups)


def _number(value: float, fmt: str = ".3f") -> str:
  return "n/a" if math.isnan(value) else format(value, fmt)


def _accuracy_table(summary: dict) -> list[str]:
  seeds = summary["settings"]["seeds"]
  lines = [f"| row | blog (GSM8K 5-shot ± stderr) | here: accuracy, mean ± SE over seeds | "
           f"per seed ({', '.join(map(str, seeds))}) | SE over problems | val loss (problems) | "
           "most common answer (share), per seed |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for row, entry in summary["rows"].items():
    blog = "–" if entry["blog"] is None else f"{entry['blog']:.4f} ± {entry['blog_stderr']:.4f}"
    acc = entry["accuracy"]
    se = "–" if math.isnan(acc["stderr"]) else f"{acc['stderr']:.3f}"
    per_seed = ", ".join(f"{v:.3f}" for v in acc["per_seed"].values())
    top = ", ".join(f"{t['answer']} ({t['share']:.0%})" for t in entry["top_answer"].values())
    lines.append(f"| {entry['name']} | {blog} | {acc['mean']:.3f} ± {se} | {per_seed} | "
                 f"{entry['stderr_over_problems']:.3f} | {entry['task_val_loss']['mean']:.4f} | "
                 f"{top} |")
  return lines


def _direction_table(summary: dict) -> list[str]:
  lines = ["| difference | blog | here: mean ± SE | SE over seeds / over problems | verdict |",
           "|---|---:|---:|---:|---|"]
  for c in summary["comparisons"]:
    blog, here = "–" if c["blog"] is None else f"{c['blog']:+.4f}", c["here"]
    lines.append(f"| {c['row']} − {c['minus']} | {blog} | {here['mean']:+.3f} ± "
                 f"{_number(here['stderr'])} | {_number(here['stderr_seeds'])} / "
                 f"{_number(here['stderr_problems'])} | {c['verdict']} |")
  return lines


def _plain_statement(summary: dict) -> list[str]:
  """One sentence per kind of verdict on the blog's differences."""
  judged = [c for c in summary["comparisons"] if c["blog"] is not None]
  lines = []
  for kind in ("reproduces", "does not reproduce (reversed)", "not resolved"):
    names = [f"{c['row']} − {c['minus']} (blog {c['blog']:+.3f}, here {c['here']['mean']:+.3f})"
             for c in judged if c["verdict"].startswith(kind)]
    if names:
      lines.append(f"- **{kind[0].upper() + kind[1:]}**: {'; '.join(names)}.")
  return lines or ["- The blog's differences need the pretrained, prenorm and hc rows."]


def markdown(summary: dict) -> str:
  s = summary["settings"]
  majority, best = (summary["constant_answers"][k] for k in ("train_majority", "best_constant"))
  lookup = summary["lookup_table"]
  pre, fine = s["pretrain"], s["finetune"]
  return "\n".join([
      "# The blog's retrofit pipeline at CPU scale",
      "",
      f"Pretraining: pre-norm, d_model {pre['model']['d_model']}, {pre['model']['num_layers']} "
      f"blocks, {pre['loop']['steps']} steps of {pre['data']['batch_size']} × "
      f"{pre['data']['seq_len']} bytes of `{pre['data']['source']}`. Fine-tunes: "
      f"{fine['loop']['steps']} steps of {fine['data']['batch_size']} × "
      f"{fine['data']['seq_len']} bytes ({s['finetune_epochs']:.1f} epochs of "
      f"{s['task']['num_train']} word problems) at peak learning rate "
      f"{fine['optimizer']['learning_rate']:g}, {len(s['seeds'])} seeds; retrofits with "
      f"n = {s['num_streams']} streams. Scored by lm-evaluation-harness on "
      f"{s['task']['num_test']} held-out problems, {s['shots']}-shot (shots drawn by lm-eval's "
      "sampler), greedy, exact match of the strict-match number.",
      "",
      f"Blog: {BLOG['source']}: "
      + ", ".join(f"{ROWS[row]} {value:.4f}" for row, value in BLOG["accuracy"].items()) + ".",
      "",
      "## Accuracy beside the blog",
      "",
      *_accuracy_table(summary),
      "",
      "SE over seeds: sample std / sqrt(seeds); the pretrained model is one model (no seed). "
      "SE over problems: lm-eval's stderr, the one the blog quotes (mean over seeds). "
      f"A constant answer scores at most {best['accuracy']:.3f} on the test problems (always "
      f"{best['answer']}); the train split's most common answer, {majority['answer']}, scores "
      f"{majority['accuracy']:.3f}: what the skew of the answers alone gives. The test "
      "problems' arithmetic is held out of the train split (`word_problems.make_task`): a "
      f"lookup table scores {lookup['accuracy']:.3f} (a test problem's train answer for the "
      f"same template and numbers, found for {lookup['seen']:.0%} of them, else "
      f"{lookup['fallback']}).",
      "",
      "![accuracy](accuracy.png)",
      "",
      "## Direction, not magnitude",
      "",
      "Differences are paired: by seed (the same order of the problems) and by problem (the "
      "same prompts). Their standard error joins two sources (root sum of squares): the seeds "
      "(of the per-seed differences) and the test problems (of the per-problem differences, "
      "averaged over seeds: what another draw of test problems would change). A difference is "
      f"resolved when its mean lies at least {RESOLVED_SE:g} standard errors from 0; it then "
      "reproduces when its sign is the blog's.",
      "",
      *_direction_table(summary),
      "",
      *_plain_statement(summary),
      "",
      "## Fine-tuning",
      "",
      "Mean over seeds; the band spans min to max over seeds.",
      "",
      "![training loss](loss_train.png)",
      "",
      "![validation loss](loss_eval.png)",
      "",
      "H_res gains of the retrofitted rows, logged every "
      f"{fine['loop']['diagnostics_every']} steps (composite: the product over sub-layers).",
      "",
      "![gain over training](gain_over_training.png)",
      "",
      "![gain per layer](gain_per_layer.png)",
      "",
      *_grpo_section(summary),
      "All settings are in `summary.json` (`settings`).",
      "",
  ])


def _grpo_section(summary: dict) -> list[str]:
  """The GRPO rows' settings and reward curves; nothing without GRPO rows."""
  if not any(row.endswith(GRPO) for row in summary["rows"]):
    return []
  g = summary["settings"]["grpo"]
  return [
      "## GRPO",
      "",
      f"Each GRPO row starts from its row's fine-tune at the same seed (`mhc-grpo`, tunix's "
      f"GRPO learner): {g['steps']} steps, each on {g['prompts_per_step']} train-split problems "
      f"(zero-shot prompts) x {g['group_size']} completions of up to {g['max_new_tokens']} "
      f"tokens at temperature {g['temperature']:g}; reward = exact match of the strict-match "
      f"number + the answer line's format; KL coefficient {g['kl_coeff']:g} "
      f"({g['kl_estimator']}) to the fine-tune, clipping {g['clip_epsilon']:g}, peak learning "
      f"rate {summary['settings']['grpo_optimizer']['learning_rate']:g}. The seed sets the "
      "draws and the order of the problems.",
      "",
      "Mean over seeds; the band spans min to max over seeds.",
      "",
      "![GRPO reward](grpo_reward.png)",
      "",
  ]


def write_report(out: pathlib.Path, settings: Settings, task: word_problems.Task,
                 results: list[dict], corpus: Corpus) -> None:
  loop, data = settings.finetune["loop"], settings.finetune["data"]
  epochs = loop.steps * data.batch_size / len(corpus.train_windows)
  summary = summarize(settings, task, results, epochs)
  plot_all(out, summary, results)
  (out / "summary.json").write_text(json.dumps(report.numbers.jsonable(summary), indent=2) + "\n")
  (out / "report.md").write_text(markdown(summary))


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="retrofit", description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="cpu",
                      help="name in gin_configs/retrofit/ (cpu) or a .gin path")
  parser.add_argument("--out", required=True, help="report folder; runs go to OUT/runs/")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding applied after the preset (repeatable), e.g. "
                           "'finetune/LoopConfig.steps = 100'")
  parser.add_argument("--no_progress", action="store_true", help="no per-step progress bar")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = pathlib.Path(args.out)
  try:
    settings = load_settings(args.preset, args.gin_param)
    task = word_problems.make_task(settings.task)
    check_prompts_fit(settings, task)
  except Exception as err:  # gin and the configs raise many types; each means a bad setting
    print(f"retrofit: {one_line(err)}", file=sys.stderr)
    return 2
  use_compilation_cache(out / "runs")
  word_problems.write_documents(task.train, out / "task", settings.task.problems_per_document)
  word_problems.write_lm_eval_task(task, lm_eval_task(out))
  word_problems.write_prompts(task.train, grpo_prompts(out))
  try:
    train_runs(settings, out, progress=not args.no_progress)
    post_train_runs(settings, out, progress=not args.no_progress)
    corpus = task_corpus(settings, out)
    write_report(out, settings, task, evaluate_runs(settings, corpus, out), corpus)
  except Stopped as stopped:
    print(stopped, file=sys.stderr)
    return 0
  except (ValueError, train_lib.NonFiniteError) as err:
    print(f"retrofit: {err}", file=sys.stderr)
    return 2 if isinstance(err, ValueError) else 1
  print(f"report: {out / 'report.md'}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
