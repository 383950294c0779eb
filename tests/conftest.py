"""Test session set-up: 8 CPU devices (for mesh tests) and the local Shakespeare copy."""

import os
import pathlib
import shutil
import tempfile

import jax
import numpy as np
import pytest

# Must happen before any backend starts: mesh tests split work over 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

# Compiling, not running, is most of the suite's time on CPU, and the programs are tiny: LLVM's
# cheapest settings and the older loop emitter for CPU fusions cut each compile by about 40%.
# XLA's HLO passes (fusion, layout, sharding, remat) still run, so tests still exercise the
# programs users compile. Set in the environment so CLI and experiment subprocesses inherit it.
_CHEAP_CPU_COMPILES = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                       " --xla_cpu_use_fusion_emitters=false")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CHEAP_CPU_COMPILES}".strip()

_SHARED_SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/shakespeare"
if _SHARED_SHAKESPEARE.is_dir():
  os.environ.setdefault("MHC_JAX_SHAKESPEARE_DIR", str(_SHARED_SHAKESPEARE))


_CACHE_ENV = "MHC_JAX_TEST_COMPILATION_CACHE"


def pytest_configure(config):
  """One persistent compilation cache for the session, shared by the xdist workers (they
  inherit the controller's environment) and by CLI subprocesses: many tests build the very
  same programs (a run and its resumed twin; every `Trainer` jits afresh), and each would pay
  XLA's compile again."""
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mhc_jax_compilation_cache_")
    config._mhc_jax_owns_cache = True
  cache = os.environ[_CACHE_ENV]
  os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if getattr(config, "_mhc_jax_owns_cache", False):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


WORDS = "thou art my lord and I thy humble servant for the king doth love".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Twelve small documents of pseudo-verse: learnable structure, nothing to download."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  for d in range(12):
    lines = [" ".join(rng.choice(WORDS, 6)).capitalize() + "." for _ in range(120)]
    (root / f"doc{d:02d}.txt").write_text("\n".join(lines))
  return str(root / "*.txt")
