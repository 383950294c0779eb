"""The training loop: sharded == single-device, learning, exact resume, every variant, CLI."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mhc_jax.data import DataConfig
from mhc_jax.metrics import read_metrics
from mhc_jax.model import RESIDUALS, ModelConfig
from mhc_jax.optim import OptimizerConfig
from mhc_jax.sharding import MeshConfig
from mhc_jax.train import LoopConfig, NonFiniteError, train
from mhc_jax.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_model(**overrides):
  return ModelConfig(**{"d_model": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64,
                        **overrides})


def run(workdir, corpus, *, steps, model=None, mesh=MeshConfig(), devices=None, **kwargs):
  return train(
      str(workdir), model=model or tiny_model(),
      data=DataConfig(source=corpus, seq_len=32, batch_size=8),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
      mesh=mesh, loop=LoopConfig(steps=steps, eval_every=steps, eval_batches=2,
                                 checkpoint_every=1000, log_every=1),
      devices=devices or jax.devices()[:int(np.prod(mesh.shape))], progress=False,
      **{"sample_tokens": 0, **kwargs})


def losses(history):
  return np.array([row["train_loss"] for row in history])


def test_sharded_mesh_matches_single_device(tmp_path, corpus):
  assert len(jax.devices()) == 8
  model = tiny_model(residual="mhc")
  single = run(tmp_path / "one", corpus, steps=4, model=model, devices=jax.devices()[:1])
  sharded = run(tmp_path / "eight", corpus, steps=4, model=model,
                mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)
  np.testing.assert_allclose(sharded[-1]["eval_loss"], single[-1]["eval_loss"], rtol=1e-5)


def test_loss_falls(tmp_path, corpus):
  history = run(tmp_path, corpus, steps=100)
  assert losses(history)[:5].mean() - losses(history)[-5:].mean() > 2.5
  assert history[-1]["eval_loss"] < 3.0  # uniform over 258 bytes would be 5.55


@pytest.mark.parametrize("scan_layers", [True, False])
def test_resume_is_bitwise_identical(tmp_path, corpus, scan_layers):
  model = tiny_model(residual="mhc", scan_layers=scan_layers)
  straight = run(tmp_path / "straight", corpus, steps=6, model=model)
  first = run(tmp_path / "resumed", corpus, steps=6, model=model, stop_after_step=3)
  assert [row["step"] for row in first] == [1, 2, 3]
  second = run(tmp_path / "resumed", corpus, steps=6, model=model)
  assert [row["step"] for row in second] == [4, 5, 6]
  np.testing.assert_array_equal(losses(first + second), losses(straight))
  logged = read_metrics(tmp_path / "resumed")
  assert [row["step"] for row in logged] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("residual", RESIDUALS)
def test_every_residual_variant_trains_without_nan(tmp_path, corpus, residual):
  history = run(tmp_path, corpus, steps=3, model=tiny_model(residual=residual, dtype="bfloat16"))
  assert np.all(np.isfinite(losses(history))) and np.isfinite(history[-1]["eval_loss"])
  assert all(np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in history)


def cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "mhc_jax.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_trains_and_writes_its_workdir(tmp_path, corpus):
  proc = cli("--gin_file", "shakespeare_tiny.gin", "--gin_param", f"DataConfig.source = '{corpus}'",
             "--gin_param", "LoopConfig.steps = 4", "--gin_param", "LoopConfig.eval_every = 2",
             "--gin_param", "DataConfig.seq_len = 32", "--gin_param", "train.sample_tokens = 5",
             "--workdir", "relative/workdir", cwd=tmp_path)  # from outside the repo
  tmp_path = tmp_path / "relative/workdir"
  assert proc.returncode == 0, proc.stderr
  assert "parameters" in proc.stdout and "sample after 4 steps" in proc.stdout
  assert [row["step"] for row in read_metrics(tmp_path)] == [2, 4]
  assert "LoopConfig.steps = 4" in (tmp_path / "config.gin").read_text()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("args, culprit", [
    (["--gin_param", "NoSuchThing.value = 3"], "NoSuchThing"),
    (["--gin_param", "ModelConfig.no_such_field = 3"], "no_such_field"),
    (["--gin_param", "ModelConfig.d_model = (("], "ModelConfig.d_model"),
    (["--gin_file", "no_such_file.gin"], "no_such_file.gin"),
])
def test_cli_bad_config_is_one_line_and_exit_code_2(tmp_path, args, culprit):
  proc = cli(*args, "--workdir", str(tmp_path))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and culprit in lines[0], proc.stderr


def test_tpu_pod_config_lowers_on_256_abstract_devices():
  code = """
