"""A small decoder-only Transformer whose residual connection is the one thing that varies.

Token embedding, RoPE causal multi-head attention, SwiGLU MLP, RMSNorm, optional tied
embeddings. `residual` picks how each sub-layer (attention, MLP) is wired in:

    prenorm   h = h + F(norm(h))                         the baseline
    postnorm  h = norm(h + F(h))
    hc        streams = HC(streams, x -> F(norm(x)))     dynamic, or static with hc_dynamic=False
    mhc       streams = mHC(streams, x -> F(norm(x)))
    mhc_lite  mHC with H_res a mixture of permutation matrices

With streams, the embedding is copied into `num_streams` streams and summed back before the
final norm. Everything else is identical across variants, so loss curves compare fairly.

Parameters are float32 and carry `logical_axes` metadata (see `sharding.py`); activations
run in `dtype`; the hyper-connection coefficient path stays float32 whatever `dtype` is.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.mappings import check_streams
from mhc_jax.modules import HyperConnection, ManifoldHyperConnection
from mhc_jax.streams import expand_streams, reduce_streams

RESIDUALS = ("prenorm", "postnorm", "hc", "mhc", "mhc_lite")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 258
  d_model: int = 256
  num_layers: int = 6
  num_heads: int = 8
  mlp_dim: int = 1024
  residual: str = "prenorm"
  num_streams: int = 4
  hc_dynamic: bool = True
  sinkhorn_iters: int = 20
  sinkhorn_backend: str = "auto"
  tie_embeddings: bool = True
  dtype: str = "float32"
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "num_streams",
                 "sinkhorn_iters"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if self.residual not in RESIDUALS:
      raise ValueError(f"residual must be one of {', '.join(RESIDUALS)}; got {self.residual!r}")
    if self.d_model % self.num_heads:
      raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads "
                       f"({self.num_heads})")
    if (self.d_model // self.num_heads) % 2:
      raise ValueError(f"head dim d_model/num_heads = {self.d_model // self.num_heads} must be "
                       "even for RoPE")
    if self.dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")

  @property
  def uses_streams(self) -> bool:
    return self.residual in ("hc", "mhc", "mhc_lite")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


def _param(rngs, shape, std, logical_axes):
  return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * std,
                   logical_axes=logical_axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding on `[batch, seq, heads, head_dim]` (rotate-half form)."""
  seq, half = x.shape[1], x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs  # [seq, half]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    self.cfg = cfg
    self.wq = _param(rngs, (d, h, k), cfg.init_std, ("embed", "heads", "head_dim"))
    self.wk = _param(rngs, (d, h, k), cfg.init_std, ("embed", "heads", "head_dim"))
    self.wv = _param(rngs, (d, h, k), cfg.init_std, ("embed", "heads", "head_dim"))
    # Scaled by depth, as GPT-2 does, so the residual stream's variance stays put.
    self.wo = _param(rngs, (h, k, d), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                     ("heads", "head_dim", "embed"))

  def __call__(self, x):  # [batch, seq, d_model]
    dtype = x.dtype
    q, k, v = (jnp.einsum("bld,dhk->blhk", x, w[...].astype(dtype))
               for w in (self.wq, self.wk, self.wv))
    q, k = rope(q, self.cfg.rope_base), rope(k, self.cfg.rope_base)
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(self.cfg.head_dim)
    seq = x.shape[1]
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1).astype(dtype)
    out = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("blhk,hkd->bld", out, self.wo[...].astype(dtype))


class SwiGLU(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, m = cfg.d_model, cfg.mlp_dim
    self.w_gate = _param(rngs, (d, m), cfg.init_std, ("embed", "mlp"))
    self.w_up = _param(rngs, (d, m), cfg.init_std, ("embed", "mlp"))
    self.w_down = _param(rngs, (m, d), cfg.init_std / math.sqrt(2 * cfg.num_layers),
                         ("mlp", "embed"))

  def __call__(self, x):
    dtype = x.dtype
    gate = jax.nn.silu(x @ self.w_gate[...].astype(dtype))
    return (gate * (x @ self.w_up[...].astype(dtype))) @ self.w_down[...].astype(dtype)


def make_site(cfg: ModelConfig, layer_index: int, rngs: nnx.Rngs):
  """The hyper-connection module for one sub-layer, or None for prenorm / postnorm."""
  if cfg.residual == "hc":
    return HyperConnection(cfg.num_streams, cfg.d_model, layer_index=layer_index,
                           dynamic=cfg.hc_dynamic)
  if cfg.residual in ("mhc", "mhc_lite"):
    return ManifoldHyperConnection(
        cfg.num_streams, cfg.d_model, layer_index=layer_index, rngs=rngs,
        sinkhorn_iters=cfg.sinkhorn_iters, sinkhorn_backend=cfg.sinkhorn_backend,
        res_mapping="permutations" if cfg.residual == "mhc_lite" else "sinkhorn")
  return None


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.residual = cfg.residual
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = SwiGLU(cfg, rngs)
    # Sub-layers are counted separately (2 per block), as in both papers.
    self.attn_site = make_site(cfg, 2 * layer, rngs)
    self.mlp_site = make_site(cfg, 2 * layer + 1, rngs)

  def _sublayer(self, h, site, norm, fn):
    if self.residual == "postnorm":
      return norm(h + fn(h))
    if site is None:  # prenorm
      return h + fn(norm(h))
    return site(h, lambda x: fn(norm(x)))

  def __call__(self, h):  # [batch, seq, d_model] or streams [batch, seq, n, d_model]
    h = self._sublayer(h, self.attn_site, self.attn_norm, self.attn)
    return self._sublayer(h, self.mlp_site, self.mlp_norm, self.mlp)


class Transformer(nnx.Module):
  """`[batch, seq]` int token ids -> `[batch, seq, vocab]` float32 logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), 1.0, ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, layer, rngs) for layer in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
    if not cfg.tie_embeddings:
      self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std,
                            ("embed", "vocab"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    h = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
    if cfg.uses_streams:
      h = expand_streams(h, cfg.num_streams)
    for block in self.blocks:
      h = block(h)
    if cfg.uses_streams:
      check_streams(h, cfg.num_streams, cfg.d_model)
      h = reduce_streams(h)
    h = self.final_norm(h)
    if cfg.tie_embeddings:
      # Embeddings are N(0, 1); scale the tied read-out so initial logits are O(1).
      return jnp.einsum("bld,vd->blv", h, self.embed[...].astype(dtype),
                        preferred_element_type=jnp.float32) / math.sqrt(cfg.d_model)
    return jnp.einsum("bld,dv->blv", h, self.unembed[...].astype(dtype),
                      preferred_element_type=jnp.float32)


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
