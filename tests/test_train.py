"""The training loop: sharded == single-device, learning, exact resume, every variant, the pod
config lowers, diagnostics from the training pass, non-finite updates never applied."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from experiments.runs import final_params
from mhc_jax.lm import checkpoint
from mhc_jax.lm.data import Corpus, DataConfig
from mhc_jax.lm.metrics import read_metrics
from mhc_jax.lm.residuals import RESIDUALS
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig
from mhc_jax.lm.train import FINISHED, LoopConfig, NonFiniteError, is_finished, train
from mhc_jax.lm.train_state import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_model(**overrides):
  return ModelConfig(**{"d_model": 32, "num_layers": 2, "num_heads": 4, "mlp_dim": 64,
                        **overrides})


def run(workdir, corpus, *, steps, model=None, mesh=MeshConfig(), devices=None,
        stop_after_step=None, diagnostics_every=0):
  return train(
      str(workdir), model=model or tiny_model(),
      data=DataConfig(source=corpus, seq_len=32, batch_size=8),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
      mesh=mesh, loop=LoopConfig(steps=steps, eval_every=steps, eval_batches=2,
                                 checkpoint_every=1000, log_every=1, sample_tokens=0,
                                 stop_after_step=stop_after_step,
                                 diagnostics_every=diagnostics_every),
      devices=devices or jax.devices()[:int(np.prod(mesh.shape))], progress=False)


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
def test_every_residual_variant_trains_resumes_bitwise_and_logs_its_gains(tmp_path, corpus,
                                                                         residual):
  model = tiny_model(residual=residual, dtype="bfloat16")
  straight = run(tmp_path / "straight", corpus, steps=4, model=model, diagnostics_every=2)
  assert np.all(np.isfinite(losses(straight))) and np.isfinite(straight[-1]["eval_loss"])
  assert all(np.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in straight)
  first = run(tmp_path / "resumed", corpus, steps=4, model=model, diagnostics_every=2,
              stop_after_step=2)
  second = run(tmp_path / "resumed", corpus, steps=4, model=model, diagnostics_every=2)
  np.testing.assert_array_equal(losses(first + second), losses(straight))
  gains = {name: value for name, value in straight[-1].items() if "gain/" in name}
  if RESIDUALS[residual].uses_streams:  # 2 layers x (attention, MLP), and their max
    per_sublayer = [gains[f"composite_forward_gain/{i:02d}"] for i in range(4)]
    assert np.all(np.isfinite(per_sublayer)) and max(per_sublayer) == \
        gains["composite_forward_gain/max"]
  else:
    assert not gains


def test_tpu_pod_config_lowers_on_256_abstract_devices():
  code = r"""
import json
import re
import jax
jax.config.update("jax_num_cpu_devices", 256)
from mhc_jax.lm import presets
from mhc_jax.lm.train_state import Trainer
cfg, _ = presets.parse(["tpu_pod_mhc.gin"])
trainer = Trainer(cfg["model"], cfg["optimizer"], cfg["mesh"], cfg["loop"],
                  cfg["data"].batch_size)
lowered = trainer.lower_train_step(cfg["data"].seq_len, cfg["data"].batch_size).as_text()
partitions = re.findall(r"mhlo\.num_partitions = (\d+)", lowered)
print(json.dumps({"num_params": trainer.num_params, "mesh": dict(trainer.mesh.shape),
                  "partitions": partitions}))
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lowered = json.loads(proc.stdout.strip().splitlines()[-1])
  assert 300e6 < lowered["num_params"] < 500e6
  assert lowered["mesh"] == {"data": 16, "fsdp": 8, "tensor": 2}
  assert lowered["partitions"] == ["256"]  # one SPMD program over every device of the pod


