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
hold (float64, float32, float16 or bfloat16); `dtype` is the activations'
(`ModelConfig.dtype`).

Loading copies nothing whole: the files are memory-mapped (only their headers are read up
front), and each of the model's final arrays (stacked on the layers axis when scanned, laid
out over a mesh when one is given) is filled shard by shard, each shard reading from the files
only its own slice of each layer's tensor and converting it to float32 as it goes
(`jax.make_array_from_callback`). On CPU the filled buffer becomes the array's as it is.
"""

import concurrent.futures
import dataclasses
import functools
import json
import math
import mmap
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, Sharding

from mhc_jax.lm.model import DTYPES, ModelConfig, Transformer
from mhc_jax.lm.sharding import named, param_specs

MODEL_TYPES = ("llama", "qwen3")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": jnp.bfloat16}
# Where each parameter of a block comes from: the tensor `model.layers.{i}.NAME.weight`, and for
# a Linear's `[out, in]` weight how many of our parameter's leading axes its `in` axis is (ours
# is its transpose, each axis split into ours: `o_proj [d, heads*head_dim]` -> `wo [heads,
# head_dim, d]` has 2); None: taken as it is.
BLOCK_TENSORS = {
    "attn/wq": ("self_attn.q_proj", 1), "attn/wk": ("self_attn.k_proj", 1),
    "attn/wv": ("self_attn.v_proj", 1), "attn/wo": ("self_attn.o_proj", 2),
    "attn/q_norm/scale": ("self_attn.q_norm", None),
    "attn/k_norm/scale": ("self_attn.k_norm", None),
    "attn_norm/scale": ("input_layernorm", None),
    "mlp_norm/scale": ("post_attention_layernorm", None),
    "mlp/w_gate": ("mlp.gate_proj", 1), "mlp/w_up": ("mlp.up_proj", 1),
    "mlp/w_down": ("mlp.down_proj", 1),
}
# The same for the parameters outside the blocks, from `NAME.weight`.
OUTER_TENSORS = {"embed": ("model.embed_tokens", None), "final_norm/scale": ("model.norm", None),
                 "unembed": ("lm_head", 1)}
TILE = 256  # elements along each of a transposing copy's two axes: a tile stays in cache
PIECE_BYTES = 64 * 2 ** 20  # of float32 one thread fills of a tensor outside the layers


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


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """One tensor of a safetensors file, by where its bytes are: nothing is read until a view
  of it is indexed."""

  file: pathlib.Path
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of its first byte in the file

  def view(self) -> np.ndarray:
    """The tensor memory-mapped, read-only: indexing it reads only the pages the selection
    touches, and they leave this process's resident memory when the view and its slices are
    gone (the mapping closes with them)."""
    return np.memmap(self.file, self.dtype, "r", self.offset, self.shape)


def stored_tensors(folder: pathlib.Path) -> dict[str, StoredTensor]:
  """Every tensor in the folder's safetensors (`model.safetensors`, or the shards its index
  lists) by name; only the files' headers are read."""
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
    tensors |= _read_header(path)
  return tensors


