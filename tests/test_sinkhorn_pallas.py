"""Pallas Sinkhorn kernels (TPU and GPU code, interpret mode on CPU) against the XLA path.

Interpret mode fills every output buffer with NaN before the kernel runs (checked by the
canary test below), so "no NaN in the result" also means "every element was written".
"""

import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.sinkhorn import bench, sinkhorn_reference, sinkhorn_xla
from kernels_pallas.sinkhorn.pallas_common import sinkhorn_pallas

PLATFORMS = ["tpu", "gpu"]
TOL = 1e-5  # relative (norm) error: float32 rounding, same formulas as the XLA path


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def value_and_vjp(fn, logits, cotangent):
  """(fn(logits), d<fn(logits), cotangent>/dlogits) in one compiled call."""
  def both(x, c):
    out, vjp = jax.vjp(fn, x)
    return out, vjp(c)[0]
  return jax.jit(both)(logits, cotangent)


def pallas(platform, num_iters=20, eps=0.0, interpret=True):
  return lambda x: sinkhorn_pallas(x, num_iters, eps, platform=platform, interpret=interpret)


def check_against_xla(platform, logits, cotangent, num_iters=20, eps=0.0, interpret=True):
  out, grad = value_and_vjp(pallas(platform, num_iters, eps, interpret), logits, cotangent)
  ref_out, ref_grad = value_and_vjp(lambda x: sinkhorn_xla(x, num_iters, eps),
                                    logits, cotangent)
  assert out.shape == logits.shape and out.dtype == jnp.float32
  assert grad.shape == logits.shape and grad.dtype == logits.dtype
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
  assert rel_err(out, ref_out) <= TOL
  assert rel_err(grad, ref_grad) <= TOL
  return out, grad


def test_interpret_mode_poisons_unwritten_output():
  def writes_first_half(x_ref, o_ref):
    o_ref[:, :64] = x_ref[:, :64]
  for interpret in (True, pltpu.InterpretParams(uninitialized_memory="nan")):
    out = pl.pallas_call(writes_first_half, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                         interpret=interpret)(jnp.ones((8, 128)))
    assert np.all(np.asarray(out)[:, :64] == 1) and np.all(np.isnan(np.asarray(out)[:, 64:]))