def test_diagnostics_come_from_the_training_forward_pass(tmp_path, corpus):
  """HC's unconstrained gains, per sub-layer; mHC's bounded ones are checked in
  test_train_state.py's run, which logs diagnostics too."""
  loop = LoopConfig(steps=4, eval_every=4, eval_batches=1, checkpoint_every=1000, log_every=4,
                    diagnostics_every=2, sample_tokens=0)
  history = train(str(tmp_path), model=tiny_model(residual="hc"),
                  data=DataConfig(source=corpus, seq_len=32, batch_size=8), loop=loop,
                  devices=jax.devices()[:1], progress=False)
  assert [row["step"] for row in history] == [2, 4]
  row = history[-1]  # at step 2 every H_res is still exactly HC's initial one
  for name in ("forward_gain", "backward_gain", "composite_forward_gain",
               "composite_backward_gain", "doubly_stochastic_error"):
    per_sublayer = [row[f"{name}/{i:02d}"] for i in range(4)]  # 2 layers x (attention, MLP)
    assert all(np.isfinite(per_sublayer)) and f"{name}/04" not in row
    assert min(per_sublayer) < max(per_sublayer) == row[f"{name}/max"]
  # The composite over the first sub-layer is that sub-layer's H_res alone.
  assert row["composite_forward_gain/00"] == row["forward_gain/00"]
  assert row["composite_backward_gain/00"] == row["backward_gain/00"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_updates_are_never_applied_or_saved(tmp_path, corpus, policy):
  kwargs = dict(model=tiny_model(), data=DataConfig(source=corpus, seq_len=32, batch_size=8),
                optimizer=OptimizerConfig(learning_rate=float("inf"), warmup_steps=0),
                loop=LoopConfig(steps=3, eval_every=3, eval_batches=1, checkpoint_every=1,
                                log_every=1, nonfinite=policy, sample_tokens=0),
                devices=jax.devices()[:1], progress=False)
  if policy == "stop":
    with pytest.raises(NonFiniteError, match=r"non-finite parameters at step 1; .* step 0\)"):
      train(str(tmp_path), **kwargs)
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))
    return
  history = train(str(tmp_path), **kwargs)
  assert [row["skipped_steps"] for row in history] == [1, 2, 3]
  assert np.isfinite(history[-1]["eval_loss"])


def test_finished_means_the_marker_and_a_checkpoint_of_the_last_step(tmp_path, corpus):
  """What sweeps and comparisons reuse: the run's own marker, not their own reading."""
  run(tmp_path, corpus, steps=2)
  assert is_finished(tmp_path, 2) and is_finished(tmp_path, 1) and not is_finished(tmp_path, 3)
  (tmp_path / FINISHED).unlink()  # as if killed after the last checkpoint, before the marker
  assert not is_finished(tmp_path, 2)
  assert run(tmp_path, corpus, steps=2) == []  # nothing left to train, yet it is marked
  assert is_finished(tmp_path, 2)
  shutil.rmtree(tmp_path / "checkpoints" / "2")  # without it, the run redoes its last step
  assert not is_finished(tmp_path, 2)


def sigterm_during_the_save_of(step: int, monkeypatch) -> None:
  """Sends this process a SIGTERM while step `step`'s checkpoint is being saved: after the
  loop has read its stop flag for that step, as a signal landing during a step does."""
  save = checkpoint.save

  def signalling_save(manager, at, *args):
    if at == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return save(manager, at, *args)

  monkeypatch.setattr(checkpoint, "save", signalling_save)


def test_a_signal_during_the_last_step_leaves_the_run_finished(tmp_path, corpus, monkeypatch,
                                                               capsys):
  """The last step is saved whatever comes: a SIGTERM then has nothing left to stop, so the
  run is marked finished (not left for the next start to redo) and says nothing of resuming;
  SIGTERM's own handler is back afterwards."""
  before = signal.getsignal(signal.SIGTERM)
  sigterm_during_the_save_of(3, monkeypatch)
  assert [row["step"] for row in run(tmp_path, corpus, steps=3)] == [1, 2, 3]
  assert is_finished(tmp_path, 3)
  assert "received" not in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is before


def direct_loss(model, windows):
  """Mean next-token cross entropy over every window, log-softmax in float64 numpy."""
  logits = np.asarray(model(jnp.asarray(windows[:, :-1])), np.float64)
  logprobs = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  return -np.take_along_axis(logprobs, windows[:, 1:, None], axis=-1).mean()


def test_final_eval_is_over_every_validation_window_and_logged_apart(tmp_path, corpus):
  """The last step scores the whole validation split (sharded over 2 devices, the last
  batch padded), the steps before it a fixed subset; both equal a direct float64 count."""
  data = DataConfig(source=corpus, seq_len=32, batch_size=8)
  loaded = Corpus(data)
  windows = loaded.validation_windows
  assert len(windows) % 8 and len(windows) > 2 * 8  # eval_batches=2 is a strict subset
  run(tmp_path, corpus, steps=2, mesh=MeshConfig(data=2))
  row = json.loads((tmp_path / FINISHED).read_text())
  assert read_metrics(tmp_path)[-1] == row
  trainer = Trainer(tiny_model(), OptimizerConfig(), MeshConfig(data=2), LoopConfig(steps=2),
                    batch_size=8, devices=jax.devices()[:2])
  model = nnx.merge(trainer.graphdef, final_params(trainer, tmp_path, 2))
  np.testing.assert_allclose(row["final_eval_loss"], direct_loss(model, windows), rtol=1e-5)
  subset = loaded.eval_batches(max_windows=2 * 8).indices
  np.testing.assert_allclose(row["eval_loss"], direct_loss(model, windows[subset]), rtol=1e-5)
  assert abs(row["final_eval_loss"] - row["eval_loss"]) > 1e-4  # different windows
  assert {k: row[k] for k in ("unigram_loss", "bigram_loss")} == loaded.reference_losses()
