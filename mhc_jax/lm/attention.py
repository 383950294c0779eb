"""Causal self-attention behind one call, the implementation a choice:

    xla     einsums over full `[batch, heads, seq, seq]` float32 logits: any platform, any shape
    cudnn   `jax.nn.dot_product_attention`'s cuDNN flash kernel: GPU, bfloat16/float16 only
    splash  JAX's Pallas splash-attention kernel: TPU, seq a multiple of 128

All three take q `[batch, seq, heads, head_dim]` and k, v `[batch, seq, kv_heads, head_dim]`
with kv_heads dividing heads (grouped-query attention: query head i reads kv head
i // (heads / kv_heads), the grouping all three kernels use), scale logits by 1/sqrt(head_dim),
take the softmax in float32, and return `[batch, seq, heads, head_dim]` in q's dtype.

`masked_attention` is the einsum of "xla" with a mask given instead of the causal one, and
keys that may outnumber the queries: padded batches, and decoding against a KV cache.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel,
    splash_attention_mask as splash_mask,
)

ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn", "splash")
_PLATFORM_DEFAULTS = {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Splash's kernels tile seq into blocks that must be multiples of the TPU's 128 lanes.
SPLASH_SEQ_MULTIPLE = 128
# MaxText's default splash block (base.yml sa_block_*); shorter sequences use one block.
_SPLASH_MAX_BLOCK = 512


def default_attention(platform: str | None = None, dtype=None) -> str:
  """The implementation to use on `platform` (default `jax.default_backend()`): "cudnn" on
  GPU, "splash" on TPU, "xla" elsewhere. Given a `dtype` cuDNN has no kernel for (float32),
  GPU gets "xla" rather than a choice that `causal_attention` would refuse."""
  choice = _PLATFORM_DEFAULTS.get(platform or jax.default_backend(), "xla")
  if choice == "cudnn" and dtype is not None and jnp.dtype(dtype) not in _CUDNN_DTYPES:
    return "xla"
  return choice


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str,
                     interpret: bool = False) -> jax.Array:
  """Causal softmax attention: q `[batch, seq, heads, head_dim]`, k and v
  `[batch, seq, kv_heads, head_dim]` -> `[batch, seq, heads, head_dim]` in q's dtype.

  `implementation`: one of `ATTENTION_IMPLEMENTATIONS` (see the module docstring); a choice
  this process's platform cannot run is refused here, before JAX traces anything.
  `interpret=True` runs "splash" in Pallas interpret mode on any platform: slow, for tests.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}; "
                     f"got {implementation!r}")
  if interpret and implementation != "splash":
    raise ValueError(f"attention interpret=True applies to 'splash' only, got {implementation!r}")
  _check_qkv(q, k, v)
  check_platform(implementation, q.dtype, q.shape[1], interpret=interpret)
  if implementation == "xla":
    return _xla_attention(q, k, v)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v)
  return _splash_attention(q, k, v, interpret)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array) -> jax.Array:
  """Softmax attention of q `[batch, seq, heads, head_dim]` over k, v `[batch, keys,
  kv_heads, head_dim]`, each query reading the keys `visible` `[batch, seq, keys]` (bool)
  marks -> `[batch, seq, heads, head_dim]` in q's dtype; the einsums of "xla", any platform.

  A query that sees no key gets NaN, which the next layer would spread through a zero weight
  (0 * NaN): let every query see at least its own key."""
  _check_qkv(q, k, v, same_seq=False)
  expected = (q.shape[0], q.shape[1], k.shape[1])
  if tuple(visible.shape) != expected or visible.dtype != jnp.bool_:
    raise ValueError(f"attention visible must be bool {expected} (batch, seq, keys), got "
                     f"{visible.dtype} {tuple(visible.shape)}")
  return _xla_attention(q, k, v, visible)


