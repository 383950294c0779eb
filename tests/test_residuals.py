"""mhc_jax.lm.residuals: every registered variant joins a sub-layer as its formula says, and
the table's entries are consistent (streams iff a site, one plot colour each)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.model import SITES, Block, ModelConfig, RMSNorm
from mhc_jax.lm.residuals import HC, MHC, RESIDUALS, with_residual

CFG = dict(d_model=16, num_layers=2, num_heads=2, mlp_dim=32)


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


# A value other than the default for every setting of every variant: a variant registered
# with a setting missing here fails `test_every_setting_reaches_the_site`.
OTHER_VALUES = {"num_streams": 2, "dynamic": False, "sinkhorn_iters": 3,
                "sinkhorn_backend": "xla", "schedule": "tokenbender", "num_fracs": 2}
STREAM_VARIANTS = [name for name, residual in RESIDUALS.items() if residual.uses_streams]


@pytest.mark.parametrize("name", STREAM_VARIANTS)
def test_every_setting_reaches_the_site(name):
  cfg = ModelConfig(residual=name, **CFG)
  for field in dataclasses.fields(RESIDUALS[name].settings):
    changed = with_residual(cfg, name, **{field.name: OTHER_VALUES[field.name]})
    assert RESIDUALS[name].site(changed, 0) != RESIDUALS[name].site(cfg, 0), field.name
    assert getattr(changed.residual_settings, field.name) == OTHER_VALUES[field.name]


def test_settings_classes_are_one_per_variant_and_named_apart():
  classes = [RESIDUALS[name].settings for name in STREAM_VARIANTS]
  assert len({cls.__name__ for cls in classes}) == len(classes)
  assert all(RESIDUALS[name].settings is None for name in RESIDUALS
             if name not in STREAM_VARIANTS)


@pytest.mark.parametrize("name", list(RESIDUALS))
def test_config_records_round_trip(name):
  settings = ({"num_streams": 2} if name in STREAM_VARIANTS else {})
  cfg = with_residual(ModelConfig(**CFG), name, **settings)
  record = json.loads(json.dumps(dataclasses.asdict(cfg)))
  assert ModelConfig.from_record(record) == cfg
  assert ModelConfig(**record) == cfg  # a dict of settings is read as the variant's


def test_records_of_flat_settings_are_translated():
  """config.json of before the variants had settings of their own."""
  flat = {**CFG, "num_streams": 2, "hc_dynamic": False, "sinkhorn_iters": 7,
          "sinkhorn_backend": "xla"}
  assert ModelConfig.from_record({**flat, "residual": "mhc"}) == ModelConfig(
      residual="mhc", residual_settings=MHC(2, 7, "xla"), **CFG)
  assert ModelConfig.from_record({**flat, "residual": "hc"}).residual_settings == HC(2, False)
  assert ModelConfig.from_record({**flat, "residual": "prenorm"}) == ModelConfig(**CFG)


def test_settings_of_another_variant_are_one_line():
  with pytest.raises(ValueError, match=r"^residual_settings is MHC\(.*\), but residual 'hc' "
                                       r"takes HC\(\.\.\.\): give that or None"):
    ModelConfig(residual="hc", residual_settings=MHC(), **CFG)
  with pytest.raises(ValueError, match="^residual 'prenorm' has no settings"):
    ModelConfig(residual="prenorm", residual_settings=HC(), **CFG)
  with pytest.raises(ValueError, match="^MHC.sinkhorn_iters must be an int >= 1, got 0$"):
    MHC(sinkhorn_iters=0)


def test_with_residual_gives_the_defaults_but_those_given():
  cfg = with_residual(ModelConfig(residual="hc", residual_settings=HC(2, False), **CFG), "mhc",
                      sinkhorn_iters=5)
  assert cfg.residual_settings == MHC(num_streams=4, sinkhorn_iters=5)
  # num_streams is the comparisons' one knob: a variant without streams ignores it.
  assert with_residual(cfg, "prenorm", num_streams=2) == ModelConfig(**CFG)
  assert with_residual(cfg, "kromhc", num_streams=8).num_streams == 8
