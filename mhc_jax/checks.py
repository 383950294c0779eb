"""Argument checks shared by every config, and the one line every command prints for an
error: one message format each."""


def check_int(name: str, value, minimum: int = 1) -> None:
  """Raises unless `value` is an int (not a bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def one_line(err: BaseException, limit: int | None = None, with_type: bool = True) -> str:
  """The first line of `err`'s message, cut to `limit` characters (a library's message can
  hold a whole spec on its first line), after its type's name unless `with_type=False` (for a
  caller whose own text says what failed); the type's name alone when the message is empty."""
  lines = str(err).strip().splitlines()
  if not lines:
    return type(err).__name__
  first = lines[0][:limit]
  return f"{type(err).__name__}: {first}" if with_type else first
