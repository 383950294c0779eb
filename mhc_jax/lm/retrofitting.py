"""Turn a trained pre-norm `Transformer` into a hyper-connection one that computes the same
logits, so fine-tuning starts from the pretrained function rather than from a perturbed one.

    model = retrofit(load_hf_checkpoint(path), "mhc", num_streams=4)

The construction rests on one invariant: the `n` streams stay equal, each the pre-norm
model's residual `h`. A site computes `X' = H_res X + H_postᵀ F(H_pre X)`; with every stream
equal to `h` that is `h + F(h)` on every stream, the pre-norm update, whenever

    sum_i H_pre_i = 1          the branch reads `h` itself (not a multiple: the block's norm
                               would remove the scale but not its eps)
    H_post_k = 1               every stream receives `F` once
    rows of H_res sum to 1     `H_res` maps equal streams to themselves, whatever it mixes

The streams enter as copies of the embedding (`expand_streams`), so the invariant holds at
every site, and the model ends with `stream_reduction="mean"`: the mean of `n` equal streams
is `h`, so the final norm sees what it saw before, eps included. (The default sum would give
`n h`, and `RMSNorm(n h)` differs from `RMSNorm(h)` by the eps term; scaling the final norm's
eps by n² would also be exact, but would change a pretrained hyper-parameter, and the mean
keeps the read-out's input at the pretrained scale.)

How each variant meets the three conditions:

  hc        The paper's own start already does, exactly: `A_m` one-hot (sums to 1), `B = 1`,
            `A_r = I`, dynamic weights `W = 0` so the `s·tanh(X̄ W)` terms are 0. Step 1
            moves every parameter but `s_α`, `s_β` and `norm_scale`, the other factors of a
            product with `W`; they move from step 2, once `W` has.
  mhc,      `alpha_pre = alpha_post = 0`, so `H_pre`, `H_post` start static (with the
  mhc_lite  random `phi` kept, `alpha` gets a gradient at step 1 and `phi`'s pre and post
            columns from step 2: the LoRA-style pair). `H_post = 2σ(0) = 1` (bias 0).
            `H_pre = σ(bias_pre)` is `2/(n+1)` at stream `layer mod n` and `1/(n+1)`
            elsewhere: sums to 1, and unequal, like the paper's one-hot, so the streams'
            gradients differ from the first step and they do not stay copies of each other.
            `H_res` keeps the project's start (identity weight 0.95, `alpha_res = 0.01`):
            Sinkhorn's last step normalises rows, and a mixture of permutations is doubly
            stochastic, so rows sum to 1 to float32 rounding whatever `H_res` is. No logit
            gap has to push `H_res` towards I, which is what would cost the gradient: an
            off-diagonal below float32 rounding needs a gap above ln(2²⁴) ≈ 17, where
            `H(1-H)` ≈ 6e-8 scales every `H_res` gradient below Adam's eps (1e-8), so Adam's
            normalisation could not revive it and `H_res` would stay frozen.

The `H_res` gradient (and `alpha_res`'s) is zero, up to rounding, while the streams are equal:
mixing copies changes nothing. Step 1 makes them differ (the unequal `H_pre` gives each
stream's `H_post` its own gradient), so `H_res` learns from step 2 on, in every site but the
first: its input is always the copied embedding, so its `H_res` never matters, in a model
trained from scratch as well.

Equality of the logits is to float32 rounding: `sigmoid(logit(w))` and Sinkhorn's row sums
are 1 to an ulp, not exactly.
"""

import dataclasses

from flax import nnx

from mhc_jax.lm.model import (SITES, ModelConfig, Transformer, block_params, blocks_in_layout,
                              from_blocks, outer_params, site_stream)
from mhc_jax.lm.residuals import RESIDUALS, with_residual
from mhc_jax.modules import StreamEmbedding

# Every stream variant: each site config knows its pass-through start (`passthrough_params`).
RETROFIT_RESIDUALS = tuple(name for name, entry in RESIDUALS.items()
                           if entry.uses_streams and entry.retrofits)


