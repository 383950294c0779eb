"""The LM: initial loss, scanned == unrolled layers, remat policies, per-sub-layer diagnostics."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.residuals import RESIDUALS, with_residual
from mhc_jax.lm.model import SITES, ModelConfig, Transformer, from_params, layer_params
from mhc_jax.site import SiteMixin
from mhc_jax.lm.train_state import _h_res_per_sublayer, cross_entropy

VOCAB = 258


def small(**overrides) -> ModelConfig:
  return ModelConfig(**{"d_model": 32, "num_layers": 3, "num_heads": 4, "mlp_dim": 64,
                        **overrides})


def tokens(seed, shape=(2, 17)):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


def loss_and_grads(cfg: ModelConfig, batch):
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:])
  loss, grads = jax.jit(jax.value_and_grad(loss))(params)
  return loss, nnx.to_pure_dict(grads)


def unstack(blocks: dict, num_layers: int) -> list:
  """A scanned model's stacked block tree -> one tree per layer."""
  return [jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(num_layers)]


def assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# |step-0 loss - ln(vocab)| at most, by d_model. This seed and batch (2048 tokens, so that the
# batch's own spread stays below the model's excess) give 0.0154 at 64 and 0.0037 at 1024, the
# largest over every variant, tied or not; seeds 0-7 gave at most 0.0154 and 0.00497, so these
# hold for the model, not only for this draw. The excess is about 1/(2 d_model) from the
# logits' spread, plus (e - 1)/vocab from the input token's own logit of 1 when tied. README.md
# states these figures (tests/test_readme.py checks that it does).
STEP0_LOSS_BOUNDS = {64: 0.016, 1024: 0.005}


@pytest.mark.parametrize("d_model,tie", [(64, True), (1024, True), (1024, False)])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_initial_loss_is_that_of_a_uniform_prediction(residual, d_model, tie):
  cfg = ModelConfig(d_model=d_model, num_layers=2, num_heads=4, mlp_dim=2 * d_model,
                    residual=residual, tie_embeddings=tie)
  model = Transformer(cfg, rngs=nnx.Rngs(1))
  batch = tokens(0, (16, 129))
  loss = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
  assert abs(float(loss) - math.log(VOCAB)) < STEP0_LOSS_BOUNDS[d_model]


@pytest.mark.parametrize("residual", RESIDUALS)
def test_scanned_layers_equal_unrolled_layers(residual):
  batch = tokens(1)
  scanned = loss_and_grads(small(residual=residual), batch)
  unrolled = loss_and_grads(small(residual=residual, scan_layers=False), batch)
  np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-6)
  # Same seed, same initial values: the layouts differ only in how blocks are stored.
  scanned_grads, unrolled_grads = scanned[1], unrolled[1]
  assert_trees_close(unstack(scanned_grads.pop("blocks"), 3),
                     [unrolled_grads["blocks"][i] for i in range(3)], atol=1e-6)
  unrolled_grads.pop("blocks")
  assert_trees_close(scanned_grads, unrolled_grads, atol=1e-6)


@pytest.mark.parametrize("residual", RESIDUALS)
def test_changing_a_token_changes_no_earlier_logit(residual):
  # Whole-model causality: attention is masked, and every coefficient path looks at one
  # token at a time. Parameters perturbed so that no site sits at its symmetric start.
  model = Transformer(small(residual=residual), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  noise = iter(np.random.default_rng(5).normal(size=(len(jax.tree.leaves(params)),)))
  params = jax.tree.map(lambda x: x + 0.3 * next(noise) * jnp.ones_like(x), params)
  model = nnx.merge(graphdef, params)
  batch = tokens(6, (1, 16))
  changed = batch.at[0, 9].set((batch[0, 9] + 1) % VOCAB)
  before, after = model(batch), model(changed)
  np.testing.assert_array_equal(before[:, :9], after[:, :9])
  # ... and it does reach the later ones (by 4e-6 for post-norm to 7e-4 for HC here: initial
  # logits are small), so the equality above is not vacuous.
  assert bool(jnp.any(before[:, 9:] != after[:, 9:]))


@pytest.mark.parametrize("residual,scan_layers", [("hc", True), ("mhc", True),
                                                  ("mhc", False)])
def test_remat_policies_give_the_same_values_and_gradients(residual, scan_layers):
  batch = tokens(2)
  base = loss_and_grads(small(residual=residual, scan_layers=scan_layers, remat="none"), batch)
  for remat in ("minimal", "full"):
    loss, grads = loss_and_grads(small(residual=residual, scan_layers=scan_layers,
                                       remat=remat), batch)
    np.testing.assert_allclose(loss, base[0], rtol=1e-6)
    assert_trees_close(grads, base[1], atol=1e-6)


def compiled_temp_bytes(cfg: ModelConfig, batch) -> int:
  graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:])
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_less_for_the_backward():
  batch = tokens(3, (4, 65))
  cfg = small(residual="mhc", d_model=64, mlp_dim=256)
  temp = {remat: compiled_temp_bytes(dataclasses.replace(cfg, remat=remat), batch)
          for remat in ("none", "minimal", "full")}
  assert temp["full"] < temp["minimal"] < 0.8 * temp["none"]