def _check_qkv(q, k, v, same_seq: bool = True):
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"attention {name} must be [batch, seq, heads, head_dim], got "
                       f"{getattr(x, 'shape', type(x).__name__)}")
  if k.shape != v.shape:
    raise ValueError(f"attention k and v must have one shape, got {k.shape} and {v.shape}")
  batch, seq, heads, head_dim = q.shape
  if (k.shape[0], k.shape[3]) != (batch, head_dim) or same_seq and k.shape[1] != seq:
    what = "batch, seq and head_dim" if same_seq else "batch and head_dim"
    raise ValueError(f"attention k and v must match q's {what}, got q {q.shape} and k "
                     f"{k.shape}")
  if heads % k.shape[2]:
    raise ValueError(f"attention kv heads ({k.shape[2]}) must divide q heads ({heads})")
  if not q.dtype == k.dtype == v.dtype or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"attention q, k, v must share one floating dtype, got {q.dtype}, "
                     f"{k.dtype}, {v.dtype}")


def check_platform(implementation: str, dtype, seq_len: int, platform: str | None = None,
                   interpret: bool = False) -> None:
  """Raises one line unless `implementation` runs on `platform` (default: this process's)
  for activations of `dtype` and `seq_len` tokens; callers check before any compilation."""
  platform = platform or jax.default_backend()
  if implementation == "cudnn":
    if platform not in ("gpu", "cuda"):
      raise ValueError("attention='cudnn' needs a GPU (jax.nn.dot_product_attention's cuDNN "
                       f"kernel); this process runs on {platform}: use 'xla'")
    # Refused rather than cast: casting would quietly run a float32 model's attention in
    # bfloat16, so a float32 run would no longer be one.
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
      raise ValueError(f"attention='cudnn' needs bfloat16 or float16 q, k, v (cuDNN flash "
                       f"attention has no {jnp.dtype(dtype)} kernel): use dtype bfloat16 or "
                       "'xla'")
  if implementation == "splash":
    if platform != "tpu" and not interpret:
      raise ValueError("attention='splash' needs a TPU (JAX's Pallas splash-attention "
                       f"kernel); this process runs on {platform}: use 'xla'")
    if seq_len % SPLASH_SEQ_MULTIPLE:
      raise ValueError(f"attention='splash' needs seq to be a multiple of "
                       f"{SPLASH_SEQ_MULTIPLE} (the kernel's block size), got seq {seq_len}")


def _xla_attention(q, k, v, visible=None):
  """The plain einsums; materialises `[batch, kv_heads, group, seq, keys]` float32 logits.
  `visible` `[batch, seq, keys]`; None: causal, keys the queries themselves."""
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  grouped = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
  logits = jnp.einsum("bqngk,bsnk->bngqs", grouped, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(head_dim)
  if visible is None:
    visible = jnp.tril(jnp.ones((seq, seq), bool))
  else:
    visible = visible[:, None, None]  # the same for every head
  probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1).astype(q.dtype)
  out = jnp.einsum("bngqs,bsnk->bqngk", probs, v)
  return out.reshape(batch, seq, heads, head_dim)


def _cudnn_attention(q, k, v):
  """cuDNN flash attention; its head_dim limits (a multiple of 8, at most 128, or 256 from
  Hopper on) are checked by `jax.nn.dot_product_attention` against the GPU it finds."""
  return jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1]),
                                      is_causal=True, implementation="cudnn")


def _splash_attention(q, k, v, interpret):
  """Splash takes one example's `[heads, seq, head_dim]`, hence the vmap over batch; it does
  not scale the logits, hence q scaled first (in q's dtype: one rounding, as MaxText does)."""
  batch, seq, heads, head_dim = q.shape
  kernel = _splash_kernel(heads, seq, interpret)
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(kernel)(heads_major(q / math.sqrt(head_dim)), heads_major(k), heads_major(v))
  return heads_major(out)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, seq: int, interpret: bool):
  """Splash's causal kernel for `heads` query heads over `seq` tokens, blocks of
  gcd(seq, 512) tokens (seq a multiple of 128) in every pass, forward and backward.

  Cached: building it lays the mask out block by block in numpy, about 0.5 s at seq 8192,
  which every layer of every trace would pay again. Built under compile-time eval so that
  the mask arrays it holds are concrete, never tracers of whichever trace asked first.
  """
  block = math.gcd(seq, _SPLASH_MAX_BLOCK)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq, seq))] * heads)
  sizes = splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  with jax.ensure_compile_time_eval():
    return splash_kernel.make_splash_mha_single_device(mask, block_sizes=sizes,
                                                        interpret=interpret)