def retrofit_config(cfg: ModelConfig, residual: str, *, stream_embed: bool = False,
                    **settings) -> ModelConfig:
  """The config of the retrofitted model: `cfg` as variant `residual` with its `settings`
  (the variant's defaults but those given: `num_streams=4`), averaged at the end, with a
  stream embedding (starting at zero) if `stream_embed`."""
  if cfg.residual != "prenorm":
    raise ValueError(f"retrofit needs a prenorm model, got residual={cfg.residual!r}")
  if residual not in RETROFIT_RESIDUALS:
    raise ValueError(f"retrofit residual must be one of {', '.join(RETROFIT_RESIDUALS)}; got "
                     f"{residual!r}")
  widened = dataclasses.replace(with_residual(cfg, residual, **settings),
                                stream_reduction="mean", stream_embed=stream_embed)
  fractions = getattr(widened.residual_settings, "num_fracs", 1)
  if widened.num_streams * fractions < 2:
    raise ValueError(f"retrofit needs num_streams * num_fracs >= 2 (one stream of one fraction "
                     f"is the pre-norm model), got num_streams={widened.num_streams}, "
                     f"num_fracs={fractions}")
  return widened


def with_sites(cfg: ModelConfig, blocks: dict, rngs: nnx.Rngs) -> dict:
  """Pre-norm blocks' parameters in `cfg`'s layout (`block_params`) -> the same blocks, their
  arrays as they are (no copy), with the sites of `cfg` (a `retrofit_config`) added, started
  so that equal streams pass through as a pre-norm residual (the site config's
  `passthrough_params`). The sites' random parameters (mHC's `phi`) are those a fresh model
  of `cfg` draws from `rngs` (its `site_stream`), layer by layer."""
  residual = RESIDUALS[cfg.residual]
  rngs = site_stream(rngs)
  sites = []
  for layer in range(cfg.num_layers):
    made = {name: residual.make_site(cfg, 2 * layer + i, rngs) for i, name in enumerate(SITES)}
    sites.append({name: site.config.passthrough_params(nnx.to_pure_dict(nnx.state(site, nnx.Param)))
                  for name, site in made.items()})
  if cfg.scan_layers:
    return {**blocks, **blocks_in_layout(sites, scan_layers=True)}
  return {layer: {**blocks[layer], **sites[layer]} for layer in range(cfg.num_layers)}


def with_stream_embedding(cfg: ModelConfig, outer: dict) -> dict:
  """The pre-norm model's parameters outside the blocks (`outer_params`), with the stream
  embedding's offsets at zero where `cfg` has one: the streams start as equal copies."""
  if not cfg.stream_embed:
    return outer
  return {**outer, "stream_embed": nnx.to_pure_dict(nnx.state(
      StreamEmbedding(cfg.num_streams, cfg.d_model), nnx.Param))}


def retrofit(model: Transformer, residual: str, *, num_streams: int | None = None,
             stream_embed: bool = False, rngs: nnx.Rngs | None = None,
             **settings) -> Transformer:
  """A pre-norm `model` -> a new `Transformer` with `residual` (any of `RETROFIT_RESIDUALS`)
  over `num_streams` streams (None: the variant's default, 4 for mhc) and the variant's other
  `settings` (its defaults otherwise), with a stream embedding if `stream_embed`,
  the same block, embedding and norm weights, and sites that start so the logits
  `[batch, seq, vocab]` are the pre-norm model's. `rngs` draws the sites' random parameters
  (mHC's `phi`; default `nnx.Rngs(0)`). Either layer layout."""
  cfg = retrofit_config(model.cfg, residual, num_streams=num_streams,
                        stream_embed=stream_embed, **settings)
  blocks = with_sites(cfg, block_params(model), rngs or nnx.Rngs(0))
  # The pre-norm arrays, not copies.
  return from_blocks(cfg, with_stream_embedding(cfg, outer_params(model)), blocks)
