"""mhc_jax.lm.train_state: the compiled steps of one configuration (traced once each, the
Pallas Sinkhorn inside a sharded step, the non-finite guard's compiled size)."""

import dataclasses
import re

import chex
import jax
import numpy as np
import pytest

from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.residuals import MHC
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train import LoopConfig, train
from mhc_jax.lm.train_state import Trainer


def tiny_model(**overrides):
  return ModelConfig(**{"d_model": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64,
                        **overrides})


@pytest.fixture
def traced_once(monkeypatch):
  """Every train step, eval step and train state init may be traced once per Trainer (and
  diagnostics flag): a retrace would recompile the whole model, silently."""
  chex.clear_trace_counter()
  # _train_step: with and without diagnostics. _loss: by each of those and the eval step.
  # _init_state: for its shapes, then for its values.
  for name, traces in (("_train_step", 2), ("_loss", 3), ("_init_state", 2)):
    monkeypatch.setattr(Trainer, name, chex.assert_max_traces(getattr(Trainer, name), traces))
  yield
  chex.clear_trace_counter()


def test_a_run_traces_each_step_once(traced_once, tmp_path, corpus):
  """Steps around evaluations, checkpoints and diagnostics, and the steps after a resume,
  all reuse the programs traced for the first ones; the diagnostics steps log mHC's gains
  from the training forward pass."""
  data = DataConfig(source=corpus, seq_len=16, batch_size=4)
  loop = LoopConfig(steps=6, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1,
                    diagnostics_every=3, sample_tokens=0)
  model = tiny_model(residual="mhc", num_layers=1)
  rows = train(str(tmp_path), model=model, data=data,
               loop=dataclasses.replace(loop, stop_after_step=4), devices=jax.devices()[:1],
               progress=False)
  chex.clear_trace_counter()  # the resumed invocation builds its own Trainer
  rows += train(str(tmp_path), model=model, data=data, loop=loop, devices=jax.devices()[:1],
                progress=False)
  assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
  for row in rows[2], rows[5]:  # the diagnostics steps, before and after the resume
    sublayers = [k for k in row if k.startswith("forward_gain/") and k != "forward_gain/max"]
    assert len(sublayers) == 2  # 1 layer x (attention, MLP)
    # Rows of a Sinkhorn output sum to 1 exactly, and so do their products.
    assert abs(row["forward_gain/max"] - 1) < 1e-5
    assert abs(row["composite_forward_gain/max"] - 1) < 1e-4
    assert row["doubly_stochastic_error/max"] < 0.05


def test_pallas_sinkhorn_in_a_sharded_train_step_matches_xla():
  """The model's Sinkhorn as a Pallas kernel (interpret mode here) split per shard over a
  (2, 2, 2) mesh trains exactly like the XLA path."""
  # The train step alone, as small as the mesh allows: compiling is most of the time, and
  # the loop around the step (data, eval, checkpoints) has nothing to do with the kernel.
  model = dict(num_layers=1, d_model=8, num_heads=2, mlp_dim=8, remat="none")
  tokens = np.random.default_rng(0).integers(0, 258, (4, 9), np.int32)
  settings = lambda backend: MHC(num_streams=2, sinkhorn_iters=2, sinkhorn_backend=backend)
  trainers = {backend: Trainer(tiny_model(**model, residual="mhc",
                                          residual_settings=settings(backend)),
                               OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
                               MeshConfig(data=2, fsdp=2, tensor=2), LoopConfig(steps=2), 4)
              for backend in ("xla", "pallas")}
  initial = trainers["xla"].init_state()  # the same for both: Sinkhorn has no parameters
  metrics = {}
  for backend, trainer in trainers.items():
    batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state, rows = jax.tree.map(lambda x: x.copy(), initial), []  # a copy: the step donates its state
    for _ in range(2):
      state, row = trainer.train_step(state, batch)
      rows.append([row["train_loss"], row["grad_norm"]])
    metrics[backend] = np.array(rows)
  np.testing.assert_allclose(metrics["pallas"], metrics["xla"], rtol=1e-5)


def test_nonfinite_guard_compiles_in_linear_size():
  """Every layer adds as many instructions to the compiled train step as the one before. A
  guard that selects per leaf against one scalar grew quadratically (+27k, then +38k here):
  XLA copied that scalar's computation, which reads every leaf, into every leaf's select."""
  def instructions(num_layers: int) -> int:
    # Unrolled, so that every layer adds its parameters and optimizer state as leaves.
    model = tiny_model(residual="hc", num_layers=num_layers, scan_layers=False, remat="none")
    trainer = Trainer(model, OptimizerConfig(), MeshConfig(), LoopConfig(steps=2), 2,
                      devices=jax.devices()[:1])
    hlo = trainer.lower_train_step(16, 2).compile().as_text()
    return len(re.findall(r"^\s*(?:ROOT )?%?[\w.\-]+ = ", hlo, re.M))

  counts = [instructions(num_layers) for num_layers in (1, 2, 3)]
  second, third = counts[1] - counts[0], counts[2] - counts[1]
  assert abs(third - second) <= 0.05 * second, counts
