"""Batched n×n Sinkhorn-Knopp: the checked entry point and its registry (`api`), the
semantics (`reference`), and the implementations: the XLA custom VJP (`xla`) and the Pallas
kernels (`tpu`, `gpu`, behind the custom VJP in `pallas_vjp`), sharing the steps in
`iterations` and the layout in `layout`."""

from kernels_pallas.sinkhorn.api import BACKENDS, IMPLEMENTATIONS, sinkhorn_knopp
from kernels_pallas.sinkhorn.reference import sinkhorn_reference

__all__ = ["BACKENDS", "IMPLEMENTATIONS", "sinkhorn_knopp", "sinkhorn_reference"]
