"""mhc_jax.lm.sharding: parameter sharding rules over the mesh, and their errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.sharding import MeshConfig, make_mesh, param_specs


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
