"""Reliability: SIGKILL at any moment, preemption signals, non-finite steps and bad input,
all through the real CLI (`python -m mhc_jax.lm.cli`) in subprocesses with real signals and
files. (The numerics of deep bfloat16 stacks are in test_modules.py, Sinkhorn's extreme
logits in the Sinkhorn tests.)

The subprocesses share one JAX compilation cache, so a restart costs an import rather than
a compile. A cache hit is the executable a compile would have produced, so bitwise
comparisons between runs keep their meaning.
"""

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import math
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step here, then renames it
# The tiny run every subprocess test trains (or breaks one binding of).
TINY = {
    "ModelConfig.d_model": 32, "ModelConfig.num_layers": 2, "ModelConfig.num_heads": 4,
    "ModelConfig.mlp_dim": 64, "DataConfig.seq_len": 32, "DataConfig.batch_size": 8,
    "OptimizerConfig.learning_rate": 3e-3, "OptimizerConfig.warmup_steps": 4,
    "LoopConfig.steps": STEPS, "LoopConfig.eval_every": STEPS, "LoopConfig.eval_batches": 1,
    "LoopConfig.log_every": 1, "LoopConfig.checkpoint_every": 1,
    "LoopConfig.sample_tokens": 0,
}
TIMEOUT = 240  # per subprocess; a healthy one takes seconds, even on two busy cores


# --- subprocess helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def gin_literal(value) -> str:
  if isinstance(value, float) and math.isinf(value):
    return "1e999" if value > 0 else "-1e999"  # gin reads these as +-inf; repr's 'inf' it cannot
  return repr(value)


def train_command(workdir, corpus, bindings=None, gin_files=("base.gin",)) -> list[str]:
  command = [sys.executable, "-m", "mhc_jax.lm.cli", "--no_progress"]
  for gin_file in gin_files:
    command += ["--gin_file", str(gin_file)]
  for name, value in {**TINY, "DataConfig.source": corpus, **(bindings or {})}.items():
    command += ["--gin_param", f"{name} = {gin_literal(value)}"]
  return command + ["--workdir", str(workdir)]


def run_cli(command, env) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT)


@contextlib.contextmanager
def started_cli(command, env):
  """A running CLI process; killed on the way out if a failed assertion left it running."""
  proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def checkpoint_entries(workdir) -> list[os.DirEntry]:
  try:
    return list(os.scandir(pathlib.Path(workdir) / "checkpoints"))
  except FileNotFoundError:
    return []


def complete_steps(workdir) -> list[int]:
  """Steps whose checkpoint orbax finished (renamed from its temporary directory)."""
  return sorted(int(e.name) for e in checkpoint_entries(workdir) if e.name.isdigit())


def partial_checkpoints(workdir) -> list[str]:
  return sorted(e.name for e in checkpoint_entries(workdir) if TMP_SUFFIX in e.name)


def logged_steps(workdir) -> list[int]:
  try:
    return [row["step"] for row in read_metrics(workdir)]
  except FileNotFoundError:
    return []


def start_banner(stdout: str) -> int | None:
  """The step a run said it resumed at (0: from scratch); None if it died before saying."""
  match = re.search(r"; (resuming at step (\d+)|starting from scratch)$", stdout, re.M)
  return None if match is None else int(match.group(2) or 0)


WALL_CLOCK = ("tokens_per_sec", "tflops_per_device", "mfu")


