"""A wheel (`pip install .`, not editable) gives what the README promises: `mhc-train` finds
its presets, `include 'base.gin'` and all, run from outside any checkout, lists only those it
runs, and composes a residual preset over the default experiment; and the wheel holds every
file of the checkout's packages and every preset, so nothing added later is left out."""

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from mhc_jax.lm import presets
from mhc_jax.lm.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("mhc_jax", "kernels_pallas")  # top-level folders shipped as they are
SHIPPED_PRESETS = "mhc_jax/gin_configs/"
TINY = {
    "ModelConfig.d_model": 32, "ModelConfig.num_layers": 1, "ModelConfig.num_heads": 2,
    "ModelConfig.mlp_dim": 64, "DataConfig.seq_len": 16, "DataConfig.batch_size": 4,
    "LoopConfig.steps": 2, "LoopConfig.log_every": 1, "LoopConfig.eval_every": 2,
    "LoopConfig.eval_batches": 1, "LoopConfig.sample_tokens": 0,
}
# What .gitignore names, and .git: build outputs and environments are no part of the source.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "workdirs")


def run(command, **kwargs) -> subprocess.CompletedProcess:
  """Without PYTHONPATH, which could put the checkout back on the installed copy's path."""
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  return subprocess.run(command, capture_output=True, text=True,
                        env={**env, "JAX_PLATFORMS": "cpu"}, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """Built from a copy of the checkout: pip builds in the source tree, which is not this
  test's to write while other runs use it. The build is isolated, with setuptools from the
  registry (cached after the first time): a venv's own may predate pyproject's `license`."""
  root = tmp_path_factory.mktemp("wheel")
  source = root / "source"
  shutil.copytree(REPO, source, ignore=NOT_SOURCE)
  proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root),
              str(source)], timeout=300)
  assert proc.returncode == 0, proc.stderr
  (built,) = root.glob("*.whl")
  return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> pathlib.Path:
  """A fresh environment holding the wheel alone. Its dependencies come from this one through
  a .pth file (installing them again would take minutes); a .pth line adds a folder to the
  path and processes none of that folder's own .pth files, so the editable install's finder,
  which would import the checkout, stays out."""
  venv = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  own_site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                 check=True).stdout.strip()
  pathlib.Path(own_site, "dependencies.pth").write_text("\n".join(site.getsitepackages()))
  # --ignore-installed: leave this environment's editable install where it is.
  proc = run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
              str(wheel)], timeout=120)
  assert proc.returncode == 0, proc.stderr
  return venv


def check_wheel_holds_every_package_file_and_every_preset(wheel):
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
  shipped = sorted(name.removeprefix(SHIPPED_PRESETS) for name in names
                   if name.startswith(SHIPPED_PRESETS))
  code = {name for name in names if name.startswith(tuple(f"{p}/" for p in PACKAGES))}
  assert code - {SHIPPED_PRESETS + name for name in shipped} == {
      path.relative_to(REPO).as_posix() for package in PACKAGES
      for path in (REPO / package).rglob("*")
      if path.is_file() and "__pycache__" not in path.parts}
  # The editable install reads the checkout's presets: the one source the wheel's are copied from.
  assert presets.PRESET_DIR == REPO / "gin_configs"
  assert shipped == presets.preset_names()


def test_the_wheel_ships_everything_and_trains_outside_the_checkout(wheel, venv, corpus,
                                                                    tmp_path):
  """One test, so that the wheel is built once (xdist would give two tests two builds)."""
  check_wheel_holds_every_package_file_and_every_preset(wheel)
  where = run([venv / "bin" / "python", "-c",  # where `import mhc_jax` would load it from
               "import importlib.util; print(importlib.util.find_spec('mhc_jax').origin)"],
              cwd=tmp_path, check=True).stdout.strip()
  assert pathlib.Path(where).is_relative_to(venv), where
  mhc_train = str(venv / "bin" / "mhc-train")
  help_text = run([mhc_train, "--help"], cwd=tmp_path, timeout=120).stdout
  assert f"relative to {where.removesuffix('__init__.py')}gin_configs " in help_text, help_text
  listed = {line.strip() for line in help_text.splitlines() if line.startswith("    ")}
  assert listed >= {"shakespeare_tiny.gin", "residual/mhc.gin"}
  # The experiments/ scripts' presets ship too (a checkout's scripts read them), but mhc-train
  # cannot run them and the wheel has no scripts: --help names their folders, not them.
  assert not {name for name in presets.preset_names()
              if name.startswith(("compare/", "retrofit/", "sweeps/"))} & listed, help_text
  assert "  sweeps/ (python -m experiments.sweep)\n" in help_text
  bindings = [arg for name, value in {**TINY, "DataConfig.source": corpus}.items()
              for arg in ("--gin_param", f"{name} = {value!r}")]
  # The default preset (shakespeare_tiny.gin, which includes base.gin), alone and under a
  # residual/ one: both train the tiny experiment (its warm-up and checkpoint interval, which
  # TINY leaves alone), and the start-up line says so.
  default = "mhc-train: presets: shakespeare_tiny.gin (default: no --gin_file includes base.gin)"
  for name, files in {"prenorm": [], "mhc": ["--gin_file", "residual/mhc.gin"]}.items():
    workdir = tmp_path / name
    proc = run([mhc_train, *files, *bindings, "--workdir", str(workdir)], cwd=tmp_path,
               timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert f"{default}{''.join(f', {file}' for file in files[1:])} -> {name}" in proc.stdout
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2]
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["residual"] == name
    assert (config["optimizer"]["warmup_steps"], config["loop"]["checkpoint_every"]) == (60, 150)
