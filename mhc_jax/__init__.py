"""mhc-jax: Hyper-Connections and Manifold-Constrained Hyper-Connections for JAX / Flax.

NNX modules at the top level; Linen versions in `mhc_jax.linen`; diagnostics in
`mhc_jax.diagnostics`; the math as pure functions in `mhc_jax.mappings`, `mhc_jax.res_mappings`
(the `H_res` mappings) and `mhc_jax.streams`.
"""

from mhc_jax import diagnostics, linen
from mhc_jax.mappings import HCConfig, HeadConfig, MHCConfig, StreamEmbedConfig
from mhc_jax.modules import HyperConnection, HyperHead, ManifoldHyperConnection, StreamEmbedding
from mhc_jax.res_mappings import permutation_matrices
from mhc_jax.site import SiteContext
from mhc_jax.sinkhorn import sinkhorn_knopp
from mhc_jax.streams import (Coefficients, aggregate, embed_streams, expand_streams, merge,
                             reduce_streams)

__all__ = [
    "Coefficients", "HCConfig", "HeadConfig", "HyperConnection", "HyperHead", "MHCConfig",
    "ManifoldHyperConnection", "SiteContext", "StreamEmbedConfig", "StreamEmbedding",
    "aggregate", "diagnostics", "embed_streams", "expand_streams", "linen", "merge",
    "permutation_matrices", "reduce_streams", "sinkhorn_knopp",
]
