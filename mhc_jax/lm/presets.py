"""The gin edge: preset files, and gin files plus bindings turned into config dataclasses.

Nothing else in `mhc_jax` imports gin: `train()` takes its configs as arguments, and entry
points (the CLI, `experiments/`) call `parse` to build them from a preset and bindings such
as `ModelConfig.residual = "mhc"`. Presets are named relative to the preset directory
(`shakespeare_tiny.gin`, `residual/mhc.gin`), or given as paths. `compose` says which files a
run applies: an experiment (a file that includes base.gin) and the add-ons that change it.
"""

import contextlib
import dataclasses
import importlib.resources
import logging
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import gin

from mhc_jax.checks import one_line
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import FLAT_SETTINGS, ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train import LoopConfig


def _preset_dir() -> pathlib.Path:
  """The presets' directory. A wheel ships them as `mhc_jax/gin_configs/` (pyproject.toml
  maps that package onto the checkout's top-level gin_configs/, their one source); a checkout,
  and the editable install that points into it, has only the top-level folder. Either is a
  real directory, which gin needs: it resolves a preset's `include`s on its search path."""
  shipped = importlib.resources.files("mhc_jax") / "gin_configs"
  if shipped.is_dir():
    return pathlib.Path(str(shipped))
  return pathlib.Path(__file__).resolve().parents[2] / "gin_configs"


PRESET_DIR = _preset_dir()
BASE = "base.gin"  # every experiment includes it; a file that does not is an add-on
# The presets of the experiments/ scripts, by folder, and the scripts that read them: they bind
# the scripts' own settings too (`Comparison.seeds`), so only those, from a checkout, run them.
EXPERIMENT_SETTINGS = {
    folder: " or ".join(f"python -m experiments.{script}" for script in scripts)
    for folder, scripts in {"compare/": ("compare_residuals", "stability_map"),
                            "retrofit/": ("retrofit",), "sweeps/": ("sweep",)}.items()}
# The presets of the other commands, by folder: what they bind is theirs alone.
COMMAND_SETTINGS = {"grpo/": "mhc-grpo"}
# `train()`'s keyword -> the config class gin binds as e.g. `ModelConfig.d_model = 64`.
CONFIG_CLASSES = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
                  "mesh": MeshConfig, "loop": LoopConfig}
_CONFIGURABLE = {name: gin.external_configurable(cls, module="mhc_jax")
                 for name, cls in CONFIG_CLASSES.items()}
# Each variant's settings, bound as `MHC.sinkhorn_iters = 20`: the variant a run trains takes
# its class's bindings.
_SETTINGS = {name: (entry.settings, gin.external_configurable(entry.settings, module="mhc_jax"))
             for name, entry in RESIDUALS.items() if entry.settings is not None}


class GinError(ValueError):
  """A gin file or binding that does not parse; the message is one line naming it."""


def preset_names() -> list[str]:
  """Every preset, relative to `PRESET_DIR` (`residual/mhc.gin`)."""
  return sorted(path.relative_to(PRESET_DIR).as_posix() for path in PRESET_DIR.rglob("*.gin"))


def mhc_train_presets() -> list[str]:
  """The presets mhc-train runs: all but the experiments/ scripts' settings."""
  others = tuple(EXPERIMENT_SETTINGS) + tuple(COMMAND_SETTINGS)
  return [name for name in preset_names() if not name.startswith(others)]


def is_experiment(file: str) -> bool:
  """Whether gin file `file` sets a whole run: it is base.gin or includes it, at any depth
  (shakespeare_tiny.gin, tpu_pod_mhc.gin). Any other file (residual/mhc.gin, or one's own that
  includes nothing) is an add-on: it changes an experiment. Bindings of configurables other
  than the five are skipped here: they are `parse`'s to report."""
  with _gin_scope():
    tree = _read("file", file, lambda name: gin.parse_config_file(name, skip_unknown=True))
  base = (PRESET_DIR / BASE).resolve()
  return any(_found(name) == base for name in _file_and_includes(tree))


def compose(files: Sequence[str], default: str) -> list[str]:
  """The gin files a run applies, in order: the experiments among `files`, `default` when
  there is none, then the add-ons, each in the order given. An add-on given before its
  experiment applies after it all the same: the experiment would otherwise override it
  (shakespeare_tiny.gin binds `ModelConfig.residual`, so residual/mhc.gin before it would
  train pre-norm). A preset of an experiments/ script is one line naming that script."""
  for file in files:
    for folder, scripts in EXPERIMENT_SETTINGS.items():
      if _found(file).is_relative_to((PRESET_DIR / folder).resolve()):
        raise GinError(f"{file} is for {scripts} (from a checkout), not for mhc-train")
    for folder, command in COMMAND_SETTINGS.items():
      if _found(file).is_relative_to((PRESET_DIR / folder).resolve()):
        raise GinError(f"{file} is for {command}, not for mhc-train")
  experiments = [file for file in files if is_experiment(file)]
  return (experiments or [default]) + [file for file in files if file not in experiments]


