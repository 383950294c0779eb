"""Where a run starts when not from scratch: `train(..., init_from=DIR)`, `mhc-train --init_from`.

DIR is a Hugging Face Llama / Qwen3 folder (`config.json` with `model_type`, safetensors: see
`hf.py`) or a workdir of this project (`config.json` with a "model" section, and the
parameters of its latest complete checkpoint; its optimizer state is not taken). The run's
`ModelConfig` must compute DIR's function: every field of `FUNCTION_FIELDS` agrees, or one
line names the first binding to set (and the others). The residual then decides:

    DIR's own residual (and settings):     DIR's weights as they are
    a stream variant from prenorm:         retrofitted (`retrofitting.py`), same logits, over
                                           the run's settings (num_streams), averaged at the end
                                           (stream_reduction "mean", as `retrofit_config` has)

and nothing else. What changes how the model runs, not what it computes (dtype, scan_layers,
remat, attention, MHC.sinkhorn_backend, init_std), is the run's own. Parameters are float32, as
a fresh model's are. Every check reads only: nothing is written until the weights are in.
"""

import dataclasses
import pathlib

from flax import nnx
from jax.sharding import Mesh

from mhc_jax.lm import checkpoint
from mhc_jax.lm.hf import config_from_hf, load_hf_checkpoint, read_json
from mhc_jax.lm.model import ModelConfig, Transformer, block_params, from_blocks, outer_params
from mhc_jax.lm.residuals import function_settings
from mhc_jax.lm.retrofitting import (RETROFIT_RESIDUALS, retrofit_config, with_sites,
                                     with_stream_embedding)

HUGGINGFACE, WORKDIR = "huggingface", "workdir"
CONFIG = "config.json"
# The ModelConfig fields that fix a model's function, each with the attribute that holds its
# value in force (the field may be None, the default: num_kv_heads = num_heads, ...).
FUNCTION_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers",
    "num_heads": "num_heads", "num_kv_heads": "kv_heads", "head_dim_override": "head_dim",
    "mlp_dim": "mlp_dim", "qk_norm": "qk_norm", "embed_scale": "embed_scale",
    "tie_embeddings": "tie_embeddings", "rope_base": "rope_base", "norm_eps": "norm_eps"}
# What every stream model adds to them; its own settings come from its entry in `RESIDUALS`
# (all of its settings class's fields but the runtime ones).
STREAM_FIELDS = {"stream_reduction": "stream_reduction", "stream_embed": "stream_embed"}


@dataclasses.dataclass(frozen=True)
class Source:
  """A pretrained model's folder, read as far as its config and its checkpoints' names."""

  path: pathlib.Path  # absolute
  kind: str  # HUGGINGFACE or WORKDIR
  config: ModelConfig  # the model DIR holds
  step: int | None = None  # a workdir's latest complete checkpoint

  def record(self) -> dict:
    """What `config.json` of the run records under "init_from"."""
    step = {"step": self.step} if self.kind == WORKDIR else {}
    return {"path": str(self.path), "kind": self.kind, **step,
            "residual": self.config.residual}


def read_source(init_from: str, argument: str = "init_from") -> Source:
  """DIR -> its `Source`; one-line ValueError naming the file or field at fault, DIR called
  `argument` (the caller's name for it: mhc-train's init_from, mhc-generate's --from)."""
  folder = pathlib.Path(init_from).expanduser().resolve()
  if not folder.is_dir():
    raise ValueError(f"{argument} {folder} is not a directory")
  config_file = folder / CONFIG
  if not config_file.is_file():
    raise ValueError(f"{argument} {folder} holds no {CONFIG}: neither a Hugging Face checkpoint "
                     "nor an mhc-train workdir")
  config = read_json(config_file)
  if not isinstance(config, dict):
    raise ValueError(f"{config_file} holds no JSON object")
  if "model" in config:
    return _workdir_source(folder, config["model"], argument)
  if "model_type" in config or "architectures" in config:
    return Source(folder, HUGGINGFACE, config_from_hf(config))
  raise ValueError(f"{config_file} has neither model_type (a Hugging Face checkpoint) nor a "
                   "model section (an mhc-train workdir)")


def _workdir_source(folder: pathlib.Path, fields, argument: str) -> Source:
  try:
    config = ModelConfig.from_record(fields)
  except TypeError as err:  # not a dict, or a field this version does not know
    raise ValueError(f"{folder / CONFIG}'s model section is no ModelConfig: {err}") from None
  step = checkpoint.latest_step(folder)
  if step is None:
    raise ValueError(f"{argument} {folder} holds no complete checkpoint in "
                     f"{checkpoint.CHECKPOINTS}/: nothing to start from")
  return Source(folder, WORKDIR, config, step)


