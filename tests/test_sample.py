"""mhc_jax.lm.sample: sampling continues a prompt with the model's next-token distribution
at the right position, the model never reading more than the context, and what it prints is
text (no control bytes in a training log)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax.lm import sample
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


def greedy_by_full_forward(model, prompt, num_tokens):
  """The reference: the prompt followed by `num_tokens` tokens, each the argmax of the
  model's logits at the last position, recomputed by a full forward pass over the prompt and
  the tokens so far; also the smallest top-2 gap."""
  tokens, gaps = list(prompt), []
  for _ in range(num_tokens):
    logits = np.asarray(model(jnp.asarray([tokens], jnp.int32))[0, -1])
    top2 = np.sort(logits)[-2:]
    gaps.append(top2[1] - top2[0])
    tokens.append(int(np.argmax(logits)))
  return tokens, min(gaps)


def test_a_cold_sample_is_the_argmax_of_a_full_forward_over_the_window():
  # 3 prompt tokens and 10 more in a context of 8: the first 6 read all the tokens before
  # them (8 at most); then the last 4 are read afresh and 4 more follow them.
  model, prompt, temperature = tiny_model(logit_scale=100.0), [72, 101, 108], 1e-3
  first, gap = greedy_by_full_forward(model, prompt, 6)
  second, second_gap = greedy_by_full_forward(model, first[-4:], 4)
  expected = first + second[4:]
  assert min(gap, second_gap) / temperature > 50  # no Gumbel draw can overturn the argmax
  sampled = sample_tokens(model, prompt, num_tokens=10, context=8, temperature=temperature)
  assert sampled == expected
  assert sample_tokens(model, prompt, num_tokens=10, context=8, temperature=0.0) == expected
  assert len(set(expected[3:])) > 1  # not one token repeated: the positions matter


@pytest.mark.parametrize("context", [1, 2, 8])
def test_the_model_never_reads_more_than_the_context(monkeypatch, context):
  calls = []

  def fake_generate(model, prompts, max_new_tokens, *, context, seed, temperature):
    calls.append((prompts[0], max_new_tokens, seed))
    assert len(prompts[0]) + max_new_tokens - 1 <= context  # the last token is never read
    return [np.arange(max_new_tokens, dtype=np.int32) + 100 * len(calls)]

  monkeypatch.setattr(sample, "generate", fake_generate)
  tokens = sample_tokens(None, [1, 2, 3], num_tokens=20, context=context, temperature=1.0)
  assert len(tokens) == 23 and tokens[:3] == [1, 2, 3]
  made = 3
  for i, (window, new, _) in enumerate(calls):
    # Each window is the end of the text so far: all of it that fits the first time, then
    # the last half of the context; the last round keeps only the tokens still wanted.
    assert window == tokens[made - len(window):made]
    assert len(window) == (min(3, context) if i == 0 else (context + 1) // 2)
    new = min(new, 23 - made)
    assert tokens[made:made + new] == list(range(100 * (i + 1), 100 * (i + 1) + new))
    made += new
  assert made == 23 and len({seed for _, _, seed in calls}) == len(calls)
  # Every round after the first asks for as many tokens: one program for them all.
  assert len({new for _, new, _ in calls[1:]}) == 1


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
    (dict(temperature=-1.0), r"temperature must be a number >= 0 \(0: greedy\), got -1.0"),
])
def test_bad_sampling_settings_are_one_line(kwargs, match):
  settings = {"num_tokens": 2, "context": 4, "temperature": 1.0, **kwargs}
  with pytest.raises(ValueError, match=f"^{match}$"):
    sample_tokens(tiny_model(), [72], **settings)
