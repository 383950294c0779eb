"""`sinkhorn_knopp` (kernels_pallas/sinkhorn/api.py): input checks, the choice of
implementation, its warnings and errors, transforms, and per-shard use under a mesh."""

import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import kernels_pallas
from kernels_pallas.sinkhorn import api
from mhc_jax import sinkhorn_knopp
from sinkhorn_cases import TOL, random_logits, reference64, rel_err


def loss_and_grad(fn, logits, cotangent):
  return jax.value_and_grad(lambda x: jnp.sum(fn(x) * cotangent))(logits)


def has_pallas_call(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("call, match", [
    (lambda: sinkhorn_knopp(jnp.zeros((3, 4))), "logits"),
    (lambda: sinkhorn_knopp(jnp.zeros((4,))), "logits"),
    (lambda: sinkhorn_knopp(jnp.zeros((2, 0, 0))), "logits"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4), jnp.int32)), "logits"),
    (lambda: sinkhorn_knopp([[1.0]]), "logits"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4)), 0), "num_iters"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4)), 2.5), "num_iters"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4)), True), "num_iters"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4)), eps=-1e-6), "eps"),
    (lambda: sinkhorn_knopp(jnp.zeros((4, 4)), backend="triton"), "backend"),
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_every_platform_maps_to_a_registered_pallas_implementation():
  assert set(api.IMPLEMENTATIONS) == {"xla", "pallas_tpu", "pallas_gpu"}
  assert {api.IMPLEMENTATIONS[name].platform for name in api.PLATFORMS.values()} == {"tpu", "gpu"}


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_n1_and_float64_take_xla_with_every_backend(eps):
  logits = jnp.asarray(random_logits(1, (3, 5, 1, 1)), jnp.float32)
  logits64 = np.zeros((8, 4, 4))
  for backend in api.BACKENDS:
    fn = lambda x, backend=backend: sinkhorn_knopp(x, eps=eps, backend=backend)
    out = fn(logits)
    assert out.dtype == jnp.float32 and rel_err(out, reference64(logits, eps=eps)) < 1e-6
    # A 1x1 output does not depend on the logit: its gradient is exactly 0.
    assert np.all(np.asarray(jax.grad(lambda x: jnp.sum(fn(x)))(logits)) == 0)
    assert not has_pallas_call(fn, logits)
    with jax.enable_x64(True):
      assert not has_pallas_call(fn, jnp.asarray(logits64))
      assert fn(jnp.asarray(logits64)).dtype == jnp.float64


def test_composes_with_jit_vmap_grad_and_remat():
  logits = jnp.asarray(random_logits(13, (6, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(14, (6, 4, 4), 1.0), jnp.float32)
  loss = lambda x: jnp.sum(sinkhorn_knopp(x, eps=1e-6) * cotangent)
  eager = jax.grad(loss)(logits)
  np.testing.assert_allclose(jax.jit(jax.grad(loss))(logits), eager, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.grad(jax.checkpoint(loss))(logits), eager, rtol=1e-5,
                             atol=1e-7)
  per_matrix = jax.vmap(lambda x, c: jax.grad(lambda y: jnp.sum(sinkhorn_knopp(y, eps=1e-6) * c))(x))
  np.testing.assert_allclose(per_matrix(logits, cotangent), eager, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.vmap(sinkhorn_knopp)(logits), sinkhorn_knopp(logits),
                             rtol=1e-6)


def test_backend_pallas_on_cpu_runs_the_kernel_in_interpret_mode():
  logits = jnp.asarray(random_logits(40, (3, 7, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(41, (3, 7, 4, 4), 1.0), jnp.float32)
  assert has_pallas_call(lambda x: sinkhorn_knopp(x, backend="pallas"), logits)
  assert not has_pallas_call(lambda x: sinkhorn_knopp(x), logits)
  value, grad = loss_and_grad(lambda x: sinkhorn_knopp(x, eps=1e-6, backend="pallas"),
                              logits, cotangent)
  ref_value, ref_grad = loss_and_grad(lambda x: sinkhorn_knopp(x, eps=1e-6, backend="xla"),
                                      logits, cotangent)
  assert rel_err(value, ref_value) < TOL and rel_err(grad, ref_grad) < TOL


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
  assert not has_pallas_call(lambda x: sinkhorn_knopp(x), jnp.zeros((8, 4, 4), jnp.float32))


def test_backend_pallas_on_cpu_warns_once_per_process():
  api._warn_interpreting.cache_clear()
  logits = jnp.zeros((8, 4, 4), jnp.float32)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
      jax.make_jaxpr(lambda x: sinkhorn_knopp(x, backend="pallas"))(logits)
  assert [str(w.message) for w in caught if "interprets" in str(w.message)] == [
      "sinkhorn_knopp(backend='pallas') on CPU interprets the TPU kernel: slow, for testing; "
      "backend='xla' is the fast path here"]


def test_backend_pallas_without_jax_triton_raises_one_line_naming_jax(monkeypatch):
  # A fresh import of the package in what a JAX without the Triton backend looks like to
  # `import`; the modules imported before come back when the test ends.
  monkeypatch.delattr(pl, "triton", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  for name in [name for name in sys.modules if name.startswith("kernels_pallas.sinkhorn")]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.delattr(kernels_pallas, "sinkhorn")
  fresh = importlib.import_module("kernels_pallas.sinkhorn.api")
  assert fresh is not api and fresh.IMPLEMENTATIONS["pallas_tpu"].fn is not None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ImportError) as raised:
    fresh.sinkhorn_knopp(jnp.zeros((8, 4, 4), jnp.float32), backend="pallas")
  message = str(raised.value)
  assert "\n" not in message and f"JAX {jax.__version__}" in message and "Triton" in message


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sinkhorn_survives_logits_of_1e4_and_minus_inf_in_bfloat16(backend):
  rng = np.random.default_rng(0)
  logits = rng.choice([-1e4, 1e4], size=(64, 4, 4)).astype(np.float32)
  mask = np.zeros((4, 4), bool)
  mask[0, 1] = mask[1, 0] = mask[2, 3] = mask[3, 2] = True  # each row/column keeps 3 entries
  logits[32:] = np.where(mask, -np.inf, logits[32:])
  logits = jnp.asarray(logits, jnp.bfloat16)  # +-1e4 and -inf are exact in bfloat16
  cotangent = jnp.asarray(rng.normal(size=(64, 4, 4)), jnp.float32)
  loss = lambda x: jnp.sum(sinkhorn_knopp(x, backend=backend) * cotangent)
  out = np.asarray(sinkhorn_knopp(logits, backend=backend))
  grad = np.asarray(jax.grad(loss)(logits), np.float32)
  assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad)) and np.any(grad != 0)
  np.testing.assert_allclose(out.sum(-1), 1, atol=1e-5)  # rows: exact after the row step
  assert np.all(out >= 0) and np.all(out[32:][:, mask] == 0)
  assert np.all(grad[32:][:, mask] == 0)
