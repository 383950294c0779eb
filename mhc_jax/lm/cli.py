"""`mhc-train`: gin presets and bindings -> configs -> `train()`; exit codes 0 / 1 / 2 / 3.

    mhc-train --gin_file shakespeare_tiny.gin --workdir workdirs/tiny
    mhc-train --gin_file shakespeare_tiny.gin --gin_file residual/mhc.gin --workdir ...
    python -m mhc_jax.lm.cli --gin_param 'ModelConfig.residual = "mhc"' --workdir ...
    mhc-train ... --init_from Qwen3-0.6B/       # start from pretrained weights (pretrained.py)
    mhc-train ... --multihost                   # on every host of a TPU pod, a shared WORKDIR
    mhc-train ... --multihost --coordinator host:port --num_processes N --process_id I

Exit 0: trained, stopped by SIGTERM / SIGINT with a checkpoint, or already finished.
Exit 1: a non-finite step under `LoopConfig.nonfinite = "stop"`. Exit 2: bad input, in one line.
Exit 3: with --multihost, another process died (one line, within seconds, not after JAX's
shutdown barrier times out): restart all processes with the same command to resume.
"""

import argparse
import sys

from mhc_jax.lm import checkpoint, distributed, presets, train as train_lib

DEFAULT_PRESET = "shakespeare_tiny.gin"


def parse_args(argv):
  names = "\n".join(f"  {name}" for name in presets.preset_names())
  parser = argparse.ArgumentParser(
      prog="mhc-train", description=train_lib.__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"presets (name them relative to {presets.PRESET_DIR}; residual/ ones add a "
             f"variant to a run,\ncompare/ and sweeps/ ones configure "
             f"experiments/compare_residuals.py and experiments/sweep.py):\n{names}")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable): a preset name or a path "
                           f"(default: {DEFAULT_PRESET})")
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


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  # Without a file the configs' defaults would train a 6M-parameter model: far too slow for
  # a first try on a CPU, and nothing the user chose.
  files = args.gin_file or [DEFAULT_PRESET]
  try:
    configs, bindings = presets.parse(files, args.gin_param)
  except presets.GinError as err:
    print(f"mhc-train: {err}", file=sys.stderr)
    return 2
  if not args.gin_file:
    print(f"mhc-train: no --gin_file given: using {DEFAULT_PRESET}", file=sys.stderr, flush=True)
  if args.multihost:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  checkpoint.hide_abandoned_restore_reads()
  try:
    with distributed.exit_if_peer_lost(args.workdir, "mhc-train"):
      train_lib.train(args.workdir, **configs, progress=args.progress, record=bindings,
                      init_from=args.init_from)
  except ValueError as err:
    print(f"mhc-train: {presets.one_line(err)}", file=sys.stderr)
    return 2
  except train_lib.NonFiniteError as err:
    print(f"mhc-train: {err}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
