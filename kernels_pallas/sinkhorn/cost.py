"""What a Pallas Sinkhorn call costs, told to XLA so it schedules around the call."""

from jax.experimental import pallas as pl


def cost_estimate(n: int, num_tokens: int, num_iters: int, backward: bool) -> pl.CostEstimate:
  """Rough flop/transcendental/byte counts of one forward or backward kernel call on
  `(n, n, num_tokens)` logits."""
  per_iter = 4 * n * n + 2 * n  # two normalisations: adds, multiplies, reciprocals
  flops = num_tokens * per_iter * num_iters * (4 if backward else 1)
  transcendentals = num_tokens * 5 * n * n * (2 if backward else 1)
  arrays = 3 if backward else 2
  return pl.CostEstimate(
      flops=flops, transcendentals=transcendentals,
      bytes_accessed=arrays * 4 * n * n * num_tokens)
