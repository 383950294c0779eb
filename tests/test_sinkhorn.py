"""Every Sinkhorn implementation in `IMPLEMENTATIONS` against the float64 plain loop that
defines it (and the Pallas kernels against XLA too), through one set of checks.

The Pallas kernels run in interpret mode, which fills every output buffer with NaN before
the kernel runs (see `test_sinkhorn_pallas.py`), so "no NaN in the result" also means
"every element was written".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kernels_pallas.sinkhorn import IMPLEMENTATIONS, sinkhorn_reference
from sinkhorn_cases import (TOL, check_against_xla, random_logits, reference64, reference_case,
                            rel_err, value_and_vjp, xla)


class SinkhornImplementationTests:
  """The checks every implementation passes; a subclass names it (`implementation`), and
  Pallas ones run in interpret mode on CPU. Inputs are `[..., n, n]` with n >= 2
  (`sinkhorn_knopp` sends n = 1 to XLA), float32 or bfloat16."""
  implementation: str

  def sinkhorn(self, num_iters=20, eps=0.0):
    """`[..., n, n]` logits -> `[..., n, n]` float32 output of this implementation."""
    fn = IMPLEMENTATIONS[self.implementation].fn
    if IMPLEMENTATIONS[self.implementation].platform is None:
      return lambda x: fn(x, num_iters, eps)
    return lambda x: fn(x, num_iters, eps, interpret=True)

  @pytest.mark.parametrize("n", [2, 3, 4, 8])
  @pytest.mark.parametrize("eps", [0.0, 1e-2])
  def test_forward_and_gradient_match_float64_reference(self, n, eps):
    for num_iters in (1, 20):
      logits, cotangent, (ref_out, ref_grad), xla_case = reference_case(n, eps, num_iters)
      out, grad = value_and_vjp(self.sinkhorn(num_iters, eps), jnp.asarray(logits, jnp.float32),
                                jnp.asarray(cotangent, jnp.float32))
      assert out.shape == logits.shape and out.dtype == grad.dtype == jnp.float32
      assert np.all(np.isfinite(out)) and np.all(np.isfinite(grad))
      assert rel_err(out, ref_out) < 1e-6 and rel_err(grad, ref_grad) < 1e-5
      assert rel_err(out, xla_case[0]) <= TOL and rel_err(grad, xla_case[1]) <= TOL

  def test_gradient_equals_autodiff_of_plain_loop_in_float32(self):
    logits = jnp.asarray(random_logits(1, (64, 4, 4)), jnp.float32)
    cotangent = jnp.asarray(random_logits(2, (64, 4, 4), 1.0), jnp.float32)
    _, ours = value_and_vjp(self.sinkhorn(eps=1e-6), logits, cotangent)
    autodiff = jax.grad(lambda x: jnp.sum(sinkhorn_reference(x, 20, 1e-6) * cotangent))(logits)
    assert rel_err(ours, autodiff) < 1e-5

  def test_rows_sum_to_one_and_columns_converge(self):
    logits = jnp.asarray(random_logits(5, (100, 4, 4)), jnp.float32)
    out = self.sinkhorn(20)(logits)
    assert np.max(np.abs(np.sum(out, -1) - 1)) < 1e-6
    col_err = lambda m: np.max(np.abs(np.sum(m, -2) - 1))
    assert col_err(out) < col_err(self.sinkhorn(3)(logits)) < col_err(self.sinkhorn(1)(logits))
    many = self.sinkhorn(200)(logits)
    assert col_err(many) < col_err(out) / 10
    assert rel_err(many, reference64(logits, num_iters=200)) < 1e-5
    assert np.all(np.asarray(out) >= 0)

  def test_bfloat16_input_computes_in_float32(self):
    logits = jnp.asarray(random_logits(60, (129, 4, 4)), jnp.bfloat16)
    cotangent = jnp.asarray(random_logits(61, (129, 4, 4), 1.0), jnp.float32)
    out, grad = value_and_vjp(self.sinkhorn(eps=1e-6), logits, cotangent)
    out32, grad32 = value_and_vjp(self.sinkhorn(eps=1e-6), logits.astype(jnp.float32), cotangent)
    assert out.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, out32)
    assert rel_err(grad, grad32) < 1e-2  # bf16 rounding of the returned gradient alone
    ref, ref_grad = value_and_vjp(xla(eps=1e-6), logits, cotangent)
    # Both paths see the same bf16 logits and compute in float32: the output agrees to f32.
    assert rel_err(out, ref) <= TOL
    # Both gradients are float32 values ~1e-7 apart rounded to bf16 (8 significant bits):
    # each element is equal or one bf16 ulp (at most 2^-7 relative) away.
    np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(ref_grad, np.float32),
                               rtol=2.0**-7, atol=1e-30)

  def test_extreme_logits_give_finite_exact_results(self):
    # Row 1 is 2e4 below row 0 in every column: exp() of it underflows in the plain loop,
    # but the exact answer is the uniform matrix (both rows equal up to a row shift).
    logits = jnp.array([[1e4, 1e4], [-1e4, -1e4]], jnp.float32)
    out, grad = value_and_vjp(self.sinkhorn(), logits, jnp.zeros((2, 2)).at[0, 0].set(1.0))
    np.testing.assert_allclose(out, np.full((2, 2), 0.5), atol=1e-7)
    assert np.all(np.isfinite(grad))
    assert np.isnan(np.asarray(sinkhorn_reference(logits, 20))).any()  # why the log domain

  def test_column_shifts_of_1e4_leave_the_output_unchanged(self):
    logits = random_logits(8, (32, 4, 4))
    shifts = np.random.default_rng(9).choice([-1e4, 1e4], size=(32, 1, 4))
    base = self.sinkhorn(eps=1e-6)(jnp.asarray(logits, jnp.float32))
    shifted = self.sinkhorn(eps=1e-6)(jnp.asarray(logits + shifts, jnp.float32))
    # float32 carries only ~1e-3 absolute precision on a logit of 1e4
    assert rel_err(shifted, base) < 1e-2
    cotangent = jnp.asarray(random_logits(10, (32, 4, 4), 1.0), jnp.float32)
    _, grad = value_and_vjp(self.sinkhorn(), jnp.asarray(logits + shifts, jnp.float32), cotangent)
    assert np.all(np.isfinite(grad))

  def test_masked_entries_stay_zero_with_finite_gradients(self):
    logits = random_logits(11, (8, 4, 4))
    mask = np.zeros((4, 4), bool)
    mask[0, 1] = mask[2, 3] = mask[3, 0] = True
    logits = np.where(mask, -np.inf, logits)
    cotangent = random_logits(12, (8, 4, 4), 1.0)
    out, grad = value_and_vjp(self.sinkhorn(), jnp.asarray(logits, jnp.float32),
                              jnp.asarray(cotangent, jnp.float32))
    assert np.all(np.asarray(out)[:, mask] == 0)
    assert rel_err(out, reference64(logits)) < 1e-6
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, mask] == 0)
    finite = np.where(mask, 0.0, logits)  # compare the unmasked entries' gradient
    _, ref = reference64(np.where(mask, -1e300, finite), cotangent)
    assert rel_err(np.asarray(grad)[:, ~mask], ref[:, ~mask]) < 1e-5

  def test_saturated_shifted_and_masked_logits_in_one_batch_match_xla(self):
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
      out, grad = check_against_xla(self.sinkhorn(eps=eps), jnp.asarray(logits, jnp.float32),
                                    cotangent, eps=eps)
      if eps == 0:  # with eps > 0 a masked entry starts at eps, as in the reference
        assert np.all(np.asarray(out)[200:][:, mask] == 0)
        assert np.all(np.asarray(grad)[200:][:, mask] == 0)

  def test_few_iterations_match_xla_with_eps(self):
    for num_iters in (1, 2):
      logits = jnp.asarray(random_logits(20 + num_iters, (50, 4, 4)), jnp.float32)
      cotangent = jnp.asarray(random_logits(30, (50, 4, 4), 1.0), jnp.float32)
      check_against_xla(self.sinkhorn(num_iters, 1e-6), logits, cotangent, num_iters, 1e-6)

  def test_equal_logits_give_uniform_matrix(self):
    out, grad = jax.value_and_grad(lambda x: jnp.sum(self.sinkhorn()(x)[0] ** 2))(
        jnp.full((4, 4), 2.5, jnp.float32))
    np.testing.assert_allclose(self.sinkhorn()(jnp.full((4, 4), 2.5)), np.full((4, 4), 0.25),
                               rtol=1e-7)
    assert np.all(np.isfinite(grad))

  def test_backward_saves_only_the_logits(self):
    logits = jnp.asarray(random_logits(15, (1024, 4, 4)), jnp.float32)
    _, vjp_fn = jax.vjp(self.sinkhorn(), logits)
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(vjp_fn)) == logits.nbytes
    _, autodiff_vjp = jax.vjp(lambda x: sinkhorn_reference(x, 20), logits)
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(autodiff_vjp)) > 20 * logits.nbytes


class TestXla(SinkhornImplementationTests):
  implementation = "xla"

  def test_float64_stays_float64_exact_and_passes_finite_differences(self):
    with jax.enable_x64(True):
      logits = jnp.asarray(random_logits(3, (2, 4, 4)), jnp.float64)
      cotangent = jnp.asarray(random_logits(4, (2, 4, 4), 1.0), jnp.float64)
      ours = jax.grad(lambda x: jnp.sum(self.sinkhorn(eps=1e-3)(x) * cotangent))(logits)
      ref = jax.grad(lambda x: jnp.sum(sinkhorn_reference(x, 20, 1e-3) * cotangent))(logits)
      assert ours.dtype == jnp.float64 and rel_err(ours, ref) < 1e-12
      check_grads(self.sinkhorn(5, 1e-3), (logits,), order=1, modes=["rev"])


class TestPallasTpu(SinkhornImplementationTests):
  implementation = "pallas_tpu"


@pytest.mark.skipif(IMPLEMENTATIONS["pallas_gpu"].fn is None,
                    reason=IMPLEMENTATIONS["pallas_gpu"].missing)
class TestPallasGpu(SinkhornImplementationTests):
  implementation = "pallas_gpu"
