"""Model FLOPs per token and the peak FLOP/s of accelerators, for throughput and MFU.

Model FLOPs count the work the model needs, not what the program runs: recomputation under
remat and the implementation of attention do not change them, so MFU compares fairly across
those settings and across residual variants.
"""

from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.residuals import RESIDUALS

# Dense bfloat16 peak per device in TFLOP/s, from the vendors' data sheets. Keys are
# prefixes of `jax.Device.device_kind`; the longest that matches wins, so "TPU v5 lite" (v5e)
# is not read as "TPU v5" (v5p), nor an "NVIDIA H100 PCIe" as an SXM "NVIDIA H100 80GB HBM3".
PEAK_BF16_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v4 lite": 138.0,  # v4i
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v6 lite": 918.0,  # v6e, Trillium
    "TPU v6e": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA B200": 2250.0,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bfloat16 peak FLOP/s of one device of `device_kind`; None if not in the table."""
  matches = [prefix for prefix in PEAK_BF16_TFLOPS if device_kind.startswith(prefix)]
  if not matches:
    return None
  return PEAK_BF16_TFLOPS[max(matches, key=len)] * 1e12


def _site_forward_flops(cfg: ModelConfig) -> float:
  """Forward FLOPs per token of one hyper-connection site (n streams of width C): the
  mixing, and the coefficients' matmuls as the variant's site config counts them."""
  site = RESIDUALS[cfg.residual].site(cfg, 0)
  return site.mixing_flops() + site.coefficient_flops()


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward) of `cfg` at `seq_len`.

  PaLM's count (Chowdhery et al. 2022, appendix B), `6 N + 12 L H Q T`, plus the streams:

      N          parameters used in a matmul, once per token: attention q, k, v, o
                 (2 d H Q + 2 d K Q with K kv heads: 4 d^2 for multi-head attention with
                 H Q = d), MLP gate, up, down (3 d m) per layer, and the read-out (d V) even
                 when tied to the embedding; not the embedding lookup, not norm scales
      12 L H Q T attention logits and context over all T positions (L layers, H heads of
                 width Q), causal masking not discounted, as PaLM counts it
      streams    per site (2 per layer), 3x its forward: H_res @ X (2 n^2 C), H_pre @ X and
                 H_post^T F (2 n C each); and the coefficients' matmuls as the site's config
                 counts them (`coefficient_flops`): mHC's phi 2 nC (2n + R) with R res
                 logits, plus its mapping's own (mHC-lite's mixture of n! permutations
                 2 n! n^2, orthostochastic's Newton-Schulz steps; Sinkhorn and KromHC's
                 are elementwise), dynamic HC's W_pre, W_post, W_res on each of the n streams
                 (2 n C (2 + n)); static HC has none

  Left out, as elementwise work: norms, softmax, RoPE, activations, Sinkhorn iterations,
  the tanh / sigmoid of the coefficients, and the loss.
  """
  d, layers = cfg.d_model, cfg.num_layers
  attention_params = 2 * d * cfg.head_dim * (cfg.num_heads + cfg.kv_heads)
  matmul_params = layers * (attention_params + 3 * d * cfg.mlp_dim) + d * cfg.vocab_size
  attention = 12 * layers * cfg.num_heads * cfg.head_dim * seq_len
  streams = 3 * 2 * layers * _site_forward_flops(cfg) if cfg.uses_streams else 0
  return float(6 * matmul_params + attention + streams)


def throughput(flops_per_token: float, tokens_per_sec: float, num_devices: int,
               peak_flops: float | None) -> dict[str, float]:
  """-> `tflops_per_device` achieved, and `mfu` (its fraction of `peak_flops` per device)
  when the peak is known. The peak is bfloat16's, so a float32 run's MFU reads low."""
  achieved = flops_per_token * tokens_per_sec / num_devices
  row = {"tflops_per_device": achieved / 1e12}
  if peak_flops:
    row["mfu"] = achieved / peak_flops
  return row
