"""Load a Hugging Face Llama or Qwen3 checkpoint as this project's pre-norm `Transformer`.

    model = load_hf_checkpoint("path/to/Llama-3.2-1B")   # a local folder, nothing downloaded

The folder holds `config.json` and the weights as safetensors: `model.safetensors`, or shards
listed in `model.safetensors.index.json`. The model computes the logits transformers
computes: grouped-query attention, any `head_dim`, Qwen3's per-head q/k RMSNorm before RoPE,
`rope_theta` with rotate-half RoPE and 1/sqrt(head_dim) logits (as `rope` and the attention
do), `rms_norm_eps` on every norm, no embedding multiplier (`embed_scale=False`), tied or
untied read-out. Anything else a config can ask for (rope scaling, sliding windows, biases,
experts) is refused in one line naming the field, before a weight is read.

Weights: a Linear's `[out, in]` becomes ours transposed, `q_proj [heads*head_dim, d]` ->
`wq [d, heads, head_dim]`, `o_proj [d, heads*head_dim]` -> `wo [heads, head_dim, d]`,
`gate/up_proj [m, d]` -> `[d, m]`, `down_proj [d, m]` -> `[m, d]`, `lm_head [vocab, d]` ->
`unembed [d, vocab]`; norm weights are the scales. Parameters are float32 whatever the files
hold; `dtype` is the activations' (`ModelConfig.dtype`).
"""

import json
import pathlib

import numpy as np

from mhc_jax.lm.model import DTYPES, ModelConfig, Transformer, from_params

MODEL_TYPES = ("llama", "qwen3")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def config_from_hf(hf: dict, *, dtype: str = "float32", **overrides) -> ModelConfig:
  """A `config.json` dict -> the pre-norm `ModelConfig` computing the same function;
  one-line ValueError naming the field for anything this model does not compute.
  `overrides` (e.g. `scan_layers`) go to the ModelConfig."""
  model_type = hf.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.json model_type must be one of {', '.join(MODEL_TYPES)}; got "
                     f"{model_type!r}")
  _refuse_unsupported(hf)
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
  heads = _field(hf, "num_attention_heads")
  return ModelConfig(
      vocab_size=_field(hf, "vocab_size"), d_model=_field(hf, "hidden_size"),
      num_layers=_field(hf, "num_hidden_layers"), num_heads=heads,
      mlp_dim=_field(hf, "intermediate_size"),
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim_override=hf.get("head_dim") or _field(hf, "hidden_size") // heads,
      qk_norm=model_type == "qwen3", embed_scale=False, residual="prenorm",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype,
      rope_base=float(_rope_theta(hf)), norm_eps=float(_field(hf, "rms_norm_eps")),
      **overrides)


def _field(hf: dict, name: str):
  if name not in hf:
    raise ValueError(f"config.json has no {name}")
  return hf[name]


def _rope_theta(hf: dict) -> float:
  """`rope_theta` at the top level (transformers < 5) or in `rope_parameters` (>= 5)."""
  if "rope_theta" in hf:
    return hf["rope_theta"]
  return (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)


def _refuse_unsupported(hf: dict) -> None:
  if hf.get("rope_scaling") is not None:
    raise ValueError(f"config.json rope_scaling must be null (plain RoPE), got "
                     f"{hf['rope_scaling']!r}")
  rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
  if rope_type != "default":
    raise ValueError(f"config.json rope_parameters.rope_type must be 'default' (plain RoPE), "
                     f"got {rope_type!r}")
  sliding = [t for t in hf.get("layer_types") or () if t != "full_attention"]
  if hf.get("use_sliding_window") or sliding:
    raise ValueError("config.json use_sliding_window / layer_types: sliding-window attention "
                     "is not supported, only full attention")
  for name in ("attention_bias", "mlp_bias"):
    if hf.get(name):
      raise ValueError(f"config.json {name} must be false (no biases), got {hf[name]!r}")
  for name in ("num_experts", "num_local_experts", "n_routed_experts"):
    if hf.get(name):
      raise ValueError(f"config.json {name} must be absent (no mixture of experts), got "
                       f"{hf[name]!r}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json hidden_act must be 'silu' (SwiGLU), got "
                     f"{hf['hidden_act']!r}")
  if hf.get("pretraining_tp", 1) != 1:
    raise ValueError(f"config.json pretraining_tp must be 1, got {hf['pretraining_tp']!r}")


