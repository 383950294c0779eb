"""mhc_jax.diagnostics (Amax gain magnitude, doubly-stochastic error, cosine similarities)
against hand-computed values and plain numpy loops, and coefficients sown from a forward pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mhc_jax
from mhc_jax import diagnostics

# Sown coefficients are read through nnx.capture, Flax's current API: sowing outside it is
# deprecated, and no test here may fall back on it.
pytestmark = pytest.mark.filterwarnings("error:Using 'Module.sow:DeprecationWarning")


def normal(seed, shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape) * scale


def gains64(m):
  """Per-matrix (forward, backward) gain by plain loops over `[..., n, n]`."""
  flat = np.asarray(m, np.float64).reshape(-1, *m.shape[-2:])
  fwd = [max(abs(sum(a[i, j] for j in range(a.shape[1]))) for i in range(a.shape[0]))
         for a in flat]
  bwd = [max(abs(sum(a[i, j] for i in range(a.shape[0]))) for j in range(a.shape[1]))
         for a in flat]
  return np.reshape(fwd, m.shape[:-2]), np.reshape(bwd, m.shape[:-2])


def composite64(h):
  """`[L, ..., n, n]` -> entry l = `H_l @ ... @ H_0`."""
  h = np.asarray(h, np.float64)
  product, out = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:]), []
  for layer in h:
    product = layer @ product
    out.append(product)
  return np.stack(out)


def test_gains_of_a_hand_computed_matrix():
  m = jnp.asarray([[1.0, -3.0, 0.5],   # row sums -1.5, 2.5, -4.0
                   [2.0, 0.5, 0.0],    # column sums 0.0, -4.5, 1.5
                   [-3.0, -2.0, 1.0]])
  assert float(diagnostics.forward_gain(m)) == 4.0
  assert float(diagnostics.backward_gain(m)) == 4.5
  assert float(diagnostics.forward_gain(m.T)) == 4.5


@pytest.mark.parametrize("n", [2, 4])
def test_gains_match_loops_on_random_matrices(n):
  m = normal(n, (3, 5, n, n))  # mixed signs: the absolute value matters
  fwd, bwd = gains64(m)
  out_fwd = diagnostics.forward_gain(jnp.asarray(m, jnp.float32))
  out_bwd = diagnostics.backward_gain(jnp.asarray(m, jnp.float32))
  assert out_fwd.shape == (3, 5) and out_bwd.shape == (3, 5)
  np.testing.assert_allclose(out_fwd, fwd, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out_bwd, bwd, rtol=1e-5, atol=1e-6)
  assert np.abs(fwd - bwd).max() > 0.1  # rows and columns are told apart


def test_composite_products_match_a_loop_in_layer_order():
  h = np.eye(4) + normal(0, (6, 3, 4, 4), 0.5)  # [L, tokens, n, n]
  out = diagnostics.composite_products(jnp.asarray(h, jnp.float32))
  ref = composite64(h)
  assert out.shape == h.shape
  np.testing.assert_allclose(out[0], h[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  reversed_order = composite64(h[::-1])[-1]  # H_0 @ ... @ H_5: a different matrix
  assert np.abs(reversed_order - ref[-1]).max() > 0.1 * np.abs(ref[-1]).max()


def check_summary(summary, h):
  """Every entry of `gain_summary` against numpy, maxima over all token axes."""
  over_tokens = lambda x: x.reshape(x.shape[0], -1).max(axis=1)
  fwd, bwd = gains64(h)
  cfwd, cbwd = gains64(composite64(h))
  rows = np.abs(h.sum(-1) - 1).max(-1)
  cols = np.abs(h.sum(-2) - 1).max(-1)
  negative = np.maximum(-h, 0).max((-2, -1))
  ref = {"forward_gain": fwd, "backward_gain": bwd, "composite_forward_gain": cfwd,
         "composite_backward_gain": cbwd,
         "doubly_stochastic_error": np.maximum(np.maximum(rows, cols), negative)}
  assert set(summary) == set(ref)
  for key, value in ref.items():
    assert summary[key].shape == (h.shape[0],), key
    np.testing.assert_allclose(summary[key], over_tokens(value), rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_gain_summary_of_sinkhorn_matrices_is_one():
  # [L, batch, seq, n, n]; logits of scale 1 so that 20 iterations converge (at scale 2
  # the columns are still off by ~1e-3, as the spec says).
  logits = normal(1, (8, 2, 3, 4, 4))
  h = mhc_jax.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 20)
  summary = diagnostics.gain_summary(h)
  np.testing.assert_allclose(summary["forward_gain"], 1.0, atol=1e-5)
  np.testing.assert_allclose(summary["backward_gain"], 1.0, atol=1e-5)
  np.testing.assert_allclose(summary["composite_forward_gain"], 1.0, atol=1e-4)
  np.testing.assert_allclose(summary["composite_backward_gain"], 1.0, atol=1e-4)
  assert np.all(np.asarray(summary["doubly_stochastic_error"]) < 1e-5)
  assert np.abs(np.asarray(h) - np.eye(4)).max() > 0.3  # far from the identity
  check_summary(summary, np.asarray(h, np.float64))


def test_gain_summary_of_hc_like_matrices_grows_with_depth():
  rng = np.random.default_rng(2)
  # Identity plus non-negative noise: every row sum of the product grows with each layer.
  h = np.eye(4) + np.abs(rng.normal(size=(10, 5, 4, 4))) * 0.2
  summary = diagnostics.gain_summary(jnp.asarray(h, jnp.float32))
  check_summary(summary, h)
  composite = np.asarray(summary["composite_forward_gain"])
  assert np.all(np.diff(composite) > 0)
  assert composite[-1] > 10 * np.asarray(summary["forward_gain"]).max()
  assert np.all(np.asarray(summary["doubly_stochastic_error"]) > 0.1)


def test_gain_summary_with_mixed_sign_noise_matches_numpy():
  h = np.eye(3) + normal(3, (7, 6, 3, 3), 0.4)
  check_summary(diagnostics.gain_summary(jnp.asarray(h, jnp.float32)), h)


def test_doubly_stochastic_error():
  perms = mhc_jax.permutation_matrices(4)
  np.testing.assert_array_equal(diagnostics.doubly_stochastic_error(jnp.asarray(perms)),
                                np.zeros(24))
  p = perms[7].astype(np.float64)
  bumped = p.copy()
  bumped[0, 1] += 0.3  # row 0 and column 1 sum to 1.3
  negative = np.asarray([[1.5, -0.5], [-0.5, 1.5]])  # sums all 1, an entry at -0.5
  shrunk = p * 0.8  # every sum 0.8
  for m, expected in [(bumped, 0.3), (negative, 0.5), (shrunk, 0.2)]:
    np.testing.assert_allclose(diagnostics.doubly_stochastic_error(jnp.asarray(m, jnp.float32)),
                               expected, rtol=1e-6)


def test_doubly_stochastic_error_of_random_perturbations():
  h = np.asarray(mhc_jax.sinkhorn_knopp(jnp.asarray(normal(4, (6, 4, 4)), jnp.float32)),
                 np.float64) + normal(5, (6, 4, 4), 0.05)
  rows, cols = np.abs(h.sum(-1) - 1).max(-1), np.abs(h.sum(-2) - 1).max(-1)
  ref = np.maximum(np.maximum(rows, cols), np.maximum(-h, 0).max((-2, -1)))
  out = diagnostics.doubly_stochastic_error(jnp.asarray(h, jnp.float32))
  assert out.shape == (6,)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)


def cosine64(a, b):
  return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))


def test_stream_cosine_similarity_matches_numpy():
  n = 4
  streams = normal(6, (2, 3, n, 8))
  streams[..., 1, :] += 2.0 * streams[..., 0, :]  # streams 0 and 1 strongly correlated
  tokens = streams.reshape(-1, n, 8)
  ref = np.mean([[[cosine64(t[i], t[j]) for j in range(n)] for i in range(n)]
                 for t in tokens], axis=0)
  out = diagnostics.stream_cosine_similarity(jnp.asarray(streams, jnp.float32))
  assert out.shape == (n, n)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.diag(out), 1.0, atol=1e-6)
  assert out[0, 1] > 0.7


def test_layer_cosine_similarity_matches_numpy():
  layers = normal(7, (5, 2, 3, 16))  # [L, batch, seq, C]
  layers[1:] += np.cumsum(layers[:-1], axis=0)  # later layers resemble earlier ones
  tokens = layers.reshape(5, -1, 16)
  ref = np.asarray([[np.mean([cosine64(tokens[a, t], tokens[b, t]) for t in range(6)])
                     for b in range(5)] for a in range(5)])
  out = diagnostics.layer_cosine_similarity(jnp.asarray(layers, jnp.float32))
  assert out.shape == (5, 5)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert np.abs(ref - np.eye(5)).max() > 0.3


def random_site(seed, n=4, c=8, sow=True):
  rng = np.random.default_rng(seed)
  return mhc_jax.ManifoldHyperConnection.from_deepseek_v4(
      rng.normal(size=((2 + n) * n, n * c)), rng.normal(size=((2 + n) * n,)),
      rng.uniform(0.1, 1.0, size=(3,)), sow_coefficients=sow)


def sown_coefficients(captured):
  (coefficients,) = captured["coefficients"].get_value()
  return coefficients


def test_sown_coefficients_equal_those_of_pre():
  site = random_site(8)
  streams = jnp.asarray(normal(9, (2, 3, 4, 8)), jnp.float32)
  (_, ctx), captured = nnx.capture(site.pre, nnx.Intermediate)(streams)
  sown = sown_coefficients(captured)
  for name in ("h_pre", "h_post", "h_res"):
    np.testing.assert_array_equal(getattr(sown, name), getattr(ctx.coefficients, name))
  assert sown.h_res.shape == (2, 3, 4, 4)
  assert np.abs(np.asarray(sown.h_res) - np.eye(4)).max() > 0.3
  assert not nnx.state(site, nnx.Intermediate)  # captured, not left on the module
  no_sow = random_site(8, sow=False)
  _, captured = nnx.capture(no_sow.pre, nnx.Intermediate)(streams)
  assert not captured


def test_gain_summary_of_coefficients_sown_in_a_forward_pass():
  sites = [random_site(seed) for seed in range(3)]
  streams = jnp.asarray(normal(10, (3, 4, 8)), jnp.float32)
  branch = jnp.tanh  # any branch function F
  expected = []
  sown = []
  for site in sites:
    expected.append(site.compute_coefficients(streams).h_res)
    streams, captured = nnx.capture(site, nnx.Intermediate)(streams, branch)
    sown.append(sown_coefficients(captured).h_res)
  h_res = jnp.stack(sown)
  np.testing.assert_array_equal(h_res, jnp.stack(expected))
  summary = diagnostics.gain_summary(h_res)
  # Rows are normalised last, so every H_res and every product of them has row sums 1;
  # the columns of these peaked, unconverged matrices are only approximately 1.
  np.testing.assert_allclose(summary["forward_gain"], 1.0, atol=1e-5)
  np.testing.assert_allclose(summary["composite_forward_gain"], 1.0, atol=1e-4)
  check_summary(summary, np.asarray(h_res, np.float64))
