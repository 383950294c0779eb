"""Multi-host runs: the flags, telling a lost process from other errors, and two `mhc-train`
processes on CPU where one is killed: the other leaves within seconds with one line and exit
code 3, and rerunning both resumes from the last checkpoint."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from mhc_jax.lm import checkpoint, cli, distributed
from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

GLOO_RESET = ("UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] "
              "Read error [127.0.0.1]:36589: Connection reset by peer")


def test_errors_of_a_lost_process_are_told_from_others():
  assert distributed.is_peer_lost(ValueError(GLOO_RESET))  # what jax raises from a step
  barrier = RuntimeError("INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: "
                         "Task 1 heartbeat timeout.")
  assert distributed.is_peer_lost(barrier)
  try:  # as orbax reports its commit thread's failure
    raise TimeoutError("Timed out while waiting for async_write_complete barrier.") from barrier
  except TimeoutError as err:
    assert distributed.is_peer_lost(err)
  wrapped = ValueError(f"cannot restore the checkpoint of step 5 in /w: {GLOO_RESET}")
  assert distributed.is_peer_lost(wrapped)
  for other in (ValueError("ModelConfig.vocab_size is 300, the corpus 'x' has 256 tokens"),
                ValueError("INVALID_ARGUMENT: mesh data*fsdp*tensor = 2 must equal 1"),
                RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 3.0GiB"),
                ConnectionResetError("Connection reset by peer")):  # a download, not a peer
    assert not distributed.is_peer_lost(other), other


def test_the_message_names_the_lost_contact_and_where_to_resume(tmp_path):
  assert checkpoint.latest_step(tmp_path) is None
  for name in ("5", "10", "15.orbax-checkpoint-tmp-1234"):  # the last one is being written
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert checkpoint.latest_step(tmp_path) == 10
  assert distributed.peer_lost_message(ValueError(GLOO_RESET), 10) == (
      f"lost contact with another process ({GLOO_RESET}): exiting so the job can restart; "
      "rerun to resume from step 10")
  assert distributed.peer_lost_message(ValueError(GLOO_RESET), None).endswith(
      "rerun to start again (no checkpoint yet)")


def test_exit_if_peer_lost_exits_only_with_several_processes(tmp_path, monkeypatch, capsys):
  with pytest.raises(ValueError):  # one process: nobody to lose, the error stays as it is
    with distributed.exit_if_peer_lost(tmp_path, "mhc-train"):
      raise ValueError(GLOO_RESET)

  def exit_(code):
    raise SystemExit(code)

  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  monkeypatch.setattr(distributed.os, "_exit", exit_)
  with pytest.raises(ValueError, match="vocab_size"):
    with distributed.exit_if_peer_lost(tmp_path, "mhc-train"):
      raise ValueError("ModelConfig.vocab_size is wrong")
  with pytest.raises(SystemExit) as exited:
    with distributed.exit_if_peer_lost(tmp_path, "mhc-train"):
      raise ValueError(GLOO_RESET)
  assert exited.value.code == distributed.PEER_LOST == 3
  assert capsys.readouterr().err == (
      f"mhc-train: {distributed.peer_lost_message(ValueError(GLOO_RESET), None)}\n")


@pytest.mark.parametrize("flags, error", [
    (["--coordinator", "h:1", "--num_processes", "2", "--process_id", "0"], "with --multihost"),
    (["--multihost", "--coordinator", "h:1"], "go together"),
])
def test_multihost_flags_are_checked(flags, error, capsys):
  with pytest.raises(SystemExit) as exited:
    cli.parse_args(["--workdir", "w", *flags])
  assert exited.value.code == 2
  assert error in capsys.readouterr().err
  args = cli.parse_args(["--workdir", "w", "--multihost"])  # a TPU pod describes itself
  assert args.multihost and args.coordinator is None


TINY = ["ModelConfig.d_model = 32", "ModelConfig.num_layers = 1", "ModelConfig.num_heads = 2",
        "ModelConfig.mlp_dim = 64", "DataConfig.seq_len = 16", "DataConfig.batch_size = 4",
        "MeshConfig.data = 2", "LoopConfig.steps = 400", "LoopConfig.log_every = 1",
        "LoopConfig.eval_every = 1000", "LoopConfig.sample_tokens = 0"]
# Far apart: the kill lands while the survivor steps, not while its main thread waits for a
# checkpoint's commit, where only the heartbeat timeout tells it (see distributed.py).
CHECKPOINT_EVERY = 20


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_both(tmp_path, workdir, bindings, tag):
  """Both processes of a run; each one's stdout and stderr go to files read as it runs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  port, procs = free_port(), []
  for i in range(2):
    args = [sys.executable, "-m", "mhc_jax.lm.cli", "--gin_file", "shakespeare_tiny.gin",
            "--workdir", str(workdir), "--no_progress", "--multihost", "--coordinator",
            f"localhost:{port}", "--num_processes", "2", "--process_id", str(i)]
    for binding in bindings:
      args += ["--gin_param", binding]
    out, err = (open(tmp_path / f"{tag}{i}.{kind}", "w") for kind in ("out", "err"))
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err))
    out.close()
    err.close()
  return procs


def logs(tmp_path, tag, i, kind):
  return (tmp_path / f"{tag}{i}.{kind}").read_text()


def test_survivor_of_a_killed_process_exits_at_once_and_the_rerun_resumes(tmp_path, corpus):
  workdir = tmp_path / "run"
  bindings = TINY + [f"DataConfig.source = '{corpus}'",
                     f"LoopConfig.checkpoint_every = {CHECKPOINT_EVERY}"]
  procs = start_both(tmp_path, workdir, bindings, "first")
  try:
    deadline = time.monotonic() + 180
    while not (workdir / "checkpoints" / str(CHECKPOINT_EVERY)).is_dir():
      assert all(p.poll() is None for p in procs), logs(tmp_path, "first", 0, "err")[-3000:]
      assert time.monotonic() < deadline, "no checkpoint within 180 s"
      time.sleep(0.02)
    stderr_before = len(logs(tmp_path, "first", 0, "err"))
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0].wait(timeout=60)
    took = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
      p.wait()
  stderr = logs(tmp_path, "first", 0, "err")
  print(f"survivor exited {took:.2f} s after the kill")
  assert code == distributed.PEER_LOST, stderr[-3000:]
  assert took < 30, stderr[-3000:]
  step = checkpoint.latest_step(workdir)
  assert step is not None and step >= CHECKPOINT_EVERY
  after = stderr[stderr_before:].splitlines()
  assert len(after) == 1, stderr[-3000:]
  assert after[0].startswith("mhc-train: lost contact with another process ("), after[0]
  assert after[0].endswith(f"exiting so the job can restart; rerun to resume from step {step}")
  assert "Check failure" not in stderr and "SIGABRT" not in stderr

  procs = start_both(tmp_path, workdir, bindings + [f"LoopConfig.stop_after_step = {step + 2}"],
                     "again")
  codes = [p.wait(timeout=180) for p in procs]
  assert codes == [0, 0], logs(tmp_path, "again", 0, "err")[-3000:]
  assert f"resuming at step {step}" in logs(tmp_path, "again", 0, "out")
  assert read_metrics(workdir)[-1]["step"] == step + 2
