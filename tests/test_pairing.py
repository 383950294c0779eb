"""Pairing: at one seed every residual variant starts from the same shared weights and trains
on the same batches, so a difference between variants at a seed is the residual's alone."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.model import SITES, ModelConfig, Transformer, layer_params, outer_params
from mhc_jax.lm.residuals import RESIDUALS, with_residual
from mhc_jax.lm.retrofitting import retrofit

from experiments import compare_residuals, stability_map

SEED = 3


def small(residual: str, scan_layers: bool, **overrides) -> ModelConfig:
  """Three blocks (so blocks 1 and 2 come after a block's sites) and an untied read-out (drawn
  after every block): the variant's default settings."""
  cfg = ModelConfig(d_model=32, num_layers=3, num_heads=4, mlp_dim=64, tie_embeddings=False,
                    scan_layers=scan_layers)
  return dataclasses.replace(with_residual(cfg, residual), **overrides)


def split_sites(model: Transformer) -> tuple[dict, dict]:
  """(the shared parameters, the hyper-connection ones: each layer's sites and the stream
  embedding), as pure dicts with one entry per layer whatever the layout."""
  outer, layers = outer_params(model), layer_params(model)
  shared = {"outer": {k: v for k, v in outer.items() if k != "stream_embed"},
            "layers": [{k: v for k, v in layer.items() if k not in SITES} for layer in layers]}
  own = {"stream_embed": outer.get("stream_embed"),
         "sites": [{k: layer[k] for k in SITES if k in layer} for layer in layers]}
  return shared, own


def initial(cfg: ModelConfig, seed: int = SEED) -> tuple[dict, dict]:
  return split_sites(Transformer(cfg, rngs=nnx.Rngs(seed)))


def assert_bitwise_equal(tree, reference):
  """Same paths, same bits: one message naming every array that differs."""
  paths = lambda t: {jax.tree_util.keystr(p): np.asarray(x)
                     for p, x in jax.tree_util.tree_leaves_with_path(t)}
  got, want = paths(tree), paths(reference)
  assert got.keys() == want.keys()
  differing = [name for name in want if not np.array_equal(got[name], want[name])]
  assert not differing, f"differing: {differing}"


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_every_variant_draws_pre_norms_shared_weights(residual, scan_layers):
  reference, _ = initial(small("prenorm", scan_layers))
  stream_embed = {"stream_embed": True} if RESIDUALS[residual].uses_streams else {}
  shared, own = initial(small(residual, scan_layers, **stream_embed))
  assert_bitwise_equal(shared, reference)
  if stream_embed:  # the stream embedding starts at zero: nothing drawn
    assert not np.any(own["stream_embed"]["offsets"])


def test_the_sites_draw_from_the_seed_alike_in_both_layouts():
  """mHC's `phi` is random: its sites change with the seed, not with the layout."""
  scanned, unrolled, other_seed = (initial(small("mhc", scan), seed)[1]["sites"]
                                   for scan, seed in ((True, SEED), (False, SEED),
                                                      (True, SEED + 1)))
  assert_bitwise_equal(scanned, unrolled)
  for layer, other in zip(scanned, other_seed):
    assert not np.array_equal(layer["attn_site"]["phi"], other["attn_site"]["phi"])


def test_a_retrofit_draws_the_random_site_parameters_of_a_fresh_model_at_its_seed():
  pretrained = Transformer(small("prenorm", scan_layers=True), rngs=nnx.Rngs(0))
  retrofitted = retrofit(pretrained, "mhc", rngs=nnx.Rngs(SEED))
  fresh = Transformer(retrofitted.cfg, rngs=nnx.Rngs(SEED))
  # phi alone: the pass-through start sets the others (alpha, bias) to fixed values.
  phis = lambda model: [{site: layer[site]["phi"] for site in SITES}
                        for layer in split_sites(model)[1]["sites"]]
  assert_bitwise_equal(phis(retrofitted), phis(fresh))


def test_every_variant_at_a_seed_trains_on_the_same_batches():
  """The batches are `Corpus(DataConfig)`'s alone (the order is `DataConfig.seed`'s): both
  experiments give every variant at a seed the same DataConfig and initialisation seed."""
  comparison = compare_residuals.load_settings("cpu")
  stability = stability_map.load_settings("stability_map")
  for seed in (0, 5):
    runs = {variant: (compare_residuals.run_configs(comparison, variant, seed),
                      stability_map.run_configs(stability, variant, 8, 1e-2, seed))
            for variant in RESIDUALS}
    for configs in runs.values():
      for config, reference in zip(configs, runs["prenorm"]):
        assert config["data"] == reference["data"]
        assert config["data"].seed == config["loop"].seed == seed
