"""A small decoder-only Transformer whose residual connection is the one thing that varies.

Token embedding, RoPE causal attention (multi-head, or grouped-query with `num_kv_heads`;
optional per-head q/k RMSNorm as in Qwen3), SwiGLU MLP, RMSNorm, optional tied embeddings.
`residual` picks how each sub-layer (attention, MLP) is wired in:

    prenorm   h = h + F(norm(h))                         the baseline
    postnorm  h = norm(h + F(h))
    hc        streams = HC(streams, x -> F(norm(x)))     dynamic, or static with HC.dynamic = False
    mhc       streams = mHC(streams, x -> F(norm(x)))
    mhc_lite  mHC with H_res a mixture of permutation matrices
    kromhc    mHC with H_res a Kronecker product of 2x2 doubly-stochastic factors
    mhc_ortho mHC with H_res orthostochastic (Newton-Schulz; `mhc_jax.res_mappings`)

(the table in `residuals.py`, which says everything else each variant needs).

With streams, the embedding is copied into `num_streams` streams and summed back before the
final norm (or averaged, `stream_reduction="mean"`, as a retrofitted model does: see
`retrofitting.py`). Everything else is identical across variants, so loss curves compare fairly.

Parameters are float32 and carry `logical_axes` metadata (see `sharding.py`); activations
run in `dtype`; the hyper-connection coefficient path stays float32 whatever `dtype` is.

Depth: with `scan_layers` (the default) the blocks' parameters are stacked on a leading
`layers` axis and the stack runs under `nnx.scan`, so the program (and its compile time)
does not grow with depth; `remat` picks what the backward recomputes (see `REMAT_POLICIES`).

Decoding: the model takes explicit positions and a padding mask, and `Transformer.extend`
runs tokens after those a `KVCache` holds (a prefill, then one token at a time); `decode.py`
builds `generate` on it. Called with tokens alone, the model runs what training runs.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from mhc_jax.checks import check_int
from mhc_jax.lm.attention import (ATTENTION_IMPLEMENTATIONS, SPLASH_SEQ_MULTIPLE, causal_attention,
                               default_attention, masked_attention)
from mhc_jax.mappings import check_streams
from mhc_jax.modules import StreamEmbedding
from mhc_jax.lm.residuals import RESIDUALS, resolve_settings
from mhc_jax.lm.sharding import BATCH_AXES
from mhc_jax.streams import expand_streams, mean_streams, reduce_streams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LAYERS_AXIS = "layers"  # the logical axis of stacked (scanned) block parameters
SITES = ("attn_site", "mlp_site")  # a Block's sub-layers' sites, in depth order
STREAM_REDUCTIONS = ("sum", "mean")

# The branches' matmul outputs, named so a remat policy can keep them (see REMAT_POLICIES).
BRANCH_MATMULS = ("query", "key", "value", "attention_context", "attention_out", "mlp_gate",
                  "mlp_up", "mlp_out")
# What the backward of a block keeps; everything else it recomputes from the block's input.
#   none     keep every intermediate (no recomputation)
#   minimal  keep the branches' matmul outputs; recompute the cheap n-wide work (norms, the
#            hyper-connection coefficients and Sinkhorn, pre/post/res mixing), attention
#            probabilities and elementwise activations: the mHC paper's recipe
#   full     keep only the block's input; recompute the whole block
REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.save_only_these_names(*BRANCH_MATMULS),
    "full": jax.checkpoint_policies.nothing_saveable,
}


# ModelConfig fields of earlier versions -> the variants' settings fields that replaced them.
FLAT_SETTINGS = {"num_streams": "num_streams", "hc_dynamic": "dynamic",
                 "sinkhorn_iters": "sinkhorn_iters", "sinkhorn_backend": "sinkhorn_backend"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 258
  d_model: int = 256
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 1024
  residual: str = "prenorm"
  # The variant's own settings (`residuals.HC(num_streams=4)`, `residuals.MHC`, ...; gin binds
  # them as `MHC.sinkhorn_iters = 20`); None: its defaults. Filled in at construction.
  residual_settings: Any = None
  tie_embeddings: bool = True
  dtype: str = "float32"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "minimal"
  attention: str = "auto"
  # For checkpoints from elsewhere (`hf.py`); the defaults are this project's own models.
  num_kv_heads: int | None = None  # grouped-query attention; None: num_heads
  head_dim_override: int | None = None  # None: d_model // num_heads
  qk_norm: bool = False  # RMSNorm on each head's q and k before RoPE (Qwen3)
  embed_scale: bool = True  # multiply the looked-up embedding by sqrt(d_model)
  stream_reduction: str = "sum"  # how streams become one before the final norm: sum, mean
  # Learned per-stream offsets added as the embedding is copied into the streams, so they
  # start apart once trained (lucidrains' `add_stream_embed`); zero at initialisation.
  stream_embed: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim"):
      check_int(name, getattr(self, name))
    if self.residual not in RESIDUALS:
      raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}; got {self.residual!r}")
    object.__setattr__(self, "residual_settings",
                       resolve_settings(self.residual, self.residual_settings))
    for name in ("num_kv_heads", "head_dim_override"):
      if getattr(self, name) is not None:
        check_int(name, getattr(self, name))
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads "
                       f"({self.num_heads})")
    if self.head_dim_override is None and self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                       f"({self.num_heads}), or head_dim_override given")
    if self.head_dim % 2:
      raise ValueError(f"head dim ({self.head_dim}) must be even for RoPE")
    for name in ("qk_norm", "embed_scale"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if not isinstance(self.stream_embed, bool):
      raise ValueError(f"stream_embed must be True or False, got {self.stream_embed!r}")
    if self.stream_embed and not self.uses_streams:
      raise ValueError(f"stream_embed needs a variant with streams; residual {self.residual!r} "
                       "has none: set stream_embed = False")
    if self.stream_reduction not in STREAM_REDUCTIONS:
      raise ValueError(f"stream_reduction must be one of {', '.join(STREAM_REDUCTIONS)}; got "
                       f"{self.stream_reduction!r}")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"scan_layers must be True or False, got {self.scan_layers!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}; got {self.remat!r}")
    if self.attention not in ("auto", *ATTENTION_IMPLEMENTATIONS):
      raise ValueError(f"attention must be one of auto, {', '.join(ATTENTION_IMPLEMENTATIONS)}; "
                       f"got {self.attention!r}")

  @property
  def uses_streams(self) -> bool:
    return RESIDUALS[self.residual].uses_streams

  @property
  def num_streams(self) -> int:
    """n of the streams; 1 for a variant without streams."""
    return self.residual_settings.num_streams if self.uses_streams else 1

  @classmethod
  def from_record(cls, fields: dict) -> "ModelConfig":
    """A config.json "model" section -> its ModelConfig. Records of before the variants had
    settings of their own hold them as fields (`num_streams`, `hc_dynamic`, ...): those are
    moved into the recorded variant's settings (the ones it has; the rest were unused)."""
    if not isinstance(fields, dict):
      raise TypeError(f"a model record is a JSON object, got {type(fields).__name__}")
    fields = dict(fields)
    old = {new: fields.pop(name) for name, new in FLAT_SETTINGS.items() if name in fields}
    entry = RESIDUALS.get(fields.get("residual", "prenorm"))  # an unknown one: refused below
    settings_class = entry.settings if entry else None
    if old and settings_class is not None and fields.get("residual_settings") is None:
      names = {field.name for field in dataclasses.fields(settings_class)}
      fields["residual_settings"] = {k: v for k, v in old.items() if k in names}
    return cls(**fields)

  @property
  def head_dim(self) -> int:
    return self.head_dim_override or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  def attention_for(self, seq_len: int) -> str:
    """The attention implementation that runs: `attention`, or for "auto" the platform's
    library kernel (splash on TPU when `seq_len` is a multiple of 128, cuDNN on GPU in
    bfloat16) and the einsum everywhere else."""
    if self.attention != "auto":
      return self.attention
    choice = default_attention(dtype=DTYPES[self.dtype])
    return "xla" if choice == "splash" and seq_len % SPLASH_SEQ_MULTIPLE else choice


