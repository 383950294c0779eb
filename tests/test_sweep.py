"""Sweeps: spec expansion, the local runner's skipping, the TPU launcher, and two processes
training one run together through jax.distributed (checkpoint, resume) on CPU."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from mhc_jax.lm.metrics import read_metrics

from experiments import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 1", "ModelConfig.num_heads = 2",
        "ModelConfig.mlp_dim = 64", "DataConfig.seq_len = 16", "DataConfig.batch_size = 4",
        "OptimizerConfig.warmup_steps = 2", "LoopConfig.log_every = 1",
        "LoopConfig.eval_every = 100", "LoopConfig.eval_batches = 1", "LoopConfig.sample_tokens = 0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  words = "to be or not that is the question whether tis nobler".split()
  rng = np.random.default_rng(0)
  for d in range(6):
    (root / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 400)))
  return str(root / "*.txt")


def write_spec(path: pathlib.Path, bindings, grid=None, runs=()) -> str:
  path.write_text(f"Sweep.bindings = {list(bindings)!r}\nSweep.grid = {grid or {}!r}\n"
                  f"Sweep.runs = {list(runs)!r}\n")
  return str(path)


def env():
  return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def test_expand_grid_and_list():
  runs = sweep.expand(sweep.Sweep(
      gin_files=("a.gin",), bindings=("LoopConfig.steps = 3",),
      grid={"ModelConfig.residual": ["prenorm", "mhc"], "LoopConfig.seed": [0, 1]},
      runs=({"MHC.num_streams": 2},)))
  assert [r.name for r in runs] == ["residual=prenorm,seed=0", "residual=prenorm,seed=1",
                                    "residual=mhc,seed=0", "residual=mhc,seed=1",
                                    "num_streams=2"]
  assert runs[2].bindings == ("LoopConfig.steps = 3", "ModelConfig.residual = 'mhc'",
                              "LoopConfig.seed = 0")
  with pytest.raises(ValueError, match="repeated"):
    sweep.expand(sweep.Sweep(runs=({"LoopConfig.seed": 1}, {"LoopConfig.seed": 1})))
  with pytest.raises(ValueError, match="no runs"):
    sweep.expand(sweep.Sweep())


def test_tpu_launcher_prints_one_command_for_all_workers(tmp_path, capsys):
  spec = write_spec(tmp_path / "s.gin", [], grid={"LoopConfig.seed": [0, 1]})
  assert sweep.main([spec, "--out", "/mnt/shared/x", "--tpu", "pod", "--zone", "z1"]) == 0
  command = capsys.readouterr().out.strip()
  assert command.startswith("gcloud compute tpus tpu-vm ssh pod --zone=z1 --worker=all")
  assert f"-m experiments.sweep {spec} --out /mnt/shared/x --multihost" in command


def test_local_sweep_runs_each_point_once(tmp_path, corpus):
  spec = write_spec(tmp_path / "s.gin", TINY + [f"DataConfig.source = '{corpus}'",
                                                "LoopConfig.steps = 2"],
                    grid={"ModelConfig.residual": ["prenorm", "mhc"]})
  command = [sys.executable, "-m", "experiments.sweep", spec, "--out", str(tmp_path / "out")]
  first = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
  assert first.returncode == 0, first.stderr[-2000:]
  for name in ("residual=prenorm", "residual=mhc"):
    assert [r["step"] for r in read_metrics(tmp_path / "out" / name)] == [1, 2]
  again = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=300)
  assert again.stdout.count("finished, skipped") == 2, again.stdout


def test_a_stopped_run_stops_the_sweep_and_a_rerun_resumes(tmp_path, corpus):
  # stop_after_step ends a run early with a checkpoint, as SIGTERM does.
  bindings = TINY + [f"DataConfig.source = '{corpus}'", "LoopConfig.steps = 4"]
  grid = {"ModelConfig.residual": ["prenorm", "mhc"]}
  out = tmp_path / "out"
  stopped = subprocess.run(
      [sys.executable, "-m", "experiments.sweep",
       write_spec(tmp_path / "stop.gin", bindings + ["LoopConfig.stop_after_step = 2"], grid),
       "--out", str(out)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert stopped.returncode == 0, stopped.stderr[-2000:]
  assert stopped.stderr.splitlines()[-1] == ("sweep: stopped in residual=prenorm (its checkpoint "
                                             "is saved); rerun the sweep to resume it")
  assert not (out / "residual=mhc").exists()
  resumed = subprocess.run([sys.executable, "-m", "experiments.sweep",
                            write_spec(tmp_path / "s.gin", bindings, grid), "--out", str(out)],
                           cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  for name in ("residual=prenorm", "residual=mhc"):
    assert [r["step"] for r in read_metrics(out / name)][-1] == 4


def test_a_run_is_finished_at_the_steps_its_bindings_ask(tmp_path):
  (tmp_path / "checkpoints" / "2").mkdir(parents=True)
  (tmp_path / "finished.json").write_text('{"step": 2}')
  run = lambda steps: sweep.Run("r", (), (f"LoopConfig.steps = {steps}",))
  assert sweep.is_finished(run(2), tmp_path)
  assert not sweep.is_finished(run(3), tmp_path)  # more steps asked: it resumes


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_checkpoint_and_resume_together(tmp_path, corpus):
  common = TINY + [f"DataConfig.source = '{corpus}'", "LoopConfig.steps = 6",
                   "MeshConfig.data = 2"]
  runs = [{"ModelConfig.residual": "mhc"}]
  out = tmp_path / "out"

  def multihost(extra):
    spec = write_spec(tmp_path / "spec.gin", common + extra, runs=runs)
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.sweep", spec, "--out", str(out), "--multihost",
         "--coordinator", f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-3000:] + logs[1][-3000:]
    return logs

  multihost(["LoopConfig.stop_after_step = 3"])
  workdir = out / "residual=mhc"
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
  assert not (workdir / "finished.json").exists()
  logs = multihost([])
  assert "resuming at step 3" in logs[0]
  assert json.loads((workdir / "finished.json").read_text())["step"] == 6
  together = [r["train_loss"] for r in read_metrics(workdir)]

  # The same run in one process over 2 devices: the same global batches and mesh.
  code = ("import jax; jax.config.update('jax_num_cpu_devices', 2); import sys; "
          "from mhc_jax.lm.cli import main; sys.exit(main(sys.argv[1:]))")
  args = [a for b in common + ["ModelConfig.residual = 'mhc'"] for a in ("--gin_param", b)]
  single = subprocess.run([sys.executable, "-c", code, *args, "--workdir",
                           str(tmp_path / "single")], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]
  alone = [r["train_loss"] for r in read_metrics(tmp_path / "single")]
  assert len(together) == len(alone) == 6
  np.testing.assert_allclose(together, alone, rtol=1e-5)


def test_a_multihost_run_composes_its_presets_as_mhc_train_does(monkeypatch, tmp_path):
  # run_local's subprocesses are mhc-train, which puts an add-on over the default experiment;
  # the multihost loop builds the configs itself and must get the same ones.
  trained = []
  monkeypatch.setattr(sweep.distributed, "initialize", lambda *args: None)
  monkeypatch.setattr(sweep.train_lib, "train", lambda workdir, **kw: trained.append(kw))
  monkeypatch.setattr(sweep, "ended_early", lambda *args: False)  # the fake saves nothing
  run = sweep.Run("mhc", ("residual/mhc.gin",), ())
  args = type("Args", (), {"coordinator": None, "num_processes": None, "process_id": None})
  sweep.run_multihost([run], tmp_path, args)
  (configs,) = trained
  assert (configs["model"].residual, configs["model"].d_model, configs["loop"].steps) == (
      "mhc", 128, 600)  # shakespeare_tiny.gin's model and run, with mHC


def test_a_signal_during_a_multihost_runs_last_step_stops_the_sweep(monkeypatch, tmp_path,
                                                                     capsys):
  # The run takes the signal after its last step's stop check (the fake sends it as it
  # returns, finished): the sweep must not start the next run.
  trained = []

  def finishing_as_a_signal_comes(workdir, **kw):
    trained.append(pathlib.Path(workdir).name)
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(sweep.distributed, "initialize", lambda *args: None)
  monkeypatch.setattr(sweep.train_lib, "train", finishing_as_a_signal_comes)
  monkeypatch.setattr(sweep, "ended_early", lambda *args: False)
  runs = [sweep.Run(name, ("residual/mhc.gin",), ()) for name in ("first", "second")]
  args = type("Args", (), {"coordinator": None, "num_processes": None, "process_id": None})
  with pytest.raises(SystemExit) as stopped:
    sweep.run_multihost(runs, tmp_path, args)
  assert stopped.value.code == 0 and trained == ["first"]
  assert capsys.readouterr().err.splitlines() == [
      "sweep: SIGTERM received; first is finished and no later run started; rerun the sweep "
      "to go on"]
