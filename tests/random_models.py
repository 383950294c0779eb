"""Test models with weights far from initialisation, shared by the tests that need logits to
spread and every site's coefficients to depend on its token."""

import jax
import numpy as np
from flax import nnx

from mhc_jax.lm.model import ModelConfig, Transformer, from_params


def far_from_init(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """`cfg`'s model with weights 0.3 N(0, 1) and norm scales 1 + 0.2 N(0, 1), drawn in numpy
  and loaded with `from_params`: no random program to compile. Either layer layout."""
  rng = np.random.default_rng(seed)
  draw = lambda path, x: (1 + 0.2 * rng.standard_normal(x.shape) if path[-1].key == "scale"
                          else 0.3 * rng.standard_normal(x.shape))
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(nnx.state(abstract)))
  blocks = params.pop("blocks")
  layers = [jax.tree.map(lambda x, i=i: x[i], blocks) if cfg.scan_layers else blocks[i]
            for i in range(cfg.num_layers)]
  return from_params(cfg, params, layers)
