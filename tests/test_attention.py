"""Causal attention: "xla" against a float64 reference, "splash" (Pallas interpret mode) against
"xla", "splash" and "cudnn" lowered for TPU and CUDA (there is no accelerator here), masked
attention over more keys than queries (a KV cache) against the reference, and the one-line
refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.lm import attention
from mhc_jax.lm.attention import causal_attention, default_attention, masked_attention

F32_TOL = 1e-5  # relative (norm) error of a float32 computation against float64
BF16_TOL = 1e-2  # bfloat16 keeps 8 mantissa bits: relative rounding 2^-9 per element


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def reference(q, k, v, visible=None):
  """Attention written apart from attention.py: kv heads repeated per group, the mask (causal,
  or `visible` `[batch, seq, keys]`) added as -inf, a hand-written softmax; float64 in,
  float64 out."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  logits = jnp.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(q.shape[-1])
  seq = q.shape[1]
  hidden = np.triu(np.ones((seq, seq), bool), 1) if visible is None else ~visible[:, None]
  logits = logits + np.where(hidden, -np.inf, 0.0)
  weights = jnp.exp(logits - logits.max(-1, keepdims=True))
  return jnp.einsum("bhqs,bshd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def random_inputs(seed, batch, seq, heads, kv_heads, head_dim):
  """float64 q, k, v and an output cotangent; q and k scaled so the softmax is peaked."""
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, seq, heads, head_dim)) * 1.5
  k = rng.normal(size=(batch, seq, kv_heads, head_dim)) * 1.5
  v = rng.normal(size=(batch, seq, kv_heads, head_dim))
  return q, k, v, rng.normal(size=q.shape)


def value_and_grads(fn, q, k, v, cotangent):
  """(fn(q, k, v), d<fn(q, k, v), cotangent>/d(q, k, v)) in one compiled call."""
  def both(q, k, v, c):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(c)
  return jax.jit(both)(q, k, v, cotangent)


def float64_reference(q, k, v, visible=None):
  with jax.enable_x64(True):
    return np.asarray(reference(*(jnp.asarray(x, jnp.float64) for x in (q, k, v)), visible))


def float64_value_and_grads(q, k, v, cotangent):
  with jax.enable_x64(True):
    out, vjp = jax.vjp(reference, *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cotangent, jnp.float64))]


def implementation(name, interpret=False):
  return lambda q, k, v: causal_attention(q, k, v, implementation=name, interpret=interpret)


def as_dtype(dtype, *arrays):
  return [jnp.asarray(x, dtype) for x in arrays]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_xla_matches_float64_reference(heads, kv_heads):
  q, k, v, g = random_inputs(heads + kv_heads, 2, 11, heads, kv_heads, 8)
  out, grads = value_and_grads(implementation("xla"), *as_dtype(jnp.float32, q, k, v, g))
  ref_out, ref_grads = float64_value_and_grads(q, k, v, g)
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert rel_err(out, ref_out) <= F32_TOL
  for grad, ref_grad, x in zip(grads, ref_grads, (q, k, v)):
    assert grad.shape == x.shape and rel_err(grad, ref_grad) <= F32_TOL


def test_xla_is_causal_and_keeps_bfloat16():
  q, k, v, _ = random_inputs(0, 2, 11, 4, 2, 8)
  out = causal_attention(*as_dtype(jnp.bfloat16, q, k, v), implementation="xla")
  assert out.dtype == jnp.bfloat16 and rel_err(out, float64_reference(q, k, v)) <= BF16_TOL
  # Changing the last token's key and value changes the last output row alone.
  k2, v2 = k.copy(), v.copy()
  k2[:, -1], v2[:, -1] = 9.0, -9.0
  out2 = causal_attention(*as_dtype(jnp.bfloat16, q, k2, v2), implementation="xla")
  assert np.array_equal(np.asarray(out2[:, :-1]), np.asarray(out[:, :-1]))
  assert not np.allclose(np.asarray(out2[:, -1], np.float32), np.asarray(out[:, -1], np.float32))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_masked_attention_over_a_cache_matches_float64_reference(heads, kv_heads):
  # 5 queries over 9 keys, each seeing a random subset that holds its own key (slots 4..8);
  # slot 0 is hidden from every query, as padding is.
  q = random_inputs(heads, 2, 5, heads, kv_heads, 8)[0]
  _, k, v, _ = random_inputs(kv_heads, 2, 9, heads, kv_heads, 8)
  visible = np.random.default_rng(heads + kv_heads).random((2, 5, 9)) < 0.5
  visible[:, np.arange(5), 4 + np.arange(5)], visible[:, :, 0] = True, False
  attend = jax.jit(masked_attention)
  out = attend(*as_dtype(jnp.float32, q, k, v), visible)
  assert out.shape == q.shape and out.dtype == jnp.float32
  assert rel_err(out, float64_reference(q, k, v, visible)) <= F32_TOL
  k[:, 0], v[:, 0] = 9.0, -9.0  # what a hidden key holds changes nothing, bit for bit
  np.testing.assert_array_equal(attend(*as_dtype(jnp.float32, q, k, v), visible), out)
  one_line_error(r"^attention visible must be bool \(2, 5, 9\) \(batch, seq, keys\), got bool "
                 r"\(2, 5, 5\)$", masked_attention, *as_dtype(jnp.float32, q, k, v),
                 visible[..., :5])
  one_line_error(r"^attention k and v must match q's batch and head_dim, got q \(2, 5, 4, 8\) "
                 r"and k \(1, 9, ", masked_attention, *as_dtype(jnp.float32, q, k[:1], v[:1]),
                 visible)


