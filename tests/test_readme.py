"""The README's code examples run as written and compute what the README says: a fresh mHC
stack is its pre-norm baseline (every stream a copy of it) plus a small perturbation."""

import pathlib
import re

import flax.linen as nn
import jax.numpy as jnp
import pytest

import mhc_jax

README = pathlib.Path(__file__).parent.parent / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
NUM_STREAMS, INPUT = 4, jnp.ones((2, 16, 64))  # as in both examples


def rel_err(out, ref):
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_nnx(namespace):
  x = INPUT
  for block in namespace["blocks"]:  # the same sub-layers as plain pre-norm residuals
    x = x + block.attn(block.attn_norm(x))
    x = x + block.mlp(block.mlp_norm(x))
  # `out` sums the streams, each about the baseline
  assert rel_err(namespace["out"], NUM_STREAMS * x) < 0.02


def check_linen(namespace):
  params = namespace["variables"]["params"]
  layer = lambda module, name, x: module.apply({"params": params[name]}, x)
  x = INPUT
  x = x + layer(nn.MultiHeadDotProductAttention(num_heads=4), "MultiHeadDotProductAttention_0",
                layer(nn.RMSNorm(), "RMSNorm_0", x))
  x = x + layer(nn.Dense(64), "Dense_0", layer(nn.RMSNorm(), "RMSNorm_1", x))
  out = namespace["block"].apply(namespace["variables"], namespace["streams"])
  assert rel_err(out, mhc_jax.expand_streams(x, NUM_STREAMS)) < 0.02


CHECKS = {"nnx.Module": check_nnx, "nn.compact": check_linen}  # marker in the example -> check


def test_readme_has_examples_and_every_one_is_checked():
  assert len(EXAMPLES) >= 2
  assert all(sum(marker in example for marker in CHECKS) == 1 for example in EXAMPLES)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs_and_is_near_its_pre_norm_baseline(index):
  namespace = {}
  exec(compile(EXAMPLES[index], f"README example {index}", "exec"), namespace)
  next(check for marker, check in CHECKS.items() if marker in EXAMPLES[index])(namespace)
