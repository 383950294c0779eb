"""mhc_jax.sinkhorn_knopp (custom VJP) against the float64 plain loop that defines it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernels_pallas.sinkhorn import sinkhorn_reference
from mhc_jax import sinkhorn_knopp


def rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def random_logits(seed, shape, scale=3.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def reference64(logits, num_iters=20, eps=0.0):
  with jax.enable_x64(True):
    return np.asarray(sinkhorn_reference(jnp.asarray(logits, jnp.float64), num_iters, eps))


def reference_grad64(logits, cotangent, num_iters=20, eps=0.0):
  with jax.enable_x64(True):
    loss = lambda x: jnp.sum(sinkhorn_reference(x, num_iters, eps) * cotangent)
    return np.asarray(jax.grad(loss)(jnp.asarray(logits, jnp.float64)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("eps", [0.0, 1e-2])
@pytest.mark.parametrize("num_iters", [1, 20])
def test_forward_and_gradient_match_float64_reference(n, eps, num_iters):
  logits = random_logits(n * 100 + num_iters, (3, 5, n, n))
  cotangent = random_logits(7, (3, 5, n, n), 1.0)
  out = sinkhorn_knopp(jnp.asarray(logits, jnp.float32), num_iters, eps=eps)
  assert out.dtype == jnp.float32 and out.shape == logits.shape
  assert rel_err(out, reference64(logits, num_iters, eps)) < 1e-6
  grad = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x, num_iters, eps=eps) * cotangent))(
      jnp.asarray(logits, jnp.float32))
  if n == 1:  # a 1x1 output does not depend on the logit: its gradient is exactly 0
    assert np.all(np.asarray(grad) == 0)
    return
  assert rel_err(grad, reference_grad64(logits, cotangent, num_iters, eps)) < 1e-5


def test_custom_vjp_equals_autodiff_of_plain_loop_in_float32():
  logits = jnp.asarray(random_logits(1, (64, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(2, (64, 4, 4), 1.0), jnp.float32)
  ours = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x, eps=1e-6) * cotangent))(logits)
  autodiff = jax.grad(lambda x: jnp.sum(sinkhorn_reference(x, 20, 1e-6) * cotangent))(logits)
  assert rel_err(ours, autodiff) < 1e-5


def test_float64_path_is_exact_and_passes_finite_differences():
  with jax.enable_x64(True):
    logits = jnp.asarray(random_logits(3, (2, 4, 4)), jnp.float64)
    cotangent = jnp.asarray(random_logits(4, (2, 4, 4), 1.0), jnp.float64)
    ours = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x, eps=1e-3) * cotangent))(logits)
    ref = jax.grad(lambda x: jnp.sum(sinkhorn_reference(x, 20, 1e-3) * cotangent))(logits)
    assert rel_err(ours, ref) < 1e-12
    check_grads(lambda x: sinkhorn_knopp(x, 5, eps=1e-3), (logits,), order=1, modes=["rev"])


def test_rows_sum_to_one_and_columns_converge():
  logits = jnp.asarray(random_logits(5, (100, 4, 4)), jnp.float32)
  out = sinkhorn_knopp(logits, 20)
  assert np.max(np.abs(np.sum(out, -1) - 1)) < 1e-6
  col_err = lambda m: np.max(np.abs(np.sum(m, -2) - 1))
  assert col_err(out) < col_err(sinkhorn_knopp(logits, 3)) < col_err(sinkhorn_knopp(logits, 1))
  many = sinkhorn_knopp(logits, 200)
  assert col_err(many) < col_err(out) / 10
  assert rel_err(many, reference64(logits, 200)) < 1e-5
  assert np.all(np.asarray(out) >= 0)


def test_bfloat16_input_computes_in_float32():
  logits = jnp.asarray(random_logits(6, (16, 4, 4)), jnp.bfloat16)
  out = sinkhorn_knopp(logits)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, sinkhorn_knopp(logits.astype(jnp.float32)))
  grad = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x)[..., 0, :]))(logits)
  assert grad.dtype == jnp.bfloat16
  grad32 = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x)[..., 0, :]))(logits.astype(jnp.float32))
  assert rel_err(grad, grad32) < 1e-2  # bf16 rounding of the returned gradient alone


def test_extreme_logits_give_finite_exact_results():
  # Row 1 is 2e4 below row 0 in every column: exp() of it underflows in the plain loop,
  # but the exact answer is the uniform matrix (both rows equal up to a row shift).
  logits = jnp.array([[1e4, 1e4], [-1e4, -1e4]], jnp.float32)
  out, grad = jax.value_and_grad(lambda x: sinkhorn_knopp(x)[0, 0])(logits)
  np.testing.assert_allclose(sinkhorn_knopp(logits), np.full((2, 2), 0.5), atol=1e-7)
  assert np.all(np.isfinite(grad))
  assert np.isnan(np.asarray(sinkhorn_reference(logits, 20))).any()  # why the log domain


def test_column_shifts_of_1e4_leave_the_output_unchanged():
  logits = random_logits(8, (32, 4, 4))
  shifts = np.random.default_rng(9).choice([-1e4, 1e4], size=(32, 1, 4))
  base = sinkhorn_knopp(jnp.asarray(logits, jnp.float32), eps=1e-6)
  shifted = sinkhorn_knopp(jnp.asarray(logits + shifts, jnp.float32), eps=1e-6)
  # float32 carries only ~1e-3 absolute precision on a logit of 1e4
  assert rel_err(shifted, base) < 1e-2
  cotangent = random_logits(10, (32, 4, 4), 1.0)
  grad = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x) * cotangent))(
      jnp.asarray(logits + shifts, jnp.float32))
  assert np.all(np.isfinite(grad))


def test_masked_entries_stay_zero_with_finite_gradients():
  logits = random_logits(11, (8, 4, 4))
  mask = np.zeros((4, 4), bool)
  mask[0, 1] = mask[2, 3] = mask[3, 0] = True
  logits = np.where(mask, -np.inf, logits)
  cotangent = random_logits(12, (8, 4, 4), 1.0)
  out = sinkhorn_knopp(jnp.asarray(logits, jnp.float32))
  assert np.all(np.asarray(out)[:, mask] == 0)
  assert rel_err(out, reference64(logits)) < 1e-6
  grad = jax.grad(lambda x: jnp.sum(sinkhorn_knopp(x) * cotangent))(
      jnp.asarray(logits, jnp.float32))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, mask] == 0)
  finite = np.where(mask, 0.0, logits)  # compare the unmasked entries' gradient
  ref = reference_grad64(np.where(mask, -1e300, finite), cotangent)
  assert rel_err(np.asarray(grad)[:, ~mask], ref[:, ~mask]) < 1e-5


def test_equal_logits_give_uniform_matrix():
  out, grad = jax.value_and_grad(lambda x: jnp.sum(sinkhorn_knopp(x)[0] ** 2))(
      jnp.full((4, 4), 2.5, jnp.float32))
  np.testing.assert_allclose(sinkhorn_knopp(jnp.full((4, 4), 2.5)), np.full((4, 4), 0.25),
                             rtol=1e-7)
  assert np.all(np.isfinite(grad))


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


def test_backward_saves_only_the_logits():
  logits = jnp.asarray(random_logits(15, (1024, 4, 4)), jnp.float32)
  _, vjp_fn = jax.vjp(lambda x: sinkhorn_knopp(x), logits)
  saved = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn))
  assert saved == logits.nbytes
  _, autodiff_vjp = jax.vjp(lambda x: sinkhorn_reference(x, 20), logits)
  assert sum(leaf.nbytes for leaf in jax.tree.leaves(autodiff_vjp)) > 20 * logits.nbytes


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
])
def test_bad_input_raises_value_error_naming_the_argument(call, match):
  with pytest.raises(ValueError, match=match):
    call()
