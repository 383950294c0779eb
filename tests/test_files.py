"""Whole-file writes: the new content or the old one, never a mix, and nothing left behind."""

import os

import pytest

from mhc_jax.lm.files import write_atomically


def test_text_and_bytes_replace_the_file_with_a_plain_files_mode(tmp_path):
  path = tmp_path / "config.json"
  write_atomically(path, "{\"steps\": 3}\n")
  assert path.read_text() == "{\"steps\": 3}\n"
  write_atomically(path, b"\x00\xff")
  assert path.read_bytes() == b"\x00\xff"
  plain = tmp_path / "plain"
  plain.write_text("")
  assert os.stat(path).st_mode == os.stat(plain).st_mode  # readable as a plain write is
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "plain"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  path.write_text("old\n")

  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "replace", full_disk)
  with pytest.raises(OSError, match="No space left"):
    write_atomically(path, "new\n")
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