def without_wall_clock(rows) -> list[dict]:
  return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], poll: float = 0.002) -> bool:
  """Polls until `ready()` (-> True) or `proc` exits (-> False)."""
  deadline = time.monotonic() + TIMEOUT
  while proc.poll() is None:
    if ready():
      return True
    if time.monotonic() > deadline:
      proc.kill()
      raise TimeoutError(f"{proc.args} neither exited nor got ready in {TIMEOUT} s")
    time.sleep(poll)
  return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cli_env):
  """An uninterrupted run: its workdir (checkpoints of steps 10-12) and its metrics."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run_cli(train_command(workdir, corpus), cli_env)
  assert proc.returncode == 0, proc.stderr
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
  assert complete_steps(workdir) == [STEPS - 2, STEPS - 1, STEPS]
  return workdir, rows


# --- 1. SIGKILL at any moment ----------------------------------------------------------------


def new_partial_checkpoint(workdir, at_least: int) -> Callable[[], bool]:
  """True once a temporary checkpoint of a step >= `at_least` exists that was not there
  when this was called (a killed run may have left one of the same name)."""
  def identity(entry):
    stat = entry.stat(follow_symlinks=False)
    return entry.name, stat.st_ino, stat.st_mtime_ns

  def tmp_entries():
    return [e for e in checkpoint_entries(workdir) if TMP_SUFFIX in e.name]

  try:
    old = {identity(e) for e in tmp_entries()}
  except FileNotFoundError:
    old = set()

  def ready():
    try:
      return any(int(e.name.split(".")[0]) >= at_least and identity(e) not in old
                 for e in tmp_entries())
    except FileNotFoundError:  # orbax renamed or removed it while we looked
      return False
  return ready


def logged_then_delay(workdir, at_least: int, delay: float) -> Callable[[], bool]:
  """True `delay` seconds after this run logged a step >= `at_least`. Lines a killed run
  left behind do not count: only once metrics.jsonl changed (the new run drops the lines
  past its checkpoint, then appends)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  mtime = lambda: path.stat().st_mtime_ns if path.exists() else None
  old, seen = mtime(), []

  def ready():
    if not seen and mtime() != old and logged_steps(workdir)[-1:] >= [at_least]:
      seen.append(time.monotonic())
    return bool(seen) and time.monotonic() >= seen[0] + delay
  return ready


def after(delay: float) -> Callable[[], bool]:
  start = time.monotonic()
  return lambda: time.monotonic() >= start + delay


def test_sigkill_at_any_moment_resumes_bitwise_from_the_last_complete_checkpoint(
    tmp_path, corpus, cli_env, reference):
  workdir = tmp_path / "run"
  command = train_command(workdir, corpus)  # checkpoint_every=1: a save is nearly always due
  rng = random.Random(0)
  # Kill points are relative to the step the run resumes from (r), capped at the last step
  # so that every one lands while the process still runs.
  plan = [
      ("during start-up", lambda r: after(rng.uniform(0.3, 2.0))),
      ("writing a checkpoint", lambda r: new_partial_checkpoint(workdir, min(r + 2, STEPS))),
      ("shortly after a step", lambda r: logged_then_delay(workdir, min(r + 1, STEPS),
                                                           rng.uniform(0.0, 0.1))),
      ("writing a checkpoint", lambda r: new_partial_checkpoint(workdir, min(r + 3, STEPS))),
      ("shortly after a step", lambda r: logged_then_delay(workdir, min(r + 3, STEPS),
                                                           rng.uniform(0.0, 0.1))),
      # After the last step's metrics and eval are logged, before its checkpoint is done.
      ("writing the last checkpoint", lambda r: new_partial_checkpoint(workdir, STEPS)),
  ]
  killed_mid_write = 0
  for moment, trigger in plan:
    resume = max(complete_steps(workdir), default=0)
    assert resume < STEPS, f"finished before the kill {moment}"
    with started_cli(command, cli_env) as proc:
      assert wait_for(proc, trigger(resume)), f"exited before the kill {moment}"
      proc.kill()  # SIGKILL: no handler, no cleanup
      stdout, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    # It resumed from the newest complete checkpoint, whatever partial one lay beside it.
    assert start_banner(stdout) in (None, resume), (moment, stdout)
    newest = max(complete_steps(workdir), default=0)
    killed_mid_write += any(int(name.split(".")[0]) > newest
                            for name in partial_checkpoints(workdir))
  resume = max(complete_steps(workdir), default=0)
  final = run_cli(command, cli_env)
  assert final.returncode == 0, final.stderr
  assert start_banner(final.stdout) == resume
  # Some kill really landed inside a checkpoint write and left a partial one behind.
  assert killed_mid_write >= 1
  assert logged_steps(workdir) == list(range(1, STEPS + 1))  # each step logged once
  assert without_wall_clock(read_metrics(workdir)) == without_wall_clock(reference[1])
  # Re-saving a step replaces its leftover temporary directory: nothing partial remains.
  assert partial_checkpoints(workdir) == []
  assert complete_steps(workdir) == [STEPS - 2, STEPS - 1, STEPS]


