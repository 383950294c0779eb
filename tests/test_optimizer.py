"""mhc_jax.lm.optimizer: the learning-rate schedules, the weight-decay mask and the static
maps' learning-rate multiplier."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.optimizer import (OptimizerConfig, decay_mask, learning_rate_schedule,
                                  make_optimizer, static_map_mask)
from mhc_jax.lm.residuals import with_residual
from random_models import far_from_init

TINY = ModelConfig(d_model=16, num_layers=2, num_heads=2, mlp_dim=32)
HC_STATIC_MAPS = {"static_pre", "static_post", "static_res", "scale_alpha", "scale_beta"}


def test_step_decay_follows_the_mhc_paper():
  schedule = learning_rate_schedule(
      OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule="step"), total_steps=100)
  np.testing.assert_allclose([schedule(s) for s in (5, 10, 79, 81, 89, 91, 99)],
                             [0.5, 1.0, 1.0, 0.316, 0.316, 0.1, 0.1], rtol=1e-5)


def test_cosine_warms_up_then_decays_to_final_ratio():
  schedule = learning_rate_schedule(
      OptimizerConfig(learning_rate=2.0, warmup_steps=10, final_lr_ratio=0.1), total_steps=110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60),
                              schedule(110)], [0.0, 1.0, 2.0, 1.1, 0.2], rtol=1e-5)


def test_weight_decay_spares_norms_gates_and_static_hc_params():
  cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, residual="hc")
  mask = decay_mask(nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))))
  unrolled = decay_mask(nnx.state(Transformer(dataclasses.replace(cfg, scan_layers=False),
                                              rngs=nnx.Rngs(0))))
  block = mask["blocks"]  # scanned: one block, every parameter stacked on a layers axis
  assert jax.tree.leaves(block) == jax.tree.leaves(unrolled["blocks"][0])
  assert mask["embed"] and block["attn"]["wq"] and block["mlp"]["w_down"]
  assert block["attn_site"]["w_res"]  # a dynamic weight matrix
  assert not block["attn_norm"]["scale"]
  assert not any([block["attn_site"][k] for k in ("static_res", "static_pre", "static_post",
                                                  "scale_alpha", "norm_scale")])
  mhc = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, residual="mhc")
  site = decay_mask(nnx.state(Transformer(mhc, rngs=nnx.Rngs(0))))
  site = site["blocks"]["mlp_site"]
  assert site["phi"] and not site["alpha"] and not site["bias"]


def first_update(model: Transformer, multiplier: float, seed: int = 0):
  """One AdamW step's update of `model`'s parameters under random gradients (the same for
  any multiplier), with no warm-up so the step has the full rate."""
  state = nnx.state(model)
  params = nnx.to_pure_dict(state)
  rng = np.random.default_rng(seed)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  tx = make_optimizer(OptimizerConfig(warmup_steps=0, static_map_lr_multiplier=multiplier),
                      10, state)
  return tx.update(grads, tx.init(params), params)[0]


def by_path(tree) -> dict[tuple[str, ...], object]:
  return {tuple(key.key for key in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("residual, tagged", [("hc", HC_STATIC_MAPS), ("mhc", set())])
def test_static_map_multiplier_scales_exactly_the_tagged_parameters(residual, tagged):
  model = far_from_init(with_residual(TINY, residual, num_streams=2))
  full, slow = (by_path(first_update(model, m)) for m in (1.0, 0.1))
  mask = by_path(static_map_mask(nnx.state(model)))
  assert {path[-1] for path, on in mask.items() if on} == tagged
  changed = {name for name in full if not np.array_equal(full[name], slow[name])}
  assert changed == {name for name, on in mask.items() if on}
  for name in full:
    assert np.all(full[name] != 0), name  # every parameter moved
    expected = 0.1 * full[name] if mask[name] else full[name]
    np.testing.assert_allclose(slow[name], expected, rtol=1e-6, atol=0, err_msg=name)


def test_multiplier_one_is_the_optimizer_without_it():
  model = far_from_init(with_residual(TINY, "hc", num_streams=2))
  state = nnx.state(model)
  params = nnx.to_pure_dict(state)
  cfg = OptimizerConfig(warmup_steps=0)
  plain = optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                      optax.adamw(learning_rate_schedule(cfg, 10), b1=cfg.b1, b2=cfg.b2,
                                  weight_decay=cfg.weight_decay, mask=decay_mask(state)))
  for multiplier in (1.0, 0.1):  # checkpoints restore, under any multiplier
    ours = make_optimizer(dataclasses.replace(cfg, static_map_lr_multiplier=multiplier), 10,
                          state)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(plain.init(params))
  rng = np.random.default_rng(1)
  grads = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), params)
  old = plain.update(grads, plain.init(params), params)[0]
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(first_update(model, 1.0, seed=1)),
                  strict=True):
    assert np.array_equal(a, b)


@pytest.mark.parametrize("multiplier", [0.0, -0.1, float("nan")])
def test_non_positive_static_map_multiplier_is_one_line(multiplier):
  with pytest.raises(ValueError, match=r"^static_map_lr_multiplier must be > 0, got") as err:
    OptimizerConfig(static_map_lr_multiplier=multiplier)
  assert "\n" not in str(err.value)
