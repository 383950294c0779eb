"""GRPO post-training of a model of this project: its settings, prompts, rewards and records.

    post_train(workdir, init_from, grpo=GRPOConfig(...), optimizer=..., mesh=...)

(`mhc-grpo`, in `grpo_cli.py`, builds the configs from gin presets and bindings.) The engine
is google-tunix's GRPO learner (`grpo_tunix.py`, the `[rl]` extra), on the policy adapter of
`policy.py`: for each step it draws `GRPOConfig.group_size` completions of each of
`prompts_per_step` prompts at `temperature`, scores them with the reward functions (their sum
is the reward), normalises the rewards within each prompt's group (the advantages of
DeepSeekMath, arXiv:2402.03300) and takes one optimizer step on the clipped-ratio objective
with `kl_coeff` times the KL to the reference model (the `init_from` model, frozen).

Prompts are a JSON-lines file, one object a line: `{"prompt": "...", "answer": ...}` and any
other fields, which reach the reward functions as keyword arguments, one entry per completion
(`experiments/word_problems.py` writes the word problems' so). A reward function is named by
its import path (`mhc_jax.lm.rewards.exact_match_reward`, or one's own `mypackage.fn`) and
called as `rewards.py` describes.

WORKDIR is a workdir of this project: `config.json` (the settings, the model, where it started),
`metrics.jsonl` and `tensorboard/` per step (`METRICS`), tunix's checkpoints of the policy and
its optimizer in `grpo_checkpoints/` (every `checkpoint_every` steps and the last; a rerun
resumes from the latest), and once all steps are done the policy in `checkpoints/` as
`mhc-train` writes its parameters and `finished.json`: `mhc-eval`, `mhc-generate` and
`--init_from` read it as any workdir. The draws are seeded by the step (`GRPOConfig.seed`
folded with it), so a resumed run draws what the uninterrupted one would have.
"""

import dataclasses
import importlib
import json
import math
import pathlib
from collections.abc import Callable

import numpy as np

from mhc_jax.checks import check_int, one_line
from mhc_jax.lm import inference, pretrained, rewards as rewards_lib
from mhc_jax.lm.files import write_atomically
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig, make_mesh
from mhc_jax.lm.train import CONFIG, FINISHED, is_finished

TUNIX_CHECKPOINTS = "grpo_checkpoints"
KL_ESTIMATORS = ("low_var_kl", "kl", "mse_kl")  # tunix's names; the first is DeepSeekMath's
# What each line of metrics.jsonl holds (and TensorBoard plots), besides each reward function's
# mean as `reward/<name>` and, for models with streams, the H_res gains of the step's rollouts.
METRICS = {
    "reward": "the mean over completions of the summed rewards",
    "reward_group_std": "the within-group standard deviation of the reward, averaged over groups",
    "kl": "the KL of the policy to the reference, per completion token (the estimator's)",
    "clip_fraction": "the fraction of completion tokens whose ratio the clipping bounds",
    "response_length": "the mean completion length in tokens",
    "loss": "the GRPO objective minimised", "grad_norm": "the gradient's global norm",
    "rollout_tokens_per_sec": "completion tokens drawn per second of the rollout",
    "step_time": "seconds from the rollout's start to the update's end (rewards, the "
                 "reference's log-probabilities and the update included)"}