def _read_header(path: pathlib.Path) -> dict[str, StoredTensor]:
  """The tensors a safetensors file holds (8 bytes giving the header's length, the header: JSON
  with each tensor's dtype, shape and byte offsets in the data that follows it); one-line
  ValueError when the file cannot hold them."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    if size < 8 or 8 + length > size:
      raise _damaged(path, f"a header of {length} bytes in a file of {size}")
    try:
      entries = json.loads(f.read(length))
    except ValueError as err:  # not UTF-8, or not JSON
      raise _damaged(path, f"its header is not JSON: {err}") from None
  if not isinstance(entries, dict):
    raise _damaged(path, "its header is no JSON object")
  return {name: _stored_tensor(path, name, entry, 8 + length, size)
          for name, entry in entries.items() if name != "__metadata__"}


def _stored_tensor(path: pathlib.Path, name: str, entry, data_start: int,
                   size: int) -> StoredTensor:
  try:
    kind, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
  except (KeyError, TypeError, ValueError):  # not a tensor's entry at all
    raise _damaged(path, f"its header entry {name!r} is no tensor's") from None
  if not isinstance(kind, str):
    raise _damaged(path, f"its header entry {name!r} has dtype {kind!r}")
  if kind not in SAFETENSORS_DTYPES:
    raise ValueError(f"tensor {name} in {path.name} is {kind}: only "
                     f"{', '.join(SAFETENSORS_DTYPES)} tensors load; convert the checkpoint "
                     "to bfloat16 or float32")
  dtype = np.dtype(SAFETENSORS_DTYPES[kind])
  if (not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
      or end - begin != math.prod(shape) * dtype.itemsize or data_start + end > size):
    raise _damaged(path, f"tensor {name} {kind} {list(shape)} at bytes {begin}..{end} of "
                   f"{size - data_start}")
  return StoredTensor(path, dtype, shape, data_start + begin)


def _damaged(path: pathlib.Path, why: str) -> ValueError:
  return ValueError(f"{path} is not a valid safetensors file ({why}): it is damaged or "
                    "incomplete; download it again")


def read_json(path: pathlib.Path):
  """The JSON value `path` holds; one-line ValueError naming it when it holds none."""
  try:
    return json.loads(path.read_text())
  except ValueError as err:  # not UTF-8, or not JSON
    raise ValueError(f"{path} is not JSON: {err}") from None


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where one parameter of ours comes from: the tensor `names[0]`, or (`stacked`) one tensor
  per layer, `names[i]` for our leading axis's entry i; `in_axes` as in `BLOCK_TENSORS`;
  `shape`: ours, the whole array's."""

  names: tuple[str, ...]
  stacked: bool
  in_axes: int | None
  shape: tuple[int, ...]

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """Ours, of the part one tensor fills."""
    return self.shape[1:] if self.stacked else self.shape

  @property
  def tensor_shape(self) -> tuple[int, ...]:
    """The checkpoint's tensor's (`[out, in]` for a Linear's weight)."""
    shape, split = self.layer_shape, self.in_axes
    return shape if split is None else (math.prod(shape[split:]), math.prod(shape[:split]))

  def ours(self, tensor: np.ndarray) -> np.ndarray:
    """One of the checkpoint's tensors -> our layout of it, a view (nothing is copied)."""
    if self.in_axes is None:
      return tensor
    return tensor.T.reshape(self.layer_shape, copy=False)

  def read(self, tensors: dict[str, StoredTensor], index: tuple[slice, ...],
           pool: concurrent.futures.Executor) -> np.ndarray:
    """The part `index` of our array (a device's shard) in float32, reading from the files
    the bytes it holds and no others, its pieces (`pieces`) copied by `pool`'s threads."""
    shard = _float32_buffer(tuple(len(range(*part.indices(n)))
                                   for part, n in zip(index, self.shape)))
    fill = lambda name, part, out: _copy(out, self.ours(tensors[name].view())[part])
    list(pool.map(lambda piece: fill(*piece), self.pieces(index, shard)))
    return shard

  def pieces(self, index: tuple[slice, ...], shard: np.ndarray) -> list[tuple]:
    """(tensor name, the part of our layout of it, where in `shard` it goes) for each piece
    one thread copies: a layer of a stacked array, else up to `PIECE_BYTES` of rows. Each
    maps its tensor anew, so the file's pages a piece touched go when it is done."""
    if self.stacked:
      return [(name, index[1:], out) for name, out in zip(self.names[index[0]], shard)]
    start, stop, _ = index[0].indices(self.shape[0])  # jax's indices are contiguous slices
    bounds = np.linspace(0, stop - start, 1 + max(1, shard.nbytes // PIECE_BYTES), dtype=int)
    return [(self.names[0], (slice(start + a, start + b), *index[1:]), shard[a:b])
            for a, b in zip(bounds, bounds[1:])]

  def array(self, tensors: dict[str, StoredTensor], sharding: Sharding,
            pool: concurrent.futures.Executor) -> jax.Array:
    """Our array laid out by `sharding`, each of this process's devices' shards read (`read`)
    on its own."""
    return jax.make_array_from_callback(
        self.shape, sharding, functools.partial(self.read, tensors, pool=pool), jnp.float32)


def placements(cfg: ModelConfig, abstract: nnx.State) -> dict[str, Placement]:
  """Where each parameter of the `cfg` model whose abstract state is `abstract` comes from, by
  path (`blocks/attn/wq` scanned, `blocks/0/attn/wq` not)."""
  shapes = {path: leaf.shape for path, leaf in _by_path(nnx.to_pure_dict(abstract)).items()}
  found = {path: Placement((f"{name}.weight",), False, in_axes, shapes[path])
           for path, (name, in_axes) in OUTER_TENSORS.items() if path in shapes}
  layer = lambda i, name: f"model.layers.{i}.{name}.weight"
  for path, (name, in_axes) in BLOCK_TENSORS.items():
    if cfg.scan_layers:
      each = [(f"blocks/{path}", tuple(layer(i, name) for i in range(cfg.num_layers)), True)]
    else:
      each = [(f"blocks/{i}/{path}", (layer(i, name),), False) for i in range(cfg.num_layers)]
    found |= {ours: Placement(names, stacked, in_axes, shapes[ours])
              for ours, names, stacked in each if ours in shapes}
  return found


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a checkpoint of `cfg` holds, with its shape, in a checkpoint's order: the
  tensors outside the layers, then layer by layer."""
  return _expected_shapes(placements(cfg, nnx.state(_abstract_model(cfg))))


def _expected_shapes(found: dict[str, Placement]) -> dict[str, tuple[int, ...]]:
  layer = lambda name: int(name.split(".")[2]) if name.startswith("model.layers.") else -1
  pairs = [(name, place.tensor_shape) for place in found.values() for name in place.names]
  return dict(sorted(pairs, key=lambda pair: layer(pair[0])))  # stable: table order in a layer


def _by_path(tree) -> dict:
  return {_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _name(path) -> str:
  """A pytree path as our parameters' names: `blocks/attn/wq`."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _abstract_model(cfg: ModelConfig) -> Transformer:
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _float32_buffer(shape: tuple[int, ...]) -> np.ndarray:
  """An uninitialised float32 array in an anonymous memory mapping of its own. Page-aligned,
  so the CPU backend holds it as its buffer (no copy); and without numpy's request for
  transparent huge pages, whose compaction stalls the first touch of fresh memory after
  another process freed its own (measured: a 0.6B model's load 3.3 s instead of 1.3 s)."""
  size = math.prod(shape)
  return np.frombuffer(mmap.mmap(-1, max(4 * size, 1)), np.float32, size).reshape(shape)


def _copy(out: np.ndarray, source: np.ndarray) -> None:
  """`out[...] = source`, converted to float32. A transposed `source` (a Linear's weight) goes
  tile by tile over its contiguous axis and `out`'s last: in one pass, reading along one and
  writing along the other misses the cache on almost every element (measured 2-4x slower)."""
  axes = [axis for axis in range(source.ndim) if source.shape[axis] > 1]
  contiguous = min(axes, key=lambda axis: abs(source.strides[axis]), default=None)
  last = out.ndim - 1
  if contiguous is None or contiguous == last:
    np.copyto(out, source)
    return
  for i in range(0, out.shape[contiguous], TILE):
    for j in range(0, out.shape[last], TILE):
      tile = [slice(None)] * out.ndim
      tile[contiguous], tile[last] = slice(i, i + TILE), slice(j, j + TILE)
      np.copyto(out[tuple(tile)], source[tuple(tile)])


def _check_tensors(cfg: ModelConfig, tensors: dict[str, StoredTensor],
                   found: dict[str, Placement]) -> None:
  shapes = _expected_shapes(found)
  for name, shape in shapes.items():
    if name not in tensors:
      raise ValueError(f"tensor {name} is missing from the checkpoint")
    tensor = tensors[name]
    if tensor.shape != shape:
      raise ValueError(f"tensor {name} in {tensor.file.name} has shape {tensor.shape}, "
                       f"config.json says {shape}")
  for name, tensor in tensors.items():
    if name in shapes or name.endswith("rotary_emb.inv_freq"):  # a buffer, recomputed
      continue
    if name == "lm_head.weight" and cfg.tie_embeddings:
      # Some exporters write the tied matrix twice; a different one is an untied model.
      if not np.array_equal(tensor.view(), tensors["model.embed_tokens.weight"].view()):
        raise ValueError(f"config.json tie_word_embeddings is true but {tensor.file.name} "
                         "holds an lm_head.weight different from the embedding")
      continue
    raise ValueError(f"tensor {name} in {tensor.file.name} has no place in a "
                     f"{cfg.num_layers}-layer model")


def load_hf_checkpoint(path, *, dtype: str = "float32", scan_layers: bool = True,
                       mesh: Mesh | None = None) -> Transformer:
  """A local Hugging Face Llama / Qwen3 folder -> a pre-norm `Transformer` computing the same
  logits `[batch, seq, vocab]` from token ids `[batch, seq]`. `dtype`: the activations'
  ("float32" or "bfloat16"); parameters are float32. `mesh`: the parameters are laid out over
  it as training lays them out (`sharding.param_specs`), and each process reads only the
  shards its devices hold; without one they go to this process's first device.

  Tensor by tensor from the memory-mapped files into the final (stacked) arrays: the process
  holds the model once in float32, and of the files only the tensor being read. Errors are
  one line naming the config field, file or tensor at fault, raised before a weight is
  read."""
  folder = pathlib.Path(path)
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{config_file} does not exist: not a Hugging Face checkpoint "
                            "folder")
  cfg = config_from_hf(read_json(config_file), dtype=dtype, scan_layers=scan_layers)
  tensors = stored_tensors(folder)
  graphdef, state = nnx.split(_abstract_model(cfg))
  found = placements(cfg, state)
  _check_tensors(cfg, tensors, found)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(state))
  else:
    shardings = named(mesh, param_specs(state, mesh))
  # Threads: converting and transposing is most of a load's time, and numpy's copies let go
  # of the GIL (2 cores: 1.5-2x faster).
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    read = lambda path, sharding: found[_name(path)].array(tensors, sharding, pool)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(read, shardings))
  return nnx.merge(graphdef, state)