# Interpret mode on CPU: about 1.5 s for the forward pass, 5-10 s with gradients, per case.
SPLASH_CASES = [
    # batch, seq, heads, kv_heads, head_dim, dtype, tolerance against "xla"
    pytest.param(2, 384, 2, 2, 64, jnp.float32, F32_TOL, id="3x3-blocks-f32"),
    pytest.param(1, 256, 4, 2, 128, jnp.float32, F32_TOL, id="gqa-one-block-f32"),
    pytest.param(1, 128, 2, 1, 64, jnp.bfloat16, BF16_TOL, id="mqa-bf16"),
]


@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,dtype,tol", SPLASH_CASES)
def test_splash_interpret_matches_xla(batch, seq, heads, kv_heads, head_dim, dtype, tol):
  inputs = as_dtype(dtype, *random_inputs(seq + heads, batch, seq, heads, kv_heads, head_dim))
  out, grads = value_and_grads(implementation("splash", interpret=True), *inputs)
  ref_out, ref_grads = value_and_grads(implementation("xla"), *inputs)
  assert out.shape == ref_out.shape and out.dtype == dtype
  assert rel_err(out, ref_out) <= tol
  for grad, ref_grad, x in zip(grads, ref_grads, inputs):
    assert grad.shape == x.shape and grad.dtype == dtype
    assert rel_err(grad, ref_grad) <= tol


def test_splash_kernel_cache_holds_no_tracers():
  # The first trace builds and caches the kernel; a tracer left in it would break the second.
  attention._splash_kernel.cache_clear()
  fn = jax.jit(implementation("splash", interpret=True))
  for dtype in (jnp.float32, jnp.bfloat16):
    x = jnp.zeros((1, 128, 2, 64), dtype)
    assert fn.trace(x, x, x).out_info.dtype == dtype
  assert attention._splash_kernel.cache_info().hits == 1


def test_splash_lowers_for_tpu():
  q, kv = jnp.zeros((2, 1024, 4, 128), jnp.bfloat16), jnp.zeros((2, 1024, 2, 128), jnp.bfloat16)
  loss = lambda q, k, v: attention._splash_attention(q, k, v, False).astype(jnp.float32).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = grads.trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dq and dkv kernels


def test_cudnn_lowers_for_cuda(monkeypatch):
  # A CPU-only jaxlib cannot say which cuDNN it would use, and jax asks at trace time:
  # answer for it, and check what reaches the CUDA lowering.
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(fused, "check_cudnn_version"):
    pytest.skip("this jax asks for the cuDNN version some other way")
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 90800)
  q, kv = jnp.zeros((2, 128, 4, 64), jnp.bfloat16), jnp.zeros((2, 128, 2, 64), jnp.bfloat16)
  loss = lambda q, k, v: attention._cudnn_attention(q, k, v).astype(jnp.float32).sum()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  text = grads.trace(q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
  text = text.replace("\\22", '"')
  assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text
  assert '"is_flash_attention": true' in text and '"mask_type": "CAUSAL"' in text
  assert '"fmha_scale": 0.125' in text


def test_default_attention():
  assert [default_attention(p) for p in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "xla"]
  assert default_attention() == "xla"  # this process runs on CPU
  assert default_attention("gpu", jnp.bfloat16) == "cudnn"
  assert default_attention("gpu", jnp.float32) == "xla"
  assert default_attention("tpu", jnp.float32) == "splash"


def one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(ValueError, match=match) as err:
    fn(*args, **kwargs)
  assert "\n" not in str(err.value)


X = jnp.zeros((1, 128, 4, 8))
BAD_INPUTS = [
    ((X, X, X), {"implementation": "flash"},
     r"^attention must be one of xla, cudnn, splash; got 'flash'$"),
    ((X, X, X), {"implementation": "xla", "interpret": True},
     r"^attention interpret=True applies to 'splash' only, got 'xla'$"),
    ((X[0], X, X), {"implementation": "xla"},
     r"^attention q must be \[batch, seq, heads, head_dim\], got \(128, 4, 8\)$"),
    ((X, X, X[..., :2, :]), {"implementation": "xla"},
     r"^attention k and v must have one shape, got \(1, 128, 4, 8\) and \(1, 128, 2, 8\)$"),
    ((X, X[:, :64], X[:, :64]), {"implementation": "xla"},
     r"^attention k and v must match q's batch, seq and head_dim, got q \(1, 128, 4, 8\) and"),
    ((X, X[..., :3, :], X[..., :3, :]), {"implementation": "xla"},
     r"^attention kv heads \(3\) must divide q heads \(4\)$"),
    ((X, X.astype(jnp.bfloat16), X), {"implementation": "xla"},
     r"^attention q, k, v must share one floating dtype, got float32, bfloat16, float32$"),
    ((X[:, :100], X[:, :100], X[:, :100]), {"implementation": "splash", "interpret": True},
     r"^attention='splash' needs seq to be a multiple of 128 .* got seq 100$"),
]


@pytest.mark.parametrize("args,kwargs,match", BAD_INPUTS)
def test_bad_input_is_one_line(args, kwargs, match):
  one_line_error(match, causal_attention, *args, **kwargs)


def test_platform_refusals_are_one_line(monkeypatch):
  one_line_error(r"^attention='cudnn' needs a GPU .*; this process runs on cpu: use 'xla'$",
                 causal_attention, X, X, X, implementation="cudnn")
  one_line_error(r"^attention='splash' needs a TPU .*; this process runs on cpu: use 'xla'$",
                 causal_attention, X, X, X, implementation="splash")
  # On a GPU, float32 is refused before cuDNN is asked: it has no float32 kernel.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  one_line_error(r"^attention='cudnn' needs bfloat16 or float16 q, k, v .*float32 kernel",
                 causal_attention, X, X, X, implementation="cudnn")
