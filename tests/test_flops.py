"""Model FLOPs against XLA's own count, the peak table, and the throughput a run logs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.flops import model_flops_per_token, peak_flops_per_device, throughput
from mhc_jax.lm.metrics import read_metrics
from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train import LoopConfig, train

BATCH, SEQ = 2, 64
# Wide enough that matmuls dominate. Unrolled layers: XLA counts a while loop's body once.
WIDE = dict(d_model=256, num_layers=2, num_heads=4, mlp_dim=1024, scan_layers=False)
# XLA counts every op: what we count plus the elementwise work we leave out. That is under 1%
# of this model (norms, softmax, RoPE on d = 256 against matmuls on d x 1024), so 2%.
TOTAL_TOLERANCE = 0.02
# The streams' share alone (variant minus prenorm) has n-wide elementwise work (RMS of the
# streams, tanh / sigmoid, Sinkhorn) against matmuls only n = 4 deep: measured +4% for mHC
# and mHC-lite, +24% for dynamic HC, whose norm and tanh run on every stream. Bounds sit a few
# points above, below what dropping the n^2 C mixing or the n C pre/post terms adds. Every
# registered stream variant is checked; one not listed gets mHC's bound.
STREAMS_TOLERANCE = {"hc": 0.3}
STREAM_VARIANTS = [name for name, entry in RESIDUALS.items() if entry.uses_streams]


def xla_forward_flops(cfg: ModelConfig) -> float:
  graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
  cost = forward.lower(state, tokens).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def analytic_forward_flops(cfg: ModelConfig) -> float:
  return model_flops_per_token(cfg, SEQ) / 3 * BATCH * SEQ


@pytest.fixture(scope="module")
def prenorm_flops():
  cfg = ModelConfig(**WIDE)
  return xla_forward_flops(cfg), analytic_forward_flops(cfg)


def test_prenorm_forward_flops_match_xla(prenorm_flops):
  xla, ours = prenorm_flops
  assert ours <= xla <= ours * (1 + TOTAL_TOLERANCE), xla / ours


@pytest.mark.parametrize("residual", [name for name in RESIDUALS if name != "prenorm"])
def test_every_variants_forward_flops_match_xla(prenorm_flops, residual):
  cfg = ModelConfig(residual=residual, **WIDE)
  xla, ours = xla_forward_flops(cfg), analytic_forward_flops(cfg)
  assert ours <= xla <= ours * (1 + TOTAL_TOLERANCE), xla / ours
  if residual in STREAM_VARIANTS:
    streams_xla, streams_ours = xla - prenorm_flops[0], ours - prenorm_flops[1]
    tolerance = STREAMS_TOLERANCE.get(residual, 0.08)
    assert streams_ours <= streams_xla <= streams_ours * (1 + tolerance), \
        streams_xla / streams_ours


def test_model_flops_ignore_how_the_program_runs():
  cfg = ModelConfig(residual="mhc")
  assert model_flops_per_token(cfg, 128) == model_flops_per_token(
      ModelConfig(residual="mhc", scan_layers=False, remat="full"), 128)
  # Attention is the one term that grows with the context: 12 L H Q per extra position.
  assert model_flops_per_token(cfg, 129) - model_flops_per_token(cfg, 128) == \
      12 * cfg.num_layers * cfg.d_model


@pytest.mark.parametrize("kind, tflops", [
    ("TPU v4", 275), ("TPU v4 lite", 138), ("TPU v5 lite", 197), ("TPU v5", 459),
    ("TPU v6 lite", 918), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-40GB", 312), ("NVIDIA B200", 2250),
])
def test_peak_flops_take_the_longest_matching_device_kind(kind, tflops):
  assert peak_flops_per_device(kind) == tflops * 1e12


def test_unknown_devices_have_no_peak_and_no_mfu():
  assert peak_flops_per_device("cpu") is None
  # 1 GFLOP/token x 2000 tokens/s over 2 devices: 1 TFLOP/s each, a quarter of 4.
  assert throughput(1e9, 2e3, 2, None) == {"tflops_per_device": 1.0}
  assert throughput(1e9, 2e3, 2, 4e12) == {"tflops_per_device": 1.0, "mfu": 0.25}


def test_logged_rows_carry_throughput_per_device(tmp_path, corpus, capsys):
  model = ModelConfig(residual="mhc", d_model=32, num_layers=2, num_heads=4, mlp_dim=64)
  data = DataConfig(source=corpus, seq_len=32, batch_size=8)
  train(str(tmp_path), model=model, data=data, mesh=MeshConfig(data=2),
        loop=LoopConfig(steps=3, eval_every=3, eval_batches=1, checkpoint_every=1000,
                        log_every=1, sample_tokens=0),
        devices=jax.devices()[:2], progress=False)
  flops_per_token = model_flops_per_token(model, data.seq_len)
  assert f"{flops_per_token / 1e9:.3g} GFLOP/token" in capsys.readouterr().out
  rows = read_metrics(tmp_path)
  assert [row["step"] for row in rows] == [1, 2, 3]
  for row in rows:  # the global batch's tokens, shared by the 2 devices
    assert row["tflops_per_device"] > 0
    assert row["tflops_per_device"] == pytest.approx(
        flops_per_token * row["tokens_per_sec"] / 2 / 1e12, rel=1e-9)
    assert "mfu" not in row  # no peak is known for CPUs
