"""What only the Pallas Sinkhorn kernels have: the lane-dense padding, the lowering for their
hardware, the TPU interpreter's checks, and `bench --validate`. Their numerics are checked
with every other implementation's in `test_sinkhorn.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.sinkhorn import IMPLEMENTATIONS, bench
from sinkhorn_cases import check_against_xla, random_logits, value_and_vjp

PALLAS = [name for name, implementation in IMPLEMENTATIONS.items() if implementation.platform]


def pallas(name, eps=0.0, interpret=True):
  return lambda x: IMPLEMENTATIONS[name].require()(x, 20, eps, interpret=interpret)


def test_interpret_mode_poisons_unwritten_output():
  def writes_first_half(x_ref, o_ref):
    o_ref[:, :64] = x_ref[:, :64]
  for interpret in (True, pltpu.InterpretParams(uninitialized_memory="nan")):
    out = pl.pallas_call(writes_first_half, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                         interpret=interpret)(jnp.ones((8, 128)))
    assert np.all(np.asarray(out)[:, :64] == 1) and np.all(np.isnan(np.asarray(out)[:, 64:]))


@pytest.mark.parametrize("name", PALLAS)
def test_ragged_token_counts_and_padding_never_leaks(name):
  # 1100 tokens span two TPU blocks; 2100 give TPU blocks of two 8-row chunks each.
  logits = jnp.asarray(random_logits(40, (2100, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(41, (2100, 4, 4), 1.0), jnp.float32)
  full_out, full_grad = check_against_xla(pallas(name, 1e-6), logits, cotangent, eps=1e-6)
  for count in (1, 127, 129, 1100):
    out, grad = value_and_vjp(pallas(name, 1e-6), logits[:count], cotangent[:count])
    assert out.shape == grad.shape == (count, 4, 4)
    # Each token depends on its own logits only: padding and neighbours change nothing.
    np.testing.assert_allclose(out, full_out[:count], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad, full_grad[:count], rtol=1e-5, atol=1e-7)
  single = pallas(name, 1e-6)(logits[0])  # no leading axes
  assert single.shape == (4, 4)
  np.testing.assert_allclose(single, full_out[0], rtol=1e-6, atol=1e-7)


def test_tpu_kernel_under_tpu_interpret_semantics():
  # The TPU interpreter models VMEM, DMAs and the parallel grid, poisons every buffer
  # with NaN, and raises on out-of-bounds reads; 2500 tokens give several grid steps.
  logits = jnp.asarray(random_logits(50, (2500, 4, 4)), jnp.float32)
  cotangent = jnp.asarray(random_logits(51, (2500, 4, 4), 1.0), jnp.float32)
  interpret = pltpu.InterpretParams(uninitialized_memory="nan")
  check_against_xla(pallas("pallas_tpu", 1e-6, interpret), logits, cotangent, eps=1e-6)


@pytest.mark.parametrize("name, target", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_kernels_lower_for_their_hardware(name, target):
  # Lowering (not compiling) needs no device: it runs the Pallas -> Mosaic / Triton
  # lowering, which rejects ops and shapes the backend cannot express.
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  for n in (3, 4):
    fn = lambda x: jax.value_and_grad(lambda y: jnp.sum(pallas(name, 1e-6, False)(y) ** 2))(x)
    export.export(jax.jit(fn), platforms=[target], disabled_checks=[triton])(
        jax.ShapeDtypeStruct((3000, n, n), jnp.bfloat16))


@pytest.mark.parametrize("passed", [True, False])
def test_validate_command_on_cpu_interprets_and_reports(capsys, monkeypatch, passed):
  if not passed:  # a reference 0.1% off stands in for a kernel that is wrong on the hardware
    reference = bench.sinkhorn_xla
    monkeypatch.setattr(bench, "sinkhorn_xla", lambda *args: reference(*args) * 1.001)
  argv = ["--validate", "--tokens", "64", "--iters", "3", "--repeats", "1", "--tol", "1e-4"]
  if passed:
    bench.main(argv)
  else:
    with pytest.raises(SystemExit) as exited:
      bench.main(argv)
    assert exited.value.code == 1
  out = capsys.readouterr().out
  assert "interpret mode on CPU" in out and "| Pallas (tpu) | 1e-06 |" in out
  assert out.splitlines()[-1].startswith("PASS: " if passed else "FAIL: ")
  # The interpreter's time says nothing of a kernel's: no number where one would be read.
  cells = lambda line: [cell.strip() for cell in line.split("|")[1:-1]]
  timings = {(row[0], row[1]): row[-2:] for row in map(cells, out.splitlines())
             if row and row[0] in ("XLA custom VJP", "Pallas (tpu)", "Pallas (gpu)")}
  assert len(timings) == 6
  for (path, eps), (ms, gb_per_s) in timings.items():
    if path == "XLA custom VJP":
      assert float(ms) > 0 and float(gb_per_s) > 0
    else:
      assert (ms, gb_per_s) == ("not timed (interpreted)", "-")
