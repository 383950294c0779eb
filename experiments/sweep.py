"""Sweeps over gin bindings: locally one run after another, or on every host of a TPU pod.

A sweep spec is a gin file binding `Sweep`:

    Sweep.gin_files = ["shakespeare_tiny.gin"]              # every run's configs
    Sweep.bindings = ["LoopConfig.steps = 300"]             # every run's extra bindings
    Sweep.grid = {"ModelConfig.residual": ["prenorm", "mhc"], "LoopConfig.seed": [0, 1]}
    Sweep.runs = [{"ModelConfig.residual": "mhc", "MHC.num_streams": 2}]  # and/or a list

Every grid point (and every listed run) trains in `OUT/<name>/`, its name made from its
bindings; finished runs (`mhc_jax.lm.train.is_finished`) are skipped, unfinished ones resume.

    python -m experiments.sweep SPEC --out DIR                     # local, run after run
    python -m experiments.sweep SPEC --out DIR --multihost         # on every host of a pod
    python -m experiments.sweep SPEC --out /mnt/shared/sweep --tpu NAME --zone Z [--execute]

`--multihost` makes every process call `jax.distributed.initialize` (auto-detected on TPU
pods; `--coordinator host:port --num_processes N --process_id I` elsewhere) and then train
each run together, the global batch split over processes; when one process dies, the others
exit at once with code 3 (see `mhc_jax/lm/distributed.py`), and a rerun resumes. `--tpu`
prints (or with `--execute` runs) the `gcloud ... ssh --worker=all` command that starts that
on a TPU VM pod.
OUT must be storage every host sees at the same path (NFS, Filestore, a gcsfuse mount): the
hosts write one checkpoint together and all look for `finished.json` there.
"""

import argparse
import dataclasses
import itertools
import pathlib
import re
import shlex
import subprocess
import sys

import gin

from experiments.runs import ended_early
from mhc_jax.checks import one_line
from mhc_jax.lm import cli, distributed, presets, train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Sweep:
  gin_files: tuple[str, ...] = ()
  bindings: tuple[str, ...] = ()
  grid: dict = dataclasses.field(default_factory=dict)
  runs: tuple[dict, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...]


def _binding(name: str, value) -> str:
  return f"{name} = {value!r}"


def _run_name(overrides: dict) -> str:
  """{"ModelConfig.residual": "mhc", "LoopConfig.seed": 1} -> "residual=mhc,seed=1"."""
  parts = [f"{name.rsplit('.', 1)[-1]}={value}" for name, value in overrides.items()]
  return re.sub(r"[^A-Za-z0-9=,._-]", "_", ",".join(parts)) or "base"


def expand(sweep: Sweep) -> list[Run]:
  """The grid's cartesian product, then the listed runs; names must come out unique."""
  names = list(sweep.grid)
  points = [dict(zip(names, values))
            for values in itertools.product(*(sweep.grid[n] for n in names))] if names else []
  runs = []
  for overrides in points + [dict(r) for r in sweep.runs]:
    bindings = tuple(sweep.bindings) + tuple(_binding(k, v) for k, v in overrides.items())
    runs.append(Run(_run_name(overrides), tuple(sweep.gin_files), bindings))
  duplicates = {r.name for r in runs if [s.name for s in runs].count(r.name) > 1}
  if duplicates:
    raise ValueError(f"sweep runs must differ in their bindings; repeated: {sorted(duplicates)}")
  if not runs:
    raise ValueError("sweep has no runs: bind Sweep.grid or Sweep.runs")
  return runs


def load_spec(path: str) -> Sweep:
  return presets.parse([path], extra={"sweep": Sweep})[0]["sweep"]


def train_command(run: Run, workdir: pathlib.Path) -> list[str]:
  args = [sys.executable, "-m", "mhc_jax.lm.cli", "--workdir", str(workdir)]
  for f in run.gin_files:
    args += ["--gin_file", f]
  for b in run.bindings:
    args += ["--gin_param", b]
  return args


def run_configs(run: Run) -> tuple[dict, str]:
  """The run's `train` configs and its bindings' text, composed as mhc-train composes them."""
  return presets.parse(presets.compose(run.gin_files, cli.DEFAULT_PRESET), run.bindings)


def is_finished(run: Run, workdir: pathlib.Path) -> bool:
  return train_lib.is_finished(workdir, run_configs(run)[0]["loop"].steps)