DEFAULT_REWARDS = ("mhc_jax.lm.rewards.exact_match_reward", "mhc_jax.lm.rewards.format_reward")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """prompts: the JSON-lines file of prompts. rewards: import paths of reward functions.
  group_size: completions per prompt (G). prompts_per_step: prompts per rollout. steps:
  optimizer steps, `iterations` on each rollout's completions (DeepSeekMath's mu; with 1, the
  policy that drew them is the one updated, its ratio is 1 and the clipping never bites).
  kl_coeff: the KL penalty's weight (beta; 0: no reference model is run). clip_epsilon: the
  ratio's clipping. kl_estimator: one of `KL_ESTIMATORS`. max_new_tokens: the most tokens a
  completion has (it runs on past the answer's line; the rewards read that line only).
  max_prompt_length: the most tokens a prompt may have. temperature: the sampling
  temperature. seed: the draws and the prompts' order.
  checkpoint_every: steps between checkpoints."""

  prompts: str = ""
  rewards: tuple[str, ...] = DEFAULT_REWARDS
  group_size: int = 8
  prompts_per_step: int = 4
  steps: int = 100
  iterations: int = 1
  kl_coeff: float = 0.04
  clip_epsilon: float = 0.2
  kl_estimator: str = "low_var_kl"
  max_new_tokens: int = 8
  max_prompt_length: int = 256
  temperature: float = 1.0
  seed: int = 0
  checkpoint_every: int = 25

  def __post_init__(self):
    object.__setattr__(self, "rewards", tuple(self.rewards))  # lists from gin: hashable
    check_int("GRPOConfig.group_size", self.group_size, minimum=2)
    for name in ("prompts_per_step", "steps", "iterations", "max_new_tokens",
                 "max_prompt_length", "checkpoint_every"):
      check_int(f"GRPOConfig.{name}", getattr(self, name))
    if not self.rewards:
      raise ValueError("GRPOConfig.rewards is empty: name at least one reward function")
    if not (math.isfinite(self.kl_coeff) and self.kl_coeff >= 0):
      raise ValueError(f"GRPOConfig.kl_coeff is {self.kl_coeff!r}: it must be >= 0 (0: no KL "
                       "penalty)")
    if not (math.isfinite(self.clip_epsilon) and self.clip_epsilon > 0):
      raise ValueError(f"GRPOConfig.clip_epsilon is {self.clip_epsilon!r}: it must be > 0")
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      raise ValueError(f"GRPOConfig.temperature is {self.temperature!r}: it must be > 0")
    if self.kl_estimator not in KL_ESTIMATORS:
      raise ValueError(f"GRPOConfig.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}; "
                       f"got {self.kl_estimator!r}")


def group_std(rewards: np.ndarray, group_size: int) -> float:
  """`[prompts * group_size]` rewards, each prompt's group contiguous -> the mean over groups
  of the rewards' standard deviation within the group."""
  return float(np.asarray(rewards, np.float64).reshape(-1, group_size).std(axis=1).mean())


