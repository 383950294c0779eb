"""Optimizer schedule and weight-decay mask; parameter sharding rules and their errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mhc_jax.model import ModelConfig, Transformer
from mhc_jax.optim import OptimizerConfig, decay_mask, learning_rate_schedule
from mhc_jax.sharding import MeshConfig, make_mesh, param_specs


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
  cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, residual="hc",
                    hc_dynamic=True)
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


def model_specs(cfg, mesh_cfg):
  mesh = make_mesh(mesh_cfg, jax.devices()[:int(np.prod(mesh_cfg.shape))])
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return param_specs(nnx.state(abstract), mesh)


def test_fsdp_over_embedding_and_tensor_over_heads_and_mlp():
  cfg = ModelConfig(d_model=32, num_layers=1, num_heads=4, mlp_dim=64, residual="mhc",
                    tie_embeddings=False)
  specs = model_specs(cfg, MeshConfig(data=2, fsdp=2, tensor=2))
  assert specs["embed"] == P(None, "fsdp") and specs["unembed"] == P("fsdp", None)
  # Scanned blocks carry a leading, unsharded layers axis; unrolled ones do not.
  scanned = specs["blocks"]
  unrolled = model_specs(dataclasses.replace(cfg, scan_layers=False),
                         MeshConfig(data=2, fsdp=2, tensor=2))["blocks"][0]
  for block, layers in ((scanned, (None,)), (unrolled, ())):
    assert block["attn"]["wq"] == P(*layers, "fsdp", "tensor", None)
    assert block["attn"]["wo"] == P(*layers, "tensor", None, "fsdp")
    assert block["mlp"]["w_up"] == P(*layers, "fsdp", "tensor")
    assert block["mlp"]["w_down"] == P(*layers, "tensor", "fsdp")
    assert set(block["attn_site"]["phi"]) <= {None}  # replicated
    assert block["attn_norm"]["scale"] == P(*layers, None)


def test_sharding_errors_name_the_culprit():
  with pytest.raises(ValueError, match="must equal the number of devices, 8"):
    make_mesh(MeshConfig(data=3))
  cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
  with pytest.raises(ValueError, match=r"blocks/attn/w[qkvo] of shape .* split 4 ways over mesh axis 'tensor'"):
    model_specs(cfg, MeshConfig(tensor=4))
  with pytest.raises(ValueError, match="mesh fsdp size"):
    MeshConfig(fsdp=0)
