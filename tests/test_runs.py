"""What every experiment's run loop (`experiments.runs.train_or_reuse`) does with a signal that
no training step is left to take: it stops the experiment with one line, and the next run
does not start."""

import os
import signal

import pytest

from experiments.runs import Stopped, train_or_reuse
from mhc_jax.lm import train as train_lib
from mhc_jax.lm.data import DataConfig
from mhc_jax.lm.model import ModelConfig
from mhc_jax.lm.optimizer import OptimizerConfig
from mhc_jax.lm.sharding import MeshConfig
from test_train import sigterm_during_the_save_of

STEPS = 3


def tiny_run(workdir, corpus):
  configs = {"model": ModelConfig(d_model=32, num_layers=2, num_heads=4, mlp_dim=64),
             "data": DataConfig(source=corpus, seq_len=32, batch_size=8),
             "optimizer": OptimizerConfig(learning_rate=3e-3, warmup_steps=2),
             "mesh": MeshConfig(),
             "loop": train_lib.LoopConfig(steps=STEPS, eval_every=STEPS, eval_batches=1,
                                          checkpoint_every=1000, log_every=1, sample_tokens=0)}
  return workdir, configs, configs


def test_a_signal_during_a_runs_last_step_stops_before_the_next_run(tmp_path, corpus,
                                                                     monkeypatch):
  first, second = tiny_run(tmp_path / "first", corpus), tiny_run(tmp_path / "second", corpus)
  sigterm_during_the_save_of(STEPS, monkeypatch)
  with pytest.raises(Stopped) as stopped:
    train_or_reuse([first, second], "experiment", progress=False)
  assert str(stopped.value) == ("experiment: SIGTERM received; first is finished and no later "
                                "run started; run the same command to go on")
  assert train_lib.is_finished(tmp_path / "first", STEPS)
  assert not (tmp_path / "second").exists()


def test_a_signal_while_a_finished_run_is_reused_stops_before_the_next_run(tmp_path, corpus,
                                                                          monkeypatch):
  first, second = tiny_run(tmp_path / "first", corpus), tiny_run(tmp_path / "second", corpus)
  train_or_reuse([first], "experiment", progress=False)
  before = signal.getsignal(signal.SIGTERM)
  is_finished = train_lib.is_finished

  def signalling_is_finished(workdir, steps):
    os.kill(os.getpid(), signal.SIGTERM)
    return is_finished(workdir, steps)

  monkeypatch.setattr(train_lib, "is_finished", signalling_is_finished)
  with pytest.raises(Stopped, match="^experiment: SIGTERM received; first is finished"):
    train_or_reuse([first, second], "experiment", progress=False)
  assert not (tmp_path / "second").exists()
  assert signal.getsignal(signal.SIGTERM) is before
