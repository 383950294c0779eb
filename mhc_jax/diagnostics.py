"""Stability diagnostics of hyper-connections (mHC paper, "Amax Gain Magnitude").

For a mixing matrix `M` (one `H_res`, or the composite product over consecutive layers):
forward gain `max_i |sum_j M_ij|` (largest absolute row sum), backward gain
`max_j |sum_i M_ij|` (largest absolute column sum). Doubly-stochastic matrices have both
gains exactly 1, and so do products of them. Per-token matrices `[..., n, n]` give per-token
gains; reduce over tokens with `jnp.max` for the paper's "Amax".
"""

import jax
import jax.numpy as jnp


def forward_gain(m: jax.Array) -> jax.Array:
  """`[..., n, n]` -> `[...]`: largest absolute row sum."""
  return jnp.max(jnp.abs(jnp.sum(m, axis=-1)), axis=-1)


def backward_gain(m: jax.Array) -> jax.Array:
  """`[..., n, n]` -> `[...]`: largest absolute column sum."""
  return jnp.max(jnp.abs(jnp.sum(m, axis=-2)), axis=-1)


def composite_products(h_res_per_layer: jax.Array) -> jax.Array:
  """`[L, ..., n, n]` -> `[L, ..., n, n]`: entry l is `H_l @ ... @ H_1 @ H_0`, the map from
  the first layer's input streams to layer l's output streams."""

  def step(product, h):
    product = jnp.einsum("...ij,...jk->...ik", h, product, precision=jax.lax.Precision.HIGHEST)
    return product, product

  eye = jnp.broadcast_to(jnp.eye(h_res_per_layer.shape[-1], dtype=h_res_per_layer.dtype),
                         h_res_per_layer.shape[1:])
  return jax.lax.scan(step, eye, h_res_per_layer)[1]


def doubly_stochastic_error(m: jax.Array) -> jax.Array:
  """`[..., n, n]` -> `[...]`: largest deviation of a row or column sum from 1, or of an entry
  below 0."""
  rows = jnp.max(jnp.abs(jnp.sum(m, axis=-1) - 1), axis=-1)
  cols = jnp.max(jnp.abs(jnp.sum(m, axis=-2) - 1), axis=-1)
  negative = jnp.max(jnp.maximum(-m, 0), axis=(-2, -1))
  return jnp.maximum(jnp.maximum(rows, cols), negative)


def gain_summary(h_res_per_layer: jax.Array) -> dict[str, jax.Array]:
  """`[L, ..., n, n]` (per-layer, optionally per-token) -> per-layer `[L]` maxima over tokens
  of the single-layer and composite forward/backward gains, and the doubly-stochastic error."""
  composite = composite_products(h_res_per_layer)
  over_tokens = lambda x: jnp.max(x.reshape(x.shape[0], -1), axis=-1)
  return {
      "forward_gain": over_tokens(forward_gain(h_res_per_layer)),
      "backward_gain": over_tokens(backward_gain(h_res_per_layer)),
      "composite_forward_gain": over_tokens(forward_gain(composite)),
      "composite_backward_gain": over_tokens(backward_gain(composite)),
      "doubly_stochastic_error": over_tokens(doubly_stochastic_error(h_res_per_layer)),
  }


def _unit(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def stream_cosine_similarity(streams: jax.Array) -> jax.Array:
  """`[..., n, C]` -> `[n, n]`: cosine similarity between streams, averaged over tokens."""
  u = _unit(streams)
  sims = jnp.einsum("...ic,...jc->...ij", u, u)
  return jnp.mean(sims.reshape(-1, *sims.shape[-2:]), axis=0)


def layer_cosine_similarity(layer_outputs: jax.Array) -> jax.Array:
  """`[L, ..., C]` (e.g. each layer's output, streams reduced) -> `[L, L]`: cosine similarity
  between layers' outputs, averaged over tokens."""
  u = _unit(layer_outputs).reshape(layer_outputs.shape[0], -1, layer_outputs.shape[-1])
  return jnp.einsum("atc,btc->ab", u, u) / u.shape[1]
