"""`mhc-grpo`: GRPO post-training of a trained model, gin-configured; exit codes 0 / 2.

    mhc-grpo --gin_file grpo/word_problems.gin --gin_param 'GRPOConfig.prompts = "train.jsonl"'
             --init_from workdirs/finetuned --workdir workdirs/grpo

Presets live in `gin_configs/grpo/` and bind `GRPOConfig.*` (what `mhc_jax.lm.grpo` says),
`OptimizerConfig.*` (the policy's optimizer; its schedule spans `GRPOConfig.steps`) and
`MeshConfig.*`. The model is `--init_from`'s, so `ModelConfig` / `DataConfig` / `LoopConfig`
bindings are refused. Rerun the same command on WORKDIR to resume; once finished it does
nothing. Exit 2: bad input, in one line, before anything is written. Needs the `[rl]` extra.
"""

import argparse
import sys

import gin

from mhc_jax.checks import one_line
from mhc_jax.lm import grpo as grpo_lib, presets

GRPO_CONFIG = gin.external_configurable(grpo_lib.GRPOConfig, module="mhc_jax")
# Configs `presets.parse` builds that a post-training does not read: the model is init_from's.
NOT_READ = ("model", "data", "loop")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="mhc-grpo", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin config file (repeatable): a preset name such as "
                           "grpo/word_problems.gin, or a path")
  parser.add_argument("--gin_param", action="append", default=[],
                      help="gin binding, e.g. 'GRPOConfig.group_size = 8' (repeatable)")
  parser.add_argument("--init_from", metavar="DIR",
                      help="the model to post-train: a workdir of mhc-train (e.g. a fine-tune) "
                           "or a Hugging Face folder; it is also the KL's reference")
  parser.add_argument("--workdir", required=True,
                      help="holds the run; rerunning on it resumes")
  parser.add_argument("--no_progress", dest="progress", action="store_false",
                      help="no progress bar")
  return parser.parse_args(argv)


def load_configs(files, bindings) -> dict:
  """-> {"grpo", "optimizer", "mesh"}; GinError for a binding of a config it does not read."""
  defaults, _ = presets.parse([], ())
  configs, _ = presets.parse(files, bindings, extra={"grpo": GRPO_CONFIG})
  for name in NOT_READ:
    if configs[name] != defaults[name]:
      cls = type(configs[name]).__name__
      raise presets.GinError(f"{cls} is bound, but mhc-grpo post-trains the --init_from model "
                             f"as it is: remove the {cls} bindings")
  return {name: configs[name] for name in ("grpo", "optimizer", "mesh")}


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    configs = load_configs(args.gin_file, args.gin_param)
    grpo_lib.post_train(args.workdir, args.init_from, progress=args.progress, **configs)
  except ValueError as err:  # GinError too
    print(f"mhc-grpo: {one_line(err, with_type=False)}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