def test_scanned_program_does_not_grow_with_depth():
  batch = tokens(4)

  def program_size(num_layers):
    graphdef, params = nnx.split(Transformer(small(residual="hc", num_layers=num_layers),
                                             rngs=nnx.Rngs(0)))
    loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:])
    return len(jax.jit(jax.grad(loss)).lower(params).as_text())

  assert program_size(8) < 1.05 * program_size(2)


def test_layer_dependent_initialisation_survives_stacking():
  cfg = small(residual="mhc", num_layers=4)
  scanned = nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))["blocks"]
  unrolled = nnx.to_pure_dict(nnx.state(Transformer(dataclasses.replace(cfg, scan_layers=False),
                                                    rngs=nnx.Rngs(0))))["blocks"]
  assert_trees_close(unstack(scanned, 4), [unrolled[i] for i in range(4)], atol=0)
  # mHC's H_pre bias prefers stream (2 * layer + site) mod n: it differs across the stack.
  preferred = np.argmax(np.asarray(scanned["attn_site"]["bias"][:, :4]), axis=-1)
  np.testing.assert_array_equal(preferred, [0, 2, 0, 2])
  preferred = np.argmax(np.asarray(scanned["mlp_site"]["bias"][:, :4]), axis=-1)
  np.testing.assert_array_equal(preferred, [1, 3, 1, 3])


def sown(model: Transformer, batch, read):
  """`read(model, intermediates)` of a forward pass with every site sowing its coefficients."""
  graphdef, params = nnx.split(model)

  def run(params):
    model = nnx.merge(graphdef, params)
    for _, module in nnx.iter_modules(model):
      if isinstance(module, SiteMixin):
        module.sow_coefficients = True
    _, intermediates = nnx.capture(model, nnx.Intermediate)(batch)
    return read(model, intermediates)

  return jax.jit(run)(params)


def h_res_by_site_path(model: Transformer, intermediates) -> jax.Array:
  """An unrolled model's sown H_res read by path, `blocks/<layer>/<site>`, in depth order."""
  blocks = nnx.to_pure_dict(intermediates)["blocks"]
  return jnp.stack([blocks[layer][site]["coefficients"][0].h_res
                    for layer in range(model.cfg.num_layers) for site in SITES])


def perturbed_layouts(cfg: ModelConfig) -> tuple[Transformer, Transformer]:
  """The unrolled and the scanned model of `cfg` holding the same parameters: the initial ones
  with noise added to every block parameter, so that no two sub-layers share an H_res."""
  unrolled = Transformer(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
  top = {name: value for name, value in nnx.to_pure_dict(nnx.state(unrolled)).items()
         if name != "blocks"}
  rng = np.random.default_rng(0)
  layers = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32),
                        layer_params(unrolled))
  return (from_params(unrolled.cfg, top, layers),
          from_params(dataclasses.replace(cfg, scan_layers=True), top, layers))


@pytest.mark.parametrize("residual,dynamic", [("mhc", True), ("hc", True), ("hc", False)])
def test_sown_h_res_comes_out_per_sub_layer_in_depth_order(residual, dynamic):
  batch = tokens(5)
  cfg = with_residual(small(), residual, **({} if dynamic else {"dynamic": False}))
  unrolled, scanned = perturbed_layouts(cfg)
  # Depth order: sub-layer 2l is layer l's attention site, 2l + 1 its MLP site.
  expected = np.asarray(sown(unrolled, batch, h_res_by_site_path))
  assert expected.shape[0] == 2 * cfg.num_layers
  assert min(np.abs(expected[i] - expected[j]).max()
             for i in range(len(expected)) for j in range(i)) > 1e-3  # any shuffle shows
  np.testing.assert_array_equal(sown(unrolled, batch, _h_res_per_sublayer), expected)
  np.testing.assert_allclose(sown(scanned, batch, _h_res_per_sublayer), expected, atol=1e-6)
  # The first sub-layer sees the (scaled) embedding itself: recomputed from the model's own
  # pieces.
  embedded = unrolled.embed[...][batch] * math.sqrt(cfg.d_model)
  streams = jnp.broadcast_to(embedded[..., None, :], (*batch.shape, cfg.num_streams, cfg.d_model))
  first = unrolled.blocks[0].attn_site.compute_coefficients(streams).h_res
  np.testing.assert_allclose(expected[0], jnp.broadcast_to(first, expected[0].shape), atol=1e-6)


@pytest.mark.parametrize("field,value,match", [
    ("remat", "some", "remat must be one of none, minimal, full; got 'some'"),
    ("attention", "flash", "attention must be one of auto, xla, cudnn, splash; got 'flash'"),
    ("scan_layers", 1, "scan_layers must be True or False, got 1"),
])
def test_bad_settings_are_one_line(field, value, match):
  with pytest.raises(ValueError, match=match) as err:
    small(**{field: value})
  assert "\n" not in str(err.value)


