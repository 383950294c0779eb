"""mhc_jax.lm.tokenizer: the byte tokenizer's vocabulary, its round trips and its specials."""

import numpy as np
import pytest

from mhc_jax.lm import tokenizer


def test_vocabulary_constants():
  assert (tokenizer.EOS, tokenizer.PAD, tokenizer.VOCAB_SIZE) == (256, 257, 258)


@pytest.mark.parametrize("text", ["", "hello", "héllo wörld → 世界 🙂\n"])
def test_text_round_trip_one_token_per_utf8_byte(text):
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
  assert tokenizer.decode(ids) == text


def test_arbitrary_bytes_are_tokens_and_invalid_utf8_decodes_with_replacement():
  raw = bytes(range(256)) + b"\xff\xfe\x80abc"
  ids = tokenizer.encode(raw)
  np.testing.assert_array_equal(ids, list(raw))
  assert bytes(ids.astype(np.uint8)) == raw
  assert tokenizer.decode(tokenizer.encode(b"a\xffb")) == "a\ufffdb"


def test_decode_drops_specials_and_rejects_ids_outside_the_vocabulary():
  assert tokenizer.decode([104, tokenizer.EOS, 105, tokenizer.PAD]) == "hi"
  assert tokenizer.decode(np.array([[104], [105]])) == "hi"
  with pytest.raises(ValueError, match="token ids must lie in"):
    tokenizer.decode([104, tokenizer.VOCAB_SIZE])
