"""The README's code examples run as written and compute what the README says: a fresh mHC
stack is its pre-norm baseline (every stream a copy of it) plus a small perturbation. Its shell
commands run as written after its set-up command, and its step-0 loss claim is the one tested."""

import importlib.util
import pathlib
import re
import shlex
import textwrap
import tomllib

import flax.linen as nn
import jax.numpy as jnp
import pytest

import mhc_jax
from mhc_jax.lm import presets

README = pathlib.Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
NUM_STREAMS, INPUT = 4, jnp.ones((2, 16, 64))  # as in both examples


def rel_err(out, ref):
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_nnx(namespace):
  x = INPUT
  for block in namespace["blocks"]:  # the same sub-layers as plain pre-norm residuals
    x = x + block.attn(block.attn_norm(x))
    x = x + block.mlp(block.mlp_norm(x))
  # `out` sums the streams, each about the baseline
  assert rel_err(namespace["out"], NUM_STREAMS * x) < 0.02


def check_linen(namespace):
  params = namespace["variables"]["params"]
  layer = lambda module, name, x: module.apply({"params": params[name]}, x)
  x = INPUT
  x = x + layer(nn.MultiHeadDotProductAttention(num_heads=4), "MultiHeadDotProductAttention_0",
                layer(nn.RMSNorm(), "RMSNorm_0", x))
  x = x + layer(nn.Dense(64), "Dense_0", layer(nn.RMSNorm(), "RMSNorm_1", x))
  out = namespace["block"].apply(namespace["variables"], namespace["streams"])
  assert rel_err(out, mhc_jax.expand_streams(x, NUM_STREAMS)) < 0.02


CHECKS = {"nnx.Module": check_nnx, "nn.compact": check_linen}  # marker in the example -> check


