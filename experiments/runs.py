"""The runs an experiment trains, as `compare_residuals`, `stability_map` and `retrofit` share
them: its preset, a workdir per run holding the configs it was trained with, trained one run
after another (a finished run is reused, an unfinished one resumes, a workdir trained with other
configs is an error), and a finished run's final parameters."""

import dataclasses
import json
import math
import pathlib

import jax
import orbax.checkpoint as ocp

from mhc_jax.lm import checkpoint, distributed, presets, train as train_lib
from mhc_jax.lm.files import write_atomically
from mhc_jax.lm.model import FLAT_SETTINGS, ModelConfig
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train_state import Trainer

PRESET_DIR = presets.PRESET_DIR / "compare"  # the comparisons' and the stability map's presets
RUN_CONFIG = "run.json"  # the configs a workdir was trained with


def preset_path(preset: str, folder: pathlib.Path = PRESET_DIR) -> pathlib.Path:
  """A preset name (`cpu`: `gin_configs/compare/cpu.gin`, or `folder/cpu.gin`) or a gin
  file's path."""
  path = pathlib.Path(preset) if preset.endswith(".gin") else folder / f"{preset}.gin"
  if not path.is_file():
    names = ", ".join(sorted(p.stem for p in folder.glob("*.gin")))
    raise ValueError(f"no preset {preset!r}: name one of {names}, or the path of a .gin file")
  return path


def diagnostics_every(steps: int, points: int) -> int:
  return max(1, steps // points)


def configs_json(configs: dict) -> dict:
  # Through JSON and back, so that a tuple and the list it was saved as compare equal.
  return json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in configs.items()}))


def devices_for(mesh: MeshConfig) -> list:
  return jax.devices()[:math.prod(mesh.shape)]


def use_compilation_cache(runs_dir: pathlib.Path) -> None:
  """Keeps compiled programs in `runs_dir/jax_cache` unless JAX already has a cache: the
  seeds of one variant compile the very same programs, which on a CPU costs as much as a
  short run."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_compilation_cache_dir", str((runs_dir / "jax_cache").absolute()))


# What says when an invocation stops, not what the run is: a resumed run may change it.
INVOCATION_FIELDS = {"loop": ("stop_after_step",)}


def _run_identity(record: dict) -> dict:
  """A run's record (as JSON) without `INVOCATION_FIELDS`."""
  return {group: ({k: v for k, v in fields.items() if k not in INVOCATION_FIELDS[group]}
                  if group in INVOCATION_FIELDS and isinstance(fields, dict) else fields)
          for group, fields in record.items()}


def check_run_config(workdir: pathlib.Path, configs: dict) -> None:
  """Records the run's configs in a new workdir; refuses one trained with others (an
  invocation's `LoopConfig.stop_after_step` aside)."""
  path, wanted = workdir / RUN_CONFIG, _run_identity(configs_json(configs))
  if not path.exists():
    workdir.mkdir(parents=True, exist_ok=True)
    # With --multihost every process may write it at once (the same text); none reads half.
    write_atomically(path, json.dumps(wanted, indent=2) + "\n")
    return
  found = _run_identity(with_added_defaults(json.loads(path.read_text()), configs))
  if FLAT_SETTINGS.keys() & found.get("model", {}).keys():  # recorded before variant settings
    found["model"] = configs_json({"model": ModelConfig.from_record(found["model"])})["model"]
  if found != wanted:
    changed = sorted(f"{group}.{key}" for group in wanted for key in wanted[group]
                     if found.get(group, {}).get(key) != wanted[group][key])
    raise ValueError(f"{workdir} was trained with other configs (differing: "
                     f"{', '.join(changed)}); choose another --out or delete that run")


def with_added_defaults(found: dict, configs: dict) -> dict:
  """A run's record `found`, each config's fields added since it was written filled in at
  their defaults: the run trained with them (e.g. `OptimizerConfig.static_map_lr_multiplier`,
  1.0, which changes nothing)."""
  for group, config in configs.items():
    if dataclasses.is_dataclass(config) and isinstance(found.get(group), dict):
      defaults = configs_json({group: type(config)()})[group]
      found[group] = {**{k: v for k, v in defaults.items() if k not in found[group]},
                      **found[group]}
  return found


class Stopped(Exception):
  """A run returned before its last step (SIGTERM / SIGINT, or `LoopConfig.stop_after_step`),
  with a checkpoint: the experiment stops too, and the same command resumes it."""


def ended_early(workdir: pathlib.Path, steps: int) -> bool:
  """Whether the run in `workdir`, just returned from `train`, stopped before `steps` (a
  signal, `LoopConfig.stop_after_step`). By its checkpoint, which every process saves
  together: finished.json is the first process's alone, and may not be written yet when
  another returns."""
  return (checkpoint.latest_step(workdir.absolute()) or 0) < steps


def train_or_reuse(runs: list[tuple[pathlib.Path, dict, dict]], prog: str,
                   progress: bool) -> None:
  """Trains (or resumes, or reuses) every run, one after another: (its workdir, `train`'s
  keyword arguments, what its workdir records: the configs and whatever else it depends on).
  `prog` names the experiment in the line a lost process prints. `Stopped` when a run stopped
  before its end, or a signal came when no step was left to take it (during a run's last
  step, or while a finished run was checked): no later run starts."""
  with train_lib.StopRequests() as stop:
    for i, (workdir, configs, record) in enumerate(runs, 1):
      check_run_config(workdir, record)
      finished = train_lib.is_finished(workdir, configs["loop"].steps)
      if jax.process_index() == 0:
        print(f"[{i}/{len(runs)}] {workdir.name}: "
              + ("finished, reused" if finished else "training"), flush=True)
      if not finished:
        with distributed.exit_if_peer_lost(workdir, f"{prog}: {workdir.name}"):
          train_lib.train(str(workdir), **configs, devices=devices_for(configs["mesh"]),
                          progress=progress)
        if ended_early(workdir, configs["loop"].steps):
          raise Stopped(f"{prog}: stopped in {workdir.name} (its checkpoint is saved); run the "
                        "same command to resume")
      if stop.signal_name is not None:
        raise Stopped(f"{prog}: {stop.signal_name} received; {workdir.name} is finished and no "
                      "later run started; run the same command to go on")


def final_params(trainer: Trainer, workdir: pathlib.Path, step: int):
  """The parameters of the run in `workdir` at `step`, laid out as `trainer`'s."""
  with ocp.CheckpointManager(workdir.absolute() / checkpoint.CHECKPOINTS) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(trainer.abstract_state)))
  return restored.state["params"]