# --- 2. Preemption: SIGTERM / SIGINT -------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preemption_signal_saves_the_step_reached_exits_0_and_resumes_bitwise(
    tmp_path, corpus, cli_env, reference, signum):
  workdir = tmp_path / "run"
  # No periodic checkpoints: the only one can come from the signal.
  command = train_command(workdir, corpus, {"LoopConfig.checkpoint_every": 1000})
  with started_cli(command, cli_env) as proc:
    assert wait_for(proc, lambda: logged_steps(workdir)[-1:] >= [2])
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == 0, stderr
  reached = logged_steps(workdir)[-1]
  assert 2 <= reached < STEPS
  assert complete_steps(workdir) == [reached] and partial_checkpoints(workdir) == []
  assert stderr.strip().splitlines() == [
      f"mhc-train: {signum.name} received; saved the checkpoint of step {reached} in "
      f"{workdir / 'checkpoints'}; run the same command to resume"]
  rerun = run_cli(command, cli_env)
  assert rerun.returncode == 0, rerun.stderr
  assert start_banner(rerun.stdout) == reached
  assert without_wall_clock(read_metrics(workdir)) == without_wall_clock(reference[1])


# --- 3. Non-finite values through the CLI -------------------------------------------------


def test_cli_nonfinite_parameters_exit_1_naming_the_step_and_save_nothing_after_it(
    tmp_path, corpus, cli_env, reference):
  workdir = tmp_path / "run"
  # Warm-up keeps the learning rate finite for updates 1-4; then the cosine decay towards
  # final_lr_ratio = inf gives NaN, so update 5 is the first whose new parameters are not
  # finite (its loss and gradients still are).
  command = train_command(workdir, corpus, {"OptimizerConfig.final_lr_ratio": math.inf})
  proc = run_cli(command, cli_env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "mhc-train: non-finite parameters at step 5; that update was not applied and nothing "
      "after it was saved (last checkpoint: step 4)"]
  # Step 4's save was still in flight when step 5 failed: it must be complete all the same.
  assert complete_steps(workdir) == [2, 3, 4] and partial_checkpoints(workdir) == []
  assert logged_steps(workdir) == [1, 2, 3, 4]
  assert without_wall_clock(read_metrics(workdir)) == without_wall_clock(reference[1][:4])


def test_cli_nonfinite_loss_and_gradients_are_named(tmp_path, corpus, cli_env):
  # Infinite initial weights: the very first forward pass is NaN.
  proc = run_cli(train_command(tmp_path, corpus, {"ModelConfig.init_std": math.inf}),
                 cli_env)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      "mhc-train: non-finite loss and gradients and parameters at step 1; that update was "
      "not applied and nothing after it was saved (last checkpoint: step 0)"]
  assert complete_steps(tmp_path) == [] and partial_checkpoints(tmp_path) == []