def _file_and_includes(tree) -> Iterator[str]:
  """The names in gin's record of a parsed file: the file, then what it includes, depth first."""
  yield tree.filename
  for include in tree.includes:
    yield from _file_and_includes(include)


def _found(name: str) -> pathlib.Path:
  """The file gin reads for `name`: the path as given, else the one under its search path."""
  path = pathlib.Path(name)
  return (path if path.is_file() else PRESET_DIR / path).resolve()


def parse(files: Sequence[str], bindings: Sequence[str] = (),
          extra: Mapping[str, Callable] = {}) -> tuple[dict, str]:
  """Gin files, then bindings -> (configs, the bindings' text for the record).

  configs: `{"model": ModelConfig, "data": ..., "optimizer": ..., "mesh": ..., "loop": ...}`
  built from the bindings (defaults where unbound), plus `name: make()` for each gin
  configurable in `extra` (an experiment's own settings). gin's global state is cleared
  before and after, so calls never see each other's bindings.
  """
  with _gin_scope():
    for kind, items, read in (("file", files, gin.parse_config_file),
                              ("binding", bindings, gin.parse_config)):
      for item in items:  # one at a time, so the message names the culprit
        _read(kind, item, read)
    try:
      configs = {name: make() for name, make in {**_CONFIGURABLE, **extra}.items()}
      configs["model"] = _with_bound_settings(configs["model"])
    except GinError:
      raise
    except Exception as err:  # a config's own check, or a binding of the wrong type
      raise GinError(f"bad configuration: {one_line(err)}") from None
    return configs, gin.config_str()


def _with_bound_settings(model: ModelConfig) -> ModelConfig:
  """`model` with its variant's settings as gin binds them; one line for bindings of another
  variant's settings (they would change nothing: a mistake)."""
  for name, (cls, make) in _SETTINGS.items():
    bound = make()
    if name == model.residual:
      model = dataclasses.replace(model, residual_settings=bound)
    elif bound != cls():
      field = next(f.name for f in dataclasses.fields(cls)
                   if getattr(bound, f.name) != getattr(cls(), f.name))
      own = RESIDUALS[model.residual].settings
      reads = own is not None and field in {f.name for f in dataclasses.fields(own)}
      instead = f"bind {own.__name__}.{field}" if reads else "remove the binding"
      raise GinError(f"{cls.__name__}.{field} is bound, but ModelConfig.residual is "
                     f"{model.residual!r}, which does not read it: {instead}, or set "
                     f"ModelConfig.residual = {name!r}")
  return model


def _read(kind: str, item: str, read: Callable):
  """`read(item)`'s result; whatever gin raises becomes one line naming `item`."""
  try:
    return read(item)
  except Exception as err:  # gin raises many types; every one means a bad config
    hint = _quote_hint(err, item) or _moved_hint(err) or one_line(err)
    raise GinError(f"bad gin {kind} {item!r}: {hint}") from None


def _moved_hint(err: BaseException) -> str | None:
  """For a binding of a ModelConfig field that became a variant's setting
  (`ModelConfig.sinkhorn_iters`), the binding that replaced it."""
  match = re.search(r"ModelConfig.* named '(\w+)'", str(err))
  if match is None or match.group(1) not in FLAT_SETTINGS:
    return None
  field = FLAT_SETTINGS[match.group(1)]
  owners = [cls.__name__ for cls, _ in _SETTINGS.values()
            if field in {f.name for f in dataclasses.fields(cls)}]
  return (f"ModelConfig.{match.group(1)} is now a setting of the residual variant: bind "
          f"{' or '.join(f'{owner}.{field}' for owner in owners)} (the class of "
          f"ModelConfig.residual's variant)")


def scoped_configs(scope: str) -> dict:
  """The five configs as `parse` builds them, but with the bindings of gin scope `scope`
  (`finetune/LoopConfig.steps = 100`) over the unscoped ones: a second stage's configs in
  the same preset. Called from an `extra` of `parse`, while its bindings are in force."""
  with gin.config_scope(scope):
    return {name: make() for name, make in _CONFIGURABLE.items()}


@contextlib.contextmanager
def _gin_scope() -> Iterator[None]:
  gin.clear_config()
  gin.add_config_file_search_path(str(PRESET_DIR))
  # gin's package-resource reader logs an error for every file it later finds on the search
  # path; a file found nowhere still raises, so nothing is lost by hiding these.
  root = logging.getLogger()
  hide = lambda record: not record.getMessage().startswith("Path not found")
  root.addFilter(hide)
  try:
    yield
  finally:
    root.removeFilter(hide)
    gin.clear_config()


def _quote_hint(err: BaseException, item: str) -> str | None:
  """For gin's error on a bare word (`= mhc`), nearly always a string left unquoted: says so,
  with the binding quoted where `item` is one."""
  match = re.search(r"<ast\.Name object .*Failed to parse token '(\w+)'", str(err), re.S)
  if not isinstance(err, SyntaxError) or match is None:
    return None
  word = match.group(1)
  fixed, found = re.subn(rf"=\s*{word}\b", f'= "{word}"', item, count=1)
  example = fixed if found else f'"{word}"'
  return f"{word!r} is not a value gin can read; strings need quotes, e.g. {example}"
