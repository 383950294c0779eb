"""A decoder-only language model whose residual connection is the one thing that varies, and
everything to train it at scale: data, sharding, the train state, checkpoints, metrics
(`mhc_jax.lm.train.train`, or the `mhc-train` command in `cli.py`).

The hyper-connection library itself is `mhc_jax`; this package is one model built on it.
"""

from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.decode import generate
from mhc_jax.lm.hf import load_hf_checkpoint
from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.retrofitting import retrofit
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train import LoopConfig

# `train` stays in `mhc_jax.lm.train`: exported here, the function would hide its module.
__all__ = ["DataConfig", "LoopConfig", "MeshConfig", "ModelConfig", "OptimizerConfig",
           "Transformer", "generate", "load_hf_checkpoint", "retrofit"]