# --- 4. Bad input ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One malformed input. `culprit`: a regex the one error line must match. `bindings`
  override TINY. `workdir`: "previous" (a copy of the reference run's, whose files must
  keep their bytes and mtimes), "new" (none yet: none may be left) or "unwritable".
  `prepare(case_dir)` may write files and returns extra `bindings` or `gin_files`.
  `devices`: CPU devices the subprocess gets."""

  name: str
  culprit: str
  bindings: dict = dataclasses.field(default_factory=dict)
  workdir: str = "previous"
  prepare: Callable | None = None
  devices: int = 1


def _bad_gin_file(case_dir):
  (case_dir / "broken.gin").write_text("ModelConfig.d_model = = 32\n")
  return {"gin_files": ("base.gin", str(case_dir / "broken.gin"))}


def _empty_file(case_dir):
  (case_dir / "empty.txt").write_bytes(b"")
  return {"bindings": {"DataConfig.source": str(case_dir / "empty.txt")}}


def _corrupt(relative):
  def prepare(case_dir):
    path = case_dir / "workdir" / "checkpoints" / str(STEPS) / relative
    path.write_bytes(np.random.default_rng(0).bytes(max(path.stat().st_size, 64)))
    return {}
  return prepare


def _corrupt_largest_array_file(case_dir):
  files = (case_dir / "workdir" / "checkpoints" / str(STEPS) / "state").rglob("*")
  largest = max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)
  largest.write_bytes(np.random.default_rng(0).bytes(largest.stat().st_size))
  return {}


def _remove_config_json(case_dir):
  (case_dir / "workdir" / "config.json").unlink()
  return {}


def _truncate(name):
  def prepare(case_dir):
    path = case_dir / "workdir" / name
    path.write_bytes(path.read_bytes()[:10])
    return {}
  return prepare


def damaged(part: str) -> str:
  """The line for a damaged checkpoint of the last step whose `part` cannot be read."""
  checkpoints = r"(\S+/workdir/checkpoints)"
  return (rf"^mhc-train: ValueError: the checkpoint of step {STEPS} in {checkpoints} is "
          rf"damaged: {re.escape(part)} cannot be read; rm -r \1/{STEPS} and rerun the same "
          rf"command to resume from step {STEPS - 1}$")


def other_model(held: str, asked: str) -> str:
  return (rf"^mhc-train: ValueError: workdir \S+/workdir holds {held}; this run asks {asked}: "
          r"resume it with its own settings \(its config\.json\), or start this run in "
          r"another workdir$")


BAD_INPUTS = [
    Case("gin_syntax_error", r"bad gin file '.*broken\.gin': SyntaxError",
         prepare=_bad_gin_file),
    Case("unknown_configurable", "No configurable matching 'NoSuchThing'",
         {"NoSuchThing.value": 3}),
    Case("unknown_residual", "residual .* 'resnet'", {"ModelConfig.residual": "resnet"}),
    Case("zero_streams", "MHC.num_streams must be an int >= 1, got 0", {
        "ModelConfig.residual": "mhc", "MHC.num_streams": 0}),
    Case("too_many_streams_for_mhc_lite", "num_streams must be <= 6 .* got 7", {
        "ModelConfig.residual": "mhc_lite", "MHCLite.num_streams": 7}),
    Case("old_flat_setting", "ModelConfig.sinkhorn_iters is now a setting of the residual "
         "variant: bind MHC.sinkhorn_iters", {"ModelConfig.sinkhorn_iters": 10}),
    Case("settings_of_another_variant", "MHC.sinkhorn_iters is bound, but ModelConfig.residual "
         "is 'hc', which does not read it: remove the binding, or set ModelConfig.residual = "
         "'mhc'", {"ModelConfig.residual": "hc", "MHC.sinkhorn_iters": 10}),
    Case("streams_of_another_variant", "MHC.num_streams is bound, but ModelConfig.residual "
         "is 'hc', which does not read it: bind HC.num_streams", {
             "ModelConfig.residual": "hc", "MHC.num_streams": 2}),
    Case("d_model_not_divisible_by_heads", r"d_model \(30\) .* num_heads \(4\)",
         {"ModelConfig.d_model": 30}),
    Case("unknown_dtype", "dtype .* 'float8'", {"ModelConfig.dtype": "float8"}),
    Case("sequence_longer_than_corpus", r"seq_len \+ 1 = 1000001",
         {"DataConfig.seq_len": 1_000_000}),
    Case("missing_corpus_path", "not found: no/such/dir",
         {"DataConfig.source": "no/such/dir/*.txt"}),
    Case("missing_corpus_path_in_a_new_workdir", "not found: no/such/dir",
         {"DataConfig.source": "no/such/dir/*.txt"}, workdir="new"),
    Case("missing_prepared_corpus_in_a_new_workdir", "prepared corpus /no/such/corpus not found",
         {"DataConfig.source": "arrayrecord:/no/such/corpus"}, workdir="new"),
    # The source the pod preset leaves for the user to fill in (TINY would replace it).
    Case("pod_preset_without_a_source_in_a_new_workdir", "'arrayrecord:' names no corpus",
         {"DataConfig.source": "arrayrecord:"}, workdir="new",
         prepare=lambda case_dir: {"gin_files": ("tpu_pod_mhc.gin",)}),
    Case("empty_corpus_file", r"corpus is empty: .*empty\.txt", prepare=_empty_file),
    Case("unwritable_workdir", "workdir .*/workdir is not writable", workdir="unwritable"),
    Case("mesh_larger_than_devices", r"mesh data\*fsdp\*tensor = 2\*1\*1 = 2 must equal "
         "the number of devices, 1", {"MeshConfig.data": 2}),
    Case("mesh_larger_than_devices_in_a_new_workdir", r"mesh data\*fsdp\*tensor = 2\*1\*1 = 2",
         {"MeshConfig.data": 2}, workdir="new"),
    Case("batch_not_divisible_by_data_axes", r"batch_size 6 .* data\*fsdp = 4", {
        "MeshConfig.data": 2, "MeshConfig.fsdp": 2, "DataConfig.batch_size": 6}, devices=4),
    Case("heads_not_divisible_by_tensor_axis", "attn/wk .* cannot be split 4 ways .*'tensor'",
         {"MeshConfig.tensor": 4, "ModelConfig.num_heads": 2}, devices=4),
    Case("checkpoint_of_another_width", other_model("d_model=32", "d_model=64"),
         {"ModelConfig.d_model": 64}),
    Case("checkpoint_of_another_residual", other_model("residual=prenorm", "residual=mhc"),
         {"ModelConfig.residual": "mhc"}),
    # Post-norm has pre-norm's arrays: only config.json can tell the two apart.
    Case("checkpoint_of_another_function", other_model("residual=prenorm", "residual=postnorm"),
         {"ModelConfig.residual": "postnorm"}),
    Case("checkpoint_of_another_width_without_config_json",
         rf"^mhc-train: ValueError: cannot restore the checkpoint of step {STEPS} in "
         r"\S+/workdir/checkpoints with this config: it holds float32\[2, 32, 4, 8\] for "
         r"params\.blocks\.attn\.wk, this config needs float32\[2, 64, 4, 16\]$",
         {"ModelConfig.d_model": 64}, prepare=_remove_config_json),
    Case("checkpoint_of_another_layer_layout", rf"checkpoint of step {STEPS} .* holds scanned "
         r"layers, this config has unrolled ones: set ModelConfig\.scan_layers = True",
         {"ModelConfig.scan_layers": False}),
    Case("attention_the_platform_cannot_run", "attention='cudnn' needs a GPU",
         {"ModelConfig.attention": "cudnn"}),
    Case("corrupted_checkpoint_array_file", damaged("its train state (state/)"),
         prepare=_corrupt_largest_array_file),
    Case("corrupted_checkpoint_metadata",
         damaged("the metadata of its train state (state/_METADATA)"),
         prepare=_corrupt("state/_METADATA")),
    Case("corrupted_iterator_state", damaged("its data iterator's position (data/)"),
         prepare=_corrupt("data/process_0-of-1.json")),
    Case("damaged_config_json", r"^mhc-train: ValueError: \S+/workdir/config\.json is damaged "
         r"\(JSONDecodeError: .+\); delete it to resume the run$",
         prepare=_truncate("config.json")),
    Case("damaged_finished_json", r"^mhc-train: ValueError: \S+/workdir/finished\.json is "
         r"damaged \(JSONDecodeError: .+\); delete it to resume the run$",
         prepare=_truncate("finished.json")),
    Case("zero_steps", "steps must be an int >= 1, got 0", {"LoopConfig.steps": 0}),
    Case("negative_steps", "steps must be an int >= 1, got -5", {"LoopConfig.steps": -5}),
    Case("steps_not_a_number", "steps .* 'ten'", {"LoopConfig.steps": "ten"}),
    Case("zero_checkpoint_every", "checkpoint_every must be an int >= 1, got 0",
         {"LoopConfig.checkpoint_every": 0}),
    Case("negative_learning_rate", "learning_rate must be > 0, got -0.001",
         {"OptimizerConfig.learning_rate": -1e-3}),
    Case("unknown_nonfinite_policy", "nonfinite .* 'ignore'", {"LoopConfig.nonfinite": "ignore"}),
    Case("validation_fraction_of_one", r"validation_fraction .* got 1\.0",
         {"DataConfig.validation_fraction": 1.0}),
]


def unwritable_dir(case_dir) -> pathlib.Path:
  """A workdir that cannot be created: under a read-only directory, or, where that does
  not stop us (root ignores permission bits), under a regular file."""
  locked = case_dir / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    (locked / "probe").mkdir()
  except PermissionError:
    return locked / "workdir"
  (locked / "probe").rmdir()
  (case_dir / "a_file").write_text("")
  return case_dir / "a_file" / "workdir"


def file_states(root) -> dict[str, tuple]:
  """Every file under `root`: size, mtime and content hash."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                     hashlib.sha256(p.read_bytes()).hexdigest())
          for p in sorted(root.rglob("*")) if p.is_file()}