@functools.lru_cache
def references(n, eps):
  """Fresh logits (129 tokens: a ragged count), a cotangent, and both references' output
  and VJP; cached so the two platforms' tests share them."""
  logits = random_logits(n, (3, 43, n, n))
  cotangent = random_logits(n + 1, (3, 43, n, n), 1.0)
  xla = value_and_vjp(lambda x: sinkhorn_xla(x, 20, eps), jnp.asarray(logits, jnp.float32),
                      jnp.asarray(cotangent, jnp.float32))
  with jax.enable_x64(True):  # eager: compiling the unrolled loop would take seconds
    out64, vjp64 = jax.vjp(lambda x: sinkhorn_reference(x, 20, eps),
                           jnp.asarray(logits, jnp.float64))
    ref64 = out64, vjp64(jnp.asarray(cotangent, jnp.float64))[0]
  return logits, cotangent, xla, ref64


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_matches_xla_and_float64_reference(platform, n, eps):
  logits, cotangent, xla, ref64 = references(n, eps)
  out, grad = value_and_vjp(pallas(platform, eps=eps), jnp.asarray(logits, jnp.float32),
                            jnp.asarray(cotangent, jnp.float32))
  assert out.shape == logits.shape and out.dtype == jnp.float32 and grad.dtype == jnp.float32
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))  # all written (see top)
  for ref_out, ref_grad in (xla, ref64):
    assert rel_err(out, ref_out) <= TOL
    assert rel_err(grad, ref_grad) <= TOL


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("num_iters", [1, 2])
def test_few_iterations(platform, num_iters):
  logits = jnp.asarray(random_logits(20 + num_iters, (50, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(30, (50, 4, 4), 1.0), jnp.float32)
  check_against_xla(platform, logits, cotangent, num_iters, eps=1e-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ragged_token_counts_and_padding_never_leaks(platform):
  # 1100 tokens span two TPU blocks; 2100 give TPU blocks of two 8-row chunks each.
  logits = random_logits(40, (2100, 4, 4))
  cotangent = random_logits(41, (2100, 4, 4), 1.0)
  full_out, full_grad = check_against_xla(
      platform, jnp.asarray(logits, jnp.float32), jnp.asarray(cotangent, jnp.float32),
      eps=1e-6)
  for count in (1, 127, 129, 1100):
    out, grad = value_and_vjp(pallas(platform, eps=1e-6), jnp.asarray(logits[:count], jnp.float32),
                              jnp.asarray(cotangent[:count], jnp.float32))
    assert out.shape == grad.shape == (count, 4, 4)
    # Each token depends on its own logits only: padding and neighbours change nothing.
    np.testing.assert_allclose(out, full_out[:count], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, full_grad[:count], rtol=1e-5, atol=1e-7)
  single = pallas(platform, eps=1e-6)(jnp.asarray(logits[0], jnp.float32))  # no leading axes
  assert single.shape == (4, 4)
  np.testing.assert_allclose(single, full_out[0], rtol=1e-6, atol=1e-7)


def test_tpu_kernel_under_tpu_interpret_semantics():
  # The TPU interpreter models VMEM, DMAs and the parallel grid, poisons every buffer
  # with NaN, and raises on out-of-bounds reads; 2500 tokens give several grid steps.
  logits = jnp.asarray(random_logits(50, (2500, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(51, (2500, 4, 4), 1.0), jnp.float32)
  check_against_xla("tpu", logits, cotangent, eps=1e-6,
                    interpret=pltpu.InterpretParams(uninitialized_memory="nan"))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bfloat16_input(platform):
  logits = jnp.asarray(random_logits(60, (129, 4, 4)), jnp.bfloat16)
  cotangent = jnp.asarray(random_logits(61, (129, 4, 4), 1.0), jnp.float32)
  out, grad = value_and_vjp(pallas(platform, eps=1e-6), logits, cotangent)
  ref, ref_grad = value_and_vjp(lambda x: sinkhorn_xla(x, 20, 1e-6), logits, cotangent)
  # Both paths see the same bf16 logits and compute in float32: the output agrees to f32.
  assert out.dtype == jnp.float32 and rel_err(out, ref) <= TOL
  # Both gradients are float32 values ~1e-7 apart rounded to bf16 (8 significant bits):
  # each element is equal or one bf16 ulp (at most 2^-7 relative) away.
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32),
                             rtol=2.0**-7, atol=1e-30)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_extreme_and_masked_logits_stay_finite(platform):
  n = 4
  logits = random_logits(70, (300, n, n))
  signs = np.random.default_rng(71).choice([-1.0, 1.0], size=(300, n, n))
  logits[:100] = signs[:100] * 1e4  # saturated: rows/columns 2e4 apart
  logits[100:200] += signs[100:200, :1, :] * 1e4  # column shifts of +-1e4
  mask = np.zeros((n, n), bool)
  mask[0, 1] = mask[2, 3] = mask[3, 0] = True  # every row and column keeps finite entries
  logits[200:] = np.where(mask, -np.inf, logits[200:])
  cotangent = jnp.asarray(random_logits(72, (300, n, n), 1.0), jnp.float32)
  for eps in (0.0, 1e-6):
    out, grad = check_against_xla(platform, jnp.asarray(logits, jnp.float32), cotangent,
                                  eps=eps)
    if eps == 0:  # with eps > 0 a masked entry starts at eps, as in the reference
      assert np.all(np.asarray(out)[200:][:, mask] == 0)
      assert np.all(np.asarray(grad)[200:][:, mask] == 0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_backward_saves_only_the_logits_and_n1_falls_back(platform):
  logits = jnp.asarray(random_logits(80, (64, 4, 4)), jnp.float32)
  _, vjp_fn = jax.vjp(pallas(platform), logits)
  assert sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn)) == logits.nbytes
  ones = jnp.ones((5, 1, 1), jnp.float32)
  out, grad = jax.value_and_grad(lambda x: jnp.sum(pallas(platform)(x)))(ones)
  assert np.all(out == 5) and np.all(grad == 0)


def test_unknown_platform_raises():
  with pytest.raises(ValueError, match="platform"):
    sinkhorn_pallas(jnp.zeros((4, 4)), platform="cpu")


@pytest.mark.parametrize("platform, target", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(platform, target):
  # Lowering (not compiling) needs no device: it runs the Pallas -> Mosaic / Triton
  # lowering, which rejects ops and shapes the backend cannot express.
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  for n in (3, 4):
    fn = lambda x: jax.value_and_grad(lambda y: jnp.sum(
        sinkhorn_pallas(y, 20, 1e-6, platform=platform) ** 2))(x)
    export.export(jax.jit(fn), platforms=[target], disabled_checks=[triton])(
        jax.ShapeDtypeStruct((3000, n, n), jnp.bfloat16))


# --- dispatch through mhc_jax.sinkhorn_knopp, and per-shard use under a mesh ---------------

from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from mhc_jax import sinkhorn_knopp  # noqa: E402
from mhc_jax.sinkhorn import _warn_interpreting  # noqa: E402


def loss_and_grad(fn, logits, cotangent):
  return jax.value_and_grad(lambda x: jnp.sum(fn(x) * cotangent))(logits)


def test_backend_pallas_on_cpu_runs_the_kernel_in_interpret_mode():
  logits = jnp.asarray(random_logits(40, (3, 7, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(41, (3, 7, 4, 4), 1.0), jnp.float32)
  assert "pallas_call" in str(jax.make_jaxpr(lambda x: sinkhorn_knopp(x, backend="pallas"))(logits))
  assert "pallas_call" not in str(jax.make_jaxpr(lambda x: sinkhorn_knopp(x))(logits))
  value, grad = loss_and_grad(lambda x: sinkhorn_knopp(x, eps=1e-6, backend="pallas"),
                              logits, cotangent)
  ref_value, ref_grad = loss_and_grad(lambda x: sinkhorn_knopp(x, eps=1e-6, backend="xla"),
                                      logits, cotangent)
  assert rel_err(value, ref_value) < TOL and rel_err(grad, ref_grad) < TOL
  with pytest.raises(ValueError, match="backend"):
    sinkhorn_knopp(logits, backend="triton")


@pytest.mark.parametrize("num_tokens, sharded", [(8 * 37, True), (13, False)])
def test_kernel_runs_per_shard_under_a_mesh(num_tokens, sharded):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  logits = jnp.asarray(random_logits(42, (num_tokens, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(43, (num_tokens, 4, 4), 1.0), jnp.float32)
  if sharded:
    logits = jax.device_put(logits, NamedSharding(mesh, P(("data", "fsdp"))))
  fn = lambda x: sinkhorn_knopp(x, backend="pallas")
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(fn)(logits))
    value, grad = jax.jit(lambda x, c: loss_and_grad(fn, x, c))(logits, cotangent)
  assert "shard_map" in jaxpr
  # each device's kernel sees 1/8 of the (padded) tokens
  per_device = -(-num_tokens // 8)
  assert f"f32[4,4,{per_device}]" in jaxpr.replace(" ", "")
  ref_value, ref_grad = loss_and_grad(lambda x: sinkhorn_knopp(x, backend="xla"),
                                      jnp.asarray(logits), cotangent)
  assert rel_err(value, ref_value) < TOL and rel_err(grad, ref_grad) < TOL


@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu", "cuda", "rocm"])
def test_auto_picks_xla_on_every_platform(monkeypatch, platform):
  # No kernel has been validated on hardware yet (`bench --validate`), so "auto" never
  # runs one; a platform moves to Pallas only once its kernel passes there.
  monkeypatch.setattr(jax, "default_backend", lambda: platform)
  logits = jnp.zeros((8, 4, 4), jnp.float32)
  assert "pallas_call" not in str(jax.make_jaxpr(lambda x: sinkhorn_knopp(x))(logits))


def test_backend_pallas_on_cpu_warns_once_per_process():
  _warn_interpreting.cache_clear()
  logits = jnp.zeros((8, 4, 4), jnp.float32)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
      jax.make_jaxpr(lambda x: sinkhorn_knopp(x, backend="pallas"))(logits)
  assert [str(w.message) for w in caught if "interprets" in str(w.message)] == [
      "sinkhorn_knopp(backend='pallas') on CPU interprets the TPU kernel: slow, for testing; "
      "backend='xla' is the fast path here"]


def test_backend_pallas_without_jax_triton_raises_one_line_naming_jax(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  # what a JAX without the Triton backend looks like to `import`
  monkeypatch.delattr(pl, "triton", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delitem(sys.modules, "kernels_pallas.sinkhorn.gpu", raising=False)
  with pytest.raises(ImportError) as raised:
    sinkhorn_knopp(jnp.zeros((8, 4, 4), jnp.float32), backend="pallas")
  message = str(raised.value)
  assert "\n" not in message and f"JAX {jax.__version__}" in message and "Triton" in message


@pytest.mark.parametrize("tol, passed", [(1e-4, True), (1e-12, False)])
def test_validate_command_on_cpu_interprets_and_reports(capsys, tol, passed):
  argv = ["--validate", "--tokens", "64", "--iters", "3", "--repeats", "1", "--tol", str(tol)]
  if passed:
    bench.main(argv)
  else:
    with pytest.raises(SystemExit) as exited:
      bench.main(argv)
    assert exited.value.code == 1
  out = capsys.readouterr().out
  assert "interpret mode on CPU" in out and "| Pallas (tpu) | 1e-06 |" in out
  assert out.splitlines()[-1].startswith("PASS: " if passed else "FAIL: ")
