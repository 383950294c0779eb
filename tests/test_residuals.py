"""mhc_jax.lm.residuals: every registered variant joins a sub-layer as its formula says, and
the table's entries are consistent (streams iff a site, one plot colour each)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.model import SITES, Block, ModelConfig, RMSNorm
from mhc_jax.lm.residuals import RESIDUALS

CFG = dict(d_model=16, num_layers=2, num_heads=2, mlp_dim=32, num_streams=4)


def branch(x):
  """A sub-layer stand-in that is neither linear nor zero at 0."""
  return jnp.tanh(1.5 * x) + 0.25


def test_plain_variants_join_as_their_formulas_say():
  h = jax.random.normal(jax.random.key(0), (2, 5, CFG["d_model"]))
  norm = RMSNorm(CFG["d_model"], 1e-6)
  norm.scale[...] = jax.random.uniform(jax.random.key(1), (CFG["d_model"],), minval=0.5,
                                       maxval=1.5)
  def rms(x):
    return x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  x = np.asarray(h, np.float64)
  np.testing.assert_allclose(RESIDUALS["prenorm"].join(h, None, norm, branch),
                             x + np.tanh(1.5 * rms(x)) + 0.25, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(RESIDUALS["postnorm"].join(h, None, norm, branch),
                             rms(x + np.tanh(1.5 * x) + 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [n for n, r in RESIDUALS.items() if r.uses_streams])
def test_stream_variants_join_through_their_site(name):
  cfg = ModelConfig(residual=name, **CFG)
  site = RESIDUALS[name].make_site(cfg, 3, nnx.Rngs(0))
  streams = jax.random.normal(jax.random.key(2), (2, 5, cfg.num_streams, cfg.d_model))
  norm = RMSNorm(cfg.d_model, 1e-6)
  out = RESIDUALS[name].join(streams, site, norm, branch)
  branch_input, ctx = site.pre(streams)  # the site's own protocol, step by step
  np.testing.assert_allclose(out, site.post(branch(norm(branch_input)), ctx), rtol=1e-6)
  assert out.shape == streams.shape and not np.allclose(out, streams)


@pytest.mark.parametrize("name", list(RESIDUALS))
def test_blocks_hold_sites_exactly_for_stream_variants(name):
  block = Block(ModelConfig(residual=name, **CFG), layer=1, rngs=nnx.Rngs(0))
  sites = [getattr(block, site) for site in SITES]
  if RESIDUALS[name].uses_streams:
    assert all(isinstance(site, nnx.Module) for site in sites)
    assert [site.config.layer_index for site in sites] == [2, 3]  # sub-layers counted apart
  else:
    assert sites == [None, None]


def test_every_variant_has_its_own_plot_colour():
  colors = [residual.color for residual in RESIDUALS.values()]
  assert len(set(colors)) == len(colors)