def workdir_states(workdir) -> dict[str, tuple] | None:
  """`file_states` of `workdir`; None when there is no such directory."""
  return file_states(workdir) if pathlib.Path(workdir).exists() else None


def run_case(case: Case, case_dir: pathlib.Path, corpus, env, reference_dir):
  case_dir.mkdir()
  workdir = case_dir / "workdir"
  if case.workdir == "previous":
    shutil.copytree(reference_dir, workdir, copy_function=shutil.copy2)  # keeps mtimes
  elif case.workdir == "unwritable":
    workdir = unwritable_dir(case_dir)
  extra = case.prepare(case_dir) if case.prepare else {}
  before = workdir_states(workdir)
  command = train_command(workdir, corpus, {**case.bindings, **extra.get("bindings", {})},
                          extra.get("gin_files", ("base.gin",)))
  proc = run_cli(command, {**env, "JAX_NUM_CPU_DEVICES": str(case.devices)})
  return proc, before, workdir_states(workdir)


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory, corpus, cli_env, reference):
  """Every case's (process, files before, files after), run a few at a time."""
  root = tmp_path_factory.mktemp("bad_inputs")
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    futures = {case.name: pool.submit(run_case, case, root / case.name, corpus, cli_env,
                                      reference[0])
               for case in BAD_INPUTS}
    return {name: future.result() for name, future in futures.items()}


