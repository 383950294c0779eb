"""mhc_jax.lm.optimizer: the learning-rate schedules and the weight-decay mask."""

import dataclasses

import jax
import numpy as np
from flax import nnx

from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.optimizer import OptimizerConfig, decay_mask, learning_rate_schedule


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
