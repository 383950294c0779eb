"""Device mesh and parameter shardings for the LM: logical axis names -> mesh axes.

Parameters carry `logical_axes` metadata (see `model.py`). The default rules give FSDP over
the embedding dimension and tensor parallelism over attention heads and the MLP hidden
dimension; the batch is split over `data` and `fsdp` together. Parameters without metadata,
and axes named None (hyper-connection coefficients: tiny), are replicated.
"""

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mhc_jax.checks import check_int

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES: Mapping[str, str | None] = {
    "embed": "fsdp", "heads": "tensor", "mlp": "tensor",
    "head_dim": None, "vocab": None, "norm": None,
    "layers": None,  # scanned blocks' stacking axis: every device holds every layer's slice
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for name in MESH_AXES:
      check_int(f"mesh {name} size", getattr(self, name))

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  @property
  def batch_shards(self) -> int:
    return self.data * self.fsdp


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A `(data, fsdp, tensor)` mesh over all devices (or those given), auto-sharded axes."""
  devices = jax.devices() if devices is None else devices
  if int(np.prod(cfg.shape)) != len(devices):
    raise ValueError(f"mesh data*fsdp*tensor = {cfg.data}*{cfg.fsdp}*{cfg.tensor} = "
                     f"{int(np.prod(cfg.shape))} must equal the number of devices, "
                     f"{len(devices)}")
  return jax.make_mesh(cfg.shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_specs(abstract_state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """`nnx.State` of Variables -> pure dict of PartitionSpecs, checking divisibility."""

  def spec(path, variable):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      return P()
    mesh_axes = tuple(None if a is None else rules[a] for a in axes)
    for dim, axis in zip(variable.shape, mesh_axes):
      if axis is not None and dim % mesh.shape[axis]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ValueError(f"parameter {name} of shape {variable.shape} cannot be "
                         f"split {mesh.shape[axis]} ways over mesh axis '{axis}' ({dim} is "
                         "not divisible)")
    return P(*mesh_axes)

  specs = jax.tree_util.tree_map_with_path(spec, abstract_state,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(specs)


def named(mesh: Mesh, specs):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """`[batch, seq]` arrays: batch split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES, None))