def test_bad_input_table_is_large_enough():
  assert len(BAD_INPUTS) >= 15 and len({case.name for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_every_bad_input_case_is_in_the_table_of_messages():
  messages = (REPO / "docs" / "reliability.md").read_text().split("## Messages")[1]
  missing = [case.name for case in BAD_INPUTS if f"`{case.name}`" not in messages]
  assert not missing, f"docs/reliability.md's table of messages lacks {missing}"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda case: case.name)
def test_bad_input_is_one_line_naming_the_culprit_and_writes_nothing(bad_input_runs, case):
  proc, before, after_ = bad_input_runs[case.name]
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert len(lines) == 1 and lines[0].startswith("mhc-train: "), proc.stderr
  assert re.search(case.culprit, lines[0]), lines[0]
  assert "Traceback" not in proc.stderr
  if case.workdir == "previous":
    assert any(name.startswith(f"checkpoints/{STEPS}/") for name in before)
  # A previous workdir keeps its files, bytes and mtimes; a new one is not created.
  assert after_ == before


def test_the_way_out_of_a_damaged_checkpoint_resumes_bitwise_from_the_one_before(
    tmp_path, corpus, cli_env, reference):
  # A damaged newest checkpoint stops the run with exit 2 (corrupted_* in the table) rather
  # than silently falling back (docs/reliability.md says why); its line names the way out.
  workdir = tmp_path / "workdir"
  shutil.copytree(reference[0], workdir)
  _corrupt_largest_array_file(tmp_path)
  command = train_command(workdir, corpus)
  stopped = run_cli(command, cli_env)
  assert stopped.returncode == 2, stopped.stderr
  way_out = re.search(r"; (rm -r \S+) and rerun the same command", stopped.stderr)
  assert way_out, stopped.stderr
  subprocess.run(shlex.split(way_out.group(1)), check=True)
  assert complete_steps(workdir) == [STEPS - 2, STEPS - 1]
  proc = run_cli(command, cli_env)
  assert proc.returncode == 0, proc.stderr
  assert start_banner(proc.stdout) == STEPS - 1
  assert without_wall_clock(read_metrics(workdir)) == without_wall_clock(reference[1])


def test_non_utf8_corpus_is_bytes_and_trains(tmp_path, cli_env):
  # A byte-level model has no text encoding to violate: invalid UTF-8 is just bytes.
  rng = np.random.default_rng(0)
  for d in range(2):  # two documents, so the split holds one out for validation
    (tmp_path / f"doc{d}.bin").write_bytes(b"\xff\xfe\xc3(\x80" + rng.bytes(4000))
  workdir = tmp_path / "workdir"
  proc = run_cli(train_command(workdir, str(tmp_path / "*.bin"),
                               {"LoopConfig.steps": 3, "LoopConfig.eval_every": 3}), cli_env)
  assert proc.returncode == 0, proc.stderr
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == [1, 2, 3]
  assert all(math.isfinite(row["train_loss"]) for row in rows)
  assert math.isfinite(rows[-1]["eval_loss"])


# --- 5. A full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (a real filesystem that fills up; mounting it needs root, as CI has).
  tests/test_checkpoint.py checks the same one-line conversion without a mount."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: pathlib.Path, leave: int) -> pathlib.Path:
  """Writes a file taking all but `leave` bytes of `disk`'s free space."""
  filler = disk / "filler"
  filler.write_bytes(b"\0" * max(shutil.disk_usage(disk).free - leave, 0))
  return filler


def test_full_disk_is_one_line_keeps_the_last_checkpoint_and_resumes_bitwise(
    small_disk, corpus, cli_env, reference):
  workdir = small_disk / "workdir"
  first = run_cli(train_command(workdir, corpus, {"LoopConfig.stop_after_step": 6}), cli_env)
  assert first.returncode == 0, first.stderr
  kept = complete_steps(workdir)
  assert kept[-1] == 6
  before = file_states(workdir / "checkpoints")
  # Room for the metrics of a step or two, not for a checkpoint (one takes about 0.4 MiB).
  filler = fill(small_disk, leave=64 * 1024)

  proc = run_cli(train_command(workdir, corpus), cli_env)
  assert proc.returncode == 4, proc.stderr
  errors = proc.stderr.strip().splitlines()
  assert len(errors) == 1, proc.stderr  # orbax's tracebacks of the failure are not printed
  assert re.fullmatch(
      rf"mhc-train: cannot write the checkpoint of step (7|8) in {workdir / 'checkpoints'}: "
      r"No space left on device \(0\.\d MiB free there\); partial checkpoints removed: free "
      r"space and rerun the same command to resume from step 6", errors[0]), errors[0]
  assert partial_checkpoints(workdir) == []
  assert complete_steps(workdir) == kept and file_states(workdir / "checkpoints") == before

  filler.unlink()
  resumed = run_cli(train_command(workdir, corpus), cli_env)
  assert resumed.returncode == 0, resumed.stderr
  assert start_banner(resumed.stdout) == 6
  assert without_wall_clock(read_metrics(workdir)) == without_wall_clock(reference[1])
