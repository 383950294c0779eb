"""`sinkhorn_knopp` and its `BACKENDS`, defined in `kernels_pallas.sinkhorn.api`."""

from kernels_pallas.sinkhorn.api import BACKENDS, sinkhorn_knopp

__all__ = ["BACKENDS", "sinkhorn_knopp"]
