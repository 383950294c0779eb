"""Argument checks shared by every config: one message format, naming the argument."""


def check_int(name: str, value, minimum: int = 1) -> None:
  """Raises unless `value` is an int (not a bool) >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
