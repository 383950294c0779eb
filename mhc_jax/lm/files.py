"""Files written whole: a kill or a full disk part way leaves the old file or the new one, never
half of one (a half-written config or metrics file would stop every later resume)."""

import os
import pathlib
import uuid


def write_atomically(path: pathlib.Path, data: str | bytes) -> None:
  """Writes `data` (text as UTF-8) to a temporary file beside `path`, flushed to disk, then
  renames it onto `path`. The temporary name is unique, so processes of several hosts may
  write the same file at once; its mode is a plain file's (umask applies)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  directory = os.open(path.parent, os.O_RDONLY)  # makes the rename itself survive a crash
  try:
    os.fsync(directory)
  finally:
    os.close(directory)
