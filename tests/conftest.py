"""Test session set-up: 8 CPU devices (for mesh tests) and the local Shakespeare copy."""

import os
import pathlib

import jax
import numpy as np
import pytest

# Must happen before any backend starts: mesh tests split work over 8 CPU devices.
jax.config.update("jax_num_cpu_devices", 8)

_SHARED_SHAKESPEARE = pathlib.Path(__file__).resolve().parents[2] / "shared/data/shakespeare"
if _SHARED_SHAKESPEARE.is_dir():
  os.environ.setdefault("MHC_JAX_SHAKESPEARE_DIR", str(_SHARED_SHAKESPEARE))


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