def _param(rngs, shape, std, logical_axes):
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * std,
                   logical_axes=logical_axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, axis: str = "norm"):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=(axis,))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def _attention(q, k, v, implementation: str) -> jax.Array:
  """`causal_attention`, run per shard for the Pallas splash kernel when a mesh is set:
  Pallas calls are not partitioned automatically. Batch is split as the activations are
  (data, fsdp), heads over tensor."""
  attend = functools.partial(causal_attention, implementation=implementation)
  mesh = jax.sharding.get_abstract_mesh()
  if implementation != "splash" or mesh.empty or mesh.size == 1:
    return attend(q, k, v)
  spec = P(BATCH_AXES, None, "tensor", None)
  return jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def rope(x: jax.Array, base: float, positions: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding on `[batch, seq, heads, head_dim]` (rotate-half form), at
  `positions` `[batch, seq]` (int), or 0..seq-1 in every row."""
  seq, half = x.shape[1], x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if positions is None:  # one table for every row
    positions = jnp.arange(seq, dtype=jnp.float32)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [(batch,) seq, half]
  cos, sin = (f(angles).reshape(-1, seq, 1, half) for f in (jnp.cos, jnp.sin))
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    self.cfg = cfg
    self.wq = _param(rngs, (d, h, k), cfg.init_std, ("embed", "heads", "head_dim"))
    self.wk = _param(rngs, (d, g, k), cfg.init_std, ("embed", "heads", "head_dim"))
    self.wv = _param(rngs, (d, g, k), cfg.init_std, ("embed", "heads", "head_dim"))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(k, cfg.norm_eps, axis="head_dim")
      self.k_norm = RMSNorm(k, cfg.norm_eps, axis="head_dim")
    # Scaled by depth, as GPT-2 does, so the residual stream's variance stays put.
    self.wo = _param(rngs, (h, k, d), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                     ("heads", "head_dim", "embed"))

  def __call__(self, x, layout: "TokenLayout | None" = None):  # [batch, seq, d_model]
    """Causal self-attention over `x`, or with `layout`, at its positions over the tokens
    its `visible` marks."""
    q, k, v = self._qkv(x, None if layout is None else layout.positions)
    if layout is None:
      out = _attention(q, k, v, self.cfg.attention_for(x.shape[1]))
    else:
      out = masked_attention(q, k, v, layout.visible)
    return self._project_out(out)

  def extend(self, x, layout: "TokenLayout", keys: jax.Array, values: jax.Array):
    """Attention of `x`'s tokens over this layer's cache, `keys` and `values` `[batch, slots,
    kv_heads, head_dim]`, once their own keys and values are written to slots `layout.start`
    on -> (output, (their keys, their values))."""
    q, k, v = self._qkv(x, layout.positions)
    at = (0, layout.start, 0, 0)
    keys, values = (jax.lax.dynamic_update_slice(cache, new, at)
                    for cache, new in ((keys, k), (values, v)))
    return self._project_out(masked_attention(q, keys, values, layout.visible)), (k, v)

  def _qkv(self, x, positions):
    dtype = x.dtype
    q, k, v = (checkpoint_name(jnp.einsum("bld,dhk->blhk", x, w[...].astype(dtype)), name)
               for w, name in ((self.wq, "query"), (self.wk, "key"), (self.wv, "value")))
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return rope(q, self.cfg.rope_base, positions), rope(k, self.cfg.rope_base, positions), v

  def _project_out(self, out):
    out = checkpoint_name(out, "attention_context")
    return checkpoint_name(jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(out.dtype)),
                           "attention_out")


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, m = cfg.d_model, cfg.mlp_dim
    self.w_gate = _param(rngs, (d, m), cfg.init_std, ("embed", "mlp"))
    self.w_up = _param(rngs, (d, m), cfg.init_std, ("embed", "mlp"))
    self.w_down = _param(rngs, (m, d), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                         ("mlp", "embed"))

  def __call__(self, x):
    dtype = x.dtype
    gate = checkpoint_name(x @ self.w_gate[...].astype(dtype), "mlp_gate")
    up = checkpoint_name(x @ self.w_up[...].astype(dtype), "mlp_up")
    return checkpoint_name((jax.nn.silu(gate) * up) @ self.w_down[...].astype(dtype), "mlp_out")


class Block(nnx.Module):
  """Attention then MLP, each joined to the residual path as `RESIDUALS[cfg.residual]` says."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs,
               site_rngs: nnx.Rngs | None = None):
    """`site_rngs` draws the sites' parameters (default: `rngs`, as everything else);
    `Transformer` gives them a stream of their own, `site_stream(rngs)`."""
    self.residual = cfg.residual
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = SwiGLU(cfg, rngs)
    # Sub-layers are counted separately (2 per block), as in both papers.
    residual = RESIDUALS[cfg.residual]
    self.attn_site, self.mlp_site = (residual.make_site(cfg, 2 * layer + i, site_rngs or rngs)
                                     if residual.uses_streams else None
                                     for i in range(len(SITES)))

  def __call__(self, h, layout: "TokenLayout | None" = None):
    """`h` `[batch, seq, d_model]`, or streams `[batch, seq, n, d_model]`; `layout`: see
    `Attention`."""
    return self._sublayers(h, lambda x: self.attn(x, layout))

  def extend(self, h, layout: "TokenLayout", keys: jax.Array, values: jax.Array):
    """`__call__` reading this layer's cache (see `Attention.extend`) -> (h, the tokens' own
    keys and values).

    The hyper-connection streams (every variant with a site) need no cache of their own: a
    site's coefficients (H_pre, H_post, H_res) come from each token's own streams alone (the
    coefficient path looks at one token at a time), so the tokens before reach a new one only
    through attention, whose keys and values the cache holds."""
    written = []

    def attention(x):  # the join calls it once, in this trace
      out, new = self.attn.extend(x, layout, keys, values)
      written.append(new)
      return out

    return self._sublayers(h, attention), written[0]

  def _sublayers(self, h, attention):
    join = RESIDUALS[self.residual].join
    h = join(h, self.attn_site, self.attn_norm, attention)
    return join(h, self.mlp_site, self.mlp_norm, self.mlp)


