"""Stream mixing (`mhc_jax.streams`): full float32 contractions whatever the default precision.

The CPU backend computes float32 dots exactly at any precision, so a numerical test here
could not fail: the tests read the precision of every `dot_general` in the lowered program.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mhc_jax

N, C, TOKENS = 4, 8, 6
_DOT = re.compile(r"stablehlo\.dot_general\b[^\n]*")


def random(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def dot_precisions(fn, *args) -> list[str]:
  """The precision attribute of every dot_general in `fn`'s StableHLO, lowered under the
  lowest default matmul precision (bfloat16 passes on TPU, TF32 on GPU)."""
  with jax.default_matmul_precision("bfloat16"):
    text = jax.jit(fn).lower(*args).as_text()
  dots = _DOT.findall(text)
  assert dots, "no dot_general in the lowered program: the check would pass vacuously"
  return [re.search(r"precision = \[([A-Z]+, [A-Z]+)\]", dot).group(1) if "precision" in dot
          else "none" for dot in dots]


def assert_all_highest(fn, *args):
  precisions = dot_precisions(fn, *args)
  assert all(p == "HIGHEST, HIGHEST" for p in precisions), precisions


def test_precision_check_sees_default_precision():
  # The check must be able to fail: an einsum without explicit precision lowers as DEFAULT.
  assert dot_precisions(lambda a, b: jnp.einsum("...n,...nc->...c", a, b),
                        random(0, (TOKENS, N)), random(1, (TOKENS, N, C))) == ["DEFAULT, DEFAULT"]


def test_aggregate_and_merge_contract_streams_at_highest_precision():
  streams, branch_output = random(2, (TOKENS, N, C)), random(3, (TOKENS, C))
  coefficients = mhc_jax.Coefficients(random(4, (TOKENS, N)), random(5, (TOKENS, N)),
                                      random(6, (TOKENS, N, N)))
  assert_all_highest(mhc_jax.aggregate, streams, coefficients.h_pre)
  assert_all_highest(mhc_jax.merge, streams, branch_output, coefficients)
  loss = lambda s, o, c: jnp.sum(mhc_jax.merge(s, o, c) ** 2) + jnp.sum(
      mhc_jax.aggregate(s, c.h_pre) ** 2)
  assert_all_highest(jax.grad(loss, argnums=(0, 1, 2)), streams, branch_output, coefficients)


SITES = {
    "mhc": lambda: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0)),
    "mhc_lite": lambda: mhc_jax.ManifoldHyperConnection(N, C, rngs=nnx.Rngs(0),
                                                       res_mapping="permutations"),
    "hc": lambda: mhc_jax.HyperConnection(N, C, layer_index=1),
    "hc_static": lambda: mhc_jax.HyperConnection(N, C, dynamic=False),
}


@pytest.mark.parametrize("kind", SITES)
def test_site_forward_and_backward_run_every_dot_at_highest_precision(kind):
  graphdef, params = nnx.split(SITES[kind](), nnx.Param)
  site = lambda p, x: nnx.merge(graphdef, p)(x, lambda u: u)  # identity branch: no dots of its own
  x = random(7, (2, 3, N, C))
  assert_all_highest(site, params, x)
  assert_all_highest(jax.grad(lambda p, x: jnp.sum(site(p, x) ** 2), argnums=(0, 1)), params, x)


def test_hyper_head_forward_and_backward_run_every_dot_at_highest_precision():
  graphdef, params = nnx.split(mhc_jax.HyperHead(N, C, rngs=nnx.Rngs(0)), nnx.Param)
  head = lambda p, x: nnx.merge(graphdef, p)(x)
  x = random(8, (TOKENS, N, C))
  assert_all_highest(head, params, x)
  assert_all_highest(jax.grad(lambda p, x: jnp.sum(head(p, x) ** 2), argnums=(0, 1)), params, x)
