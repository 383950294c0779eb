"""Test session set-up: 8 CPU devices (for mesh tests) and the local Shakespeare copy."""

import os
import pathlib

import jax

# Must happen before any backend starts: mesh tests split work over 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

_SHARED_SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/shakespeare"
if _SHARED_SHAKESPEARE.is_dir():
  os.environ.setdefault("MHC_JAX_SHAKESPEARE_DIR", str(_SHARED_SHAKESPEARE))
