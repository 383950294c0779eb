"""Batched n×n Sinkhorn-Knopp: the semantics (`reference`) and its fast paths: the XLA
custom VJP (`xla`) and the Pallas kernels (`pallas_common`, `tpu`, `gpu`)."""

from kernels_pallas.sinkhorn.pallas_common import sinkhorn_pallas
from kernels_pallas.sinkhorn.reference import sinkhorn_reference
from kernels_pallas.sinkhorn.xla import sinkhorn_xla

__all__ = ["sinkhorn_pallas", "sinkhorn_reference", "sinkhorn_xla"]