def test_readme_has_examples_and_every_one_is_checked():
  assert len(EXAMPLES) >= 2
  assert all(sum(marker in example for marker in CHECKS) == 1 for example in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_and_is_near_its_pre_norm_baseline(index):
  namespace = {}
  exec(compile(EXAMPLES[index], f"README example {index}", "exec"), namespace)
  next(check for marker, check in CHECKS.items() if marker in EXAMPLES[index])(namespace)


def test_readme_states_the_step_0_loss_bounds_that_the_model_test_checks():
  from test_model import STEP0_LOSS_BOUNDS  # tests/ is on the path of pytest's test modules
  (narrow, narrow_bound), (wide, wide_bound) = sorted(STEP0_LOSS_BOUNDS.items())
  claim = (f"within {narrow_bound} nats of ln(vocab) at d_model {narrow} and {wide_bound} at "
           f"d_model {wide}")
  assert claim in " ".join(README.read_text().split())


# The README's shell commands run as written after its set-up command: each names a program
# the set-up installs, a module that imports, presets that exist, and workdirs that earlier
# commands make (checked, not run: they train for minutes to hours).
SCRIPTS = set(tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["scripts"])
VENV = ".venv"  # what the set-up command makes
VENV_BIN = f"{VENV}/bin/"


def shell_commands(markdown: str) -> list[list[str]]:
  """The words of every command in the indented code blocks that are not Python, in order:
  continued lines joined, `a && b` two commands, comments dropped."""
  unfenced = re.sub(r"```.*?```", "", markdown, flags=re.S)  # the Python examples
  blocks = [textwrap.dedent(block) for block in re.findall(r"(?:^    .*\n)+", unfenced, re.M)]
  return [shlex.split(command, comments=True) for block in blocks if not is_python(block)
          for line in block.replace("\\\n", " ").splitlines() for command in line.split(" && ")]


def is_python(block: str) -> bool:
  try:
    compile(block, "README block", "exec")
  except SyntaxError:
    return False
  return True


def imports(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a parent package is missing
    return False


def after(args: list[str], option: str) -> str | None:
  """The word after the first `option` in `args`."""
  return args[args.index(option) + 1] if option in args else None


def names_a_preset(module: str, preset: str) -> bool:
  """Whether experiments.X --preset PRESET finds it, the way the script looks it up."""
  experiment = importlib.import_module(module)
  folder = [experiment.PRESET_DIR] if hasattr(experiment, "PRESET_DIR") else []
  try:
    experiment.preset_path(preset, *folder)
  except ValueError:
    return False
  return True


def problems(commands: list[list[str]]) -> list[str]:
  """What would stop each command from running as written after the ones before it."""
  found, made = [], set()  # made: folders that earlier commands create
  for program, *args in commands:
    line = " ".join([program, *args])
    if program == "python3" and args[:2] == ["-m", "venv"]:
      made.add(args[2])
      continue
    name = program.removeprefix(VENV_BIN)
    if name == program or VENV not in made:
      found.append(f"{line}: {program} is not in the {VENV_BIN} that the set-up makes")
    elif name not in SCRIPTS | {"python", "pip"}:
      found.append(f"{line}: {name} is neither python, pip nor a script of pyproject.toml")
    module = args[1] if name == "python" and args[:1] == ["-m"] else None
    if name == "python" and not (module and imports(module)):
      found.append(f"{line}: names no module that imports")
    found += [f"{line}: no preset {word}" for word in args
              if word.endswith(".gin") and word not in presets.preset_names()]
    preset = after(args, "--preset")
    if preset is not None and not names_a_preset(module, preset):
      found.append(f"{line}: {module} has no preset {preset}")
    source = after(args, "--init_from")
    if source is not None and source.startswith("workdirs/") and source not in made:
      found.append(f"{line}: no command before it makes {source}")
    for folder in filter(None, (after(args, "--workdir"), after(args, "--out"))):
      if folder in made:  # it would resume that command's run, or refuse to
        found.append(f"{line}: {folder} is an earlier command's workdir too")
      made.add(folder)
  return found


def test_readme_shell_commands_run_as_written_after_the_set_up_command():
  commands = shell_commands(README.read_text())
  assert commands[0] == ["python3", "-m", "venv", ".venv"]  # the set-up, first
  assert len(commands) >= 12
  assert problems(commands) == []


@pytest.mark.parametrize("command, problem", [
    ("mhc-train --workdir workdirs/a", "mhc-train is not in the .venv/bin/"),
    (".venv/bin/mhc-trian --workdir workdirs/a", "mhc-trian is neither python, pip nor"),
    (".venv/bin/python -m experiments.no_such", "names no module that imports"),
    (".venv/bin/mhc-train --gin_file residual/none.gin", "no preset residual/none.gin"),
    (".venv/bin/python -m experiments.retrofit --preset gpu", "has no preset gpu"),
    (".venv/bin/mhc-train --init_from workdirs/tiny --workdir workdirs/b",
     "no command before it makes workdirs/tiny"),
    (".venv/bin/mhc-train --workdir workdirs/first", "is an earlier command's workdir too"),
])
def test_each_kind_of_broken_command_is_found(command, problem):
  set_up = "python3 -m venv .venv && .venv/bin/mhc-train --workdir workdirs/first"
  commands = shell_commands(f"    {set_up}\n\n    {command}\n")
  (found,) = problems(commands)
  assert found.startswith(command) and problem in found, found


def test_ci_runs_the_readmes_set_up_and_test_commands():
  ci = (README.parent / ".ci" / "run").read_text().splitlines()
  text = README.read_text()
  set_up = re.search(r"^    (python3 -m venv \.venv && \.venv/bin/pip install -e '\.\[test\]')",
                     text, re.M)
  test = re.search(r"^    (\.venv/bin/python -m pytest .*)$", text, re.M)
  assert set_up and test
  assert ci[-2] == set_up.group(1).replace("pip install -e", "pip install -q -e")
  assert ci[-1] == test.group(1)
