"""The shared argument check and the one line every command prints for an error."""

import pytest

from mhc_jax.checks import check_int, one_line


@pytest.mark.parametrize("value", [0, 1.0, True, "2"])
def test_check_int_names_the_argument_and_the_bound(value):
  with pytest.raises(ValueError, match=rf"^steps must be an int >= 1, got {value!r}$"):
    check_int("steps", value)
  check_int("steps", 0, minimum=0)


def test_one_line_is_the_first_line_after_the_type():
  err = ValueError("  bad binding 'LoopConfig.step = 3'\n  in file a.gin, line 4\n")
  assert one_line(err) == "ValueError: bad binding 'LoopConfig.step = 3'"
  assert one_line(err, with_type=False) == "bad binding 'LoopConfig.step = 3'"
  assert one_line(err, limit=11, with_type=False) == "bad binding"
  assert one_line(err, limit=11) == "ValueError: bad binding"


def test_one_line_of_an_empty_message_is_the_type():
  for err in (KeyError(), ValueError("  \n ")):
    assert one_line(err) == type(err).__name__
    assert one_line(err, with_type=False, limit=300) == type(err).__name__