def check_config(model: ModelConfig, source: Source) -> bool:
  """One-line ValueError unless a run of `model` can start from `source`; -> whether it is
  retrofitted."""
  have = source.config
  name = f"the checkpoint {source.path}"
  if have.residual == model.residual:
    values = function_values(have)
  elif have.residual == "prenorm" and model.residual in RETROFIT_RESIDUALS:
    # The sites are new: they take the run's settings.
    have = retrofit_config(have, model.residual, stream_embed=model.stream_embed,
                           **dataclasses.asdict(model.residual_settings))
    name += f" retrofitted to {model.residual}"
    values = function_values(have, with_settings=False)
  else:
    also = (f", or {', '.join(RETROFIT_RESIDUALS)} to retrofit it"
            if have.residual == "prenorm" else "")
    raise ValueError(f"ModelConfig.residual is {model.residual!r}, {name} holds a "
                     f"{have.residual!r} model: set ModelConfig.residual = "
                     f"{have.residual!r}{also}")
  ours = function_values(model)
  differ = [(binding, ours[binding][1], theirs[1]) for binding, theirs in values.items()
            if _differs(ours[binding], theirs)]
  if differ:
    (binding, mine, theirs), rest = differ[0], differ[1:]
    also = "; also " + ", ".join(f"{b} = {t!r}" for b, _, t in rest) if rest else ""
    raise ValueError(f"{binding} is {mine!r}, {name} has {theirs!r}: set "
                     f"{binding} = {theirs!r}{also}")
  return have.residual != source.config.residual


def function_values(config: ModelConfig, with_settings: bool = True) -> dict[str, tuple]:
  """The gin binding of every setting that fixes the function of a model of `config`
  ("ModelConfig.d_model", ..., "MHC.sinkhorn_iters") -> (its value as set, its value in
  force); with_settings=False leaves out the variant's own settings."""
  fields = FUNCTION_FIELDS | (STREAM_FIELDS if config.uses_streams else {})
  values = {f"ModelConfig.{field}": (getattr(config, field), getattr(config, attribute))
            for field, attribute in fields.items()}
  if config.uses_streams and with_settings:
    settings = config.residual_settings
    values |= {f"{type(settings).__name__}.{field}": (value, value)
               for field, value in function_settings(settings).items()}
  return values


def difference(have: ModelConfig, model: ModelConfig) -> tuple[str, str] | None:
  """Where `have` and `model` compute different functions, each's values of the settings
  that differ (("residual=prenorm d_model=32", "residual=mhc d_model=64")); None where they
  compute the same one."""
  residual = lambda config: {"ModelConfig.residual": (config.residual, config.residual)}
  theirs, ours = residual(have) | function_values(have), residual(model) | function_values(model)
  differ = [binding for binding in theirs if binding in ours
            and _differs(ours[binding], theirs[binding])]
  if not differ:
    return None
  values = lambda record: " ".join(f"{b.removeprefix('ModelConfig.')}={record[b][1]}"
                                   for b in differ)
  return values(theirs), values(ours)


def _differs(ours: tuple, theirs: tuple) -> bool:
  if ours[0] is None and theirs[0] is None:
    return False  # both the default, derived from fields compared on their own
  return ours[1] != theirs[1]


def load_params(init_from: str, model: ModelConfig, seed: int,
                mesh: Mesh | None = None) -> tuple[dict, dict]:
  """DIR -> (the parameters of a `model` starting from it, a pure dict laid out as
  `Transformer(model)`'s state; what config.json records of it). `seed` draws the new sites'
  random parameters of a retrofit (mHC's `phi`), as it draws a fresh model's. `mesh`: a
  Hugging Face checkpoint is read straight into its shards over it (`load_hf_checkpoint`)."""
  source = read_source(init_from)
  retrofitted = check_config(model, source)
  if source.kind == HUGGINGFACE:  # read in the run's layout: nothing to restack
    source = dataclasses.replace(source, config=dataclasses.replace(
        source.config, scan_layers=model.scan_layers))
  pretrained = load_model(source, mesh)
  blocks = block_params(pretrained, model.scan_layers)
  if retrofitted:
    blocks = with_sites(model, blocks, nnx.Rngs(seed))
  outer = with_stream_embedding(model, outer_params(pretrained)) if retrofitted else (
      outer_params(pretrained))
  loaded = from_blocks(model, outer, blocks)  # the loaded arrays, not copies
  return nnx.to_pure_dict(nnx.state(loaded)), source.record()


def load_model(source: Source, mesh: Mesh | None = None) -> Transformer:
  """The model `source` holds, in its config (`source.config`: its own, or with another
  dtype or layout); a Hugging Face one's arrays laid out over `mesh` (`load_hf_checkpoint`)."""
  if source.kind == HUGGINGFACE:
    try:
      return load_hf_checkpoint(source.path, dtype=source.config.dtype,
                                scan_layers=source.config.scan_layers, mesh=mesh)
    except FileNotFoundError as err:  # no config.json, no weights, a missing shard
      raise ValueError(str(err)) from None
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: Transformer(source.config, rngs=nnx.Rngs(0))))
  nnx.replace_by_pure_dict(state, checkpoint.restore_params(source.path, source.step,
                                                            nnx.to_pure_dict(state)))
  return nnx.merge(graphdef, state)


def describe(record: dict, model: ModelConfig) -> str:
  """The start line's account of a start from `record` (`Source.record`)."""
  step = f" step {record['step']}" if "step" in record else ""
  widened = (f" (retrofitted to {model.residual}, n={model.num_streams})"
             if record["residual"] != model.residual else "")
  return f"starting from {record['path']}{step}{widened}"