def run_local(runs: list[Run], out: pathlib.Path) -> None:
  """One subprocess per run, so gin state and compiled programs never leak between runs."""
  for i, run in enumerate(runs, 1):
    workdir = out / run.name
    if is_finished(run, workdir):
      print(f"[{i}/{len(runs)}] {run.name}: finished, skipped", flush=True)
      continue
    print(f"[{i}/{len(runs)}] {run.name}", flush=True)
    code = subprocess.call(train_command(run, workdir), cwd=REPO)
    if code:
      raise SystemExit(f"sweep: run {run.name} failed with exit code {code}; rerun the sweep "
                       "to resume it")
    stop_if_ended_early(run, workdir)


def run_multihost(runs: list[Run], out: pathlib.Path, args) -> None:
  """Every process runs this same loop; each run is trained by all processes together."""
  import jax
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  lead = jax.process_index() == 0
  with train_lib.StopRequests() as stop:  # one across the runs: see stop_if_ended_early
    for i, run in enumerate(runs, 1):
      workdir = out / run.name
      if is_finished(run, workdir):  # the same answer on every host: shared storage
        continue
      if lead:
        print(f"[{i}/{len(runs)}] {run.name} on {jax.process_count()} processes", flush=True)
      configs, bindings = run_configs(run)  # what run_local's subprocesses get
      with distributed.exit_if_peer_lost(workdir, f"sweep: run {run.name}"):
        train_lib.train(str(workdir), **configs, progress=lead, record=bindings)
      stop_if_ended_early(run, workdir, stop.signal_name)


def stop_if_ended_early(run: Run, workdir: pathlib.Path, signal_name: str | None = None) -> None:
  """A run stopped early (a signal, `LoopConfig.stop_after_step`; with its checkpoint) stops
  the sweep, not just the run: one line and exit 0, as mhc-train's own stop. So does a
  signal (`signal_name`) that came during its last step, when no step was left to take it."""
  if ended_early(workdir, run_configs(run)[0]["loop"].steps):
    print(f"sweep: stopped in {run.name} (its checkpoint is saved); rerun the sweep to resume "
          "it", file=sys.stderr, flush=True)
    raise SystemExit(0)
  if signal_name is not None:
    print(f"sweep: {signal_name} received; {run.name} is finished and no later run started; "
          "rerun the sweep to go on", file=sys.stderr, flush=True)
    raise SystemExit(0)


def tpu_command(args) -> list[str]:
  remote = " ".join(shlex.quote(a) for a in [
      "python3", "-m", "experiments.sweep", args.spec, "--out", args.out, "--multihost"])
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}",
          *([f"--project={args.project}"] if args.project else []), "--worker=all",
          f"--command=cd {shlex.quote(args.repo_on_tpu)} && {remote}"]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("spec", help="gin file binding Sweep.* (looked up in gin_configs/ too)")
  parser.add_argument("--out", required=True, help="folder holding one workdir per run")
  parser.add_argument("--dry_run", action="store_true", help="print the runs' commands only")
  distributed.add_arguments(parser)
  parser.add_argument("--tpu", help="TPU VM pod name: print the command for all its workers")
  parser.add_argument("--zone")
  parser.add_argument("--project")
  parser.add_argument("--repo_on_tpu", default="mhc-jax", help="checkout path on the workers")
  parser.add_argument("--execute", action="store_true", help="with --tpu: run the command")
  args = parser.parse_args(argv)
  distributed.check_arguments(parser, args)
  try:
    runs = expand(load_spec(args.spec))
  except ValueError as err:  # presets.GinError, or a grid that expands to nothing usable
    print(f"sweep: bad spec {args.spec}: {one_line(err, with_type=False)}", file=sys.stderr)
    return 2
  out = pathlib.Path(args.out)
  if args.tpu:
    if not args.zone:
      parser.error("--tpu needs --zone")
    command = tpu_command(args)
    print(shlex.join(command))
    return subprocess.call(command) if args.execute else 0
  if args.dry_run:
    for run in runs:
      print(shlex.join(train_command(run, out / run.name)))
    return 0
  try:
    if args.multihost:
      run_multihost(runs, out.absolute(), args)
    else:
      run_local(runs, out)
  except ValueError as err:  # a binding gin refuses, a damaged finished.json, a bad config
    print(f"sweep: {one_line(err, with_type=False)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
