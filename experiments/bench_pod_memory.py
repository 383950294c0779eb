"""Benchmark: does `tpu_pod_mhc.gin` fit a chip? Per-device bytes of its train step.

    python -m experiments.bench_pod_memory [--gin_file tpu_pod_mhc.gin] [--devices 8]
        [--fsdp 4] [--tensor 2] [--gin_param 'ModelConfig.remat = "full"'] [--chip_gib 16]

Parameters and optimizer state: exact per-device bytes of the pod's own shardings, computed from
the shard shapes on an abstract mesh of the config's size (no devices needed).

Activations and other temporaries: the compiled program's temporary bytes, on a reduced mesh of
`--devices` CPU devices that keeps the pod's per-device batch, its sequence length and its
tensor-parallel degree (so each device computes what one pod chip computes), with `fsdp`
reduced to fit. Caveats, printed with the result: the CPU program runs attention as XLA einsums
(a TPU runs the splash kernel, which does not materialise `[seq, seq]` logits), so this figure
is an upper bound for the TPU's; and FSDP over fewer devices gathers the same per-layer weights
but keeps larger gradient shards.
"""

import argparse
import math

import jax
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from mhc_jax.lm import presets
from mhc_jax.lm.model import Transformer
from mhc_jax.lm.sharding import MESH_AXES, MeshConfig, param_specs
from mhc_jax.lm.train_state import Trainer


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", default="tpu_pod_mhc.gin")
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--devices", type=int, default=8, help="CPU devices of the reduced mesh")
  parser.add_argument("--fsdp", type=int, default=4, help="fsdp size of the reduced mesh")
  parser.add_argument("--chip_gib", type=float, default=16.0, help="HBM per chip (v5e: 16)")
  return parser.parse_args(argv)


def state_bytes_per_device(model_config, mesh_shape) -> int:
  """Exact per-device bytes of the parameters under the default sharding rules on a mesh of
  `mesh_shape` (an abstract mesh: no devices needed)."""
  mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  state = nnx.state(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
  specs = jax.tree.leaves(param_specs(state, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
  return sum(math.prod(NamedSharding(mesh, spec).shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf, spec in zip(jax.tree.leaves(state), specs))


def main(argv=None) -> None:
  args = parse_args(argv)
  jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
  cfg, _ = presets.parse([args.gin_file], args.gin_param)
  model, data, pod = cfg["model"], cfg["data"], cfg["mesh"]
  per_device_batch = data.batch_size // pod.batch_shards

  param_bytes = state_bytes_per_device(model, pod.shape)
  optimizer_bytes = 2 * param_bytes  # AdamW's two float32 moments; the rest is scalars
  reduced = MeshConfig(data=args.devices // (args.fsdp * pod.tensor), fsdp=args.fsdp,
                       tensor=pod.tensor)
  batch = per_device_batch * reduced.batch_shards
  trainer = Trainer(model, cfg["optimizer"], reduced, cfg["loop"], batch,
                    devices=jax.devices()[:args.devices])
  temp_bytes = trainer.lower_train_step(data.seq_len, batch).compile().memory_analysis() \
      .temp_size_in_bytes

  gib, chip = 2**30, args.chip_gib * 2**30
  total = param_bytes + optimizer_bytes + temp_bytes
  print(f"{args.gin_file}: {trainer.num_params:,} parameters, residual {model.residual}, "
        f"dtype {model.dtype}, remat {model.remat}, scan_layers {model.scan_layers}; pod mesh "
        f"{dict(zip(MESH_AXES, pod.shape))}; per device {per_device_batch} x {data.seq_len} "
        f"tokens; jax {jax.__version__}")
  print("| what | per device GiB | how |")
  print("|---|---|---|")
  print(f"| parameters (float32) | {param_bytes / gib:.3f} | shard shapes on the pod mesh |")
  print(f"| AdamW moments | {optimizer_bytes / gib:.3f} | 2 x parameters |")
  print(f"| activations and temporaries | {temp_bytes / gib:.3f} | compiled temp bytes, reduced "
        f"mesh {dict(zip(MESH_AXES, reduced.shape))} of {jax.devices()[0].platform} devices, "
        f"attention '{model.attention_for(data.seq_len)}' |")
  print(f"| total | {total / gib:.3f} | {'fits' if total < chip else 'does NOT fit'} a "
        f"{args.chip_gib:g} GiB chip ({total / chip:.0%}) |")


if __name__ == "__main__":
  main()
