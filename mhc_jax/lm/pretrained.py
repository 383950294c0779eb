"""Where a run starts when not from scratch: `train(..., init_from=DIR)`, `mhc-train --init_from`.

DIR is a Hugging Face Llama / Qwen3 folder (`config.json` with `model_type`, safetensors: see
`hf.py`) or a workdir of this project (`config.json` with a "model" section, and the
parameters of its latest complete checkpoint; its optimizer state is not taken). The run's
`ModelConfig` must compute DIR's function: every field of `FUNCTION_FIELDS` agrees, or one
line names the first binding to set (and the others). The residual then decides:

    DIR's own residual (and num_streams):  DIR's weights as they are
    a stream variant from prenorm:         retrofitted (`retrofitting.py`), same logits, over
                                           the run's num_streams, averaged at the end
                                           (stream_reduction "mean", as `retrofit_config` has)

and nothing else. What changes how the model runs, not what it computes (dtype, scan_layers,
remat, attention, sinkhorn_backend, init_std), is the run's own. Parameters are float32, as
a fresh model's are. Every check reads only: nothing is written until the weights are in.
"""

import dataclasses
import pathlib

from flax import nnx

from mhc_jax.lm import checkpoint
from mhc_jax.lm.hf import config_from_hf, load_hf_checkpoint, read_json
from mhc_jax.lm.model import ModelConfig, Transformer, from_params, layer_params, outer_params
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.retrofitting import RETROFIT_RESIDUALS, retrofit_config, with_sites

HUGGINGFACE, WORKDIR = "huggingface", "workdir"
CONFIG = "config.json"
# The ModelConfig fields that fix a model's function, each with the attribute that holds its
# value in force (the field may be None, the default: num_kv_heads = num_heads, ...).
FUNCTION_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "num_layers": "num_layers",
    "num_heads": "num_heads", "num_kv_heads": "kv_heads", "head_dim_override": "head_dim",
    "mlp_dim": "mlp_dim", "qk_norm": "qk_norm", "embed_scale": "embed_scale",
    "tie_embeddings": "tie_embeddings", "rope_base": "rope_base", "norm_eps": "norm_eps"}
# What every stream model adds to them, when it continues as the same variant; its own site
# fields come from its entry in `RESIDUALS` (`function_fields`).
STREAM_FIELDS = {"stream_reduction": "stream_reduction"}


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


def read_source(init_from: str) -> Source:
  """DIR -> its `Source`; one-line ValueError naming the file or field at fault."""
  folder = pathlib.Path(init_from).expanduser().resolve()
  if not folder.is_dir():
    raise ValueError(f"init_from {folder} is not a directory")
  config_file = folder / CONFIG
  if not config_file.is_file():
    raise ValueError(f"init_from {folder} holds no {CONFIG}: neither a Hugging Face checkpoint "
                     "nor an mhc-train workdir")
  config = read_json(config_file)
  if not isinstance(config, dict):
    raise ValueError(f"{config_file} holds no JSON object")
  if "model" in config:
    return _workdir_source(folder, config["model"])
  if "model_type" in config or "architectures" in config:
    return Source(folder, HUGGINGFACE, config_from_hf(config))
  raise ValueError(f"{config_file} has neither model_type (a Hugging Face checkpoint) nor a "
                   "model section (an mhc-train workdir)")


def _workdir_source(folder: pathlib.Path, fields) -> Source:
  try:
    config = ModelConfig(**fields)
  except TypeError as err:  # not a dict, or a field this version does not know
    raise ValueError(f"{folder / CONFIG}'s model section is no ModelConfig: {err}") from None
  step = checkpoint.latest_step(folder)
  if step is None:
    raise ValueError(f"init_from {folder} holds no complete checkpoint in "
                     f"{checkpoint.CHECKPOINTS}/: nothing to start from")
  return Source(folder, WORKDIR, config, step)


def check_config(model: ModelConfig, source: Source) -> bool:
  """One-line ValueError unless a run of `model` can start from `source`; -> whether it is
  retrofitted."""
  have = source.config
  name = f"the checkpoint {source.path}"
  if have.residual == model.residual:
    fields = function_fields(have)
  elif have.residual == "prenorm" and model.residual in RETROFIT_RESIDUALS:
    have = retrofit_config(have, model.residual, model.num_streams)
    name += f" retrofitted to {model.residual}"
    fields = FUNCTION_FIELDS | {"stream_reduction": "stream_reduction"}
  else:
    also = (f", or {', '.join(RETROFIT_RESIDUALS)} to retrofit it"
            if have.residual == "prenorm" else "")
    raise ValueError(f"ModelConfig.residual is {model.residual!r}, {name} holds a "
                     f"{have.residual!r} model: set ModelConfig.residual = "
                     f"{have.residual!r}{also}")
  differ = [(field, getattr(model, value), getattr(have, value))
            for field, value in fields.items() if _differs(model, have, field, value)]
  if differ:
    (field, ours, theirs), rest = differ[0], differ[1:]
    also = "; also " + ", ".join(f"ModelConfig.{f} = {t!r}" for f, _, t in rest) if rest else ""
    raise ValueError(f"ModelConfig.{field} is {ours!r}, {name} has {theirs!r}: set "
                     f"ModelConfig.{field} = {theirs!r}{also}")
  return have.residual != source.config.residual


def function_fields(config: ModelConfig) -> dict[str, str]:
  """The fields that fix the function of a model of `config`'s residual variant, each with
  the attribute that holds its value in force."""
  if not config.uses_streams:
    return FUNCTION_FIELDS
  own = {field: field for field in RESIDUALS[config.residual].function_fields}
  return FUNCTION_FIELDS | STREAM_FIELDS | own


def difference(have: ModelConfig, model: ModelConfig) -> tuple[str, str] | None:
  """Where `have` and `model` compute different functions, each's values of the fields that
  differ (("residual=prenorm d_model=32", "residual=mhc d_model=64")); None where they
  compute the same one."""
  both = function_fields(model)
  fields = {"residual": "residual"} | {field: value for field, value in
                                       function_fields(have).items() if field in both}
  differ = {field: value for field, value in fields.items()
            if _differs(model, have, field, value)}
  if not differ:
    return None
  values = lambda config: " ".join(f"{field}={getattr(config, value)}"
                                   for field, value in differ.items())
  return values(have), values(model)


def _differs(model: ModelConfig, have: ModelConfig, field: str, value: str) -> bool:
  if getattr(model, field) is None and getattr(have, field) is None:
    return False  # both the default, derived from fields compared on their own
  return getattr(model, value) != getattr(have, value)


def load_params(init_from: str, model: ModelConfig, seed: int) -> tuple[dict, dict]:
  """DIR -> (the parameters of a `model` starting from it, a pure dict laid out as
  `Transformer(model)`'s state; what config.json records of it). `seed` draws the new sites'
  random parameters of a retrofit (mHC's `phi`), as it draws a fresh model's."""
  source = read_source(init_from)
  retrofitted = check_config(model, source)
  pretrained = _load_model(source)
  layers = layer_params(pretrained)
  if retrofitted:
    layers = with_sites(model, layers, nnx.Rngs(seed))
  loaded = from_params(model, outer_params(pretrained), layers)  # in the run's layout
  return nnx.to_pure_dict(nnx.state(loaded)), source.record()


def _load_model(source: Source) -> Transformer:
  """The model `source` holds, in its own config."""
  if source.kind == HUGGINGFACE:
    try:
      return load_hf_checkpoint(source.path, scan_layers=source.config.scan_layers)
    except (FileNotFoundError, ImportError) as err:  # no weights; no safetensors package
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
