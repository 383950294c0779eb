"""`retrofit`: a pre-norm model becomes an HC / mHC / mHC-lite one with the same logits, and
fine-tuning then moves every new parameter."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mhc_jax.lm import ModelConfig, Transformer, retrofit
from mhc_jax.lm.model import layer_params
from mhc_jax.lm.residuals import RESIDUALS as RESIDUAL_TABLE
from mhc_jax.lm.retrofitting import RETROFIT_RESIDUALS
from mhc_jax.mappings import HCConfig, MHCConfig, pre_weights
from mhc_jax.modules import ManifoldHyperConnection
from mhc_jax.lm.train_state import cross_entropy
from random_models import far_from_init

QWEN3 = pathlib.Path(__file__).parent / "fixtures" / "hf" / "qwen3"
RESIDUALS = RETROFIT_RESIDUALS  # every stream variant of the registry
# Which site parameters may wait for step 2 to move: the zero-started factors of a product.
SECOND_STEP = {HCConfig: {"scale_alpha", "scale_beta", "norm_scale"}, MHCConfig: {"phi"}}
VOCAB = 64


@functools.cache  # retrofit and the fine-tuning below leave the source model as it is
def pretrained(source: str, scan_layers: bool) -> Transformer:
  """A pre-norm model with weights far from initialisation: the tiny Qwen3 fixture (q/k norm,
  grouped-query attention, tied), or one of this project's own with large random weights and
  norm scales away from 1 (remat off and 4 Sinkhorn iterations: they only cost compile
  time here)."""
  if source == "hf":
    pytest.importorskip("safetensors")
    from mhc_jax.lm import load_hf_checkpoint
    return load_hf_checkpoint(QWEN3, scan_layers=scan_layers)
  cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                    tie_embeddings=False, scan_layers=scan_layers, remat="none")
  return far_from_init(cfg)


def random_tokens(seed: int, seq: int = 12) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, seq)), jnp.int32)


@functools.cache
def reference_logits(source: str, scan_layers: bool) -> np.ndarray:
  return np.asarray(pretrained(source, scan_layers)(random_tokens(0)))


def assert_same_logits(streams: Transformer, source: str, scan_layers: bool) -> None:
  before, after = reference_logits(source, scan_layers), np.asarray(streams(random_tokens(0)))
  scale = np.abs(before).max()
  # float32 rounding: sigmoid(logit(w)) and Sinkhorn's row sums are 1 to an ulp per site.
  np.testing.assert_allclose(after, before, rtol=0, atol=2e-6 * scale)
  assert scale > 1.0  # a real check, not one of near-zero logits


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_logits_of_a_loaded_model_are_unchanged(residual, scan_layers):
  streams = retrofit(pretrained("hf", scan_layers), residual, num_streams=4)
  assert (streams.cfg.residual, streams.cfg.num_streams, streams.cfg.scan_layers) == (
      residual, 4, scan_layers)
  assert_same_logits(streams, "hf", scan_layers)


def adam_steps(model: Transformer, num_steps: int, lr: float = 1e-2) -> list[dict]:
  """`num_steps` Adam steps on next-token cross entropy over fresh random tokens -> the
  per-layer parameters (`layer_params`) before the first step and after each."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  optimizer = optax.adam(lr)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, tokens):
    def loss(params):
      logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
      return cross_entropy(logits, tokens[:, 1:])
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  history = [layer_params(model)]
  for i in range(num_steps):
    params, opt_state = step(params, opt_state, random_tokens(100 + i, seq=16))
    history.append(layer_params(nnx.merge(graphdef, params, rest)))
  return history


def site_leaves(layers: list[dict]) -> dict[str, np.ndarray]:
  """`layer/site/name` -> array, for every hyper-connection parameter of every sub-layer."""
  return {f"{layer}/{site}/{name}": np.asarray(value)
          for layer, block in enumerate(layers) for site in ("attn_site", "mlp_site")
          for name, value in block[site].items()}


@pytest.mark.parametrize("residual", RESIDUALS)
def test_own_model_keeps_its_logits_then_fine_tuning_moves_every_new_parameter(residual):
  streams = retrofit(pretrained("own", True), residual)
  assert_same_logits(streams, "own", True)
  history = adam_steps(streams, num_steps=3)
  start, first, last = (site_leaves(h) for h in (history[0], history[1], history[-1]))
  stuck = [name for name in start if np.array_equal(start[name], last[name])]
  assert not stuck, f"never moved in 3 steps: {stuck}"
  # Only the zero-started factors of a product may wait for step 2 to move.
  waited = {name.split("/")[-1] for name in start if np.array_equal(start[name], first[name])}
  allowed = SECOND_STEP[type(RESIDUAL_TABLE[residual].site(streams.cfg, 0))]
  assert waited <= allowed, f"still at step 1: {waited - allowed}"


@pytest.mark.parametrize("residual", [name for name in RESIDUALS
                                      if RESIDUAL_TABLE[name].site_module is ManifoldHyperConnection])
def test_mhc_sites_start_static_with_unit_pre_and_post(residual):
  streams = retrofit(pretrained("own", False), residual, num_streams=4)
  site = streams.blocks[1].mlp_site  # sub-layer 3: H_pre's larger weight on stream 3 mod 4
  x = jax.random.normal(jax.random.key(0), (5, 4, 32))
  h_pre, h_post, h_res = site.compute_coefficients(x)
  np.testing.assert_allclose(h_pre, np.broadcast_to(pre_weights(4, 3), (5, 4)), rtol=1e-6)
  np.testing.assert_allclose(h_post, np.ones((5, 4)), rtol=0, atol=0)
  np.testing.assert_allclose(jnp.sum(h_res, -1), np.ones((5, 4)), rtol=1e-6)
  assert pre_weights(3, 3).argmax() == 0 and np.isclose(pre_weights(3, 3).sum(), 1.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"residual": "postnorm"}, f"retrofit residual must be one of {', '.join(RESIDUALS)}; got "
     "'postnorm'"),
    ({"residual": "mhc", "num_streams": 1}, r"retrofit needs num_streams \* num_fracs >= 2 "
     r"\(one stream of one fraction is the pre-norm model\), got num_streams=1, num_fracs=1$"),
])
def test_bad_arguments_are_one_line(kwargs, match):
  model = pretrained("own", True)
  with pytest.raises(ValueError, match=match) as err:
    retrofit(model, **kwargs)
  assert "\n" not in str(err.value)


def test_only_prenorm_models_are_retrofitted():
  model = retrofit(pretrained("own", True), "hc")
  with pytest.raises(ValueError, match="retrofit needs a prenorm model, got residual='hc'"):
    retrofit(model, "mhc")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_retrofit_with_a_stream_embedding_keeps_the_logits(scan_layers):
  streams = retrofit(pretrained("hf", scan_layers), "mhc", stream_embed=True)
  assert streams.cfg.stream_embed and streams.cfg.num_streams == 4
  np.testing.assert_array_equal(streams.stream_embed.offsets[...], np.zeros((4, 32)))
  assert_same_logits(streams, "hf", scan_layers)