def read_safetensors(folder: pathlib.Path) -> dict[str, tuple[np.ndarray, str]]:
  """Every tensor in the folder's safetensors -> (float32 array, the file it came from)."""
  try:
    from safetensors import SafetensorError, safe_open
  except ImportError as err:
    raise ImportError("reading safetensors needs the safetensors package: "
                      "pip install 'mhc-jax[hf]'") from err
  index = folder / INDEX_FILE
  if index.exists():
    files = sorted(set(read_json(index)["weight_map"].values()))
  elif (folder / SINGLE_FILE).exists():
    files = [SINGLE_FILE]
  else:
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")
  tensors = {}
  for name in files:
    path = folder / name
    if not path.exists():
      raise FileNotFoundError(f"{path}, listed in {INDEX_FILE}, does not exist")
    try:
      # "flax" rather than "numpy": numpy has no bfloat16, the dtype most checkpoints are in.
      with safe_open(path, framework="flax") as f:
        for key in f.keys():
          tensors[key] = (np.asarray(f.get_tensor(key), np.float32), name)
    except SafetensorError as err:  # an interrupted download, or not safetensors at all
      raise ValueError(f"{path} is not a valid safetensors file ({err}): it is damaged or "
                       "incomplete; download it again") from None
  return tensors


def read_json(path: pathlib.Path):
  """The JSON value `path` holds; one-line ValueError naming it when it holds none."""
  try:
    return json.loads(path.read_text())
  except ValueError as err:  # not UTF-8, or not JSON
    raise ValueError(f"{path} is not JSON: {err}") from None


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Expected `[out, in]` shape of every tensor a checkpoint of `cfg` holds."""
  d, q, kv, m = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.mlp_dim
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
        p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
        p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
        p + "mlp.down_proj.weight": (d, m),
    }
    if cfg.qk_norm:
      shapes |= {p + "self_attn.q_norm.weight": (cfg.head_dim,),
                 p + "self_attn.k_norm.weight": (cfg.head_dim,)}
  return shapes


def _check_tensors(cfg: ModelConfig, tensors: dict) -> None:
  shapes = _hf_shapes(cfg)
  for name, shape in shapes.items():
    if name not in tensors:
      raise ValueError(f"tensor {name} is missing from the checkpoint")
    array, file = tensors[name]
    if array.shape != shape:
      raise ValueError(f"tensor {name} in {file} has shape {array.shape}, config.json says "
                       f"{shape}")
  for name, (array, file) in tensors.items():
    if name in shapes or name.endswith("rotary_emb.inv_freq"):  # a buffer, recomputed
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      # Some exporters write the tied matrix twice; a different one is an untied model.
      if not np.array_equal(array, tensors["model.embed_tokens.weight"][0]):
        raise ValueError(f"config.json tie_word_embeddings is true but {file} holds an "
                         "lm_head.weight different from the embedding")
      continue
    raise ValueError(f"tensor {name} in {file} has no place in a {cfg.num_layers}-layer model")


def hf_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> tuple[dict, list[dict]]:
  """Checkpoint tensors (by Hugging Face name) -> (`from_params`'s top-level pure dict, one
  pure dict per block)."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
  top = {"embed": tensors["model.embed_tokens.weight"],
         "final_norm": {"scale": tensors["model.norm.weight"]}}
  if not cfg.tie_embeddings:
    top["unembed"] = tensors["lm_head.weight"].T
  layers = []
  for i in range(cfg.num_layers):
    t = lambda name, i=i: tensors[f"model.layers.{i}.{name}.weight"]
    attn = {"wq": t("self_attn.q_proj").T.reshape(d, h, k),
            "wk": t("self_attn.k_proj").T.reshape(d, g, k),
            "wv": t("self_attn.v_proj").T.reshape(d, g, k),
            "wo": t("self_attn.o_proj").T.reshape(h, k, d)}
    if cfg.qk_norm:
      attn |= {"q_norm": {"scale": t("self_attn.q_norm")},
               "k_norm": {"scale": t("self_attn.k_norm")}}
    layers.append({
        "attn_norm": {"scale": t("input_layernorm")}, "attn": attn,
        "mlp_norm": {"scale": t("post_attention_layernorm")},
        "mlp": {"w_gate": t("mlp.gate_proj").T, "w_up": t("mlp.up_proj").T,
                "w_down": t("mlp.down_proj").T},
    })
  return top, layers


def load_hf_checkpoint(path, *, dtype: str = "float32", scan_layers: bool = True) -> Transformer:
  """A local Hugging Face Llama / Qwen3 folder -> a pre-norm `Transformer` computing the same
  logits `[batch, seq, vocab]` from token ids `[batch, seq]`. `dtype`: the activations'
  ("float32" or "bfloat16"); parameters are float32. Errors are one line naming the config
  field, file or tensor at fault."""
  folder = pathlib.Path(path)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} does not exist: not a Hugging Face checkpoint "
                            "folder")
  cfg = config_from_hf(read_json(config_file), dtype=dtype,
                       scan_layers=scan_layers)
  tensors = read_safetensors(folder)
  _check_tensors(cfg, tensors)
  top, layers = hf_to_params(cfg, {name: array for name, (array, _) in tensors.items()})
  return from_params(cfg, top, layers)
