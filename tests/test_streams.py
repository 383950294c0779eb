"""Stream mixing (`mhc_jax.streams`): full float32 contractions whatever the default precision;
the custom VJPs' values, gradients and kept bytes.

The CPU backend computes float32 dots exactly at any precision, so a numerical test could not
catch a lowered precision: the precision tests read every `dot_general` in the lowered program.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mhc_jax
from mhc_jax.streams import mean_streams
from test_mappings import saved_bytes
from test_modules import rel_err

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


# ---- the mixing's custom VJP: values, gradients and what it keeps for the backward


def aggregate_reference(streams, h_pre):
  return jnp.einsum("...n,...nc->...c", h_pre, streams)


def merge_reference(streams, branch_output, coefficients):
  return (jnp.einsum("...kj,...jc->...kc", coefficients.h_res, streams) +
          coefficients.h_post[..., :, None] * branch_output[..., None, :])


def mixing_inputs(lead, coefficient_lead, dtype, dim=C):
  """Random streams `[*lead, N, dim]` and branch output in `dtype`, float32 coefficients with
  leading axes `coefficient_lead` (`()`: static, as HC's)."""
  streams = random(10, (*lead, N, dim)).astype(dtype)
  branch_output = random(11, (*lead, dim)).astype(dtype)
  coefficients = mhc_jax.Coefficients(random(12, (*coefficient_lead, N)),
                                      random(13, (*coefficient_lead, N)),
                                      random(14, (*coefficient_lead, N, N)))
  return streams, branch_output, coefficients


MIXING_SHAPES = {  # streams' leading axes, coefficients' leading axes
    "one token": ((), ()),
    "tokens, per-token coefficients": ((TOKENS,), (TOKENS,)),
    "batch and sequence": ((2, 3), (2, 3)),
    "static coefficients": ((2, 3), ()),
    "coefficients per sequence position": ((2, 3), (3,)),
    "streams shared by the batch": ((3,), (2, 3)),
}
# name -> (library, float64 reference, its arguments from (streams, branch_output, coefficients))
MIXINGS = {
    "aggregate": (mhc_jax.aggregate, aggregate_reference, lambda x, f, c: (x, c.h_pre)),
    "merge": (mhc_jax.merge, merge_reference, lambda x, f, c: (x, f, c)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shapes", MIXING_SHAPES)
@pytest.mark.parametrize("mixing", MIXINGS)
def test_mixing_values_and_gradients_match_float64(mixing, shapes, dtype):
  fn, reference, pick = MIXINGS[mixing]
  args = pick(*mixing_inputs(*MIXING_SHAPES[shapes], dtype))
  out, pullback = jax.vjp(fn, *args)
  cotangent = random(15, out.shape).astype(dtype)
  grads = pullback(cotangent)
  with jax.enable_x64(True):  # on the very values the library saw
    to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    ref_out, ref_pullback = jax.vjp(reference, *to64(args))
    ref_grads = ref_pullback(to64(cotangent))
  assert out.dtype == dtype and out.shape == ref_out.shape
  for (path, got), ref, primal in zip(jax.tree.leaves_with_path((out, grads)),
                                      jax.tree.leaves((ref_out, ref_grads)),
                                      jax.tree.leaves((out, args))):
    name = jax.tree_util.keystr(path)
    assert got.dtype == primal.dtype and got.shape == primal.shape, name
    if not np.any(ref):  # merge does not read H_pre
      np.testing.assert_array_equal(got, 0, name)
    elif got.dtype == jnp.bfloat16:
      # Products summed in float32, then rounded once: the float64 value rounded to bfloat16.
      np.testing.assert_array_equal(np.asarray(got, np.float32),
                                    np.asarray(ref.astype(jnp.bfloat16), np.float32), name)
    else:  # float32: all of it for float32 streams, else the coefficients' gradients (summed
      # over the tokens that share them)
      assert rel_err(got, ref) < 1e-6, name


def assert_backward_all_highest(fn, *args):
  """The backward alone: `fn`'s pullback at `args`, lowered with its residuals as constants
  (a gradient's program also holds the forward's dots, which could hide a backward without)."""
  out, pullback = jax.vjp(fn, *args)
  assert_all_highest(pullback, random(9, out.shape).astype(out.dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("coefficient_lead", [(TOKENS,), ()], ids=["per token", "static"])
def test_mixing_backward_contracts_at_highest_precision(coefficient_lead, dtype):
  streams, branch_output, coefficients = mixing_inputs((TOKENS,), coefficient_lead, dtype)
  assert_backward_all_highest(mhc_jax.aggregate, streams, coefficients.h_pre)
  assert_backward_all_highest(mhc_jax.merge, streams, branch_output, coefficients)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mixing_keeps_the_streams_in_their_own_dtype_for_the_backward(dtype):
  # Wide enough that the float32 coefficients (n + n + n² a token) are small next to a token's
  # streams: a float32 copy of bfloat16 streams (two stream arrays) cannot hide.
  streams, branch_output, coefficients = mixing_inputs((512,), (512,), dtype, dim=256)
  stream_bytes = streams.size * streams.dtype.itemsize
  aggregate_saved = saved_bytes(mhc_jax.aggregate, streams, coefficients.h_pre)
  merge_saved = saved_bytes(mhc_jax.merge, streams, branch_output, coefficients)
  # aggregate: X and H_pre; merge: X, F (1/n of X), H_post, H_res.
  assert stream_bytes <= aggregate_saved < 1.05 * stream_bytes
  assert 1.25 * stream_bytes <= merge_saved < 1.35 * stream_bytes


# ---- stream embeddings: learned per-stream offsets added as the embedding is expanded


def embed_reference(x, offsets):
  """lucidrains' `StreamEmbed(expand_to_streams=True)`: copies of x, stream s plus row s."""
  return x[..., None, :] + offsets


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embed_streams_values_and_gradients_match_float64(dtype):
  x, offsets = random(30, (2, 3, C)).astype(dtype), random(31, (N, C))
  out, pullback = jax.vjp(mhc_jax.embed_streams, x, offsets)
  cotangent = random(32, out.shape).astype(dtype)
  grads = pullback(cotangent)
  with jax.enable_x64(True):
    to64 = lambda a: jnp.asarray(a, jnp.float64)
    ref, ref_pullback = jax.vjp(embed_reference, to64(x), to64(offsets))
    ref_grads = ref_pullback(to64(cotangent))  # d x: the sum over streams; d offsets: tokens
  assert out.dtype == dtype and out.shape == (2, 3, N, C)
  assert grads[0].dtype == dtype and grads[1].dtype == jnp.float32
  if dtype == jnp.float32:  # one float32 addition: the float64 sum, rounded once
    np.testing.assert_array_equal(out, ref.astype(jnp.float32))
  else:
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=2**-8)
  assert rel_err(grads[1], ref_grads[1]) < 1e-6
  assert rel_err(grads[0], ref_grads[0]) < (1e-6 if dtype == jnp.float32 else 2**-8)


def test_embed_streams_at_zero_offsets_is_expand_streams():
  x = random(33, (5, C)).astype(jnp.bfloat16)
  np.testing.assert_array_equal(mhc_jax.embed_streams(x, jnp.zeros((N, C))),
                                mhc_jax.expand_streams(x, N))


@pytest.mark.parametrize("offsets", [jnp.zeros((C,)), jnp.zeros((N, C + 1)),
                                     jnp.zeros((1, N, C))])
def test_embed_streams_names_offsets_of_the_wrong_shape(offsets):
  with pytest.raises(ValueError, match=r"offsets must have shape \[num_streams, dim=8\]"):
    mhc_jax.embed_streams(jnp.zeros((2, C)), offsets)


def test_stream_embedding_modules_start_at_zero_agree_and_are_not_decayed():
  from mhc_jax.lm.optimizer import decay_mask  # the LM's rule: matrices decay unless tagged
  module = mhc_jax.StreamEmbedding(N, C)
  np.testing.assert_array_equal(module.offsets[...], np.zeros((N, C)))  # lucidrains' start
  module.offsets[...] = random(34, (N, C))
  x = random(35, (2, 3, C))
  linen_module = mhc_jax.linen.StreamEmbedding(module.config)
  fresh = linen_module.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, fresh) == {"params": {"offsets": (N, C)}}
  np.testing.assert_array_equal(fresh["params"]["offsets"], np.zeros((N, C)))
  np.testing.assert_array_equal(linen_module.apply({"params": {"offsets": module.offsets[...]}}, x),
                                module(x))
  assert decay_mask(nnx.state(module)) == {"offsets": False}
  untagged = nnx.Param(jnp.zeros((N, C)))  # what the tag changes
  assert decay_mask(nnx.State({"offsets": untagged})) == {"offsets": True}


def test_offsets_learn_from_zero_and_set_the_streams_apart():
  embed = mhc_jax.StreamEmbedding(N, C)
  sites = [mhc_jax.ManifoldHyperConnection(N, C, layer_index=i, rngs=nnx.Rngs(i))
           for i in range(2)]
  x, target = random(36, (8, C)), random(37, (8, C))

  def loss(offsets):
    streams = mhc_jax.embed_streams(x, offsets)
    for site in sites:
      streams = site(streams, jnp.tanh)
    return jnp.mean((mhc_jax.reduce_streams(streams) - target) ** 2)

  grad = jax.grad(loss)(embed.offsets[...])
  # Each stream its own gradient (H_pre favours one stream per layer), so a step leaves
  # the streams distinct.
  assert np.min(np.linalg.norm(grad, axis=-1)) > 1e-4
  assert np.min(np.linalg.norm(grad[:, None] - grad[None, :], axis=-1)[~np.eye(N, dtype=bool)]) \
      > 1e-5


def test_mean_streams_is_the_float32_mean_over_the_stream_axis():
  x = jax.random.normal(jax.random.key(9), (2, 3, 4, 8), jnp.bfloat16)
  got = mean_streams(x)
  expected = np.asarray(x, np.float64).mean(axis=-2)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 3, 8)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=8e-3)
  # Equal copies give back the one stream, bit for bit.
  one = x[..., 0, :]
  np.testing.assert_array_equal(mean_streams(jnp.broadcast_to(one[..., None, :], x.shape)), one)