def test_fields_for_foreign_checkpoints_default_to_this_projects_model():
  cfg = small(residual="mhc")
  spelled_out = dataclasses.replace(cfg, num_kv_heads=4, head_dim_override=8, qk_norm=False,
                                    embed_scale=True, stream_reduction="sum")
  default, explicit = (Transformer(c, rngs=nnx.Rngs(0)) for c in (cfg, spelled_out))
  assert_trees_close(nnx.to_pure_dict(nnx.state(default)),
                     nnx.to_pure_dict(nnx.state(explicit)), atol=0)
  np.testing.assert_array_equal(default(tokens(4)), explicit(tokens(4)))


def test_grouped_query_attention_with_own_head_dim_and_qk_norm_scans_like_unrolled():
  # head_dim 12 * 4 heads != d_model 32; 2 kv heads; q/k norm; no embedding multiplier.
  options = dict(num_kv_heads=2, head_dim_override=12, qk_norm=True, embed_scale=False,
                 residual="mhc", stream_reduction="mean")
  scanned, unrolled = (Transformer(small(scan_layers=s, **options), rngs=nnx.Rngs(0))
                       for s in (True, False))
  attn = scanned.blocks.attn
  assert (attn.wq.shape, attn.wk.shape, attn.wv.shape, attn.wo.shape) == (
      (3, 32, 4, 12), (3, 32, 2, 12), (3, 32, 2, 12), (3, 4, 12, 32))
  assert attn.q_norm.scale.get_metadata()["logical_axes"] == ("layers", "head_dim")
  np.testing.assert_allclose(scanned(tokens(5)), unrolled(tokens(5)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("field,value,match", [
    ("num_kv_heads", 3, r"num_kv_heads \(3\) must divide num_heads \(4\)"),
    ("head_dim_override", 7, r"head dim \(7\) must be even for RoPE"),
    ("qk_norm", 1, "qk_norm must be True or False, got 1"),
    ("embed_scale", "yes", "embed_scale must be True or False, got 'yes'"),
    ("stream_reduction", "max", "stream_reduction must be one of sum, mean; got 'max'"),
])
def test_bad_foreign_checkpoint_fields_are_one_line(field, value, match):
  with pytest.raises(ValueError, match=match) as err:
    small(**{field: value})
  assert "\n" not in str(err.value)


def test_from_params_moves_a_model_between_layouts_and_refuses_a_misshapen_array():
  unrolled = Transformer(small(scan_layers=False, residual="hc"), rngs=nnx.Rngs(0))
  top = {name: value for name, value in nnx.to_pure_dict(nnx.state(unrolled)).items()
         if name != "blocks"}
  layers = layer_params(unrolled)
  scanned = from_params(small(residual="hc"), top, layers)
  np.testing.assert_allclose(scanned(tokens(6)), unrolled(tokens(6)), atol=1e-6, rtol=0)
  assert_trees_close(layer_params(scanned), layers, atol=0)
  layers[1]["mlp"]["w_up"] = layers[1]["mlp"]["w_up"][:, :-1]
  with pytest.raises(ValueError, match=r"parameter blocks/1/mlp/w_up has shape \(32, 63\), "
                     r"the model's is \(32, 64\)") as err:
    from_params(unrolled.cfg, top, layers)
  assert "\n" not in str(err.value)


def test_stream_embedding_starts_at_zero_then_sets_the_streams_apart():
  cfg = small(residual="mhc", stream_embed=True)
  model, plain = (Transformer(c, rngs=nnx.Rngs(0)) for c in (cfg, small(residual="mhc")))
  batch = tokens(7)
  # Zero offsets at the start: the model without them, to the bit.
  np.testing.assert_array_equal(model(batch), plain(batch))
  offsets = jax.random.normal(jax.random.key(3), (cfg.num_streams, cfg.d_model))
  model.stream_embed.offsets[...] = offsets
  embedded = jnp.take(model.embed[...], batch, axis=0) * np.sqrt(cfg.d_model)
  np.testing.assert_allclose(model._embed(batch), embedded[..., None, :] + offsets, rtol=1e-6)
  assert not np.allclose(model(batch), plain(batch), atol=1e-3)
  # The offsets train: their gradient is per stream, not one shared value.
  grads = nnx.grad(lambda m: cross_entropy(m(batch[:, :-1]), batch[:, 1:]))(model)
  per_stream = np.asarray(grads.stream_embed.offsets[...])
  assert per_stream.shape == (cfg.num_streams, cfg.d_model)
  assert not np.allclose(per_stream[0], per_stream[1])
  with pytest.raises(ValueError, match="^stream_embed needs a variant with streams; residual "
                                       "'prenorm' has none: set stream_embed = False$"):
    small(stream_embed=True)