# Where the sites' key stream starts: the params stream's key folded with the last index its
# counter could reach, which no model does (it draws one key per array, not 2**32).
SITE_STREAM_INDEX = 2**32 - 1


def site_stream(rngs: nnx.Rngs) -> nnx.Rngs:
  """The hyper-connection sites' own key stream, folded from `rngs`' params key without
  drawing from `rngs`: the weights every variant shares (embedding, attention, MLP, norms,
  read-out) are then the same at a seed whatever the residual (pre-norm's, as they always
  were), so variants at one seed are paired, and the sites draw in depth order in either
  layout."""
  return nnx.Rngs(params=jax.random.fold_in(rngs.params.key[...], SITE_STREAM_INDEX))


def stack_layers(blocks: list[Block]) -> Block:
  """Blocks of one structure -> one Block whose parameters are stacked on a leading
  `layers` axis (logical axis `LAYERS_AXIS`), for `nnx.scan`. Each layer keeps the values it
  was initialised with, `layer_index`-dependent ones included; the stacked Block's static
  fields are layer 0's (the sites' `layer_index` only shapes initial values)."""
  graphdef, _ = nnx.split(blocks[0])

  def stack(*variables):
    # Every stacked Variable names its layers axis, so sharding and weight decay can tell a
    # stack of vectors from a matrix; unnamed axes stay None (replicated).
    axes = variables[0].get_metadata().get("logical_axes") or (None,) * variables[0].ndim
    return variables[0].replace(jnp.stack([v[...] for v in variables]),
                                logical_axes=(LAYERS_AXIS, *axes))

  states = [nnx.state(block) for block in blocks]
  return nnx.merge(graphdef, jax.tree.map(stack, *states,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _run_block(block: Block, h: jax.Array, layout: "TokenLayout | None") -> jax.Array:
  return block(h, layout)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """Where one call's tokens sit: `positions` `[batch, seq]` int, RoPE's; `visible` `[batch,
  seq, keys]` bool, the keys each token attends to (its sequence's, or a cache's slots);
  `start`: () int, the cache slot of the first token (`Transformer.extend` only)."""

  positions: jax.Array
  visible: jax.Array
  start: jax.Array | int = 0


def visible_keys(valid: jax.Array, start, seq: int) -> jax.Array:
  """Keys `valid` `[batch, keys]` (False: padding, or a slot not written yet) and queries at
  keys `start`..`start + seq - 1` -> `[batch, seq, keys]`: each query sees the valid keys up
  to its own, and always its own, so a padded query attends to itself rather than to nothing
  (see `masked_attention`)."""
  keys = jnp.arange(valid.shape[1])
  own = start + jnp.arange(seq)[:, None]  # [seq, 1]
  return valid[:, None, :] & (keys <= own) | (keys == own)


# The cache split as the activations are: batch over data x fsdp, kv heads over tensor.
_KV_SPEC = P(None, BATCH_AXES, None, "tensor", None)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Every layer's keys and values (after RoPE), `[num_layers, batch, slots, kv_heads,
  head_dim]` in the activations' dtype; `valid` `[batch, slots]`: the slots holding a real
  token (written, and not padding); `length` (): the slots written so far, the next write's
  first. Every row writes the same slots (prompts are left-padded): rows differ only in their
  tokens' positions and in which slots are padding."""

  keys: jax.Array
  values: jax.Array
  valid: jax.Array
  length: jax.Array

  @property
  def slots(self) -> int:
    return self.keys.shape[2]

  @classmethod
  def empty(cls, cfg: "ModelConfig", batch: int, slots: int) -> "KVCache":
    # Keys and values each their own buffer: a caller may donate the cache to a jitted step.
    zeros = lambda: jnp.zeros((cfg.num_layers, batch, slots, cfg.kv_heads, cfg.head_dim),
                              DTYPES[cfg.dtype])
    return cls(zeros(), zeros(), jnp.zeros((batch, slots), bool),
               jnp.zeros((), jnp.int32)).sharded()

  def sharded(self) -> "KVCache":
    """Constrained to the activations' layout when a mesh is set (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return self
    specs = KVCache(_KV_SPEC, _KV_SPEC, P(BATCH_AXES, None), P())
    return jax.lax.with_sharding_constraint(self, specs)


class Transformer(nnx.Module):
  """`[batch, seq]` int token ids -> `[batch, seq, vocab]` float32 logits.

  Embedding and read-out follow Gemma's convention: the looked-up embedding is multiplied by
  sqrt(d_model) on the way in (`embed_scale`; Llama and Qwen3 have none), and the logits are
  `final_norm(h) @ E^T` (tied) or `final_norm(h) @ unembed` with no multiplier. Both matrices
  start N(0, 1/d_model²), so each row has length about 1/sqrt(d_model) and a logit, |row| ·
  |final_norm(h)| · cos, is at most about 1 at initialisation whatever the width: a fresh model
  predicts close to uniformly, ln(vocab). This is needed because near-identity residual blocks
  carry every token's own embedding to the read-out; with N(0, 1) embeddings and a 1/sqrt(d)
  read-out each token would predict itself with logit sqrt(d). Without a read-out multiplier the
  read-out keeps the standard parametrisation's learning speed (an Adam step moves a logit by
  about d_model · lr), so the small start costs no training time (docs/results.md).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    embed_std = 1.0 / cfg.d_model
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), embed_std, ("vocab", "embed"))
    # Built in depth order either way, so both layouts draw the same initial values.
    sites = site_stream(rngs)
    blocks = [Block(cfg, layer, rngs, sites) for layer in range(cfg.num_layers)]
    self.blocks = stack_layers(blocks) if cfg.scan_layers else nnx.List(blocks)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if cfg.stream_embed:
      self.stream_embed = StreamEmbedding(cfg.num_streams, cfg.d_model)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), embed_std, ("embed", "vocab"))

  def _blocks(self, h: jax.Array, layout: TokenLayout | None) -> jax.Array:
    cfg = self.cfg
    run = _run_block
    if cfg.remat != "none":
      # Under scan, CSE cannot merge the recomputation into the forward: no barrier needed.
      run = nnx.remat(run, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      return nnx.scan(lambda h, block: run(block, h, layout), in_axes=(nnx.Carry, 0),
                      out_axes=nnx.Carry)(h, self.blocks)
    for block in self.blocks:
      h = run(block, h, layout)
    return h

  def _extend_blocks(self, h, layout: TokenLayout, keys: jax.Array, values: jax.Array):
    """The blocks reading the cache's `keys`, `values` -> (h, every layer's keys and values
    of the new tokens, `[num_layers, batch, seq, kv_heads, head_dim]` each)."""
    if self.cfg.scan_layers:
      return nnx.scan(lambda h, block, k, v: block.extend(h, layout, k, v),
                      in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
                          h, self.blocks, keys, values)
    written = []
    for block, k, v in zip(self.blocks, keys, values):
      h, new = block.extend(h, layout, k, v)
      written.append(new)
    return h, jax.tree.map(lambda *layers: jnp.stack(layers), *written)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """`tokens` `[batch, seq]` -> logits `[batch, seq, vocab]`. `positions` `[batch, seq]` int:
    each token's, for RoPE (default 0..seq-1 in every row). `mask` `[batch, seq]` bool: False
    at padding (default: none), which no token attends to, so the real tokens' logits do not
    depend on it (the padding's own logits mean nothing)."""
    if positions is None and mask is None:  # what training runs
      return self._read_out(self._blocks(self._embed(tokens), None))
    batch, seq = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    if mask is None:
      mask = jnp.ones((batch, seq), bool)
    layout = TokenLayout(positions, visible_keys(mask, 0, seq))
    return self._read_out(self._blocks(self._embed(tokens), layout))

  def extend(self, cache: KVCache, tokens: jax.Array, positions: jax.Array,
             mask: jax.Array | None = None, *, last_only: bool = False):
    """`tokens` `[batch, seq]` at `positions` (`mask`: see `__call__`) after those `cache`
    holds: their keys and values go to its next `seq` slots, and each token attends to the
    valid slots up to its own -> (logits `[batch, seq, vocab]`, or `[batch, 1, vocab]` of the
    last token with `last_only`; the cache holding them too).

    A prefill is one call on `KVCache.empty` with the whole left-padded prompt; a decode step,
    one call with a token per row. Keep `cache.length + seq` within `cache.slots`: under jit a
    write past the end cannot be refused here, and would be clamped."""
    batch, seq = tokens.shape
    if seq > cache.slots:
      raise ValueError(f"extend got {seq} tokens for a cache of {cache.slots} slots")
    if mask is None:
      mask = jnp.ones((batch, seq), bool)
    start = cache.length
    valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, start))
    layout = TokenLayout(positions, visible_keys(valid, start, seq), start)
    h, (keys, values) = self._extend_blocks(self._embed(tokens), layout, cache.keys,
                                            cache.values)
    at = (0, 0, start, 0, 0)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.keys, keys, at),
                    jax.lax.dynamic_update_slice(cache.values, values, at), valid, start + seq)
    return self._read_out(h[:, -1:] if last_only else h), cache.sharded()

  def _embed(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    h = jnp.take(self.embed[...], tokens, axis=0)
    if cfg.embed_scale:
      # Inputs of RMS about 1/sqrt(d): far above the norms' eps at any width.
      h = h * math.sqrt(cfg.d_model)
    h = h.astype(dtype)
    if cfg.stream_embed:
      return self.stream_embed(h)
    if cfg.uses_streams:
      h = expand_streams(h, cfg.num_streams)
    return h

  def _read_out(self, h: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    if cfg.uses_streams:
      check_streams(h, cfg.num_streams, cfg.d_model)
      h = reduce_streams(h) if cfg.stream_reduction == "sum" else mean_streams(h)
    h = self.final_norm(h)
    readout = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]
    return jnp.einsum("bld,dv->blv", h, readout.astype(dtype),
                      preferred_element_type=jnp.float32)


def per_layer(model: Transformer, sown_blocks, *path):
  """The value sown at `blocks/<layer>/<path>` for every layer, each array stacked
  `[num_layers, ...]`, from `nnx.to_pure_dict(intermediates)["blocks"]`, for either layout
  (scanned blocks sow it stacked already)."""
  def at(tree):
    for key in path:
      tree = tree[key]
    return tree

  if model.cfg.scan_layers:
    return at(sown_blocks)
  layers = [at(sown_blocks[layer]) for layer in range(model.cfg.num_layers)]
  return jax.tree.map(lambda *values: jnp.stack(values), *layers)


def layer_params(model: Transformer) -> list[dict]:
  """Each block's parameters as a pure dict (`nnx.to_pure_dict`'s nesting: `attn/wq`, ...),
  in depth order, from either layout."""
  blocks = nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param))
  if model.cfg.scan_layers:
    return [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(model.cfg.num_layers)]
  return [blocks[i] for i in range(model.cfg.num_layers)]


def block_params(model: Transformer, scan_layers: bool | None = None) -> dict:
  """The blocks' parameters as a pure dict in the layout `scan_layers` gives (default: the
  model's): stacked on a leading layers axis, or one dict per layer number. In the model's
  own layout they are its arrays, not copies."""
  if scan_layers is None or scan_layers == model.cfg.scan_layers:
    return nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param))
  return blocks_in_layout(layer_params(model), scan_layers)


def blocks_in_layout(layers: list[dict], scan_layers: bool) -> dict:
  """One pure dict per block -> `block_params`'s layout (stacking copies them)."""
  if scan_layers:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return dict(enumerate(layers))


def outer_params(model: Transformer) -> dict:
  """The parameters outside the blocks (`embed`, `final_norm`, `unembed`) as a pure dict:
  with `layer_params`, what `from_params` takes."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return {name: value for name, value in params.items() if name != "blocks"}


def from_params(cfg: ModelConfig, params: dict, layers: list[dict]) -> Transformer:
  """The Transformer of `cfg` holding `params` (a pure dict of everything outside `blocks`:
  `embed`, `final_norm`, `unembed`) and `layers` (one pure dict per block, as `layer_params`
  gives), stacked on the layers axis for `scan_layers`. Nothing is drawn at random; a
  missing, extra or misshapen array is refused in one line naming its path."""
  if len(layers) != cfg.num_layers:
    raise ValueError(f"layers must hold num_layers={cfg.num_layers} blocks, got {len(layers)}")
  for i, layer in enumerate(layers):
    if jax.tree.structure(layer) != jax.tree.structure(layers[0]):
      raise ValueError(f"layer {i}'s parameters are not named as layer 0's")
  return from_blocks(cfg, params, blocks_in_layout(layers, cfg.scan_layers))


def from_blocks(cfg: ModelConfig, params: dict, blocks: dict) -> Transformer:
  """`from_params` with the blocks' parameters already in `cfg`'s layout (`block_params`).
  float32 jax arrays are taken as they are: the new model shares them (no copy)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  values = {**params, "blocks": blocks}
  expected = nnx.to_pure_dict(state)
  paths = lambda tree: {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
                        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  want, got = paths(expected), paths(values)
  for name in sorted(set(want) | set(got)):
    if name not in got or name not in want:
      raise ValueError(f"parameter {name} is {'missing' if name in want else 'not in the model'}")
    if tuple(got[name].shape) != tuple(want[name].shape):
      raise ValueError(f"parameter {name} has shape {tuple(got[name].shape)}, the model's is "
                       f"{tuple(want[name].shape)}")
  nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), values))
  return nnx.merge(graphdef, state)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
