"""The gin edge: preset files, and gin files plus bindings turned into config dataclasses.

Nothing else in `mhc_jax` imports gin: `train()` takes its configs as arguments, and entry
points (the CLI, `experiments/`) call `parse` to build them from a preset and bindings such
as `ModelConfig.residual = "mhc"`. Presets are named relative to the preset directory
(`shakespeare_tiny.gin`, `residual/mhc.gin`), or given as paths.
"""

import contextlib
import importlib.resources
import logging
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import gin

from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train_state import LoopConfig


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
# `train()`'s keyword -> the config class gin binds as e.g. `ModelConfig.d_model = 64`.
CONFIG_CLASSES = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
                  "mesh": MeshConfig, "loop": LoopConfig}
_CONFIGURABLE = {name: gin.external_configurable(cls, module="mhc_jax")
                 for name, cls in CONFIG_CLASSES.items()}


class GinError(ValueError):
  """A gin file or binding that does not parse; the message is one line naming it."""


def preset_names() -> list[str]:
  """Every preset, relative to `PRESET_DIR` (`residual/mhc.gin`)."""
  return sorted(path.relative_to(PRESET_DIR).as_posix() for path in PRESET_DIR.rglob("*.gin"))


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
        try:
          read(item)
        except Exception as err:  # gin raises many types; every one means a bad config
          raise GinError(f"bad gin {kind} {item!r}: {_quote_hint(err, item) or one_line(err)}"
                         ) from None
    try:
      configs = {name: make() for name, make in {**_CONFIGURABLE, **extra}.items()}
    except Exception as err:  # a config's own check, or a binding of the wrong type
      raise GinError(f"bad configuration: {one_line(err)}") from None
    return configs, gin.config_str()


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


def one_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"


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
