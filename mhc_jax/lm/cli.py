"""`mhc-train`: gin presets and bindings -> configs -> `train()`; exit codes 0 / 1 / 2 / 3 / 4.

    mhc-train --gin_file shakespeare_tiny.gin --workdir workdirs/shakespeare_tiny
    mhc-train --gin_file shakespeare_small.gin --gin_file residual/mhc.gin --workdir ...
    mhc-train --gin_file residual/mhc.gin --workdir ...   # over shakespeare_tiny.gin, the default
    python -m mhc_jax.lm.cli --gin_param 'ModelConfig.residual = "mhc"' --workdir ...
    mhc-train ... --init_from Qwen3-0.6B/       # start from pretrained weights (pretrained.py)
    mhc-train ... --multihost                   # on every host of a TPU pod, a shared WORKDIR
    mhc-train ... --multihost --coordinator host:port --num_processes N --process_id I

Exit 0: trained, stopped by SIGTERM / SIGINT with a checkpoint, or already finished.
Exit 1: a non-finite step under `LoopConfig.nonfinite = "stop"`. Exit 2: bad input, in one line.
Exit 3: with --multihost, another process died (one line, within seconds, not after JAX's
shutdown barrier times out): restart all processes with the same command to resume.
Exit 4: a checkpoint could not be written (a full disk): one line; the complete checkpoints
are left as they were, and the same command resumes from the newest once there is space.
"""

import argparse
import sys

from mhc_jax.checks import one_line
from mhc_jax.lm import checkpoint, distributed, presets, train as train_lib

# The experiment of a run whose files name none. Without it the configs' defaults would train
# a 6M-parameter model: far too slow for a first try on a CPU, and nothing the user chose.
DEFAULT_PRESET = "shakespeare_tiny.gin"


def presets_epilog() -> str:
  """--help's presets: those mhc-train runs, by kind, with the rule that composes them."""
  runnable = presets.mhc_train_presets()
  experiments = [name for name in runnable if presets.is_experiment(name)]
  listing = lambda names: "".join(f"    {name}\n" for name in names)
  return (
      f"presets, named relative to {presets.PRESET_DIR} (or give a file's path):\n"
      f"  experiments: {presets.BASE} and every file that includes it; each sets a whole run\n"
      f"  ({presets.BASE} alone: the config classes' defaults)\n{listing(experiments)}"
      "  add-ons: any other file, e.g. a residual variant. They apply after the experiment, in\n"
      f"  the order given, and over {DEFAULT_PRESET} when no --gin_file is an experiment; a\n"
      "  run's first line names every file in force, in order, and the model they set\n"
      f"{listing(name for name in runnable if name not in experiments)}"
      + "settings of other commands:\n"
      + "".join(f"  {folder} ({command})\n" for folder, command in
                presets.COMMAND_SETTINGS.items())
      + "settings of experiments/ scripts, which run from a source checkout only:\n"
      + "".join(f"  {folder} ({scripts})\n"
                for folder, scripts in presets.EXPERIMENT_SETTINGS.items()))


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="mhc-train", description=train_lib.__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=presets_epilog())
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable): a preset name or a path; how they "
                           "compose: below")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. 'ModelConfig.residual = \"mhc\"' (repeatable)")
  parser.add_argument("--workdir", required=True,
                      help="holds the run: checkpoints, metrics, config.json, finished.json; "
                           "re-running on it resumes from the latest checkpoint, and does "
                           "nothing once the run has finished")
  parser.add_argument("--init_from", metavar="DIR",
                      help="start from pretrained weights: a Hugging Face Llama / Qwen3 folder "
                           "or a workdir of mhc-train (its latest checkpoint); retrofitted when "
                           "ModelConfig.residual is hc, mhc or mhc_lite and DIR's is prenorm. "
                           "A resumed run continues from its own checkpoint")
  parser.add_argument("--no_progress", dest="progress", action="store_false",
                      help="no progress bar or progress lines (logs of batch jobs)")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  distributed.check_arguments(parser, args)
  return args


def start_line(files, given, configs) -> str:
  """What will train, before anything is built: the files in force, marking the default
  experiment where it was added, and the model and run they set."""
  note = f" (default: no --gin_file includes {presets.BASE})"
  names = ", ".join(file if file in given else file + note for file in files)
  model, data, loop = configs["model"], configs["data"], configs["loop"]
  residual = f"{model.residual} (n={model.num_streams})" if model.uses_streams else model.residual
  return (f"presets: {names} -> {residual}, d_model {model.d_model} x {model.num_layers} "
          f"layers, {loop.steps} steps of {data.batch_size} x {data.seq_len} tokens")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    files = presets.compose(args.gin_file, DEFAULT_PRESET)
    configs, bindings = presets.parse(files, args.gin_param)
  except presets.GinError as err:
    print(f"mhc-train: {err}", file=sys.stderr)
    return 2
  if args.multihost:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  checkpoint.hide_abandoned_restore_reads()
  checkpoint.hide_logged_write_failures()
  try:
    with distributed.exit_if_peer_lost(args.workdir, "mhc-train"):
      # The first line of a run that trains: which files are in force, in which order (the
      # default experiment marked where it was added). Not before: a bad input's line, or a
      # finished run's, stays the only one.
      train_lib.train(args.workdir, **configs, progress=args.progress, record=bindings,
                      init_from=args.init_from,
                      presets=f"mhc-train: {start_line(files, args.gin_file, configs)}")
  except ValueError as err:
    print(f"mhc-train: {one_line(err)}", file=sys.stderr)
    return 2
  except train_lib.NonFiniteError as err:
    print(f"mhc-train: {err}", file=sys.stderr)
    return 1
  except checkpoint.CheckpointWriteError as err:
    print(f"mhc-train: {err.strerror}", file=sys.stderr)
    return 4
  return 0


if __name__ == "__main__":
  sys.exit(main())