import jax
jax.config.update("jax_num_cpu_devices", 256)
import gin
from mhc_jax import train as t
gin.add_config_file_search_path(str(t.GIN_CONFIG_DIR))
gin.parse_config_file("tpu_pod_mhc.gin")
cfg = gin.get_bindings("train")
trainer = t.Trainer(cfg["model"], cfg["optimizer"], cfg["mesh"], cfg["loop"],
                    cfg["data"].batch_size)
lowered = trainer.lower_train_step(cfg["data"].seq_len, cfg["data"].batch_size)
print(trainer.num_params, dict(trainer.mesh.shape), len(lowered.as_text()) > 0)
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  num_params, mesh, lowered = proc.stdout.split(" ", 1)[0], proc.stdout, proc.stdout
  assert 300e6 < int(num_params) < 500e6
  assert "'data': 16, 'fsdp': 8, 'tensor': 2" in mesh and lowered.strip().endswith("True")


def test_pallas_sinkhorn_in_a_sharded_train_step_matches_xla():
  """The model's Sinkhorn as a Pallas kernel (interpret mode here) split per shard over a
  (2, 2, 2) mesh trains exactly like the XLA path."""
  # The train step alone, as small as the mesh allows: compiling is most of the time, and
  # the loop around the step (data, eval, checkpoints) has nothing to do with the kernel.
  model = dict(residual="mhc", num_layers=1, d_model=8, num_heads=2, mlp_dim=8, num_streams=2,
               sinkhorn_iters=2, remat="none")
  tokens = np.random.default_rng(0).integers(0, 258, (4, 9), np.int32)
  trainers = {backend: Trainer(tiny_model(**model, sinkhorn_backend=backend),
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


def test_diagnostics_come_from_the_training_forward_pass(tmp_path, corpus):
  loop = LoopConfig(steps=4, eval_every=4, eval_batches=1, checkpoint_every=1000, log_every=4,
                    diagnostics_every=2)
  for residual, bounded in (("mhc", True), ("hc", False)):
    history = train(str(tmp_path / residual), model=tiny_model(residual=residual),
                    data=DataConfig(source=corpus, seq_len=32, batch_size=8), loop=loop,
                    devices=jax.devices()[:1], progress=False, sample_tokens=0)
    assert [row["step"] for row in history] == [2, 4]
    row = history[-1]
    sublayers = [k for k in row if k.startswith("forward_gain/") and k != "forward_gain/max"]
    assert len(sublayers) == 4  # 2 layers x (attention, MLP)
    if bounded:  # rows of a Sinkhorn output sum to 1 exactly, and so do their products
      assert abs(row["forward_gain/max"] - 1) < 1e-5
      assert abs(row["composite_forward_gain/max"] - 1) < 1e-4
      assert row["doubly_stochastic_error/max"] < 0.05
    else:
      assert row["forward_gain/max"] > 0 and np.isfinite(row["composite_backward_gain/03"])


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_updates_are_never_applied_or_saved(tmp_path, corpus, policy):
  kwargs = dict(model=tiny_model(), data=DataConfig(source=corpus, seq_len=32, batch_size=8),
                optimizer=OptimizerConfig(learning_rate=float("inf"), warmup_steps=0),
                loop=LoopConfig(steps=3, eval_every=3, eval_batches=1, checkpoint_every=1,
                                log_every=1, nonfinite=policy),
                devices=jax.devices()[:1], progress=False, sample_tokens=0)
  if policy == "stop":
    with pytest.raises(NonFiniteError, match=r"non-finite parameters at step 1; .* step 0\)"):
      train(str(tmp_path), **kwargs)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))
    return
  history = train(str(tmp_path), **kwargs)
  assert [row["skipped_steps"] for row in history] == [1, 2, 3]
  assert np.isfinite(history[-1]["eval_loss"])


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
