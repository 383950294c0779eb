"""mhc_jax.lm.sample: sampling continues a prompt with the model's next-token distribution
at the right position, and what it prints is text (no control bytes in a training log)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm.model import ModelConfig, Transformer
from mhc_jax.lm.sample import printable, sample_text, sample_tokens
from mhc_jax.lm.tokenizer import decode, encode


def tiny_model(logit_scale=1.0):
  """A fresh 2-layer model, its read-out (untied, so the input token's own embedding does not
  dominate its logits) multiplied by `logit_scale`, and with it every logit's spread."""
  model = Transformer(ModelConfig(d_model=32, num_layers=2, num_heads=4, mlp_dim=64,
                                  tie_embeddings=False), rngs=nnx.Rngs(0))
  model.unembed[...] = model.unembed[...] * logit_scale
  return model


def greedy_by_full_forward(model, prompt, num_tokens, context):
  """The reference: each next token the argmax of the model's logits at the last position of
  the unpadded window, recomputed by a full forward pass; also the smallest top-2 gap."""
  tokens, gaps = list(prompt), []
  for _ in range(num_tokens):
    logits = np.asarray(model(jnp.asarray([tokens[-context:]], jnp.int32))[0, -1])
    top2 = np.sort(logits)[-2:]
    gaps.append(top2[1] - top2[0])
    tokens.append(int(np.argmax(logits)))
  return tokens, min(gaps)


def test_a_cold_sample_is_the_argmax_of_a_full_forward_at_the_last_position():
  # Prompt shorter than the context: the first windows are padded, so reading the logits one
  # position late (or early) picks other tokens; then the window slides.
  model, prompt, temperature = tiny_model(logit_scale=100.0), [72, 101, 108], 1e-3
  expected, gap = greedy_by_full_forward(model, prompt, num_tokens=10, context=8)
  assert gap / temperature > 50  # no Gumbel draw can overturn the argmax
  sampled = sample_tokens(model, prompt, num_tokens=10, context=8, temperature=temperature)
  assert sampled == expected
  assert len(set(expected[3:])) > 1  # not one token repeated: the positions matter


def test_samples_follow_the_seed():
  model, prompt = tiny_model(), [72, 101]
  draw = lambda seed: sample_tokens(model, prompt, num_tokens=12, context=8, temperature=1.0,
                                    seed=seed)
  assert draw(0) == draw(0) and draw(0) != draw(1)
  assert draw(0)[:2] == prompt and len(draw(0)) == 14


def test_printable_escapes_control_and_invisible_characters_but_keeps_lines_and_tabs():
  raw = "to be\x00\x07\x1b[31m\r\n\tor not\x7f\x85\u200b\u2028é—\ufffd"
  assert printable(raw) == ("to be\\x00\\x07\\x1b[31m\\r\n\tor not\\x7f\\x85\\u200b\\u2028"
                            "é—\ufffd")
  assert printable("plain verse,\n\tindented") == "plain verse,\n\tindented"


def test_printed_sample_of_an_untrained_byte_model_has_no_control_bytes():
  model = tiny_model()
  raw = decode(sample_tokens(model, encode("O"), num_tokens=64, context=16, temperature=1.0))
  # A fresh byte model samples about uniformly over 256 bytes: an eighth are control bytes.
  assert any(not c.isprintable() and c not in "\n\t" for c in raw)
  text = sample_text(model, "O", num_tokens=64, context=16, temperature=1.0)
  assert text == printable(raw)
  assert all(c.isprintable() or c in "\n\t" for c in text)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_tokens=0), "num_tokens must be an int >= 1, got 0"),
    (dict(context=0), "context must be an int >= 1, got 0"),
    (dict(temperature=0.0), r"temperature must be a number > 0, got 0.0"),
])
def test_bad_sampling_settings_are_one_line(kwargs, match):
  settings = {"num_tokens": 2, "context": 4, "temperature": 1.0, **kwargs}
  with pytest.raises(ValueError, match=f"^{match}$"):
    sample_tokens(tiny_model(), [72], **settings)
