"""Batched n×n Sinkhorn-Knopp: the semantics (`reference`) and its fast paths."""

from kernels_pallas.sinkhorn.reference import sinkhorn_reference
from kernels_pallas.sinkhorn.xla import sinkhorn_xla

__all__ = ["sinkhorn_reference", "sinkhorn_xla"]