def read_prompts(path: str) -> list[dict]:
  """The prompts file -> its objects, each with a string "prompt"; one-line ValueError naming
  the file (and line) when it is missing, empty or not such objects."""
  if not path:
    raise ValueError("GRPOConfig.prompts is not set: bind it to a JSON-lines file of "
                     '{"prompt": ..., "answer": ...} objects')
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise ValueError(f"GRPOConfig.prompts {file} is not a file")
  records = []
  for number, line in enumerate(file.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as err:
      raise ValueError(f"{file}:{number} is not JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise ValueError(f'{file}:{number} is no object with a string "prompt"')
    records.append(record)
  if not records:
    raise ValueError(f"GRPOConfig.prompts {file} holds no prompts")
  fields = set(records[0])
  for number, record in enumerate(records, 1):
    if set(record) != fields:
      raise ValueError(f"{file}: prompt {number} has fields {sorted(record)}, the first "
                       f"{sorted(fields)}: every prompt needs the same ones")
  return records


def reward_function(path: str) -> Callable:
  """An import path (`package.module.name`) -> that function; one line when it is none."""
  module, _, name = path.rpartition(".")
  try:
    fn = getattr(importlib.import_module(module), name) if module else None
  except (ImportError, AttributeError) as err:
    raise ValueError(f"reward function {path!r} cannot be imported ({one_line(err)}): name it "
                     "as package.module.function") from None
  if not callable(fn):
    raise ValueError(f"reward function {path!r} is not a function: name it as "
                     "package.module.function")
  return fn


def preflight(fns: list[Callable], record: dict) -> None:
  """Calls every reward function once on the first prompt, completed by its own answer, as
  the learner will: one line, before anything is written, for one that raises or returns
  other than one finite float (`rewards.checked_rewards`)."""
  batch = {key: [value] for key, value in record.items() if key != "prompt"}
  completion = f" {record.get('answer', '')}\n"
  for fn in fns:
    rewards_lib.checked_rewards(fn, [record["prompt"]], [completion], **batch, mode="train")


def check_prompt_lengths(prompts: list[dict], tokenizer, grpo: GRPOConfig) -> None:
  """One line naming the first prompt longer than `GRPOConfig.max_prompt_length` tokens."""
  for number, record in enumerate(prompts, 1):
    length = len(tokenizer.encode(record["prompt"]))
    if length > grpo.max_prompt_length:
      raise ValueError(f"prompt {number} of {grpo.prompts} has {length} tokens, more than "
                       f"GRPOConfig.max_prompt_length = {grpo.max_prompt_length}: raise it")


@dataclasses.dataclass(frozen=True)
class Start:
  """Where the run starts: `init_from`'s `pretrained.Source` and the data section of its
  config.json (a workdir's: the tokenizer it decodes with), {} for a Hugging Face folder."""

  source: pretrained.Source
  data: dict


def read_start(init_from: str | None) -> Start:
  if not init_from:
    raise ValueError("--init_from is required: the workdir (or Hugging Face folder) of the "
                     "model to post-train")
  source = pretrained.read_source(init_from, "--init_from")
  data = {}
  if source.kind == pretrained.WORKDIR:
    data = json.loads((source.path / CONFIG).read_text()).get("data", {})
  return Start(source, data)


def record(grpo: GRPOConfig, optimizer: OptimizerConfig, mesh: MeshConfig,
           start: Start) -> dict:
  """config.json of the run: what it depends on, and what makes it a workdir the project's
  readers load (its model and data sections)."""
  return {"grpo": dataclasses.asdict(grpo), "optimizer": dataclasses.asdict(optimizer),
          "mesh": dataclasses.asdict(mesh), "model": dataclasses.asdict(start.source.config),
          "data": start.data, "init_from": start.source.record()}


def check_resumable(workdir: pathlib.Path, wanted: dict) -> bool:
  """Whether `workdir` holds this run already (False: it is new); one line when it holds
  another: its config.json records other settings or another start."""
  path = workdir / CONFIG
  if not path.exists():
    return False
  try:
    have = json.loads(path.read_text())
  except ValueError:
    raise ValueError(f"{path} is damaged: delete the workdir to start again") from None
  wanted = json.loads(json.dumps(wanted))  # as JSON: tuples are lists
  if not isinstance(have, dict) or "grpo" not in have:
    raise ValueError(f"{workdir} holds no mhc-grpo run: start it in another workdir")
  for section in ("init_from", "grpo", "optimizer", "mesh"):
    if have.get(section) != wanted[section]:
      differ = _first_difference(have.get(section), wanted[section])
      raise ValueError(f"{workdir} holds a run with another {section} ({differ}): resume it "
                       "with its own settings (its config.json), or start in another workdir")
  return True


def _first_difference(have, wanted) -> str:
  if isinstance(have, dict) and isinstance(wanted, dict):
    for key in wanted:
      if have.get(key) != wanted[key]:
        return f"{key} {have.get(key)!r}, now {wanted[key]!r}"
  return f"{have!r}, now {wanted!r}"


def post_train(workdir: str, init_from: str | None, grpo: GRPOConfig,
               optimizer: OptimizerConfig = OptimizerConfig(), mesh: MeshConfig = MeshConfig(),
               progress: bool = True, devices=None) -> list[dict]:
  """GRPO in `workdir` from `init_from` (or resumes it); returns this call's metrics rows.
  Bad input is a one-line ValueError raised before anything is written."""
  workdir = pathlib.Path(workdir).absolute()  # orbax needs absolute paths
  start = read_start(init_from)
  prompts = read_prompts(grpo.prompts)
  fns = [reward_function(path) for path in grpo.rewards]
  preflight(fns, prompts[0])
  wanted = record(grpo, optimizer, mesh, start)
  resuming = check_resumable(workdir, wanted)
  # mhc-train's marker and rule: finished.json and the policy's checkpoint of the last step.
  if resuming and is_finished(workdir, grpo.steps):
    print(f"mhc-grpo: {workdir} is finished ({grpo.steps} steps); nothing to do", flush=True)
    return []
  make_mesh(mesh, devices)  # a mesh that does not fit the devices: its one line, now
  loaded = inference.load(start.source.path, argument="--init_from")
  check_prompt_lengths(prompts, loaded.tokenizer, grpo)
  try:
    from mhc_jax.lm import grpo_tunix
  except ImportError as err:
    raise ValueError(f"GRPO needs google-tunix ({one_line(err)}): pip install -e "
                     "'.[rl]'") from None
  workdir.mkdir(parents=True, exist_ok=True)
  write_atomically(workdir / CONFIG, json.dumps(wanted, indent=2))
  rows = grpo_tunix.run(workdir, start, loaded, prompts, fns, grpo, optimizer, mesh, progress,
                        devices)
  write_atomically(workdir / FINISHED, json.dumps(rows[-1] if rows else {"step": grpo.steps}))
  return rows
